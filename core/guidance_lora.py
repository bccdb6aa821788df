"""The guidance LoRA: low-rank updates applied only to the guidance tokens' rows.

Why: UltraGen adapts FLUX to scaled guidance positions with a LoRA on the layers that
process the guidance tokens, leaving the high-res tokens on the original weights (so
style LoRAs the user loads keep working unchanged). Guidance tokens always sit at the
end of the image stream (double blocks) and of the joint sequence (single blocks), so
"guidance rows" are the last ``n`` rows of each layer's input.

File format (safetensors; what ``ultragen-train`` writes, see the README):
``<layer>.lora_A.weight`` (rank, in_features), ``<layer>.lora_B.weight`` (rows, rank),
optional ``<layer>.alpha`` (scalar; default rank). ``<layer>`` is a ComfyUI module path of
the FLUX diffusion model, optionally prefixed by ``diffusion_model.`` or
``base_model.model.`` (peft). ``rows`` may be fewer than the layer's outputs: the update
then covers the first ``rows`` outputs (e.g. only q, k, v of a single block's linear1).
The UltraGen authors' FLUX.2 LoRAs (diffusers names, ``transformer.<module>...``) are read too
(``diffusers_lora_keys.py``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UltraGenError
from .diffusers_lora_keys import from_diffusers_flux2, fused_qkv, is_diffusers_flux2

GUIDANCE_LAYERS = (
    r"img_in",
    r"double_blocks\.\d+\.img_attn\.qkv",
    r"double_blocks\.\d+\.img_attn\.proj",
    r"double_blocks\.\d+\.img_mlp\.0",
    r"double_blocks\.\d+\.img_mlp\.2",
    r"single_blocks\.\d+\.linear1",
    r"single_blocks\.\d+\.linear2",
)
_LAYER_RE = re.compile("^(?:" + "|".join(GUIDANCE_LAYERS) + ")$")
_PREFIXES = ("base_model.model.", "diffusion_model.", "model.diffusion_model.")
_REDO = "re-export the LoRA from its training run, or retrain it with ultragen-train"


class GuidanceLoRAError(UltraGenError, ValueError):
    """A guidance LoRA file that cannot be used; the message says why and what to do."""


@dataclass
class LoRALayer:
    """One layer's update: ``x @ down.T @ up.T * scale`` on the first ``up.shape[0]`` outputs."""

    down: torch.Tensor  # (rank, in_features)
    up: torch.Tensor  # (rows, rank)
    scale: float

    def delta(self, x: torch.Tensor, strength: float) -> torch.Tensor:
        """The update for rows ``x`` (..., in_features) -> (..., rows), in x's dtype and device."""
        if self.down.device != x.device or self.down.dtype != x.dtype:
            self.down, self.up = self.down.to(x.device, x.dtype), self.up.to(x.device, x.dtype)
        return (x @ self.down.t()) @ self.up.t() * (self.scale * strength)


def _layer_name(key: str) -> tuple[str, str]:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix) :]
    for suffix in (".lora_A.weight", ".lora_B.weight", ".alpha"):
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix
    raise GuidanceLoRAError(
        f"unexpected key {key!r}: a guidance LoRA holds <layer>.lora_A.weight, <layer>.lora_B.weight "
        "and optionally <layer>.alpha"
    )


