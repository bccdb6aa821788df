"""FLUX blocks computed a slice of tokens at a time, in the real ComfyUI (tiny models, CPU, float32).

References: ComfyUI's own unpatched output (dense windows), ComfyUI's own block code with the
patch's attention (blocks forced whole by an ``attn1_patch`` that changes nothing: where
guidance tokens or the guidance LoRA have no unpatched equivalent), and slice sizes worked
out by hand. Slices of 1, 5 and 7 tokens put boundaries inside windows, text and guidance.
"""

from __future__ import annotations

import logging

import pytest
import torch

from patching import (
    IDENTITY,
    device,
    guidance_of,
    inputs,
    one_run,
    patched,
    references_and_control,
    whole_blocks,
)

pytestmark = pytest.mark.usefixtures("comfyui")
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def flux(comfyui):
    from comfy_flux import tiny_flux

    return tiny_flux(seed=0)


def counting_blocks(monkeypatch):
    """Count the blocks the chunked code computes."""
    import ultragen.patch.flux_patch as flux_patch

    calls = {"double": 0, "single": 0}
    for kind in calls:
        original = getattr(flux_patch, f"{kind}_block")

        def counted(*args, _kind=kind, _original=original, **kwargs):
            calls[_kind] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(flux_patch, f"{kind}_block", counted)
    return calls


