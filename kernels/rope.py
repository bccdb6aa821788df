"""Rotary position embedding (RoPE) applied to q and k without float32 copies of them.

Why: ComfyUI's FLUX applies RoPE inside ``comfy.ldm.flux.math.attention`` by converting q
and k to float32 and combining whole-tensor products: at 8192^2 that is ~10 GB of float32
temporaries per attention call and ~20 memory passes over q and k, in every one of the
57 blocks. Here one pass reads q, k and the rotary table and writes the rotated bf16
tensors: the Triton kernel on CUDA (each table tile is loaded once and used for every
head of q and k), chunked float32 math elsewhere. The arithmetic is ComfyUI's, so the
result is the same up to float32 rounding.

Shapes: q, k (B, H, L, D); the rotary table ``pe`` (B or 1, 1, L, D / 2, 2, 2) float32,
as FLUX's ``EmbedND`` makes it: pair i of a token becomes
``out[2i + r] = pe[i, r, 0] * x[2i] + pe[i, r, 1] * x[2i + 1]``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - machines without Triton
    triton = None
    tl = None

from ..errors import UltraGenError
from .triton_env import KernelGuard, triton_runs_on

CHUNK_TOKENS = 4096  # float32 temporaries of the portable path: this many tokens at a time
GUARD = KernelGuard("RoPE kernel")


class RopeInputError(UltraGenError, ValueError):
    """q, k and the rotary table do not fit together; the message says how."""


def check_rope_inputs(q: torch.Tensor, k: torch.Tensor, pe: torch.Tensor) -> None:
    if q.dim() != 4 or q.shape != k.shape:
        raise RopeInputError(f"q and k must be (B, H, L, D) of one shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    b, _, length, dim = q.shape
    want = (1, length, dim // 2, 2, 2)
    if dim % 2 or pe.dim() != 6 or tuple(pe.shape[1:]) != want or pe.shape[0] not in (1, b):
        raise RopeInputError(
            f"the rotary table must be ({b} or 1, {', '.join(map(str, want))}) for q of shape {tuple(q.shape)}, "
            f"got {tuple(pe.shape)}"
        )


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, pe: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None,
    norm: QKNorm | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """q and k rotated by ``pe``, in q's dtype: new contiguous (B, H, L, D) tensors, or written into ``out`` (two
    (B, H, L, D) views of one layout with unit channel stride, e.g. q's and k's slots of a q/k/v buffer, which may
    be q and k themselves) and returned, saving the copy into them. ``norm``: each head's row RMS-normalised first
    (FLUX's QK-norm), in the same pass where Triton runs, in float32 without rounding in between."""
    check_rope_inputs(q, k, pe)
    if out is not None:
        _check_out(q, out)
    if not _differentiable(q, k, pe) and triton_runs_on(q.device):
        return GUARD.run(_rope_triton, _rope_torch, q, k, pe, out=out, norm=norm)
    return _rope_torch(q, k, pe, out=out, norm=norm)


def _differentiable(q: torch.Tensor, k: torch.Tensor, pe: torch.Tensor) -> bool:
    """Autograd records this call (training): the Triton kernel has no backward."""
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or pe.requires_grad)


