"""``ultragen-train``: train a guidance LoRA for "UltraGen Attention Patch" from the command line.

Why a command and not a node: training runs for hours on a GPU of its own and needs the
text encoders only for a first encoding pass; a node would hold ComfyUI's queue and every
model in memory for the whole run.

Example (run with ComfyUI's Python; the pack installed with ``pip install -e .[train]``)::

    ultragen-train --checkpoint models/diffusion_models/flux1-dev.safetensors \\
        --vae models/vae/ae.safetensors --clip-l models/text_encoders/clip_l.safetensors \\
        --t5 models/text_encoders/t5xxl_fp16.safetensors --data my_1k_images/ --output-dir runs/guidance
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

# Nothing imported here may import ComfyUI: ``main`` imports it first, with its own arguments.
from ..comfy_env import ComfyUINotUsable, find_comfyui, import_comfyui
from .settings import TrainingError, TrainSettings

T = TypeVar("T")
CHECKPOINT_HINT = (
    "pass FLUX.1's diffusion model file, as ComfyUI's Load Diffusion Model reads it "
    "(e.g. models/diffusion_models/flux1-dev.safetensors); if it is that file, download it again"
)


def parser() -> argparse.ArgumentParser:
    d = TrainSettings()
    p = argparse.ArgumentParser(
        prog="ultragen-train",
        description="Train the UltraGen guidance LoRA (peft) on FLUX with the UltraGen attention layout. Writes "
        "OUTPUT_DIR/guidance_lora.safetensors: copy it to ComfyUI/models/loras and pick it in UltraGen Attention "
        "Patch.",
    )
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="FLUX.1 or FLUX.2 diffusion model (ComfyUI .safetensors)")  # fmt: skip
    p.add_argument("--data", required=True, type=Path, help="folder of ~1K+ px images with .txt captions")
    p.add_argument("--output-dir", required=True, type=Path, help="where the LoRA, checkpoints and samples go")
    p.add_argument("--vae", type=Path, help="the model's VAE: FLUX.1's ae.safetensors or flux2-vae.safetensors "
                   "(to encode images and decode samples)")  # fmt: skip
    p.add_argument("--clip-l", type=Path, help="FLUX.1: clip_l.safetensors (captions; not needed with precomputed "
                   "embeddings)")  # fmt: skip
    p.add_argument("--t5", type=Path, help="FLUX.1: t5xxl_fp16.safetensors (captions)")
    p.add_argument("--text-encoder", type=Path, help="FLUX.2: its text encoder (klein 4B: qwen_3_4b.safetensors, "
                   "klein 9B: qwen_3_8b, dev: Mistral 3 Small)")  # fmt: skip
    p.add_argument("--comfyui", type=Path, help="ComfyUI folder (default: $COMFYUI_PATH, or the one this pack is in)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --output-dir")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    p.add_argument("--learning-rate", type=float, default=d.learning_rate, help="AdamW learning rate")
    p.add_argument("--rank", type=int, default=d.rank, help="LoRA rank (paper: 16)")
    p.add_argument("--alpha", type=float, default=d.alpha, help="LoRA alpha (paper: 16)")
    p.add_argument(
        "--targets", choices=["qkv", "all"], default=d.targets,
        help="qkv: the guidance tokens' q, k, v projections (paper); all: every guidance-stream projection "
        "(img_in, qkv, proj, MLP; the authors' code)",
    )  # fmt: skip
    p.add_argument("--size", type=int, default=d.size, help="training size in px (guidance at size / ratio)")
    p.add_argument("--ratio", type=int, default=d.ratio, help="high-res / guidance size (paper: 4)")
    p.add_argument("--window", type=int, default=d.window, help="window in tokens, as in the patch (16)")
    p.add_argument("--ntk-factor", type=float, default=d.ntk_factor, help="RoPE NTK factor, as in the patch (10)")
    p.add_argument("--save-every", type=int, default=d.save_every, help="steps between saves")
    p.add_argument("--sample-every", type=int, default=d.sample_every, help="steps between sample images (0: none)")
    p.add_argument("--sample-steps", type=int, default=d.sample_steps)
    p.add_argument("--no-gradient-checkpointing", action="store_true", help="faster, much more memory")
    p.add_argument("--backend", choices=["auto", "flex", "portable"], default="auto", help="attention backend")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--cpu", action="store_true", help="run on the CPU (tests; far too slow for real training)")
    return p


def _settings(args: argparse.Namespace) -> TrainSettings:
    """TrainSettings from the options named like its fields (the parser takes its defaults from there)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainSettings) if hasattr(args, f.name)}
    return TrainSettings(**given, gradient_checkpointing=not args.no_gradient_checkpointing)


def load_flux_model(path: Path, dtype: torch.dtype):
    """FLUX's diffusion model from a ComfyUI single-file checkpoint, as "Load Diffusion Model" loads it."""
    import comfy.sd

    return comfy.sd.load_diffusion_model(str(path), model_options={"dtype": dtype})


def _need_file(path: Path | None, what: str) -> None:
    if path is not None and not path.is_file():
        raise SystemExit(f"ultragen-train: {what} not found: {path}")


