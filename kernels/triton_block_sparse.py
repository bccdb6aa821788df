"""Block-sparse FlashAttention forward in Triton (inference).

Why: window-first layouts make almost every tile of the attention matrix either fully
allowed or fully masked. This kernel walks a :class:`~.schedule.BlockSchedule`: one
program per (query block, batch x head) runs the online softmax over the query
block's fully allowed key blocks with no masking at all, then over its partly allowed
ones with a bit mask. Masked tiles are never visited.

Shapes: q, k, v (B, H, L, D); the output is written through strides, so a caller may
hand in a (B, L, H, D) buffer seen as (B, H, L, D) and get the layout ComfyUI wants
without a copy.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without Triton
    triton = None
    tl = None
try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - Triton older than 3.3
    TensorDescriptor = None

from .schedule import BlockSchedule, unpack_bits
from .triton_env import KernelGuard, interpreting

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


NAME = "triton"
AUTO_DEVICES = ("cuda",)  # where "auto" may pick it
GUARD = KernelGuard("block-sparse attention kernel")  # under "auto": the next backend once it fails on a GPU


def available() -> bool:
    """Triton is importable (the kernel runs on CUDA, or anywhere under TRITON_INTERPRET=1)."""
    return triton is not None


def usable(device: torch.device, dtype: torch.dtype | None, head_dim: int | None, training: bool) -> str | None:
    """None if this backend can run such a call, else why not."""
    if triton is None:
        return "Triton is not installed"
    if not GUARD.usable:
        return f"the Triton kernel failed on this GPU ({GUARD.failure})"
    if training:
        return "the Triton kernel is forward-only (no backward for training)"
    if device.type != "cuda" and not interpreting():
        return f"the Triton kernel needs a CUDA device (got {device.type})"
    if dtype is not None and dtype not in SUPPORTED_DTYPES:
        return f"the Triton kernel takes float16, bfloat16 or float32 (got {dtype})"
    if head_dim is not None and (head_dim < 16 or head_dim & (head_dim - 1) or head_dim > 256):
        return f"the Triton kernel needs a power-of-two head_dim from 16 to 256 (got {head_dim})"
    return None


def tile(device: torch.device, head_dim: int) -> tuple[int, int]:
    """(block_m, block_n) of the schedule this backend runs."""
    cfg = launch_config(head_dim, device)
    return cfg.block_m, cfg.block_n


def run(q, k, v, schedule: BlockSchedule, scale: float, out: torch.Tensor | None, training: bool) -> torch.Tensor:
    cfg = launch_config(q.shape[-1], q.device)
    return block_sparse_attention(
        q, k, v, schedule, scale, out, num_warps=cfg.num_warps, num_stages=cfg.num_stages, kv_tma=cfg.kv_tma
    )


if triton is not None:

    @triton.jit
    def _tile_update(q, k, v, acc, m_i, l_i, qk_scale, allowed, MASKED: tl.constexpr, IEEE: tl.constexpr):
        """One step of the online softmax over a (BLOCK_M, BLOCK_N) tile."""
        if IEEE:
            qk = tl.dot(q, k, input_precision="ieee")
        else:
            qk = tl.dot(q, k)
        if MASKED:
            qk = tl.where(allowed, qk * qk_scale, float("-inf"))
            m_ij = tl.maximum(m_i, tl.max(qk, 1))
            # A row with nothing allowed yet keeps m = -inf: subtract 0 instead (p = 0).
            m_ij = tl.where(m_ij == float("-inf"), 0.0, m_ij)
            p = tl.math.exp2(qk - m_ij[:, None])
        else:
            m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if IEEE:
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
        return acc, m_ij, l_i

    @triton.jit
    def _load_tile(X, x_tile, b, h, row, stride_xn, in_range, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                   MASKED: tl.constexpr, TMA: tl.constexpr, ALONG_N: tl.constexpr):  # fmt: skip
        """The (BLOCK_N, D) tile of X starting at key ``row``; (D, BLOCK_N) when ALONG_N (for K^T)."""
        if TMA:  # Hopper's copy engine over the (B, H, L, D) view; rows past L arrive as zeros
            x = X.load([b, h, row, 0]).reshape(BLOCK_N, HEAD_DIM)
            if ALONG_N:
                x = x.T
        elif MASKED:
            mask = in_range[None, :] if ALONG_N else in_range[:, None]
            x = tl.load(x_tile + row.to(tl.int64) * stride_xn, mask=mask, other=0.0)
        else:
            x = tl.load(x_tile + row.to(tl.int64) * stride_xn)  # int64: (B, L, H, D) strides overflow int32
        return x

    @triton.jit
    def _block_sparse_fwd(
        Q, K, V, Out,
        full_ptr, full_idx, part_ptr, part_idx, part_pattern, masks,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_oh, stride_om, stride_od,
        num_heads, q_len, kv_len, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        IEEE: tl.constexpr, K_TMA: tl.constexpr, V_TMA: tl.constexpr, HAS_PARTIAL: tl.constexpr,
    ):  # fmt: skip
        block = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // num_heads).to(tl.int64)
        h = (bh % num_heads).to(tl.int64)

        offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = offs_m.to(tl.int64)  # row offsets: q and out may be views of a (B, L, 3, H, D) buffer (2^31+)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        q = tl.load(
            Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd,
            mask=offs_m[:, None] < q_len,
            other=0.0,
        )
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        b32, h32 = bh // num_heads, bh % num_heads  # descriptor coordinates
        if K_TMA:
            k_tile = K
        else:
            k_tile = K + b * stride_kb + h * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
        if V_TMA:
            v_tile = V
        else:
            v_tile = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd

        # Fully allowed tiles: no mask, no bounds checks (the schedule guarantees both).
        lo = tl.load(full_ptr + block)
        hi = tl.load(full_ptr + block + 1)
        for i in range(lo, hi):
            start_n = tl.load(full_idx + i) * BLOCK_N
            k = _load_tile(K, k_tile, b32, h32, start_n, stride_kn, 0, BLOCK_N, HEAD_DIM, False, K_TMA, True)
            v = _load_tile(V, v_tile, b32, h32, start_n, stride_vn, 0, BLOCK_N, HEAD_DIM, False, V_TMA, False)
            acc, m_i, l_i = _tile_update(q, k, v, acc, m_i, l_i, qk_scale, 0, False, IEEE)

        # Partly allowed tiles: element mask from the tile's pattern, one byte per element
        # (expanding bits here would keep a (BLOCK_M, BLOCK_N) int32 tensor live next to
        # the accumulator and push the whole kernel into register spills). Compiled out
        # for schedules without partial tiles.
        if HAS_PARTIAL:
            lo = tl.load(part_ptr + block)
            hi = tl.load(part_ptr + block + 1)
            mask_offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + offs_n[None, :]
            for i in range(lo, hi):
                start_n = tl.load(part_idx + i) * BLOCK_N
                pattern = tl.load(part_pattern + i).to(tl.int64)
                allowed = tl.load(masks + pattern * (BLOCK_M * BLOCK_N) + mask_offs) != 0
                in_range = (start_n + offs_n) < kv_len
                k = _load_tile(K, k_tile, b32, h32, start_n, stride_kn, in_range, BLOCK_N, HEAD_DIM, True, K_TMA, True)
                v = _load_tile(V, v_tile, b32, h32, start_n, stride_vn, in_range, BLOCK_N, HEAD_DIM, True, V_TMA, False)
                acc, m_i, l_i = _tile_update(q, k, v, acc, m_i, l_i, qk_scale, allowed, True, IEEE)

        l_i = tl.where(l_i == 0.0, 1.0, l_i)  # rows past q_len only; never stored
        out = acc / l_i[:, None]
        tl.store(
            Out + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + offs_d[None, :] * stride_od,
            out.to(Out.dtype.element_ty),
            mask=offs_m[:, None] < q_len,
        )


class LaunchConfig(NamedTuple):
    """Tile shape and launch parameters of the kernel."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    kv_tma: bool


