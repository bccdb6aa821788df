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
from dataclasses import dataclass

import comfy.ldm.flux.layers
import comfy.model_management
import torch
import torch.nn.functional as F

from ..core.guidance_lora import LoRALayer
from ..kernels.gelu import gelu_tanh_
from ..kernels.rope import apply_rope
from ..kernels.silu_gate import silu_gate
from ..kernels.triton_env import triton_runs_on
from .call_state import CallState, HandOver
from .inplace_gelu import InPlaceGELU
from .layer_weights import TakenLinear, take_qk_norm
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
# The one-pass forms used instead of ComfyUI's operation order; each saves passes of a slice's activations through
# memory (the step's token-wise work beside its GEMMs): "norm" LayerNorm with the modulation as its affine,
# "gated_add" one addcmul_ for ``x += out * gate``, "joined_gemm" the single block's linear2 halves summed by the
# GEMM, "qkv_into" q/k/v written by their GEMM and RoPE straight into the call's buffer, "gelu_epilogue" FLUX.1's
# MLP GELU in the GEMM's epilogue (CUDA), "silu_gate" FLUX.2's MLP gate silu(x1) * x2 in one kernel, "qk_norm"
# q's and k's RMS norms inside the RoPE kernel's pass (with "qkv_into", where Triton runs).
# bench/flux_step.py times all, none and each one left out, in one process.
ALL_FORMS: frozenset[str] = frozenset({"norm", "gated_add", "joined_gemm", "qkv_into", "gelu_epilogue", "silu_gate",
                                       "qk_norm"})  # fmt: skip
# The forms in use. The two new Triton kernels (silu_gate, and the RoPE kernel's QK-norm variant) are off by default
# until they have been compiled and timed on a GPU (they pass Triton's CPU interpreter; a kernel that fails to compile
# there would stop every sampling run): bench/flux_step.py turns them on for its measurements.
ONE_PASS_FORMS: frozenset[str] = ALL_FORMS - {"silu_gate", "qk_norm"}


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
        free = comfy.model_management.get_free_memory(x.device) if x.device.type == "cuda" else None
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


def _modulated(norm: torch.nn.Module, x: torch.Tensor, mod) -> torch.Tensor:
    """ComfyUI's ``apply_mod(norm(x), 1 + scale, shift)``; in one pass where the norm is a plain LayerNorm and the
    modulation one row of x's dtype for one sample: then it is that LayerNorm's affine (ComfyUI's order writes the
    normalised slice, then reads it back to modulate it; the result differs by one bf16 rounding fewer)."""
    if "norm" in ONE_PASS_FORMS and _plain_layer_norm(norm) and x.shape[0] == 1 and mod.shift.shape[:2] == (1, 1):
        scale, shift = mod.scale, mod.shift
        if scale.dtype == shift.dtype == x.dtype:
            return F.layer_norm(x, norm.normalized_shape, (1 + scale).view(-1), shift.view(-1), norm.eps)
    return torch.addcmul(mod.shift, norm(x), 1 + mod.scale)  # ComfyUI's apply_mod


def _plain_layer_norm(norm: torch.nn.Module) -> bool:
    """A LayerNorm without weights of its own whose forward nobody replaced or hooks (FLUX's norm1 / norm2 /
    pre_norm, ComfyUI's ``operations.LayerNorm(elementwise_affine=False)``)."""
    return (
        isinstance(norm, torch.nn.LayerNorm) and norm.weight is None and norm.bias is None
        and "forward" not in vars(norm) and not norm._forward_hooks and not norm._forward_pre_hooks
    )  # fmt: skip


def _add_gated(rows: torch.Tensor, out: torch.Tensor, gate: torch.Tensor) -> None:
    """``rows += out * gate`` (ComfyUI's gated residual add), in one pass where the dtypes agree."""
    if "gated_add" in ONE_PASS_FORMS and out.dtype == gate.dtype == rows.dtype:
        rows.addcmul_(out, gate)
    else:
        rows += out * gate


def _is_gelu_tanh(act: torch.nn.Module) -> bool:
    return type(act) is torch.nn.GELU and act.approximate == "tanh"


