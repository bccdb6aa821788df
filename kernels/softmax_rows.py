"""Softmax over long rows of float32 scores, scaled, written once in the dtype of the values; and one key chunk
of an online softmax the same way.

Why: the exact VAE's middle attention (``core/long_attention.py``) turns each chunk of float32 scores
(128 query rows x 1M keys at 8192^2: 512 MB) into probabilities for the product with V. In PyTorch that
is three passes and a float32 copy — scale in place, softmax, cast to bf16 — about 3.3 GB of memory
traffic a chunk, most of the ~15 s that attention takes on an H200. This kernel reads the scores twice
(a running maximum and sum, then the probabilities) and writes them once in bf16: 1.25 GB a chunk, and
no float32 copy, so a chunk may hold more rows in the same memory (6 bytes a score instead of 10).

Where a row does not fit (16384^2: 4M keys a row), the attention meets the keys a chunk at a time with
FlashAttention's running maximum and sum: :func:`exp_rows` gives one chunk's probabilities (unnormalised, in the
values' dtype), the new running maximum and the chunk's float32 row sums in one kernel, where PyTorch took six
passes over the float32 scores (scale, maximum, subtract, exp, sum, cast).

Values: ``exp(s * scale - m) / l`` in float32 with m the row's maximum and l its sum, as PyTorch's
softmax computes them (the sum in another order: float32 rounding apart), then rounded to the output
dtype. One program per row; the row's running maximum and sum are kept per lane and combined at the end.

Shapes: scores (R, N) float32 with unit column stride; probabilities (R, N) in ``out_dtype``; running maxima
and sums (R, 1) float32.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - machines without Triton
    triton = None
    tl = None

from .triton_env import KernelGuard

BLOCK = 4096  # columns a program reads at a time
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
GUARD = KernelGuard("exact VAE's softmax kernel")  # its failure on this machine: PyTorch's softmax from then on


def can_run_on(device: torch.device, out_dtype: torch.dtype) -> bool:
    """The kernel runs on this device (CUDA, with Triton) and writes this dtype."""
    return triton is not None and GUARD.usable and device.type == "cuda" and out_dtype in OUT_DTYPES


def can_run(scores: torch.Tensor, out_dtype: torch.dtype) -> bool:
    """The kernel takes these scores: (R, N) float32 rows of unit stride, where :func:`can_run_on` holds."""
    return (
        can_run_on(scores.device, out_dtype) and scores.dim() == 2 and scores.dtype == torch.float32
        and scores.stride(-1) == 1
    )  # fmt: skip


def softmax_rows(scores: torch.Tensor, scale: float, out_dtype: torch.dtype) -> torch.Tensor:
    """``softmax(scores * scale, dim=-1).to(out_dtype)``: the Triton kernel on CUDA, else PyTorch (which scales the
    scores in place)."""
    if can_run(scores, out_dtype):
        return GUARD.run(triton_softmax_rows, softmax_in_place, scores, scale, out_dtype)
    return torch.softmax(scores.mul_(scale), dim=-1).to(out_dtype)


def exp_rows(scores: torch.Tensor, scale: float, top: torch.Tensor,
             out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """One key chunk of an online softmax: ``new_top = max(top, rowmax(scores * scale))``, the probabilities
    ``exp(scores * scale - new_top)`` in ``out_dtype`` and their float32 row sums (before rounding). The Triton
    kernel on CUDA, else PyTorch over the scores' own memory."""
    if can_run(scores, out_dtype):
        return GUARD.run(triton_exp_rows, exp_in_place, scores, scale, top, out_dtype)
    return exp_in_place(scores, scale, top, out_dtype)


