"""Guidance LoRA training speed and memory: a full architecture (FLUX.1-dev, FLUX.2 klein 4B / 9B), random
weights, 1024^2.

The trainer of ``ultragen-train`` (peft guidance-row LoRA, rank/alpha 16, UltraGen layout,
bf16, gradient checkpointing), batch 1 at 1024^2 with guidance at 256^2, on a synthetic
cached dataset (random latents of the model's latent format, 512 text tokens of its text width;
FLUX.1's pooled vector where it has one): optimizer steps per second after the first (compiling)
steps, and peak GPU memory. The bars: batch 1 fits in 80 GB (FLUX.1-dev); klein 4B fits a single GPU.

    COMFYUI_PATH=/path/to/ComfyUI python bench/train.py [--model flux2-klein-4b] [--steps 8] [--targets qkv all]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from flux_step import MODELS, Architecture
from results_io import comfyui_on_gpu, run_info, write_json


def synthetic_cache(folder: Path, arch: Architecture, count: int = 4, size: int = 1024, ratio: int = 4) -> list[Path]:
    """Cached examples as ``ultragen-train``'s cache holds them, shaped for ``arch``: latents of its channels at its
    pixels per latent, 512 text tokens of its width, FLUX.1's pooled vector (FLUX.2: none, an empty tensor)."""
    files = []
    side = size // arch.pixels_per_latent
    for i in range(count):
        g = torch.Generator().manual_seed(i)
        tensors = {
            "latent": torch.randn(arch.channels, side, side, generator=g),
            "guidance": torch.randn(arch.channels, side // ratio, side // ratio, generator=g),
            "context": torch.randn(512, arch.text_width, generator=g),
            "pooled": torch.randn(arch.params["vec_in_dim"], generator=g) if arch.pooled else torch.zeros(0),
        }
        files.append(folder / f"{i}.safetensors")
        save_file(tensors, str(files[-1]))
    return files


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=list(MODELS), default="flux1-dev", help="the architecture (random weights)")
    ap.add_argument("--steps", type=int, default=8, help="timed optimizer steps (after 2 warm-up steps)")
    ap.add_argument("--targets", nargs="+", default=["qkv", "all"])
    ap.add_argument("--out", help="JSON path (default: bench/results/train.json)")
    args = ap.parse_args(argv)
    comfyui_on_gpu("train.py")

    from ultragen.training.dataset import CachedDataset
    from ultragen.training.trainer import GuidanceLoRATrainer, TrainSettings

    from random_models import flux_model

    arch = MODELS[args.model]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dataset = CachedDataset(synthetic_cache(Path(tmp), arch))
        for targets in args.targets:
            cuda = torch.device("cuda")
            model = flux_model(arch.params, dtype=torch.bfloat16, std=0.02, device=cuda, load_device=cuda,
                               config_class=arch.config_class)  # fmt: skip
            settings = TrainSettings(steps=2 + args.steps, grad_accum=1, targets=targets, save_every=0, sample_every=0)
            trainer = GuidanceLoRATrainer(model, dataset, Path(tmp) / targets, settings, device=cuda)
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            trainer.train(until=2)
            torch.cuda.synchronize()
            warmup = time.perf_counter() - start
            start = time.perf_counter()
            loss = trainer.train()
            torch.cuda.synchronize()
            seconds = (time.perf_counter() - start) / args.steps
            params = sum(p.numel() for p in trainer.params)
            row = {
                "targets": targets, "lora_params": params, "adapted_layers": len(trainer.layers),
                "warmup_s": warmup, "step_s": seconds, "it_per_s": 1 / seconds,
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "last_loss": loss,
            }  # fmt: skip
            print(row, flush=True)
            rows.append(row)
            del trainer, model
            torch.cuda.empty_cache()
    result = {**run_info(), "model": args.model, "size": 1024, "guidance": 256, "batch": 1, "rows": rows}
    out = write_json("train", result, args.out)
    print(f"\nGuidance LoRA training, {args.model} architecture (random bf16 weights), 1024² + 256² guidance, "
          f"batch 1, gradient checkpointing, on {result['device']}")  # fmt: skip
    print("| targets | LoRA params | it/s | s/step | peak GiB | first 2 steps (compile) s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['targets']} | {r['lora_params'] / 1e6:.1f} M | {r['it_per_s']:.2f} | {r['step_s']:.2f} "
              f"| {r['peak_gib']:.1f} | {r['warmup_s']:.0f} |")  # fmt: skip
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
