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


def from_diffusers_flux2(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same LoRA in this pack's format (ComfyUI layer names); unknown modules are kept under their diffusers
    name, so that the usual check names them."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for key, value in tensors.items():
        parts = _split(key)
        if parts is None:
            out[key] = value  # not a LoRA key: reported by the usual check
            continue
        module, suffix = parts
        fused = _QKV.match(module)
        if fused:
            qkv.setdefault(fused.group(1), {}).setdefault(fused.group(2), {})[suffix] = value
            continue
        for pattern, target in _PLAIN:
            m = pattern.match(module)
            if m:
                module = target.format(*m.groups())
                break
        out[module + suffix] = value
    for block, by_part in qkv.items():
        out.update(_fused_qkv(f"double_blocks.{block}.img_attn.qkv", by_part))
    return out


def _fused_qkv(layer: str, by_part: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """q, k, v LoRAs as one LoRA on the fused layer: down stacked, up block-diagonal with each part's scale."""
    downs, ups, rows = [], [], None
    for part in "qkv":
        p = by_part.get(part)
        if p is None or ".lora_A.weight" not in p or ".lora_B.weight" not in p:
            downs.append(None)
            ups.append(None)
            continue
        down, up = p[".lora_A.weight"].float(), p[".lora_B.weight"].float()
        rank = down.shape[0]
        alpha = float(p[".alpha"].float().reshape(-1)[0]) if ".alpha" in p else float(rank)
        downs.append(down)
        ups.append(up * (alpha / rank if rank else 1.0))
        rows = up.shape[0]
    if rows is None:
        return {f"{layer}.lora_A.weight": torch.zeros(0, 0)}  # no complete part: the usual check says so
    last = max(i for i, d in enumerate(downs) if d is not None)
    in_features = next(d for d in downs if d is not None).shape[1]
    ranks = [0 if d is None else d.shape[0] for d in downs[: last + 1]]
    down = torch.cat([d if d is not None else torch.zeros(0, in_features) for d in downs[: last + 1]])
    up = torch.zeros(rows * (last + 1), sum(ranks))
    col = 0
    for i, (u, r) in enumerate(zip(ups[: last + 1], ranks, strict=True)):
        if u is not None:
            if u.shape[0] != rows:
                raise ValueError(f"{layer}: the q, k and v LoRAs give different numbers of outputs")
            up[i * rows : (i + 1) * rows, col : col + r] = u
        col += r
    total = down.shape[0]
    return {f"{layer}.lora_A.weight": down, f"{layer}.lora_B.weight": up, f"{layer}.alpha": torch.tensor(float(total))}
