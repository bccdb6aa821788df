"""FLUX's double and single blocks computed a slice of tokens at a time (inference).

Why: in units U = one (tokens, hidden) bf16 tensor (1.7 GB at 8192^2 with guidance), ComfyUI's
blocks peak near 12-16U even with the patch's low-memory RoPE and in-place GELU: linear1's
output (7U), q and k after their norm, the attention output, the MLP hidden state (4U) and
the concatenation (5U) are alive together. Only attention needs the whole sequence at once;
every other part of a block (modulation, norms, q/k/v projection and QK-norm, RoPE, output
projection, MLP, residual adds) acts on each token alone. So a block here

1. writes q, k, v for the whole sequence into one (B, L, 3, H, D) buffer (3U), a slice of
   tokens at a time, each slice rotated by RoPE as it is written;
2. runs the patch's block-sparse attention, which writes its output over q (each program
   reads its q tile before writing the same rows);
3. finishes the block a slice at a time: output projection, MLP, residual adds into the
   block's input (which the block owns, as ComfyUI's own blocks add into it in place).

Peak: the input (1U) + q, k, v (3U, one buffer per model call, freed after the last block) + one
slice's temporaries, against 16U for ComfyUI's blocks. (Measured 6.2-6.3U from 4096^2 to 16384^2 while
the buffer was still alive during FLUX's final layer, whose norm and modulation add 2U; without it,
~5.3U at 8192^2 and ~5.7U at 4096^2 by the count above, not yet measured.) The arithmetic is
ComfyUI's, from the block's own modules (so user LoRAs, fp8 and streamed weights work; see
``layer_weights.py``); float32 results equal ComfyUI's blocks to rounding.

Installed per block through ComfyUI's public ``patches_replace["dit"]`` hook. A block runs
ComfyUI's own code instead (correct, more memory) in calls the patch did not prepare, when
autograd records (training), when another node patches attention inside the blocks
(``attn1_patch`` / ``attn1_output_patch``) or modulates some tokens differently (Kontext's
``index_timestep_zero``), and for block kinds other than FLUX.1's.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import comfy.ldm.flux.layers
import torch

from ..kernels.rope import apply_rope
from ..kernels.triton_env import triton_runs_on
from . import slice_ops
from .call_state import CallState, HandOver
from .free_memory import free_memory
from .inplace_gelu import InPlaceGELU
from .layer_weights import TakenLinear, take_qk_norm
from .slice_ops import BlockContext, BlockLinear, add_gated, mlp_state, modulated
from .zero_timestep import double_modulations, single_modulations, slice_modulation

log = logging.getLogger("UltraGen")
MAX_CHUNK_TOKENS = 16384  # big enough that the GEMMs run at full speed; ~1.5 GiB of temporaries at FLUX.1's width
MIN_CHUNK_TOKENS = 256
# A slice's temporaries stay near 1U at any size (at 4096^2 a 16384-token slice alone was 3.7U; a twelfth, 1.3U, left
# fp8 at 4096^2 near 6U with the cast weights, which are 0.55U of it at that size).
MIN_SLICES = 16
# ...but not below this many tokens unless memory is short: a slice launches ~15 kernels per block, and at 2048^2
# twelve slices would add ~10,000 launches to a 0.6-s step.
EFFICIENT_CHUNK_TOKENS = 4096
# Widths of ``hidden`` one token of a slice needs at most: the single block's second half holds the
# norm, its modulation, the MLP state (4), the output projection's two parts and the gated output.
SLICE_WIDTHS = 16


def chunk_tokens(length: int, batch: int, hidden: int, element_size: int, free_bytes: int | None) -> int:
    """Tokens per slice of a ``length``-token sequence: a sixteenth of it, within :data:`EFFICIENT_CHUNK_TOKENS` ..
    :data:`MAX_CHUNK_TOKENS`, fewer when a slice's temporaries would take more than half of ``free_bytes`` (None:
    no limit); a multiple of 256 (GEMM tiles) unless the sequence is shorter."""
    tokens = min(MAX_CHUNK_TOKENS, max(EFFICIENT_CHUNK_TOKENS, -(-length // MIN_SLICES // 256) * 256))
    if free_bytes is not None:
        per_token = SLICE_WIDTHS * hidden * element_size * batch
        tokens = min(tokens, max(MIN_CHUNK_TOKENS, free_bytes // 2 // per_token // 256 * 256))
    return max(1, min(tokens, length))


def _chunk_for(call: CallState, x: torch.Tensor, length: int, hidden: int) -> int:
    """The call's slice size: chosen from the free memory by its first block, kept for the other 56."""
    if call.slice_tokens is None:
        free = free_memory(x.device) if x.device.type == "cuda" else None
        call.slice_tokens = chunk_tokens(length, x.shape[0], hidden, x.element_size(), free)
    return call.slice_tokens


