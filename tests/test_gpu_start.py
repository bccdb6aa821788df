"""gpu_start: ComfyUI's start-up choices as its main.py makes them, checked against ComfyUI's own code run the way
main.py runs it (each in a fresh process: the allocator can only be chosen before torch loads)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# ComfyUI's arguments parsed as main.py parses them, then one step; prints the allocator setting that results.
PRELUDE = """
import os, sys
comfyui = sys.argv[1]
sys.path.insert(0, comfyui)
import utils, comfy.options
comfy.options.enable_args_parsing()
sys.argv = ["main.py"]
import comfy.cli_args
"""
AS_MAIN_PY = PRELUDE + "import cuda_malloc\nprint(os.environ.get('PYTORCH_CUDA_ALLOC_CONF'), 'torch' in sys.modules)\n"
AS_PACK = (
    PRELUDE
    + """
from pathlib import Path
from ultragen import gpu_start
{before}
chose = gpu_start.choose_allocator(Path(comfyui))
print(os.environ.get('PYTORCH_CUDA_ALLOC_CONF'), 'torch' in sys.modules, chose)
"""
)


def _run(code: str, comfyui: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF",)}
    out = subprocess.run([sys.executable, "-c", code, str(comfyui)], env={**environ, **env}, capture_output=True,
                         text=True, timeout=300, check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out


def _python(code: str, comfyui: Path, **env: str) -> str:
    return _run(code, comfyui, **env).stdout.strip().splitlines()[-1]


def test_the_allocator_is_the_one_comfyui_main_py_chooses(comfyui):
    reference = _python(AS_MAIN_PY, comfyui)  # e.g. "backend:cudaMallocAsync False" for torch 2.x+cu130
    assert reference.endswith(" False")  # ComfyUI's choice is made before torch loads
    ours = _python(AS_PACK.format(before=""), comfyui)
    assert ours == f"{reference.split()[0]} False True"  # the same setting, made before torch loaded


def test_no_allocator_setting_once_torch_is_loaded(comfyui):
    # PyTorch fixes its allocator backend when it loads: a later setting would fail at CUDA's start
    ours = _python(AS_PACK.format(before="import torch"), comfyui)
    assert ours == "None True False"


MATCH = """
import sys
from ultragen.comfy_env import import_comfyui
import_comfyui(sys.argv[1], cpu=True)
from comfy.cli_args import args
from ultragen import gpu_start
args.cuda_malloc = not args.cuda_malloc  # whatever parsing left, the step must set it from the allocator
gpu_start.match_cast_buffers_to_allocator()
import torch
print(torch.cuda.get_allocator_backend(), args.cuda_malloc)
"""


@pytest.mark.parametrize("setting, expected", [("backend:cudaMallocAsync", "cudaMallocAsync True"),
                                               ("", "native False")])  # fmt: skip
def test_comfyui_cast_buffer_flag_states_the_allocator_pytorch_runs(comfyui, setting, expected):
    env = {"PYTORCH_CUDA_ALLOC_CONF": setting} if setting else {}
    assert _python(MATCH, comfyui, **env) == expected


DYNAMIC = """
import sys
from ultragen.comfy_env import import_comfyui
import_comfyui(sys.argv[1], cpu=False, like_main=True)
import torch, comfy.model_patcher
mem = sys.modules.get("comfy.memory_management")  # ComfyUI 0.29 and newer (DynamicVRAM); absent in 0.3.64
x = torch.ones(2**20, device="cuda") * 2  # allocations through the allocator comfy-aimdo may log
del x
torch.cuda.synchronize()
print(torch.cuda.get_allocator_backend(), getattr(mem, "aimdo_enabled", None),
      getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher).__name__)  # 0.3.64: none
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (DynamicVRAM starts on NVIDIA only)")
def test_like_main_on_an_nvidia_gpu_starts_what_main_py_starts(comfyui):
    started = _run(DYNAMIC, comfyui)
    backend, aimdo, patcher = started.stdout.strip().splitlines()[-1].split()
    # comfy-aimdo at ComfyUI's console level (INFO), as main.py sets it: not a line per allocation
    assert "VERBOSE" not in started.stdout + started.stderr
    setting = _python(AS_MAIN_PY, comfyui).split()[0]
    assert backend == ("cudaMallocAsync" if setting == "backend:cudaMallocAsync" else "native")
    if Path(comfyui, "comfy", "memory_management.py").is_file():  # ComfyUI 0.29 and newer: main.py's rule
        import comfy.model_management as mm

        expected = mm.is_nvidia() and not mm.is_wsl() and mm.torch_version_numeric >= (2, 8)
        assert (aimdo == "True") == expected and (patcher == "ModelPatcherDynamic") == expected
    else:
        assert patcher == "ModelPatcher"
