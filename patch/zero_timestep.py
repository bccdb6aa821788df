"""Clean guidance tokens modulated at timestep 0, as the UltraGen authors train them.

Why: the authors feed the guidance tokens clean and modulate them with the timestep-0 embedding
(``low_res_timestep=0`` in their code), while the image tokens take the current step's. ComfyUI's
blocks modulate every token of a stream alike (its per-token mechanism, ``modulation_dims``, serves
Kontext references only), so the patch's chunked blocks do it: FLUX's modulation input ``vec`` at
timestep 0 is built once per model call (:func:`timestep_zero_vector`), each block's modulations of
it once per block (FLUX.2's global ones once per call, :func:`zero_modulations`), and a slice that
holds guidance rows takes them there (:func:`slice_modulation`).
"""

from __future__ import annotations

import comfy.ldm.flux.layers
import torch

from .call_state import CallState


def timestep_zero_vector(dm, x: torch.Tensor, timestep: torch.Tensor, y, guidance) -> torch.Tensor:
    """FLUX's modulation input ``vec`` (B, D) as ``forward_orig`` builds it, at timestep 0."""
    from comfy.ldm.flux.layers import timestep_embedding

    dtype = x.dtype
    vec = dm.time_in(timestep_embedding(torch.zeros_like(timestep), 256).to(dtype))
    if dm.params.guidance_embed and guidance is not None:
        vec = vec + dm.guidance_in(timestep_embedding(guidance, 256).to(dtype))
    if getattr(dm, "vector_in", None) is not None:
        if y is None:
            y = torch.zeros((x.shape[0], dm.params.vec_in_dim), device=x.device, dtype=dtype)
        vec = vec + dm.vector_in(y[:, : dm.params.vec_in_dim])
    return vec


def zero_modulations(block, call: CallState, kind: str):
    """The modulations of ``call.vec_zero`` (timestep 0) for ``block``'s guidance rows, or None ("noised" tokens):
    FLUX.1's per-block ``img_mod`` / ``modulation``, FLUX.2's global ones (computed once per call)."""
    if call.vec_zero is None or not call.n_guid:
        return None
    if kind == "double":
        if getattr(block, "modulation", True):
            return block.img_mod(call.vec_zero)
    elif block.modulation is not None:
        return block.modulation(call.vec_zero)[0]
    if call.zero_modulations is None:
        dm = call.diffusion_model
        call.zero_modulations = {"double": dm.double_stream_modulation_img(call.vec_zero),
                                 "single": dm.single_stream_modulation(call.vec_zero)[0]}  # fmt: skip
    return call.zero_modulations[kind]


def slice_modulation(mod, mod_zero, guidance_row: int, rows: int):
    """The modulation of a slice of ``rows`` rows whose rows from ``guidance_row`` on are guidance tokens modulated
    at timestep 0 (``mod_zero``; None: every row at the step's). Row-wise (B, rows, D) only where a slice straddles."""
    if mod_zero is None or guidance_row >= rows:
        return mod
    if guidance_row <= 0:
        return mod_zero

    def joined(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.cat((a.expand(-1, guidance_row, -1), b.expand(-1, rows - guidance_row, -1)), 1)

    return comfy.ldm.flux.layers.ModulationOut(joined(mod.shift, mod_zero.shift), joined(mod.scale, mod_zero.scale),
                                               joined(mod.gate, mod_zero.gate))  # fmt: skip
