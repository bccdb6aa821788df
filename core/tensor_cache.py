"""``tensor_cache``: ``functools.lru_cache`` for functions that build tensors kept across calls.

Why: ComfyUI samples under ``torch.inference_mode()``, and a tensor made there is an *inference
tensor* for good. Cached tables and schedules outlive the call that built them; when a later call
differentiates through them (training the guidance LoRA, flex_attention's backward, which saves its
mask's tensors), PyTorch refuses: "Inference tensors cannot be saved for backward" (seen on CUDA,
a gradient test run after inference-mode tests). Building outside inference mode costs nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def tensor_cache(maxsize: int) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """An ``lru_cache(maxsize)`` whose function always runs outside inference mode (keeps ``cache_info`` /
    ``cache_clear``)."""

    def decorate(build: Callable[..., T]) -> Callable[..., T]:
        @functools.lru_cache(maxsize=maxsize)
        @functools.wraps(build)
        def cached(*args, **kwargs) -> T:
            with torch.inference_mode(False):
                return build(*args, **kwargs)

        return cached

    return decorate
