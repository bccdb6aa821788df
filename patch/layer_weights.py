"""A layer's weight, taken once for a whole block call (or VAE layer), the way the layer's own forward takes it.

Why: the chunked FLUX blocks (``chunked_blocks.py``) run each linear layer on many slices of
the sequence. Calling the layer per slice would repeat ComfyUI's per-call work per slice:
the fp8 -> bf16 cast of manual-cast weights, the LoRA weight functions of a partially loaded
model, and — for weights ComfyUI streams from system memory on a small card — the copy over
PCIe (12 GB per step for FLUX.1 in fp8, times the number of slices). So each layer's weight
is taken once per block call with ComfyUI's own ``comfy.ops.cast_bias_weight`` (which applies
LoRA functions, casts and moves exactly as the layer's forward would) and used for every slice.

ComfyUI 0.29 casts into per-stream buffers that the next cast reuses, and DynamicVRAM hands
out weights pinned only until ``uncast_bias_weight``; a weight held across other casts is
therefore cloned first. Layers of any other kind (GGUF, quantized scaled-mm, a class another
node installed) run their own forward on each slice: slower, never wrong. The exact VAE takes its
convolutions' and group norms' weights the same way (ComfyUI may stream or cast a VAE's weights too).
"""

from __future__ import annotations

import copy

import comfy.ldm.flux.layers
import comfy.model_management
import comfy.ops
import torch
import torch.nn.functional as F

from ..kernels.rope import QKNorm

# ComfyUI's own cast-on-forward layers (manual_cast's inherit their forward) and the torch layers they extend.
_STANDARD = {
    torch.nn.Linear: comfy.ops.disable_weight_init.Linear,
    torch.nn.Conv2d: comfy.ops.disable_weight_init.Conv2d,
    torch.nn.GroupNorm: comfy.ops.disable_weight_init.GroupNorm,
}
if issubclass(getattr(comfy.ops.disable_weight_init, "RMSNorm", object), torch.nn.RMSNorm):  # FLUX's QK-norm, 0.29
    _STANDARD[torch.nn.RMSNorm] = comfy.ops.disable_weight_init.RMSNorm


def _is_guidance_forward(module: torch.nn.Module) -> bool:
    return getattr(module.__dict__.get("forward"), "ultragen_guidance_rows", False)


def _forward_replaced(module: torch.nn.Module) -> bool:
    """Another node set its own forward on this module. (ComfyUI's undone object patches leave the class's own
    forward bound on the instance, which replaces nothing.)"""
    own = module.__dict__.get("forward")
    return own is not None and getattr(own, "__func__", None) is not type(module).forward


