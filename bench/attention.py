"""Attention benchmark at FLUX shapes: dense SDPA vs flex_attention vs our Triton kernel.

One attention layer of FLUX.1 (24 heads x 128, bf16) at 2048^2, 4096^2 and 8192^2 pixels:
512 text tokens, 16x16-token windows with 3x3 neighbours, guidance at ratio 4 (global,
or local within one window). All three run on the identical layout in the same process,
so ratios are comparable even on a noisy machine.

    python bench/attention.py                 # the table, written to bench/results/attention.json
    python bench/attention.py --check         # correctness at real sizes first
    python bench/attention.py --tune          # sweep Triton tile configs at 4096^2

Useful TFLOP/s counts only allowed (query, key) pairs: 4 * pairs * head_dim * heads.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from ultragen.core import AttentionRules, GuidanceSegment, ImageSegment, Layout, TextSegment
from ultragen.kernels import flex, triton_block_sparse

from results_io import run_info, write_json

HEADS, HEAD_DIM, TEXT = 24, 128, 512
TARGET_VS_FLEX, TARGET_VS_DENSE = 1.3, 0.9


def flux_layout(pixels: int, scope: str, width_pixels: int | None = None, **rules) -> Layout:
    """FLUX sequence at this size: text, 16x16-windowed image, ratio-4 guidance."""
    h, w = pixels // 16, (width_pixels or pixels) // 16
    segs = (TextSegment(TEXT), ImageSegment(h, w), GuidanceSegment(max(1, h // 4), max(1, w // 4)))
    return Layout(segs, AttentionRules(guidance_scope=scope, **rules))


def qkv(n: int, dtype=torch.bfloat16, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(1, HEADS, n, HEAD_DIM, device="cuda", dtype=dtype, generator=g) for _ in range(3)]


def median_ms(fn, budget_ms: float = 400.0) -> float:
    """Median of CUDA-event timings after a warm-up; few repetitions for slow calls."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    first = start.elapsed_time(end)
    reps = max(2, min(50, int(budget_ms / max(first, 1e-3))))
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def dense_sdpa(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v)


def triton_fn(layout: Layout, config: tuple, q, k, v, stats: dict | None = None):
    bm, bn, warps, stages, tma = config[:5]
    schedule = layout.block_schedule(bm, bn, q.device)
    scale = HEAD_DIM**-0.5
    return lambda: triton_block_sparse.block_sparse_attention(
        q, k, v, schedule, scale, num_warps=warps, num_stages=stages, kv_tma=tma, stats=stats
    )


def flex_fn(layout: Layout, q, k, v):
    schedule = layout.block_schedule(flex.BLOCK, flex.BLOCK, q.device)
    return lambda: flex.flex_block_sparse_attention(q, k, v, schedule, HEAD_DIM**-0.5)


def default_config(layout: Layout) -> tuple:
    """What sparse_attention's auto choice launches (the same for every layout)."""
    return tuple(triton_block_sparse.launch_config(HEAD_DIM, torch.device("cuda")))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def check(config: tuple | None) -> list[dict]:
    """Triton and flex against dense masked SDPA (float32) on real-size layouts."""
    cases = {
        "2048 global": flux_layout(2048, "global"),
        "2048 local": flux_layout(2048, "local"),
        "odd 1000x1336 local, hilbert": Layout(
            (TextSegment(300), ImageSegment(62, 83, token_order="hilbert"), GuidanceSegment(15, 21)),
            AttentionRules(guidance_scope="local", guidance_self_scope="local"),
        ),
        "npa offset (7, 23)": Layout(
            (TextSegment(256), ImageSegment(96, 80), GuidanceSegment(24, 20)),
            AttentionRules.npa(offset=(7, 23)),
        ),
    }
    rows = []
    for name, layout in cases.items():
        n = layout.seq_len
        q, k, v = qkv(n, seed=n)
        idx = torch.arange(n, device="cuda")
        mask = torch.cat([layout.predicate("cuda")(idx[i : i + 4096, None], idx[None]) for i in range(0, n, 4096)])
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
        out = torch.full_like(q, float("nan"))  # poisoned: an unwritten element shows as NaN
        cfg = config or default_config(layout)
        schedule = layout.block_schedule(cfg[0], cfg[1], "cuda")
        triton_block_sparse.block_sparse_attention(q, k, v, schedule, HEAD_DIM**-0.5, out, *cfg[2:5])
        row = {"case": name, "tokens": n, "triton_rel_err": rel_err(out, ref), "nan": bool(out.isnan().any())}
        row["flex_rel_err"] = rel_err(flex_fn(layout, q, k, v)(), ref)
        rows.append(row)
        print(f"check {name:32s} L={n:6d}  triton rel err {row['triton_rel_err']:.2e}  flex {row['flex_rel_err']:.2e}")
        del mask, ref
    return rows


