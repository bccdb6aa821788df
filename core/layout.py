"""Attention layouts: which token of a FLUX sequence may attend to which.

Why: every sparse-attention scheme of the papers (UltraGen/Scale-DiT windows with
low-res guidance, ScaleDiff's Neighborhood Patch Attention) is a rule over a few
per-token attributes: the segment a token belongs to (text, image, guidance,
reference) and its 2D window or position. A :class:`Layout` describes one sequence as
segments plus :class:`AttentionRules`; from it come

- a token table (per-token attributes, O(L) memory, built on the target device);
- the exact rule as a vectorised predicate (also flex_attention's ``mask_mod``);
- a conservative tile classifier from per-block attribute ranges;
- cached block schedules for any (BLOCK_M, BLOCK_N), via :mod:`kernels.schedule`.

Rules (each an option of :class:`AttentionRules`); "context" means text, guidance and
reference tokens:

- text -> context, or everything (``text_sees="all"``);
- image -> text + references + guidance (all of it, or only guidance tokens whose scaled
  position falls in a window within ``guidance_radius`` windows) + image tokens: either
  the windows within ``neighbour_radius`` (Chebyshev, in windows) or, in NPA mode, the
  ``npa_window`` square centred on the token's ``npa_patch`` query patch, clamped at the
  border, the patch grid shifted by ``npa_offset``;
- guidance -> text + references + guidance (all, or those whose windows lie within
  ``guidance_self_radius`` windows);
- reference -> context.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch

from ..kernels.schedule import BlockSchedule, build_block_schedule
from .token_order import WINDOW_CURVES, window_first_order, window_rank

TEXT, IMAGE, GUIDANCE, REFERENCE = 0, 1, 2, 3
KIND_NAMES = {TEXT: "text", IMAGE: "image", GUIDANCE: "guidance", REFERENCE: "reference"}


class LayoutError(ValueError):
    """A layout or rule setting that cannot work; the message says what to change."""


@dataclass(frozen=True)
class TextSegment:
    """``length`` text tokens (their order does not matter to any rule)."""

    length: int


@dataclass(frozen=True)
class ImageSegment:
    """The high-res image: a (height, width) token grid in window-first order."""

    height: int
    width: int
    window: tuple[int, int] = (16, 16)
    order: Literal["raster", "hilbert"] = "raster"


@dataclass(frozen=True)
class GuidanceSegment:
    """Low-res guidance tokens: their own (height, width) grid, scaled onto the image.

    A guidance token belongs to the image window that contains its scaled centre;
    guidance tokens are ordered like those windows, so local rules see contiguous runs.
    """

    height: int
    width: int


@dataclass(frozen=True)
class ReferenceSegment:
    """Other reference tokens (e.g. Kontext reference latents), treated as context."""

    length: int


Segment = TextSegment | ImageSegment | GuidanceSegment | ReferenceSegment
_SEGMENT_KIND = {TextSegment: TEXT, ImageSegment: IMAGE, GuidanceSegment: GUIDANCE, ReferenceSegment: REFERENCE}


@dataclass(frozen=True)
class AttentionRules:
    """Who may attend to whom; see the module docstring. Defaults follow UltraGen."""

    text_sees: Literal["context", "all"] = "context"
    image_sees: Literal["windows", "npa"] = "windows"
    neighbour_radius: int = 1
    npa_patch: int = 32
    npa_window: int = 64
    npa_offset: tuple[int, int] = (0, 0)
    guidance_scope: Literal["global", "local"] = "global"
    guidance_radius: int = 1
    guidance_sees: Literal["global", "local"] = "global"
    guidance_self_radius: int = 2

    @classmethod
    def npa(cls, patch: int = 32, window: int = 64, offset: tuple[int, int] = (0, 0), **kw) -> AttentionRules:
        """ScaleDiff's Neighborhood Patch Attention; text sees everything by default."""
        kw.setdefault("text_sees", "all")
        return cls(image_sees="npa", npa_patch=patch, npa_window=window, npa_offset=offset, **kw)

    def check(self) -> None:
        choices = {
            "text_sees": ("context", "all"),
            "image_sees": ("windows", "npa"),
            "guidance_scope": ("global", "local"),
            "guidance_sees": ("global", "local"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise LayoutError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("neighbour_radius", "guidance_radius", "guidance_self_radius"):
            if getattr(self, name) < 0:
                raise LayoutError(f"{name} must be 0 or more windows, got {getattr(self, name)}")
        if self.npa_patch < 1 or self.npa_window < self.npa_patch:
            raise LayoutError(
                f"NPA needs patch >= 1 and key window >= patch, got patch {self.npa_patch}, window {self.npa_window}"
            )
        if not all(0 <= o < self.npa_patch for o in self.npa_offset):
            raise LayoutError(f"NPA offset must lie in [0, patch={self.npa_patch}), got {self.npa_offset}")


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
        kinds = [_SEGMENT_KIND.get(type(s)) for s in self.segments]
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
        if img.order not in WINDOW_CURVES:
            raise LayoutError(f"window order must be one of {WINDOW_CURVES}, got {img.order!r}")
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

    def segment_range(self, segment_type: type) -> tuple[int, int] | None:
        """(start, stop) of the segment of that type in the sequence, or None."""
        start = 0
        for seg in self.segments:
            if isinstance(seg, segment_type):
                return start, start + _segment_len(seg)
            start += _segment_len(seg)
        return None

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


@functools.lru_cache(maxsize=32)
def _guidance_order(img: ImageSegment, g: GuidanceSegment, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Guidance perm (sequence -> raster) and each token's home window (wy, wx)."""
    gy = torch.arange(g.height, device=device).repeat_interleave(g.width)
    gx = torch.arange(g.width, device=device).repeat(g.height)
    wh, ww = img.window
    # Window holding the scaled centre: floor((g + 1/2) * image/guidance / window), exactly.
    wy = ((2 * gy + 1) * img.height) // (2 * g.height * wh)
    wx = ((2 * gx + 1) * img.width) // (2 * g.width * ww)
    n_rows, n_cols = -(-img.height // wh), -(-img.width // ww)
    rank = window_rank(n_rows, n_cols, img.order, device)[wy * n_cols + wx]
    perm = torch.argsort(rank * (g.height * g.width) + gy * g.width + gx)
    return perm, wy[perm], wx[perm]


def _npa_boxes(y: torch.Tensor, size: int, patch: int, window: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Half-open key range [start, stop) along one axis for queries at positions y."""
    p = torch.div(y - offset, patch, rounding_mode="floor")
    p0 = (offset + p * patch).clamp(min=0)
    p1 = (offset + (p + 1) * patch).clamp(max=size)
    start = torch.div(p0 + p1 - window, 2, rounding_mode="floor").clamp(min=0, max=max(size - window, 0))
    return start, (start + window).clamp(max=size)


@functools.lru_cache(maxsize=32)
def _token_table(layout: Layout, device: torch.device) -> TokenTable:
    n = layout.seq_len
    cols = {name: torch.zeros(n, dtype=torch.int32, device=device) for name in TokenTable.__dataclass_fields__}
    start = 0
    for seg in layout.segments:
        stop = start + _segment_len(seg)
        part = slice(start, stop)
        cols["kind"][part] = _SEGMENT_KIND[type(seg)]
        if isinstance(seg, ImageSegment):
            order = window_first_order(seg.height, seg.width, seg.window, seg.order, device)
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


@functools.lru_cache(maxsize=32)
def _predicate(layout: Layout, device: torch.device):
    t = _token_table(layout, device)
    r = layout.rules

    def allowed(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        kq, kk = t.kind[q], t.kind[k]
        context = (kk == TEXT) | (kk == REFERENCE) | (kk == GUIDANCE)
        is_image_key = kk == IMAGE
        if r.image_sees == "windows":
            img_img = _near(t.wy[q], t.wx[q], t.wy[k], t.wx[k], r.neighbour_radius)
        else:
            yk, xk = t.y[k], t.x[k]
            img_img = (yk >= t.ky0[q]) & (yk < t.ky1[q]) & (xk >= t.kx0[q]) & (xk < t.kx1[q])
        image_row = (context & ~(kk == GUIDANCE)) | (is_image_key & img_img)
        if r.guidance_scope == "global":
            image_row = image_row | (kk == GUIDANCE)
        else:
            near = _near(t.wy[q], t.wx[q], t.wy[k], t.wx[k], r.guidance_radius)
            image_row = image_row | ((kk == GUIDANCE) & near)
        guidance_row = context
        if r.guidance_sees == "local":
            near = _near(t.wy[q], t.wx[q], t.wy[k], t.wx[k], r.guidance_self_radius)
            guidance_row = context & ((kk != GUIDANCE) | near)
        text_row = context | is_image_key if r.text_sees == "all" else context
        return torch.where(
            kq == IMAGE,
            image_row,
            torch.where(kq == GUIDANCE, guidance_row, torch.where(kq == TEXT, text_row, context)),
        )

    return allowed


# -- conservative tile classification from per-block attribute ranges -----------------

_ATTRS = ("wy", "wx", "y", "x", "ky0", "ky1", "kx0", "kx1")
_BIG = 1 << 30


def _block_ranges(t: TokenTable, block: int, n_blocks: int) -> dict:
    """Per kind present in the sequence: which blocks hold it, and min/max of each attribute."""
    block_id = torch.arange(t.kind.numel(), device=t.kind.device) // block
    out = {}
    for kind in torch.unique(t.kind).tolist():
        sel = t.kind == kind
        ids = block_id[sel]
        present = torch.zeros(n_blocks, dtype=torch.bool, device=ids.device)
        present[ids] = True
        stats = {"present": present}
        for name in _ATTRS:
            vals = getattr(t, name)[sel]
            lo = torch.full((n_blocks,), _BIG, dtype=torch.int32, device=ids.device)
            hi = torch.full((n_blocks,), -_BIG, dtype=torch.int32, device=ids.device)
            stats["min_" + name] = lo.scatter_reduce(0, ids, vals, "amin")
            stats["max_" + name] = hi.scatter_reduce(0, ids, vals, "amax")
        out[kind] = stats
    return out


def _near_ranges(q: dict, k: dict, radius: int):
    """(all pairs within radius, no pair within radius) for window ranges of two blocks."""
    far_y = torch.maximum(q["max_wy"][:, None] - k["min_wy"][None], k["max_wy"][None] - q["min_wy"][:, None])
    far_x = torch.maximum(q["max_wx"][:, None] - k["min_wx"][None], k["max_wx"][None] - q["min_wx"][:, None])
    gap_y = torch.maximum(k["min_wy"][None] - q["max_wy"][:, None], q["min_wy"][:, None] - k["max_wy"][None])
    gap_x = torch.maximum(k["min_wx"][None] - q["max_wx"][:, None], q["min_wx"][:, None] - k["max_wx"][None])
    return (far_y <= radius) & (far_x <= radius), (gap_y > radius) | (gap_x > radius)


def _box_ranges(q: dict, k: dict):
    """(every key inside every query's NPA box, no key inside any query's box)."""
    every = (
        (q["max_ky0"][:, None] <= k["min_y"][None])
        & (q["min_ky1"][:, None] > k["max_y"][None])
        & (q["max_kx0"][:, None] <= k["min_x"][None])
        & (q["min_kx1"][:, None] > k["max_x"][None])
    )
    never = (
        (q["min_ky0"][:, None] > k["max_y"][None])
        | (q["max_ky1"][:, None] <= k["min_y"][None])
        | (q["min_kx0"][:, None] > k["max_x"][None])
        | (q["max_kx1"][:, None] <= k["min_x"][None])
    )
    return every, never


def _pair_rule(rules: AttentionRules, kq: int, kk: int, q: dict, k: dict):
    """(all allowed, none allowed) for query tokens of kind kq against keys of kind kk."""
    if kk in (TEXT, REFERENCE):
        return True, False
    if kq == IMAGE and kk == IMAGE:
        if rules.image_sees == "windows":
            return _near_ranges(q, k, rules.neighbour_radius)
        return _box_ranges(q, k)
    if kq == IMAGE and kk == GUIDANCE:
        return (True, False) if rules.guidance_scope == "global" else _near_ranges(q, k, rules.guidance_radius)
    if kq == GUIDANCE and kk == GUIDANCE:
        return (True, False) if rules.guidance_sees == "global" else _near_ranges(q, k, rules.guidance_self_radius)
    if kk == IMAGE:  # text, guidance or reference queries looking at image keys
        return (True, False) if (kq == TEXT and rules.text_sees == "all") else (False, True)
    return True, False  # text or reference queries looking at guidance


def _classifier(layout: Layout, block_m: int, block_n: int, device: torch.device):
    t = _token_table(layout, device)
    n = layout.seq_len
    q_ranges = _block_ranges(t, block_m, -(-n // block_m))
    k_ranges = _block_ranges(t, block_n, -(-n // block_n))

    def classify(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (stop - start, -(-n // block_n))
        all_ok = torch.ones(shape, dtype=torch.bool, device=device)
        none_ok = torch.ones(shape, dtype=torch.bool, device=device)
        for kq, qs in q_ranges.items():
            qs = {name: v[start:stop] for name, v in qs.items()}
            for kk, ks in k_ranges.items():
                present = qs["present"][:, None] & ks["present"][None]
                every, never = _pair_rule(layout.rules, kq, kk, qs, ks)
                all_ok &= ~present | every
                none_ok &= ~present | never
        return all_ok, none_ok

    return classify


@functools.lru_cache(maxsize=16)
def _schedule(layout: Layout, block_m: int, block_n: int, device: torch.device) -> BlockSchedule:
    n = layout.seq_len
    return build_block_schedule(
        n, n, block_m, block_n, _classifier(layout, block_m, block_n, device), _predicate(layout, device), device
    )
