"""A whole image, end to end: the shipped workflows through ComfyUI's executor, per node, against the dense way.

Each shipped API workflow runs headless in ComfyUI's own executor (``ultragen-run``'s in-process path)
with its loaders swapped: FLUX.1-dev (or, for the ``flux2_*`` workflows, FLUX.2 klein 4B; ``--model``
picks another of bench/flux_step.py's architectures) with random bf16 weights (full architecture), its VAE
with random weights, and text encoders replaced by conditioning of the real shapes (FLUX.1: T5 512 x 4096,
pooled CLIP 768; FLUX.2: 512 tokens of the text encoder's width) — so every number is a real step, decode
and transfer, none an image-quality claim.
Beside each workflow, in the same run, the way an artist would do it without the pack: the workflow's own
base pass (FLUX.1: 28 Euler steps; klein: its 4 steps and scheduler) at the target size, decoded with
ComfyUI's tiled VAE decode. Dense steps at 8192^2 take about 90 s each: ``--dense-steps N`` runs N of them and adds
the rest of the steps at the measured per-step time (the interval between the sampler's step callbacks; with one
step run, the sampler node's whole time, which also holds its setup: an upper bound, said in the JSON).

Per node: seconds and peak GPU memory; per workflow: the whole image and its ratio to dense. The model
is built before anything is timed; the first sampler of the UltraGen run (the 1K base) includes loading
its weights onto the GPU and the Triton compilation, which the dense run after it does not pay.
``--warm`` times an artist's next image instead: each workflow (and its dense counterpart) first runs once with
every sampler at one step, untimed, so the weights are on the GPU, kernels compiled and attention schedules
cached for those sizes (Triton keeps compiled kernels on disk, so only the very first image on a machine
compiles); that pass's time is kept in the JSON. Above 4096^2 the dense warm-up runs at 1/8 of the size (it
only loads the weights and the VAE: ComfyUI's dense path compiles nothing, and one dense 8K step is ~90 s).
``--parts ultragen`` or ``--parts dense`` runs one side only (a dense 8K pass and the recursive chain together
take longer than one 10-minute device call); the ratio is then formed from the two JSON files.
On a GPU, ComfyUI starts as ``ultragen-run`` and ComfyUI's own main.py start it (``--start main``, the default:
PyTorch's ``cudaMallocAsync`` allocator, ``--allocator`` to change it, and DynamicVRAM where main.py enables it, on
NVIDIA with ComfyUI 0.29+); ``--start plain`` keeps PyTorch's native allocator and ComfyUI's legacy loader, as every
run of this benchmark before 2026-12-02 (the JSON says which: ``start``, ``allocator``, ``dynamic_vram``).
On a machine whose Python lacks ComfyUI's video / server requirements (PyAV, pydantic, ...), put
``bench/stubs`` on ``PYTHONPATH`` with ``STUB_MODULES=av,pydantic,...`` (see its docstring).

    COMFYUI_PATH=/path/to/ComfyUI python bench/pipeline.py [--workflows flux_4k_from_1k flux_8k_recursive]
    COMFYUI_PATH=/path/to/ComfyUI python bench/pipeline.py --tiny   # a CPU smoke run on tiny models
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
import time
from pathlib import Path

import torch
from emulated_card import ALLOCATORS, use_allocator

from ultragen.gpu_start import dynamic_vram_on

from results_io import run_info, write_json

ROOT = Path(__file__).resolve().parents[1]
API = ROOT / "workflows" / "api"
TARGETS = {"flux_4k_from_1k": 4.0, "flux_8k_recursive": 12.0}  # whole image, dense / UltraGen (issue 15)
SECONDS_TARGETS = {("flux2_klein_4k_from_1k", "flux2-klein-9b"): 30.0}  # whole image on the H200 (issue 14)
FINAL_SIZE = {"flux_2k_from_1k": 2048, "flux_4k_from_1k": 4096, "flux_8k_recursive": 8192, "scalediff_4k": 4096,
              "flux2_klein_4k_from_1k": 4096, "flux2_klein_8k_recursive": 8192}  # fmt: skip
EMPTY_LATENTS = ("EmptyLatentImage", "EmptyFlux2LatentImage")
SAMPLERS = ("KSampler", "SamplerCustomAdvanced")


def is_flux2(workflow: str) -> bool:
    return workflow.startswith("flux2_")


def swap_loaders(tiny: bool, model_name: str) -> None:
    """ComfyUI's FLUX loaders replaced by random-weight models of the real (or, ``tiny``, CPU-sized) shapes:
    ``model_name`` one of bench/flux_step.py's MODELS (FLUX.1-dev, FLUX.2 klein 4B / 9B, dev)."""
    import nodes

    from comfy_flux import flux_loaders
    from flux_step import MODELS
    from random_models import flux_vae, tiny_flux, tiny_flux2

    arch = MODELS[model_name]
    # Built before anything is timed: a random-weight build is not the file load an artist's UNETLoader
    # does, and the dense run that follows would find it cached.
    if tiny:
        model = tiny_flux2(seed=1) if arch.flux2 else tiny_flux(seed=1)
    else:
        from vram_cards import build  # on the CPU, filled on the GPU: fast

        model = build("bf16", model_name)

    import comfy.patcher_extension

    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "pipeline", timed_model_call)

    def unet(name):
        return model

    class RealShapedText:
        """Conditioning of the model's real shapes (FLUX.1: T5 tokens and pooled CLIP; FLUX.2: the text
        encoder's stacked layers, nothing pooled), seeded by the prompt."""

        def tokenize(self, text: str):
            return text

        def encode_from_tokens_scheduled(self, tokens, **kwargs):
            g = torch.Generator().manual_seed(sum(map(ord, tokens)) % 2**31)
            text, pooled = ((8, 64), 32) if tiny else ((512, arch.text_width), 768)
            cond = torch.randn(1, *text, generator=g)
            if arch.flux2:
                return [[cond, {}]]
            return [[cond, {"pooled_output": torch.randn(1, pooled, generator=g), "guidance": 3.5}]]

    vae = flux_vae(seed=2, flux2=arch.flux2)
    nodes.NODE_CLASS_MAPPINGS.update(flux_loaders(unet, lambda name: RealShapedText(), lambda name: vae))


