"""The rectified-flow training objective FLUX was trained with, for the guidance LoRA.

Why here: the trainer (ComfyUI side) only calls the model; what a training pair is and
what the loss is are plain math, shared and tested without ComfyUI.

FLUX's convention (ComfyUI's ``CONST`` sampling): ``x_t = sigma * noise + (1 - sigma) * x0``
and the network predicts the velocity ``v = noise - x0`` (so ``x0 = x_t - sigma * v``).
Training sigmas follow SD3/FLUX: a logit-normal draw pushed through FLUX's time shift
``exp(mu) / (exp(mu) + 1/t - 1)``; ``mu`` = 1.15 is FLUX's shift at 1024^2 (4096 tokens).
"""

from __future__ import annotations

import math

import torch

FLUX_MU_1024 = 1.15


def time_shift(t: torch.Tensor, mu: float) -> torch.Tensor:
    """FLUX's time shift (ComfyUI's ``flux_time_shift`` with exponent 1)."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def training_sigmas(batch: int, mu: float = FLUX_MU_1024, generator: torch.Generator | None = None) -> torch.Tensor:
    """(batch,) sigmas in (0, 1): ``time_shift(sigmoid(n), mu)`` with n ~ N(0, 1); mu 0 is no shift (sigmoid(n))."""
    t = torch.sigmoid(torch.randn(batch, generator=generator))
    return t if mu == 0 else time_shift(t, mu)


def noised_latent(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``sigma * noise + (1 - sigma) * x0`` with per-sample sigma (B,) over x0 (B, ...)."""
    s = sigma.to(x0.dtype).reshape(-1, *([1] * (x0.dim() - 1)))
    return s * noise + (1 - s) * x0


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def flow_matching_loss(velocity: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the predicted velocity and ``noise - x0`` (float32)."""
    return torch.nn.functional.mse_loss(velocity.float(), velocity_target(x0, noise).float())
