"""Saving a PNG: ComfyUI's Save Image against the pack's Fast Save Image, on the same image, in the same process.

Why: at 8K, Save Image (Pillow's one-core encoder) takes as long as two sampling steps; Fast Save Image writes
the same pixels and metadata on every core (``png_writer.py``). Both run as ComfyUI runs them (its node class,
and the function the pack's node calls), into a temporary output folder; the image is photo-like (smooth
gradients with fine noise: the compression's speed depends on the content, so the chain's own images are timed
in ``pipeline.py``). No GPU needed; ``--threads`` limits Fast Save's threads (a smaller CPU).

    COMFYUI_PATH=/path/to/ComfyUI python bench/png_save.py [--sizes 2048 4096 8192] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from results_io import run_info, write_json


def photo_like(size: int, seed: int = 0) -> torch.Tensor:
    """(1, size, size, 3) float in [0, 1]: a smooth random field upsampled, plus fine noise."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, 48, 48, generator=g)
    image = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    image = image + 0.02 * torch.randn(image.shape, generator=g)
    return image.clamp(0, 1).permute(0, 2, 3, 1).contiguous()


def seconds(save, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        save()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--threads", type=int, help="Fast Save's threads (default: every core this process may use)")
    ap.add_argument("--comfyui", help="ComfyUI checkout (default: $COMFYUI_PATH)")
    ap.add_argument("--out", help="JSON path (default: bench/results/png-save.json)")
    args = ap.parse_args(argv)

    from ultragen.comfy_env import find_comfyui, import_comfyui

    path = find_comfyui(args.comfyui)
    if path is None:
        sys.exit("bench/png_save.py needs ComfyUI: set COMFYUI_PATH=/path/to/ComfyUI")
    import_comfyui(path, cpu=True, also=("nodes",))
    import folder_paths

    import nodes
    from ultragen import png_writer
    from ultragen.patch import png_files

    cores = args.threads or png_writer.usable_cores()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        folder_paths.set_output_directory(folder)
        prompt, extra = {"1": {"class_type": "X", "inputs": {}}}, {"workflow": {"nodes": []}}
        for size in args.sizes:
            image = photo_like(size)
            repeats = 3 if size <= 4096 else 2
            theirs = seconds(lambda image=image: nodes.SaveImage().save_images(image, "theirs", prompt, extra), repeats)
            ours = seconds(lambda image=image: png_files.save_pngs(image, "ours", prompt, extra, args.threads), repeats)
            sizes = {name: max(Path(folder).glob(f"{name}_*.png")).stat().st_size for name in ("theirs", "ours")}
            for stale in Path(folder).glob("*.png"):
                stale.unlink()
            rows.append({"size": size, "save_image_s": round(theirs, 4), "fast_save_s": round(ours, 4),
                         "speedup": round(theirs / ours, 2), "save_image_mb": round(sizes["theirs"] / 1e6, 2),
                         "fast_save_mb": round(sizes["ours"] / 1e6, 2)})  # fmt: skip
    print(f"| image | Save Image | Fast Save Image ({cores} threads) | speedup | file size (theirs / ours) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']}² | {r['save_image_s']:.2f} s | {r['fast_save_s']:.2f} s | {r['speedup']:.1f}× "
              f"| {r['save_image_mb']:.1f} / {r['fast_save_mb']:.1f} MB |")  # fmt: skip
    result = {**run_info(), "threads": cores, "content": "photo-like (smooth random field + 2% noise)", "rows": rows}
    print("wrote", write_json("png-save", result, args.out))


if __name__ == "__main__":
    main()
