"""bench/pipeline.py's smoke run (--tiny): the shipped workflow and its dense counterpart through ComfyUI's
executor, every node timed, the JSON written. The GPU numbers come from the same code (docs/BENCHMARKS.md)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("comfyui")
BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_pipeline_smoke_run_times_every_node(tmp_path, monkeypatch):
    import folder_paths

    import nodes

    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setattr(nodes, "NODE_CLASS_MAPPINGS", dict(nodes.NODE_CLASS_MAPPINGS))  # loaders swapped: undone
    monkeypatch.setattr(folder_paths, "folder_names_and_paths", copy.deepcopy(folder_paths.folder_names_and_paths))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    sys.modules.pop("pipeline", None)
    import pipeline

    out = tmp_path / "pipeline.json"
    pipeline.main(["--tiny", "--warm", "--workflows", "flux_2k_from_1k", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["warm"] is True and set(result["rows"][0]["warm_up"]) == {"ultragen_s", "dense_s", "dense_factor"}
    assert result["rows"][0]["warm_up"]["dense_factor"] == 1  # up to 4096^2 the dense warm-up is full size
    (row,) = result["rows"]
    shipped = json.loads((pipeline.API / "flux_2k_from_1k.api.json").read_text())
    timed = [n["node"] for n in row["ultragen"]["nodes"]]
    assert sorted(timed) == sorted(shipped)  # every node of the workflow, once
    assert row["ultragen"]["images"] == 2 and row["dense"]["images"] == 1
    assert any(n["type"] == "VAEDecodeTiled" for n in row["dense"]["nodes"])  # the dense way decodes in tiles
    assert row["speedup"] > 0 and result["tiny"] is True and result["random_weights"] is True
    sampler = next(n for n in row["dense"]["nodes"] if n["type"] == "KSampler")
    assert len(sampler["step_times"]) == row["dense_steps_run"]  # one time per sampling step
    # cfg 1 (the workflow's KSampler; ComfyUI then skips the uncond): one model call a step, within its interval
    assert len(sampler["model_call_s"]) == row["dense_steps_run"]
    ends = sampler["step_times"]  # seconds since the node began
    intervals = [b - a for a, b in zip([0.0, *ends[:-1]], ends, strict=True)]
    assert all(0 < call <= gap for call, gap in zip(sampler["model_call_s"], intervals, strict=True))
    no_model = ("UltraGenSaveImage", "VAEDecode")
    assert all(n["model_call_s"] == [] for n in row["ultragen"]["nodes"] if n["type"] in no_model)
    assert row["dense_steps"] == 2 and result["model"] == "flux1-dev"  # --tiny: 2 steps
    extra = row["dense_step_s"] * (row["dense_steps"] - row["dense_steps_run"])
    assert row["dense_s_all_steps"] == pytest.approx(row["dense"]["s"] + extra)


def test_one_side_only(tmp_path, monkeypatch):
    """--parts dense: the dense counterpart alone (no UltraGen row, no ratio); --parts ultragen: no dense."""
    import folder_paths

    import nodes

    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setattr(nodes, "NODE_CLASS_MAPPINGS", dict(nodes.NODE_CLASS_MAPPINGS))
    monkeypatch.setattr(folder_paths, "folder_names_and_paths", copy.deepcopy(folder_paths.folder_names_and_paths))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    sys.modules.pop("pipeline", None)
    import pipeline

    for part, present, absent in (("dense", "dense", "ultragen"), ("ultragen", "ultragen", "dense")):
        out = tmp_path / f"{part}.json"
        pipeline.main(["--tiny", "--parts", part, "--workflows", "flux_2k_from_1k", "--out", str(out)])
        (row,) = json.loads(out.read_text())["rows"]
        assert present in row and absent not in row and "speedup" not in row


def test_a_failed_run_keeps_what_it_measured(tmp_path, monkeypatch):
    """A workflow that fails (here its exact decode runs out of memory) is recorded, with the nodes measured up to
    the failure and ComfyUI's message, and the dense side still runs; no ratio is formed."""
    import folder_paths
    import torch

    import nodes

    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setattr(nodes, "NODE_CLASS_MAPPINGS", dict(nodes.NODE_CLASS_MAPPINGS))
    monkeypatch.setattr(folder_paths, "folder_names_and_paths", copy.deepcopy(folder_paths.folder_names_and_paths))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    sys.modules.pop("pipeline", None)
    import pipeline

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("Allocation on device 0 would exceed allowed memory. (out of memory)")

    decoders = [m for n, m in sys.modules.items() if n.endswith("nodes.exact_vae") and hasattr(m, "exact_decode")]
    assert decoders  # the pack's node module, as ComfyUI loaded it
    for module in decoders:
        monkeypatch.setattr(module, "exact_decode", out_of_memory)
    out = tmp_path / "failed.json"
    pipeline.main(["--tiny", "--workflows", "flux_2k_from_1k", "--out", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    ours = row["ultragen"]
    assert ours["status"] != "done" and "out of memory" in ours["message"]
    types = [n["type"] for n in ours["nodes"]]
    assert types[-1] == "UltraGenVAEDecodeExact" and "SamplerCustomAdvanced" in types  # measured up to the failure
    assert row["dense"]["status"] == "done" and "speedup" not in row


def test_dense_counterparts_by_hand(monkeypatch):
    """The plain way is the workflow's own base pass at the target size, with all its steps, then a tiled decode."""
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("pipeline", None)
    import pipeline

    flux1 = json.loads((pipeline.API / "flux_4k_from_1k.api.json").read_text())
    dense = pipeline.dense_prompt(flux1, 4096, 28)
    assert sorted(v["class_type"] for v in dense.values()) == sorted([
        "UNETLoader", "DualCLIPLoader", "VAELoader", "CLIPTextEncode", "FluxGuidance", "ConditioningZeroOut",
        "EmptyLatentImage", "KSampler", "VAEDecodeTiled", "SaveImage"])  # fmt: skip
    empty = next(v for v in dense.values() if v["class_type"] == "EmptyLatentImage")["inputs"]
    sampler = next(v for v in dense.values() if v["class_type"] == "KSampler")["inputs"]
    assert (empty["width"], empty["height"], sampler["steps"]) == (4096, 4096, 28)
    assert pipeline.base_steps(flux1) == 28

    klein = json.loads((pipeline.API / "flux2_klein_4k_from_1k.api.json").read_text())
    dense = pipeline.dense_prompt(klein, 4096, 4)
    assert sorted(v["class_type"] for v in dense.values()) == sorted([
        "UNETLoader", "CLIPLoader", "VAELoader", "CLIPTextEncode", "EmptyFlux2LatentImage", "Flux2Scheduler",
        "RandomNoise", "BasicGuider", "KSamplerSelect", "SamplerCustomAdvanced", "VAEDecodeTiled",
        "SaveImage"])  # fmt: skip
    scheduler = next(v for v in dense.values() if v["class_type"] == "Flux2Scheduler")["inputs"]
    assert (scheduler["width"], scheduler["height"], scheduler["steps"]) == (4096, 4096, 4)  # its shift: 4K's
    assert pipeline.base_steps(klein) == 4


def test_flux2_workflow_smoke_run(tmp_path, monkeypatch):
    """A FLUX.2 klein workflow and its dense counterpart on tiny FLUX.2 models (ComfyUI 0.29+)."""
    from random_models import host_has_flux2

    if not host_has_flux2():
        return  # this ComfyUI (0.3.64) has no FLUX.2: host_has_flux2 checked that none of it is present
    import folder_paths

    import nodes

    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setattr(nodes, "NODE_CLASS_MAPPINGS", dict(nodes.NODE_CLASS_MAPPINGS))
    monkeypatch.setattr(folder_paths, "folder_names_and_paths", copy.deepcopy(folder_paths.folder_names_and_paths))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    sys.modules.pop("pipeline", None)
    import pipeline

    out = tmp_path / "klein.json"
    pipeline.main(["--tiny", "--workflows", "flux2_klein_4k_from_1k", "--out", str(out)])
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert result["model"] == "flux2-klein-4b" and "nothing pooled" in result["text_encoders"]
    assert row["ultragen"]["images"] == 2 and row["dense"]["images"] == 1 and row["speedup"] > 0
    assert any(n["type"] == "SamplerCustomAdvanced" for n in row["dense"]["nodes"])
    with pytest.raises(SystemExit):  # one family per process
        pipeline.main(["--tiny", "--workflows", "flux2_klein_4k_from_1k", "flux_4k_from_1k"])
    with pytest.raises(SystemExit):
        pipeline.main(["--tiny", "--workflows", "flux_4k_from_1k", "--model", "flux2-klein-9b"])


def test_the_command_runs_in_a_fresh_process(comfyui, tmp_path):
    """``python bench/pipeline.py`` as it runs on the device: a fresh process that imports ComfyUI itself (in-process
    tests have it imported already, so an import in the wrong order passes them)."""
    out = tmp_path / "fresh.json"
    env = {**os.environ, "COMFYUI_PATH": str(comfyui)}
    result = subprocess.run([sys.executable, "pipeline.py", "--tiny", "--parts", "ultragen", "--workflows",
                             "flux_2k_from_1k", "--out", str(out)], cwd=BENCH, env=env, capture_output=True, text=True,
                            timeout=600, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["ultragen"]["images"] == 2


def test_the_warm_up_pass_is_the_workflow_at_one_step(monkeypatch):
    """--warm's pass: the same workflow at its real sizes, every sampler (and warm-start skip) at one step."""
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("pipeline", None)
    import pipeline

    shipped = json.loads((pipeline.API / "flux_4k_from_1k.api.json").read_text())
    warm = pipeline.shrink(shipped, 1, 1)
    assert warm.keys() == shipped.keys()
    for key, node in shipped.items():
        for name, value in node["inputs"].items():
            if name == "steps":
                assert warm[key]["inputs"][name] == 1
            elif name == "skip":
                assert warm[key]["inputs"][name] == 0
            else:
                assert warm[key]["inputs"][name] == value, (key, name)  # sizes and everything else unchanged
    assert any("steps" in node["inputs"] for node in shipped.values())


def test_an_emulated_card_needs_the_gpu_and_full_size_models(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("pipeline", None)
    import pipeline

    with pytest.raises(SystemExit):
        pipeline.main(["--tiny", "--card", "24", "--workflows", "flux_2k_from_1k"])
    assert "--card needs a CUDA GPU" in capsys.readouterr().err


def test_dense_step_time_is_the_mean_step_interval_or_the_whole_node(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("pipeline", None)
    import pipeline

    assert pipeline.dense_step_seconds({"s": 9.0, "step_times": [2.0, 3.5, 5.0, 6.5]})[0] == pytest.approx(1.5)
    seconds, how = pipeline.dense_step_seconds({"s": 9.0, "step_times": [8.0]})
    assert seconds == 9.0 and "upper bound" in how
