"""Fast Save Image against ComfyUI's own Save Image, both run by the real executor on the same image: the same
pixels, the same embedded prompt and workflow (none with --disable-metadata), file names counted the same way,
and the UI's image list."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.usefixtures("comfyui")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def folders(tmp_path, monkeypatch):
    """Input and output folders of their own, with a photo-like input image (gradients and noise)."""
    import folder_paths

    sys.path.insert(0, str(ROOT / "workflows"))
    import build

    build.load_node_registry(build.HERE.parent)
    for name in ("input", "output"):
        (tmp_path / name).mkdir()
    monkeypatch.setattr(folder_paths, "input_directory", str(tmp_path / "input"))
    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path / "output"))
    g = np.random.default_rng(0)
    y, x = np.mgrid[0:150, 0:211]
    photo = np.stack([x * 1.2, y * 1.7, (x + y) * 0.7], axis=-1) + g.normal(0, 6, (150, 211, 3))
    Image.fromarray(np.clip(photo, 0, 255).astype(np.uint8)).save(tmp_path / "input" / "photo.png")
    return tmp_path


def run(prompt: dict, extra_pnginfo: dict) -> dict[str, dict]:
    import asyncio

    import execution

    from comfy_flux import RecordingServer, prompt_executor

    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt("test", prompt, None))
    assert valid, (error, node_errors)
    server = RecordingServer()
    executor = prompt_executor(server)
    executor.execute(prompt, "test", {"extra_pnginfo": extra_pnginfo}, outputs)
    assert executor.success, [m for m in server.messages if m[0] == "execution_error"]
    return executor.history_result["outputs"]  # each output node's UI dict, as the history shows it


PROMPT = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
    # bicubic overshoots [0, 1] at edges: the conversion's clip is exercised
    "2": {"class_type": "ImageScaleBy", "inputs": {"image": ["1", 0], "upscale_method": "bicubic", "scale_by": 1.37}},
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "theirs/img"}},
    "4": {"class_type": "UltraGenSaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "ours/img"}},
}
WORKFLOW = {"workflow": {"nodes": [{"id": 4, "type": "UltraGenSaveImage"}], "note": "caf\u00e9"}}


def test_same_file_as_save_image(folders):
    shown = run(PROMPT, WORKFLOW)
    again = json.loads(json.dumps(PROMPT))
    again["2"]["inputs"]["scale_by"] = 0.5  # another image, so that the executor's cache does not skip the savers
    run(again, WORKFLOW)  # the second file of each prefix counts on
    out = folders / "output"
    ours = sorted(p.relative_to(out).as_posix() for p in (out / "ours").rglob("*.png"))
    theirs = sorted(p.relative_to(out).as_posix() for p in (out / "theirs").rglob("*.png"))
    assert ours == [t.replace("theirs", "ours") for t in theirs] == ["ours/img_00001_.png", "ours/img_00002_.png"]
    assert not list(out.rglob("*.part"))
    assert shown["4"]["images"] == [{"filename": "img_00001_.png", "subfolder": "ours", "type": "output"}]
    assert shown["3"]["images"][0]["subfolder"] == "theirs"
    with Image.open(out / ours[0]) as mine, Image.open(out / theirs[0]) as reference:
        assert mine.mode == reference.mode == "RGB" and mine.size == reference.size == (289, 206)
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(reference))
        assert mine.text == reference.text
        assert json.loads(mine.text["prompt"]) == PROMPT and json.loads(mine.text["workflow"]) == WORKFLOW["workflow"]
    size = (out / ours[0]).stat().st_size / (out / theirs[0]).stat().st_size
    assert 0.98 < size < 1.02, size


def test_no_metadata_when_comfyui_is_told_so(folders, monkeypatch):
    from comfy.cli_args import args

    monkeypatch.setattr(args, "disable_metadata", True)
    run(PROMPT, WORKFLOW)
    out = folders / "output"
    with Image.open(out / "ours/img_00001_.png") as mine, Image.open(out / "theirs/img_00001_.png") as reference:
        assert mine.text == reference.text == {}


def test_png_save_benchmark_smoke_run(folders, tmp_path, monkeypatch):
    """bench/png_save.py at a small size: both savers write their files; the row says what each took."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import png_save

    out = tmp_path / "png-save.json"
    png_save.main(["--sizes", "256", "--threads", "2", "--out", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["size"] == 256 and row["save_image_s"] > 0 and row["fast_save_s"] > 0
    assert row["speedup"] == pytest.approx(row["save_image_s"] / row["fast_save_s"], rel=0.02)
    assert 0.9 < row["fast_save_mb"] / row["save_image_mb"] < 1.1


def test_a_failed_write_leaves_no_partial_file(folders, monkeypatch):
    import torch

    from ultragen.patch import png_files

    def disk_full(out, *args, **kwargs):
        out.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(png_files, "write_png", disk_full)
    with pytest.raises(OSError, match="No space left"):
        png_files.save_pngs(torch.rand(1, 8, 8, 3), "full/img")
    assert list((folders / "output").rglob("*")) == [folders / "output" / "full"]  # the folder, no file
