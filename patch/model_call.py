"""One model call outside a sampler, made the way ComfyUI's samplers make it.

Why: benchmarks and tests need a single denoising call of a (patched) ModelPatcher with
its object patches applied and its wrappers in ``transformer_options``, without going
through a whole sampling run.
"""

from __future__ import annotations

import contextlib
import copy

import comfy.model_management
import comfy.patcher_extension
import torch


def denoise(model, x: torch.Tensor, sigma: float, context: torch.Tensor, y: torch.Tensor, guidance: float = 3.5,
            load: bool = True, options: dict | None = None, **extra) -> torch.Tensor:  # fmt: skip
    """The model's denoised prediction for latent ``x`` (B, C, H, W) at noise level ``sigma``.

    ``load``: let ComfyUI load the model (applying its object patches), as a sampler does;
    ``False`` when the caller holds it applied (see :func:`applied`). ``options``: entries added
    to the call's ``transformer_options`` (e.g. a patch run, ``UltraGenFluxPatch.run_options``).
    """
    if load:
        comfy.model_management.load_models_gpu([model])
    options = {**copy.deepcopy(model.model_options["transformer_options"]), **(options or {})}
    comfy.patcher_extension.merge_nested_dicts(options.setdefault("wrappers", {}), model.wrappers, copy_dict1=False)
    batch = x.shape[0]
    with torch.inference_mode():  # as ComfyUI's executor runs nodes: no autograd graph
        return model.model.apply_model(
            x,
            torch.full((batch,), sigma, device=x.device),
            c_crossattn=context,
            y=y,
            guidance=torch.full((batch,), guidance, device=x.device),
            transformer_options=options,
            **extra,
        )


@contextlib.contextmanager
def applied(model):
    """Hold ``model``'s object patches applied to its (already resident) weights, without
    ComfyUI's memory management moving weights between clones: for benchmarks that switch
    between many clones of one large model."""
    model.patch_model(load_weights=False)
    try:
        yield model
    finally:
        model.unpatch_model(unpatch_weights=False)
