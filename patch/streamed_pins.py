"""Page-lock again the weights ComfyUI streams each step when a dropped clone has unpinned them.

Why: with its legacy loader (ComfyUI 0.29 with DynamicVRAM off: AMD, Intel, WSL, ``--disable-dynamic-vram``),
ComfyUI streams the layers that do not fit on the card every step and page-locks their weights
(``cudaHostRegister``), so that the copies overlap the compute. Every clone of a model shares one set of pinned
weights, and a clone's ``__del__`` unpins all of them (``ModelPatcher.unpin_all_weights``) while the model stays
partially loaded; the next load skips the layers already streamed ("already lowvramed") and never pins them again.
The copies then come from pageable memory, and the host waits for each: measured on an emulated 12 GB card, bf16,
2048², 2.75 s a step after a dense run's clone was dropped, against 0.60 s with the weights pinned, all 13.2 GiB
streamed unpinned (``bench/vram_cards.py --profile host``). At a run's first model call this pins what ComfyUI's own
loader pins, through its own ``pin_weight_to_device`` (its pinned-memory budget and bookkeeping, so it unpins them
itself when it unloads the model). ComfyUI 0.3.64 pins nothing, and DynamicVRAM pins its own way: both left alone.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from comfy.model_patcher import ModelPatcher

log = logging.getLogger("UltraGen")


def streamed_weights(patcher: ModelPatcher) -> dict[str, torch.Tensor]:
    """The host-resident parameters of the layers ComfyUI's legacy loader streams (it marks each such layer with
    ``prev_comfy_cast_weights``), by ComfyUI's key (``"<module path>.<parameter>"``)."""
    found = {}
    for name, module in patcher.model.named_modules():
        if hasattr(module, "prev_comfy_cast_weights"):
            for param_name, param in module.named_parameters(recurse=False):
                if param.device.type == "cpu":
                    found[f"{name}.{param_name}" if name else param_name] = param
    return found


def repin_streamed_weights(patcher: ModelPatcher) -> int:
    """Pin, as ComfyUI's loader does, the streamed weights that are not page-locked; returns the bytes pinned."""
    if not hasattr(patcher, "pin_weight_to_device") or not torch.cuda.is_available():
        return 0  # a ComfyUI that pins nothing (0.3.64), or no CUDA
    if getattr(patcher, "is_dynamic", lambda: False)() or not getattr(patcher.model, "model_lowvram", False):
        return 0  # DynamicVRAM's own pinning, or nothing streamed
    pinned = 0
    for key, param in streamed_weights(patcher).items():
        if key not in patcher.pinned:  # ComfyUI's pin_memory itself skips memory page-locked already
            patcher.pin_weight_to_device(key)
            pinned += param.nbytes if key in patcher.pinned else 0
    if pinned:
        log.info(
            f"UltraGen: page-locked {pinned / 2**30:.1f} GiB of streamed weights that ComfyUI had unpinned (a "
            "dropped clone of the model unpins them), so that their copies overlap the compute again"
        )
    return pinned