def launch_config(head_dim: int, device: torch.device) -> LaunchConfig:
    """Tile shape and launch parameters for this head size and device.

    Measured with ``bench/attention.py --tune`` on an H200 (Triton 3.6, head_dim 128; see
    bench/NOTES.md): 128x128 tiles, 8 warps, 2 stages and TMA loads of K/V are fastest for
    global guidance, local guidance and dense layouts alike; 4-warp configs with 128-row
    tiles spill registers at head_dim 128.

    Those tiles need 176 KB of shared memory with TMA (compiled for sm_90 at head_dim 128): they run only
    where a block may take that much, H100 / H200 and datacenter Blackwell (227 KB). RTX 50xx and RTX PRO
    Blackwell cards report compute capability 12 but give a block 99 KB, like Ampere and Ada: there the
    64x64 tiles (48 KB) run. ``tests/test_kernel_limits.py`` compiles each choice for each kind of GPU.
    """
    if device.type != "cuda":  # interpreter: small tiles keep tests fast and exercise masks
        return LaunchConfig(32, 32, 4, 1, False)
    large = _hopper_class(device)
    if head_dim > 64 and large:
        return LaunchConfig(128, 128, 8, 2, True)
    if head_dim > 64:
        return LaunchConfig(64, 64, 4, 3, False)  # 48 KB at head_dim 128, 96 KB at 256
    return LaunchConfig(128, 64, 4, 2, large)  # head_dim <= 64: half the accumulator; not measured


