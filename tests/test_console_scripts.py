"""``ultragen-train`` and ``ultragen-evaluate`` run as a user runs them: a fresh process, the
installed script, a working folder of its own and no COMFYUI_PATH unless the test sets one.

In-process tests cannot see what these see: there, ComfyUI is already imported (with the test
session's arguments) before the command starts, so an import in the wrong place, or in the
wrong order for ``--cpu``, passes them and fails every user.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = {
    "ultragen-train": "ultragen.training.cli", "ultragen-evaluate": "ultragen.evaluation.cli",
    "ultragen-run": "ultragen.runner.cli",
}  # fmt: skip


def run(script: str, args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """The installed console script (``python -m`` its module where it is not installed) in ``cwd``."""
    installed = Path(sys.executable).parent / script
    command = [str(installed)] if installed.is_file() else [sys.executable, "-m", SCRIPTS[script]]
    environ = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    return subprocess.run(
        command + args, cwd=cwd, env={**environ, **env}, capture_output=True, text=True, timeout=300, check=False
    )


def assert_clean_failure(result: subprocess.CompletedProcess, script: str) -> str:
    """A non-zero exit whose last stderr line is the command's one-line message, and no traceback."""
    assert result.returncode != 0, result.stdout
    for sign in ("Traceback", "No module named", "NVIDIA driver"):
        assert sign not in result.stderr, result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith(f"{script}: "), result.stderr
    return message


def train_args(tmp_path: Path, checkpoint: Path) -> list[str]:
    (tmp_path / "data").mkdir(exist_ok=True)
    return ["--checkpoint", str(checkpoint), "--data", str(tmp_path / "data"), "--output-dir", str(tmp_path / "run")]


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_help_needs_no_comfyui(tmp_path, script):
    result = run(script, ["-h"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {script} "), result.stdout
    option = {"ultragen-train": "--checkpoint", "ultragen-evaluate": "--images", "ultragen-run": "--prompt"}[script]
    assert option in result.stdout and "Traceback" not in result.stderr


def test_train_without_comfyui_says_how_to_point_at_one(tmp_path, monkeypatch):
    from ultragen.comfy_env import find_comfyui

    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    if find_comfyui() is not None:
        pytest.skip("this pack sits in a ComfyUI's custom_nodes/, so ultragen-train always finds one")
    checkpoint = tmp_path / "flux.safetensors"
    checkpoint.write_bytes(b"stand-in")
    message = assert_clean_failure(run("ultragen-train", train_args(tmp_path, checkpoint), tmp_path), "ultragen-train")
    assert "ComfyUI not found" in message and "--comfyui" in message and "COMFYUI_PATH" in message


def test_train_with_a_folder_that_is_not_comfyui_says_so(tmp_path):
    checkpoint = tmp_path / "flux.safetensors"
    checkpoint.write_bytes(b"stand-in")
    args = train_args(tmp_path, checkpoint) + ["--comfyui", str(tmp_path), "--cpu"]
    message = assert_clean_failure(run("ultragen-train", args, tmp_path), "ultragen-train")
    assert f"--comfyui {tmp_path} is not a ComfyUI folder" in message


@pytest.mark.parametrize("found_by", ["--comfyui", "COMFYUI_PATH", "ComfyUI's folder"])
def test_train_gets_past_comfyui_on_cpu_and_names_a_bad_checkpoint(tmp_path, comfyui, found_by):
    """A file that is not a model: ComfyUI imports (CPU mode, on a machine without a GPU), then
    the checkpoint check fails in one line that names the file and what to pass instead."""
    checkpoint = tmp_path / "flux1-dev.safetensors"
    checkpoint.write_bytes(b"<html>not a model</html>")
    args = train_args(tmp_path, checkpoint) + ["--cpu"]
    if found_by == "--comfyui":
        result = run("ultragen-train", args + ["--comfyui", str(comfyui)], tmp_path)
    elif found_by == "COMFYUI_PATH":
        result = run("ultragen-train", args, tmp_path, COMFYUI_PATH=str(comfyui))
    else:  # run from ComfyUI's folder, the pack installed elsewhere
        result = run("ultragen-train", args, comfyui)
    message = assert_clean_failure(result, "ultragen-train")
    assert f"the checkpoint {checkpoint} is not a readable .safetensors file" in message, message
    assert "flux1-dev.safetensors" in message and "download it again" in message


def test_train_names_a_checkpoint_comfyui_cannot_load(tmp_path, comfyui):
    """A readable safetensors file that is no diffusion model gets through encoding (FLUX's VAE,
    precomputed captions) and fails where ComfyUI loads it, in one line, without a traceback."""
    from safetensors.torch import save_file

    from comfy_flux import flux_vae

    vae = flux_vae()
    save_file({k: v.contiguous() for k, v in vae.get_sd().items()}, str(tmp_path / "ae.safetensors"))
    checkpoint = tmp_path / "ae_by_mistake.safetensors"
    save_file({"decoder.conv_in.weight": torch.zeros(4, 4)}, str(checkpoint))
    data = tmp_path / "data"
    data.mkdir()
    from PIL import Image

    Image.new("RGB", (128, 128), (200, 30, 60)).save(data / "red.png")
    save_file({"context": torch.zeros(8, 64), "pooled": torch.zeros(32)}, str(data / "red.safetensors"))
    args = train_args(tmp_path, checkpoint) + ["--vae", str(tmp_path / "ae.safetensors"), "--size", "128"]
    result = run("ultragen-train", args + ["--window", "4", "--cpu", "--comfyui", str(comfyui)], tmp_path)
    message = assert_clean_failure(result, "ultragen-train")
    assert message.startswith(f"ultragen-train: could not load the checkpoint {checkpoint}: "), message
    assert "flux1-dev.safetensors" in message
    assert (data / ".ultragen_cache").is_dir()  # it failed at the model, after encoding
