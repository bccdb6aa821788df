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

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - machines without Triton
    triton = None
    tl = None

CHUNK_TOKENS = 4096  # float32 temporaries of the portable path: this many tokens at a time


class RopeInputError(ValueError):
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


def apply_rope(q: torch.Tensor, k: torch.Tensor, pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k rotated by ``pe``, in q's dtype, as new contiguous (B, H, L, D) tensors."""
    check_rope_inputs(q, k, pe)
    differentiable = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or pe.requires_grad)
    if differentiable:
        return _rotate(q, pe), _rotate(k, pe)
    if triton is not None and (q.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"):
        return _rope_triton(q, k, pe)
    return _rotate_chunked(q, pe), _rotate_chunked(k, pe)


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
    def _rope_kernel(
        q_ptr, k_ptr, pe_ptr, qo_ptr, ko_ptr,
        L, H,
        sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, spe_b, spe_l, so_b, so_h, so_l,
        HALF_D: tl.constexpr, PAIRS: tl.constexpr, BLOCK_L: tl.constexpr,
    ):  # fmt: skip
        """One program per (token block, batch): load the table tile once, rotate every head of q and k."""
        pid_l = tl.program_id(0)
        b = tl.program_id(1)
        tokens = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
        pairs = tl.arange(0, PAIRS)  # HALF_D rounded up to a power of two
        live = (tokens < L)[:, None] & (pairs < HALF_D)[None, :]
        # pe[b, 0, l, i, r, c] at spe_b * b + spe_l * l + 4 i + 2 r + c (the last three dims are contiguous).
        table = pe_ptr + b * spe_b + tokens[:, None] * spe_l + pairs[None, :] * 4
        c00 = tl.load(table + 0, mask=live, other=0.0)
        c01 = tl.load(table + 1, mask=live, other=0.0)
        c10 = tl.load(table + 2, mask=live, other=0.0)
        c11 = tl.load(table + 3, mask=live, other=0.0)
        even = tokens[:, None] * sq_l + pairs[None, :] * 2
        even_k = tokens[:, None] * sk_l + pairs[None, :] * 2
        even_o = tokens[:, None] * so_l + pairs[None, :] * 2
        for h in range(H):
            src = q_ptr + b * sq_b + h * sq_h + even
            dst = qo_ptr + b * so_b + h * so_h + even_o
            x0 = tl.load(src, mask=live, other=0.0).to(tl.float32)
            x1 = tl.load(src + 1, mask=live, other=0.0).to(tl.float32)
            tl.store(dst, (c00 * x0 + c01 * x1).to(qo_ptr.dtype.element_ty), mask=live)
            tl.store(dst + 1, (c10 * x0 + c11 * x1).to(qo_ptr.dtype.element_ty), mask=live)
            src = k_ptr + b * sk_b + h * sk_h + even_k
            dst = ko_ptr + b * so_b + h * so_h + even_o
            x0 = tl.load(src, mask=live, other=0.0).to(tl.float32)
            x1 = tl.load(src + 1, mask=live, other=0.0).to(tl.float32)
            tl.store(dst, (c00 * x0 + c01 * x1).to(ko_ptr.dtype.element_ty), mask=live)
            tl.store(dst + 1, (c10 * x0 + c11 * x1).to(ko_ptr.dtype.element_ty), mask=live)


def _rope_triton(q: torch.Tensor, k: torch.Tensor, pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b, h, length, dim = q.shape
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    pe = pe.to(torch.float32)
    if pe.stride()[3:] != (4, 2, 1):
        pe = pe.contiguous()
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    block_l = 32 if dim <= 128 else 16
    grid = (triton.cdiv(length, block_l), b)
    _rope_kernel[grid](
        q, k, pe, q_out, k_out, length, h,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        pe.stride(0) if pe.shape[0] > 1 else 0, pe.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2),
        HALF_D=dim // 2, PAIRS=triton.next_power_of_2(dim // 2), BLOCK_L=block_l, num_warps=4,
    )  # fmt: skip
    return q_out, k_out
