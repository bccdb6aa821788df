"""What runs on your card: FLUX sampling steps on emulated 12-80 GB cards, dense vs UltraGen.

The full FLUX.1-dev architecture (``--model``: FLUX.2 klein 4B / 9B or dev) with random weights,
built on the CPU (ComfyUI's offload device)
and loaded by ComfyUI itself, sampled with ``comfy.sample.sample`` (``--steps`` Euler steps, cfg 1: the real
PREPARE_SAMPLING wrappers, memory estimate and partial loading). fp8 is ComfyUI's manual cast
(weights stored float8_e4m3fn, computed in bf16). Text: 512 tokens of random T5-sized conditioning.

How a card is emulated (and which allocator PyTorch runs): ``bench/emulated_card.py``.

Per cell: runs or OOM (and where), seconds for the last of ``--steps`` steps (default 2; the model call,
loading excluded; the first's seconds kept as ``first_s``: DynamicVRAM loads the weights lazily inside the
first call, and a step after the first meets the allocator as a sampling run's later steps do — a 12 GB
8192² cell with DynamicVRAM ran its first step and ran out of memory in the second), peak GiB allocated
during it, weights resident (with DynamicVRAM: comfy-aimdo's VRAM in
use after the step, ``aimdo_vram_gib``, outside PyTorch's allocator), and the step's peak activations in units
U = tokens x hidden (FLUX.1: 3072) x 2 bytes (the memory above what was allocated when the step began).

    COMFYUI_PATH=/path/to/ComfyUI python bench/vram_cards.py [--cards 12 24] [--sizes 4096] [--dynamic-vram]

Every cell starts fresh, all models unloaded (an artist's first run after starting ComfyUI). With ``--queue``
cells of one card and one kind of weights follow each other without unloading the model (ComfyUI keeps what it
loaded and frees what the next size's estimate asks for, as in an artist's queue of sizes) — faster (fresh bf16
cells took 25-40 s each for steps of 2-8 s); a new card or new weights, or a cell after a failed one, start
fresh.

Prints a table and writes JSON after every cell (a run cut short keeps what it measured).
"""

from __future__ import annotations

import argparse
import contextlib
import time
import traceback

import torch
from emulated_card import (
    ALLOCATORS,
    CONTEXT_GIB,
    Card,
    aimdo_vram_gib,
    host_weights_gib,
    segment_summary,
    use_allocator,
)
from step_profile import host_profiled, profiled

from flux_step import MODELS, TEXT
from results_io import comfyui_on_gpu, run_info, write_json

CARDS = (12, 16, 24, 32, 48, 80)
DENSE_UP_TO = 4096


def build(dtype_name: str, name: str = "flux1-dev"):
    """The architecture (FLUX.1-dev unless --model) as ComfyUI loads it: weights on the CPU, ~N(0, 0.02) (norm
    scales 1), bf16 or fp8."""
    import comfy.ldm.flux.model
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    arch = MODELS[name]
    config = dict(arch.params)
    if "txt_ids_dims" in comfy.ldm.flux.model.FluxParams.__dataclass_fields__:
        config.setdefault("txt_ids_dims", [])
    model_config = getattr(comfy.supported_models, arch.config_class)(config)
    if dtype_name == "fp8":
        model_config.set_inference_dtype(torch.float8_e4m3fn, torch.bfloat16)
    else:
        model_config.set_inference_dtype(torch.bfloat16, None)
    model = model_config.get_model({}, device=torch.device("cpu"))
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, p in model.diffusion_model.named_parameters():
            if "norm" in name and name.endswith("scale"):
                p.fill_(1.0)
            else:
                value = torch.randn(p.shape, generator=gen, device="cuda", dtype=torch.bfloat16) * 0.02
                p.copy_(value.to(p.dtype).cpu())
    torch.cuda.empty_cache()
    patcher = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)
    return patcher(model, load_device=mm.get_torch_device(), offload_device=torch.device("cpu"))


def ultragen(model, pixels: int, arch, whole_blocks: bool = False):
    from ultragen.patch import Guidance, UltraGenFluxPatch

    side = pixels // arch.pixels_per_latent // 4
    latent = torch.randn(1, arch.channels, side, side, generator=torch.Generator().manual_seed(1))
    m = UltraGenFluxPatch(guidance=Guidance(latent, pixels, pixels)).apply(model)
    if whole_blocks:  # ComfyUI's own block code (what the patch did before its chunked blocks)
        m.set_model_attn1_patch(lambda q, k, v, **kwargs: {})
    return m


def floor(model):
    """Attention replaced by a copy of V: everything but attention (bench/flux_step.py's floor)."""
    from flux_step import floor_model

    return floor_model(model)


