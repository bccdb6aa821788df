"""What one sampling run of the patched FLUX keeps, from its first model call to its end.

Why a run lifetime: the plans of each image size (token order, float32 ids, guidance tokens
and their noise), the attention layouts and the warnings already given are reused by every
step of a run, and must not outlive it. Stored on the patch object that every clone shares,
they leaked across runs (NPA's offsets advanced, so a re-queued workflow gave another image).
As in ComfyUI's ``comfy_extras/nodes_easycache.py``, an OUTER_SAMPLE wrapper creates the run
in the sampler's own copy of the model options and drops it in ``finally``; everything random
in it is drawn from the run's sampling seed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, TypeVar

from ..core import cached
from .options import Guidance

if TYPE_CHECKING:
    from comfy.model_patcher import ModelPatcher

log = logging.getLogger("UltraGen")
T = TypeVar("T")


class PatchRun:
    """One sampling run: its seed, its guidance, the ModelPatcher it samples (None for model calls outside a
    sampler), and what its calls build once and reuse."""

    def __init__(self, seed: int, guidance: Guidance | None, model_patcher: ModelPatcher | None = None):
        self.seed = seed
        self.guidance = guidance
        self.model_patcher = model_patcher
        self._built: dict[Hashable, object] = {}
        self._warned: set[str] = set()

    def reuse(self, key: Hashable, build: Callable[[], T]) -> T:
        """``build()``'s result, built on the first request for ``key`` in this run."""
        if key not in self._built:
            self._built[key] = build()
        return self._built[key]

    def warn_once(self, key: str, message: str) -> None:
        """Log ``message`` the first time ``key`` comes up in this run."""
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)

    def close(self) -> None:
        """Drop everything built (tensors on the GPU included), and the layout tables and tile schedules the
        run's attention cached (``core.cached``)."""
        self._built.clear()
        cached.release()
