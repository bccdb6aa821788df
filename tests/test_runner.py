"""``ultragen-run``: declared options worked out by hand on the shipped files, and runs in ComfyUI's real
executor on tiny models (loaders swapped as in test_workflows.py): images saved, missing files named
before anything loads, Ctrl-C cancelling."""

from __future__ import annotations

import io
import json
import signal
from pathlib import Path

import pytest

from ultragen.runner.declared import RunError, apply_options, load_workflow

ROOT = Path(__file__).resolve().parents[1]
API = ROOT / "workflows" / "api"


def by_type(prompt: dict, class_type: str) -> list[dict]:
    return [n["inputs"] for n in prompt.values() if n["class_type"] == class_type]


def test_options_set_what_each_workflow_declares():
    prompt, declared = load_workflow(API / "flux_4k_from_1k.api.json")
    out = apply_options(prompt, declared, {"prompt": "a fox", "seed": 7, "width": 4096, "height": 2048}, [], "4k")
    assert by_type(out, "CLIPTextEncode")[0]["text"] == "a fox"
    assert by_type(out, "KSampler")[0]["seed"] == 7 and by_type(out, "RandomNoise")[0]["noise_seed"] == 8
    base = by_type(out, "EmptyLatentImage")[0]
    assert (base["width"], base["height"]) == (1024, 512)  # the 1K base keeps the final image's shape
    for node in by_type(out, "UltraGenLowResGuidanceEncode") + by_type(out, "UltraGenWarmStartLatent"):
        assert (node["target_width"], node["target_height"]) == (4096, 2048)
    assert prompt != out and by_type(prompt, "KSampler")[0]["seed"] == 42  # the file itself is untouched

    prompt, declared = load_workflow(API / "flux_8k_recursive.api.json")
    out = apply_options(prompt, declared, {"seed": 100, "width": 8192, "height": 4096}, ["8.steps=12"], "8k")
    assert [n["seed"] for n in by_type(out, "UltraGenRecursiveUpscale")] == [101, 102, 103]
    assert (by_type(out, "EmptyLatentImage")[0]["width"], by_type(out, "EmptyLatentImage")[0]["height"]) == (1024, 512)
    assert out["8"]["inputs"]["steps"] == 12

    prompt, declared = load_workflow(API / "scalediff_4k.api.json")
    out = apply_options(prompt, declared, {"width": 4096, "height": 4096}, [], "scalediff")
    assert [n["target_width"] for n in by_type(out, "UltraGenWarmStartLatent")] == [2048, 4096]

    prompt, declared = load_workflow(API / "flux2_klein_4k_from_1k.api.json")
    out = apply_options(prompt, declared, {"prompt": "a fox", "seed": 7, "width": 4096, "height": 2048}, [], "klein")
    assert by_type(out, "CLIPTextEncode")[0]["text"] == "a fox"
    assert [n["noise_seed"] for n in by_type(out, "RandomNoise")] == [7, 8]  # the 1K base, then the 4K pass
    for node in by_type(out, "EmptyFlux2LatentImage") + by_type(out, "Flux2Scheduler"):
        assert (node["width"], node["height"]) == (1024, 512)  # the 1K base and its schedule keep the shape
    for node in by_type(out, "UltraGenLowResGuidanceEncode") + by_type(out, "UltraGenWarmStartLatent"):
        assert (node["target_width"], node["target_height"]) == (4096, 2048)

    prompt, declared = load_workflow(API / "flux2_klein_8k_recursive.api.json")
    out = apply_options(prompt, declared, {"seed": 100, "width": 8192, "height": 8192}, [], "klein 8k")
    assert [n["seed"] for n in by_type(out, "UltraGenRecursiveUpscale")] == [101, 102, 103]
    assert by_type(out, "EmptyFlux2LatentImage")[0]["width"] == 1024


