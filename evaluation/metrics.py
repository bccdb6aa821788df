"""The papers' image metrics: CLIP score, FID / KID, and their patch versions.

Why these and this way: UltraGen and ScaleDiff report CLIP score (prompt alignment), FID and
KID against real images (global quality) and patch-FID / patch-KID on crops at the native
pixel scale (local detail, which a 299-px resize of a 4K image hides). FID and KID come
from torchmetrics (its InceptionV3 features via torch-fidelity when weights are given);
CLIP score is the definition of Hessel et al. (100 x max(cos, 0), averaged) on a local
Hugging Face CLIP, computed here because torchmetrics 1.9's CLIPScore breaks on
transformers 5 (its image features became an output object). Nothing is ever downloaded.

Images are uint8 (3, H, W) tensors throughout; feature networks take uint8
(B, 3, 299, 299) and return (B, F).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import UltraGenError
from ..image_files import IMAGE_SUFFIXES, images_in, rgb_tensor

INCEPTION_SIZE = 299
INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS}"


class EvaluationError(UltraGenError, ValueError):
    """Inputs the evaluation cannot use; the message says what to provide."""


def image_files(folder: Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise EvaluationError(f"image folder not found: {folder}")
    files = images_in(folder)
    if not files:
        raise EvaluationError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files


def read_image(path: Path) -> torch.Tensor:
    """(3, H, W) uint8."""
    from PIL import Image

    with Image.open(path) as im:
        return rgb_tensor(im).permute(2, 0, 1).contiguous()


def prompts_for(files: list[Path], prompts_file: Path | None = None) -> list[str]:
    """Each image's prompt: line i of ``prompts_file`` (images in name order), else ``name.txt``."""
    if prompts_file is not None:
        lines = [line.strip() for line in Path(prompts_file).read_text(encoding="utf-8").splitlines() if line.strip()]
        if len(lines) != len(files):
            raise EvaluationError(
                f"{prompts_file} has {len(lines)} prompts for {len(files)} images; give one line per image, "
                "in the images' name order"
            )
        return lines
    missing = [f.name for f in files if not f.with_suffix(".txt").is_file()]
    if missing:
        raise EvaluationError(
            f"no prompt for {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}: put each prompt in a .txt "
            "file of the same name, or pass --prompts with one line per image"
        )
    return [f.with_suffix(".txt").read_text(encoding="utf-8").strip() for f in files]


