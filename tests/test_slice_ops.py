"""A block's token-wise operations on slices (``patch/slice_ops.py``), in the real ComfyUI: each one-pass form
against ComfyUI's own DoubleStreamBlock / SingleStreamBlock on the same inputs (FLUX.1 and FLUX.2, batch 1 and 2,
slices of 1, 5 and 4096 tokens), counted as it runs, and ComfyUI's operation order (no forms) likewise.
"""

from __future__ import annotations

import pytest
import torch

from patching import block_inputs, dense_block_context

pytestmark = pytest.mark.usefixtures("comfyui")


def counting_one_pass_forms(monkeypatch) -> dict:
    """Count the chunked blocks' one-pass forms as they run: LayerNorm given the modulation as its affine, a q/k/v
    GEMM writing into the call's buffer, RoPE writing into it (and normalising q and k in its pass), FLUX.2's SiLU
    gate in one kernel."""
    from ultragen.patch import chunked_blocks, slice_ops

    counts = {"modulated_norm": 0, "qkv_into_buffer": 0, "rope_into_buffer": 0, "qk_norm_in_rope": 0, "silu_gate": 0}
    layer_norm, into, apply_rope, silu_gate = (slice_ops.F.layer_norm, slice_ops.BlockLinear.into,
                                               chunked_blocks.apply_rope, slice_ops.silu_gate)  # fmt: skip

    def counted_gate(x):
        counts["silu_gate"] += 1
        return silu_gate(x)

    def counted_norm(x, shape, weight=None, bias=None, eps=1e-5):
        counts["modulated_norm"] += weight is not None
        return layer_norm(x, shape, weight, bias, eps)

    def counted_into(self, *args):
        written = into(self, *args)
        counts["qkv_into_buffer"] += written
        return written

    def counted_rope(*args, out=None, norm=None):
        counts["rope_into_buffer"] += out is not None
        counts["qk_norm_in_rope"] += norm is not None
        return apply_rope(*args, out=out, norm=norm)

    monkeypatch.setattr(slice_ops.F, "layer_norm", counted_norm)
    monkeypatch.setattr(slice_ops.BlockLinear, "into", counted_into)
    monkeypatch.setattr(chunked_blocks, "apply_rope", counted_rope)
    monkeypatch.setattr(slice_ops, "silu_gate", counted_gate)
    return counts


def blocks_against_comfyuis(dm, batch: int, family: str) -> float:
    """The largest difference, relative to ComfyUI's output, of ``dm``'s first double and single block computed
    chunked and by ComfyUI's own DoubleStreamBlock / SingleStreamBlock on the same random inputs (dense
    attention), on the model's device."""
    from ultragen.patch.chunked_blocks import chunkable_blocks, double_block, single_block

    assert chunkable_blocks(dm)
    device = dm.img_in.weight.device
    img, txt, ids = (t.to(device) for t in block_inputs(dm, batch=batch, n_txt=5, n_img=13, seed=11))
    v = torch.randn(batch, dm.hidden_size, generator=torch.Generator().manual_seed(12)).to(device)
    ctx = dense_block_context()
    with torch.inference_mode():
        pe = dm.pe_embedder(ids)
        if family == "FLUX.2":
            double_vec = (dm.double_stream_modulation_img(v), dm.double_stream_modulation_txt(v))
            single_vec = dm.single_stream_modulation(v)[0]
        else:
            double_vec = single_vec = v
        block = dm.double_blocks[0]
        ref_img, ref_txt = block(img=img.clone(), txt=txt.clone(), vec=double_vec, pe=pe)
        out = double_block(block, {"img": img.clone(), "txt": txt.clone(), "vec": double_vec, "pe": pe}, ctx, "d")
        x = torch.cat((txt, img), 1)
        ref_x = dm.single_blocks[0](x.clone(), vec=single_vec, pe=pe)
        out_x = single_block(dm.single_blocks[0], {"img": x.clone(), "vec": single_vec, "pe": pe}, ctx, "s")["img"]
    pairs = ((out["img"], ref_img), (out["txt"], ref_txt), (out_x, ref_x))
    return max(((ours - ref).abs().max() / ref.abs().max()).item() for ours, ref in pairs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the GELU epilogue runs there only)")