def _is_silu_gate(act: torch.nn.Module) -> bool:
    """ComfyUI's ``SiLUActivation`` (FLUX.2's MLP: silu of the first half times the second), unpatched."""
    return (
        type(act) is getattr(comfy.ldm.flux.layers, "SiLUActivation", None) and type(act.gate_fn) is torch.nn.SiLU
        and "forward" not in vars(act) and not act._forward_hooks and not act._forward_pre_hooks
    )  # fmt: skip


def _activate(act: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """FLUX's MLP activation: in place where it is the plain tanh GELU (the slice is contiguous), in one kernel
    where it is FLUX.2's SiLU gate."""
    if _is_gelu_tanh(act):
        return gelu_tanh_(x)
    if "silu_gate" in ONE_PASS_FORMS and _is_silu_gate(act):
        return silu_gate(x)
    return act(x)


def _mlp_state(act: torch.nn.Module, layer: BlockLinear, x: torch.Tensor, guidance_row: int) -> torch.Tensor:
    """``act(layer(x))``, FLUX's MLP hidden state: the GELU in the GEMM's epilogue where it can be (FLUX.1 on
    CUDA), else the activation after the layer."""
    if _is_gelu_tanh(act) and (state := layer.gelu_tanh(x, guidance_row)) is not None:
        return state
    return _activate(act, layer(x, guidance_row))


def _add_lora(out: torch.Tensor, x: torch.Tensor, lora: LoRALayer | None, strength: float, guidance_row: int,
              first_output: int = 0) -> None:  # fmt: skip
    """Add the guidance LoRA's update to the rows of this slice at or after ``guidance_row`` (slice-relative),
    over the outputs this slice holds (``first_output`` onwards of the layer's)."""
    if lora is None or guidance_row >= x.shape[1]:
        return
    start = max(guidance_row, 0)
    covered = min(lora.up.shape[0] - first_output, out.shape[-1])
    if covered > 0:
        delta = lora.delta(x[:, start:], strength)[..., first_output : first_output + covered]
        out[:, start:, :covered] += delta.to(out.dtype)


class BlockLinear:
    """One of the block's linear layers for this block call: its weight taken once, applied to a slice of rows
    with the guidance LoRA's update on the slice's guidance rows (those from ``guidance_row`` on, slice-relative)."""

    def __init__(self, layer: TakenLinear, ctx: BlockContext, path: str | None):
        self.layer = layer
        self.call = ctx.call
        self.lora = ctx.lora(path) if path and ctx.call.n_guid else None
        self.strength = ctx.lora_strength
        self.first_output = 0 if layer.outputs is None else layer.outputs.start

    def __call__(self, x: torch.Tensor, guidance_row: int) -> torch.Tensor:
        if self.lora is not None and self.layer.guidance_forward:
            # The layer's own forward runs per slice and adds the update to the last rows it is told of.
            self.call.guidance_rows_override = max(0, x.shape[1] - max(guidance_row, 0))
            try:
                return self.layer(x)
            finally:
                self.call.guidance_rows_override = None
        out = self.layer(x)
        _add_lora(out, x, self.lora, self.strength, guidance_row, self.first_output)
        return out

    def into(self, x: torch.Tensor, guidance_row: int, out: torch.Tensor) -> bool:
        """The layer's output written into ``out`` (B, rows, outputs) by its GEMM, no new tensor: where the weight
        was taken and ``out`` is one dense matrix of the weight's dtype (batch 1). False: nothing written (call
        the layer instead)."""
        if "qkv_into" not in ONE_PASS_FORMS or self.layer.taken is None:
            return False
        if not (out.is_contiguous() and x.is_contiguous()):
            return False
        weight, bias = self.layer.taken
        if not (x.dtype == out.dtype == weight.dtype) or out.shape[:-1] != x.shape[:-1]:
            return False
        flat_x, flat_out = x.view(-1, x.shape[-1]), out.view(-1, out.shape[-1])
        if bias is None:
            torch.mm(flat_x, weight.t(), out=flat_out)
        else:
            torch.addmm(bias, flat_x, weight.t(), out=flat_out)
        _add_lora(out, x, self.lora, self.strength, guidance_row, self.first_output)
        return True

    def gelu_tanh(self, x: torch.Tensor, guidance_row: int) -> torch.Tensor | None:
        """GELU (tanh) of the layer's output computed by the GEMM's own epilogue (cuBLASLt): the 4-wide MLP state is
        written once instead of written, read and written again. On CUDA only, where PyTorch's
        ``_addmm_activation(use_gelu=True)`` applies the tanh form (on a CPU it applies erf's, which the CPU tests
        would catch); None where it cannot (a guidance-LoRA update on these rows, which must come before the
        activation; weights not taken; no bias, mixed dtypes): then call the layer and the activation."""
        addmm_gelu = getattr(torch, "_addmm_activation", None)
        if "gelu_epilogue" not in ONE_PASS_FORMS or addmm_gelu is None or x.device.type != "cuda":
            return None
        if self.layer.taken is None:
            return None
        weight, bias = self.layer.taken
        if bias is None or not (x.dtype == weight.dtype == bias.dtype) or not x.is_contiguous():
            return None
        if self.lora is not None and guidance_row < x.shape[1]:
            return None
        out = addmm_gelu(bias, x.view(-1, x.shape[-1]), weight.t(), use_gelu=True)
        return out.view(*x.shape[:-1], out.shape[-1])

    def of_joined(self, parts: tuple[torch.Tensor, ...], guidance_row: int) -> torch.Tensor:
        """The layer applied to ``torch.cat(parts, -1)`` without building it: one GEMM per part over its columns
        of the weight (the single block's linear2 over attention output and MLP state; a strided attention
        slice makes ``cat`` a slow copy of five widths per token)."""
        if self.layer.taken is None:
            return self(torch.cat(parts, -1), guidance_row)
        weight, bias = self.layer.taken
        out, start = None, 0
        for part in parts:
            columns = weight[:, start : start + part.shape[-1]]
            start += part.shape[-1]
            if out is None:
                out = F.linear(part, columns, bias)
            elif "joined_gemm" in ONE_PASS_FORMS and part.dtype == out.dtype == columns.dtype:  # summed by the GEMM
                out.view(-1, out.shape[-1]).addmm_(part.reshape(-1, part.shape[-1]), columns.t())
            else:
                out.add_(F.linear(part, columns))
        if self.lora is not None and guidance_row < out.shape[1]:
            rows = max(guidance_row, 0)
            joined = torch.cat([p[:, rows:] for p in parts], -1)
            _add_lora(out[:, rows:], joined, self.lora, self.strength, 0, self.first_output)
        return out


@dataclass(frozen=True)
class BlockContext:
    """What a chunked block call needs from the patch: the call, its attention and the guidance LoRA."""

    call: CallState
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, CallState], None]  # (B, H, L, D), out over q
    lora: Callable[[str], LoRALayer | None]
    lora_strength: float


