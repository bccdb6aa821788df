"""Low- and high-frequency bands of latents, and sharpening.

Why: ScaleDiff's Latent Frequency Mixing takes the low band of the latent-upsampled image
and the high band of the RGB-upsampled one; its Structure Guidance pulls the low band of
each step's prediction towards a reference. Both need the same split z = LP(z) + HP(z).

LP follows ScaleDiff (antialiased bilinear downsample by ``factor``, bilinear upsample
back) with one change: between the two, the small correction (D U)^-1, which makes
LP = U (D U)^-1 D an exact projection (LP(LP(z)) = LP(z)). The "low band" is then well
defined, and setting it (Structure Guidance with gamma = 1) sets it exactly. The operator is
separable: one (size x size) matrix per axis, built once per size and cached.

Shapes: latents (B, C, H, W); any float dtype (computed in float32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .tensor_cache import tensor_cache


def _interpolation_matrix(size: int, out: int, antialias: bool, device: torch.device) -> torch.Tensor:
    """(out, size) matrix of 1-D bilinear resizing, read off F.interpolate on unit images.

    The images are 4 wide: with a width of 1, PyTorch's antialiased kernel returns wrong
    values (seen with torch 2.13: every output row the same).
    """
    eye = torch.eye(size, device=device).view(size, 1, size, 1).expand(size, 1, size, 4).contiguous()
    resized = F.interpolate(eye, size=(out, 4), mode="bilinear", antialias=antialias, align_corners=False)
    return resized[..., 0].reshape(size, out).t().double()


@tensor_cache(maxsize=32)
def _axis_low_pass(size: int, factor: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, D) with LP along one axis = R @ D: D (m, size) downsamples, R = U (D U)^-1 (size, m)."""
    small = max(1, size // factor)
    d = _interpolation_matrix(size, small, antialias=True, device=device)  # (small, size)
    u = _interpolation_matrix(small, size, antialias=False, device=device)  # (size, small)
    r = u @ torch.linalg.inv(d @ u)
    return r.float(), d.float()


def low_pass(z: torch.Tensor, factor: int = 4) -> torch.Tensor:
    """The low band of ``z`` (B, C, H, W): a projection, LP(LP(z)) = LP(z)."""
    if z.dim() != 4:
        raise ValueError(f"low_pass takes (B, C, H, W) latents, got shape {tuple(z.shape)}")
    if factor < 1:
        raise ValueError(f"low-pass factor must be at least 1, got {factor}")
    rh, dh = _axis_low_pass(z.shape[-2], factor, z.device)
    rw, dw = _axis_low_pass(z.shape[-1], factor, z.device)
    x = z.float()
    small = torch.einsum("ih,bchw,jw->bcij", dh, x, dw)
    return torch.einsum("hi,bcij,wj->bchw", rh, small, rw).to(z.dtype)


def high_pass(z: torch.Tensor, factor: int = 4) -> torch.Tensor:
    """The high band: z - LP(z)."""
    return z - low_pass(z, factor)


def mix_frequencies(low_from: torch.Tensor, high_from: torch.Tensor, factor: int = 4) -> torch.Tensor:
    """ScaleDiff's LFM: LP(low_from) + HP(high_from), e.g. latent-upsampled + RGB-upsampled."""
    if low_from.shape != high_from.shape:
        raise ValueError(
            f"frequency mixing needs two latents of one shape, got {tuple(low_from.shape)} and {tuple(high_from.shape)}"
        )
    return low_pass(low_from, factor) + high_pass(high_from, factor)


def sharpen(x: torch.Tensor, amount: float, sigma: float = 1.0) -> torch.Tensor:
    """Unsharp mask on (B, C, H, W): x + amount * (x - gaussian_blur(x, sigma)); amount 0 is a no-op."""
    if amount == 0:
        return x
    radius = max(1, int(3 * sigma + 0.5))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32, device=x.device)
    kernel = torch.exp(-(t**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).to(x.dtype)
    channels = x.shape[1]
    padded = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    blurred = F.conv2d(padded, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    blurred = F.conv2d(blurred, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
    return x + amount * (x - blurred)
