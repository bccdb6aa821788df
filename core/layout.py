"""Attention layouts: which token of a FLUX sequence may attend to which.

Why: every sparse-attention scheme of the papers (UltraGen/Scale-DiT windows with
low-res guidance, ScaleDiff's Neighborhood Patch Attention) is a rule over a few
per-token attributes: the segment a token belongs to (text, image, guidance,
reference) and its 2D window or position. A :class:`Layout` describes one sequence as
segments plus :class:`AttentionRules`; from it come

- a token table (per-token attributes, O(L) memory, built on the target device);
- the exact rule as a vectorised predicate (also flex_attention's ``mask_mod``);
- cached block schedules for any (BLOCK_M, BLOCK_N): the conservative classifier of
  ``tile_classifier.py`` sorts the tiles, :mod:`kernels.schedule` resolves and packs them.

Rules (each an option of :class:`AttentionRules`); "context" means text, guidance and
reference tokens:

- text and reference -> context, or everything (``text_sees="all"``);
- image -> text + references + guidance (all of it, or only guidance tokens whose scaled
  position falls in a window within ``guidance_radius`` windows) + image tokens: either
  the windows within ``neighbour_radius`` (Chebyshev, in windows) or, in NPA mode, the
  ``npa_window`` square centred on the token's ``npa_patch`` query patch, clamped at the
  border, the patch grid shifted by ``npa_offset``;
- guidance -> text + references + guidance (all, or those whose windows lie within
  ``guidance_self_radius`` windows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.schedule import BlockSchedule, build_block_schedule
from .rules import (
    GUIDANCE,
    IMAGE,
    KIND_NAMES,
    REFERENCE,
    SEGMENT_KIND,
    TEXT,
    AttentionRules,
    GuidanceSegment,
    ImageSegment,
    LayoutError,
    Segment,
)
from .tensor_cache import tensor_cache
from .tile_classifier import tile_classifier
from .token_order import TOKEN_ORDERS, window_first_order, window_rank


@dataclass(frozen=True, eq=False)
class TokenTable:
    """Per-token attributes (int32, length L, sequence order).

    kind: TEXT/IMAGE/GUIDANCE/REFERENCE. wy, wx: image window of an image token, or the
    window holding a guidance token's scaled centre. y, x: image token position.
    ky0, ky1, kx0, kx1: an image query's NPA key box (half-open), else 0.
    """

    kind: torch.Tensor
    wy: torch.Tensor
    wx: torch.Tensor
    y: torch.Tensor
    x: torch.Tensor
    ky0: torch.Tensor
    ky1: torch.Tensor
    kx0: torch.Tensor
    kx1: torch.Tensor


@dataclass(frozen=True)
class Layout:
    """One attention sequence: segments in sequence order, and the rules between them."""

    segments: tuple[Segment, ...]
    rules: AttentionRules = AttentionRules()

    def __post_init__(self) -> None:
        kinds = [SEGMENT_KIND.get(type(s)) for s in self.segments]
        if None in kinds:
            raise LayoutError(f"unknown segment {self.segments[kinds.index(None)]!r}")
        for kind in KIND_NAMES:
            if kinds.count(kind) > 1:
                raise LayoutError(f"a layout holds at most one {KIND_NAMES[kind]} segment")
        if kinds.count(IMAGE) != 1:
            raise LayoutError("a layout needs exactly one image segment")
        for seg in self.segments:
            size = (seg.height, seg.width) if hasattr(seg, "height") else (seg.length,)
            if min(size) < 1:
                raise LayoutError(f"{type(seg).__name__} must have at least one token, got {seg}")
        img = self.image
        if img.token_order not in TOKEN_ORDERS:
            raise LayoutError(f"token_order must be one of {TOKEN_ORDERS}, got {img.token_order!r}")
        if min(img.window) < 1:
            raise LayoutError(f"window must be at least 1x1 tokens, got {img.window}")
        g = self.guidance
        if g is not None and (g.height > img.height or g.width > img.width):
            raise LayoutError(
                f"guidance grid {g.height}x{g.width} tokens is larger than the image grid "
                f"{img.height}x{img.width}; guidance must be the low-res image"
            )
        self.rules.check()

    # -- structure ---------------------------------------------------------------------
    @property
    def seq_len(self) -> int:
        return sum(_segment_len(s) for s in self.segments)

    @property
    def image(self) -> ImageSegment:
        return next(s for s in self.segments if isinstance(s, ImageSegment))

    @property
    def guidance(self) -> GuidanceSegment | None:
        return next((s for s in self.segments if isinstance(s, GuidanceSegment)), None)

    def guidance_order(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Raster index (in the guidance grid) of each guidance token in sequence order."""
        g = self.guidance
        if g is None:
            raise LayoutError("this layout has no guidance segment")
        return _guidance_order(self.image, g, torch.device(device))[0]

    def tokens(self, device: torch.device | str = "cpu") -> TokenTable:
        return _token_table(self, torch.device(device))

    # -- the rule ----------------------------------------------------------------------
    def predicate(self, device: torch.device | str = "cpu"):
        """The exact rule: ``allowed(q_idx, kv_idx) -> bool`` over broadcastable indices."""
        return _predicate(self, torch.device(device))

    def block_schedule(self, block_m: int, block_n: int, device: torch.device | str = "cpu") -> BlockSchedule:
        """The (block_m x block_n) tile schedule of this layout; cached."""
        return _schedule(self, int(block_m), int(block_n), torch.device(device))


