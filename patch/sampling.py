"""Sampling-side settings of the patch: constant shift, and a memory estimate that fits.

Why constant shift: ComfyUI's ModelSamplingFlux extrapolates the shift linearly with the
image area, which puts every step of a 4K run at sigma ~ 1; UltraGen and ScaleDiff keep
FLUX's 1024^2 shift (mu = 1.15) at every size.

Why a memory estimate: ComfyUI sizes its VRAM reservation with a per-pixel constant
measured on 1K images (~32 GB for a 4K batch of 2, ~127 GB at 8K), so large images fall
into low-VRAM offload although the windowed model needs far less. A PREPARE_SAMPLING
wrapper lends the model a tighter estimate for the length of that call only.

Why weights are released after loading: ComfyUI 0.3.64's loader never shrinks a model that is
already loaded — it only adds weights — so sampling a larger image with a model still
loaded from a smaller one (an artist's next queue item, a Recursive Upscale stage) kept every
weight and ran out of memory on 16-32 GB cards. ComfyUI 0.29 unloads the surplus itself; the
wrapper applies that same rule on any host, which leaves 0.29 unchanged.
"""

from __future__ import annotations

import logging
import math

import comfy.model_sampling
import torch

from ..core.flow_matching import FLUX_MU_1024
from .flux_family import shift_mu_for
from .options import UltraGenPatchError

log = logging.getLogger("UltraGen")

# A chunked FLUX step (chunked_blocks.py) holds a block's input (1U) and q, k, v (3U) through attention,
# plus the rotary table (U/6), one slice's temporaries and the weights of the layer in use, where U is
# tokens x hidden x the compute dtype's size. bench/vram_cards.py measured the step's peak above what was
# allocated when it began (H200, whole GPU, ComfyUI 0.29, 2026-12-01, slices of 16384 tokens): 5.8 U at
# 8192^2, 5.5 U at 12288^2, 5.4 U at 16384^2, one of those U a stale reference in ComfyUI's forward_orig
# since removed (the blocks hand their outputs over). On emulated 24 GB cards without DynamicVRAM, 8192^2
# ran out of memory allocating the first single block's q, k, v with 6 U here (the double blocks' freed
# buffer split by ComfyUI's concatenation; one buffer per call since), so the estimate keeps 7 U, a whole
# slice, and room for the layer weights a partially loaded model casts (the chunked blocks hold two of
# FLUX.1's largest at once, ComfyUI's cast buffers two more: 4 x 94 MB in bf16).
# ComfyUI keeps this much free when it decides how many weights to load: an underestimate loads too many.
ACTIVATION_UNITS = 7
CAST_WEIGHT_BYTES = 512 * 2**20


def constant_shift_sampling(model_config, mu: float):
    """A FLUX model_sampling object whose shift is ``mu`` at every resolution."""

    class ModelSamplingConstantShift(comfy.model_sampling.ModelSamplingFlux, comfy.model_sampling.CONST):
        pass

    sampling = ModelSamplingConstantShift(model_config)
    sampling.set_parameters(shift=mu)
    return sampling


def model_shift_mu(model_config, mu: float) -> float:
    """The constant shift to sample ``model_config``'s model with when the node says ``mu`` (see ``shift_mu_for``)."""
    return shift_mu_for(getattr(model_config.latent_format, "latent_channels", 16), mu)


def constant_shift_sigmas(steps: int, mu: float = FLUX_MU_1024, scheduler: str = "simple") -> torch.Tensor:
    """ComfyUI's own ``scheduler`` for ``steps`` steps, on FLUX sampling with shift ``mu`` at any size."""
    import comfy.samplers

    if steps < 1:
        raise UltraGenPatchError(f"steps must be at least 1, got {steps}")
    if scheduler not in comfy.samplers.SCHEDULER_NAMES:
        raise UltraGenPatchError(f"scheduler must be one of {comfy.samplers.SCHEDULER_NAMES}, got {scheduler!r}")
    return comfy.samplers.calculate_sigmas(constant_shift_sampling(None, mu), scheduler, steps).float()