# (BLOCK_M, BLOCK_N, warps, stages, TMA for K/V); what each measured: bench/NOTES.md
TUNE_CONFIGS = [
    (128, 128, 8, 2, True),
    (128, 128, 8, 2, False),
    (128, 128, 8, 3, True),
    (128, 64, 8, 2, True),
    (128, 64, 4, 2, False),
    (64, 64, 4, 3, False),
    (256, 64, 16, 2, True),
]


def dense_layout(pixels: int) -> Layout:
    """One window over the whole image, text sees all, no guidance: dense attention."""
    side = pixels // 16
    return Layout((TextSegment(TEXT), ImageSegment(side, side, window=(side, side))), AttentionRules(text_sees="all"))


def tune(pixels: int) -> list[dict]:
    rows = []
    layouts = {
        "global": flux_layout(pixels, "global"),
        "local": flux_layout(pixels, "local"),
        "dense": dense_layout(pixels),
    }
    for scope, layout in layouts.items():
        q, k, v = qkv(layout.seq_len)
        if scope == "dense":
            ms = median_ms(lambda q=q, k=k, v=v: dense_sdpa(q, k, v))
            tflops = 4 * layout.seq_len**2 * HEAD_DIM * HEADS / ms / 1e9
            rows.append({"pixels": pixels, "scope": scope, "config": "cuDNN SDPA", "ms": ms, "useful_tflops": tflops})
            print(f"tune {pixels} dense  cuDNN/flash SDPA {ms:8.3f} ms {tflops:6.0f} TFLOP/s")
        for config in TUNE_CONFIGS if scope != "dense" else TUNE_CONFIGS[:4]:
            stats = {}
            try:
                fn = triton_fn(layout, config, q, k, v, stats)
                ms = median_ms(fn)
            except Exception as exc:  # a config that does not compile is a result too
                print(f"tune {pixels} {scope} {config}: failed: {type(exc).__name__}: {str(exc)[:300]}")
                continue
            pairs = layout.block_schedule(config[0], config[1], "cuda").allowed_pairs
            tflops = 4 * pairs * HEAD_DIM * HEADS / ms / 1e9
            rows.append(
                {"pixels": pixels, "scope": scope, "config": config, "ms": ms, "useful_tflops": tflops, **stats}
            )
            print(f"tune {pixels} {scope:6s} BM={config[0]:3d} BN={config[1]:3d} warps={config[2]:2d} "
                  f"stages={config[3]} tma={config[4]:d} {ms:8.3f} ms {tflops:6.0f} TFLOP/s "
                  f"regs={stats.get('n_regs')} spills={stats.get('n_spills')} smem={stats.get('shared')}")  # fmt: skip
        del q, k, v
        torch.cuda.empty_cache()
    return rows


def profile_once(pixels: int, config: tuple) -> None:
    """One layout, two launches of the kernel: for `ncu -k regex:_block_sparse -c 1`."""
    layout = flux_layout(pixels, "global")
    q, k, v = qkv(layout.seq_len)
    fn = triton_fn(layout, config, q, k, v)
    fn()
    fn()
    torch.cuda.synchronize()


