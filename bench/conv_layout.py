"""The exact VAE's 3x3 convolutions in PyTorch's two memory layouts: NCHW (what ``core/split_ops.py`` runs) against
channels_last, with cuDNN's autotuning off (ComfyUI's default) and on.

Why: an 8192^2 exact decode takes ~8 s on an H200, several times what its convolutions' arithmetic needs; whether
keeping the VAE's activations channels_last would pay for the layout change is read off these numbers (the band
shapes are the exact VAE's: ~64M-element bands at each level, and 1026-row blocks). The conversion's own cost is
printed beside each row: a layout change pays only where activations stay channels_last between layers.

    python bench/conv_layout.py [--out bench/results/vae-conv-layout.json]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from attention import median_ms

from results_io import run_info, write_json

SHAPES = [(128, 66, 8192), (256, 66, 4096), (512, 130, 2048), (512, 1026, 1024), (128, 1026, 8192)]  # C, rows, W


def measure(channels: int, rows: int, width: int) -> dict:
    """One band: (1, C, rows, W) with its halo rows, columns padded by the convolution."""
    x = torch.randn(1, channels, rows, width, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(channels, channels, 3, 3, device="cuda", dtype=torch.bfloat16) * 0.02
    bias = torch.zeros(channels, device="cuda", dtype=torch.bfloat16)
    x_cl, weight_cl = (t.contiguous(memory_format=torch.channels_last) for t in (x, weight))
    tflop = 2 * 9 * channels * channels * (rows - 2) * width / 1e12
    row = {"channels": channels, "rows": rows, "width": width}
    for autotune in (False, True):
        torch.backends.cudnn.benchmark = autotune
        for layout, (a, w) in (("nchw", (x, weight)), ("channels_last", (x_cl, weight_cl))):
            ms = median_ms(lambda a=a, w=w: F.conv2d(a, w, bias, padding=(0, 1)))
            row[f"{layout}{'_autotuned' if autotune else ''}_ms"] = round(ms, 3)
            row[f"{layout}{'_autotuned' if autotune else ''}_tflops"] = round(tflop / (ms / 1e3), 1)
    row["to_channels_last_ms"] = round(median_ms(lambda: x.contiguous(memory_format=torch.channels_last)), 3)
    torch.backends.cudnn.benchmark = False
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="JSON path (default: bench/results/vae-conv-layout.json)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/conv_layout.py needs a CUDA GPU")
    rows = [measure(*shape) for shape in SHAPES]
    print(
        "| band (C x rows x W) | NCHW | channels_last | NCHW, autotuned | channels_last, autotuned | to channels_last |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        cells = [f"{r[k + '_ms']:.2f} ms ({r[k + '_tflops']:.0f} TFLOP/s)"
                 for k in ("nchw", "channels_last", "nchw_autotuned", "channels_last_autotuned")]  # fmt: skip
        band = f"{r['channels']} x {r['rows']} x {r['width']}"
        print(f"| {band} | " + " | ".join(cells) + f" | {r['to_channels_last_ms']:.2f} ms |")
    print("wrote", write_json("vae-conv-layout", {**run_info(), "rows": rows}, args.out))


if __name__ == "__main__":
    main()
