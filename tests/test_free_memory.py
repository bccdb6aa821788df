"""patch/free_memory.free_memory against ComfyUI's own reading inside a sampling run and in its VAE
(``ModelPatcher.get_free_memory``, ComfyUI 0.29): with DynamicVRAM, what comfy-aimdo gives back on demand is free;
without it, ComfyUI's free memory alone."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("comfyui")
G = 2**30


def test_without_dynamic_vram_it_is_comfyuis_free_memory(monkeypatch):
    import comfy.model_management as mm

    from ultragen.patch.free_memory import free_memory

    monkeypatch.setattr(mm, "get_free_memory", lambda dev=None, torch_free_too=False: 3 * G)
    assert free_memory(torch.device("cuda", 0)) == 3 * G


def test_with_dynamic_vram_it_is_what_comfyuis_model_patcher_reads(comfyui, monkeypatch):
    import comfy.model_management as mm
    import comfy.model_patcher

    from ultragen.patch.free_memory import free_memory

    monkeypatch.setattr(mm, "get_free_memory", lambda dev=None, torch_free_too=False: 1 * G)
    device = torch.device("cuda", 1)
    if not Path(comfyui, "comfy", "memory_management.py").is_file():  # ComfyUI 0.3.64: no DynamicVRAM to count
        assert "comfy.memory_management" not in sys.modules and free_memory(device) == 1 * G
        return
    import comfy.memory_management
    import comfy_aimdo.model_vbar

    asked = []
    monkeypatch.setattr(comfy.memory_management, "aimdo_enabled", True)
    monkeypatch.setattr(comfy_aimdo.model_vbar, "vbars_analyze", lambda device=None: asked.append(device) or 5 * G)
    reference = comfy.model_patcher.ModelPatcher.get_free_memory(None, device)  # ComfyUI's own (self unused)
    assert free_memory(device) == reference == 6 * G
    assert asked == [1, 1]  # the same device's weights, both times
