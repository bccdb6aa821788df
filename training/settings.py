"""What a guidance LoRA training run is configured with, and the error for a setup that cannot run.

Why a module of its own: ``ultragen-train`` builds its option parser (defaults, ``-h``) from
these settings before it knows where ComfyUI is; ComfyUI must then be imported with its own
arguments (``--cpu``) before anything else imports ``comfy``. So this module imports no
ComfyUI; ``trainer`` (which does) re-exports both names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..core.flow_matching import FLUX_MU_1024
from ..errors import UltraGenError


class TrainingError(UltraGenError, ValueError):
    """A training setup that cannot run; the message says what to change."""


@dataclass
class TrainSettings:
    """What a training run is configured with; defaults follow the UltraGen paper where it says."""

    steps: int = 2000
    batch_size: int = 1
    grad_accum: int = 4  # the paper: batch 1 per GPU, 4 accumulation steps
    learning_rate: float = 1e-4  # AdamW; the paper used Prodigy (lr 1), not a dependency here
    weight_decay: float = 0.01
    rank: int = 16
    alpha: float = 16
    targets: Literal["qkv", "all"] = "qkv"
    size: int = 1024  # high-res training size in px; guidance at size / ratio
    ratio: int = 4
    window: int = 16
    ntk_factor: float = 10.0
    flux_guidance: float = 3.5  # FLUX.1-dev's distilled guidance input
    mu: float | None = None  # time shift of the training sigmas; None: the family's (sigma_shift)
    gradient_checkpointing: bool = True
    backend: str = "auto"
    save_every: int = 250
    sample_every: int = 250
    sample_steps: int = 20
    seed: int = 0

    def sigma_shift(self, flux2: bool) -> float:
        """``mu`` of the training sigmas ``time_shift(sigmoid(n), mu)``, n ~ N(0, 1): as set, else FLUX.1's 1.15 (how
        SD3 / FLUX train at 1024^2) or, for FLUX.2, 0 — t = sigmoid(n), no shift, as the authors train their FLUX.2
        guidance LoRAs (PeterYYZhang/Scale-DiT ef68520, ``src/train/model2.py``:418)."""
        if self.mu is not None:
            return self.mu
        return 0.0 if flux2 else FLUX_MU_1024

    def check(self) -> None:
        if self.size % (16 * self.ratio):
            raise TrainingError(f"size ({self.size}) must be a multiple of 16 x ratio ({16 * self.ratio})")
        for name in ("steps", "batch_size", "grad_accum", "rank"):
            if getattr(self, name) < 1:
                raise TrainingError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.backend == "triton":
            raise TrainingError("the Triton kernel is forward-only: train with backend auto, flex or portable")
