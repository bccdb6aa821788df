"""Which models of ComfyUI's ``Flux`` class the patch runs (FLUX.1 and FLUX.2), and their latents' scale.

Why: newer ComfyUI (0.29) runs FLUX.1, FLUX.2, LongCat-Image and Ovis-Image through the same class,
so ``isinstance(dm, Flux)`` says little. FLUX.1 and FLUX.2 differ in ways the patch reads from the
model itself (RoPE axes from ``params.axes_dim``: FLUX.2 has a fourth that only text uses; tokens per
latent cell from ``patch_size``), and in how many pixels a latent cell covers (the VAE: 8, or 16
after FLUX.2's 2x2 unshuffle), read from the latent format or the VAE where ComfyUI says it. Models
of the class that are neither (LongCat-Image places text on axes 1 and 2, Ovis has a third MLP
layout) get a clear refusal until they are supported.
"""

from __future__ import annotations

from ..core.flow_matching import FLUX_MU_1024

# Pixels per latent cell along each side, by the latent's channel count, where ComfyUI does not say it
# (0.3.64 has no latent_format.spacial_downscale_ratio; latent-only nodes): FLUX.1's VAE (16 channels at 1/8),
# FLUX.2's (128 at 1/16).
PIXELS_PER_LATENT_OF_CHANNELS = {16: 8, 128: 16}
# ComfyUI's sampling shift (mu) of each family at 1024 px, by latent channels: FLUX.1's 1.15 and FLUX.2's 2.02
# (``supported_models.Flux2.sampling_settings``, which ComfyUI keeps at every size).
DEFAULT_SHIFT_MU_OF_CHANNELS = {16: FLUX_MU_1024, 128: 2.02}
# The longest text FLUX takes (T5 tokens of FLUX.1-dev; FLUX.2 pads to 512): what the memory estimate assumes.
MAX_TEXT_TOKENS = 512


def pixels_per_latent(channels: int, latent_format=None) -> int | None:
    """Pixels per latent cell: the latent format's own ratio where ComfyUI has it (0.29), else FLUX's by the
    latent's ``channels`` (None: not a FLUX latent)."""
    ratio = getattr(latent_format, "spacial_downscale_ratio", None)
    return int(ratio) if ratio else PIXELS_PER_LATENT_OF_CHANNELS.get(channels)


def shift_mu_for(channels: int, mu: float) -> float:
    """The constant shift for a latent of ``channels`` channels when the node says ``mu``: the nodes' default
    (FLUX.1's 1.15) stands for "the model's own 1024-px shift", FLUX.2's 2.02 on its latents; other values as set."""
    if mu == FLUX_MU_1024:
        return DEFAULT_SHIFT_MU_OF_CHANNELS.get(channels, mu)
    return mu


def not_a_flux_latent(channels: int) -> str:
    """What to tell an artist whose latent has ``channels`` channels, none of FLUX's."""
    return (f"the latent has {channels} channels, but FLUX.1's have 16 and FLUX.2's 128: connect a latent made "
            "by a FLUX VAE")  # fmt: skip


def other_family(diffusion_model) -> str | None:
    """None for a FLUX.1- or FLUX.2-shaped ``comfy.ldm.flux.model.Flux``; else a name for what it is instead."""
    p = diffusion_model.params
    txt_axes = list(getattr(p, "txt_ids_dims", None) or [])
    if getattr(p, "yak_mlp", False) or getattr(p, "txt_norm", False):
        return "Ovis-Image"
    if getattr(p, "global_modulation", False) or len(p.axes_dim) == 4:
        flux2 = (len(p.axes_dim) == 4 and txt_axes == [3] and p.patch_size == 1 and p.in_channels == 128
                 and getattr(p, "mlp_silu_act", False) and getattr(p, "global_modulation", False))  # fmt: skip
        return None if flux2 else "a FLUX.2-like model of another layout"
    if txt_axes:
        return "LongCat-Image" if p.vec_in_dim is None else "a FLUX-class model with text positions"
    if len(p.axes_dim) != 3 or p.patch_size != 2 or getattr(p, "mlp_silu_act", False):
        return f"a FLUX-class model with {len(p.axes_dim)} position axes and {p.patch_size}x{p.patch_size} patches"
    return None