def load_guidance_lora(path: str | Path) -> dict[str, LoRALayer]:
    """Read and check a guidance LoRA file; keys are ComfyUI layer paths like ``single_blocks.3.linear1``."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise GuidanceLoRAError(
            f"{path.name}: a guidance LoRA must be a .safetensors file (pickled .pt/.ckpt files are not loaded)"
        )
    if not path.is_file():
        raise GuidanceLoRAError(f"guidance LoRA not found: {path}")
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as exc:  # a damaged or foreign file
        raise GuidanceLoRAError(f"{path.name} is not a readable safetensors file: {exc}") from exc
    return parse_guidance_lora(tensors, path.name)


def parse_guidance_lora(tensors: dict[str, torch.Tensor], name: str = "guidance LoRA") -> dict[str, LoRALayer]:
    """Check ``tensors`` (a file's content; ``name`` names it in errors) and group them into layers.

    Raises :class:`GuidanceLoRAError` naming the file, the layer and the problem for anything the
    patch could not apply or would turn into a broken image: unknown layers, missing halves,
    mismatched shapes, rank 0, an alpha that is not one number, NaN or Inf values.
    """
    qkv = {}
    if is_diffusers_flux2(tensors):  # the UltraGen authors' FLUX.2 LoRAs (diffusers names)
        tensors, qkv = from_diffusers_flux2(tensors)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        layer, suffix = _layer_name(key)
        if not _LAYER_RE.match(layer):
            raise GuidanceLoRAError(
                f"{name}: layer {layer!r} is not a guidance-stream layer of FLUX (img_in, and the img_attn.qkv, "
                "img_attn.proj, img_mlp of double blocks or linear1/linear2 of single blocks)"
            )
        parts.setdefault(layer, {})[suffix] = value
    if not parts and not qkv:
        raise GuidanceLoRAError(f"{name} holds no LoRA layers")
    layers = {layer: _lora_layer(p, f"{name}: layer {layer!r}") for layer, p in parts.items()}
    for layer, by_part in qkv.items():  # checked part by part, then joined on ComfyUI's fused layer
        loras = {part: _lora_layer(p, f"{name}: {layer}: the to_{part} LoRA") for part, p in by_part.items()}
        try:
            down, up = fused_qkv({part: (lora.down, lora.up * lora.scale) for part, lora in loras.items()})
        except ValueError as exc:
            raise GuidanceLoRAError(f"{name}: {layer}: {exc}; {_REDO}") from None
        layers[layer] = LoRALayer(down=down, up=up, scale=1.0)
    return layers


def _lora_layer(p: dict[str, torch.Tensor], what: str) -> LoRALayer:
    """One layer's tensors (by suffix) checked and read; ``what`` ("<file>: layer '<path>'") begins each error."""
    if ".lora_A.weight" not in p or ".lora_B.weight" not in p:
        raise GuidanceLoRAError(f"{what} needs both lora_A.weight and lora_B.weight")
    down, up = p[".lora_A.weight"].float(), p[".lora_B.weight"].float()
    if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
        raise GuidanceLoRAError(
            f"{what} has lora_A {tuple(down.shape)} and lora_B {tuple(up.shape)}; expected (rank, in) and (out, rank)"
        )
    rank = down.shape[0]
    if rank == 0:
        raise GuidanceLoRAError(f"{what} has rank 0 (lora_A has no rows); {_REDO}")
    alpha = p[".alpha"].float() if ".alpha" in p else torch.tensor(float(rank))
    if alpha.numel() != 1:
        raise GuidanceLoRAError(
            f"{what} has an alpha of shape {tuple(alpha.shape)}, but alpha must be a single number; {_REDO}"
        )
    for name, tensor in (("lora_A", down), ("lora_B", up), ("alpha", alpha)):
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise GuidanceLoRAError(
                f"{what} has {bad} non-finite value(s) (NaN or Inf) in {name}, which would make the image "
                f"non-finite; {_REDO}"
            )
    return LoRALayer(down=down, up=up, scale=float(alpha.item()) / rank)


def check_fits(layers: dict[str, LoRALayer], diffusion_model: torch.nn.Module, name: str = "guidance LoRA") -> None:
    """Every layer exists in this model and the shapes fit; else a message naming the first misfit."""
    for path, lora in layers.items():
        try:
            module = diffusion_model.get_submodule(path)
        except AttributeError:
            raise GuidanceLoRAError(
                f"{name}: this model has no layer {path!r} (is the LoRA for another model?)"
            ) from None
        in_f, out_f = module.weight.shape[1], module.weight.shape[0]
        if lora.down.shape[1] != in_f or lora.up.shape[0] > out_f:
            raise GuidanceLoRAError(
                f"{name}: layer {path!r} takes {in_f} inputs and gives {out_f} outputs, but the LoRA maps "
                f"{lora.down.shape[1]} inputs to {lora.up.shape[0]} outputs (is it for another model?)"
            )


def guidance_rows_forward(module: torch.nn.Module, lora: LoRALayer, rows_of, strength: float):
    """A replacement ``forward`` for ``module`` adding the LoRA update to the last ``rows_of()`` rows.

    Installed as a ModelPatcher object patch on ``<path>.forward``: the module itself, its
    weights and whatever ComfyUI patches into them stay untouched.
    """
    base_forward = type(module).forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        out = base_forward(module, x)
        n = rows_of()
        if n:
            rows = lora.up.shape[0]
            out[:, -n:, :rows] += lora.delta(x[:, -n:], strength).to(out.dtype)
        return out

    forward.ultragen_guidance_rows = True  # the chunked blocks add the update themselves, per slice
    return forward