@pytest.mark.parametrize("tokens", [1, 5, 7, 4096])
def test_chunked_blocks_equal_comfyui_unpatched(flux, slices, monkeypatch, tokens):
    """Batch 2, odd latent (21 x 37: 11 x 19 tokens), Kontext references and ControlNet residuals."""
    from comfy_flux import denoise

    slices(tokens)
    calls = counting_blocks(monkeypatch)
    x, ctx, y = inputs(batch=2, h=21, w=37, text=13)
    refs, control = references_and_control(2, 11 * 19)
    ref = denoise(flux, x, 0.5, ctx, y, ref_latents=refs, control=control)
    out = denoise(patched(flux, **IDENTITY), x, 0.5, ctx, y, ref_latents=refs, control=control)
    assert calls == {"double": 2, "single": 2}  # every block ran chunked
    assert (out - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


@pytest.mark.parametrize("text", [1, 7])
def test_chunked_blocks_with_guidance_equal_comfyui_blocks(flux, slices, text):
    """Guidance tokens (their own rows at the end of the sequence) and windows that really restrict."""
    from comfy_flux import denoise

    slices(5)
    x, ctx, y = inputs(h=16, w=20, text=text)
    g = guidance_of(4, 5, (8, 10))
    for scope in ("local", "global"):
        model = patched(flux, guidance=g, window=2, guidance_scope=scope)
        chunked = denoise(model, x, 0.6, ctx, y)
        whole = denoise(whole_blocks(model), x, 0.6, ctx, y)
        assert (chunked - whole).abs().max().item() <= 1e-5 * whole.abs().max().item(), scope


def test_guidance_lora_is_applied_per_slice_as_on_whole_blocks(flux, slices, tmp_path):
    from test_guidance_lora_patch import ALL_GUIDANCE_LAYERS, _lora_file

    from ultragen.patch import load_guidance_lora

    from comfy_flux import denoise

    x, ctx, y = inputs(h=16, w=20)
    g = guidance_of(4, 5, (8, 10))
    lora = load_guidance_lora(_lora_file(tmp_path, ALL_GUIDANCE_LAYERS))
    model = patched(flux, guidance=g, lora=lora, strength=1.5, window=2)
    whole = denoise(whole_blocks(model), x, 0.6, ctx, y)
    plain = denoise(patched(flux, guidance=g, window=2), x, 0.6, ctx, y)
    assert (whole - plain).abs().max().item() > 1e-4  # the LoRA matters here
    for tokens in (3, 7, 4096):  # slices that split the 20 guidance rows, or hold them whole
        slices(tokens)
        chunked = denoise(model, x, 0.6, ctx, y)
        assert (chunked - whole).abs().max().item() <= 1e-5 * whole.abs().max().item(), tokens


def test_weights_are_cast_once_per_block_call_with_comfyui_weight_functions(flux, slices, monkeypatch):
    """A partially loaded model: ComfyUI casts each weight on use and applies LoRA weight functions in the
    cast. Chunked blocks take each layer's weight once per block call, through that same cast."""
    import comfy.ops

    from comfy_flux import denoise

    x, ctx, y = inputs(h=16, w=20)
    model = patched(flux, **IDENTITY)
    reference = denoise(model, x, 0.6, ctx, y)
    dm = flux.model.diffusion_model
    layer = dm.single_blocks[0].linear1
    delta = torch.randn_like(layer.weight) * 0.05
    linears = [m for m in dm.modules() if isinstance(m, comfy.ops.disable_weight_init.Linear)]
    casts = []
    original_cast = comfy.ops.cast_bias_weight

    def counted_cast(module, *args, **kwargs):
        casts.append(module)
        return original_cast(module, *args, **kwargs)

    monkeypatch.setattr(comfy.ops, "cast_bias_weight", counted_cast)
    for m in linears:
        monkeypatch.setattr(m, "comfy_cast_weights", True, raising=False)
    monkeypatch.setattr(layer, "weight_function", [lambda w: w + delta.to(w)], raising=False)
    unpatched = denoise(flux, x, 0.6, ctx, y)
    casts.clear()
    slices(5)
    chunked = denoise(model, x, 0.6, ctx, y)
    assert (chunked - unpatched).abs().max().item() <= 1e-5 * unpatched.abs().max().item()
    assert (chunked - reference).abs().max().item() > 1e-4  # the weight function was applied
    block_linears = {id(m) for m in linears if any(m is b for b in dm.double_blocks.modules())
                     or any(m is b for b in dm.single_blocks.modules())}  # fmt: skip
    in_blocks = [m for m in casts if id(m) in block_linears]
    # Per call: double blocks 2 streams x (qkv, proj, mlp.0, mlp.2); single blocks linear1 once (for its q/k/v rows
    # and its MLP rows) and linear2; the modulation layers once each (2 per double block, 1 per single).
    assert len(in_blocks) == 2 * (8 + 2) + 2 * (2 + 1)


def test_other_attention_patches_run_whole_blocks_with_one_warning(flux, caplog, monkeypatch):
    """An attn1_patch (e.g. FluxKVCache, PuLID-style nodes) needs ComfyUI's block code: the blocks run whole
    (the patch's attention still windowed), once said, and the image is the chunked one."""
    import comfy.ldm.flux.layers as layers

    from comfy_flux import denoise

    tables = []
    original = layers.attention

    def recording(q, k, v, pe, **kwargs):
        tables.append(pe)
        return original(q, k, v, pe, **kwargs)

    monkeypatch.setattr(layers, "attention", recording)
    x, ctx, y = inputs(h=16, w=20)
    model = patched(flux, window=2)
    chunked = denoise(model, x, 0.6, ctx, y)
    assert tables == []  # chunked blocks never call ComfyUI's attention
    caplog.set_level(logging.WARNING)
    run = one_run()
    whole = denoise(whole_blocks(model), x, 0.6, ctx, y, options=run)
    denoise(whole_blocks(model), x, 0.5, ctx, y, options=run)
    assert (chunked - whole).abs().max().item() <= 1e-5 * whole.abs().max().item()
    assert len([r for r in caplog.records if "attn1_patch" in r.getMessage()]) == 1
    assert len(tables) == 2 * 4 and all(t is None for t in tables)  # RoPE applied by the patch, not ComfyUI
    tables.clear()
    mask = torch.zeros(1, ctx.shape[1] + 80, ctx.shape[1] + 80, device=device())
    denoise(model, x, 0.5, ctx, y, attention_mask=mask)  # a dense call: ComfyUI's blocks, ComfyUI rotates
    assert len(tables) == 4 and all(isinstance(t, torch.Tensor) for t in tables)


def test_fallback_reasons():
    from ultragen.patch.chunked_blocks import fallback_reason

    img, vec = torch.zeros(2, 5, 8), torch.zeros(2, 8)
    call = object()
    with torch.inference_mode():
        assert fallback_reason({"img": img, "vec": vec}, None) == ""
        assert fallback_reason({"img": img, "vec": vec}, call) is None
        assert "index_timestep_zero" in fallback_reason({"img": img, "vec": torch.zeros(4, 8)}, call)
        from comfy.ldm.flux.layers import ModulationOut

        per_call = ModulationOut(*(torch.zeros(2, 1, 8),) * 3)  # FLUX.2: modulations computed once per call
        assert fallback_reason({"img": img, "vec": ((per_call, per_call), (per_call, per_call))}, call) is None
        per_group = ModulationOut(*(torch.zeros(2, 2, 8),) * 3)  # FLUX.2 with references at timestep 0
        assert "index_timestep_zero" in fallback_reason({"img": img, "vec": ((per_group, per_group),) * 2}, call)
        options = {"patches": {"attn1_output_patch": [print]}}
        assert "attn1_patch" in fallback_reason({"img": img, "vec": vec, "transformer_options": options}, call)
    with torch.enable_grad():
        assert fallback_reason({"img": img, "vec": vec}, call) == ""  # training: ComfyUI's blocks, silently


def test_slice_size_by_hand():
    from ultragen.patch.chunked_blocks import MIN_CHUNK_TOKENS, SLICE_WIDTHS, chunk_tokens

    eight_k, four_k = 278528 + 512, 65536 + 512 + 4096  # image + text + guidance tokens (4096^2: 4096 guidance)
    assert chunk_tokens(eight_k, 1, 3072, 2, None) == 16384  # a sixteenth (17,440) capped at 16,384
    assert chunk_tokens(four_k, 1, 3072, 2, None) == 4608  # 70,144 / 16 = 4,384, up to 18 x 256
    assert chunk_tokens(100, 1, 3072, 2, None) == 100  # a short sequence is one slice
    assert chunk_tokens(16384 + 512 + 1024, 1, 3072, 2, None) == 4096  # 2048^2: 1,120 a sixteenth, 4,096 at least
    per_token = SLICE_WIDTHS * 3072 * 2  # 98,304 bytes: 16 hidden widths in bf16
    assert chunk_tokens(eight_k, 1, 3072, 2, 2 * 16384 * per_token) == 16384  # half the free memory holds it
    assert chunk_tokens(eight_k, 1, 3072, 2, 2 * 5000 * per_token) == 4864  # 5000 tokens fit: 19 x 256
    assert chunk_tokens(eight_k, 2, 3072, 2, 2 * 5000 * per_token) == 2304  # batch 2: 2500 -> 9 x 256
    assert chunk_tokens(eight_k, 1, 3072, 2, 10) == MIN_CHUNK_TOKENS  # never below 256 tokens


def test_one_qkv_buffer_per_model_call(flux, slices, monkeypatch):
    """Every block of a call writes q, k, v into the same buffer (a 3U allocation made once, not 57 times
    between the weights a partially loaded model casts); the next call makes its own."""
    import ultragen.patch.chunked_blocks as chunked_blocks

    from comfy_flux import denoise

    slices(5)
    seen = []
    original = chunked_blocks._qkv_buffer

    def recording(*args, **kwargs):
        buf = original(*args, **kwargs)
        seen.append((buf.data_ptr(), tuple(buf.shape)))
        return buf

    monkeypatch.setattr(chunked_blocks, "_qkv_buffer", recording)
    x, ctx, y = inputs(h=16, w=20, text=7)
    model = patched(flux, window=2)
    denoise(model, x, 0.6, ctx, y)
    assert len(seen) == 4 and len(set(seen)) == 1 and seen[0][1] == (1, 7 + 80, 3, 2, 48)


def test_style_lora_weight_patches_change_the_output_as_without_the_patch(flux, slices):
    """A user's LoRA (ComfyUI weight patches on block layers) applies inside the chunked blocks exactly as in
    ComfyUI's own: identity options, with and without the style patch, against the unpatched model."""
    from comfy_flux import denoise

    slices(5)
    g = torch.Generator().manual_seed(9)
    style = {
        "diffusion_model.double_blocks.1.img_mlp.0.weight": (torch.randn(384, 96, generator=g) * 0.05,),
        "diffusion_model.single_blocks.0.linear2.weight": (torch.randn(96, 480, generator=g) * 0.05,),
    }

    def with_style(m):
        m = m.clone()
        m.add_patches(style, 0.8)
        return m

    x, ctx, y = inputs(h=16, w=20)
    ref = denoise(with_style(flux), x, 0.6, ctx, y)
    out = denoise(with_style(patched(flux, **IDENTITY)), x, 0.6, ctx, y)
    plain = denoise(patched(flux, **IDENTITY), x, 0.6, ctx, y)
    assert (out - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    assert (out - plain).abs().max().item() > 1e-3


def test_another_nodes_block_replacement_is_kept_with_one_warning(flux, caplog):
    """A PuLID/Redux-style node that replaced a block first keeps it; the other blocks are chunked; one warning."""
    from comfy_flux import denoise

    seen = []

    def theirs(args, extra):
        seen.append(1)
        return extra["original_block"](args)

    m = flux.clone()
    m.set_model_patch_replace(theirs, "dit", "single_block", 1)
    caplog.set_level(logging.WARNING)
    model = patched(m, **IDENTITY)
    warnings = [r.getMessage() for r in caplog.records if "replaces FLUX's blocks" in r.getMessage()]
    assert len(warnings) == 1 and "single 1" in warnings[0]
    x, ctx, y = inputs(h=16, w=20)
    out = denoise(model, x, 0.6, ctx, y)
    assert seen == [1]  # their replacement ran (once, for the one call)
    ref = denoise(m, x, 0.6, ctx, y)
    assert (out - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


def test_q_k_v_and_rope_table_are_freed_before_the_final_layer(flux, slices):
    """FLUX's final layer runs after the last block; the call's 3U q/k/v buffer and its RoPE table must not be
    alive beside it (it was the step's peak). Read from inside final_layer, during a patched call."""
    from ultragen.patch.call_state import active_call

    from comfy_flux import denoise

    slices(5)
    seen = []
    dm = flux.model.diffusion_model
    handle = dm.final_layer.register_forward_pre_hook(
        lambda module, args: seen.append((active_call().qkv_buffer, active_call().rotary_table))
    )
    try:
        x, ctx, y = inputs(h=16, w=20, text=7)
        denoise(patched(flux, window=2), x, 0.6, ctx, y)
    finally:
        handle.remove()
    assert seen == [(None, None)]


@pytest.mark.parametrize("on", ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)])
@pytest.mark.parametrize("family", ["FLUX.1", "FLUX.2"])
def test_qk_norm_taken_once_normalises_like_comfyuis(comfyui, family, on):
    """The QK-norm's weights and eps as this ComfyUI's forward uses them (0.3.64: its own RMSNorm, eps 1e-6; 0.29:
    torch's RMSNorm with eps None), applied through ``apply_rope(norm=...)`` with an identity rotation (on a CPU its
    PyTorch path, tests/test_rope.py checks the kernel's against the formula; on CUDA the Triton kernel against
    torch's CUDA rms_norm): ComfyUI's own QKNorm output, in float32 and in bf16, on q and k small enough (mean
    square 1e-6) that the eps shows (bf16's epsilon, 0.0078, taken for torch's float32 one, made the bf16 output
    ~90x too small); a hooked norm is left to its forward."""
    from ultragen.kernels.rope import apply_rope
    from ultragen.patch.layer_weights import take_qk_norm

    from random_models import host_has_flux2, tiny_flux, tiny_flux2

    if family == "FLUX.2" and not host_has_flux2():
        return  # this ComfyUI (0.3.64) has no FLUX.2
    dm = (tiny_flux2 if family == "FLUX.2" else tiny_flux)(depth=1, single=1).model.diffusion_model.to(on)
    norm = dm.double_blocks[0].img_attn.norm
    heads, dim = dm.double_blocks[0].num_heads, dm.hidden_size // dm.double_blocks[0].num_heads
    g = torch.Generator().manual_seed(13)
    q, k, v = (torch.randn(2, 9, heads, dim, generator=g).to(on) * 1e-3 for _ in range(3))
    with torch.no_grad():
        for module in (norm.query_norm, norm.key_norm):  # weights of their own (a fresh model: nobody else's)
            weight = module.scale if hasattr(module, "scale") else module.weight
            weight.copy_(torch.empty(weight.shape).uniform_(0.5, 1.5, generator=g))  # drawn on the CPU: any device
        identity = torch.tensor([[1.0, 0.0], [0.0, 1.0]], device=on).expand(1, 1, 9, dim // 2, 2, 2).contiguous()
        for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
            norm.to(dtype)
            qd, kd, vd = (t.to(dtype) for t in (q, k, v))
            taken = take_qk_norm(norm, qd)
            assert taken is not None
            ref_q, ref_k = norm(qd, kd, vd)
            out_q, out_k = apply_rope(qd.transpose(1, 2), kd.transpose(1, 2), identity.to(dtype), norm=taken)
            for ours, ref in ((out_q.transpose(1, 2), ref_q), (out_k.transpose(1, 2), ref_k)):
                assert (ours.float() - ref.float()).abs().max().item() <= tolerance * ref.float().abs().max().item()
        norm.float()
    handle = norm.query_norm.register_forward_hook(lambda *args: None)
    try:
        assert take_qk_norm(norm, q) is None
    finally:
        handle.remove()
