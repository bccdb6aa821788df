"""Recursive upscaling: 1K -> 2K -> 4K -> 8K, each stage guided by the one before.

Why: UltraGen generates ultra-high resolutions recursively: the previous result is both
the warm start (upsampled, the early steps skipped) and the low-res guidance of the next
stage. One stage here = guidance from the previous result, the UltraGen patch, a warm
start, sampling, and an exact VAE decode (for the preview and the image output).

The guidance is the previous result reduced to 1 / ``guidance_ratio`` of the new size (the
paper's ratio 4, at which the guidance LoRAs are trained), not the previous result as it is:
with scale 2 that would be ratio 2, four times the guidance tokens, whose global attention among
themselves costs a dense attention at the previous size. Measured on an H200 (FLUX.1-dev, ComfyUI
0.29): 8192^2 steps took 17.0 s with the 4096^2 result as guidance
(``bench/results/pipeline-8k-cold-*.json``) against 8.9-9.2 s at ratio 4
(``vram_cards-*-8192-*.json``).
"""

from __future__ import annotations

from dataclasses import dataclass

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import torch

from ..core.flow_matching import FLUX_MU_1024
from ..errors import UltraGenError
from .exact_vae import exact_decode, exact_encode
from .flux_family import pixels_per_latent, shift_mu_for
from .flux_patch import UltraGenFluxPatch
from .options import Guidance, PatchOptions, UltraGenPatchError
from .warm_start import upsample_latent, warm_start_sigmas

PREVIEW_SIZE = 512


class RecursiveUpscaleError(UltraGenError, RuntimeError):
    """A stage that failed; the message names the stage, its size, and the cause."""


@dataclass(frozen=True)
class StageSettings:
    """How every stage samples; defaults follow UltraGen (28 steps, 10 skipped)."""

    scale: float = 2.0
    steps: int = 28
    skip: int = 10
    cfg: float = 1.0
    sampler_name: str = "euler"
    scheduler: str = "simple"
    method: str = "latent bicubic"
    sharpen: float = 0.0
    shift_mu: float = FLUX_MU_1024
    guidance_scope: str = "local"
    guidance_ratio: float = 4.0

    def guidance_size(self, width: int, height: int, px: int) -> tuple[int, int]:
        """(width, height) in pixels of the guidance for a (width, height) stage: 1 / guidance_ratio of it, on the
        latent grid (``px`` pixels a cell)."""
        return (max(px, round(width / self.guidance_ratio / px) * px),
                max(px, round(height / self.guidance_ratio / px) * px))  # fmt: skip

    def target(self, samples: torch.Tensor, px: int) -> tuple[int, int]:
        """(width, height) in pixels of the next stage, on the 16-pixel grid FLUX works on (``px``: pixels per
        latent cell, the model's)."""
        w, h = samples.shape[-1] * px, samples.shape[-2] * px
        return max(16, round(w * self.scale / 16) * 16), max(16, round(h * self.scale / 16) * 16)


def check_settings(settings: StageSettings, stages: int) -> None:
    if stages < 1:
        raise UltraGenPatchError(f"Recursive Upscale needs at least 1 stage, got {stages}")
    if settings.scale <= 1:
        raise UltraGenPatchError(f"scale per stage must be above 1 (it upscales), got {settings.scale}")
    if settings.guidance_ratio < 1:
        raise UltraGenPatchError(
            f"guidance_ratio must be 1 or more (the guidance is the previous stage at 1 / ratio of the new size), "
            f"got {settings.guidance_ratio}"
        )
    if settings.sampler_name not in comfy.samplers.SAMPLER_NAMES:
        raise UltraGenPatchError(f"sampler must be one of ComfyUI's samplers, got {settings.sampler_name!r}")


def stage_guidance(vae, samples: torch.Tensor, image: torch.Tensor | None, settings: StageSettings, width: int,
                   height: int, px: int) -> Guidance:  # fmt: skip
    """The guidance of a (width, height) stage: the previous result (``samples``; ``image``: its pixels, if known)
    as it is when it is at most 1 / guidance_ratio of the stage, else its pixels resized to that and encoded
    exactly (antialiased bicubic: close to the Lanczos resize ultragen-train makes its low-res images with)."""
    small_w, small_h = settings.guidance_size(width, height, px)
    if samples.shape[-1] * px <= small_w and samples.shape[-2] * px <= small_h:
        return Guidance(samples.detach().cpu().float(), width, height, px)
    if image is None:
        image = exact_decode(vae, samples, progress=False)
    pixels = image[..., :3].movedim(-1, 1).float()
    small = torch.nn.functional.interpolate(pixels, size=(small_h, small_w), mode="bicubic", antialias=True)
    latent = exact_encode(vae, small.clamp(0, 1).movedim(1, -1), progress=False)
    return Guidance(latent.detach().cpu().float(), width, height, px)


