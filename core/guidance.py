"""Low-res guidance tokens: their positions on the high-res grid, and their noise level.

Why: UltraGen's guidance latent is a small copy of the image whose RoPE positions are
scaled onto the high-res token grid, so each guidance token sits where its content lies
in the full image ("scaled positional anchors"). Positions are centre-aligned: the
centre of guidance token g covers the centre of the image region it summarises.
Kept in float32: bf16 cannot hold positions above 256 exactly.
"""

from __future__ import annotations

import torch


def scaled_positions(guidance_size: int, image_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Position, in image tokens, of each guidance token along one axis (float32).

    (g + 1/2) * image_size / guidance_size - 1/2: guidance token 0 of a 4x smaller grid
    sits at 1.5, between image tokens 1 and 2, the centre of the four it covers.
    """
    g = torch.arange(guidance_size, dtype=torch.float64, device=device)
    return ((g + 0.5) * (image_size / guidance_size) - 0.5).to(torch.float32)


def guidance_ids(
    guidance_hw: tuple[int, int], image_hw: tuple[int, int], device: torch.device | str = "cpu", axes: int = 3
) -> torch.Tensor:
    """FLUX position ids of a guidance grid in raster order: (gh * gw, axes) float32.

    (index 0, row, col) as FLUX.1 places image tokens; FLUX.2's fourth axis (text positions) is 0 for images.
    """
    gh, gw = guidance_hw
    rows = scaled_positions(gh, image_hw[0], device)
    cols = scaled_positions(gw, image_hw[1], device)
    ids = torch.zeros(gh, gw, axes, dtype=torch.float32, device=device)
    ids[..., 1] = rows[:, None]
    ids[..., 2] = cols[None, :]
    return ids.view(gh * gw, axes)


def aspect_mismatch(small_w: int, small_h: int, large_w: int, large_h: int) -> bool:
    """True when a (small_w, small_h) grid scaled onto (large_w, large_h) would be stretched.

    Rounding to whole pixels is allowed: scaled by the ratio of one side, the other side may
    miss by up to one small-grid pixel's worth (e.g. 125x70 onto 500x281 fits; 64x64 onto
    512x256 does not).
    """
    by_width = abs(small_h * large_w / small_w - large_h) > large_w / small_w
    by_height = abs(small_w * large_h / small_h - large_w) > large_h / small_h
    return by_width and by_height


def noised(clean: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Flow-matching noising at ``sigma`` (one per batch item): sigma * noise + (1 - sigma) * clean."""
    s = sigma.to(clean.dtype).view(-1, *([1] * (clean.dim() - 1)))
    return s * noise + (1 - s) * clean