def fallback_reason(args: dict, call: CallState | None) -> str | None:
    """Why this block call must run ComfyUI's own block, or None to run it chunked."""
    if call is None:
        return ""  # not a call the patch prepared: nothing to say
    if torch.is_grad_enabled():
        return ""  # training: autograd needs the block's own graph
    patches = (args.get("transformer_options") or {}).get("patches", {})
    if patches.get("attn1_patch") or patches.get("attn1_output_patch"):
        return (
            "another node patches attention inside FLUX's blocks (attn1_patch / attn1_output_patch); "
            "UltraGen runs those blocks whole, which needs more memory at high resolution"
        )
    first = _first(args["vec"])
    shift = getattr(first, "shift", None)
    batch = (first if shift is None else shift).shape[0]  # FLUX.1's vector, or FLUX.2's first modulation
    if batch != args["img"].shape[0] or (shift is not None and shift.dim() == 3 and shift.shape[1] > 1):
        return (
            "reference tokens are modulated at timestep 0 (Edit Model Reference Method: index_timestep_zero); "
            "UltraGen runs FLUX's blocks whole for them, which needs more memory at high resolution"
        )
    return None


def _first(vec):
    """The first tensor-like record of a block's ``vec``: FLUX.1's vector, or FLUX.2's first precomputed
    modulation (nested tuples of (shift, scale, gate) records)."""
    while isinstance(vec, (tuple, list)):
        vec = vec[0]
    return vec


def _write_qkv(qkv: torch.Tensor, offset: int, x: torch.Tensor, norm, mod, attn, table, chunk: int,
               guidance_from: int, layer: BlockLinear, mod_zero=None) -> None:  # fmt: skip
    """Rows ``offset`` .. of ``qkv`` (B, L, 3, H, D) from the stream ``x`` (B, S, hidden), a slice at a time."""
    batch, heads, dim = qkv.shape[0], qkv.shape[3], qkv.shape[4]
    into = table is not None and "qkv_into" in slice_ops.ONE_PASS_FORMS
    qk_norm = None  # the QK-norm's weights, taken once for all slices, where the RoPE kernel applies it
    if into and "qk_norm" in slice_ops.ONE_PASS_FORMS and triton_runs_on(x.device):
        qk_norm = take_qk_norm(attn.norm, x)
    for s in range(0, x.shape[1], chunk):
        e = min(s + chunk, x.shape[1])
        rows = slice(offset + s, offset + e)
        h = modulated(norm, x[:, s:e], slice_modulation(mod, mod_zero, guidance_from - s, e - s))
        dest = qkv[:, rows]
        in_place = dest.is_contiguous() and layer.into(h, guidance_from - s, dest.view(batch, e - s, -1))
        out = dest if in_place else layer(h, guidance_from - s).view(batch, e - s, 3, heads, dim)
        del h
        q, k, v = out.unbind(2)
        if into:  # normalised (in the kernel's pass, or by the layer) and rotated straight into the buffer
            if qk_norm is None:
                q, k = attn.norm(q, k, v)
            apply_rope(q.transpose(1, 2), k.transpose(1, 2), table[:, :, rows],
                       out=(dest[:, :, 0].transpose(1, 2), dest[:, :, 1].transpose(1, 2)), norm=qk_norm)  # fmt: skip
        else:
            q, k = attn.norm(q, k, v)
            if table is not None:
                q, k = apply_rope(q.transpose(1, 2), k.transpose(1, 2), table[:, :, rows])
                q, k = q.transpose(1, 2), k.transpose(1, 2)
            qkv[:, rows, 0], qkv[:, rows, 1] = q, k
        if not in_place:
            qkv[:, rows, 2] = v


