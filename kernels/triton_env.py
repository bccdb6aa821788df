"""Where Triton kernels can run (on CUDA devices, and anywhere under Triton's CPU interpreter), and what
happens where one fails there (:class:`KernelGuard`).

Why a module: every kernel here chooses between its Triton path and a PyTorch one by the same
rules; the tests rely on ``TRITON_INTERPRET=1`` to run the Triton paths on machines without a GPU.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TypeVar

import torch

from ..errors import UltraGenError

try:
    import triton
except ImportError:  # pragma: no cover - machines without Triton
    triton = None

log = logging.getLogger("UltraGen")
T = TypeVar("T")


def interpreting() -> bool:
    """Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_runs_on(device: torch.device) -> bool:
    """Triton is installed and can run a kernel on tensors of ``device``."""
    return triton is not None and (device.type == "cuda" or interpreting())


class KernelGuard:
    """One Triton kernel's failure on this machine, kept for the process.

    Why: a kernel can fail to compile or launch on an artist's GPU (a Triton build without that architecture, an
    older driver) where PyTorch's operations compute the same values; stopping every sampling run there would lose
    the image. The first failure is warned once and PyTorch's path taken from then on. Running out of memory and
    the pack's own input errors (``UltraGenError``: what the caller must change) are not kernel failures: raised.
    Every guard is listed in :data:`GUARDS` (the tests check that none failed: a fallback would otherwise hide a
    kernel's bug).
    """

    def __init__(self, what: str):
        self.what = what
        self.failure: str | None = None
        GUARDS.append(self)

    @property
    def usable(self) -> bool:
        return self.failure is None

    def run(self, kernel: Callable[..., T], fallback: Callable[..., T], *args, **kwargs) -> T:
        """``kernel(*args, **kwargs)``; ``fallback(...)`` where it fails (the first time, with a warning) and once
        it has failed."""
        if self.failure is not None:
            return fallback(*args, **kwargs)
        try:
            return kernel(*args, **kwargs)
        except (torch.cuda.OutOfMemoryError, UltraGenError):
            raise
        except Exception as exc:
            self.failure = f"{type(exc).__name__}: {exc}"
            log.warning("UltraGen: the %s failed on this GPU (%s); using PyTorch's operations instead (same result, "
                        "slower)", self.what, self.failure)  # fmt: skip
            return fallback(*args, **kwargs)


GUARDS: list[KernelGuard] = []
