"""flex_attention backend, built from the same block schedule as the Triton kernel.

Why: PyTorch's flex_attention is a well-kept, compiled block-sparse kernel and a fair
yardstick. Its ``BlockMask`` is made directly from our schedule
(``BlockMask.from_kv_blocks``: full tiles without mask, partial tiles through the
layout's token predicate as ``mask_mod``), so no L x L mask is ever evaluated. Its index
arrays are (query blocks x key blocks) int32, flex's own format.
"""

from __future__ import annotations

import functools
import inspect

import torch

from .schedule import BlockSchedule

try:
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # pragma: no cover - torch older than 2.5
    BlockMask = flex_attention = None

BLOCK = 128  # flex's sparse block size; its kernels tile inside it
NAME = "flex"
AUTO_DEVICES = ("cuda",)  # where "auto" may pick it (on a CPU the portable backend is faster)


def available() -> bool:
    return flex_attention is not None


def usable(device: torch.device, dtype: torch.dtype | None, head_dim: int | None, training: bool) -> str | None:
    """None if this backend can run such a call, else why not."""
    if flex_attention is None:
        return "this PyTorch has no flex_attention"
    if head_dim is not None and (head_dim < 16 or head_dim & (head_dim - 1)):
        return f"compiled flex_attention needs a power-of-two head_dim (got {head_dim})"
    if device.type == "cuda" and not _has_triton():
        return "compiled flex_attention on CUDA needs Triton"
    if device.type not in ("cuda", "cpu"):
        return f"flex_attention does not run on {device.type}"
    if training and device.type != "cuda":
        return "flex_attention has no backward pass on the CPU"
    return None


def tile(device: torch.device, head_dim: int) -> tuple[int, int]:
    return BLOCK, BLOCK


def run(q, k, v, schedule: BlockSchedule, scale: float, out: torch.Tensor | None, training: bool) -> torch.Tensor:
    result = flex_block_sparse_attention(q, k, v, schedule, scale, backward=training)
    return result if out is None else out.copy_(result)


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _padded(ptr: torch.Tensor, idx: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR -> (1, 1, rows) counts and (1, 1, rows, width) indices.

    ``width`` must be the number of key blocks: flex reads the index array's last
    dimension as the key length of the mask (seen with torch 2.11 to 2.13).
    """
    counts = ptr[1:] - ptr[:-1]
    rows = counts.numel()
    dense = torch.zeros(rows, width, dtype=torch.int32, device=ptr.device)
    row = torch.repeat_interleave(torch.arange(rows, device=ptr.device), counts.long())
    col = torch.arange(idx.numel(), device=ptr.device) - ptr[:-1].long()[row]
    dense[row, col] = idx
    return counts.to(torch.int32)[None, None], dense[None, None]


def block_mask(schedule: BlockSchedule, backward: bool = False) -> BlockMask:
    """The flex BlockMask of a schedule; built once and kept with the schedule.

    ``backward``: also build the transposed (key-major) index that flex's backward pass
    reads; inference skips it.
    """

    def build() -> BlockMask:
        predicate, q_last, kv_len = schedule.predicate, schedule.q_len - 1, schedule.kv_len

        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx < kv_len) & predicate(q_idx.clamp(max=q_last), kv_idx.clamp(max=kv_len - 1))

        part_num, part_idx = _padded(schedule.part_ptr, schedule.part_idx, schedule.num_kv_blocks)
        full_num, full_idx = _padded(schedule.full_ptr, schedule.full_idx, schedule.num_kv_blocks)
        extra = {}
        params = inspect.signature(BlockMask.from_kv_blocks).parameters
        if "seq_lengths" in params:
            extra["seq_lengths"] = (schedule.q_len, schedule.kv_len)
        if "compute_q_blocks" in params:
            extra["compute_q_blocks"] = backward
        return BlockMask.from_kv_blocks(
            part_num,
            part_idx,
            full_num,
            full_idx,
            BLOCK_SIZE=(schedule.block_m, schedule.block_n),
            mask_mod=mask_mod,
            **extra,
        )

    return schedule.derive("flex_backward" if backward else "flex", build)


@functools.lru_cache(maxsize=1)
def _compiled():
    return torch.compile(flex_attention, dynamic=False)


def flex_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    schedule: BlockSchedule,
    scale: float,
    compiled: bool = True,
    backward: bool = False,
) -> torch.Tensor:
    """q, k, v (B, H, L, D) -> (B, H, L, D). ``compiled=False`` runs flex eagerly (tests only:
    eager flex materialises the whole score matrix); ``backward``: the result will be
    differentiated."""
    if flex_attention is None:
        raise RuntimeError("this PyTorch has no flex_attention (needs 2.5 or newer)")
    fn = _compiled() if compiled else flex_attention
    return fn(q, k, v, block_mask=block_mask(schedule, backward), scale=scale)