def exp_in_place(scores: torch.Tensor, scale: float, top: torch.Tensor,
                 out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """:func:`exp_rows` in PyTorch operations over the scores' own memory."""
    scores.mul_(scale)
    new_top = torch.maximum(top, scores.amax(dim=-1, keepdim=True))
    probs = scores.sub_(new_top).exp_()
    return probs.to(out_dtype), new_top, probs.sum(dim=-1, keepdim=True)


def softmax_in_place(scores: torch.Tensor, scale: float, out_dtype: torch.dtype) -> torch.Tensor:
    """The same softmax in PyTorch operations over the scores' own memory (no float32 copy): the fallback where
    the caller sized its chunks for the kernel (4 bytes a score plus the output)."""
    scores.mul_(scale)
    scores.sub_(scores.amax(dim=-1, keepdim=True)).exp_()
    return scores.div_(scores.sum(dim=-1, keepdim=True)).to(out_dtype)


def triton_softmax_rows(scores: torch.Tensor, scale: float, out_dtype: torch.dtype) -> torch.Tensor:
    """The Triton kernel itself (CUDA, or Triton's CPU interpreter): one program per row (grid axis 0 takes
    2^31 - 1 of them)."""
    rows, n = scores.shape
    out = torch.empty((rows, n), dtype=out_dtype, device=scores.device)
    if rows and n:
        _softmax_rows[(rows,)](scores, out, n, scores.stride(0), out.stride(0), scale, BLOCK=BLOCK, num_warps=8)
    return out


def triton_exp_rows(scores: torch.Tensor, scale: float, top: torch.Tensor,
                    out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The Triton kernel of :func:`exp_rows` (CUDA, or Triton's CPU interpreter): one program per row."""
    rows, n = scores.shape
    probs = torch.empty((rows, n), dtype=out_dtype, device=scores.device)
    new_top = torch.empty((rows, 1), dtype=torch.float32, device=scores.device)
    sums = torch.empty((rows, 1), dtype=torch.float32, device=scores.device)
    top = top.to(torch.float32).reshape(rows).contiguous()
    if rows and n:
        _exp_rows[(rows,)](scores, probs, top, new_top, sums, n, scores.stride(0), probs.stride(0), scale, BLOCK=BLOCK,
                           num_warps=8)  # fmt: skip
    return probs, new_top, sums


if triton is not None:

    @triton.jit
    def _softmax_rows(s_ptr, o_ptr, n, s_stride, o_stride, scale, BLOCK: tl.constexpr):
        """Row ``program_id(0)``: a running maximum and sum per lane over the row, then the probabilities."""
        row = tl.program_id(0).to(tl.int64)
        s_row = s_ptr + row * s_stride
        o_row = o_ptr + row * o_stride
        cols = tl.arange(0, BLOCK)
        top = tl.full([BLOCK], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK], tl.float32)
        for c0 in range(0, n, BLOCK):
            c = c0 + cols
            x = tl.load(s_row + c, mask=c < n, other=float("-inf")) * scale
            new_top = tl.maximum(top, x)
            seen = new_top > float("-inf")  # a lane that has only met masked columns keeps a sum of 0
            total = tl.where(seen, total * tl.exp(top - new_top) + tl.exp(x - new_top), 0.0)
            top = new_top
        m = tl.max(top, 0)
        l_sum = tl.sum(tl.where(top > float("-inf"), total * tl.exp(top - m), 0.0), 0)
        for c0 in range(0, n, BLOCK):
            c = c0 + cols
            x = tl.load(s_row + c, mask=c < n, other=float("-inf")) * scale
            tl.store(o_row + c, (tl.exp(x - m) / l_sum).to(o_ptr.dtype.element_ty), mask=c < n)

    @triton.jit
    def _exp_rows(s_ptr, o_ptr, top_ptr, new_top_ptr, sum_ptr, n, s_stride, o_stride, scale, BLOCK: tl.constexpr):
        """Row ``program_id(0)``: its maximum over the chunk, then the probabilities and their sum."""
        row = tl.program_id(0).to(tl.int64)
        s_row = s_ptr + row * s_stride
        o_row = o_ptr + row * o_stride
        cols = tl.arange(0, BLOCK)
        top = tl.full([BLOCK], float("-inf"), tl.float32)
        for c0 in range(0, n, BLOCK):
            c = c0 + cols
            top = tl.maximum(top, tl.load(s_row + c, mask=c < n, other=float("-inf")) * scale)
        m = tl.maximum(tl.max(top, 0), tl.load(top_ptr + row))
        total = tl.zeros([BLOCK], tl.float32)
        for c0 in range(0, n, BLOCK):
            c = c0 + cols
            p = tl.exp(tl.load(s_row + c, mask=c < n, other=float("-inf")) * scale - m)
            tl.store(o_row + c, p.to(o_ptr.dtype.element_ty), mask=c < n)
            total += p  # masked columns: exp(-inf) = 0
        tl.store(new_top_ptr + row, m)
        tl.store(sum_ptr + row, tl.sum(total, 0))
