"""Convolutions split into row bands with halos, and group norm over the whole image.

Why: decoding a 4K-8K latent in one piece needs PyTorch temporaries several times the
size of an activation (norm outputs, convolution workspaces); ComfyUI's tiled decode
averages overlapping tiles instead, which blurs seams and changes the result. Running
each layer band by band gives *the same* result with bounded temporaries:

- a 3x3 convolution's output rows [r0, r1) need input rows [r0 - 1, r1 + 1): each band
  reads one halo row on each side (zeros only at the true image border);
- group norm uses statistics of the whole image (accumulated band by band in float64),
  so normalising band by band equals normalising everything at once.

Shapes: (B, C, H, W). ``band_elements`` bounds the elements of one band's temporaries.
Full tensors may live on another device than the computation (``compute``, e.g. x in
CPU memory and the bands on the GPU): then only bands and their halos visit the GPU, and
kept row-major (``core.row_major.RowMajor``) each band is one contiguous transfer.
A convolution can also sum its output per channel as it writes it (``sums``): the next
group norm then needs no pass of its own over an activation that may sit in host memory.
An upsample need not be stored at all (:class:`Upsampled`: rows made as they are read), and
a resnet block's first convolution and its 1x1 shortcut read their input in one pass
(:func:`conv3x3_with_shortcut`). Every layer runs the caller's check before each band
(``between_bands``: cancel and progress).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .row_major import RowMajor, empty_like_rows, prefetched, read_rows, write_rows

DEFAULT_BAND_ELEMENTS = 1 << 26  # ~128 MB of bf16 per temporary

Pre = Callable[[torch.Tensor], torch.Tensor]
# Run before every band with the fraction of the pass done (the caller's cancel check and progress bar: one layer of
# an 8192^2 decode takes seconds).
Check = Callable[[float], None]
# Where a layer's full output is kept: (shape, dtype) -> a tensor or host rows (default: as its input is kept).
Alloc = Callable[[tuple, torch.dtype], "torch.Tensor | RowMajor"]


def _bands(reads: list[list[tuple]], compute: torch.device, between_bands: Check | None):
    """``prefetched(reads, compute)``, with the caller's check before each band."""
    for n, band in enumerate(prefetched(reads, compute)):
        if between_bands is not None:
            between_bands(n / len(reads))
        yield band


