"""Sampling-side settings of the patch: constant shift, and a memory estimate that fits.

Why constant shift: ComfyUI's ModelSamplingFlux extrapolates the shift linearly with the
image area, which puts every step of a 4K run at sigma ~ 1; UltraGen and ScaleDiff keep
FLUX's 1024^2 shift (mu = 1.15) at every size.

Why a memory estimate: ComfyUI sizes its VRAM reservation with a per-pixel constant
measured on 1K images (~32 GB for a 4K batch of 2, ~127 GB at 8K), so large images fall
into low-VRAM offload although the windowed model needs far less. A PREPARE_SAMPLING
wrapper lends the model a tighter estimate for the length of that call only.
"""

from __future__ import annotations

import math

import comfy.model_sampling
import torch

# Peak activation bytes per token per hidden unit of a windowed FLUX step (bf16), with margin:
# bench/flux_step.py measured 36.4 (peak VRAM minus weights, at 4096^2 and 8192^2 alike; H200,
# 2026-11-28). ComfyUI keeps this much free when it decides how many weights to load, so an
# underestimate would fully load FLUX on, e.g., a 48-GB card at 8K and then run out of memory.
ACTIVATION_BYTES_PER_TOKEN_UNIT = 40


def constant_shift_sampling(model_config, mu: float):
    """A FLUX model_sampling object whose shift is ``mu`` at every resolution."""

    class ModelSamplingConstantShift(comfy.model_sampling.ModelSamplingFlux, comfy.model_sampling.CONST):
        pass

    sampling = ModelSamplingConstantShift(model_config)
    sampling.set_parameters(shift=mu)
    return sampling


def constant_shift_sigmas(steps: int, mu: float = 1.15, scheduler: str = "simple") -> torch.Tensor:
    """ComfyUI's own ``scheduler`` for ``steps`` steps, on FLUX sampling with shift ``mu`` at any size."""
    import comfy.samplers

    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if scheduler not in comfy.samplers.SCHEDULER_NAMES:
        raise ValueError(f"scheduler must be one of {comfy.samplers.SCHEDULER_NAMES}, got {scheduler!r}")
    return comfy.samplers.calculate_sigmas(constant_shift_sampling(None, mu), scheduler, steps).float()


def windowed_memory_estimate(base_model, input_shape, extra_tokens: int = 0) -> float:
    """Bytes a windowed FLUX step needs for a latent batch of ``input_shape`` (B, C, H, W)."""
    dm = base_model.diffusion_model
    patch = dm.patch_size
    tokens = math.prod(-(-s // patch) for s in input_shape[2:]) + extra_tokens
    dtype = base_model.manual_cast_dtype or base_model.get_dtype()
    per_unit = ACTIVATION_BYTES_PER_TOKEN_UNIT * torch.finfo(dtype).bits / 16  # measured in bf16
    return input_shape[0] * tokens * dm.hidden_size * per_unit


def memory_estimate_wrapper(extra_tokens_of):
    """PREPARE_SAMPLING wrapper: the smaller of ComfyUI's estimate and the windowed one, for this call."""

    def wrapper(executor, model, noise_shape, conds, model_options=None, **kwargs):
        base = model.model
        had_own = "memory_required" in base.__dict__
        previous = base.memory_required

        def estimate(input_shape, cond_shapes={}):  # noqa: B006 - ComfyUI's signature
            windowed = windowed_memory_estimate(base, input_shape, extra_tokens_of(input_shape))
            return min(previous(input_shape, cond_shapes=cond_shapes), windowed)

        base.memory_required = estimate
        try:
            return executor(model, noise_shape, conds, model_options=model_options, **kwargs)
        finally:
            if had_own:
                base.memory_required = previous
            else:
                del base.memory_required

    return wrapper