def _qkv_buffer(call: CallState, like: torch.Tensor, length: int, heads: int, dim: int) -> torch.Tensor:
    """The (B, L, 3, H, D) buffer of this model call, allocated by its first block and reused by all 57: a
    3U allocation freed and requested again between the weights a partially loaded model casts per layer
    would fragment the memory it needs (and gets) back."""
    shape = (like.shape[0], length, 3, heads, dim)
    buf = call.qkv_buffer
    if buf is None or buf.shape != shape or buf.dtype != like.dtype or buf.device != like.device:
        call.qkv_buffer = buf = None  # free the old one before allocating
        call.qkv_buffer = buf = like.new_empty(shape)
    return buf


def _attend(qkv: torch.Tensor, ctx: BlockContext) -> None:
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, L, D) views
    ctx.attend(q, k, v, ctx.call)


def double_block(block, args: dict, ctx: BlockContext, prefix: str) -> dict:
    """ComfyUI's ``DoubleStreamBlock.forward`` (FLUX.1), chunked; ``prefix``: the block's module path."""
    img, txt = args["img"], args["txt"]
    img_mods, txt_mods, zero_img = double_modulations(block, args["vec"], ctx.call)
    n_txt = txt.shape[1]
    heads, hidden = block.num_heads, block.hidden_size
    chunk = _chunk_for(ctx.call, img, n_txt + img.shape[1], hidden)
    table = ctx.call.rotary_table if ctx.call.rotary_table is not None else args.get("pe")
    n_guid = ctx.call.n_guid
    qkv = _qkv_buffer(ctx.call, img, n_txt + img.shape[1], heads, hidden // heads)
    streams = (  # (tokens, first row in the sequence, module prefix, LoRA path prefix, first guidance row)
        (txt, 0, "txt", None, txt.shape[1]),
        (img, n_txt, "img", f"{prefix}.img", img.shape[1] - n_guid),
    )
    mods = {"txt": txt_mods, "img": img_mods}
    zero = {"txt": (None, None), "img": zero_img}
    for x, offset, side, path, guidance_from in streams:
        attn = getattr(block, f"{side}_attn")
        qkv_layer = BlockLinear(TakenLinear(attn.qkv, x), ctx, path and f"{path}_attn.qkv")
        _write_qkv(qkv, offset, x, getattr(block, f"{side}_norm1"), mods[side][0], attn, table, chunk,
                   guidance_from, qkv_layer, zero[side][0])  # fmt: skip
    _attend(qkv, ctx)
    for x, offset, side, path, guidance_from in streams:
        (mod1, mod2), attn, mlp = mods[side], getattr(block, f"{side}_attn"), getattr(block, f"{side}_mlp")
        norm2 = getattr(block, f"{side}_norm2")
        layers = ((attn.proj, "_attn.proj"), (mlp[0], "_mlp.0"), (mlp[2], "_mlp.2"))
        proj, up, down = (BlockLinear(TakenLinear(module, x), ctx, path and f"{path}{name}") for module, name in layers)
        for s in range(0, x.shape[1], chunk):
            e = min(s + chunk, x.shape[1])
            rows, here = x[:, s:e], guidance_from - s
            m1, m2 = (slice_modulation(m, z, here, e - s) for m, z in zip((mod1, mod2), zero[side], strict=True))
            add_gated(rows, proj(qkv[:, offset + s : offset + e, 0].flatten(2), here), m1.gate)
            hidden_state = mlp_state(mlp[1], up, modulated(norm2, rows, m2), here)
            add_gated(rows, down(hidden_state, here), m2.gate)
            del hidden_state
    if txt.dtype == torch.float16:
        txt = torch.nan_to_num(txt, nan=0.0, posinf=65504, neginf=-65504)
    return HandOver(img=img, txt=txt)  # forward_orig keeps the dict through the next block: no stale 1U there


def single_block(block, args: dict, ctx: BlockContext, prefix: str) -> dict:
    """ComfyUI's ``SingleStreamBlock.forward`` (FLUX.1), chunked; linear1 runs as its q/k/v part before
    attention and its MLP part after (the same products, split by output rows)."""
    x = args["img"]
    mod, mod_zero = single_modulations(block, args["vec"], ctx.call)
    length = x.shape[1]
    heads, hidden = block.num_heads, block.hidden_size
    chunk = _chunk_for(ctx.call, x, length, hidden)
    table = ctx.call.rotary_table if ctx.call.rotary_table is not None else args.get("pe")
    guidance_from = length - ctx.call.n_guid
    split = 3 * hidden
    qkv = _qkv_buffer(ctx.call, x, length, heads, hidden // heads)
    linear1 = TakenLinear(block.linear1, x)  # taken once for its q/k/v part and its MLP part
    qkv_layer = BlockLinear(linear1.part(slice(0, split)), ctx, f"{prefix}.linear1")
    _write_qkv(qkv, 0, x, block.pre_norm, mod, block, table, chunk, guidance_from, qkv_layer, mod_zero)
    _attend(qkv, ctx)
    mlp_in = BlockLinear(linear1.part(slice(split, None)), ctx, f"{prefix}.linear1")
    out_layer = BlockLinear(TakenLinear(block.linear2, x), ctx, f"{prefix}.linear2")
    act = block.mlp_act.original if isinstance(block.mlp_act, InPlaceGELU) else block.mlp_act
    for s in range(0, length, chunk):
        e = min(s + chunk, length)
        rows, here = x[:, s:e], guidance_from - s
        m = slice_modulation(mod, mod_zero, here, e - s)
        mlp = mlp_state(act, mlp_in, modulated(block.pre_norm, rows, m), here)
        add_gated(rows, out_layer.of_joined((qkv[:, s:e, 0].flatten(2), mlp), here), m.gate)
        del mlp
    if x.dtype == torch.float16:
        x = torch.nan_to_num(x, nan=0.0, posinf=65504, neginf=-65504)
    return HandOver(img=x)


def chunkable_blocks(diffusion_model) -> bool:
    """Whether this module computes the model's blocks: FLUX.1's (GELU MLPs, per-block modulation) or FLUX.2's
    (SiLU-gated MLPs, modulation computed once per call, no biases) — not Ovis' (a third MLP layout)."""
    double = diffusion_model.double_blocks[0] if len(diffusion_model.double_blocks) else None
    single = diffusion_model.single_blocks[0] if len(diffusion_model.single_blocks) else None
    ok_double = double is None or (
        type(double) is comfy.ldm.flux.layers.DoubleStreamBlock
        and isinstance(double.img_mlp, torch.nn.Sequential) and len(double.img_mlp) == 3
        and not getattr(double, "flipped_img_txt", False)
    )  # fmt: skip
    ok_single = single is None or (
        type(single) is comfy.ldm.flux.layers.SingleStreamBlock and not getattr(single, "yak_mlp", False)
    )  # fmt: skip
    return ok_double and ok_single


def install_chunked_blocks(m, dm, replacement: Callable[[str, int, dict, dict], dict]) -> None:
    """Install ``replacement(kind, index, args, extra)`` as ComfyUI's block replacement for every block of ``dm``
    on the clone ``m``; a block another node already replaces keeps that replacement (whose attention still
    reaches the patch's override), said once."""
    if not chunkable_blocks(dm):
        log.warning("UltraGen: this model's blocks are neither FLUX.1's nor FLUX.2's; they run whole (more memory)")
        return
    taken = m.model_options["transformer_options"].get("patches_replace", {}).get("dit", {})
    kept = []
    for kind, count in (("double_block", len(dm.double_blocks)), ("single_block", len(dm.single_blocks))):
        for i in range(count):
            if (kind, i) in taken:
                kept.append(f"{kind.split('_')[0]} {i}")
            else:
                m.set_model_patch_replace(functools.partial(replacement, kind, i), "dit", kind, i)
    if kept:
        log.warning(
            "UltraGen: another node replaces FLUX's blocks (%s); they keep that replacement and UltraGen's "
            "windowed attention, without UltraGen's memory-saving slices (more memory at high resolution)",
            ", ".join(kept),
        )


def is_last_block(dm, kind: str, index: int) -> bool:
    """Whether FLUX's forward runs no block after this one (only its final layer)."""
    if len(dm.single_blocks):
        return kind == "single_block" and index == len(dm.single_blocks) - 1
    return kind == "double_block" and index == len(dm.double_blocks) - 1