def tokens(pixels: int, mode: str) -> int:
    n = (pixels // 16) ** 2 + TEXT
    return n + ((pixels // 64) ** 2 if mode.startswith("ultragen") else 0)


def step(model, pixels: int, arch, steps: int = 1, profile: str | None = None) -> dict:
    """``steps`` Euler steps through comfy.sample; each model call timed and measured by an APPLY_MODEL wrapper,
    the last one's figures returned (with more than one step, the first call's seconds as ``first_s``;
    ``profile``: also where the last call's time went: "gpu", ``step_profile.profiled``; "host",
    ``step_profile.host_profiled``)."""
    import comfy.model_management as mm
    import comfy.patcher_extension
    import comfy.sample

    seen: dict = {}

    def timed(executor, *args, **kwargs):
        torch.cuda.synchronize()
        seen["before_gib"] = torch.cuda.memory_allocated() / 2**30
        seen["weights_gib"] = sum(m.model_loaded_memory() for m in mm.current_loaded_models) / 2**30
        # Streamed weights and how many are page-locked: copies from pageable memory make the host wait
        # (2026-12-02: a queued 12 GB bf16 2048² step spent 1.99 s of 2.61 s in the weights' copies).
        seen["host_weights_gib"], seen["host_pinned_gib"] = host_weights_gib(m.model.diffusion_model)
        torch.cuda.reset_peak_memory_stats()
        summary: dict = {}
        t0 = time.perf_counter()
        profiler = {"gpu": profiled, "host": host_profiled}.get(profile)
        with profiler(summary) if profiler else contextlib.nullcontext():
            out = executor(*args, **kwargs)
            torch.cuda.synchronize()
        seen["s"] = time.perf_counter() - t0
        if profile:
            seen["profile"] = summary
        seen.setdefault("first_s", seen["s"])
        seen["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        aimdo = aimdo_vram_gib()
        if aimdo is not None:
            seen["aimdo_vram_gib"] = aimdo
        return out

    m = model.clone()
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "vram_cards", timed)
    gen = torch.Generator().manual_seed(pixels)
    side = pixels // arch.pixels_per_latent
    latent = torch.zeros(1, arch.channels, side, side)
    noise = torch.randn(latent.shape, generator=gen)
    cond = torch.randn(1, TEXT, arch.text_width, generator=gen, dtype=torch.bfloat16)
    if arch.pooled:
        pooled = torch.randn(1, 768, generator=gen, dtype=torch.bfloat16)
        positive = [[cond, {"pooled_output": pooled, "guidance": 3.5}]]
        negative = [[torch.zeros_like(cond), {"pooled_output": torch.zeros_like(pooled), "guidance": 3.5}]]
    else:  # FLUX.2: no pooled vector
        positive, negative = [[cond, {"guidance": 3.5}]], [[torch.zeros_like(cond), {"guidance": 3.5}]]
    out = comfy.sample.sample(m, noise, steps, 1.0, "euler", "simple", positive, negative, latent, seed=0,
                              disable_pbar=True)  # fmt: skip
    if not torch.isfinite(out).all():
        raise RuntimeError("non-finite output")
    if steps == 1:
        del seen["first_s"]  # the step timed is the first
    return seen


def cell(card: Card, base, gib, dtype: str, pixels: int, mode: str, name: str = "flux1-dev", steps: int = 2,
         profile: str | None = None) -> dict:  # fmt: skip
    card.set(gib, dtype)
    arch = MODELS[name]
    row = {"card_gib": gib, "weights": dtype, "pixels": pixels, "mode": mode}
    u = tokens(pixels, mode) * arch.params["hidden_size"] * 2 / 2**30
    try:
        if mode == "dense":
            model = base
        elif mode == "floor":
            model = floor(base)
        else:
            model = ultragen(base, pixels, arch, whole_blocks=mode == "ultragen-whole-blocks")  # or a warm-up
        # The last step is timed: DynamicVRAM loads the weights lazily inside the first model call after the card
        # is set (the legacy loader before sampling, untimed), and later steps meet a used allocator.
        seen = step(model, pixels, arch, steps=steps, profile=profile)
        where_time_went = seen.pop("profile", None)
        row.update(status="runs", **{k: round(v, 3) for k, v in seen.items()})
        if where_time_went is not None:
            row["profile"] = where_time_went
        row["activations_u"] = round((seen["peak_gib"] - seen["before_gib"]) / u, 2)
    except torch.OutOfMemoryError as exc:
        import comfy.model_management as mm

        frame = traceback.extract_tb(exc.__traceback__)[-1]
        row.update(status="OOM", where=f"{frame.filename.split('/')[-1]}:{frame.lineno} {frame.line}")
        row["weights_gib"] = round(sum(m.model_loaded_memory() for m in mm.current_loaded_models) / 2**30, 3)
        row["oom"] = str(exc).split(" See documentation")[0][:400]
        if card.segments_on_oom:  # taken while the traceback still holds the failed step's tensors
            row["segments"] = segment_summary()
    except Exception as exc:  # noqa: BLE001 - a benchmark records every failure and goes on
        row.update(status="error", where=f"{type(exc).__name__}: {exc}"[:300])
    if row["status"] != "runs":
        card.current = None  # the next cell starts fresh, not from what a failed one left
    row["u_gib"] = round(u, 3)
    print(_line(row), flush=True)
    return row


def _line(r: dict) -> str:
    card = "whole GPU" if r["card_gib"] is None else f"{r['card_gib']} GB"
    head = f"{card:>9} {r['weights']:4} {r['pixels']:5}² {r['mode']:22}"
    if r["status"] != "runs":
        return f"{head} {r['status']}: {r.get('where', '')}"
    weights = r.get("aimdo_vram_gib", r["weights_gib"])  # DynamicVRAM's weights live outside PyTorch's allocator
    first = f"  (first step {r['first_s']:.2f} s)" if "first_s" in r else ""
    line = (f"{head} {r['s']:7.2f} s  peak {r['peak_gib']:5.1f} GiB  weights {weights:5.1f} GiB  "
            f"activations {r['activations_u']:.1f} U{first}")  # fmt: skip
    if r.get("host_weights_gib"):
        line += f"  streamed {r['host_weights_gib']:.1f} GiB ({r['host_pinned_gib']:.1f} pinned)"
    if "host_top" in r.get("profile", {}):
        p = r["profile"]
        calls = ", ".join(f"{name} {s:.3f} s x{count}" for name, count, s in p["host_top"][:3])
        line += f"\n{'':>43} host {p['host_s']:.2f} s, most in {calls}"
    elif "profile" in r:
        p = r["profile"]
        waits = ", ".join(f"{name} {ms:.0f} ms x{count}" for name, count, ms in p["runtime_top"][:3])
        line += (f"\n{'':>43} GPU busy {p['gpu_busy_ms']:.0f} ms (span {p['gpu_span_ms']:.0f} ms), host-to-device "
                 f"copies {p['h2d_ms']:.0f} ms x{p['h2d_count']} ({p['h2d_overlapped_ms']:.0f} ms beside other GPU "
                 f"work); host waited in {waits}")  # fmt: skip
    return line


def plan(cards, sizes, dtypes, big, big_sizes, modes=("dense", "ultragen")) -> list[tuple]:
    cells = []
    for gib in cards:
        for dtype in dtypes:
            for pixels in sizes:
                if pixels <= DENSE_UP_TO and "dense" in modes:
                    cells.append((gib, dtype, pixels, "dense"))
                if "ultragen" in modes:
                    cells.append((gib, dtype, pixels, "ultragen"))
    for gib in big:
        for pixels in big_sizes:
            cells.append((gib, "bf16", pixels, "ultragen"))
    return cells


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="flux1-dev", help="architecture: flux1-dev, flux2-klein-4b, flux2-klein-9b, "
                    "flux2-dev (bench/flux_step.py's MODELS)")  # fmt: skip
    ap.add_argument("--cards", type=float, nargs="+", default=list(CARDS), help="emulated card sizes, GiB")
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--weights", nargs="+", default=["bf16", "fp8"], choices=["bf16", "fp8"])
    ap.add_argument("--modes", nargs="+", default=["dense", "ultragen"], choices=["dense", "ultragen"],
                    help="which cells of the card matrix (dense: ComfyUI unpatched, sizes up to 4096^2)")  # fmt: skip
    ap.add_argument("--big", type=float, nargs="*", default=[80], help="cards that also run 12288² and 16384²")
    ap.add_argument("--big-sizes", type=int, nargs="+", default=[12288, 16384])
    ap.add_argument("--whole-gpu", action="store_true", help="also the unconstrained GPU: UltraGen, its whole-block "
                    "version and the floor at 8192², and 12288² / 16384²")  # fmt: skip
    ap.add_argument("--dynamic-vram", action="store_true", help="ComfyUI 0.29's DynamicVRAM, as its main.py enables it")
    ap.add_argument("--queue", action="store_true", help="keep the model loaded between cells of one card and "
                    "one kind of weights, as an artist's queue of sizes would (faster; default: unload before every "
                    "cell)")  # fmt: skip
    ap.add_argument("--steps", type=int, default=2, help="Euler steps per cell, the last one timed (1: only the "
                    "first, as this benchmark did before 2026-12-02)")  # fmt: skip
    ap.add_argument("--allocator", choices=list(ALLOCATORS), default="cudaMallocAsync",
                    help="PyTorch's CUDA allocator (default: ComfyUI's, which its main.py picks on most NVIDIA "
                    "setups; native: ComfyUI with --disable-cuda-malloc, and every cell before 2026-12-02's third "
                    "round)")  # fmt: skip
    ap.add_argument("--segments-on-oom", action="store_true", help="record PyTorch's allocations (native "
                    "allocator); an out-of-memory cell's row lists the large segments and what holds them")  # fmt: skip
    ap.add_argument("--profile", nargs="?", const="gpu", choices=("gpu", "host"), help="profile each cell's steps: "
                    "gpu (the default): the timed one's largest GPU items, CUDA runtime calls and host-to-device "
                    "copies (torch's profiler: its seconds then include a large overhead); host: the host's time per "
                    "Python function (cProfile), e.g. copies that block it (bench/step_profile.py)")  # fmt: skip
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop starting cells after this many seconds")
    ap.add_argument("--comfyui", help="ComfyUI checkout (default: $COMFYUI_PATH)")
    ap.add_argument("--out", help="JSON path (default: bench/results/vram_cards.json)")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    with use_allocator(args.allocator):  # chosen before CUDA starts, checked after
        comfyui_on_gpu("vram_cards.py", args.comfyui, dynamic_vram=args.dynamic_vram)
    card = Card(args.dynamic_vram, queue=args.queue, segments_on_oom=args.segments_on_oom)
    cells = []
    if args.whole_gpu:
        for dtype in args.weights:
            cells += [(None, dtype, 8192, mode) for mode in ("floor", "ultragen", "ultragen-whole-blocks")]
        cells += [(None, "bf16", p, "ultragen") for p in (12288, 16384)]
    # Warm-up on the whole GPU, one step per size: Triton compiles its kernels and the attention schedules of
    # each size are built (then cached), which the timed cells would otherwise pay the first time. (12288^2 and
    # 16384^2 are warmed by their whole-GPU cells, which therefore include that.)
    cells = [(None, args.weights[0], p, "warm-up") for p in sorted(args.sizes)] + cells
    cards = [int(c) if c == int(c) else c for c in args.cards]
    cells += plan(cards, args.sizes, args.weights, args.big, args.big_sizes, args.modes)
    models = {}
    rows = []
    result = {**run_info(), "model": args.model, "dynamic_vram": args.dynamic_vram, "context_gib": CONTEXT_GIB,
              "queue": args.queue, "steps": args.steps, "allocator": args.allocator,
              "rows": rows}  # fmt: skip
    for gib, dtype, pixels, mode in cells:
        if time.perf_counter() - start > args.budget_s:
            rows.append({"card_gib": gib, "weights": dtype, "pixels": pixels, "mode": mode, "status": "not run"})
            continue
        if dtype not in models:
            t0 = time.perf_counter()
            models[dtype] = build(dtype, args.model)
            print(f"built {args.model} ({dtype}) on the CPU in {time.perf_counter() - t0:.0f} s", flush=True)
        rows.append(cell(card, models[dtype], gib, dtype, pixels, mode, args.model, args.steps, args.profile))
        write_json("vram_cards", result, args.out)
    card.set(None)
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    def show(r):
        if r is None:
            return "–"
        if r["status"] != "runs":
            return r["status"]
        return f"{r['s']:.1f} s, {r['peak_gib']:.1f} GiB"

    index = {(r["card_gib"], r["weights"], r["pixels"], r["mode"]): r for r in rows}
    print("\n| card | weights | size | ComfyUI dense | UltraGen | UltraGen activations |")
    print("|---|---|---|---|---|---|")
    for (gib, dtype, pixels, mode), r in index.items():
        if mode != "ultragen":
            continue
        dense = index.get((gib, dtype, pixels, "dense"))
        act = f"{r['activations_u']:.1f} U of {r['u_gib']:.2f} GiB" if r["status"] == "runs" else ""
        card = "whole GPU" if gib is None else f"{gib} GB"
        print(f"| {card} | {dtype} | {pixels}² | {show(dense)} | {show(r)} | {act} |")
    for dtype in ("bf16", "fp8"):
        whole, floor_, chunked = (index.get((None, dtype, 8192, m)) for m in ("ultragen-whole-blocks", "floor",
                                                                             "ultragen"))  # fmt: skip
        if chunked and floor_ and chunked["status"] == floor_["status"] == "runs":
            print(f"8192² {dtype}, whole GPU: chunked {chunked['s']:.2f} s = {chunked['s'] / floor_['s']:.2f}x the "
                  f"floor ({floor_['s']:.2f} s)" + (f"; whole blocks {whole['s']:.2f} s" if whole and
                                                    whole["status"] == "runs" else ""))  # fmt: skip
        small = index.get((24, dtype, 8192, "ultragen"))
        if small and chunked and small["status"] == chunked["status"] == "runs":
            print(f"8192² {dtype}: 24 GB card {small['s']:.2f} s = {small['s'] / chunked['s']:.2f}x the whole GPU")


if __name__ == "__main__":
    main()
