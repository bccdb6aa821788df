"""Warm start: the low-res result upsampled to the target size, and the sigmas that remain.

Why: UltraGen and ScaleDiff start the high-res pass from the upsampled low-res image and
skip the early steps. Three ways to upsample: bicubic in latent space (cheap, keeps the
low-res structure, may show decoding artifacts), in RGB and re-encoded (clean but
oversmoothed), or ScaleDiff's Latent Frequency Mixing (low band of the first, high band
of the second).
"""

from __future__ import annotations

from dataclasses import dataclass

import comfy.utils
import torch

from ..core.flow_matching import FLUX_MU_1024
from ..core.frequency import mix_frequencies, sharpen
from ..core.sigmas import remaining_sigmas
from ..errors import UltraGenError
from .flux_family import not_a_flux_latent, pixels_per_latent
from .sampling import constant_shift_sigmas

METHODS = ("latent bicubic", "RGB upsample", "LFM mix")


class WarmStartError(UltraGenError, ValueError):
    """Inputs the warm start cannot work with; the message says what to change."""


def _latent_bicubic(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    px = pixels_per_latent(samples.shape[1])
    cells = (width // px, height // px)
    return comfy.utils.common_upscale(samples, *cells, "bicubic", "disabled")


def _rgb_upsample(samples: torch.Tensor, width: int, height: int, vae, amount: float) -> torch.Tensor:
    images = vae.decode(samples)  # (B, h, w, 3) in [0, 1]
    if images.dim() == 5:  # some VAEs return (B, T, H, W, C)
        images = images.flatten(0, 1)
    pixels = comfy.utils.common_upscale(images.movedim(-1, 1), width, height, "bicubic", "disabled")
    pixels = sharpen(pixels.clamp(0, 1), amount).clamp(0, 1)
    return vae.encode(pixels.movedim(1, -1)[..., :3])


def upsample_latent(
    samples: torch.Tensor, width: int, height: int, method: str, vae=None, sharpen_amount: float = 0.0
) -> torch.Tensor:
    """``samples`` (B, C, h, w) in VAE latent space -> (B, C, height / px, width / px), clean (px: pixels per latent
    cell, FLUX.1 8, FLUX.2 16; FLUX.2's latent is upsampled as the authors do, in its 128-channel normalised form).

    Sharpening is an unsharp mask on the upsampled image (RGB methods) or latent (bicubic).
    """
    if method not in METHODS:
        raise WarmStartError(f"upsample method must be one of {METHODS}, got {method!r}")
    if samples.dim() != 4:
        raise WarmStartError(f"Warm-Start Latent takes an image latent (B, C, H, W), got {tuple(samples.shape)}")
    px = pixels_per_latent(samples.shape[1])
    if px is None:
        raise WarmStartError(
            f"{not_a_flux_latent(samples.shape[1])} (its KSampler, or VAE Encode with FLUX's ae.safetensors)"
        )
    src_w, src_h = samples.shape[-1] * px, samples.shape[-2] * px
    if width < src_w or height < src_h:
        raise WarmStartError(
            f"the target {width}x{height} px is smaller than the low-res latent ({src_w}x{src_h} px); "
            "Warm-Start Latent only upsamples"
        )
    if method != "latent bicubic":
        if vae is None:
            raise WarmStartError(f"the {method!r} method decodes and re-encodes: connect the VAE")
        if samples.shape[1] != vae.latent_channels:
            raise WarmStartError(
                f"the latent has {samples.shape[1]} channels but the VAE makes {vae.latent_channels}: "
                "use the VAE of the model that made this latent"
            )
    if method == "latent bicubic":
        return sharpen(_latent_bicubic(samples, width, height), sharpen_amount)
    rgb = _rgb_upsample(samples, width, height, vae, sharpen_amount).to(samples.dtype)
    if method == "RGB upsample":
        return rgb
    lat = _latent_bicubic(samples, width, height).to(rgb.device, rgb.dtype)
    return mix_frequencies(lat, rgb)


@dataclass(frozen=True)
class WarmStartOptions:
    """What the Warm-Start Latent node exposes (and Constant-Shift Sigmas its schedule part); defaults
    follow UltraGen: FLUX's 28-step schedule at 1024 px's shift, its first 10 steps skipped."""

    method: str = "latent bicubic"
    sharpen: float = 0.0
    steps: int = 28
    skip: int = 10
    start_sigma: float = 0.0
    shift_mu: float = FLUX_MU_1024
    scheduler: str = "simple"


def warm_start_sigmas(
    steps: int, skip: int = 0, start_sigma: float = 0.0, mu: float = FLUX_MU_1024, scheduler: str = "simple"
) -> torch.Tensor:
    """The sigmas a warm-started sampler runs: ComfyUI's schedule with constant shift ``mu``,
    without its first ``skip`` steps (or starting at ``start_sigma`` when that is > 0)."""
    if not start_sigma and skip >= steps:
        raise WarmStartError(f"skip ({skip}) must be less than the total steps ({steps}): nothing would be left to run")
    try:
        return remaining_sigmas(constant_shift_sigmas(steps, mu, scheduler), skip, start_sigma or None)
    except ValueError as exc:
        raise WarmStartError(str(exc)) from None