def windowed_memory_estimate(base_model, input_shape, extra_tokens: int = 0) -> float:
    """Bytes a patched FLUX step needs beyond its weights, for a latent batch of ``input_shape`` (B, C, H, W)."""
    from .chunked_blocks import SLICE_WIDTHS, chunk_tokens

    dm = base_model.diffusion_model
    patch = dm.patch_size
    tokens = math.prod(-(-s // patch) for s in input_shape[2:]) + extra_tokens
    dtype = base_model.manual_cast_dtype or base_model.get_dtype()
    element = torch.finfo(dtype).bits // 8
    batch = input_shape[0]
    activations = ACTIVATION_UNITS * batch * tokens * dm.hidden_size * element
    slice_tokens = chunk_tokens(tokens, batch, dm.hidden_size, element, None)
    one_slice = SLICE_WIDTHS * batch * slice_tokens * dm.hidden_size * element
    return activations + one_slice + CAST_WEIGHT_BYTES


def weights_allowed(
    free: float, loaded: float, minimum_required: float, weight_ratio: float, minimum_inference: float
) -> float:
    """Bytes of weights ComfyUI 0.29's loader lets a model keep on the GPU (``load_models_gpu``'s rule): all
    memory but what the step needs, or the host's ``MIN_WEIGHT_MEMORY_RATIO`` share of it, never below 0."""
    usable = free + loaded
    return max(0.0, usable - minimum_required, min(usable * weight_ratio, usable - minimum_inference))


def release_surplus_weights(model, noise_shape, conds, force_full_load: bool = False) -> int:
    """Move to the offload device what ``model`` holds on the GPU past ``weights_allowed``; bytes released.

    Called with the model just loaded by ComfyUI (and the windowed estimate in place). A no-op where ComfyUI
    0.29's loader already applied the rule, with DynamicVRAM (which loads on demand) and without low-VRAM
    loading (a high-VRAM or CPU setup keeps every weight by design)."""
    import comfy.model_management as mm
    import comfy.sampler_helpers

    dynamic = getattr(model, "is_dynamic", None)
    if force_full_load or (dynamic is not None and dynamic()) or not mm.lowvram_available:
        return 0
    if mm.vram_state not in (mm.VRAMState.LOW_VRAM, mm.VRAMState.NORMAL_VRAM) or mm.is_device_cpu(model.load_device):
        return 0
    loaded = model.loaded_size()
    if loaded <= 0:
        return 0
    _, minimum = comfy.sampler_helpers.estimate_memory(model, noise_shape, conds)
    _, control_memory = comfy.sampler_helpers.get_additional_models(conds, model.model_dtype())
    minimum_required = max(mm.minimum_inference_memory(), minimum + control_memory + mm.extra_reserved_memory())
    allowed = weights_allowed(mm.get_free_memory(model.load_device), loaded, minimum_required,
                              mm.MIN_WEIGHT_MEMORY_RATIO, mm.minimum_inference_memory())  # fmt: skip
    if loaded <= allowed:
        return 0
    model.partially_unload(model.offload_device, int(loaded - allowed))
    mm.soft_empty_cache()
    released = loaded - model.loaded_size()
    log.info("UltraGen: moved %.0f MB of weights off the GPU to leave this size's step room (ComfyUI keeps a loaded "
             "model's weights otherwise)", released / 2**20)  # fmt: skip
    return released


def memory_estimate_wrapper(extra_tokens_of):
    """PREPARE_SAMPLING wrapper: the smaller of ComfyUI's estimate and the windowed one, for this call, and no
    more weights on the GPU than that estimate leaves room for (``release_surplus_weights``)."""

    def wrapper(executor, model, noise_shape, conds, model_options=None, **kwargs):
        base = model.model
        had_own = "memory_required" in base.__dict__
        previous = base.memory_required

        def estimate(input_shape, cond_shapes={}):  # noqa: B006 - ComfyUI's signature
            windowed = windowed_memory_estimate(base, input_shape, extra_tokens_of(input_shape))
            return min(previous(input_shape, cond_shapes=cond_shapes), windowed)

        base.memory_required = estimate
        try:
            prepared = executor(model, noise_shape, conds, model_options=model_options, **kwargs)
            release_surplus_weights(model, noise_shape, conds, kwargs.get("force_full_load", False))
            return prepared
        finally:
            if had_own:
                base.memory_required = previous
            else:
                del base.memory_required

    return wrapper
