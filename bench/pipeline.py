"""A whole image, end to end: the shipped workflows through ComfyUI's executor, per node, against the dense way.

Each shipped API workflow runs headless in ComfyUI's own executor (``ultragen-run``'s in-process path)
with its loaders swapped: FLUX.1-dev with random bf16 weights (full architecture), FLUX's VAE with
random weights, and text encoders replaced by conditioning of the real shapes (T5: 512 x 4096,
pooled CLIP: 768) — so every number is a real step, decode and transfer, none an image-quality claim.
Beside each workflow, in the same run, the way an artist would do it without the pack: FLUX sampled
at the target size (28 Euler steps, ComfyUI's default sampling), decoded with ComfyUI's tiled VAE
decode. Dense steps at 8192^2 take about 90 s each: ``--dense-steps N`` runs N of them and adds
28 - N steps of the measured per-step time (the interval between the sampler's step callbacks; with one
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
On a machine whose Python lacks ComfyUI's video / server requirements (PyAV, pydantic, ...), put
``bench/stubs`` on ``PYTHONPATH`` with ``STUB_MODULES=av,pydantic,...`` (see its docstring).

    COMFYUI_PATH=/path/to/ComfyUI python bench/pipeline.py [--workflows flux_4k_from_1k flux_8k_recursive]
    COMFYUI_PATH=/path/to/ComfyUI python bench/pipeline.py --tiny   # a CPU smoke run on tiny models
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import torch

from results_io import run_info, write_json

ROOT = Path(__file__).resolve().parents[1]
API = ROOT / "workflows" / "api"
STEPS = 28
TARGETS = {"flux_4k_from_1k": 4.0, "flux_8k_recursive": 12.0}  # whole image, dense / UltraGen (issue 15)
FINAL_SIZE = {"flux_2k_from_1k": 2048, "flux_4k_from_1k": 4096, "flux_8k_recursive": 8192, "scalediff_4k": 4096}


def swap_loaders(tiny: bool) -> None:
    """ComfyUI's FLUX loaders replaced by random-weight models of the real (or, ``tiny``, CPU-sized) shapes."""
    import nodes

    from comfy_flux import flux_loaders
    from random_models import flux_vae, tiny_flux

    # Built before anything is timed: a random-weight build is not the file load an artist's UNETLoader
    # does, and the dense run that follows would find it cached.
    if tiny:
        model = tiny_flux(seed=1)
    else:
        from vram_cards import build  # FLUX.1-dev on the CPU, filled on the GPU: fast

        model = build("bf16")

    def unet(name):
        return model

    class RealShapedText:
        """Conditioning of FLUX's real shapes (T5 tokens and pooled CLIP), seeded by the prompt."""

        def tokenize(self, text: str):
            return text

        def encode_from_tokens_scheduled(self, tokens, **kwargs):
            g = torch.Generator().manual_seed(sum(map(ord, tokens)) % 2**31)
            text, pooled = ((8, 64), 32) if tiny else ((512, 4096), 768)
            cond = torch.randn(1, *text, generator=g)
            return [[cond, {"pooled_output": torch.randn(1, pooled, generator=g), "guidance": 3.5}]]

    nodes.NODE_CLASS_MAPPINGS.update(flux_loaders(unet, lambda name: RealShapedText(), lambda name: flux_vae(seed=2)))


def model_files(folder: Path) -> None:
    """Empty files of the workflows' model names, so that ComfyUI's validation finds them."""
    import folder_paths

    for kind, names in {"diffusion_models": ["flux1-dev.safetensors"], "vae": ["ae.safetensors"],
                        "text_encoders": ["clip_l.safetensors", "t5xxl_fp16.safetensors"]}.items():  # fmt: skip
        (folder / kind).mkdir(parents=True, exist_ok=True)
        for name in names:
            (folder / kind / name).touch()
        folder_paths.add_model_folder_path(kind, str(folder / kind))


