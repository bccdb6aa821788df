"""The ComfyUI the pack runs in: the hooks the FLUX patch needs, checked before anything is patched.

Why: ComfyUI 0.3.59 and older have no ``optimized_attention_override``. There the patch would
install its other hooks, reorder the tokens, and never see an attention call: sampling runs
and the images come out silently wrong. A missing hook must be a clear error on the node,
naming the ComfyUI to install. Tested against 0.3.64 (the oldest supported) and 0.29.0.
"""

from __future__ import annotations

import inspect

from ..comfy_env import comfyui_version
from ..errors import UltraGenError

OLDEST_COMFYUI = "0.3.64"


class UltraGenHostError(UltraGenError, RuntimeError):
    """This ComfyUI lacks something the pack needs; the message names the version to install."""


def missing_hooks() -> list[str]:
    """The hooks the FLUX patch uses that this ComfyUI does not have (empty when all are there)."""
    import comfy.ldm.flux.math
    import comfy.ldm.modules.attention
    import comfy.model_patcher
    import comfy.patcher_extension

    missing = []
    if not hasattr(comfy.ldm.modules.attention, "wrap_attn"):
        missing.append("attention overrides (optimized_attention_override)")
    if "transformer_options" not in inspect.signature(comfy.ldm.flux.math.attention).parameters:
        missing.append("FLUX attention with transformer_options")
    for wrapper in ("OUTER_SAMPLE", "PREPARE_SAMPLING", "DIFFUSION_MODEL"):
        if not hasattr(comfy.patcher_extension.WrappersMP, wrapper):
            missing.append(f"the {wrapper} wrapper")
    for method in ("add_wrapper_with_key", "set_model_post_input_patch", "add_object_patch"):
        if not hasattr(comfy.model_patcher.ModelPatcher, method):
            missing.append(f"ModelPatcher.{method}")
    return missing


def check_host(node: str) -> None:
    """Raise :class:`UltraGenHostError` naming ``node`` if this ComfyUI cannot run the patch."""
    missing = missing_hooks()
    if missing:
        raise UltraGenHostError(
            f"{node}: this ComfyUI ({comfyui_version()}) lacks {', '.join(missing)}, which UltraGen needs; "
            f"without them it would make wrong images. Update ComfyUI to {OLDEST_COMFYUI} or newer."
        )
