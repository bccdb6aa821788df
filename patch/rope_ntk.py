"""FLUX's RoPE embedder with NTK-scaled bases, installed as an object patch.

Why: UltraGen applies NTK-aware scaling (factor 10) to every token's RoPE. FLUX computes
the rotary table once per forward in ``diffusion_model.pe_embedder``; swapping that
module for one with scaled per-axis bases changes nothing else.
"""

from __future__ import annotations

import torch
from comfy.ldm.flux.math import rope

from ..core.rope import ntk_theta


class NTKEmbedND(torch.nn.Module):
    """Same output as FLUX's EmbedND, with each axis' theta scaled by the NTK factor."""

    def __init__(self, original: torch.nn.Module, factor: float):
        super().__init__()
        self.dim = original.dim
        self.axes_dim = list(original.axes_dim)
        self.thetas = [ntk_theta(original.theta, d, factor) for d in self.axes_dim]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        emb = torch.cat([rope(ids[..., i], self.axes_dim[i], self.thetas[i]) for i in range(ids.shape[-1])], dim=-3)
        return emb.unsqueeze(1)