MODEL_CALLS: list[float] = []  # seconds of each model call since the node began (run_measured empties it)


def timed_model_call(executor, *args, **kwargs):
    """APPLY_MODEL wrapper: the model call's own seconds, so that a step's interval splits into the model and what
    the sampler does around it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = executor(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    MODEL_CALLS.append(time.perf_counter() - start)
    return out


def model_files(folder: Path) -> None:
    """Empty files of the workflows' model names, so that ComfyUI's validation finds them."""
    import folder_paths

    for kind, names in {"diffusion_models": ["flux1-dev.safetensors", "flux-2-klein-4b.safetensors"],
                        "vae": ["ae.safetensors", "flux2-vae.safetensors"],
                        "text_encoders": ["clip_l.safetensors", "t5xxl_fp16.safetensors",
                                          "qwen_3_4b.safetensors"]}.items():  # fmt: skip
        (folder / kind).mkdir(parents=True, exist_ok=True)
        for name in names:
            (folder / kind / name).touch()
        folder_paths.add_model_folder_path(kind, str(folder / kind))


def base_pass(workflow: dict) -> tuple[str, set[str]]:
    """The workflow's text-to-image pass: the sampler that starts from an empty latent, and every node it needs."""
    empty = next(k for k, v in workflow.items() if v["class_type"] in EMPTY_LATENTS)
    sampler = next(k for k, v in workflow.items() if v["class_type"] in SAMPLERS and [empty, 0] in v["inputs"].values())
    needed, todo = set(), [sampler]
    while todo:
        key = todo.pop()
        if key not in needed:
            needed.add(key)
            todo += [v[0] for v in workflow[key]["inputs"].values() if isinstance(v, list)]
    return sampler, needed


def base_steps(workflow: dict) -> int:
    """The steps of the workflow's base pass (FLUX.1-dev: 28; klein: 4): what the dense way runs at full size."""
    sampler, needed = base_pass(workflow)
    return next(workflow[k]["inputs"]["steps"] for k in needed if "steps" in workflow[k]["inputs"])


