"""The UltraGen patch on tiny FLUX models in tests: inputs, patched clones, guidance, runs.

Imports ComfyUI (and ``comfy_flux``) only inside the functions, so that test modules can import
these at collection time on machines without ComfyUI, where their tests then skip.
"""

from __future__ import annotations

import torch

# Small windows (so tokens really are reordered, with partial border windows) whose neighbourhood
# reaches every window, text that sees everything, no NTK, no shift: dense attention, exactly.
IDENTITY = dict(window=4, neighbour_radius=16, text_sees="all", ntk_factor=1.0, constant_shift=False)


def device():
    import comfy.model_management

    return comfy.model_management.get_torch_device()  # the CPU here, the GPU on a GPU machine


def inputs(batch=1, h=21, w=37, text=7, seed=0):
    from comfy_flux import CONTEXT_DIM, VEC_DIM

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, h, w, generator=g)
    ctx, y = torch.randn(batch, text, CONTEXT_DIM, generator=g), torch.randn(batch, VEC_DIM, generator=g)
    return x.to(device()), ctx.to(device()), y.to(device())


def references_and_control(batch: int, n_img: int, seed: int = 5) -> tuple[list, dict]:
    """Kontext reference latents and ControlNet residuals (over ``n_img`` image tokens, hidden 96) for a tiny FLUX."""
    g = torch.Generator().manual_seed(seed)
    refs = [torch.randn(batch, 16, 10, 12, generator=g).to(device())]
    control = {
        "input": [torch.randn(batch, n_img, 96, generator=g).to(device()), None],
        "output": [torch.randn(batch, n_img, 96, generator=g).to(device())],
    }
    return refs, control


def patched(model, guidance=None, lora=None, strength=1.0, **options):
    from ultragen.patch import PatchOptions, UltraGenFluxPatch

    return UltraGenFluxPatch(PatchOptions(**options), guidance=guidance, lora=lora, lora_strength=strength).apply(model)


def one_run(seed=0):
    """transformer_options entries that make several model calls one sampling run (as a sampler does)."""
    from ultragen.patch import UltraGenFluxPatch

    return UltraGenFluxPatch().run_options(seed)


def guidance_of(h, w, target_hw, seed=3):
    from ultragen.patch import Guidance

    g = torch.Generator().manual_seed(seed)
    return Guidance(torch.randn(1, 16, h, w, generator=g), target_hw[1] * 8, target_hw[0] * 8)


def whole_blocks(model):
    """``model`` with every block run by ComfyUI's own code: an attn1_patch that changes nothing."""
    m = model.clone()
    m.set_model_attn1_patch(lambda q, k, v, **kwargs: {})
    return m


def block_inputs(dm, batch: int, n_txt: int, n_img: int, seed: int):
    """Random (img, txt, ids) for one of ``dm``'s blocks: (B, n_img, hidden), (B, n_txt, hidden), positions on the
    model's axes."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(batch, n_img, dm.hidden_size, generator=g)
    txt = torch.randn(batch, n_txt, dm.hidden_size, generator=g)
    ids = torch.randint(0, 9, (batch, n_txt + n_img, len(dm.params.axes_dim)), generator=g).float()
    return img, txt, ids


def dense_block_context(**call):
    """A chunked block's context for a call prepared by hand (``call``: the CallState fields the blocks read),
    attention dense (PyTorch's SDPA), no guidance LoRA: what ComfyUI's blocks compute, to compare with them."""
    from types import SimpleNamespace

    from ultragen.patch.slice_ops import BlockContext

    def attend(q, k, v, state):
        q.copy_(torch.nn.functional.scaled_dot_product_attention(q, k, v))

    fields = dict(rotary_table=None, n_guid=0, qkv_buffer=None, slice_tokens=None, guidance_rows_override=None,
                  vec_zero=None, zero_modulations=None, diffusion_model=None)  # fmt: skip
    return BlockContext(SimpleNamespace(**{**fields, **call}), attend, lambda name: None, 1.0)