def test_options_a_workflow_does_not_declare_are_refused(tmp_path):
    plain = tmp_path / "mine.api.json"
    plain.write_text(json.dumps({"1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64}}}))
    prompt, declared = load_workflow(plain)
    assert declared == {}
    with pytest.raises(RunError, match="declares no --width .* --set NODE.INPUT=VALUE"):
        apply_options(prompt, declared, {"width": 1024}, [], "mine.api.json")
    assert apply_options(prompt, declared, {}, ["1.width=128"], "mine")["1"]["inputs"]["width"] == 128
    with pytest.raises(RunError, match="NODE.INPUT=VALUE"):
        apply_options(prompt, declared, {}, ["9.width=1"], "mine")
    prompt, declared = load_workflow(API / "flux_2k_from_1k.api.json")
    with pytest.raises(RunError, match="multiple of 16"):
        apply_options(prompt, declared, {"width": 1000}, [], "2k")
    (tmp_path / "ui.json").write_text(json.dumps({"nodes": [], "version": 0.4}))
    with pytest.raises(RunError, match="not an API-format workflow"):
        load_workflow(tmp_path / "ui.json")


# -- runs in ComfyUI's executor --------------------------------------------------------------


@pytest.fixture
def tiny_loaders(comfyui, monkeypatch):
    """FLUX's loaders replaced by tiny random models; returns the calls they get."""
    import nodes
    from ultragen.runner.local import load_comfyui

    from comfy_flux import TinyCLIP, flux_loaders, flux_vae, tiny_flux

    load_comfyui(None, cpu=True)
    calls = []

    def loaded(make):
        def load(name):
            calls.append(name)
            return make()

        return load

    loaders = flux_loaders(loaded(lambda: tiny_flux(seed=1)), loaded(TinyCLIP), loaded(lambda: flux_vae(seed=2)))
    for key, cls in loaders.items():
        monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, key, cls)
    return calls


def small(name: str, **options) -> dict:
    """A shipped workflow through ultragen-run's options at a CPU-sized 256 px, 4 steps."""
    prompt, declared = load_workflow(API / f"{name}.api.json")
    out = apply_options(prompt, declared, {"width": 256, "height": 256, **options}, [], name)
    for node in out.values():
        if node["class_type"] in ("KSampler", "UltraGenWarmStartLatent"):
            node["inputs"]["steps"] = 4
            if "skip" in node["inputs"]:
                node["inputs"]["skip"] = 1
    return out


def test_a_shipped_workflow_runs_and_saves_its_images(tiny_loaders, model_files, tmp_path):
    from ultragen.runner.local import run

    stream = io.StringIO()
    result = run(small("flux_2k_from_1k", prompt="a fox", seed=3), tmp_path / "out", stream)
    assert result.status == "done", result.message
    assert sorted(p.parent.name for p in result.images) == ["ultragen", "ultragen"]  # the 1K and the 2K image
    assert all(p.suffix == ".png" and p.is_relative_to(tmp_path / "out") for p in result.images)
    shown = stream.getvalue()
    assert "[1/19]" in shown and "Low-res 1K" in shown and "4/4" in shown  # nodes and sampling steps


def test_missing_model_files_are_named_before_anything_loads(tiny_loaders, tmp_path, monkeypatch):
    import folder_paths

    from ultragen.runner.local import run

    for folder in ("diffusion_models", "text_encoders", "vae"):  # no model files anywhere
        monkeypatch.setitem(folder_paths.folder_names_and_paths, folder, ([str(tmp_path / "none")], set()))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})

    with pytest.raises(RunError) as caught:
        run(small("flux_2k_from_1k"), tmp_path / "out", io.StringIO())
    message = str(caught.value)
    for expected in ("models/diffusion_models/flux1-dev.safetensors", "models/text_encoders/t5xxl_fp16.safetensors",
                     "models/vae/ae.safetensors"):  # fmt: skip
        assert expected in message
    assert tiny_loaders == []  # nothing was loaded


def test_ctrl_c_cancels_and_keeps_what_was_saved(tiny_loaders, model_files, tmp_path, monkeypatch):
    import nodes
    from ultragen.runner.local import run

    original = nodes.NODE_CLASS_MAPPINGS["UltraGenLowResGuidanceEncode"]

    class InterruptedHere(original):
        @classmethod
        def execute(cls, *args, **kwargs):
            signal.raise_signal(signal.SIGINT)  # the user presses Ctrl-C while this node runs
            return super().execute(*args, **kwargs)

    monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, "UltraGenLowResGuidanceEncode", InterruptedHere)
    stream = io.StringIO()
    result = run(small("flux_2k_from_1k"), tmp_path / "out", stream)
    assert result.status == "cancelled" and "cancelling" in stream.getvalue()
    assert len(result.images) <= 1  # the 1K image at most; the 2K never started
    assert signal.getsignal(signal.SIGINT) is not None and "cancel" not in repr(signal.getsignal(signal.SIGINT))


