"""ComfyUI's GPU start-up as its main.py does it, for processes that import ComfyUI without main.py
(``ultragen-run``'s in-process runs, the benchmarks' DynamicVRAM, and every GPU import for the flag below;
``comfy_env.import_comfyui`` calls them).

Why: before any model loads, main.py makes two choices that decide how much fits a card and how weights
stream: PyTorch's allocator (its ``cuda_malloc.py``: ``backend:cudaMallocAsync`` on most NVIDIA setups, set
before torch loads, because PyTorch fixes its allocator backend then) and, from ComfyUI 0.29, DynamicVRAM
(comfy-aimdo loads weights on demand; on by default on NVIDIA with torch >= 2.8, not under WSL). A process
that skips them runs another memory configuration than the artist's ComfyUI: on an emulated 12 GB card an
8192² FLUX step that runs with ComfyUI's choices ran out of memory in its second step with PyTorch's native
allocator and DynamicVRAM (H200, 2026-12-02, ``bench/vram_cards.py``). ComfyUI 0.29's layers also read
``args.cuda_malloc`` (per-stream cast buffers only without cudaMallocAsync), so that flag has to match the
allocator PyTorch really runs.

Each function is one step of main.py, in main.py's order: :func:`choose_allocator` and
:func:`prepare_dynamic_vram` with ComfyUI's arguments parsed but before ``comfy.model_management`` loads,
:func:`match_cast_buffers_to_allocator` and :func:`enable_dynamic_vram` after.
"""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path

log = logging.getLogger("UltraGen")


def choose_allocator(comfyui: Path) -> bool:
    """ComfyUI's choice of PyTorch allocator: its own ``cuda_malloc.py`` run, which sets
    ``PYTORCH_CUDA_ALLOC_CONF`` (and ``args.cuda_malloc``). Only while torch is not loaded yet (later, PyTorch
    would refuse the setting when CUDA starts); whether it ran."""
    if "torch" in sys.modules or not (comfyui / "cuda_malloc.py").is_file():
        return False
    importlib.import_module("cuda_malloc")
    return True


def dynamic_vram_on() -> bool:
    """Whether the imported ComfyUI loads models through DynamicVRAM (comfy-aimdo; ComfyUI 0.29 and newer), whoever
    switched it on (main.py, :func:`enable_dynamic_vram`)."""
    return bool(getattr(sys.modules.get("comfy.memory_management"), "aimdo_enabled", False))


def match_cast_buffers_to_allocator() -> None:
    """``args.cuda_malloc`` true exactly when PyTorch runs cudaMallocAsync, as main.py leaves it."""
    import torch
    from comfy.cli_args import args

    args.cuda_malloc = torch.cuda.get_allocator_backend() == "cudaMallocAsync"


def prepare_dynamic_vram(force: bool = False) -> bool:
    """main.py's first DynamicVRAM step: comfy-aimdo initialised where ComfyUI's arguments allow DynamicVRAM
    (``force``: regardless, as ``--enable-dynamic-vram``); whether it was (False on ComfyUI before 0.29 or
    without comfy-aimdo)."""
    try:
        import comfy_aimdo.control
        from comfy.cli_args import args, enables_dynamic_vram
    except ImportError:
        return False
    if not (force or enables_dynamic_vram()):
        return False
    try:
        headroom = None if args.reserve_vram is None else int(args.reserve_vram * 1024**3)
        comfy_aimdo.control.init(simple_vram_headroom=headroom)
    except TypeError:  # comfy-aimdo 0.4.9's protocol
        comfy_aimdo.control.init()
    return True


def enable_dynamic_vram(force: bool = False) -> bool:
    """main.py's second DynamicVRAM step, after ``comfy.model_management`` loaded: on an NVIDIA GPU (not WSL,
    torch >= 2.8; ``force``: on any, as ``--enable-dynamic-vram``) the devices are handed to comfy-aimdo and
    ComfyUI's models load through DynamicVRAM's patcher; whether DynamicVRAM is on. Call only where
    :func:`prepare_dynamic_vram` returned True."""
    import comfy.memory_management
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy_aimdo.control
    from comfy.cli_args import args

    force = force or args.enable_dynamic_vram
    if not force and not (mm.is_nvidia() and not mm.is_wsl()):
        return False
    if not force and mm.torch_version_numeric < (2, 8):
        log.warning("UltraGen: DynamicVRAM needs PyTorch 2.8 or later; ComfyUI's legacy loader runs (as in ComfyUI)")
        return False
    devices = mm.get_all_torch_devices()
    try:
        started = comfy_aimdo.control.init_devices((d.index, int(args.vram_headroom * 1024**3)) for d in devices)
    except TypeError:  # comfy-aimdo 0.4.9's protocol
        started = comfy_aimdo.control.init_devices(d.index for d in devices)
    if not started:
        log.warning("UltraGen: comfy-aimdo did not start; ComfyUI's legacy loader runs (as in ComfyUI)")
        return False
    match_aimdo_log_level()
    comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
    comfy.memory_management.aimdo_enabled = True
    log.info("UltraGen: DynamicVRAM enabled, as ComfyUI's main.py does")
    return True


# ComfyUI's console log levels and comfy-aimdo's setters for them, as main.py pairs them (other levels: info).
AIMDO_LOG_SETTERS = {"DEBUG": "set_log_debug", "DETAIL": "set_log_detail", "CRITICAL": "set_log_critical",
                     "ERROR": "set_log_error", "WARNING": "set_log_warning"}  # fmt: skip


def match_aimdo_log_level() -> None:
    """comfy-aimdo logs at ComfyUI's console level, as main.py sets it once the devices started: left at its own
    level, comfy-aimdo wrote a line for every allocation and free (1.5 MB of log in a minute of sampling, measured
    on the H200 2026-12-02)."""
    import comfy.cli_args as cli
    import comfy_aimdo.control

    level = cli.get_console_log_level(cli.args.verbose) if hasattr(cli, "get_console_log_level") else "INFO"
    setter = getattr(comfy_aimdo.control, AIMDO_LOG_SETTERS.get(level, "set_log_info"), None)
    (setter or comfy_aimdo.control.set_log_info)()
