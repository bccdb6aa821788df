"""Free GPU memory as ComfyUI's own sampler and VAE read it, for the patch's memory choices (slice sizes of the
chunked blocks, where the exact VAE keeps its activations and how large its bands are).

Why: with DynamicVRAM (ComfyUI 0.29 and newer, on by default on NVIDIA) comfy-aimdo keeps as many weights on the
card as fit and gives their memory back on demand, so CUDA's free memory (``model_management.get_free_memory``) is
low while most of the card is in fact available. ComfyUI's sampler batching and VAE ask their model patcher
(``ModelPatcher.get_free_memory``), which adds what comfy-aimdo can give back; reading only CUDA's figure, the patch
would pick the smallest slices and keep the exact VAE's activations in system memory on exactly the setup most
artists run. Without DynamicVRAM both readings are the same.
"""

from __future__ import annotations

import comfy.model_management
import torch

from ..gpu_start import dynamic_vram_on


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device`` for the patch's temporaries: ComfyUI's free memory, plus (DynamicVRAM) what
    comfy-aimdo gives back on demand — what ``ModelPatcher.get_free_memory`` returns in ComfyUI 0.29."""
    free = comfy.model_management.get_free_memory(device)
    if not dynamic_vram_on():
        return free
    import comfy_aimdo.model_vbar

    return free + comfy_aimdo.model_vbar.vbars_analyze(device.index if device.type == "cuda" else None)