def _hooked(module: torch.nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _standard(module: torch.nn.Module) -> bool:
    """A plain linear, conv, group-norm or RMS-norm layer, or ComfyUI's own cast-on-forward one (no other node's
    forward or hooks on it)."""
    if _forward_replaced(module) and not _is_guidance_forward(module):
        return False  # another node's forward on this layer is honoured
    if _hooked(module):
        return False  # hooks see each slice
    cls = type(module)
    for plain, comfy_layer in _STANDARD.items():
        if cls.forward is plain.forward:
            return True
        if (
            isinstance(module, comfy_layer)
            and cls.forward is comfy_layer.forward
            and cls.forward_comfy_cast_weights is comfy_layer.forward_comfy_cast_weights
            and type(module.weight) in (torch.Tensor, torch.nn.Parameter)  # not a QuantizedTensor
        ):
            return True
    return False


def _casts(module: torch.nn.Module) -> bool:
    return bool(getattr(module, "comfy_cast_weights", False) or getattr(module, "weight_function", None)
                or getattr(module, "bias_function", None))  # fmt: skip


def take_weight(module: torch.nn.Module, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) on ``like``'s device and dtype, as ``module``'s forward would use them; None for
    a layer whose forward must run as it is (see the module docstring)."""
    if not _standard(module):
        return None
    weight, bias = module.weight, getattr(module, "bias", None)  # torch's RMSNorm has no bias attribute
    if not _casts(module) and weight.device == like.device and weight.dtype == like.dtype:
        return weight, bias  # resident and uncast: the parameters themselves
    if not _casts(module):
        return weight.to(like.device, like.dtype), None if bias is None else bias.to(like.device, like.dtype)
    if not hasattr(comfy.ops, "uncast_bias_weight"):  # ComfyUI before per-stream cast buffers: fresh tensors
        return comfy.ops.cast_bias_weight(module, like)
    weight, bias, stream = comfy.ops.cast_bias_weight(module, like, offloadable=True)
    held = (weight.clone(), None if bias is None else bias.clone()) if _borrowed(stream) else (weight, bias)
    comfy.ops.uncast_bias_weight(module, weight, bias, stream)
    return held


def _borrowed(stream) -> bool:
    """Whether a 0.29-style cast result lives in memory ComfyUI takes back (a stream's cast buffer, a
    DynamicVRAM pin) rather than a tensor of its own."""
    if stream is None:
        return False
    offload_stream, weight_a, _ = stream
    return offload_stream is not None or (weight_a is not None and not isinstance(weight_a, torch.Tensor))


class TakenLinear:
    """``module``'s weight taken once; calls apply it to any slice of rows (..., in) -> (..., out).

    ``outputs``: only these outputs (a single block's linear1 split into q, k, v and the MLP input: :meth:`part`).
    ``per_slice``: the layer's own forward runs on each slice instead (see :func:`take_weight`);
    ``guidance_forward``: that forward is the patch's guidance-LoRA forward, which adds the update itself.
    """

    def __init__(self, module: torch.nn.Module, like: torch.Tensor):
        self.module = module
        self.outputs: slice | None = None
        self.taken = take_weight(module, like)
        self.per_slice = self.taken is None
        self.guidance_forward = self.per_slice and _is_guidance_forward(module)

    def part(self, outputs: slice) -> TakenLinear:
        """These outputs of the layer, from the same taken weight (cast, LoRA-patched and moved once for both
        parts of a split layer, and held once)."""
        part = copy.copy(self)
        part.outputs = outputs
        if self.taken is not None:
            weight, bias = self.taken
            part.taken = (weight[outputs], None if bias is None else bias[outputs])
        return part

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.taken is not None:
            return F.linear(x, *self.taken)
        out = self.module(x)
        return out if self.outputs is None else out[..., self.outputs]


def take_qk_norm(norm: torch.nn.Module, like: torch.Tensor) -> QKNorm | None:
    """FLUX's QK-norm (``QKNorm``: an RMS norm of q and one of k over each head's channels): its weights on
    ``like``'s device and dtype and its eps, as its forward would use them, taken once for a block call so that
    ``kernels/rope.py`` can normalise q and k in its rotation pass; None where the norm is not ComfyUI's own,
    unpatched, over RMS norms this knows (then the block calls it). ComfyUI 0.3.64's FLUX has its own RMSNorm
    (``scale``, eps 1e-6); 0.29's is ``operations.RMSNorm`` (torch's: ``weight``, eps None = the epsilon of the
    dtype it computes in, float32 for bf16), whose cast, LoRA functions and streaming :func:`take_weight` applies."""
    layers = comfy.ldm.flux.layers
    if type(norm) is not getattr(layers, "QKNorm", None) or _forward_replaced(norm) or _hooked(norm):
        return None
    weights, eps = [], set()
    for module in (norm.query_norm, norm.key_norm):
        if type(module) is getattr(layers, "RMSNorm", None):
            if _forward_replaced(module) or _hooked(module):
                return None
            weights.append(comfy.model_management.cast_to(module.scale, dtype=like.dtype, device=like.device))
            eps.add(1e-6)  # its forward's
        elif isinstance(module, torch.nn.RMSNorm) and module.weight is not None:
            taken = take_weight(module, like)
            if taken is None:
                return None
            weights.append(taken[0])
            # eps None: torch's rms_norm adds the epsilon of the dtype it computes in (float32 for bf16 / fp16
            # inputs; its decomposition says so), not the input dtype's (bf16: 0.0078, which this once used).
            computes_in = torch.promote_types(like.dtype, torch.float32)
            eps.add(torch.finfo(computes_in).eps if module.eps is None else module.eps)
        else:
            return None
    return QKNorm(weights[0], weights[1], eps.pop()) if len(eps) == 1 else None
