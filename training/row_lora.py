"""peft LoRA layers that update only the guidance tokens' rows, and their export.

Why: UltraGen's LoRA adapts the layers that process the low-res guidance tokens to their
scaled RoPE positions, while the high-res tokens keep the original weights. peft's LoRA
``Linear`` adds its update to every row; this subclass (registered through peft's custom
module mapping, so peft still creates, initialises, scales and tracks the adapters) adds it
to the last ``n`` rows only, ``n`` read at call time from a :class:`GuidanceRows`.

Targets (module paths of ComfyUI's FLUX ``diffusion_model``):
``qkv`` (the paper): ``double_blocks.N.img_attn.qkv`` and the q, k, v part (first
3 x hidden outputs) of ``single_blocks.N.linear1``;
``all`` (the authors' code): also ``img_in``, ``img_attn.proj``, ``img_mlp.0/2`` and all
of ``linear1`` / ``linear2``.

Export: :func:`lora_tensors` writes the format ``core.guidance_lora`` reads (the patch's
inference LoRA): ``<layer>.lora_A.weight`` (rank, in), ``<layer>.lora_B.weight`` (rows, rank),
``<layer>.alpha``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora.layer import Linear as PeftLoraLinear

from ..core.guidance_lora import GUIDANCE_LAYERS
from .settings import TrainingError

Targets = Literal["qkv", "all"]
TARGETS: dict[str, tuple[str, ...]] = {
    "qkv": (r"double_blocks\.\d+\.img_attn\.qkv", r"single_blocks\.\d+\.linear1"),
    "all": GUIDANCE_LAYERS,
}
ADAPTER = "ultragen_guidance"
ALL_ROWS = -1


@dataclass
class GuidanceRows:
    """How many trailing rows of a layer's input are guidance tokens, right now.

    ``count``: guidance tokens per sequence (set by the trainer before each forward; it
    must stay set through backward, which recomputes checkpointed blocks).
    ``embedding``: read for ``img_in``, which sees the image tokens alone in ComfyUI's
    forward and the guidance tokens alone when the patch embeds them.
    """

    count: int = 0
    embedding: Callable[[], bool] = field(default=lambda: False)

    def of(self, layer: str) -> int:
        if layer == "img_in":
            return ALL_ROWS if self.embedding() else 0
        return self.count


def covered_outputs(layer: str, in_features: int, out_features: int, targets: Targets) -> int:
    """Outputs the update covers: q, k, v only of a single block's linear1 in ``qkv`` mode."""
    if targets == "qkv" and re.fullmatch(r"single_blocks\.\d+\.linear1", layer):
        return min(out_features, 3 * in_features)
    return out_features


def _layer_cls(rows: GuidanceRows, targets: Targets) -> type[PeftLoraLinear]:
    class GuidanceRowsLoraLinear(PeftLoraLinear):
        """peft's LoRA Linear, with the update on the guidance rows (and covered outputs) only."""

        def update_layer(self, adapter_name, r, lora_alpha, config, **kwargs):
            self.layer_path = kwargs.get("target_name", "")
            full = self.out_features
            self.out_features = covered_outputs(self.layer_path, self.in_features, full, targets)
            try:
                super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
            finally:
                self.out_features = full

        def merge(self, *args, **kwargs):
            raise TrainingError("a guidance-row LoRA cannot be merged into the weights: it changes guidance rows only")

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            result = self.base_layer(x, *args, **kwargs)
            n = rows.of(self.layer_path)
            if self.disable_adapters or n == 0:
                return result
            n = x.shape[-2] if n == ALL_ROWS else n
            guide = x[..., -n:, :]
            delta = None
            for name in self.active_adapters:
                if name not in self.lora_A:
                    continue
                down, up = self.lora_A[name], self.lora_B[name]
                d = up(down(self.lora_dropout[name](guide.to(down.weight.dtype)))) * self.scaling[name]
                delta = d if delta is None else delta + d
            if delta is None:
                return result
            covered = delta.shape[-1]
            tail = result[..., -n:, :]
            tail = torch.cat([tail[..., :covered] + delta.to(result.dtype), tail[..., covered:]], -1)
            return torch.cat([result[..., :-n, :], tail], -2)  # out of place: autograd keeps the base output

    return GuidanceRowsLoraLinear


def inject_guidance_lora(
    diffusion_model: torch.nn.Module,
    rows: GuidanceRows,
    targets: Targets = "qkv",
    rank: int = 16,
    alpha: float = 16,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> list[str]:
    """Add trainable guidance-row LoRA layers to ``diffusion_model`` in place (peft).

    Base weights are frozen; the adapters are float32 by default (the base may be bf16).
    peft's initialisation (``lora_A`` random, ``lora_B`` zero) draws from ``seed``, not from
    the global generator, so equal settings start equal. Returns the adapted layer paths.
    """
    if targets not in TARGETS:
        raise TrainingError(f"targets must be one of {sorted(TARGETS)}, got {targets!r}")
    pattern = "^(?:" + "|".join(TARGETS[targets]) + ")$"
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=pattern, lora_dropout=0.0, init_lora_weights=True)
    config._register_custom_module({torch.nn.Linear: _layer_cls(rows, targets)})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(config, diffusion_model, adapter_name=ADAPTER)
    layers = []
    for name, module in diffusion_model.named_modules():
        if isinstance(module, PeftLoraLinear):
            module.lora_A[ADAPTER].to(dtype)
            module.lora_B[ADAPTER].to(dtype)
            layers.append(name)
    for name, p in diffusion_model.named_parameters():
        p.requires_grad_(".lora_A." in name or ".lora_B." in name)
    return layers


def lora_modules(diffusion_model: torch.nn.Module) -> dict[str, PeftLoraLinear]:
    return {n: m for n, m in diffusion_model.named_modules() if isinstance(m, PeftLoraLinear)}


def lora_tensors(diffusion_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained adapters in the guidance LoRA file format (float32, CPU)."""
    out = {}
    for name, m in lora_modules(diffusion_model).items():
        out[f"{name}.lora_A.weight"] = m.lora_A[ADAPTER].weight.detach().float().cpu().contiguous()
        out[f"{name}.lora_B.weight"] = m.lora_B[ADAPTER].weight.detach().float().cpu().contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(m.lora_alpha[ADAPTER]))
    return out


def load_lora_tensors(diffusion_model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Put saved adapters back (resume); every adapted layer must be in ``tensors`` with its shapes."""
    modules = lora_modules(diffusion_model)
    for name, m in modules.items():
        for part in ("lora_A", "lora_B"):
            key = f"{name}.{part}.weight"
            if key not in tensors:
                raise TrainingError(f"the checkpoint has no {key}: was it trained with other targets?")
            weight = getattr(m, part)[ADAPTER].weight
            if tensors[key].shape != weight.shape:
                raise TrainingError(
                    f"{key} is {tuple(tensors[key].shape)} in the checkpoint but {tuple(weight.shape)} here: "
                    "was it trained with another rank or model?"
                )
            with torch.no_grad():
                weight.copy_(tensors[key])
    extra = {k.rsplit(".", 2)[0] for k in tensors if k.endswith((".lora_A.weight", ".lora_B.weight"))} - set(modules)
    if extra:
        raise TrainingError(f"the checkpoint adapts layers this run does not: {sorted(extra)[:3]} (other targets?)")
