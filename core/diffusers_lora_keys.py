"""The UltraGen authors' FLUX.2 guidance LoRA files, in diffusers' layer names, read as ComfyUI layers.

Why: the authors train on diffusers' ``Flux2Transformer2DModel`` and save with
``Flux2KleinPipeline.save_lora_weights`` (``PeterYYZhang/Scale-DiT``, ``src/train/model2.py``): keys
``transformer.<module>.lora_A.weight`` / ``.lora_B.weight``, no alpha (diffusers then uses alpha = rank,
a scale of 1). Their targets (``train/config/train_flux2.yaml``) map onto the guidance-stream layers of
ComfyUI's FLUX.2 as diffusers' own converter maps the weights (``scripts/convert_flux2_to_diffusers.py``):

=====================================================  ==================================
diffusers                                              ComfyUI
=====================================================  ==================================
``x_embedder``                                         ``img_in``
``transformer_blocks.N.attn.to_q`` / ``to_k`` / ``to_v``  ``double_blocks.N.img_attn.qkv`` (rows q | k | v)
``transformer_blocks.N.attn.to_out.0``                 ``double_blocks.N.img_attn.proj``
``transformer_blocks.N.ff.linear_in`` / ``linear_out``   ``double_blocks.N.img_mlp.0`` / ``.2``
``single_transformer_blocks.N.attn.to_qkv_mlp_proj``   ``single_blocks.N.linear1``
``single_transformer_blocks.N.attn.to_out``            ``single_blocks.N.linear2``
=====================================================  ==================================

ComfyUI fuses q, k and v into one layer: their three LoRAs become one whose down-projection stacks the
three and whose up-projection is block-diagonal (each part's scale folded in), so each third of the
fused output gets exactly its own update.
"""

from __future__ import annotations

import re

import torch

_PREFIX = "transformer."
_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".alpha")
_PLAIN = (
    (re.compile(r"^x_embedder$"), "img_in"),
    (re.compile(r"^transformer_blocks\.(\d+)\.attn\.to_out\.0$"), "double_blocks.{}.img_attn.proj"),
    (re.compile(r"^transformer_blocks\.(\d+)\.ff\.linear_in$"), "double_blocks.{}.img_mlp.0"),
    (re.compile(r"^transformer_blocks\.(\d+)\.ff\.linear_out$"), "double_blocks.{}.img_mlp.2"),
    (re.compile(r"^single_transformer_blocks\.(\d+)\.attn\.to_qkv_mlp_proj$"), "single_blocks.{}.linear1"),
    (re.compile(r"^single_transformer_blocks\.(\d+)\.attn\.to_out$"), "single_blocks.{}.linear2"),
)
_QKV = re.compile(r"^transformer_blocks\.(\d+)\.attn\.to_([qkv])$")


def is_diffusers_flux2(tensors: dict[str, torch.Tensor]) -> bool:
    """Whether a LoRA file's keys are diffusers' FLUX.2 transformer names (the authors' format)."""
    return bool(tensors) and all(key.startswith(_PREFIX) for key in tensors)


def _split(key: str) -> tuple[str, str] | None:
    key = key[len(_PREFIX) :]
    for suffix in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix
    return None


QKVParts = dict[str, dict[str, dict[str, torch.Tensor]]]  # fused layer -> "q" / "k" / "v" -> suffix -> tensor


def from_diffusers_flux2(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], QKVParts]:
    """The same LoRA in this pack's format (ComfyUI layer names), with the to_q / to_k / to_v parts apart, by the
    fused layer they belong to (each part is checked as a layer of its own, then :func:`fused_qkv` joins them);
    unknown modules are kept under their diffusers name, so that the usual check names them."""
    out: dict[str, torch.Tensor] = {}
    qkv: QKVParts = {}
    for key, value in tensors.items():
        parts = _split(key)
        if parts is None:
            out[key] = value  # not a LoRA key: reported by the usual check
            continue
        module, suffix = parts
        fused = _QKV.match(module)
        if fused:
            layer = f"double_blocks.{fused.group(1)}.img_attn.qkv"
            qkv.setdefault(layer, {}).setdefault(fused.group(2), {})[suffix] = value
            continue
        for pattern, target in _PLAIN:
            m = pattern.match(module)
            if m:
                module = target.format(*m.groups())
                break
        out[module + suffix] = value
    return out, qkv


def fused_qkv(parts: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k, v LoRAs (any of them; ``parts[p]`` = (down, up with its scale folded in)) as one LoRA (down, up) of scale
    1 on the fused layer: down stacked, up block-diagonal. Parts of different output counts raise ValueError."""
    rows = {up.shape[0] for _, up in parts.values()}
    if len(rows) != 1:
        raise ValueError("the q, k and v LoRAs give different numbers of outputs")
    (rows,) = rows
    present = [part for part in "qkv" if part in parts]  # a part not trained: its third of the rows gets no update
    down = torch.cat([parts[part][0] for part in present])
    up = torch.zeros(rows * ("qkv".index(present[-1]) + 1), down.shape[0])
    col = 0
    for part in present:
        row, rank = "qkv".index(part) * rows, parts[part][0].shape[0]
        up[row : row + rows, col : col + rank] = parts[part][1]
        col += rank
    return down, up