def resized(images: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> (B, 3, size, size) uint8, antialiased bilinear."""
    if images.shape[-2:] == (size, size):
        return images
    out = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8)


def random_crops(image: torch.Tensor, size: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` crops of size x size at random positions of (3, H, W) -> (count, 3, size, size)."""
    h, w = image.shape[-2:]
    if h < size or w < size:
        raise EvaluationError(f"an image of {w}x{h} px is smaller than the {size}-px patches; lower --patch-size")
    ys = torch.randint(0, h - size + 1, (count,), generator=generator)
    xs = torch.randint(0, w - size + 1, (count,), generator=generator)
    return torch.stack([image[:, y : y + size, x : x + size] for y, x in zip(ys.tolist(), xs.tolist(), strict=True)])


# -- feature networks -----------------------------------------------------------------------
def inception(weights: Path | None) -> torch.nn.Module:
    """FID's InceptionV3 (pool3, 2048 features) from a local torch-fidelity weights file."""
    if weights is None or not Path(weights).is_file():
        raise EvaluationError(
            f"FID/KID need InceptionV3 weights: download {INCEPTION_URL} on a machine with internet and pass "
            "--inception /path/to/" + INCEPTION_WEIGHTS
        )
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
    except ImportError as exc:
        raise EvaluationError(f"FID/KID need torchmetrics: pip install torchmetrics ({exc})") from exc
    try:
        return NoTrainInceptionV3(
            name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(weights)
        )
    except (ImportError, ModuleNotFoundError) as exc:
        raise EvaluationError(
            f"FID/KID's InceptionV3 comes from torch-fidelity: pip install torch-fidelity ({exc})"
        ) from exc


@dataclass
class LocalCLIP:
    """A Hugging Face CLIP loaded from a local folder (e.g. a snapshot of openai/clip-vit-large-patch14)."""

    model: torch.nn.Module
    tokenizer: object
    image_processor: object

    @classmethod
    def load(cls, folder: Path | None, device: torch.device | str = "cpu") -> LocalCLIP:
        if folder is None or not (Path(folder) / "config.json").is_file():
            raise EvaluationError(
                "CLIP score needs a CLIP model folder in Hugging Face format (config.json, weights, tokenizer, "
                "preprocessor_config.json), e.g. a download of openai/clip-vit-large-patch14; pass --clip DIR"
            )
        from transformers import CLIPModel, CLIPTokenizer

        try:  # transformers 5: a PIL backend that does not need torchvision
            from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as Processor
        except ImportError:
            from transformers import CLIPImageProcessor as Processor
        kw = dict(local_files_only=True)
        model = CLIPModel.from_pretrained(folder, **kw).eval().to(device)
        return cls(model, CLIPTokenizer.from_pretrained(folder, **kw), Processor.from_pretrained(folder, **kw))

    @torch.no_grad()
    def scores(self, images: list[torch.Tensor], prompts: list[str]) -> torch.Tensor:
        """Per pair: 100 x max(cos(image, text), 0) in CLIP's projected space."""
        device = next(self.model.parameters()).device
        pixels = self.image_processor(images=[i.permute(1, 2, 0).numpy() for i in images], return_tensors="pt")
        text = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
        out = self.model(
            input_ids=text["input_ids"].to(device), attention_mask=text["attention_mask"].to(device),
            pixel_values=pixels["pixel_values"].to(device),
        )  # fmt: skip
        image, txt = F.normalize(out.image_embeds, dim=-1), F.normalize(out.text_embeds, dim=-1)
        return 100 * (image * txt).sum(-1).clamp(min=0)


# -- the metrics ------------------------------------------------------------------------------
def _distances(features: torch.nn.Module, generated: Iterable[torch.Tensor], real: Iterable[torch.Tensor],
               counts: tuple[int, int], kid_subset: int, device: torch.device | str) -> dict[str, float]:  # fmt: skip
    """FID and KID of batches streamed in (never all held: 10K images x 10 patches are ~27 GB of crops);
    ``counts``: how many images each side will yield (KID's subset size must be set before)."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    subset = min(kid_subset, *counts)
    if subset < 2:
        raise EvaluationError("KID needs at least 2 generated and 2 reference images (or patches)")
    fid = FrechetInceptionDistance(feature=features, input_img_size=(3, INCEPTION_SIZE, INCEPTION_SIZE)).to(device)
    kid = KernelInceptionDistance(feature=features, subset_size=subset).to(device)
    for batches, is_real in ((generated, False), (real, True)):
        for b in batches:
            b = b.to(device)
            fid.update(b, real=is_real)
            kid.update(b, real=is_real)
    kid_mean, _ = kid.compute()
    return {"fid": float(fid.compute()), "kid": float(kid_mean)}


def evaluate(
    generated: list[Path],
    prompts: list[str] | None,
    reference: list[Path] | None,
    features: torch.nn.Module | None,
    clip: LocalCLIP | None,
    patch_size: int = 1024,
    patches_per_image: int = 10,
    kid_subset: int = 1000,
    batch: int = 16,
    seed: int = 0,
    progress: Callable[[Iterable], Iterable] = iter,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """The metrics that the given networks allow: clip_score, fid, kid, patch_fid, patch_kid (the feature
    network runs on ``device``; images are read a batch at a time)."""
    results: dict[str, float] = {}
    if clip is not None:
        if prompts is None or len(prompts) != len(generated):
            raise EvaluationError("CLIP score needs one prompt per generated image")
        scores = []
        for i in progress(range(0, len(generated), batch)):
            scores.append(clip.scores([read_image(p) for p in generated[i : i + batch]], prompts[i : i + batch]))
        results["clip_score"] = float(torch.cat(scores).mean())
    if features is not None:
        if not reference:
            raise EvaluationError("FID/KID compare against real images: pass --reference DIR")

        def whole(files):
            for i in range(0, len(files), batch):
                yield torch.stack([resized(read_image(p)[None])[0] for p in files[i : i + batch]])

        def patches(files, gen):
            for p in files:
                yield resized(random_crops(read_image(p), patch_size, patches_per_image, gen))

        counts = (len(generated), len(reference))
        results.update(_distances(features, whole(generated), whole(reference), counts, kid_subset, device))
        g = torch.Generator().manual_seed(seed)
        counts = (len(generated) * patches_per_image, len(reference) * patches_per_image)
        patch = _distances(features, patches(generated, g), patches(reference, g), counts, kid_subset, device)
        results.update({f"patch_{k}": v for k, v in patch.items()})
    return results
