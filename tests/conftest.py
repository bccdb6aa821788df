"""Test setup: Triton's interpreter on machines without a GPU, and the real ComfyUI on demand."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# Must be set before Triton kernels are defined (at import of ultragen.kernels).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

PACK_ROOT = Path(__file__).resolve().parents[1]
HOW_TO_ENABLE = (
    "ComfyUI integration tests need a real ComfyUI: set COMFYUI_PATH=/path/to/ComfyUI "
    "(a checkout whose requirements.txt is installed in this environment), or run the "
    "tests from the pack installed in ComfyUI/custom_nodes/"
)


def find_comfyui() -> Path | None:
    """COMFYUI_PATH, else the ComfyUI this pack is installed in (../..), else None."""
    candidates = [os.environ.get("COMFYUI_PATH"), PACK_ROOT.parent.parent]
    for c in candidates:
        if c and (Path(c) / "comfy" / "model_patcher.py").is_file() and (Path(c) / "nodes.py").is_file():
            return Path(c).resolve()
    return None


@pytest.fixture(scope="session")
def comfyui() -> Path:
    """Import the real ComfyUI (CPU mode when there is no GPU); skip with instructions if absent."""
    path = find_comfyui()
    if path is None:
        pytest.skip(HOW_TO_ENABLE)
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        argv, sys.argv = sys.argv, ["main.py"] + ([] if torch.cuda.is_available() else ["--cpu"])
        try:
            import comfy.cli_args  # noqa: F401  (parses sys.argv once)
            import comfy.model_management  # noqa: F401
        finally:
            sys.argv = argv
    except ImportError as exc:
        pytest.skip(f"ComfyUI at {path} does not import ({exc}); install its requirements.txt. {HOW_TO_ENABLE}")
    return path
