"""Does the patch's own RoPE pass still earn its place next to ComfyUI's rotation?

ComfyUI 0.3.64 rotates q and k through float32 copies of both (~10 GB of temporaries per
attention call at 8192^2); that is why the patch takes the rotary table and rotates q and k
itself in one bf16 pass (``kernels/rope.py``). ComfyUI 0.29 rotates through comfy-kitchen
(``comfy.quant_ops.ck.apply_rope``, a fused CUDA kernel). This measures, in one process on
the ComfyUI given (``COMFYUI_PATH``, 0.29 for the comparison):

1. q and k of one FLUX attention call (24 heads x 128, bf16) at 4096^2 and 8192^2 with
   guidance at ratio 4: ours, ComfyUI's own ``apply_rope`` (comfy-kitchen on 0.29), and
   ComfyUI's float32 formula; milliseconds and extra memory, and the largest difference;
2. one UltraGen step of FLUX.1-dev (random bf16 weights, default options) with our pass and
   with the table handed back to ComfyUI (its attention then rotates before ours runs).

    COMFYUI_PATH=/path/to/ComfyUI-0.29 python bench/rope.py [--sizes 4096 8192]
"""

from __future__ import annotations

import argparse

import torch

from flux_step import MODELS, TEXT, build, measure, ultragen_model
from results_io import comfyui_on_gpu, run_info, write_json


def rope_table(length: int) -> torch.Tensor:
    """A FLUX.1 rotary table (1, 1, L, 64, 2, 2) float32 for random positions, built by ComfyUI's EmbedND."""
    from comfy.ldm.flux.layers import EmbedND

    ids = torch.rand(1, length, 3, device="cuda") * 1024
    return EmbedND(dim=128, theta=10000, axes_dim=[16, 56, 56])(ids)


def timed(fn, *args, reps: int = 10) -> tuple[float, float]:
    """Median milliseconds of ``fn(*args)`` and the peak GiB it allocates beyond what was allocated before."""
    fn(*args)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn(*args)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
        del out
    return sorted(times)[reps // 2], (torch.cuda.max_memory_allocated() - base) / 2**30


def kernel_rows(sizes: list[int]) -> list[dict]:
    import comfy.ldm.flux.math as flux_math

    from ultragen.kernels.rope import apply_rope

    rows = []
    for pixels in sizes:
        tokens = (pixels // 16) ** 2
        length = TEXT + tokens + tokens // 16
        gen = torch.Generator(device="cuda").manual_seed(pixels)
        q = torch.randn(1, 24, length, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
        k = torch.randn(1, 24, length, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
        pe = rope_table(length)
        float32_formula = flux_math.apply_rope  # ComfyUI 0.3.64: the only one
        if hasattr(flux_math, "_apply_rope1"):  # 0.29: the float32 formula it keeps for training

            def float32_formula(q, k, pe):
                return flux_math._apply_rope1(q, pe), flux_math._apply_rope1(k, pe)

        ways = {
            "ultragen": apply_rope,
            "comfyui": flux_math.apply_rope,  # comfy-kitchen where ComfyUI has it
            "comfyui-float32": float32_formula,
        }
        ref = [t.float() for t in float32_formula(q, k, pe)]
        row = {"pixels": pixels, "tokens": length}
        for name, rotate in ways.items():
            ms, extra = timed(rotate, q, k, pe)
            out = rotate(q, k, pe)
            diff = max((o.float() - r).abs().max().item() for o, r in zip(out, ref, strict=True))
            row[name] = {"ms": ms, "extra_gib": extra, "max_diff_vs_float32": diff}
            print(f"rope {pixels} {name:16s} {ms:8.2f} ms  +{extra:5.2f} GiB  max diff {diff:.2e}", flush=True)
        rows.append(row)
        del q, k, pe
        torch.cuda.empty_cache()
    return rows


class HandTableToComfyUI(torch.nn.Module):
    """The patch's rotary-table embedder, but giving the table to ComfyUI's attention (which then rotates)."""

    def __init__(self, embedder):
        super().__init__()
        self.embedder = embedder

    def forward(self, ids):
        return self.embedder.table(ids)


def step_rows(model, sizes: list[int], reps: int) -> list[dict]:
    rows = []
    for pixels in sizes:
        gen = torch.Generator(device="cuda").manual_seed(pixels)
        x = torch.randn(1, 16, pixels // 8, pixels // 8, device="cuda", dtype=torch.bfloat16, generator=gen)
        ctx = torch.randn(1, TEXT, 4096, device="cuda", dtype=torch.bfloat16, generator=gen)
        y = torch.randn(1, 768, device="cuda", dtype=torch.bfloat16, generator=gen)
        own = ultragen_model(model, pixels, "local")
        theirs = own.clone()
        theirs.add_object_patch(
            "diffusion_model.pe_embedder", HandTableToComfyUI(own.get_model_object("diffusion_model.pe_embedder"))
        )
        row = {"pixels": pixels}
        for name, m in (("ultragen-rope", own), ("comfyui-rope", theirs)):
            seconds, peak = measure(m, (x, ctx, y), reps)
            row[name] = {"s": seconds, "peak_gib": peak}
            print(f"step {pixels} {name:14s} {seconds:8.3f} s  peak {peak:6.1f} GiB", flush=True)
        rows.append(row)
        del x, ctx, y, own, theirs
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--reps", type=int, default=2, help="timed steps per configuration")
    ap.add_argument("--kernel-only", action="store_true", help="only the RoPE calls, no FLUX steps")
    ap.add_argument("--comfyui", help="ComfyUI checkout (default: $COMFYUI_PATH)")
    ap.add_argument("--out", help="JSON path (default: bench/results/rope.json)")
    args = ap.parse_args(argv)
    comfyui_on_gpu("rope.py", args.comfyui)
    info = run_info()
    try:
        import comfy_kitchen

        info["comfy_kitchen"] = {
            "version": getattr(comfy_kitchen, "__version__", "?"),
            "backends": {k: v.get("available") for k, v in comfy_kitchen.list_backends().items()},
        }
    except ImportError:
        info["comfy_kitchen"] = None
    print(f"ComfyUI {info['comfyui']}, comfy-kitchen: {info['comfy_kitchen']}", flush=True)
    kernels = kernel_rows(args.sizes)
    steps = [] if args.kernel_only else step_rows(build(MODELS["flux1-dev"]), args.sizes, args.reps)
    out = write_json("rope", {**info, "kernel": kernels, "step": steps}, args.out)

    print(f"\nRoPE on q and k of one attention call ({info['device']}, ComfyUI {info['comfyui']}): ms (+GiB)")
    print("| size | ours | ComfyUI's apply_rope | ComfyUI float32 formula |")
    print("|---|---|---|---|")
    for r in kernels:
        cells = " | ".join(
            f"{r[k]['ms']:.2f} (+{r[k]['extra_gib']:.2f})" for k in ("ultragen", "comfyui", "comfyui-float32")
        )
        print(f"| {r['pixels']}² | {cells} |")
    if not steps:
        return print(f"\nwrote {out}")
    print("\nOne UltraGen step (FLUX.1-dev, local guidance): s (peak GiB)")
    print("| size | our RoPE pass | table handed to ComfyUI | ours / ComfyUI's |")
    print("|---|---|---|---|")
    for r in steps:
        a, b = r["ultragen-rope"], r["comfyui-rope"]
        print(f"| {r['pixels']}² | {a['s']:.2f} ({a['peak_gib']:.1f}) | {b['s']:.2f} ({b['peak_gib']:.1f}) "
              f"| {a['s'] / b['s']:.3f} |")  # fmt: skip
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
