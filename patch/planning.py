"""What a patched FLUX call looks like at a given size: token order, positions, guidance tokens, layout.

Why apart from the hooks: all of it follows from the options, the guidance, the image size
and the sampling seed, nothing else. Kept as plain functions of those, it is tested alone,
and a sampling run (``run_state.PatchRun``) builds it once per size and reuses it for every
step. The checks made before any of it (is this a FLUX model the patch knows, guidance encoded for it;
does the guidance fit the size, is the sampler wired so that the plan holds) live here too.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import comfy.ldm.flux.model
import torch

from ..core import GuidanceSegment, ImageSegment, Layout, ReferenceSegment, TextSegment
from ..core.guidance import aspect_mismatch, guidance_ids
from ..core.token_order import WindowOrder, window_first_order
from .flux_family import other_family, pixels_per_latent
from .options import Guidance, PatchOptions, UltraGenPatchError
from .rotary_table import RotaryTable

NODE = "UltraGen Attention Patch"


@dataclass(frozen=True)
class SizePlan:
    """What every call at one image size shares.

    Guidance tokens are kept clean and as noise separately (float32, sequence order):
    patchifying is a rearrangement, so noising the tokens equals patchifying the noised latent.
    """

    order: WindowOrder
    image_ids: torch.Tensor  # (n_img, axes) float32, window-first order
    guidance_grid: tuple[int, int] | None = None
    guidance_clean: torch.Tensor | None = None  # (Bg, n_guid, C * p * p)
    guidance_noise: torch.Tensor | None = None
    guidance_ids: torch.Tensor | None = None  # (n_guid, axes) float32


def rope_positions(ids: torch.Tensor, rope_options: dict | None) -> torch.Tensor:
    """``ids`` (N, axes) = (index, row, col[, 0]) placed as ComfyUI's ``ScaleROPE`` places image positions.

    ComfyUI (0.29) maps row r to ``r * scale_y + shift_y``, column c to ``c * scale_x + shift_x``
    and adds ``shift_t`` to the index; without ``rope_options`` the ids are returned unchanged.
    """
    if not rope_options:
        return ids
    ids = ids.clone()
    ids[:, 0] += rope_options.get("shift_t", 0.0)
    ids[:, 1] = ids[:, 1] * rope_options.get("scale_y", 1.0) + rope_options.get("shift_y", 0.0)
    ids[:, 2] = ids[:, 2] * rope_options.get("scale_x", 1.0) + rope_options.get("shift_x", 0.0)
    return ids


def check_guidance_fits(guidance: Guidance, latent_hw: tuple[int, int], patch: int) -> str | None:
    """Raise if ``guidance`` cannot guide a latent of ``latent_hw``; return a warning when it only
    was encoded for another size of the same aspect (positions are then scaled to this size)."""
    gh, gw = guidance.grid(patch)
    px = guidance.pixels_per_latent  # the model's too: the patch checked the channels
    height, width = latent_hw[0] * px, latent_hw[1] * px
    guidance_h, guidance_w = (s * px for s in guidance.latent.shape[-2:])
    if gh > -(-latent_hw[0] // patch) or gw > -(-latent_hw[1] // patch):
        raise UltraGenPatchError(
            f"{NODE}: the guidance ({guidance_w}x{guidance_h} px) is larger "
            f"than the image being sampled ({width}x{height} px); guidance must be the low-res image: encode a "
            "smaller one in Low-Res Guidance Encode, or sample at a larger size"
        )
    if aspect_mismatch(guidance.latent.shape[-1], guidance.latent.shape[-2], latent_hw[1], latent_hw[0]):
        raise UltraGenPatchError(
            f"{NODE}: the guidance ({guidance_w}x{guidance_h} px) has another "
            f"shape than the image being sampled ({width}x{height} px) and would be stretched over it; make the "
            "low-res image and the sampled latent the same aspect ratio"
        )
    off = max(abs(guidance.target_height - height), abs(guidance.target_width - width))
    if off > px:
        return (
            f"UltraGen: the guidance was encoded for {guidance.target_width}x{guidance.target_height} px but the "
            f"sampler runs at {width}x{height} px; guidance positions are scaled to the sampled size."
        )
    return None


def check_model(model, guidance: Guidance | None):
    """The FLUX diffusion model of ``model`` (a ModelPatcher), after the checks the node makes before it patches:
    a FLUX.1 or FLUX.2 model, not patched already, and guidance encoded for it."""
    dm = model.get_model_object("diffusion_model")
    if not isinstance(dm, comfy.ldm.flux.model.Flux):
        raise UltraGenPatchError(
            f"{NODE} needs a FLUX model, but this MODEL is {type(dm).__name__}; "
            "load FLUX.1 (dev, schnell, Krea, Kontext) with Load Diffusion Model or Load Checkpoint"
        )
    family = other_family(dm)
    if family is not None:
        raise UltraGenPatchError(
            f"{NODE} works with FLUX.1 (dev, schnell, Krea, Kontext) and FLUX.2 (klein, dev) models; this MODEL "
            f"is {family}, which UltraGen does not support yet. Load a FLUX.1 or FLUX.2 model."
        )
    if isinstance(model.get_model_object("diffusion_model.pe_embedder"), RotaryTable):
        raise UltraGenPatchError(
            f"this MODEL is already patched by {NODE}; connect the model from before that "
            "node (Recursive Upscale applies the patch itself)"
        )
    if guidance is not None:
        channels = dm.img_in.weight.shape[1] // (dm.patch_size * dm.patch_size)
        if guidance.latent.shape[1] != channels:
            raise UltraGenPatchError(
                f"{NODE}: the guidance latent has {guidance.latent.shape[1]} channels but this model takes "
                f"{channels}; encode the guidance with this model's VAE in Low-Res Guidance Encode"
            )
        model_px = pixels_per_latent(channels, model.get_model_object("latent_format"))
        if model_px is not None and guidance.pixels_per_latent != model_px:
            raise UltraGenPatchError(
                f"{NODE}: the guidance was encoded at {guidance.pixels_per_latent} px a latent cell, this "
                f"model works at {model_px}; encode the guidance with this model's VAE in Low-Res Guidance Encode"
            )
    return dm


def check_sampling(model, latent_shape, shift_mu: float | None, guidance: Guidance | None) -> None:
    """Wiring mistakes a sampler would otherwise run with in silence (``shift_mu``: the patch's constant shift, or
    None when it keeps none)."""
    shift = getattr(model.get_model_object("model_sampling"), "shift", None)
    if shift_mu is not None and shift is not None and abs(float(shift) - shift_mu) > 1e-6:
        raise UltraGenPatchError(
            f"{NODE} keeps FLUX's shift at {shift_mu} for every size, but a node after it (e.g. "
            f"ModelSamplingFlux) set {float(shift):.3g}, which at high resolution runs every step near full "
            f"noise. Remove that node or place it before {NODE}, or turn {NODE}'s constant_shift off to use it."
        )
    if guidance is None:
        return
    attn1 = model.model_options["transformer_options"].get("patches", {}).get("attn1_patch", [])
    if any(type(p).__name__ == "KV_Attn_Input" for p in attn1):
        raise UltraGenPatchError(
            f"{NODE}: Flux KV Cache drops the reference images' tokens after the first step, which moves "
            "UltraGen's guidance tokens off their positions; remove the Flux KV Cache node (or the guidance)"
        )
    if guidance.latent.shape[0] not in (1, latent_shape[0]):
        raise UltraGenPatchError(
            f"{NODE}: the guidance holds {guidance.latent.shape[0]} images but the sampler's latent batch has "
            f"{latent_shape[0]}; encode one guidance image (shared by the batch) or one per latent in "
            "Low-Res Guidance Encode"
        )


def plan_size(dm, options: PatchOptions, guidance: Guidance | None, latent: torch.Tensor | None,
              size: tuple[int, int], device: torch.device, noise_seed: int,
              rope_options: dict | None) -> SizePlan:  # fmt: skip
    """The plan of calls over a (rows, cols) token grid.

    ``latent``: the guidance latent in model space (float32), or None without guidance; its
    noise is drawn from ``noise_seed`` (the sampling seed).
    """
    order = window_first_order(size[0], size[1], options.window_size, options.token_order, device)
    axes = len(dm.params.axes_dim)  # FLUX.1: 3; FLUX.2: 4, the last for text positions only
    ids = torch.zeros(order.perm.numel(), axes, dtype=torch.float32, device=device)
    ids[:, 1], ids[:, 2] = order.y, order.x
    plan = SizePlan(order=order, image_ids=rope_positions(ids, rope_options))
    if guidance is None:
        return plan
    gh, gw = guidance.grid(dm.patch_size)
    latent = latent.to(device, torch.float32)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(noise_seed)).to(device)
    layout = Layout((ImageSegment(size[0], size[1], options.window_size, options.token_order), GuidanceSegment(gh, gw)))
    perm = layout.guidance_order(device)
    return SizePlan(
        order=order,
        image_ids=plan.image_ids,
        guidance_grid=(gh, gw),
        guidance_clean=dm.process_img(latent)[0].index_select(1, perm),
        guidance_noise=dm.process_img(noise)[0].index_select(1, perm),
        guidance_ids=rope_positions(guidance_ids((gh, gw), size, device, axes), rope_options).index_select(0, perm),
    )


def npa_offset(options: PatchOptions, seed: int, sigma: float) -> tuple[int, int]:
    """Where NPA's patch grid is shifted in the call at ``sigma`` of a run with ``seed``.

    A function of the seed and the step's noise level only, so the same seed gives the same
    image however ComfyUI splits a step into calls (CFG batches, memory).
    """
    if options.mode != "npa" or not options.npa_jitter:
        return (0, 0)
    rng = random.Random(f"{seed}/{sigma!r}")  # str seeds hash with SHA-512: the same in every process
    steps = options.npa_offsets()
    return (rng.choice(steps), rng.choice(steps))


def call_layout(options: PatchOptions, grid: tuple[int, int], text_len: int, n_ref: int,
                guidance_grid: tuple[int, int] | None, offset: tuple[int, int]) -> Layout:  # fmt: skip
    """The attention layout of a call: [text | image (window-first) | references | guidance]."""
    segments = [TextSegment(text_len), ImageSegment(grid[0], grid[1], options.window_size, options.token_order)]
    if n_ref:
        segments.append(ReferenceSegment(n_ref))
    if guidance_grid is not None:
        segments.append(GuidanceSegment(*guidance_grid))
    return Layout(tuple(segments), options.rules(offset))
