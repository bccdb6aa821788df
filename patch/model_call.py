"""One model call outside a sampler, made the way ComfyUI's samplers make it.

Why: benchmarks and tests need a single denoising call of a (patched) ModelPatcher with
its object patches applied and its wrappers in ``transformer_options``, without going
through a whole sampling run.
"""

from __future__ import annotations

import copy

import comfy.model_management
import comfy.patcher_extension
import torch


def denoise(model, x: torch.Tensor, sigma: float, context: torch.Tensor, y: torch.Tensor, guidance: float = 3.5,
            **extra) -> torch.Tensor:  # fmt: skip
    """The model's denoised prediction for latent ``x`` (B, C, H, W) at noise level ``sigma``."""
    comfy.model_management.load_models_gpu([model])
    options = copy.deepcopy(model.model_options["transformer_options"])
    comfy.patcher_extension.merge_nested_dicts(options.setdefault("wrappers", {}), model.wrappers, copy_dict1=False)
    batch = x.shape[0]
    return model.model.apply_model(
        x,
        torch.full((batch,), sigma, device=x.device),
        c_crossattn=context,
        y=y,
        guidance=torch.full((batch,), guidance, device=x.device),
        transformer_options=options,
        **extra,
    )
