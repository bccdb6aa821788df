"""The training set: a folder of images with captions, encoded once into a cache.

Why a cache: the text encoders (T5-XXL alone is ~9.5 GB) and the VAE are needed only to
turn each image and caption into latents and embeddings; doing that once, before training,
keeps them out of memory while FLUX trains, and a resumed or repeated run skips it.

Folder layout: ``name.png`` (or .jpg/.jpeg/.webp) with either ``name.txt`` (its caption)
or ``name.safetensors`` (precomputed text embeddings: ``context`` (L, 4096) and
``pooled`` (768,), as FLUX's T5 and CLIP-L give them; FLUX.2 has no pooled vector: empty). The cache holds, per image,
``latent`` (the size x size crop, VAE latent space as VAEEncode gives it), ``guidance``
(the same crop at size / ratio), ``context`` and ``pooled``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import UltraGenError
from ..image_files import IMAGE_SUFFIXES, images_in, rgb_tensor

CACHE_DIR = ".ultragen_cache"

EncodeImage = Callable[[torch.Tensor], torch.Tensor]  # (1, H, W, 3) in [0, 1] -> (1, C, H/8, W/8)
# caption -> context (L, D), pooled (P,) or None (FLUX.2 has none; cached as an empty tensor)
EncodeText = Callable[[str], tuple[torch.Tensor, torch.Tensor | None]]


class DatasetError(UltraGenError, ValueError):
    """A training folder that cannot be used; the message says what to fix."""


@dataclass(frozen=True)
class Item:
    image: Path
    caption: str | None  # None: embeddings precomputed in ``embeddings``
    embeddings: Path | None


def scan_folder(folder: Path) -> list[Item]:
    """Every image of ``folder`` with its caption or precomputed embeddings, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"training folder not found: {folder}")
    items, missing = [], []
    for image in images_in(folder):
        text, emb = image.with_suffix(".txt"), image.with_suffix(".safetensors")
        if emb.is_file():
            items.append(Item(image, None, emb))
        elif text.is_file():
            items.append(Item(image, text.read_text(encoding="utf-8").strip(), None))
        else:
            missing.append(image.name)
    if missing:
        raise DatasetError(
            f"{len(missing)} image(s) have no caption: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}; "
            "put each caption in a .txt file of the same name (or precomputed embeddings in a .safetensors file)"
        )
    if not items:
        raise DatasetError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return items


def load_crops(path: Path, size: int, ratio: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The centre square crop of an image at ``size`` px and at ``size // ratio`` px, (1, H, W, 3) in [0, 1]."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        square = im.crop((left, top, left + side, top + side))
        high = square.resize((size, size), Image.Resampling.LANCZOS)
        low = square.resize((size // ratio, size // ratio), Image.Resampling.LANCZOS)

    return rgb_tensor(high)[None] / 255.0, rgb_tensor(low)[None] / 255.0


def _embeddings(item: Item, encode_text: EncodeText | None) -> tuple[torch.Tensor, torch.Tensor]:
    if item.embeddings is not None:
        saved = load_file(str(item.embeddings))
        if "context" not in saved:
            raise DatasetError(
                f"{item.embeddings.name} must hold 'context' (L, D) and, for FLUX.1, 'pooled' (768,) tensors"
            )
        return saved["context"], saved.get("pooled", torch.zeros(0))
    if encode_text is None:
        raise DatasetError(
            f"{item.image.name} has a caption but no text encoders were given: pass --clip-l and --t5 (FLUX.1) or "
            "--text-encoder (FLUX.2), or put precomputed embeddings beside each image"
        )
    context, pooled = encode_text(item.caption)
    return context, torch.zeros(0) if pooled is None else pooled  # FLUX.2: no pooled vector


def build_cache(
    items: list[Item],
    cache: Path,
    size: int,
    ratio: int,
    encode_image: EncodeImage | None,
    encode_text: EncodeText | None,
    progress: Callable[[Iterator], Iterator] = iter,
) -> list[Path]:
    """Encode every item not yet cached at this size and ratio; returns the cache files in item order."""
    cache.mkdir(parents=True, exist_ok=True)
    files, todo = [], []
    for item in items:
        f = cache / f"{item.image.stem}-{size}-r{ratio}.safetensors"
        files.append(f)
        if not f.is_file() or f.stat().st_mtime < item.image.stat().st_mtime:
            todo.append((item, f))
    if todo and encode_image is None:
        raise DatasetError(f"{len(todo)} image(s) are not encoded yet: pass --vae (the model's VAE file)")
    for item, f in progress(todo):
        high, low = load_crops(item.image, size, ratio)
        context, pooled = _embeddings(item, encode_text)
        tensors = {
            "latent": encode_image(high)[0],
            "guidance": encode_image(low)[0],
            "context": context.reshape(-1, context.shape[-1]),
            "pooled": pooled.reshape(-1),
        }
        save_file({k: v.float().contiguous().cpu() for k, v in tensors.items()}, str(f))
    return files


@dataclass(frozen=True)
class Example:
    latent: torch.Tensor  # (1, C, h, w)
    guidance: torch.Tensor  # (1, C, h / ratio, w / ratio)
    context: torch.Tensor  # (1, L, D)
    pooled: torch.Tensor  # (1, P)


class CachedDataset:
    """The cache, read in a seeded order: micro-batch ``i`` is the same on every run (exact resume)."""

    def __init__(self, files: list[Path], seed: int = 0):
        self.files = list(files)
        self.seed = seed
        self._loaded: dict[int, Example] = {}

    def __len__(self) -> int:
        return len(self.files)

    def index(self, i: int) -> int:
        epoch, pos = divmod(i, len(self.files))
        order = torch.randperm(len(self.files), generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
        return int(order[pos])

    def example(self, k: int) -> Example:
        if k not in self._loaded:
            t = load_file(str(self.files[k]))
            self._loaded[k] = Example(t["latent"][None], t["guidance"][None], t["context"][None], t["pooled"][None])
        return self._loaded[k]

    def batch(self, i: int, size: int) -> Example:
        """Micro-batch ``i`` of ``size`` examples (consecutive positions of the seeded order)."""
        parts = [self.example(self.index(i * size + j)) for j in range(size)]
        context_len = max(p.context.shape[1] for p in parts)
        context = torch.cat(
            [torch.nn.functional.pad(p.context, (0, 0, 0, context_len - p.context.shape[1])) for p in parts]
        )
        return Example(
            latent=torch.cat([p.latent for p in parts]),
            guidance=torch.cat([p.guidance for p in parts]),
            context=context,
            pooled=torch.cat([p.pooled for p in parts]),
        )