def test_blocks_on_the_gpu_equal_comfyuis_with_the_gelu_in_the_gemm(comfyui, slices, monkeypatch):
    """FLUX.1's blocks on CUDA in float32 (TF32 off), batch 1, slices of 5: every one-pass form, the GELU computed in
    the MLP GEMM's epilogue included (counted: ``_addmm_activation`` applies the tanh form on CUDA only; erf's
    GELU differs from it by up to ~5e-4 an activation), equal ComfyUI's blocks."""
    from ultragen.patch import slice_ops

    from random_models import tiny_flux

    dm = tiny_flux(depth=1, single=1).model.diffusion_model.cuda()
    slices(5)
    fused = []
    gelu_tanh = slice_ops.BlockLinear.gelu_tanh

    def counted(self, *args):
        state = gelu_tanh(self, *args)
        fused.append(state is not None)
        return state

    monkeypatch.setattr(slice_ops.BlockLinear, "gelu_tanh", counted)
    # Set and restored by hand: torch's cuBLAS settings object answers allow_tf32 through __getattr__, which
    # monkeypatch's undo cannot restore (it failed at teardown on torch 2.11).
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        assert blocks_against_comfyuis(dm, 1, "FLUX.1") <= 1e-5
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    assert fused == [True] * (1 + 3 + 4)  # the double block's txt (5 rows) and img (13) slices, the single block's


@pytest.mark.parametrize("family", ["FLUX.1", "FLUX.2"])
@pytest.mark.parametrize("tokens", [1, 5, 4096])
@pytest.mark.parametrize("batch,fewer_passes", [(1, True), (2, True), (1, False)])
def test_each_block_equals_comfyuis_own_block(comfyui, slices, monkeypatch, family, tokens, batch, fewer_passes):
    """Block by block, against ComfyUI's DoubleStreamBlock / SingleStreamBlock on the same inputs (dense attention):
    FLUX.1's blocks and FLUX.2's (modulations computed once per call, SiLU-gated MLPs, no biases); with the one-pass
    forms (batch 1: all of them, which the counts confirm; batch 2: the gated adds and the joined GEMM only) and in
    ComfyUI's operation order (``ONE_PASS_FORMS`` empty, the benchmark's A/B)."""
    from ultragen.kernels.triton_env import triton_runs_on
    from ultragen.patch import slice_ops

    from random_models import host_has_flux2, tiny_flux, tiny_flux2

    if family == "FLUX.2" and not host_has_flux2():
        return  # this ComfyUI (0.3.64) has no FLUX.2 blocks to compare with
    dm = (tiny_flux2 if family == "FLUX.2" else tiny_flux)(depth=1, single=1).model.diffusion_model
    slices(tokens)
    forms = slice_ops.ALL_FORMS if fewer_passes else frozenset()
    monkeypatch.setattr(slice_ops, "ONE_PASS_FORMS", forms)
    counts = counting_one_pass_forms(monkeypatch)
    assert blocks_against_comfyuis(dm, batch, family) <= 1e-5
    slice_count = sum(-(-n // tokens) for n in (5, 13, 18))  # txt and img of the double block, the single block's
    gates = slice_count if family == "FLUX.2" and fewer_passes else 0  # an MLP per stream slice and single slice
    # The QK-norm goes into RoPE's pass where Triton runs on the tensors' device (a CPU: under the interpreter only;
    # on a CUDA machine these CPU tensors take ComfyUI's norm).
    norms_in_rope = slice_count if triton_runs_on(dm.img_in.weight.device) else 0
    if batch == 1 and fewer_passes:  # norm1 and norm2 of each double-block stream slice, pre_norm twice a single one
        assert counts == {"modulated_norm": 2 * slice_count, "qkv_into_buffer": slice_count,
                          "rope_into_buffer": slice_count, "qk_norm_in_rope": norms_in_rope,
                          "silu_gate": gates}  # fmt: skip
    elif fewer_passes:  # batch 2: one modulation row per sample (ComfyUI's order); the buffer's rows are not one
        assert counts["modulated_norm"] == 0 and counts["rope_into_buffer"] == slice_count  # matrix, except the
        assert counts["qkv_into_buffer"] <= (tokens >= 18)  # single block's when one slice holds all its rows
        assert counts["silu_gate"] == gates and counts["qk_norm_in_rope"] == norms_in_rope
    else:
        assert counts == {"modulated_norm": 0, "qkv_into_buffer": 0, "rope_into_buffer": 0, "qk_norm_in_rope": 0,
                          "silu_gate": 0}  # fmt: skip