def benchmark(sizes: list[int], fixed_config: tuple | None) -> list[dict]:
    rows = []
    for pixels in sizes:
        dense_ms = None
        for scope in ("global", "local"):
            layout = flux_layout(pixels, scope)
            n = layout.seq_len
            q, k, v = qkv(n)
            t0 = time.time()
            config = fixed_config or default_config(layout)
            layout.block_schedule(config[0], config[1], "cuda")
            layout.block_schedule(flex.BLOCK, flex.BLOCK, "cuda")
            build_s = time.time() - t0
            if dense_ms is None:
                dense_ms = median_ms(lambda q=q, k=k, v=v: dense_sdpa(q, k, v), budget_ms=2000)
            dense_tflops = 4 * n * n * HEAD_DIM * HEADS / dense_ms / 1e9
            pairs = layout.block_schedule(config[0], config[1], "cuda").allowed_pairs
            useful = 4 * pairs * HEAD_DIM * HEADS / 1e9
            t_ms = median_ms(triton_fn(layout, config, q, k, v))
            f_ms = median_ms(flex_fn(layout, q, k, v))
            row = {
                "pixels": pixels,
                "scope": scope,
                "triton_config": config,
                "tokens": n,
                "density": pairs / n / n,
                "schedule_build_s": build_s,
                "dense_ms": dense_ms,
                "dense_tflops": dense_tflops,
                "flex_ms": f_ms,
                "flex_useful_tflops": useful / f_ms,
                "triton_ms": t_ms,
                "triton_useful_tflops": useful / t_ms,
                "triton_vs_flex": f_ms / t_ms,
                "triton_vs_dense_speedup": dense_ms / t_ms,
                "triton_useful_vs_dense_tflops": (useful / t_ms) / dense_tflops,
            }
            rows.append(row)
            print(
                f"bench {pixels} {scope}: dense {dense_ms:.1f} ms, flex {f_ms:.2f} ms, triton {t_ms:.2f} ms "
                f"(BM, BN, warps, stages, tma = {config}; schedules built in {build_s:.2f} s)",
                flush=True,
            )
            del q, k, v
            torch.cuda.empty_cache()
    return rows


def print_table(rows: list[dict], device: str) -> None:
    print(f"\nOne FLUX attention layer, {HEADS} heads x {HEAD_DIM}, bf16, on {device}")
    head = "| size | guidance | density | dense SDPA | flex | Triton | Triton vs flex | Triton useful / dense TFLOP/s |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        print(
            f"| {r['pixels']}² | {r['scope']} | {r['density']:.1%} "
            f"| {r['dense_ms']:.1f} ms ({r['dense_tflops']:.0f} TFLOP/s) "
            f"| {r['flex_ms']:.2f} ms ({r['flex_useful_tflops']:.0f}) "
            f"| {r['triton_ms']:.2f} ms ({r['triton_useful_tflops']:.0f}) "
            f"| {r['triton_vs_flex']:.2f}x | {r['triton_useful_vs_dense_tflops']:.0%} |"
        )
    for r in rows:
        if r["pixels"] >= 4096:
            ok_flex = r["triton_vs_flex"] >= TARGET_VS_FLEX
            ok_dense = r["triton_useful_vs_dense_tflops"] >= TARGET_VS_DENSE
            print(
                f"target {r['pixels']}² {r['scope']}: Triton >= {TARGET_VS_FLEX}x flex: "
                f"{'met' if ok_flex else 'MISSED'} ({r['triton_vs_flex']:.2f}x); >= {TARGET_VS_DENSE:.0%} of dense "
                f"TFLOP/s: {'met' if ok_dense else 'MISSED'} ({r['triton_useful_vs_dense_tflops']:.0%})"
            )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192], help="image side in pixels")
    ap.add_argument("--check", action="store_true", help="check correctness at real sizes first")
    ap.add_argument("--tune", action="store_true", help="sweep Triton tile configs at 4096^2 and stop")
    ap.add_argument("--config", help="Triton config BM,BN,warps,stages,tma (e.g. 128,128,8,2,1)")
    ap.add_argument("--profile-once", action="store_true", help="launch the kernel twice at 4096^2 and stop")
    ap.add_argument("--out", help="JSON path (default: bench/results/attention.json)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench/attention.py needs a CUDA GPU")
    config = None  # per layout, as sparse_attention(backend="auto") chooses
    if args.config:
        parts = [int(x) for x in args.config.split(",")]
        config = (*parts[:4], bool(parts[4]) if len(parts) > 4 else False)
    if args.profile_once:
        return profile_once(4096, config or default_config(flux_layout(4096, "global")))
    result = {**run_info(), "triton_config": config}
    if args.check:
        result["check"] = check(config)
    if args.tune:
        result["tune"] = tune(4096)
    else:
        result["rows"] = benchmark(args.sizes, config)
    out = write_json("attention", result, args.out)
    if "rows" in result:
        print_table(result["rows"], result["device"])
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
