"""PNG files in ComfyUI's output folder, named, counted and tagged as its Save Image names, counts and tags them,
written by :mod:`png_writer` on every CPU core.

Why apart from the node: the folder, counter and metadata rules are ComfyUI's (``folder_paths``, ``--disable-
metadata``, the prompt and workflow it embeds so that dropping the file on the canvas opens the workflow), the
writer is not.
"""

from __future__ import annotations

import json
import os

import folder_paths
import torch
from comfy.cli_args import args

from ..png_writer import write_png


def png_text(prompt: dict | None, extra_pnginfo: dict | None) -> dict[str, str]:
    """The text chunks Save Image writes: the prompt and each extra_pnginfo entry (the workflow) as JSON, none
    with ``--disable-metadata``."""
    if args.disable_metadata:
        return {}
    text = {} if prompt is None else {"prompt": json.dumps(prompt)}
    for key, value in (extra_pnginfo or {}).items():
        text[key] = json.dumps(value)
    return text


def save_pngs(
    images: torch.Tensor,
    filename_prefix: str,
    prompt: dict | None = None,
    extra_pnginfo: dict | None = None,
    threads: int | None = None,
) -> list[dict[str, str]]:
    """Save ``images`` ``(B, H, W, C)`` in [0, 1] to the output folder as ``<prefix>_<counter>_.png`` (Save
    Image's names: ``%batch_num%``, dates and node values in the prefix work the same). Each file appears whole:
    it is written under a temporary name and renamed. ``threads``: the writer's (default: every core). Returns
    each file's name and subfolder."""
    folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(
        filename_prefix, folder_paths.get_output_directory(), images[0].shape[1], images[0].shape[0]
    )
    text = png_text(prompt, extra_pnginfo)
    results = []
    for batch_number, image in enumerate(images):
        file = f"{filename.replace('%batch_num%', str(batch_number))}_{counter:05}_.png"
        path = os.path.join(folder, file)
        pixels = image.detach().cpu()
        if pixels.dtype == torch.bfloat16:  # the one float type numpy lacks
            pixels = pixels.float()
        try:
            with open(path + ".part", "wb") as out:
                write_png(out, pixels.numpy(), text, threads=threads)
            os.replace(path + ".part", path)
        finally:
            if os.path.exists(path + ".part"):  # a failed write (a full disk) leaves no partial file behind
                os.remove(path + ".part")
        results.append({"filename": file, "subfolder": subfolder})
        counter += 1
    return results