@pytest.fixture
def model_files(tmp_path, monkeypatch):
    """Empty files with the workflows' model names, so that ComfyUI's validation finds them (this test only)."""
    import copy

    import folder_paths

    monkeypatch.setattr(folder_paths, "folder_names_and_paths", copy.deepcopy(folder_paths.folder_names_and_paths))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    for folder, names in {"diffusion_models": ["flux1-dev.safetensors"],
                          "text_encoders": ["clip_l.safetensors", "t5xxl_fp16.safetensors"],
                          "vae": ["ae.safetensors"]}.items():  # fmt: skip
        (tmp_path / folder).mkdir()
        for name in names:
            (tmp_path / folder / name).touch()
        folder_paths.add_model_folder_path(folder, str(tmp_path / folder))
    return tmp_path


# -- --server: a ComfyUI started by the test on 127.0.0.1 --------------------------------------


# ComfyUI's main.py, as `python main.py ARGS`. One environment serves every snapshot (the newest one's
# requirements): 0.3.64 would refuse to start because the newer comfyui-workflow-templates package moved its
# templates folder, so a templates folder that does not exist is left unserved (nothing the tests use).
SERVE = """
import os, runpy, sys
sys.argv = sys.argv[1:]
sys.path.insert(0, os.getcwd())
import comfy.options
comfy.options.enable_args_parsing()  # as main.py does first, so that the arguments (--cpu) are read
import app.frontend_management as fm
found = fm.FrontendManager.templates_path
fm.FrontendManager.templates_path = classmethod(lambda cls: (lambda p: p if p and os.path.isdir(p) else None)(found()))
runpy.run_path("main.py", run_name="__main__")
"""


@pytest.fixture(scope="module")
def comfyui_server(comfyui, tmp_path_factory):
    """ComfyUI's own main.py serving on a free port of 127.0.0.1 (CPU), stopped after the module."""
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    from ultragen.comfy_env import find_comfyui

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path_factory.mktemp("server-output")
    log = tmp_path_factory.mktemp("server-log") / "comfyui.log"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    (find_comfyui() / "custom_nodes").mkdir(exist_ok=True)  # 0.3.64 lists it even with custom nodes disabled
    argv = ["main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--output-directory", str(out),
            "--disable-auto-launch", "--disable-all-custom-nodes"]  # fmt: skip
    frontend = (find_comfyui() / "app" / "frontend_management.py").read_text()
    old_templates = "def templates_path" in frontend  # 0.3.64 serves the templates package's old folder
    command = [sys.executable, "-c", SERVE, *argv] if old_templates else [sys.executable, *argv]
    with open(log, "w") as sink:
        server = subprocess.Popen(command, cwd=find_comfyui(), stdout=sink, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                urllib.request.urlopen(url + "/system_stats", timeout=2).read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"ComfyUI did not start:\n{log.read_text()[-3000:]}") from None
                time.sleep(1)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=60)


def test_server_mode_queues_follows_and_fetches_the_images(comfyui_server, tmp_path):
    from ultragen.runner.server import run_on_server

    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 2, "color": 255},
              "_meta": {"title": "A white square"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "run/white"}},
    }  # fmt: skip
    stream = io.StringIO()
    result = run_on_server(prompt, comfyui_server, tmp_path / "out", stream)
    assert result.status == "done", result.message
    assert [p.relative_to(tmp_path / "out").parent.as_posix() for p in result.images] == ["run", "run"]
    from PIL import Image

    with Image.open(result.images[0]) as image:
        assert image.size == (64, 48) and image.getpixel((3, 3))[:3] == (0, 0, 255)  # EmptyImage's color is RGB int
    assert "A white square" in stream.getvalue()


def test_server_mode_names_missing_model_files(comfyui_server, tmp_path):
    from ultragen.runner.server import run_on_server

    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "nope.safetensors"}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 2]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "x"}},
    }
    with pytest.raises(RunError, match=r"(?s)missing model files.*models/checkpoints/nope\.safetensors"):
        run_on_server(prompt, comfyui_server, tmp_path / "out", io.StringIO())
