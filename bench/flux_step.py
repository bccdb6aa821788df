"""One FLUX denoising step at 2048^2, 4096^2, 8192^2: UltraGen-patched vs dense vs the floor.

The full FLUX.1-dev architecture (19 double + 38 single blocks, hidden 3072) — or with ``--model`` FLUX.2
klein 4B / 9B or dev (shapes in ``tests/random_models.py``, with their source) — with random
bf16 weights, run by the real ComfyUI (``COMFYUI_PATH``) through the same hooks as in
sampling. Four ways, in one process:

- floor: attention replaced by a copy of V — everything except attention, the least any
  attention scheme can cost (ComfyUI still applies RoPE to q and k before the copy);
- floor without RoPE: the same with RoPE skipped too — the least when RoPE is counted as
  part of attention (the patch applies RoPE itself, in one pass, inside its attention);
- UltraGen with default options (local guidance, ratio 4, radius 1 window) and with
  global guidance;
- dense: ComfyUI's own attention (PyTorch SDPA);
- UltraGen local with the chunked blocks in ComfyUI's operation order (``slice_ops.ONE_PASS_FORMS`` empty):
  the A/B of the blocks' one-pass forms, with the relative difference of the two steps' outputs up to 4096^2 (bf16
  noise: compare it with the dense-equivalence check's flex_attention line); ``--ablate`` adds UltraGen local with
  each form left out in turn (what each one is worth).

    COMFYUI_PATH=/path/to/ComfyUI python bench/flux_step.py [--sizes 2048 4096 8192]

Prints a table (seconds per step, peak VRAM) and writes JSON.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

from results_io import comfyui_on_gpu, run_info, write_json

TEXT = 512
COMFYUI_ORDER = "ultragen-local-comfyui-order"  # the chunked blocks without their one-pass forms
CONFIGS = ("floor", "floor-no-rope", "ultragen-local", COMFYUI_ORDER, "ultragen-global", "dense")
WITHOUT = "ultragen-local-without-"  # + a form: the one-pass forms but that one
TARGETS = {4096: 1.3, 8192: 1.4}  # patched step / floor (FLUX.1-dev)
FLUX2_TARGETS = {4096: 1.15, 8192: 1.15}  # issue 14


def one_pass_forms(config: str, forms: frozenset[str]) -> frozenset[str]:
    """Which of the chunked blocks' one-pass ``forms`` (``slice_ops.ALL_FORMS``) a configuration runs with."""
    if config == COMFYUI_ORDER:
        return frozenset()
    if config.startswith(WITHOUT):
        return forms - {config.removeprefix(WITHOUT)}
    return forms


@dataclass(frozen=True)
class Architecture:
    """A full architecture to benchmark: the name of its config in ``tests/random_models.py``, and the latent and
    text shapes read from that config (imported when first used: ``random_models`` imports ComfyUI)."""

    config: str

    @property
    def params(self) -> dict:
        import random_models

        return getattr(random_models, self.config)

    @property
    def flux2(self) -> bool:
        return self.params["image_model"] == "flux2"

    @property
    def config_class(self) -> str:  # ComfyUI's supported_models class
        return "Flux2" if self.flux2 else "Flux"

    @property
    def channels(self) -> int:  # latent channels
        return self.params["in_channels"]

    @property
    def pixels_per_latent(self) -> int:
        from ultragen.patch.flux_family import pixels_per_latent

        return pixels_per_latent(self.channels)

    @property
    def text_width(self) -> int:
        return self.params["context_in_dim"]

    @property
    def pooled(self) -> bool:  # FLUX.1's pooled CLIP vector
        return self.params["vec_in_dim"] is not None


MODELS = {
    "flux1-dev": Architecture("FLUX_DEV"),
    "flux2-klein-4b": Architecture("FLUX2_KLEIN_4B"),
    "flux2-klein-9b": Architecture("FLUX2_KLEIN_9B"),
    "flux2-dev": Architecture("FLUX2_DEV"),
}


def build(arch: Architecture):
    """The architecture built by ComfyUI on the GPU, bf16, weights N(0, 0.02)."""
    import random_models

    return random_models.flux_model(arch.params, dtype=torch.bfloat16, std=0.02, device=torch.device("cuda"),
                                    load_device="cuda", config_class=arch.config_class)  # fmt: skip