def _rope_torch(
    q: torch.Tensor, k: torch.Tensor, pe: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None,
    norm: QKNorm | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """:func:`apply_rope` in PyTorch operations (float32 temporaries; a chunk of tokens at a time without autograd)."""
    if norm is not None:
        q, k = norm.apply(q, norm.q_weight), norm.apply(k, norm.k_weight)
    if _differentiable(q, k, pe):
        rotated = _rotate(q, pe), _rotate(k, pe)
    else:
        rotated = _rotate_chunked(q, pe), _rotate_chunked(k, pe)
    if out is None:
        return rotated
    out[0].copy_(rotated[0])
    out[1].copy_(rotated[1])
    return out


@dataclass(frozen=True)
class QKNorm:
    """FLUX's QK-norm of one attention layer: ``x * rsqrt(mean(x^2) + eps) * weight`` over each head's D channels,
    with q's and k's own (D,) weights (in q's dtype, as the layer's forward would cast them)."""

    q_weight: torch.Tensor
    k_weight: torch.Tensor
    eps: float

    def apply(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """PyTorch's rms_norm (ComfyUI's own), rounded to x's dtype: the path without Triton."""
        return F.rms_norm(x, (x.shape[-1],), weight, self.eps)

    @functools.cached_property
    def kernel_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """q's and k's weights as the kernel reads them (float32, contiguous): made once per QK-norm, which a
        block takes once per call, not once per slice."""
        return self.q_weight.float().contiguous(), self.k_weight.float().contiguous()


def _check_out(q: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor]) -> None:
    q_out, k_out = out
    if q_out.shape != q.shape or k_out.shape != q.shape or q_out.stride() != k_out.stride() or q_out.stride(-1) != 1:
        raise RopeInputError(
            f"the outputs must be two views of q's shape {tuple(q.shape)} with one layout and unit channel stride, "
            f"got {tuple(q_out.shape)} {q_out.stride()} and {tuple(k_out.shape)} {k_out.stride()}"
        )
    if q_out.dtype != q.dtype or k_out.dtype != q.dtype or q_out.device != q.device or k_out.device != q.device:
        raise RopeInputError(f"the outputs must be {q.dtype} on {q.device}, like q")


def _rotate(x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """ComfyUI's formula on the whole tensor (differentiable; float32 temporaries of x's size)."""
    pairs = x.to(pe.dtype).reshape(*x.shape[:-1], -1, 1, 2)
    out = pe[..., 0] * pairs[..., 0] + pe[..., 1] * pairs[..., 1]
    return out.reshape(x.shape).to(x.dtype)


def _rotate_chunked(x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """The same, :data:`CHUNK_TOKENS` tokens at a time (no autograd)."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[2], CHUNK_TOKENS):
        end = start + CHUNK_TOKENS
        out[:, :, start:end] = _rotate(x[:, :, start:end], pe[:, :, start:end])
    return out


if triton is not None:

    @triton.jit
    def _rotate_tile(src, dst, live, c00, c01, c10, c11, w, eps, D: tl.constexpr, BLOCK_L: tl.constexpr,
                     DP: tl.constexpr, NORM: tl.constexpr):  # fmt: skip
        """dst = the (BLOCK_L, DP) tile at src with each channel pair multiplied by its 2x2 table entry; with NORM,
        each row RMS-normalised over its D channels and scaled by w first."""
        x = tl.load(src, mask=live, other=0.0).to(tl.float32)
        if NORM:
            x = x * tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)[:, None] * w[None, :]
        x0, x1 = tl.split(x.reshape(BLOCK_L, DP // 2, 2))
        out = tl.join(c00 * x0 + c01 * x1, c10 * x0 + c11 * x1).reshape(BLOCK_L, DP)
        tl.store(dst, out.to(dst.dtype.element_ty), mask=live)

    @triton.jit
    def _rope_kernel(
        q_ptr, k_ptr, pe_ptr, qo_ptr, ko_ptr, wq_ptr, wk_ptr, eps,
        L,
        sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, spe_b, spe_l, so_b, so_h, so_l,
        D: tl.constexpr, DP: tl.constexpr, HEADS: tl.constexpr, GROUPS: tl.constexpr, BLOCK_L: tl.constexpr,
        NORM: tl.constexpr,
    ):  # fmt: skip
        """One program per (HEADS heads, token block, batch): whole-row tile loads, the table tile reused.

        Axis 0 numbers (token block, head group) with the GROUPS head groups of a block adjacent, so
        they read the block's table tile from L2; offsets are int64 (16384^2 passes 2^31 elements).
        """
        pid = tl.program_id(0)
        h0 = (pid % GROUPS).to(tl.int64) * HEADS
        tokens = (pid // GROUPS).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
        b = tl.program_id(1).to(tl.int64)
        cols = tl.arange(0, DP)  # D rounded up to a power of two
        live = (tokens < L)[:, None] & (cols < D)[None, :]
        # pe[b, 0, l, i, r, c] lies at spe_b * b + spe_l * l + 4 i + 2 r + c: a row of 2 D floats per token.
        entries = tl.arange(0, 2 * DP)
        table = tl.load(
            pe_ptr + b * spe_b + tokens[:, None] * spe_l + entries[None, :],
            mask=(tokens < L)[:, None] & (entries < 2 * D)[None, :],
            other=0.0,
        ).reshape(BLOCK_L, DP // 2, 2, 2)
        by_c0, by_c1 = tl.split(table)  # (BLOCK_L, D / 2, 2) over r, for c = 0 and c = 1
        c00, c10 = tl.split(by_c0)
        c01, c11 = tl.split(by_c1)
        out_offsets = b * so_b + tokens[:, None] * so_l + cols[None, :]
        if NORM:  # the QK-norm's (D,) weights, float32
            wq = tl.load(wq_ptr + cols, mask=cols < D, other=0.0)
            wk = tl.load(wk_ptr + cols, mask=cols < D, other=0.0)
        else:
            wq = tl.zeros((DP,), dtype=tl.float32)
            wk = wq
        for i in tl.static_range(HEADS):
            h = h0 + i
            src = q_ptr + b * sq_b + h * sq_h + tokens[:, None] * sq_l + cols[None, :]
            _rotate_tile(src, qo_ptr + h * so_h + out_offsets, live, c00, c01, c10, c11, wq, eps, D, BLOCK_L, DP,
                         NORM)  # fmt: skip
            src = k_ptr + b * sk_b + h * sk_h + tokens[:, None] * sk_l + cols[None, :]
            _rotate_tile(src, ko_ptr + h * so_h + out_offsets, live, c00, c01, c10, c11, wk, eps, D, BLOCK_L, DP,
                         NORM)  # fmt: skip


def rope_launch_grid(batch: int, groups: int, length: int, block_l: int) -> tuple[int, int]:
    """(groups x token blocks, batch): the token blocks on axis 0, whose limit is 2^31 - 1 programs
    (axes 1 and 2 stop at 65,535: 16384^2 has 1,048,576 image tokens, 65,536 blocks of 16)."""
    return (groups * -(-length // block_l), batch)


def _rope_triton(
    q: torch.Tensor, k: torch.Tensor, pe: torch.Tensor, heads_per_program: int = 8, block_l: int = 16,
    out: tuple[torch.Tensor, torch.Tensor] | None = None, norm: QKNorm | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Launch the kernel; the defaults were fastest on an H200 at 8192^2 (24 heads x 128: 1.8 ms for q and k,
    against 25.6 ms for ComfyUI's rotation; 4 or 8 heads a program and 16-32 tokens a block within 5%)."""
    b, h, length, dim = q.shape
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    pe = pe.to(torch.float32)
    if pe.stride()[3:] != (4, 2, 1):
        pe = pe.contiguous()
    if out is None:
        q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    else:  # each program reads its tile of q and k before writing the same tile: out may be q and k
        q_out, k_out = out
    heads = next(n for n in (heads_per_program, 4, 2, 1) if h % n == 0)
    if norm is not None:
        (wq, wk), eps = norm.kernel_weights, float(norm.eps)
    else:
        wq, wk, eps = pe, pe, 0.0  # not read
    _rope_kernel[rope_launch_grid(b, h // heads, length, block_l)](
        q, k, pe, q_out, k_out, wq, wk, eps, length,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        pe.stride(0) if pe.shape[0] > 1 else 0, pe.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2),
        D=dim, DP=triton.next_power_of_2(dim), HEADS=heads, GROUPS=h // heads, BLOCK_L=block_l,
        NORM=norm is not None, num_warps=4,
    )  # fmt: skip
    return q_out, k_out
