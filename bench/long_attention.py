"""The exact VAE's middle attention alone: one 512-wide head over every latent pixel, with and without the
softmax kernels.

At 8192^2 the decoder's middle attention is 1M tokens of one 512-channel head (~15 s of the exact decode on an
H200 before ``kernels/softmax_rows.py``); at 16384^2, 4M tokens (241 s of 297 s), met a key chunk at a time.
This times ``core/long_attention.attention`` on random bf16 q, k, v of those shapes, in one process: the Triton
passes (scores -> probabilities in bf16 in one pass) against PyTorch's operations (scale, softmax, cast), with the
VAE's budget for temporaries (``patch/vae_memory.band_budget``'s default, 2 GiB); the largest difference between
the two, and each one's to PyTorch's SDPA on the first 1,024 query rows (float32 reference).

    python bench/long_attention.py [--tokens 1048576 4194304] [--reps 1]

Prints a table and writes JSON (``bench/results/long_attention.json`` unless ``--out``).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from results_io import run_info, write_json

BUDGET = 2 << 30  # the exact VAE's budget for the attention's temporaries


def timed(fn, reps: int) -> tuple[float, torch.Tensor]:
    """Mean seconds of ``reps`` calls (the kernels were compiled on a small problem first)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        out = fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps, out


def one_length(length: int, reps: int) -> dict:
    """Both paths at one sequence length, in the VAE's budget."""
    from ultragen.core import long_attention
    from ultragen.kernels import softmax_rows

    g = torch.Generator(device="cuda").manual_seed(length)
    q, k, v = (torch.randn(1, length, 512, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    sample = slice(0, 1024)
    exact = F.scaled_dot_product_attention(q[:, None, sample].float(), k[:, None].float(), v[:, None].float())[:, 0]
    row, outs = {"tokens": length}, {}
    for name, kernels in (("kernels", True), ("pytorch", False)):
        original = softmax_rows.can_run_on
        if not kernels:
            softmax_rows.can_run_on = lambda device, dtype: False
        try:
            shape = long_attention.chunk_shape(length, BUDGET, long_attention.score_bytes(q, v))
            seconds, out = timed(lambda: long_attention.attention(q, k, v, BUDGET), reps)  # noqa: B023 (called here)
        finally:
            softmax_rows.can_run_on = original
        outs[name] = out
        row[name] = {"s": seconds, "chunk": list(shape),
                     "error_vs_float32": (out[:, sample].float() - exact).abs().max().item()}  # fmt: skip
        print(f"{length:>9} tokens, {name:8s}: {seconds:7.2f} s, chunks of {shape[0]} rows x {shape[1]} keys, "
              f"largest difference to float32 {row[name]['error_vs_float32']:.2e}", flush=True)  # fmt: skip
    row["kernels_vs_pytorch_max_diff"] = (outs["kernels"].float() - outs["pytorch"].float()).abs().max().item()
    row["speedup"] = row["pytorch"]["s"] / row["kernels"]["s"]
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1 << 20],
                    help="sequence lengths (8192^2: 1M; 16384^2: 4M, minutes with PyTorch's operations)")  # fmt: skip
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench/long_attention.py needs a CUDA GPU")
    from ultragen.core import long_attention

    small = torch.randn(1, 1 << 16, 512, device="cuda", dtype=torch.bfloat16)
    long_attention.attention(small, small, small, BUDGET)  # whole rows: compiles softmax_rows
    long_attention.attention(small, small, small, 6 * 1024 * 4096)  # key chunks: compiles exp_rows
    rows = []
    result = {**run_info(), "budget_bytes": BUDGET, "rows": rows}
    for length in args.tokens:
        rows.append(one_length(length, args.reps))
        out_path = write_json("long_attention", result, args.out)
        torch.cuda.empty_cache()
    print("\n| tokens | PyTorch's operations | softmax kernels | speedup | largest difference between them |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokens']:,} | {r['pytorch']['s']:.2f} s | {r['kernels']['s']:.2f} s | {r['speedup']:.2f}x "
              f"| {r['kernels_vs_pytorch_max_diff']:.2e} |")  # fmt: skip
    print(f"\nwrote {out_path}")


if __name__ == "__main__":
    main()