def _write_qkv(qkv: torch.Tensor, offset: int, x: torch.Tensor, norm, mod, attn, table, chunk: int,
               guidance_from: int, layer: BlockLinear, mod_zero=None) -> None:  # fmt: skip
    """Rows ``offset`` .. of ``qkv`` (B, L, 3, H, D) from the stream ``x`` (B, S, hidden), a slice at a time."""
    batch, heads, dim = qkv.shape[0], qkv.shape[3], qkv.shape[4]
    into = table is not None and "qkv_into" in ONE_PASS_FORMS
    qk_norm = None  # the QK-norm's weights, taken once for all slices, where the RoPE kernel applies it
    if into and "qk_norm" in ONE_PASS_FORMS and triton_runs_on(x.device):
        qk_norm = take_qk_norm(attn.norm, x)
    for s in range(0, x.shape[1], chunk):
        e = min(s + chunk, x.shape[1])
        rows = slice(offset + s, offset + e)
        h = _modulated(norm, x[:, s:e], slice_modulation(mod, mod_zero, guidance_from - s, e - s))
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
            _add_gated(rows, proj(qkv[:, offset + s : offset + e, 0].flatten(2), here), m1.gate)
            hidden_state = _mlp_state(mlp[1], up, _modulated(norm2, rows, m2), here)
            _add_gated(rows, down(hidden_state, here), m2.gate)
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
        mlp = _mlp_state(act, mlp_in, _modulated(block.pre_norm, rows, m), here)
        _add_gated(rows, out_layer.of_joined((qkv[:, s:e, 0].flatten(2), mlp), here), m.gate)
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
