"""One entry point for block-sparse attention, and the choice of backend.

Why: callers (the FLUX patch, benchmarks, tests) say *what* to compute (q, k, v and a sparsity
pattern) and optionally *how* (a backend name); this module checks the inputs, picks the first
backend in preference order that can run the call, and builds or fetches the schedule for that
backend's tile shape. Under ``auto`` a Triton kernel that fails to compile or launch on this GPU is
warned once and the next backend takes over (``triton_block_sparse.GUARD``).

A backend is a module with ``NAME``, ``AUTO_DEVICES`` (the device types ``auto`` may pick it on;
None: any), ``usable(device, dtype, head_dim, training) -> reason or None``, ``tile(device,
head_dim) -> (block_m, block_n)`` and ``run(q, k, v, schedule, scale, out, training)`` (as in
NATTEN's backends). A new backend is one module and one entry in :data:`PREFERENCE`.
"""

from __future__ import annotations

from types import ModuleType

import torch

from . import flex, portable, triton_block_sparse
from .checks import AttentionInputError, check_qkv
from .schedule import SparsityPattern

PREFERENCE: tuple[ModuleType, ...] = (triton_block_sparse, flex, portable)  # what "auto" tries, in order
BACKENDS = ("auto", *(b.NAME for b in PREFERENCE))


def needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd will differentiate through attention of these inputs (training)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _backend(name: str) -> ModuleType:
    for b in PREFERENCE:
        if b.NAME == name:
            return b
    raise AttentionInputError(f"backend must be one of {BACKENDS}, got {name!r}")


def choose_backend(
    device: torch.device | str, dtype: torch.dtype | None = None, head_dim: int | None = None, grad: bool = False
) -> str:
    """The first backend of :data:`PREFERENCE` that runs these inputs on this device: the Triton kernel,
    else flex_attention on CUDA, else portable SDPA.

    ``grad``: the result will be differentiated; the Triton kernel is forward-only, so training takes
    flex (whose compiled kernels have a backward) or portable SDPA.
    """
    device = torch.device(device)
    for b in PREFERENCE:
        here = b.AUTO_DEVICES is None or device.type in b.AUTO_DEVICES
        if here and b.usable(device, dtype, head_dim, grad) is None:
            return b.NAME
    return portable.NAME


def describe_backend(device: torch.device | str | None = None) -> str:
    """A one-line description of what ``auto`` will use, for the load-time log line."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type != "cuda":
        return f"portable SDPA on {device.type.upper()} (no CUDA GPU)"
    where = torch.cuda.get_device_name(device)
    name = choose_backend(device)
    if name == triton_block_sparse.NAME:
        import triton

        return f"triton block-sparse kernel on {where} (Triton {triton.__version__})"
    why = triton_block_sparse.usable(device, None, None, False)
    return f"{'flex_attention' if name == flex.NAME else 'portable SDPA'} on {where} ({why})"


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
    transposed, the layout ComfyUI wants, or q itself: each query tile is read before its rows
    are written); the Triton kernel writes it directly. When autograd will differentiate the
    result (training), ``auto`` skips the forward-only Triton kernel.
    """
    if backend not in BACKENDS:
        raise AttentionInputError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_qkv(q, k, v, pattern.seq_len)
    head_dim = q.shape[-1]
    scale = head_dim**-0.5 if scale is None else float(scale)
    training = needs_grad(q, k, v)
    name = choose_backend(q.device, q.dtype, head_dim, training) if backend == "auto" else backend
    chosen = _backend(name)
    reason = chosen.usable(q.device, q.dtype, head_dim, training)
    if reason:
        others = ", ".join(repr(n) for n in BACKENDS if n != name)
        raise AttentionInputError(f"backend {name!r} cannot run here: {reason}; use one of {others}")

    def run_on(b: ModuleType) -> torch.Tensor:
        schedule = pattern.block_schedule(*b.tile(q.device, head_dim), q.device)
        return b.run(q, k, v, schedule, scale, out, training)

    def run_on_next(_: ModuleType) -> torch.Tensor:  # the kernel failed on this GPU: "auto" chooses again
        return run_on(_backend(choose_backend(q.device, q.dtype, head_dim, training)))

    if backend == "auto" and chosen is triton_block_sparse:
        return triton_block_sparse.GUARD.run(run_on, run_on_next, chosen)
    return run_on(chosen)
