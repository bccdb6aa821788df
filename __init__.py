"""UltraGen for ComfyUI: fast, coherent 2K-8K FLUX generation (ComfyUI entry point).

ComfyUI imports this file and calls :func:`comfy_entrypoint`. Everything that needs
ComfyUI is imported inside it, so ``kernels`` and ``core`` stay importable (and testable)
without ComfyUI.
"""

import logging

__version__ = "0.1.0"

log = logging.getLogger("UltraGen")


async def comfy_entrypoint():
    """V3 entry point: say at start-up if this ComfyUI is too old, log the attention backend once,
    return the extension (its nodes refuse to patch on a ComfyUI that lacks a hook, naming why)."""
    from .comfy_env import comfyui_version
    from .kernels import describe_backend
    from .nodes import UltraGenExtension
    from .patch.host import OLDEST_COMFYUI, missing_hooks

    missing = missing_hooks()
    if missing:
        logging.error(
            f"UltraGen {__version__}: this ComfyUI ({comfyui_version()}) lacks {', '.join(missing)}; "
            f"UltraGen's nodes will refuse to run. Update ComfyUI to {OLDEST_COMFYUI} or newer."
        )

    try:
        backend = describe_backend()
    except Exception as exc:  # a broken GPU stack must not stop ComfyUI from starting
        backend = f"unknown ({exc})"
    logging.info(f"UltraGen {__version__}: attention backend: {backend}")
    return UltraGenExtension()
