"""Using ComfyUI from outside ComfyUI: tests, benchmarks and command-line tools.

Why: inside ComfyUI the pack is imported by ComfyUI itself. Everything else (pytest,
``bench/``, ``ultragen-train``) must find a ComfyUI checkout, put it on ``sys.path`` and
import it with its argument parser primed (``--cpu`` where there is no GPU), exactly once,
and say plainly what is missing when that fails.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

from . import gpu_start
from .errors import UltraGenError

PACK_ROOT = Path(__file__).resolve().parent


class ComfyUINotUsable(UltraGenError, ImportError):
    """A ComfyUI was found but cannot be imported in this Python; the message says what to install."""


def comfyui_version() -> str:
    """The version of the ComfyUI imported in this process ("unknown" for checkouts without
    ``comfyui_version.py``, "none" when no ComfyUI is on the path)."""
    try:
        from comfyui_version import __version__
    except ImportError:
        return "unknown" if "comfy" in sys.modules else "none"
    return str(__version__)


def find_comfyui(explicit: str | os.PathLike | None = None) -> Path | None:
    """``explicit``, else $COMFYUI_PATH, else the ComfyUI this pack sits in (../..), else the current
    folder when it is a ComfyUI (a command run from ComfyUI's folder), else None."""
    for candidate in (explicit, os.environ.get("COMFYUI_PATH"), PACK_ROOT.parent.parent, Path.cwd()):
        if candidate:
            path = Path(candidate)
            if (path / "comfy" / "model_patcher.py").is_file() and (path / "nodes.py").is_file():
                return path.resolve()
    return None


def import_comfyui(path: str | os.PathLike, cpu: bool, also: tuple[str, ...] = (), like_main: bool = False,
                   dynamic_vram: bool | None = None) -> None:  # fmt: skip
    """Put ComfyUI at ``path`` on sys.path and import its core once (``cpu``: no GPU use), then
    the modules named in ``also`` (e.g. ``comfy.sd``, which needs all of ComfyUI's requirements).

    On a GPU, ``like_main`` also makes main.py's start-up choices (PyTorch's allocator while torch is not yet
    loaded, DynamicVRAM where ComfyUI enables it: ``gpu_start.py``), so that the GPU is used as the artist's
    ComfyUI uses it; ``dynamic_vram`` True / False switches DynamicVRAM on / off whatever main.py's rule says
    (a benchmark's choice; ComfyUI 0.29 and newer). ComfyUI's ``args.cuda_malloc`` always states the allocator
    PyTorch runs.

    Raises :class:`ComfyUINotUsable` naming the missing module when ComfyUI's requirements
    are not installed in this Python.
    """
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    try:
        if (Path(path) / "utils" / "__init__.py").is_file():
            # As ComfyUI's main.py does first: once nodes.py puts comfy/ at the front of sys.path,
            # ``import utils`` would find comfy/utils.py instead of this package.
            importlib.import_module("utils")
        import comfy.options

        comfy.options.enable_args_parsing()
        argv, sys.argv = sys.argv, ["main.py"] + (["--cpu"] if cpu else [])
        starts = not cpu and "comfy.model_management" not in sys.modules  # the GPU's start-up, once a process
        try:
            import comfy.cli_args  # noqa: F401  (parses sys.argv once)

            forced = bool(dynamic_vram)  # True: on whatever main.py's rule says; None: the rule, under like_main
            dynamic = False
            if starts:  # main.py's order: the allocator, comfy-aimdo, then model management
                if like_main:
                    gpu_start.choose_allocator(Path(path))
                if forced or (dynamic_vram is None and like_main):
                    dynamic = gpu_start.prepare_dynamic_vram(force=forced)
            import comfy.model_management  # noqa: F401
        finally:
            sys.argv = argv
        if starts:
            gpu_start.match_cast_buffers_to_allocator()
        if dynamic:
            gpu_start.enable_dynamic_vram(force=forced)
        for module in also:
            importlib.import_module(module)
    except ImportError as exc:
        raise ComfyUINotUsable(
            f"ComfyUI at {path} does not import in this Python ({exc}): install its requirements here, "
            f"e.g. `{sys.executable} -m pip install torch torchvision -r {Path(path) / 'requirements.txt'}`"
        ) from exc
