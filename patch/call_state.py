"""What one model call of the patched FLUX knows, and how the hooks of that call find it.

Why: the hooks of one call (DIFFUSION_MODEL wrapper, post_input patch, rotary-table embedder,
attention override, guidance LoRA) share a record of it. The attention override receives it
in ``transformer_options``; the others get no such argument in every supported ComfyUI, so
the wrapper also makes it the *active call* for the duration of the call (a context variable:
per thread, gone when the call ends, never on an object other clones or runs share).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch

from ..core import Layout
from ..core.token_order import WindowOrder


@dataclass
class CallState:
    """What one model call looks like, shared by the hooks of that call."""

    grid: tuple[int, int]
    order: WindowOrder
    image_ids: torch.Tensor  # (n_img, axes) float32, window-first order
    n_ref: int
    diffusion_model: torch.nn.Module  # the FLUX model being called (its img_in embeds the guidance tokens too)
    warn_once: Callable[[str, str], None]  # the run's one-time warnings (key, message)
    guidance_grid: tuple[int, int] | None = None
    guidance_tokens: torch.Tensor | None = None  # (B, n_guid, C * p * p), sequence order, not yet embedded
    guidance_ids: torch.Tensor | None = None  # (n_guid, axes) float32, sequence order
    npa_offset: tuple[int, int] = (0, 0)
    rotary_table: torch.Tensor | None = None  # (B, 1, L, D / 2, 2, 2): RoPE for this call's sequence
    qkv_buffer: torch.Tensor | None = None  # (B, L, 3, H, D): the chunked blocks' q, k, v, reused by every block
    slice_tokens: int | None = None  # the chunked blocks' slice size, chosen by the call's first block
    layout: Layout | None = None  # the attention layout, built by the first block's attention
    guidance_rows_override: int | None = None  # set by a chunked block around a layer's per-slice forward
    embedding_guidance: bool = False  # True while img_in embeds the guidance tokens (a training LoRA reads it)
    vec_zero: torch.Tensor | None = None  # (B, D): FLUX's modulation input at timestep 0 ("clean" guidance tokens)
    zero_modulations: dict | None = None  # FLUX.2's global modulations of vec_zero, computed once per call

    def release_block_buffers(self) -> None:
        """Free q, k, v (3U) and the RoPE table once the last block is done: FLUX's final layer (its norm and
        modulation: 2U of the image) would otherwise run beside them, the step's peak."""
        self.qkv_buffer = None
        self.rotary_table = None

    @property
    def n_img(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def n_guid(self) -> int:
        return 0 if self.guidance_grid is None else self.guidance_grid[0] * self.guidance_grid[1]


_active: ContextVar[CallState | None] = ContextVar("ultragen_active_call", default=None)


def active_call() -> CallState | None:
    """The patched call running now in this thread, or None outside one."""
    return _active.get()


@contextlib.contextmanager
def calling(call: CallState) -> Iterator[CallState]:
    """Make ``call`` the active call until the block ends (also when it raises)."""
    token = _active.set(call)
    try:
        yield call
    finally:
        _active.reset(token)


def embedding_guidance() -> bool:
    """True while the active call's ``img_in`` embeds guidance tokens (training's img_in LoRA reads it)."""
    call = _active.get()
    return call is not None and call.embedding_guidance


class HandOver(dict):
    """A dict whose values leave it when read.

    ComfyUI's ``forward_orig`` keeps the dict a post_input patch returns in a local
    variable for the whole forward; a plain dict would pin the initial hidden states
    (1.6 GiB at 8192^2) through all 57 blocks. forward_orig reads each key once.
    """

    def __getitem__(self, key):
        return self.pop(key)
