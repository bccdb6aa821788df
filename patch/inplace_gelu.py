"""The single blocks' MLP activation computed in place, for inference.

Why: a FLUX single block runs ``linear2(cat(attn, mlp_act(mlp)))`` where ``mlp`` is a view
of ``linear1``'s output that nothing reads afterwards. ``nn.GELU`` writes a new tensor of
four hidden widths (6.4 GiB at 8192^2) while that output, q, k and the attention output
are all alive: the step's peak memory. Writing the activation into ``mlp`` itself removes
that tensor through ``kernels.gelu.gelu_tanh_``: a Triton kernel on CUDA (PyTorch is slow on
this strided view; the values agree with ``nn.GELU`` to within one bf16 rounding step),
PyTorch's own in-place GELU elsewhere (the same values bit for bit). With autograd recording (training) the
original module runs, since the backward pass needs the activation's input.
"""

from __future__ import annotations

import torch

from ..kernels.gelu import gelu_tanh_


class InPlaceGELU(torch.nn.Module):
    """Same output as ``original`` (an ``nn.GELU``), written into its input when no gradient is recorded."""

    def __init__(self, original: torch.nn.GELU):
        super().__init__()
        self.original = original
        self.approximate = original.approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return self.original(x)
        if self.approximate == "tanh":
            return gelu_tanh_(x)
        return torch.ops.aten.gelu_(x, approximate=self.approximate)


def inplace_gelu_patches(diffusion_model, get_object) -> dict[str, torch.nn.Module]:
    """Object patches (path -> module) for every single block whose activation is a plain ``nn.GELU``."""
    patches = {}
    for i in range(len(diffusion_model.single_blocks)):
        path = f"diffusion_model.single_blocks.{i}.mlp_act"
        act = get_object(path)
        if type(act) is torch.nn.GELU:
            patches[path] = InPlaceGELU(act)
    return patches
