"""Test setup: Triton's interpreter on machines without a GPU, and the real ComfyUI on demand."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Must be set before Triton kernels are defined (at import of ultragen.kernels).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ultragen.comfy_env import PACK_ROOT, find_comfyui, import_comfyui

HOW_TO_ENABLE = (
    "ComfyUI integration tests need a real ComfyUI: set COMFYUI_PATH=/path/to/ComfyUI "
    "(a checkout whose requirements.txt is installed in this environment), or run the "
    "tests from the pack installed in ComfyUI/custom_nodes/"
)

__all__ = ["PACK_ROOT"]


@pytest.fixture(scope="session")
def comfyui() -> Path:
    """Import the real ComfyUI (CPU mode when there is no GPU); skip with instructions if absent."""
    path = find_comfyui()
    if path is None:
        pytest.skip(HOW_TO_ENABLE)
    try:
        import_comfyui(path, cpu=not torch.cuda.is_available())
    except ImportError as exc:
        pytest.skip(f"ComfyUI at {path} does not import ({exc}); install its requirements.txt. {HOW_TO_ENABLE}")
    return path


@pytest.fixture(scope="session")
def comfy_nodes(comfyui):
    """ComfyUI's nodes module (samplers); it needs all of ComfyUI's requirements, PyAV included."""
    try:
        import nodes
    except ImportError as exc:
        pytest.skip(f"ComfyUI's nodes.py does not import here ({exc}); install ComfyUI's requirements.txt")
    return nodes
