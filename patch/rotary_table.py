"""FLUX's rotary-table embedder, NTK-scaled, handing its table to the patch's attention.

Why: ComfyUI's FLUX computes the RoPE table once per forward in
``diffusion_model.pe_embedder`` and then rotates q and k inside every block's
``attention`` with float32 copies of both (~10 GB of temporaries per call at 8192^2, the
largest transient of the step after the MLP). ``attention`` skips that rotation when the
table is ``None``. So, during the calls the UltraGen patch prepared, this embedder gives
its table to the patch (which rotates q and k in one low-memory pass in its attention
override) and returns ``None`` to ComfyUI; in every other call it behaves like FLUX's
``EmbedND``. UltraGen's NTK-aware scaling (factor 10) is applied here too.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from comfy.ldm.flux.math import rope

from ..core.rope import ntk_theta
from ..kernels.rope import apply_rope
from .options import UltraGenPatchError


class RotaryTable(torch.nn.Module):
    """FLUX's ``EmbedND`` with each axis' theta scaled by the NTK factor (1 = unchanged).

    ``take(table)`` is asked first: when it keeps the table, ComfyUI gets ``None``.
    """

    def __init__(self, original: torch.nn.Module, factor: float, take: Callable[[torch.Tensor], bool]):
        super().__init__()
        self.original = original
        self.axes_dim = list(original.axes_dim)
        self.thetas = [ntk_theta(original.theta, d, factor) for d in self.axes_dim]
        self.factor = factor
        self.take = take

    def table(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, 1, L, D / 2, 2, 2) float32, as ``EmbedND`` returns it."""
        if self.factor == 1:
            return self.original(ids)
        emb = torch.cat([rope(ids[..., i], self.axes_dim[i], self.thetas[i]) for i in range(ids.shape[-1])], dim=-3)
        return emb.unsqueeze(1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor | None:
        table = self.table(ids)
        return None if self.take(table) else table


def rotate(q: torch.Tensor, k: torch.Tensor, table: torch.Tensor, kwargs: dict, node: str):
    """RoPE on q and k (B, H, L, D), which FLUX's attention left unrotated because the table came to the patch.

    As ComfyUI's own rotation: a q shorter than the table (Flux KV Cache drops the cached references' queries but
    not their positions) takes the table's first rows; k, with the cached keys appended, takes all of it.
    """
    if not kwargs.get("skip_reshape") or q.dim() != 4 or k.shape[2] != table.shape[2] or q.shape[2] > k.shape[2]:
        raise UltraGenPatchError(
            f"UltraGen: an attention call of shape {tuple(q.shape)} reached the patch in a forward whose "
            f"positions cover {table.shape[2]} tokens; another node replaces FLUX's blocks in a way UltraGen "
            f"cannot follow. Remove that node, or {node}, from this model."
        )
    if q.shape[2] == k.shape[2]:
        return apply_rope(q, k, table)
    return apply_rope(q, q, table[:, :, : q.shape[2]])[0], apply_rope(k, k, table)[0]