def step_inputs(arch: Architecture, pixels: int, seed: int):
    """A latent of ``pixels``², 512 text tokens and (FLUX.1) the pooled vector, bf16 on the GPU."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    side = pixels // arch.pixels_per_latent
    x = torch.randn(1, arch.channels, side, side, device="cuda", dtype=torch.bfloat16, generator=gen)
    ctx = torch.randn(1, TEXT, arch.text_width, device="cuda", dtype=torch.bfloat16, generator=gen)
    y = torch.randn(1, 768, device="cuda", dtype=torch.bfloat16, generator=gen) if arch.pooled else None
    return x, ctx, y


def floor_model(model):
    """Attention replaced by a copy of V, (B, H, L, D) -> (B, L, H * D)."""
    m = model.clone()

    def copy_of_v(func, q, k, v, heads, **kwargs):
        b, h, length, d = v.shape
        return v.transpose(1, 2).reshape(b, length, h * d)

    m.model_options["transformer_options"]["optimized_attention_override"] = copy_of_v
    return m


class NoRotaryTable(torch.nn.Module):
    """A pe_embedder that returns no table: FLUX's attention then rotates nothing."""

    def forward(self, ids):
        return None


def floor_without_rope_model(model):
    """The floor with RoPE skipped as well."""
    m = floor_model(model)
    m.add_object_patch("diffusion_model.pe_embedder", NoRotaryTable())
    return m


def ultragen_model(model, pixels: int, scope: str, arch: Architecture = MODELS["flux1-dev"]):
    from ultragen.patch import Guidance, PatchOptions, UltraGenFluxPatch

    side = pixels // arch.pixels_per_latent // 4
    gen = torch.Generator().manual_seed(1)
    guidance = Guidance(torch.randn(1, arch.channels, side, side, generator=gen), pixels, pixels)
    return UltraGenFluxPatch(PatchOptions(guidance_scope=scope), guidance=guidance).apply(model)


def check_dense_equivalent(model, arch: Architecture = MODELS["flux1-dev"]) -> tuple[float, float]:
    """Relative difference to ComfyUI's dense output, at 1024^2, of UltraGen options that allow every pair
    (Triton backend), and for scale the same through the flex backend: two independent kernels
    that agree with each other and with dense to the same degree show bf16 rounding, not a bug.

    Small windows whose neighbourhood reaches every window, text that sees everything, no NTK
    or shift: the full patch (token permutation, id rebuild, Triton kernel, restore) must give
    dense attention's answer up to bf16 rounding.
    """
    from ultragen.patch import PatchOptions, UltraGenFluxPatch

    x, ctx, y = step_inputs(arch, 1024, 7)
    options = dict(window=16, neighbour_radius=4, text_sees="all", ntk_factor=1.0, constant_shift=False)
    ref = step(model, x, ctx, y).float()
    out = step(UltraGenFluxPatch(PatchOptions(**options)).apply(model), x, ctx, y).float()
    flex = step(UltraGenFluxPatch(PatchOptions(backend="flex", **options)).apply(model), x, ctx, y).float()

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    return rel(out, ref), rel(flex, ref)


def step(model, x, ctx, y):
    from ultragen.patch.model_call import applied, denoise

    with applied(model):
        return denoise(model, x, 0.6, ctx, y, load=False)


def gib() -> str:
    return f"{torch.cuda.memory_allocated() / 2**30:.1f} GiB allocated"