def dense_prompt(workflow: dict, size: int, steps: int) -> dict:
    """The plain way: the workflow's own base pass (loaders, text, sampler, scheduler) at the target size,
    then ComfyUI's tiled VAE decode and a save."""
    sampler, needed = base_pass(workflow)
    vae = next(k for k, v in workflow.items() if v["class_type"] == "VAELoader")  # the decode's, not the sampler's
    keep = json.loads(json.dumps({k: workflow[k] for k in needed | {vae}}))
    for node in keep.values():
        inputs = node["inputs"]
        for key in ("width", "height"):
            if isinstance(inputs.get(key), int):  # the empty latent, and FLUX.2's resolution-dependent scheduler
                inputs[key] = size
        if "steps" in inputs:
            inputs["steps"] = steps
    keep[sampler]["_meta"] = {"title": f"{keep[sampler]['class_type']} (dense)"}
    keep["900"] = {"class_type": "VAEDecodeTiled", "inputs": {
        "samples": [sampler, 0], "vae": [vae, 0], "tile_size": 512, "overlap": 64, "temporal_size": 64,
        "temporal_overlap": 8}}  # fmt: skip
    keep["901"] = {"class_type": "SaveImage", "inputs": {"images": ["900", 0], "filename_prefix": "dense"}}
    return keep


def shrink(prompt: dict, factor: int, steps: int | None) -> dict:
    """Sizes divided by ``factor`` and step counts set (the --tiny smoke run; factor 1: the --warm pass)."""
    prompt = json.loads(json.dumps(prompt))
    for node in prompt.values():
        inputs = node["inputs"]
        for key in ("width", "height", "target_width", "target_height"):
            if isinstance(inputs.get(key), int):
                inputs[key] //= factor
        if steps is not None and "steps" in inputs:
            inputs["steps"] = steps
            if "skip" in inputs:
                inputs["skip"] = min(inputs["skip"], steps - 1)
        if factor > 1 and node["class_type"] == "UltraGenAttentionPatch" and inputs.get("mode") == "npa":
            inputs["window"] = 4
        if factor > 1 and node["class_type"] == "VAEDecodeTiled":
            inputs.update(tile_size=64, overlap=16)
    return prompt


