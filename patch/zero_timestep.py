"""Clean guidance tokens modulated at timestep 0, as the UltraGen authors train them.

Why: the authors feed the guidance tokens clean and modulate them with the timestep-0 embedding
(``low_res_timestep=0`` in their code), while the image tokens take the current step's. ComfyUI's
blocks modulate every token of a stream alike (its per-token mechanism, ``modulation_dims``, serves
Kontext references only), so the patch's chunked blocks do it: FLUX's modulation input ``vec`` at
timestep 0 is built once per model call (:func:`timestep_zero_vector`), each block modulates it in the
same module call as the step's vector (FLUX.2's global modulations once per call;
:func:`double_modulations`, :func:`single_modulations`), and a slice that holds guidance rows takes
them there (:func:`slice_modulation`).
"""

from __future__ import annotations

import comfy.ldm.flux.layers
import torch

from .call_state import CallState


def timestep_zero_vector(dm, x: torch.Tensor, timestep: torch.Tensor, y, guidance) -> torch.Tensor:
    """FLUX's modulation input ``vec`` (B, D) as ``forward_orig`` builds it, at timestep 0."""
    embed = comfy.ldm.flux.layers.timestep_embedding
    dtype = x.dtype
    vec = dm.time_in(embed(torch.zeros_like(timestep), 256).to(dtype))
    if dm.params.guidance_embed and guidance is not None:
        vec = vec + dm.guidance_in(embed(guidance, 256).to(dtype))
    if getattr(dm, "vector_in", None) is not None:
        if y is None:
            y = torch.zeros((x.shape[0], dm.params.vec_in_dim), device=x.device, dtype=dtype)
        vec = vec + dm.vector_in(y[:, : dm.params.vec_in_dim])
    return vec


def _halves(out, batch: int):
    """A modulation module's output for (vec; vec_zero) stacked: (its rows of vec, its rows of vec_zero)."""
    if out is None:
        return None, None
    if isinstance(out, comfy.ldm.flux.layers.ModulationOut):
        parts = [(t[:batch], t[batch:]) for t in (out.shift, out.scale, out.gate)]
        return tuple(comfy.ldm.flux.layers.ModulationOut(*(p[i] for p in parts)) for i in (0, 1))
    first, second = zip(*(_halves(o, batch) for o in out), strict=True)
    return first, second


def _with_zero(modulation, vec: torch.Tensor, call: CallState):
    """(``modulation(vec)``, ``modulation(call.vec_zero)`` or None) from one call of the module: where ComfyUI
    streams the block's weights, they are cast and moved once, not twice a step."""
    if call.vec_zero is None or not call.n_guid:
        return modulation(vec), None
    return _halves(modulation(torch.cat((vec, call.vec_zero.to(vec)))), vec.shape[0])


def _global_zero(call: CallState, kind: str):
    """FLUX.2's global modulations of ``call.vec_zero`` (computed once per call), or None."""
    if call.vec_zero is None or not call.n_guid:
        return None
    if call.zero_modulations is None:
        dm = call.diffusion_model
        call.zero_modulations = {"double": dm.double_stream_modulation_img(call.vec_zero),
                                 "single": dm.single_stream_modulation(call.vec_zero)[0]}  # fmt: skip
    return call.zero_modulations[kind]


def double_modulations(block, vec, call: CallState):
    """A double block's ((img_mod1, img_mod2), (txt_mod1, txt_mod2), guidance rows' (img_mod1, img_mod2) at timestep
    0 or (None, None)): FLUX.1's per-block modulation of ``vec``, or FLUX.2's, handed over in ``vec``."""
    if getattr(block, "modulation", True):  # FLUX.1: each block modulates from the vector
        img, zero = _with_zero(block.img_mod, vec, call)
        return img, block.txt_mod(vec), zero or (None, None)
    img, txt = vec  # FLUX.2: the model computed every block's modulation once
    return img, txt, _global_zero(call, "double") or (None, None)


def single_modulations(block, vec, call: CallState):
    """A single block's (modulation, guidance rows' modulation at timestep 0 or None)."""
    if block.modulation is not None:  # FLUX.1
        (mod, _), zero = _with_zero(block.modulation, vec, call)
        return mod, None if zero is None else zero[0]
    return vec, _global_zero(call, "single")


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
