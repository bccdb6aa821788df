"""Where Triton kernels can run: on CUDA devices, and anywhere under Triton's CPU interpreter.

Why a module: every kernel here chooses between its Triton path and a PyTorch one by the same
rule; the tests rely on ``TRITON_INTERPRET=1`` to run the Triton paths on machines without a GPU.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
except ImportError:  # pragma: no cover - machines without Triton
    triton = None


def interpreting() -> bool:
    """Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_runs_on(device: torch.device) -> bool:
    """Triton is installed and can run a kernel on tensors of ``device``."""
    return triton is not None and (device.type == "cuda" or interpreting())