def band_rows(x: torch.Tensor | RowMajor, channels: int | None = None,
              band_elements: int = DEFAULT_BAND_ELEMENTS) -> int:  # fmt: skip
    """Rows per band so that a band of ``channels`` (default: x's) stays within ``band_elements``."""
    per_row = x.shape[0] * (channels or x.shape[1]) * x.shape[-1]
    return max(1, band_elements // max(1, per_row))


class ChannelSums:
    """Sum and sum of squares per (batch, channel) of an activation, accumulated band by band in float64 as a
    convolution writes it: what the group norm after it needs, for any number of groups."""

    def __init__(self):
        self.total: torch.Tensor | None = None
        self.squares: torch.Tensor | None = None
        self.count = 0  # elements per channel so far

    def add(self, band: torch.Tensor) -> None:
        part = band.to(torch.float64).flatten(2)
        total, squares = part.sum(-1), (part * part).sum(-1)
        if self.total is None:
            self.total, self.squares = total, squares
        else:
            self.total += total
            self.squares += squares
        self.count += part.shape[-1]

    def group_stats(self, groups: int, eps: float):
        """(mean, 1 / std) per (batch, group), as :func:`group_stats` computes them."""
        b, c = self.total.shape
        n = (c // groups) * self.count
        mean = self.total.reshape(b, groups, -1).sum(-1) / n
        var = (self.squares.reshape(b, groups, -1).sum(-1) / n - mean * mean).clamp(min=0)
        return mean.float(), torch.rsqrt(var.float() + eps)


def group_stats(x: torch.Tensor | RowMajor, groups: int, eps: float, band_elements: int = DEFAULT_BAND_ELEMENTS,
                compute: torch.device | None = None, between_bands: Check | None = None):  # fmt: skip
    """(mean, 1 / std) per (batch, group) over the whole image, accumulated band by band in float64."""
    compute = compute or x.device
    sums = ChannelSums()
    step = band_rows(x, band_elements=band_elements)
    reads = [[(x, r0, min(x.shape[2], r0 + step))] for r0 in range(0, x.shape[2], step)]
    for (band,) in _bands(reads, compute, between_bands):
        sums.add(band)
    return sums.group_stats(groups, eps)


def group_norm_silu(norm: torch.nn.GroupNorm, stats, silu: bool = True) -> Pre:
    """silu(group_norm(band)) with whole-image ``stats`` and ``norm``'s affine parameters."""
    mean, rstd = stats
    groups = norm.num_groups

    def apply(band: torch.Tensor) -> torch.Tensor:
        b, c, h, w = band.shape
        x = band.float().reshape(b, groups, c // groups, h, w)
        x = (x - mean[:, :, None, None, None]) * rstd[:, :, None, None, None]
        x = x.reshape(b, c, h, w) * norm.weight.float()[None, :, None, None] + norm.bias.float()[None, :, None, None]
        x = x.to(band.dtype)
        return F.silu(x) if silu else x

    return apply


def _prepare(x: torch.Tensor | RowMajor, conv: torch.nn.Conv2d, compute: torch.device | None):
    """(compute device, weight, bias) for running ``conv`` on bands of x."""
    compute = compute or x.device
    bias = conv.bias.to(compute, x.dtype) if conv.bias is not None else None
    return compute, conv.weight.to(compute, x.dtype), bias


def _output(x, shape: tuple, alloc: Alloc | None):
    return alloc(shape, x.dtype) if alloc is not None else empty_like_rows(x, *shape)


def _emit(out, r0: int, result: torch.Tensor, sums: ChannelSums | None) -> None:
    if sums is not None:
        sums.add(result)
    write_rows(out, r0, result)


def conv3x3(
    x: torch.Tensor | RowMajor, conv: torch.nn.Conv2d, pre: Pre | None = None, out=None,
    add: torch.Tensor | RowMajor | None = None, band_elements: int = DEFAULT_BAND_ELEMENTS,
    compute: torch.device | None = None, sums: ChannelSums | None = None, alloc: Alloc | None = None,
    between_bands: Check | None = None,
) -> torch.Tensor | RowMajor:  # fmt: skip
    """``conv(pre(x)) (+ add)`` for a 3x3, stride-1, padding-1 convolution, band by band.

    ``out`` may be ``add`` itself (or x when no later band reads it) to save memory.
    """
    compute, weight, bias = _prepare(x, conv, compute)
    b, _, h, w = x.shape
    if out is None:
        out = _output(x, (b, weight.shape[0], h, w), alloc)
    spans = _halo_spans(h, band_rows(x, max(x.shape[1], weight.shape[0]), band_elements))
    reads = [[(x, lo, hi)] + ([(add, r0, r1)] if add is not None else []) for r0, r1, lo, hi in spans]
    for (r0, r1, _, _), fetched in zip(spans, _bands(reads, compute, between_bands), strict=True):
        band = fetched[0]
        if pre is not None:
            band = pre(band)  # normalise after slicing: the padding rows below stay zero, as in the full conv
        result = F.conv2d(_pad_border(band, r0, r1, h), weight, bias)
        if add is not None:
            result = result + fetched[1]
        _emit(out, r0, result, sums)
    return out


def _halo_spans(h: int, step: int) -> list[tuple[int, int, int, int]]:
    """Per band of ``step`` output rows of a 3x3 convolution over ``h`` rows: (r0, r1, first input row, end)."""
    return [(r0, min(h, r0 + step), max(0, r0 - 1), min(h, r0 + step + 1)) for r0 in range(0, h, step)]


def _pad_border(band: torch.Tensor, r0: int, r1: int, h: int) -> torch.Tensor:
    """A band with its halo, padded as the full convolution pads: columns always, rows only at the image border."""
    return F.pad(band, (1, 1, 1 if r0 == 0 else 0, 1 if r1 == h else 0))


def _conv_of_upsampled(src: torch.Tensor, r0: int, r1: int, big: int, weight, bias) -> torch.Tensor:
    """Rows [r0, r1) of ``conv(nearest_upsample_x2(x))`` (``big`` rows in all) from ``src``: the rows of x from
    ``max(0, r0 - 1) // 2`` up to ``(min(big, r1 + 1) + 1) // 2``, on the compute device."""
    lo, hi = max(0, r0 - 1), min(big, r1 + 1)  # rows of the upsampled image the convolution reads
    up = torch.repeat_interleave(torch.repeat_interleave(src, 2, dim=2), 2, dim=3)
    up = up[:, :, lo - 2 * (lo // 2) : lo - 2 * (lo // 2) + (hi - lo)]
    return F.conv2d(_pad_border(up, r0, r1, big), weight, bias)


def _source_rows(r0: int, r1: int, big: int) -> tuple[int, int]:
    """Rows of x that output rows [r0, r1) of ``conv(nearest_upsample_x2(x))`` read (one halo row each side)."""
    return max(0, r0 - 1) // 2, (min(big, r1 + 1) + 1) // 2


def upsample2_conv3x3(
    x: torch.Tensor | RowMajor, conv: torch.nn.Conv2d, band_elements: int = DEFAULT_BAND_ELEMENTS,
    compute: torch.device | None = None, sums: ChannelSums | None = None, alloc: Alloc | None = None,
    between_bands: Check | None = None,
) -> torch.Tensor | RowMajor:  # fmt: skip
    """``conv(nearest_upsample_x2(x))`` band by band, never holding the upsampled image whole (each band
    recomputes its rows of the upsample)."""
    up = Upsampled(x, conv, compute or x.device, band_elements, between_bands)
    out = _output(x, tuple(up.shape), alloc)
    for r0, band in up.bands():
        _emit(out, r0, band, sums)
    return out


class Upsampled:
    """``conv(nearest_upsample_x2(x))`` never stored: any rows are made on demand from x's rows.

    Why: the decoder's last upsample is its largest activation (256 channels at full size: 32 GiB at 8192^2,
    128 GiB at 16384^2) and is read by one layer only. Where activations live in host memory, making its rows
    again costs less than pinning it, copying it out and reading it back, and takes that much less RAM. Read it
    in one pass (:func:`conv3x3_with_shortcut`): every read computes.
    """

    def __init__(self, x: torch.Tensor | RowMajor, conv: torch.nn.Conv2d, compute: torch.device,
                 band_elements: int = DEFAULT_BAND_ELEMENTS, between_bands: Check | None = None):  # fmt: skip
        self.x, self.band_elements, self.between_bands = x, band_elements, between_bands
        self.device, self.weight, self.bias = _prepare(x, conv, compute)
        b, _, h, w = x.shape
        self.shape = torch.Size((b, self.weight.shape[0], 2 * h, 2 * w))
        self.dtype = x.dtype

    def numel(self) -> int:
        return self.shape.numel()

    def compute_rows(self, lo: int, hi: int) -> torch.Tensor:
        """Rows [lo, hi) as a (B, C, hi - lo, W) tensor on the compute device."""
        src = read_rows(self.x, *_source_rows(lo, hi, self.shape[2]), self.device)
        return _conv_of_upsampled(src, lo, hi, self.shape[2], self.weight, self.bias)

    def bands(self):
        """(first row, its band) over the whole activation, each band's rows of x read one band ahead."""
        big = self.shape[2]
        step = band_rows(self, max(self.x.shape[1], self.shape[1]), self.band_elements)
        starts = range(0, big, step)
        reads = [[(self.x, *_source_rows(r0, min(big, r0 + step), big))] for r0 in starts]
        for r0, (src,) in zip(starts, _bands(reads, self.device, self.between_bands), strict=True):
            yield r0, _conv_of_upsampled(src, r0, min(big, r0 + step), big, self.weight, self.bias)

    def sums(self) -> ChannelSums:
        """The per-channel sums of the whole activation (for the group norm that reads it), in one pass."""
        sums = ChannelSums()
        for _, band in self.bands():
            sums.add(band)
        return sums


def conv3x3_with_shortcut(
    x: torch.Tensor | RowMajor | Upsampled, conv: torch.nn.Conv2d, pre: Pre, shortcut: torch.nn.Conv2d,
    band_elements: int = DEFAULT_BAND_ELEMENTS, compute: torch.device | None = None,
    sums: ChannelSums | None = None, alloc: Alloc | None = None, between_bands: Check | None = None,
) -> tuple[torch.Tensor | RowMajor, torch.Tensor | RowMajor]:  # fmt: skip
    """``(conv(pre(x)), shortcut(x))`` for a resnet block that changes channels (``shortcut``: its 1x1
    convolution), in one pass over x: each band of x is read (or made, when x is :class:`Upsampled`) once for
    both. ``sums``: of the first output."""
    compute, weight, bias = _prepare(x, conv, compute)
    _, skip_weight, skip_bias = _prepare(x, shortcut, compute)
    b, _, h, w = x.shape
    like = x.x if isinstance(x, Upsampled) else x
    out = _output(like, (b, weight.shape[0], h, w), alloc)
    skip = _output(like, (b, skip_weight.shape[0], h, w), alloc)
    spans = _halo_spans(h, band_rows(x, max(x.shape[1], weight.shape[0]), band_elements))
    reads = [[(x, lo, hi)] for _, _, lo, hi in spans]
    for (r0, r1, lo, _), (band,) in zip(spans, _bands(reads, compute, between_bands), strict=True):
        write_rows(skip, r0, F.conv2d(band[:, :, r0 - lo : r1 - lo], skip_weight, skip_bias))
        _emit(out, r0, F.conv2d(_pad_border(pre(band), r0, r1, h), weight, bias), sums)
    return out, skip


def pad_conv3x3_stride2(
    x: torch.Tensor | RowMajor, conv: torch.nn.Conv2d, band_elements: int = DEFAULT_BAND_ELEMENTS,
    compute: torch.device | None = None, sums: ChannelSums | None = None, alloc: Alloc | None = None,
    between_bands: Check | None = None,
) -> torch.Tensor | RowMajor:  # fmt: skip
    """``conv(pad(x, right 1, bottom 1))`` with stride 2 and no padding (the VAE's Downsample), band by band."""
    compute, weight, bias = _prepare(x, conv, compute)
    b, _, h, w = x.shape
    out_h, out_w = (h + 1 - 3) // 2 + 1, (w + 1 - 3) // 2 + 1
    out = _output(x, (b, weight.shape[0], out_h, out_w), alloc)
    step = max(1, band_rows(x, max(x.shape[1], weight.shape[0]), band_elements) // 2)
    starts = range(0, out_h, step)
    spans = [(2 * o0, 2 * (min(out_h, o0 + step) - 1) + 3) for o0 in starts]  # input rows; the last may be padding
    reads = [[(x, lo, min(h, hi))] for lo, hi in spans]
    for o0, (_, hi), (band,) in zip(starts, spans, _bands(reads, compute, between_bands), strict=True):
        band = F.pad(band, (0, 1, 0, hi - min(h, hi)))
        _emit(out, o0, F.conv2d(band, weight, bias, stride=2), sums)
    return out
