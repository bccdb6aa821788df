"""ScaleDiff's Structure Guidance as a post-CFG function.

Why: at every step the low band of the model's clean-image prediction is pulled towards
the reference's: x0 += gamma_t * (LP(Z_ref) - LP(x0)). Early steps (large sigma) follow
the reference's structure; late steps keep their own detail.
"""

from __future__ import annotations

import logging

import comfy.utils
import torch

from ..core.frequency import low_pass
from ..core.guidance import aspect_mismatch
from .flux_family import pixels_per_latent
from .options import UltraGenPatchError

GAMMA_SCHEDULES = ("sigma", "sigma squared", "constant")
log = logging.getLogger("UltraGen")


def gamma(sigma: torch.Tensor, strength: float, schedule: str) -> torch.Tensor:
    """gamma_t per batch item: strength * sigma (ScaleDiff), * sigma^2, or constant."""
    if schedule == "sigma":
        return strength * sigma
    if schedule == "sigma squared":
        return strength * sigma**2
    if schedule == "constant":
        return torch.full_like(sigma, strength)
    raise UltraGenPatchError(f"gamma schedule must be one of {GAMMA_SCHEDULES}, got {schedule!r}")


class StructureGuidance:
    """The post-CFG function; kept on the model clone (deep copies return itself)."""

    def __init__(self, reference: torch.Tensor, latent_format, strength: float, schedule: str, factor: int = 4):
        gamma(torch.zeros(1), strength, schedule)  # validates the schedule name
        self.reference = reference  # (B, C, H, W), VAE latent space
        self.latent_format = latent_format
        self.strength, self.schedule, self.factor = strength, schedule, factor
        self._low_ref: dict = {}

    def __deepcopy__(self, memo):
        return self

    def _reference_low_band(self, like: torch.Tensor) -> torch.Tensor:
        key = (tuple(like.shape), like.device, like.dtype)
        if key not in self._low_ref:
            ref = self.latent_format.process_in(self.reference.to(like.device, torch.float32))
            if ref.shape[1] != like.shape[1]:
                raise UltraGenPatchError(
                    f"Structure Guidance: the reference latent has {ref.shape[1]} channels but the model predicts "
                    f"{like.shape[1]}; use a latent of this model's VAE"
                )
            if ref.shape[-2:] != like.shape[-2:]:
                if aspect_mismatch(ref.shape[-1], ref.shape[-2], like.shape[-1], like.shape[-2]):
                    px = pixels_per_latent(ref.shape[1], self.latent_format) or 8
                    ref_w, ref_h, w, h = (s * px for s in (*ref.shape[-1:-3:-1], *like.shape[-1:-3:-1]))
                    raise UltraGenPatchError(
                        f"Structure Guidance: the reference is {ref_w}x{ref_h} px but the sampler runs at {w}x{h} px, "
                        "another shape; connect the latent the sampler starts from (e.g. Warm-Start Latent's output)"
                    )
                # Same shape, another size: its low band is the same picture, so it is resized (a stated rule).
                log.info(
                    "UltraGen Structure Guidance: reference %s resized to the sampled latent %s",
                    tuple(ref.shape[-2:]), tuple(like.shape[-2:]),
                )  # fmt: skip
                ref = comfy.utils.common_upscale(ref, like.shape[-1], like.shape[-2], "bicubic", "disabled")
            if like.shape[0] % ref.shape[0]:  # a CFG call holds whole copies of the latent batch
                raise UltraGenPatchError(
                    f"Structure Guidance: the reference holds {ref.shape[0]} latents, which does not divide the "
                    f"sampler's batch of {like.shape[0]}; connect one reference, or one per latent"
                )
            ref = comfy.utils.repeat_to_batch_size(ref, like.shape[0])
            self._low_ref = {key: low_pass(ref, self.factor).to(like.dtype)}
        return self._low_ref[key]

    def __call__(self, args: dict) -> torch.Tensor:
        x0 = args["denoised"]
        g = gamma(args["sigma"].to(x0.device, torch.float32), self.strength, self.schedule)
        if not bool((g != 0).any()):
            return x0
        g = g.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
        return x0 + g * (self._reference_low_band(x0) - low_pass(x0, self.factor))


def apply_structure_guidance(model, reference: torch.Tensor, strength: float = 1.0, schedule: str = "sigma"):
    """A clone of ``model`` whose every step's x0 prediction is guided towards ``reference``'s low band."""
    m = model.clone()
    latent_format = model.get_model_object("latent_format")
    m.set_model_sampler_post_cfg_function(StructureGuidance(reference, latent_format, strength, schedule))
    return m
