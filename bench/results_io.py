"""What every benchmark records about its run, and where it writes its JSON.

Results go to ``bench/results/<name>.json`` unless a benchmark is given ``--out``. Importing
this also makes the tests' helpers importable (``random_models``: FLUX-architecture models with
random weights, built by ComfyUI), which live with the tests, outside the installed package.
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def comfyui_on_gpu(script: str, explicit: str | None = None, dynamic_vram: bool = False) -> None:
    """Exit with a message unless there is a CUDA GPU and a ComfyUI; then import ComfyUI for the GPU
    (``dynamic_vram``: with DynamicVRAM switched on as its main.py does, whatever main.py's own rule says)."""
    from ultragen.comfy_env import find_comfyui, import_comfyui
    from ultragen.gpu_start import dynamic_vram_on

    if not torch.cuda.is_available():
        sys.exit(f"bench/{script} needs a CUDA GPU")
    path = find_comfyui(explicit)
    if path is None:
        sys.exit(f"bench/{script} needs ComfyUI: set COMFYUI_PATH=/path/to/ComfyUI")
    import_comfyui(path, cpu=False, dynamic_vram=dynamic_vram or None)
    if dynamic_vram and not dynamic_vram_on():
        sys.exit("DynamicVRAM did not start: it needs ComfyUI 0.29 or newer with a working comfy-aimdo")


def run_info() -> dict:
    """Device, library versions (ComfyUI's too, where one is imported) and time of this run."""
    from ultragen.comfy_env import comfyui_version

    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "comfyui": comfyui_version(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def write_json(name: str, result: dict, path: str | None = None) -> Path:
    """Write ``result``; returns the path written."""
    out = Path(path) if path else Path(__file__).parent / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return out