def _segment_len(seg: Segment) -> int:
    return seg.height * seg.width if isinstance(seg, (ImageSegment, GuidanceSegment)) else seg.length


@tensor_cache(maxsize=32)
def _guidance_order(img: ImageSegment, g: GuidanceSegment, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Guidance perm (sequence -> raster) and each token's home window (wy, wx)."""
    gy = torch.arange(g.height, device=device).repeat_interleave(g.width)
    gx = torch.arange(g.width, device=device).repeat(g.height)
    wh, ww = img.window
    # Window holding the scaled centre: floor((g + 1/2) * image/guidance / window), exactly.
    wy = ((2 * gy + 1) * img.height) // (2 * g.height * wh)
    wx = ((2 * gx + 1) * img.width) // (2 * g.width * ww)
    n_rows, n_cols = -(-img.height // wh), -(-img.width // ww)
    rank = window_rank(n_rows, n_cols, img.token_order, device)[wy * n_cols + wx]
    perm = torch.argsort(rank * (g.height * g.width) + gy * g.width + gx)
    return perm, wy[perm], wx[perm]


def _npa_boxes(y: torch.Tensor, size: int, patch: int, window: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Half-open key range [start, stop) along one axis for queries at positions y."""
    p = torch.div(y - offset, patch, rounding_mode="floor")
    p0 = (offset + p * patch).clamp(min=0)
    p1 = (offset + (p + 1) * patch).clamp(max=size)
    start = torch.div(p0 + p1 - window, 2, rounding_mode="floor").clamp(min=0, max=max(size - window, 0))
    return start, (start + window).clamp(max=size)


@tensor_cache(maxsize=32)
def _token_table(layout: Layout, device: torch.device) -> TokenTable:
    n = layout.seq_len
    cols = {name: torch.zeros(n, dtype=torch.int32, device=device) for name in TokenTable.__dataclass_fields__}
    start = 0
    for seg in layout.segments:
        stop = start + _segment_len(seg)
        part = slice(start, stop)
        cols["kind"][part] = SEGMENT_KIND[type(seg)]
        if isinstance(seg, ImageSegment):
            order = window_first_order(seg.height, seg.width, seg.window, seg.token_order, device)
            for name in ("y", "x", "wy", "wx"):
                cols[name][part] = getattr(order, name).to(torch.int32)
            if layout.rules.image_sees == "npa":
                r = layout.rules
                cols["ky0"][part], cols["ky1"][part] = _npa_boxes(
                    order.y, seg.height, r.npa_patch, r.npa_window, r.npa_offset[0]
                )
                cols["kx0"][part], cols["kx1"][part] = _npa_boxes(
                    order.x, seg.width, r.npa_patch, r.npa_window, r.npa_offset[1]
                )
        elif isinstance(seg, GuidanceSegment):
            _, wy, wx = _guidance_order(layout.image, seg, device)
            cols["wy"][part], cols["wx"][part] = wy.to(torch.int32), wx.to(torch.int32)
        start = stop
    return TokenTable(**cols)


def _near(a_y, a_x, b_y, b_x, radius: int):
    return ((a_y - b_y).abs() <= radius) & ((a_x - b_x).abs() <= radius)


@tensor_cache(maxsize=32)
def _predicate(layout: Layout, device: torch.device):
    t = _token_table(layout, device)
    r = layout.rules

    def allowed(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        kq, kk = t.kind[q], t.kind[k]
        is_image, is_guidance = kk == IMAGE, kk == GUIDANCE
        everyone_sees = (kk == TEXT) | (kk == REFERENCE)
        if r.image_sees == "windows":
            image_image = _near(t.wy[q], t.wx[q], t.wy[k], t.wx[k], r.neighbour_radius)
        else:
            yk, xk = t.y[k], t.x[k]
            image_image = (yk >= t.ky0[q]) & (yk < t.ky1[q]) & (xk >= t.kx0[q]) & (xk < t.kx1[q])
        image_guidance = True
        if r.guidance_scope == "local":
            image_guidance = _near(t.wy[q], t.wx[q], t.wy[k], t.wx[k], r.guidance_radius)
        guidance_guidance = True
        if r.guidance_self_scope == "local":
            guidance_guidance = _near(t.wy[q], t.wx[q], t.wy[k], t.wx[k], r.guidance_self_radius)
        context = everyone_sees | is_guidance
        image_row = everyone_sees | (is_image & image_image) | (is_guidance & image_guidance)
        guidance_row = everyone_sees | (is_guidance & guidance_guidance)
        context_row = context | is_image if r.text_sees == "all" else context  # text and reference queries
        return torch.where(kq == IMAGE, image_row, torch.where(kq == GUIDANCE, guidance_row, context_row))

    return allowed


@tensor_cache(maxsize=64)  # a run's NPA offsets (16) x CFG text lengths x backends' tiles
def _schedule(layout: Layout, block_m: int, block_n: int, device: torch.device) -> BlockSchedule:
    n = layout.seq_len
    classify = tile_classifier(_token_table(layout, device), layout.rules, block_m, block_n)
    return build_block_schedule(n, n, block_m, block_n, classify, _predicate(layout, device), device)