def run_measured(prompt: dict, out: Path) -> dict:
    """Run ``prompt``; per node (in order): seconds, peak GiB and the times of its progress steps, and how the run
    ended (``status`` "done", else ComfyUI's status and ``message``: a failed run keeps the nodes it measured)."""
    import ultragen.runner.local as local

    cuda = torch.cuda.is_available()
    rows: list[dict] = []
    clock = {"t": time.perf_counter(), "node": None, "steps": []}

    def close(node):
        if clock["node"] is not None:
            if cuda:
                torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
            entry = prompt.get(str(clock["node"]), {})
            title = (entry.get("_meta") or {}).get("title") or entry.get("class_type", "?")
            rows.append({"node": str(clock["node"]), "type": entry.get("class_type"), "title": title,
                         "s": time.perf_counter() - clock["t"], "peak_gib": peak,
                         "step_times": [t - clock["t"] for t in clock["steps"]],
                         "model_call_s": list(MODEL_CALLS)})  # fmt: skip
            print(f"[node] {title}: {rows[-1]['s']:.2f} s, peak {peak:.1f} GiB", flush=True)  # a cut run shows where
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        clock.update(t=time.perf_counter(), node=node, steps=[])
        MODEL_CALLS.clear()

    class Timed(local.Progress):
        def send_sync(self, event, data, sid=None):
            if event == "executing":
                close(data.get("node"))
            super().send_sync(event, data, sid)

        def step(self, value, total, *args, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            clock["steps"].append(time.perf_counter())
            super().step(value, total, *args, **kwargs)

    original = local.Progress
    local.Progress = Timed
    try:
        start = time.perf_counter()
        result = local.run(prompt, out, io.StringIO())
        close(None)
    finally:
        local.Progress = original
    measured = {"s": time.perf_counter() - start, "nodes": rows, "images": len(result.images), "status": result.status}
    if result.status != "done":
        measured["message"] = result.message
        print(f"the run did not finish: {result.status} {result.message}", flush=True)
    return measured


def finished(measured: dict) -> dict:
    """``measured`` of a run that had to finish (a warm-up pass, the dense side of a ratio)."""
    if measured["status"] != "done":
        raise RuntimeError(f"the run did not finish: {measured['status']} {measured.get('message')}")
    return measured


def describe(measured: dict | None) -> str:
    """A run's whole time, or how it ended."""
    if measured is None:
        return "not run"
    if measured["status"] == "done":
        return f"{measured['s']:.1f} s"
    last = measured["nodes"][-1]["title"] if measured["nodes"] else "?"
    return f"{measured['status']} at {last} after {measured['s']:.1f} s"


def dense_step_seconds(sampler: dict) -> tuple[float, str]:
    """One dense step: the mean interval between the sampler's step callbacks, or (one step run) its node time."""
    times = sampler["step_times"]
    if len(times) >= 2:
        return (times[-1] - times[0]) / (len(times) - 1), "step intervals"
    return sampler["s"], "the sampler node's time (includes its setup: an upper bound)"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workflows", nargs="+", default=["flux_4k_from_1k", "flux_8k_recursive"])
    ap.add_argument("--dense-steps", type=int, nargs="+", default=None,
                    help="dense sampling steps run (the rest of the base pass's steps, e.g. 28, added at the measured "
                    "step time), one per workflow; default: all of them up to 4096^2, 2 above")  # fmt: skip
    ap.add_argument("--model", help="architecture with random weights (bench/flux_step.py's MODELS); default: "
                    "flux1-dev for FLUX.1 workflows, flux2-klein-4b for FLUX.2 (flux2_*) ones")  # fmt: skip
    ap.add_argument("--tiny", action="store_true", help="tiny models, sizes / 16, 2 steps: a CPU smoke run")
    ap.add_argument("--card", type=float, help="run on an emulated card of this many GiB (bench/emulated_card.py)"
                    "; UltraGen's workflows only")  # fmt: skip
    ap.add_argument("--start", choices=("main", "plain"), default="main", help="on a GPU: ComfyUI started as its "
                    "main.py and ultragen-run start it (main), or with PyTorch's native allocator and the legacy "
                    "loader (plain: the runs before 2026-12-02)")  # fmt: skip
    ap.add_argument("--allocator", choices=list(ALLOCATORS), default="cudaMallocAsync", help="with --start main: "
                    "PyTorch's CUDA allocator (default: ComfyUI's on NVIDIA; bench/emulated_card.py)")  # fmt: skip
    ap.add_argument("--warm", action="store_true", help="time the next image: a one-step pass of each workflow "
                    "first (weights loaded, kernels compiled, schedules cached), untimed")  # fmt: skip
    ap.add_argument("--parts", nargs="+", choices=("ultragen", "dense"), default=["ultragen", "dense"],
                    help="which side of each workflow runs (one side: form the ratio from two runs' JSON)")  # fmt: skip
    ap.add_argument("--comfyui", help="ComfyUI checkout (default: $COMFYUI_PATH)")
    ap.add_argument("--out", help="JSON path (default: bench/results/pipeline.json)")
    args = ap.parse_args(argv)
    from ultragen.runner.local import load_comfyui

    from flux_step import MODELS

    families = {is_flux2(name) for name in args.workflows}
    if len(families) != 1:
        ap.error("FLUX.1 and FLUX.2 workflows need separate runs (one model per process)")
    flux2 = families.pop()
    model_name = args.model or ("flux2-klein-4b" if flux2 else "flux1-dev")
    if model_name not in MODELS:
        ap.error(f"--model {model_name}: choose one of {sorted(MODELS)}")
    cpu = args.tiny or not torch.cuda.is_available()
    if args.card and cpu:
        ap.error("--card needs a CUDA GPU and full-size models (not --tiny)")
    like_main = args.start == "main"
    allocator = None if cpu else args.allocator if like_main else "native"
    with use_allocator(allocator) if allocator else contextlib.nullcontext():  # before CUDA starts
        load_comfyui(args.comfyui, cpu=cpu, like_main=like_main, dynamic_vram=None if like_main else False)
    if MODELS[model_name].flux2 != flux2:
        family = "FLUX.2" if flux2 else "FLUX.1"
        ap.error(f"--model {model_name}: the workflows are {family}'s; choose one of {sorted(MODELS)} of that family")
    swap_loaders(args.tiny, model_name)
    if args.card:  # ComfyUI reads the emulated card from then on (the card's free-memory function is installed)
        from emulated_card import Card

        Card(dynamic=dynamic_vram_on()).set(args.card)
    work = Path(tempfile.mkdtemp(prefix="ultragen-pipeline-"))
    model_files(work / "models")
    rows, out = [], None
    shapes = f"512 x {MODELS[model_name].text_width}, nothing pooled" if flux2 else "T5 512 x 4096, CLIP pooled 768"
    text = f"conditioning of the real shapes ({shapes})"
    result = {**run_info(), "model": model_name, "tiny": args.tiny, "random_weights": True, "text_encoders": text,
              "warm": args.warm, "rows": rows}  # fmt: skip
    if not cpu:
        result.update(start=args.start, allocator=allocator, dynamic_vram=dynamic_vram_on())
    for i, name in enumerate(args.workflows):
        size = FINAL_SIZE[name]
        ours = json.loads((API / f"{name}.api.json").read_text())
        steps = base_steps(ours)
        dense_steps = args.dense_steps[min(i, len(args.dense_steps) - 1)] if args.dense_steps else (
            steps if size <= 4096 else min(steps, 2))  # fmt: skip
        dense = dense_prompt(ours, size, dense_steps)
        if args.tiny:
            ours, dense, dense_steps, steps = shrink(ours, 16, 2), shrink(dense, 16, 2), 2, 2
        warm_up = {}
        row = {"workflow": name, "size": size, "card_gib": args.card, "warm_up": warm_up}
        rows.append(row)
        if "ultragen" in args.parts:
            if args.warm:
                warm_up["ultragen_s"] = finished(run_measured(shrink(ours, 1, 1), work / f"{name}-warm"))["s"]
            row["ultragen"] = run_measured(ours, work / name)
            out = write_json("pipeline", result, args.out)  # a run cut short in the dense pass keeps this
            if args.card:  # on a card: UltraGen's stages and peaks only (dense 8K cannot fit)
                print(f"{name} on an emulated {args.card:g} GB card: {describe(row['ultragen'])}", flush=True)
        if args.card or "dense" not in args.parts:
            continue
        if args.warm:
            factor = 1 if size <= 4096 else 8  # above 4K: load weights and VAE only (nothing to compile)
            warm_up["dense_s"] = finished(run_measured(shrink(dense, factor, 1), work / f"{name}-dense-warm"))["s"]
            warm_up["dense_factor"] = factor
        measured_dense = finished(run_measured(dense, work / f"{name}-dense"))
        sampler = next(r for r in measured_dense["nodes"] if r["type"] in SAMPLERS)
        per_step, how = dense_step_seconds(sampler)
        dense_total = measured_dense["s"] + per_step * (steps - dense_steps)
        row.update({"dense": measured_dense, "dense_steps_run": dense_steps, "dense_steps": steps,
                    "dense_step_s": per_step, "dense_step_from": how, "dense_s_all_steps": dense_total})  # fmt: skip
        ran = f"{dense_steps} of {steps} steps run, {per_step:.2f} s a step from {how}"
        if row.get("ultragen", {}).get("status") == "done":
            row["speedup"] = speedup = dense_total / row["ultragen"]["s"]
            print(f"{name}: UltraGen {row['ultragen']['s']:.1f} s, dense {dense_total:.1f} s ({ran}), {speedup:.1f}x",
                  flush=True)  # fmt: skip
        else:
            print(f"{name}: dense {dense_total:.1f} s ({ran}); UltraGen: {describe(row.get('ultragen'))}", flush=True)
        out = write_json("pipeline", result, args.out)  # after every workflow: a run cut short keeps it
    print(f"\n{model_name}, random weights:")
    print("| workflow | size | UltraGen, whole image | dense (all base steps, tiled decode) | speedup | target |")
    print("|---|---|---|---|---|---|")
    for r in (r for r in rows if "ultragen" in r):
        verdicts = []
        if (target := TARGETS.get(r["workflow"])) and "speedup" in r:
            verdicts.append(f"≥ {target}x: {'met' if r['speedup'] >= target else 'MISSED'}")
        if (seconds := SECONDS_TARGETS.get((r["workflow"], model_name))) and not args.card and "speedup" in r:
            verdicts.append(f"≤ {seconds:g} s: {'met' if r['ultragen']['s'] <= seconds else 'MISSED'}")
        dense = f"{r['dense_s_all_steps']:.1f} s" if "dense" in r else "–"
        speedup = f"{r['speedup']:.1f}x" if "speedup" in r else "–"
        print(f"| {r['workflow']} | {r['size']}² | {describe(r['ultragen'])} | {dense} | {speedup} "
              f"| {'; '.join(verdicts)} |")  # fmt: skip
    for r in rows:
        print(f"\n{r['workflow']}, per node (s, peak GiB):")
        for n in r.get("ultragen", r.get("dense", {"nodes": []}))["nodes"]:
            print(f"  {n['title']:40s} {n['s']:8.2f} s  {n['peak_gib']:6.1f} GiB")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
