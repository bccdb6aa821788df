"""A FLUX block's token-wise operations on one slice of tokens, for ``chunked_blocks``.

Why a module of its own: each operation is ComfyUI's arithmetic (``apply_mod``, the gated residual
add, the MLP, a linear layer with the guidance LoRA's update on the guidance rows), computed where it
can in one pass over the slice instead of ComfyUI's several (the "one-pass forms"); which forms run
is one switch, ``ONE_PASS_FORMS``, that ``bench/flux_step.py`` and the tests set per form.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import comfy.ldm.flux.layers
import torch
import torch.nn.functional as F

from ..core.guidance_lora import LoRALayer
from ..kernels.gelu import gelu_tanh_
from ..kernels.silu_gate import silu_gate
from .call_state import CallState
from .layer_weights import TakenLinear

# The one-pass forms used instead of ComfyUI's operation order; each saves passes of a slice's activations through
# memory (the step's token-wise work beside its GEMMs): "norm" LayerNorm with the modulation as its affine,
# "gated_add" one addcmul_ for ``x += out * gate``, "joined_gemm" the single block's linear2 halves summed by the
# GEMM, "qkv_into" q/k/v written by their GEMM and RoPE straight into the call's buffer, "gelu_epilogue" FLUX.1's
# MLP GELU in the GEMM's epilogue (CUDA), "silu_gate" FLUX.2's MLP gate silu(x1) * x2 in one kernel, "qk_norm"
# q's and k's RMS norms inside the RoPE kernel's pass (with "qkv_into", where Triton runs).
# bench/flux_step.py times all, none and each one left out, in one process.
ALL_FORMS: frozenset[str] = frozenset({"norm", "gated_add", "joined_gemm", "qkv_into", "gelu_epilogue", "silu_gate",
                                       "qk_norm"})  # fmt: skip
# The forms in use: all. Each was timed left out on an H200 (bench/flux_step.py --ablate, FLUX.1-dev at 4096^2,
# code 1c7273e): norm 0.055 s a step, gated_add 0.022, joined_gemm 0.015, qkv_into 0.233, gelu_epilogue 0.049,
# qk_norm 0.143 (silu_gate runs on FLUX.2 only); all together 1.19x faster than ComfyUI's order.
ONE_PASS_FORMS: frozenset[str] = ALL_FORMS


def modulated(norm: torch.nn.Module, x: torch.Tensor, mod) -> torch.Tensor:
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


def add_gated(rows: torch.Tensor, out: torch.Tensor, gate: torch.Tensor) -> None:
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


def mlp_state(act: torch.nn.Module, layer: BlockLinear, x: torch.Tensor, guidance_row: int) -> torch.Tensor:
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
