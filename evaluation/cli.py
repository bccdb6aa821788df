"""``ultragen-evaluate``: CLIP score, FID / KID and patch-FID / patch-KID of a folder of images.

Example (weights on local disk; nothing is downloaded)::

    ultragen-evaluate --images out/4k --reference laion_hr_10k/ --clip clip-vit-large-patch14/ \\
        --inception weights-inception-2015-12-05-6726825d.pth --json out/4k-metrics.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from .metrics import EvaluationError, LocalCLIP, evaluate, image_files, inception, prompts_for


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ultragen-evaluate",
        description="Image metrics of the UltraGen and ScaleDiff papers, from local weights only.",
    )
    p.add_argument("--images", required=True, type=Path, help="generated images (prompts in NAME.txt or --prompts)")
    p.add_argument("--prompts", type=Path, help="text file, one prompt per line, images in name order")
    p.add_argument("--reference", type=Path, help="real images for FID/KID (the papers: 10K LAION-High-Resolution)")
    p.add_argument("--clip", type=Path, help="CLIP model folder, Hugging Face format (for CLIP score)")
    p.add_argument("--inception", type=Path, help="FID InceptionV3 weights (torch-fidelity .pth; for FID/KID)")
    p.add_argument("--patch-size", type=int, default=1024, help="patch-FID crop size in px (native scale)")
    p.add_argument("--patches-per-image", type=int, default=10)
    p.add_argument("--kid-subset", type=int, default=1000, help="KID subset size (capped by the image count)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="patch positions")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path, help="also write the results here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only, never the network
    try:
        if args.clip is None and args.inception is None:
            raise EvaluationError(
                "nothing to compute: pass --clip DIR (CLIP score) and/or --inception PATH with --reference DIR "
                "(FID, KID, patch-FID, patch-KID)"
            )
        files = image_files(args.images)
        clip = prompts = None
        if args.clip is not None:
            clip = LocalCLIP.load(args.clip, args.device)
            prompts = prompts_for(files, args.prompts)
        features = None
        reference = None
        if args.inception is not None:
            features = inception(args.inception)
            if args.reference is None:
                raise EvaluationError("FID/KID compare against real images: pass --reference DIR")
            reference = image_files(args.reference)
        results = evaluate(
            files, prompts, reference, features, clip, patch_size=args.patch_size,
            patches_per_image=args.patches_per_image, kid_subset=args.kid_subset, batch=args.batch, seed=args.seed,
            device=args.device,
        )  # fmt: skip
    except EvaluationError as exc:
        raise SystemExit(f"ultragen-evaluate: {exc}") from exc
    skipped = [] if clip else ["clip_score (no --clip)"]
    skipped += [] if features is not None else ["fid, kid, patch_fid, patch_kid (no --inception)"]
    print(f"{'metric':<12} value   ({len(files)} images)")
    for key, value in results.items():
        print(f"{key:<12} {value:.4f}")
    for s in skipped:
        print(f"skipped: {s}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"images": len(files), **results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