HOPPER_CLASS_SHARED = 200 * 1024  # shared memory a block must be allowed for the 128x128 TMA tiles (176 KB)


def _hopper_class(device: torch.device) -> bool:
    """Hopper's instructions (TMA) and room for its tiles: compute capability 9+ *and* a large shared memory
    (not the capability alone: consumer Blackwell, sm_120, has TMA but 99 KB a block)."""
    props = torch.cuda.get_device_properties(device)
    optin = getattr(props, "shared_memory_per_block_optin", None)  # PyTorch 2.6+ reports it
    if optin is None:
        return props.major in (9, 10)  # H100 / H200, B200 / GB200
    return props.major >= 9 and optin >= HOPPER_CLASS_SHARED


def _nonempty(t: torch.Tensor) -> torch.Tensor:
    """Triton cannot take a pointer to an empty tensor; the kernel never reads it then."""
    return t if t.numel() else torch.zeros(1, dtype=t.dtype, device=t.device)


def _byte_masks(schedule: BlockSchedule) -> torch.Tensor:
    """The schedule's distinct partial-tile masks as (patterns, BLOCK_M, BLOCK_N) int8; kept with it."""

    def build() -> torch.Tensor:
        if schedule.patterns.numel():
            return unpack_bits(schedule.patterns, schedule.block_n).to(torch.int8).contiguous()
        return torch.zeros(1, dtype=torch.int8, device=schedule.device)

    return schedule.derive("triton_masks", build)


def _tma_descriptor(x: torch.Tensor, block_n: int):
    """A TMA descriptor over (B, H, L, D) with x's own strides (FLUX hands V over strided),
    or None where TMA cannot be used: before Hopper, or strides TMA cannot express."""
    if TensorDescriptor is None or x.device.type != "cuda" or torch.cuda.get_device_capability(x.device)[0] < 9:
        return None
    if x.stride(-1) != 1 or any((s * x.element_size()) % 16 for s in x.stride()[:-1]):
        return None
    return TensorDescriptor(x, list(x.shape), list(x.stride()), [1, 1, block_n, x.shape[-1]])


def attention_launch_grid(q_blocks: int, batch: int, heads: int) -> tuple[int, int]:
    """(query blocks, batch x heads): the query blocks on axis 0, whose limit is 2^31 - 1 programs (axes 1 and 2
    stop at 65,535; 32768^2 has 4.2 M image tokens, 32,768 blocks of 128)."""
    return (q_blocks, batch * heads)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    schedule: BlockSchedule,
    scale: float,
    out: torch.Tensor | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    kv_tma: bool = False,
    stats: dict | None = None,
) -> torch.Tensor:
    """Run the kernel over ``schedule`` (built for the tile shape it will be launched with).

    q, k, v: (B, H, L, D); ``out`` (optional) any (B, H, L, D)-shaped strided view.
    ``kv_tma`` loads K and V with Hopper's tensor-memory accelerator where possible;
    ``stats``, if given, receives the compiled kernel's registers, spills and shared memory.
    """
    if triton is None:
        raise RuntimeError("Triton is not installed: use the 'flex' or 'portable' backend")
    batch, heads, q_len, head_dim = q.shape
    if out is None:
        out = torch.empty_like(q)
    reason = usable(q.device, q.dtype, head_dim, training=False)
    if reason:
        raise ValueError(reason)
    k_desc = _tma_descriptor(k, schedule.block_n) if kv_tma else None
    v_desc = _tma_descriptor(v, schedule.block_n) if kv_tma else None
    grid = attention_launch_grid(schedule.num_q_blocks, batch, heads)
    compiled = _block_sparse_fwd[grid](
        q, k if k_desc is None else k_desc, v if v_desc is None else v_desc, out,
        schedule.full_ptr, _nonempty(schedule.full_idx), schedule.part_ptr, _nonempty(schedule.part_idx),
        _nonempty(schedule.part_pattern), _byte_masks(schedule),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        heads, q_len, k.shape[2], scale * math.log2(math.e),
        HEAD_DIM=head_dim, BLOCK_M=schedule.block_m, BLOCK_N=schedule.block_n,
        IEEE=q.dtype == torch.float32, K_TMA=k_desc is not None, V_TMA=v_desc is not None,
        HAS_PARTIAL=schedule.num_partial > 0,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    if stats is not None:
        for name in ("n_regs", "n_spills", "shared"):
            stats[name] = getattr(compiled, name, None)
    return out