def run_stage(
    model, positive, negative, vae, samples: torch.Tensor, image: torch.Tensor | None, settings: StageSettings,
    seed: int, progress: comfy.utils.ProgressBar, done: int, total: int, px: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """One stage: ``samples`` (VAE latent space, ``px`` pixels a cell; ``image``: its pixels if known) ->
    (latent, image) at ``settings.scale`` times the size."""
    width, height = settings.target(samples, px)
    guidance = stage_guidance(vae, samples, image, settings, width, height, px)
    shift_mu = shift_mu_for(samples.shape[1], settings.shift_mu)
    options = PatchOptions(guidance_scope=settings.guidance_scope, shift_mu=shift_mu)
    patched = UltraGenFluxPatch(options, guidance=guidance).apply(model)
    start = upsample_latent(samples, width, height, settings.method, vae, settings.sharpen)
    sigmas = warm_start_sigmas(settings.steps, settings.skip, 0.0, shift_mu, settings.scheduler)
    noise = comfy.sample.prepare_noise(start, seed)
    previewer = latent_preview.get_previewer(patched.load_device, patched.model.latent_format)

    def callback(step, x0, x, steps):
        comfy.model_management.throw_exception_if_processing_interrupted()  # cancelling works between steps
        preview = previewer.decode_latent_to_preview_image("JPEG", x0) if previewer else None
        progress.update_absolute(done + step + 1, total, preview)

    sampler = comfy.samplers.sampler_object(settings.sampler_name)
    out = comfy.sample.sample_custom(patched, noise, settings.cfg, sampler, sigmas, positive, negative, start,
                                     callback=callback, disable_pbar=True, seed=seed)  # fmt: skip
    image = exact_decode(vae, out, progress=False)
    progress.update_absolute(done + len(sigmas) - 1, total, ("JPEG", _preview(image), PREVIEW_SIZE))
    return out, image


def _preview(image: torch.Tensor):
    from PIL import Image

    array = (image[0].clamp(0, 1) * 255).to(torch.uint8).cpu().numpy()
    return Image.fromarray(array)


def recursive_upscale(model, positive, negative, vae, samples: torch.Tensor, stages: int, settings: StageSettings,
                      seed: int, image: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Run ``stages`` stages from ``samples`` (``image``: its pixels, if known); stage i uses seed + i. Returns the
    last (latent, image)."""
    check_settings(settings, stages)
    if samples.dim() != 4 or pixels_per_latent(samples.shape[1]) is None:
        raise RecursiveUpscaleError(
            f"Recursive Upscale: the latent to upscale has shape {tuple(samples.shape)}, but FLUX.1's latents have "
            "16 channels and FLUX.2's 128; connect a latent made by FLUX, or the image instead"
        )
    per_stage = len(warm_start_sigmas(settings.steps, settings.skip, 0.0, settings.shift_mu, settings.scheduler)) - 1
    px = pixels_per_latent(samples.shape[1], model.get_model_object("latent_format"))
    if image is not None:
        expected = (samples.shape[0], samples.shape[-2] * px, samples.shape[-1] * px)
        if tuple(image.shape[:3]) != expected:
            raise RecursiveUpscaleError(
                f"Recursive Upscale: the image ({image.shape[2]}x{image.shape[1]} px, batch {image.shape[0]}) is not "
                f"the latent's decoded image ({expected[2]}x{expected[1]} px, batch {expected[0]}); connect the image "
                "that belongs to the latent (the previous Recursive Upscale's image output), or only one of them"
            )
    progress = comfy.utils.ProgressBar(stages * per_stage)
    for i in range(stages):
        width, height = settings.target(samples, px)
        try:
            samples, image = run_stage(model, positive, negative, vae, samples, image, settings, seed + i, progress,
                                       i * per_stage, stages * per_stage, px)  # fmt: skip
        except comfy.model_management.InterruptProcessingException:
            raise
        except Exception as exc:
            raise RecursiveUpscaleError(
                f"Recursive Upscale stage {i + 1} of {stages} ({width}x{height} px) failed: {exc}"
            ) from exc
    return samples, image