def _one_line(text: object) -> str:
    """ComfyUI's and safetensors' messages span lines; the command's errors are one line each."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def check_checkpoint(path: Path) -> None:
    """Fail in seconds, not after encoding every image, when the checkpoint is not a readable
    safetensors file (a stand-in, an HTML page saved as a download, a truncated copy)."""
    if path.suffix.lower() not in (".safetensors", ".sft"):
        return  # ComfyUI also reads pickled checkpoints; those are checked when loaded
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            empty = not list(f.keys())
    except Exception as exc:  # safetensors raises its own error types for every kind of damage
        raise SystemExit(
            f"ultragen-train: the checkpoint {path} is not a readable .safetensors file ({_one_line(exc)}); "
            f"{CHECKPOINT_HINT}"
        ) from exc
    if empty:
        raise SystemExit(f"ultragen-train: the checkpoint {path} holds no tensors; {CHECKPOINT_HINT}")


def _load(what: str, paths: list[Path], hint: str, load: Callable[[], T]) -> T:
    """``load()``, or one line naming the file(s) that failed and what to do instead of a traceback."""
    try:
        return load()
    except (torch.OutOfMemoryError, MemoryError):
        raise  # the file is fine: no hint about the file would help
    except Exception as exc:  # any failure to read or recognise a model file; its cause is in the message
        files = " and ".join(str(p) for p in paths)
        raise SystemExit(f"ultragen-train: could not load the {what} {files}: {_one_line(exc)}; {hint}") from exc


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.comfyui is not None and find_comfyui(args.comfyui) != args.comfyui.resolve():
        raise SystemExit(
            f"ultragen-train: --comfyui {args.comfyui} is not a ComfyUI folder (it needs comfy/ and nodes.py); "
            "pass the folder ComfyUI's main.py is in"
        )
    comfy_path = find_comfyui(args.comfyui)
    if comfy_path is None:
        raise SystemExit(
            "ultragen-train: ComfyUI not found; pass --comfyui /path/to/ComfyUI, set COMFYUI_PATH, or run the pack "
            "from ComfyUI/custom_nodes/"
        )
    for path, what in ((args.checkpoint, "checkpoint"), (args.vae, "VAE"), (args.clip_l, "CLIP-L"), (args.t5, "T5"),
                       (args.text_encoder, "text encoder")):  # fmt: skip
        _need_file(path, what)
    if bool(args.clip_l) != bool(args.t5):
        raise SystemExit("ultragen-train: captions need both text encoders: pass --clip-l and --t5 together")
    if args.text_encoder and args.clip_l:
        raise SystemExit(
            "ultragen-train: --text-encoder is FLUX.2's, --clip-l / --t5 are FLUX.1's: pass the ones of your model"
        )
    try:  # before anything imports comfy: ComfyUI reads its arguments (--cpu) once, at its first import
        import_comfyui(comfy_path, cpu=args.cpu or not torch.cuda.is_available(), also=("comfy.sd",))
    except ComfyUINotUsable as exc:
        raise SystemExit(f"ultragen-train: {_one_line(exc)}") from exc

    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils
    from tqdm import tqdm

    from .dataset import CACHE_DIR, CachedDataset, DatasetError, build_cache, scan_folder
    from .trainer import STATE, GuidanceLoRATrainer

    settings = _settings(args)
    out = args.output_dir
    if (out / STATE).is_file() and not args.resume:
        raise SystemExit(
            f"ultragen-train: {out} holds a saved run; pass --resume to continue it, or choose another --output-dir"
        )
    check_checkpoint(args.checkpoint)
    try:
        settings.check()
        items = scan_folder(args.data)
        vae = None
        if args.vae:
            vae = _load(
                "VAE", [args.vae], "pass FLUX.1's VAE file (ae.safetensors)",
                lambda: comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(args.vae))),
            )  # fmt: skip
        encode_text = None
        if args.clip_l:
            clip = _load(
                "text encoders", [args.clip_l, args.t5], "pass FLUX.1's clip_l.safetensors and t5xxl_fp16.safetensors",
                lambda: comfy.sd.load_clip(ckpt_paths=[str(args.clip_l), str(args.t5)],
                                           clip_type=comfy.sd.CLIPType.FLUX),
            )  # fmt: skip

            def encode_text(caption: str):
                context, pooled = clip.encode_from_tokens(clip.tokenize(caption), return_pooled=True)
                return context[0], pooled[0]
        elif args.text_encoder:
            clip = _load(
                "text encoder", [args.text_encoder], "pass FLUX.2's text encoder (e.g. qwen_3_4b.safetensors)",
                lambda: comfy.sd.load_clip(ckpt_paths=[str(args.text_encoder)], clip_type=comfy.sd.CLIPType.FLUX2),
            )  # fmt: skip

            def encode_text(caption: str):  # FLUX.2: no pooled vector
                return clip.encode_from_tokens(clip.tokenize(caption))[0], None

        files = build_cache(
            items, args.data / CACHE_DIR, settings.size, settings.ratio,
            vae.encode if vae else None, encode_text, lambda it: tqdm(list(it), desc="encoding", unit="image"),
        )  # fmt: skip
        encode_text = clip = None  # the text encoders are not needed any more
        mm.soft_empty_cache()
        dtype = torch.bfloat16 if mm.get_torch_device().type == "cuda" else torch.float32
        model = _load("checkpoint", [args.checkpoint], CHECKPOINT_HINT, lambda: load_flux_model(args.checkpoint, dtype))
        trainer = GuidanceLoRATrainer(
            model, CachedDataset(files, settings.seed), out, settings, decode=vae.decode if vae else None
        )
        if args.resume:
            print(f"ultragen-train: resuming from step {trainer.resume()}")
        trainer.train(progress=lambda **kw: tqdm(desc="training", unit="step", **kw))
    except (DatasetError, TrainingError, ValueError) as exc:
        raise SystemExit(f"ultragen-train: {_one_line(exc)}") from exc
    print(f"ultragen-train: wrote {out / 'guidance_lora.safetensors'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
