"""What the patch is configured with: its options and the guidance payload.

Why separate: the nodes build these from their inputs, the patch consumes them, and a
reader looking for "what can be set, and what does it default to" finds it here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..core import AttentionRules
from ..core.flow_matching import FLUX_MU_1024
from ..errors import UltraGenError
from ..kernels import BACKENDS
from .flux_family import not_a_flux_latent, pixels_per_latent


class UltraGenPatchError(UltraGenError, ValueError):
    """A model or input the patch cannot work with; the message says what to change."""


@dataclass
class Guidance:
    """The ULTRAGEN_GUIDANCE payload: a low-res latent (VAE latent space, as VAEEncode
    gives it) and the size it is meant to guide."""

    latent: torch.Tensor  # (B, C, h, w)
    target_width: int
    target_height: int
    latent_pixels: int | None = None  # pixels per latent cell, as the VAE that made it says (None: FLUX's by channels)

    def grid(self, patch: int = 2) -> tuple[int, int]:
        return -(-self.latent.shape[-2] // patch), -(-self.latent.shape[-1] // patch)

    @property
    def pixels_per_latent(self) -> int:
        """Pixels per latent cell: FLUX.1's latent (16 channels) 8, FLUX.2's (128) 16."""
        px = self.latent_pixels or pixels_per_latent(self.latent.shape[1])
        if px is None:
            raise UltraGenPatchError(f"UltraGen guidance: {not_a_flux_latent(self.latent.shape[1])}")
        return px

    def ratio(self) -> float:
        """Target width over guidance width, in pixels (the papers use 4)."""
        return self.target_width / (self.latent.shape[-1] * self.pixels_per_latent)


@dataclass(frozen=True)
class PatchOptions:
    """Everything the "UltraGen Attention Patch" node exposes; defaults follow the papers."""

    mode: Literal["ultragen", "npa"] = "ultragen"
    window: int = 16
    neighbour_radius: int = 1
    token_order: Literal["window-first", "hilbert"] = "window-first"
    guidance_scope: Literal["global", "local"] = "local"
    guidance_radius: int = 1
    guidance_tokens: Literal["noised", "clean"] = "noised"
    text_sees: Literal["context", "all"] = "context"
    ntk_factor: float = 10.0
    constant_shift: bool = True
    shift_mu: float = FLUX_MU_1024
    backend: str = "auto"
    npa_patch: int = 32
    npa_window: int = 64
    npa_jitter: bool = True

    def check(self) -> None:
        if self.backend not in BACKENDS:
            raise UltraGenPatchError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.window < 1:
            raise UltraGenPatchError(f"window must be at least 1 token, got {self.window}")
        if self.ntk_factor <= 0:
            raise UltraGenPatchError(f"NTK factor must be positive (1 = off), got {self.ntk_factor}")
        self.rules().check()

    @property
    def window_size(self) -> tuple[int, int]:
        """(rows, columns) of a window, in tokens."""
        return (self.window, self.window)

    def npa_offsets(self) -> tuple[int, ...]:
        """The shifts NPA's patch grid may take along each axis: a few, so tile schedules stay cached."""
        return tuple(range(0, self.npa_patch, max(1, min(8, self.npa_patch))))

    def rules(self, offset: tuple[int, int] = (0, 0)) -> AttentionRules:
        common = dict(
            text_sees=self.text_sees,
            guidance_scope=self.guidance_scope,
            guidance_radius=self.guidance_radius,
        )
        if self.mode == "npa":
            return AttentionRules.npa(self.npa_patch, self.npa_window, offset, **common)
        return AttentionRules(neighbour_radius=self.neighbour_radius, **common)
