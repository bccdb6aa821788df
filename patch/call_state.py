"""What the FLUX patch keeps per image size and per model call.

Why a module: the hooks in ``flux_patch.py`` share these records; a reader looking for
"what does one call know" finds it here, apart from how the hooks use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.token_order import WindowOrder


@dataclass(frozen=True)
class SizeState:
    """What every call at one image size shares; built once per size and device.

    Guidance tokens are kept clean and as noise separately (float32, sequence order):
    patchifying is a rearrangement, so noising the tokens equals patchifying the noised latent.
    """

    order: WindowOrder
    image_ids: torch.Tensor  # (n_img, 3) float32, window-first order
    guidance_grid: tuple[int, int] | None = None
    guidance_clean: torch.Tensor | None = None  # (Bg, n_guid, C * p * p)
    guidance_noise: torch.Tensor | None = None
    guidance_ids: torch.Tensor | None = None  # (n_guid, 3) float32


@dataclass
class CallState:
    """What one model call looks like, shared by the hooks of that call."""

    grid: tuple[int, int]
    order: WindowOrder
    image_ids: torch.Tensor
    n_ref: int
    guidance_grid: tuple[int, int] | None
    guidance_tokens: torch.Tensor | None  # (B, n_guid, C * p * p), sequence order, not yet embedded
    guidance_ids: torch.Tensor | None  # (n_guid, 3) float32, sequence order
    npa_offset: tuple[int, int] = (0, 0)
    rotary_table: torch.Tensor | None = None  # (B, 1, L, D / 2, 2, 2): RoPE for this call's sequence

    @property
    def n_img(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def n_guid(self) -> int:
        return 0 if self.guidance_grid is None else self.guidance_grid[0] * self.guidance_grid[1]


class HandOver(dict):
    """A dict whose values leave it when read.

    ComfyUI's ``forward_orig`` keeps the dict a post_input patch returns in a local
    variable for the whole forward; a plain dict would pin the initial hidden states
    (1.6 GiB at 8192^2) through all 57 blocks. forward_orig reads each key once.
    """

    def __getitem__(self, key):
        return self.pop(key)
