"""Which models of ComfyUI's ``Flux`` class the patch runs: FLUX.1, decided from the model's parameters.

Why: newer ComfyUI (0.29) runs FLUX.2, LongCat-Image and Ovis-Image through the same class as
FLUX.1, so ``isinstance(dm, Flux)`` no longer says FLUX.1. The patch relies on FLUX.1's
layout: three RoPE axes (index, row, column), 2x2 patches, text positions all zero, a GELU MLP
and per-block modulation. On the others it would crash (FLUX.2 has four axes) or silently
change the image (LongCat-Image places text on axes 1 and 2). Each gets a clear refusal until
it is supported.
"""

from __future__ import annotations

LATENT_CHANNELS = 16  # FLUX.1's VAE latent (FLUX.2: 128 at 1/16 of the pixels)
# Pixels per latent cell along each side (ComfyUI's latent_format.spacial_downscale_ratio; FLUX.2: 16).
PIXELS_PER_LATENT = 8
# The longest text FLUX.1 takes (T5 tokens of FLUX.1-dev; schnell uses 256): what the memory estimate assumes.
MAX_TEXT_TOKENS = 512


def other_family(diffusion_model) -> str | None:
    """None for a FLUX.1-shaped ``comfy.ldm.flux.model.Flux``; else a name for what it is instead."""
    p = diffusion_model.params
    if getattr(p, "global_modulation", False) or len(p.axes_dim) == 4:
        return "FLUX.2"
    if getattr(p, "yak_mlp", False) or getattr(p, "txt_norm", False):
        return "Ovis-Image"
    if list(getattr(p, "txt_ids_dims", None) or []):
        return "LongCat-Image" if p.vec_in_dim is None else "a FLUX-class model with text positions"
    if len(p.axes_dim) != 3 or p.patch_size != 2 or getattr(p, "mlp_silu_act", False):
        return f"a FLUX-class model with {len(p.axes_dim)} position axes and {p.patch_size}x{p.patch_size} patches"
    return None