def dense_prompt(size: int, steps: int) -> dict:
    """FLUX at the target size the plain way: loaders, KSampler (Euler, simple), tiled VAE decode, save."""
    shipped = json.loads((API / "flux_4k_from_1k.api.json").read_text())
    keep = {k: v for k, v in shipped.items() if v["class_type"] in (
        "UNETLoader", "DualCLIPLoader", "VAELoader", "CLIPTextEncode", "FluxGuidance", "ConditioningZeroOut",
        "EmptyLatentImage", "KSampler")}  # fmt: skip
    of_type = {v["class_type"]: k for k, v in keep.items()}
    keep[of_type["EmptyLatentImage"]]["inputs"].update(width=size, height=size)
    keep[of_type["KSampler"]]["inputs"]["steps"] = steps
    keep[of_type["KSampler"]]["_meta"] = {"title": "KSampler (dense)"}
    sampler, vae = of_type["KSampler"], of_type["VAELoader"]
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
    """Run ``prompt``; per node (in order): seconds, peak GiB and the times of its progress steps."""
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
                         "step_times": [t - clock["t"] for t in clock["steps"]]})  # fmt: skip
            print(f"[node] {title}: {rows[-1]['s']:.2f} s, peak {peak:.1f} GiB", flush=True)  # a cut run shows where
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        clock.update(t=time.perf_counter(), node=node, steps=[])

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
    if result.status != "done":
        raise RuntimeError(f"the run did not finish: {result.status} {result.message}")
    return {"s": time.perf_counter() - start, "nodes": rows, "images": len(result.images)}


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
                    help="dense sampling steps run (the rest of 28 added at the measured step time), one per "
                    "workflow; default: 28 up to 4096^2, 2 above")  # fmt: skip
    ap.add_argument("--tiny", action="store_true", help="tiny models, sizes / 16, 2 steps: a CPU smoke run")
    ap.add_argument("--card", type=float, help="run on an emulated card of this many GiB (bench/vram_cards.py's "
                    "emulation); UltraGen's workflows only")  # fmt: skip
    ap.add_argument("--warm", action="store_true", help="time the next image: a one-step pass of each workflow "
                    "first (weights loaded, kernels compiled, schedules cached), untimed")  # fmt: skip
    ap.add_argument("--parts", nargs="+", choices=("ultragen", "dense"), default=["ultragen", "dense"],
                    help="which side of each workflow runs (one side: form the ratio from two runs' JSON)")  # fmt: skip
    ap.add_argument("--comfyui", help="ComfyUI checkout (default: $COMFYUI_PATH)")
    ap.add_argument("--out", help="JSON path (default: bench/results/pipeline.json)")
    args = ap.parse_args(argv)
    from ultragen.runner.local import load_comfyui

    load_comfyui(args.comfyui, cpu=args.tiny or not torch.cuda.is_available())
    swap_loaders(args.tiny)
    if args.card:  # ComfyUI reads the emulated card from then on (the card's free-memory function is installed)
        from vram_cards import Card

        Card(dynamic=False).set(args.card)
    work = Path(tempfile.mkdtemp(prefix="ultragen-pipeline-"))
    model_files(work / "models")
    rows, out = [], None
    text = "conditioning of the real shapes (T5 512 x 4096, CLIP pooled 768)"
    result = {**run_info(), "tiny": args.tiny, "random_weights": True, "text_encoders": text, "warm": args.warm,
              "rows": rows}  # fmt: skip
    for i, name in enumerate(args.workflows):
        size = FINAL_SIZE[name]
        dense_steps = args.dense_steps[min(i, len(args.dense_steps) - 1)] if args.dense_steps else (
            STEPS if size <= 4096 else 2)  # fmt: skip
        ours = json.loads((API / f"{name}.api.json").read_text())
        dense = dense_prompt(size, dense_steps)
        if args.tiny:
            ours, dense, dense_steps = shrink(ours, 16, 2), shrink(dense, 16, 2), 2
        warm_up = {}
        row = {"workflow": name, "size": size, "card_gib": args.card, "warm_up": warm_up}
        rows.append(row)
        if "ultragen" in args.parts:
            if args.warm:
                warm_up["ultragen_s"] = run_measured(shrink(ours, 1, 1), work / f"{name}-warm")["s"]
            row["ultragen"] = run_measured(ours, work / name)
            out = write_json("pipeline", result, args.out)  # a run cut short in the dense pass keeps this
            if args.card:  # on a card: UltraGen's stages and peaks only (dense 8K cannot fit)
                print(f"{name} on an emulated {args.card:g} GB card: {row['ultragen']['s']:.1f} s", flush=True)
        if args.card or "dense" not in args.parts:
            continue
        if args.warm:
            factor = 1 if size <= 4096 else 8  # above 4K: load weights and VAE only (nothing to compile)
            warm_up["dense_s"] = run_measured(shrink(dense, factor, 1), work / f"{name}-dense-warm")["s"]
            warm_up["dense_factor"] = factor
        measured_dense = run_measured(dense, work / f"{name}-dense")
        sampler = next(r for r in measured_dense["nodes"] if r["type"] == "KSampler")
        per_step, how = dense_step_seconds(sampler)
        dense_total = measured_dense["s"] + per_step * (STEPS - dense_steps)
        row.update({"dense": measured_dense, "dense_steps_run": dense_steps, "dense_step_s": per_step,
                    "dense_step_from": how, "dense_s_scaled_to_28_steps": dense_total})  # fmt: skip
        if "ultragen" in row:
            row["speedup"] = speedup = dense_total / row["ultragen"]["s"]
            print(f"{name}: UltraGen {row['ultragen']['s']:.1f} s, dense {dense_total:.1f} s "
                  f"({dense_steps} of {STEPS} steps run, {per_step:.2f} s a step from {how}), {speedup:.1f}x",
                  flush=True)  # fmt: skip
        else:
            print(f"{name}: dense {dense_total:.1f} s ({dense_steps} of {STEPS} steps run, {per_step:.2f} s a step "
                  f"from {how})", flush=True)  # fmt: skip
        out = write_json("pipeline", result, args.out)  # after every workflow: a run cut short keeps it
    print("\n| workflow | size | UltraGen, whole image | dense (28 steps, tiled decode) | speedup | target |")
    print("|---|---|---|---|---|---|")
    for r in (r for r in rows if "speedup" in r):
        target = TARGETS.get(r["workflow"])
        verdict = "" if target is None else f"≥ {target}x: {'met' if r['speedup'] >= target else 'MISSED'}"
        dense = r["dense_s_scaled_to_28_steps"]
        print(f"| {r['workflow']} | {r['size']}² | {r['ultragen']['s']:.1f} s | {dense:.1f} s "
              f"| {r['speedup']:.1f}x | {verdict} |")  # fmt: skip
    for r in rows:
        print(f"\n{r['workflow']}, per node (s, peak GiB):")
        for n in r.get("ultragen", r.get("dense", {"nodes": []}))["nodes"]:
            print(f"  {n['title']:40s} {n['s']:8.2f} s  {n['peak_gib']:6.1f} GiB")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
