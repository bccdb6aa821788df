"""FLUX.2's MLP gate, ``silu(x1) * x2`` over the two halves of one tensor, in one pass.

Why: ComfyUI's ``SiLUActivation`` chunks the up-projection's output (..., 2F) into halves and computes
``silu(x1) * x2`` as two PyTorch kernels: the SiLU writes an F-wide temporary that the product reads back,
five F-wide passes through memory (at 4096^2 with klein 9B, F = 12288: ~1.7 GB a slice-sequence per block).
This kernel reads both halves once and writes the product once: three passes.

Values: computed in float32 from the input's dtype and rounded once to it (PyTorch rounds the SiLU to the
input's dtype before the product: bf16 results differ by that one rounding; float32 ones agree to ~1e-7).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - machines without Triton
    triton = None
    tl = None

from .row_tiles import ROW_TILE, row_layout, row_tile, row_tile_grid
from .triton_env import KernelGuard, triton_runs_on

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
GUARD = KernelGuard("SiLU-gate kernel")


def silu_gate(x: torch.Tensor) -> torch.Tensor:
    """``silu(x1) * x2`` for ``x1, x2 = x.chunk(2, -1)``: a new (..., F) tensor. No autograd.

    The Triton kernel on CUDA (and under Triton's CPU interpreter); elsewhere PyTorch's two operations.
    """
    if triton_runs_on(x.device) and can_take(x):
        return GUARD.run(triton_silu_gate, _torch_silu_gate, x)
    return _torch_silu_gate(x)


def _torch_silu_gate(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return F.silu(x1) * x2


def can_take(x: torch.Tensor) -> bool:
    """The kernel takes x: rows of unit stride (:func:`row_layout`), an even width, a dtype it writes, no autograd."""
    return (
        x.dtype in DTYPES and x.numel() > 0 and x.shape[-1] % 2 == 0 and row_layout(x) is not None
        and not (torch.is_grad_enabled() and x.requires_grad)
    )  # fmt: skip


def triton_silu_gate(x: torch.Tensor) -> torch.Tensor:
    """The Triton kernel itself (CUDA, or Triton's CPU interpreter); x as :func:`can_take` says."""
    rows, width, row_stride = row_layout(x)
    cols = width // 2
    out = torch.empty((*x.shape[:-1], cols), dtype=x.dtype, device=x.device)
    block_r, block_c = ROW_TILE
    grid = row_tile_grid(rows, cols)
    _silu_gate_rows[grid](x, out, rows, cols, row_stride, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4)
    return out


if triton is not None:

    @triton.jit
    def _silu_gate_rows(x_ptr, out_ptr, rows, cols, row_stride, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """One program per (BLOCK_R rows, BLOCK_C output columns) tile: both halves read, the product written."""
        r, c, live = row_tile(rows, cols, BLOCK_R, BLOCK_C)
        first = x_ptr + r[:, None].to(tl.int64) * row_stride + c[None, :]
        x1 = tl.load(first, mask=live, other=0.0).to(tl.float32)
        x2 = tl.load(first + cols, mask=live, other=0.0).to(tl.float32)
        e = tl.exp(-tl.abs(x1))  # sigmoid without overflow: exp of a non-positive number only
        sigmoid = tl.where(x1 >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
        out = out_ptr + r[:, None].to(tl.int64) * cols + c[None, :]
        tl.store(out, (x1 * sigmoid * x2).to(out_ptr.dtype.element_ty), mask=live)
