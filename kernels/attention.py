"""One entry point for block-sparse attention, and the choice of backend.

Why: callers (the FLUX patch, benchmarks, tests) should say *what* to compute (q, k, v
and a sparsity pattern) and optionally *how* (a backend name); this module checks the
inputs, picks the fastest backend the device offers, and builds or fetches the
schedule for that backend's tile shape.
"""

from __future__ import annotations

import torch

from . import flex, portable, triton_block_sparse
from .checks import AttentionInputError, check_qkv
from .schedule import SparsityPattern
from .triton_env import interpreting

BACKENDS = ("auto", "triton", "flex", "portable")


def triton_usable(device: torch.device, dtype: torch.dtype | None = None, head_dim: int | None = None) -> str | None:
    """None if the Triton kernel can run these inputs, else the reason it cannot."""
    if not triton_block_sparse.available():
        return "Triton is not installed"
    if device.type != "cuda" and not interpreting():
        return f"the Triton kernel needs a CUDA device (got {device.type})"
    if dtype is not None and dtype not in triton_block_sparse.SUPPORTED_DTYPES:
        return f"the Triton kernel takes float16, bfloat16 or float32 (got {dtype})"
    if head_dim is not None and (head_dim < 16 or head_dim & (head_dim - 1) or head_dim > 256):
        return f"the Triton kernel needs a power-of-two head_dim from 16 to 256 (got {head_dim})"
    return None


def flex_usable(device: torch.device, head_dim: int | None = None, grad: bool = False) -> str | None:
    if not flex.available():
        return "this PyTorch has no flex_attention"
    if head_dim is not None and (head_dim < 16 or head_dim & (head_dim - 1)):
        return f"compiled flex_attention needs a power-of-two head_dim (got {head_dim})"
    if device.type == "cuda" and not triton_block_sparse.available():
        return "compiled flex_attention on CUDA needs Triton"
    if device.type not in ("cuda", "cpu"):
        return f"flex_attention does not run on {device.type}"
    if grad and device.type != "cuda":
        return "flex_attention has no backward pass on the CPU"
    return None


def needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd will differentiate through attention of these inputs (training)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def choose_backend(
    device: torch.device | str, dtype: torch.dtype | None = None, head_dim: int | None = None, grad: bool = False
) -> str:
    """The fastest backend available for these inputs: triton, else flex on CUDA, else portable.

    ``grad``: the result will be differentiated; the Triton kernel is forward-only, so
    training takes flex (whose compiled kernels have a backward) or portable SDPA.
    """
    device = torch.device(device)
    if device.type == "cuda" and not grad and triton_usable(device, dtype, head_dim) is None:
        return "triton"
    if device.type == "cuda" and flex_usable(device, head_dim) is None:
        return "flex"
    return "portable"


def describe_backend(device: torch.device | str | None = None) -> str:
    """A one-line description of what ``auto`` will use, for the load-time log line."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type != "cuda":
        return f"portable SDPA on {device.type.upper()} (no CUDA GPU)"
    where = torch.cuda.get_device_name(device)
    name = choose_backend(device)
    if name == "triton":
        import triton

        return f"triton block-sparse kernel on {where} (Triton {triton.__version__})"
    return f"{'flex_attention' if name == 'flex' else 'portable SDPA'} on {where} ({triton_usable(device)})"


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: SparsityPattern,
    backend: str = "auto",
    scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of q over k, v restricted to ``pattern``.

    q, k, v: (B, H, L, D) with L = ``pattern.seq_len``; returns (B, H, L, D).
    ``scale`` defaults to 1 / sqrt(D). ``backend`` is one of :data:`BACKENDS`.
    ``out``: optional (B, H, L, D)-shaped view to write into (e.g. a (B, L, H, D) buffer
    transposed, the layout ComfyUI wants); the Triton kernel writes it directly.
    When autograd will differentiate the result (training), ``auto`` skips the forward-only
    Triton kernel.
    """
    if backend not in BACKENDS:
        raise AttentionInputError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_qkv(q, k, v, pattern.seq_len)
    head_dim = q.shape[-1]
    scale = head_dim**-0.5 if scale is None else float(scale)
    grad = needs_grad(q, k, v)
    if backend == "auto":
        backend = choose_backend(q.device, q.dtype, head_dim, grad)
    if backend == "triton":
        reason = "the Triton kernel is forward-only (no backward for training)" if grad else None
        reason = reason or triton_usable(q.device, q.dtype, head_dim)
        if reason:
            raise AttentionInputError(f"backend 'triton' cannot run here: {reason}; use 'auto', 'flex' or 'portable'")
        cfg = triton_block_sparse.launch_config(head_dim, q.device)
        schedule = pattern.block_schedule(cfg.block_m, cfg.block_n, q.device)
        return triton_block_sparse.block_sparse_attention(
            q, k, v, schedule, scale, out, num_warps=cfg.num_warps, num_stages=cfg.num_stages, kv_tma=cfg.kv_tma
        )
    if backend == "flex":
        reason = flex_usable(q.device, head_dim, grad)
        if reason:
            raise AttentionInputError(f"backend 'flex' cannot run here: {reason}; use 'auto' or 'portable'")
        schedule = pattern.block_schedule(flex.BLOCK, flex.BLOCK, q.device)
        result = flex.flex_block_sparse_attention(q, k, v, schedule, scale, backward=grad)
    else:
        schedule = pattern.block_schedule(128, 128, q.device)
        result = portable.portable_block_sparse_attention(q, k, v, schedule, scale)
    if out is None:
        return result
    out.copy_(result)
    return out