def measure(model, inputs, reps: int) -> tuple[float, float]:
    """Median seconds per step over ``reps`` timed steps (after one warm-up unless reps == 0), peak GiB."""
    x, ctx, y = inputs
    if reps > 0:
        step(model, x, ctx, y)  # warm-up: kernel compilation, schedules, cuDNN plans
    times = []
    torch.cuda.reset_peak_memory_stats()
    for _ in range(max(reps, 1)):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = step(model, x, ctx, y)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        assert torch.isfinite(out).all(), "non-finite output"
        del out
    return sorted(times)[len(times) // 2], torch.cuda.max_memory_allocated() / 2**30


def memory_trace(model, pixels: int, arch: Architecture) -> None:
    """Peak memory per stage of one step (dense vs UltraGen local), to see where they part.

    Diagnostic only: plain forward hooks on the blocks, removed afterwards.
    """
    dm = model.model.diffusion_model
    stages = [("img_in", dm.img_in)] + [(f"double{i}", b) for i, b in enumerate(dm.double_blocks)]
    stages += [(f"single{i}", b) for i, b in enumerate(dm.single_blocks)] + [("final", dm.final_layer)]
    x, ctx, y = step_inputs(arch, pixels, pixels)
    for name, m in (("dense", model), ("ultragen-local", ultragen_model(model, pixels, "local", arch))):
        peaks: dict[str, tuple[float, float]] = {}
        handles = []
        for stage, module in stages:
            handles.append(module.register_forward_pre_hook(lambda *_: torch.cuda.reset_peak_memory_stats()))
            handles.append(module.register_forward_hook(
                lambda *_, stage=stage, peaks=peaks: peaks.__setitem__(
                    stage, (torch.cuda.memory_allocated() / 2**30, torch.cuda.max_memory_allocated() / 2**30)
                )
            ))  # fmt: skip
        try:
            step(m, x, ctx, y)
        finally:
            for h in handles:
                h.remove()
        worst = max(peaks.items(), key=lambda kv: kv[1][1])
        print(f"memory {pixels} {name:15s} " + " ".join(
            f"{k}:{peaks[k][1]:.1f}" for k in ("img_in", "double0", "double18", "single0", "single37", "final")
        ) + f"  | worst {worst[0]} peak {worst[1][1]:.2f} GiB, after it {worst[1][0]:.2f} GiB")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=list(MODELS), default="flux1-dev", help="the architecture (random weights)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--reps", type=int, default=2, help="timed steps per configuration (8192^2 dense: one)")
    ap.add_argument("--comfyui", help="ComfyUI checkout (default: $COMFYUI_PATH)")
    ap.add_argument("--out", help="JSON path (default: bench/results/flux_step.json)")
    ap.add_argument("--memory-trace", type=int, metavar="PIXELS", help="peak memory per stage at this size, then stop")
    ap.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS),
                    help="which ways to time (default: all; e.g. leave out dense, ~90 s a step at 8192^2)")  # fmt: skip
    ap.add_argument("--ablate", action="store_true", help="also UltraGen local with each one-pass form left out")
    ap.add_argument("--ablate-max", type=int, metavar="PIXELS", help="with --ablate: only at sizes up to this one")
    args = ap.parse_args(argv)
    comfyui_on_gpu("flux_step.py", args.comfyui)

    arch = MODELS[args.model]
    model = build(arch)
    print(f"{args.model} built: {gib()}", flush=True)
    if args.memory_trace:
        return memory_trace(model, args.memory_trace, arch)
    check, noise = check_dense_equivalent(model, arch)
    print(
        f"check at 1024^2: dense-equivalent UltraGen vs ComfyUI dense: relative difference {check:.2e} "
        f"(the same through flex_attention: {noise:.2e})",
        flush=True,
    )
    from ultragen.patch import slice_ops

    forms = sorted(slice_ops.ALL_FORMS)  # the ablation's order
    default_forms = slice_ops.ONE_PASS_FORMS
    rows = []
    result = {
        **run_info(),
        "model": args.model,
        "dense_equivalent_rel_diff_1024": check,
        "dense_equivalent_flex_rel_diff_1024": noise,
        "rows": rows,
    }
    for pixels in args.sizes:
        ablate = args.ablate and pixels <= (args.ablate_max or pixels)
        wanted = [*args.configs, *(f"{WITHOUT}{form}" for form in forms if ablate)]
        x, ctx, y = step_inputs(arch, pixels, pixels)
        makers = {
            "floor": lambda: floor_model(model),
            "floor-no-rope": lambda: floor_without_rope_model(model),
            "ultragen-local": lambda: ultragen_model(model, pixels, "local", arch),  # noqa: B023 (called here)
            COMFYUI_ORDER: lambda: ultragen_model(model, pixels, "local", arch),  # noqa: B023
            "ultragen-global": lambda: ultragen_model(model, pixels, "global", arch),  # noqa: B023
            "dense": lambda: model,
        }
        configs = {name: makers[name]() for name in CONFIGS if name in wanted}
        configs.update({name: makers["ultragen-local"]() for name in wanted if name.startswith(WITHOUT)})
        row = {"pixels": pixels}
        rows.append(row)
        for name, m in configs.items():
            reps = 0 if (name == "dense" and pixels >= 8192) else args.reps
            slice_ops.ONE_PASS_FORMS = one_pass_forms(name, slice_ops.ALL_FORMS)
            seconds, peak = measure(m, (x, ctx, y), reps)
            row[name] = {"s": seconds, "peak_gib": peak, "timed_steps": max(reps, 1)}
            print(f"step {pixels} {name:16s} {seconds:8.3f} s  peak {peak:6.1f} GiB  ({gib()})", flush=True)
            write_json("flux_step", result, args.out)  # after every timing: a run stopped early keeps what it measured
        if pixels <= 4096 and "ultragen-local" in configs:
            outs = []
            for name in ("ultragen-local", COMFYUI_ORDER):
                slice_ops.ONE_PASS_FORMS = one_pass_forms(name, slice_ops.ALL_FORMS)
                outs.append(step(configs["ultragen-local"], x, ctx, y).float())
            row["one_pass_vs_comfyui_order_rel_diff"] = ((outs[0] - outs[1]).norm() / outs[1].norm()).item()
            print(f"step {pixels} one-pass forms vs ComfyUI's order: relative difference "
                  f"{row['one_pass_vs_comfyui_order_rel_diff']:.2e}", flush=True)  # fmt: skip
            del outs
        slice_ops.ONE_PASS_FORMS = default_forms
        del x, ctx, y, configs
        torch.cuda.empty_cache()

    out = write_json("flux_step", result, args.out)
    device = result["device"]

    print(f"\nOne {args.model} step (random bf16 weights, batch 1, {TEXT} text tokens) on {device}: s (peak GiB)")
    print(
        "| size | floor | floor without RoPE | UltraGen (local guidance, default) | UltraGen, global guidance | dense "
        "| local / floor | global / floor | local / floor w/o RoPE | dense / local |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")

    def over(r: dict, a: str, b: str, digits: int = 2) -> str:
        return f"{r[a]['s'] / r[b]['s']:.{digits}f}x" if a in r and b in r else "–"

    for r in rows:
        names = ("floor", "floor-no-rope", "ultragen-local", "ultragen-global", "dense")
        cells = " | ".join(f"{r[k]['s']:.2f} ({r[k]['peak_gib']:.1f})" if k in r else "–" for k in names)
        local, wide = over(r, "ultragen-local", "floor"), over(r, "ultragen-global", "floor")
        print(
            f"| {r['pixels']}² | {cells} | {local} | {wide} "
            f"| {over(r, 'ultragen-local', 'floor-no-rope')} | {over(r, 'dense', 'ultragen-local', 1)} |"
        )
    print("\n| size | UltraGen local, one-pass forms | the same in ComfyUI's operation order | gain |")
    print("|---|---|---|---|")
    for r in (r for r in rows if "ultragen-local" in r and COMFYUI_ORDER in r):
        one, order = r["ultragen-local"], r[COMFYUI_ORDER]
        print(f"| {r['pixels']}² | {one['s']:.3f} s | {order['s']:.3f} s | {order['s'] / one['s']:.3f}x |")
    if args.ablate:
        print("\n| size | form left out | step | its worth (step without it - with all) |")
        print("|---|---|---|---|")
        for r in (r for r in rows if "ultragen-local" in r and f"{WITHOUT}{forms[0]}" in r):  # sizes ablated
            for form in forms:
                seconds = r[f"{WITHOUT}{form}"]["s"]
                print(f"| {r['pixels']}² | {form} | {seconds:.3f} s | {seconds - r['ultragen-local']['s']:+.3f} s |")
    targets = TARGETS if args.model == "flux1-dev" else FLUX2_TARGETS
    for r in rows:
        if r["pixels"] in targets:
            for scope in ("local", "global"):
                if f"ultragen-{scope}" not in r or "floor" not in r or "dense" not in r:
                    continue  # a way not timed in this run
                p = r[f"ultragen-{scope}"]
                ratio = p["s"] / r["floor"]["s"]
                dense_peak = r["dense"]["peak_gib"]
                ok = ratio <= targets[r["pixels"]] and p["peak_gib"] <= dense_peak
                print(
                    f"target {r['pixels']}² {scope}: step <= {targets[r['pixels']]}x floor and peak <= dense: "
                    f"{'met' if ok else 'MISSED'} ({ratio:.2f}x, {p['peak_gib']:.1f} vs {dense_peak:.1f} GiB)"
                )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
