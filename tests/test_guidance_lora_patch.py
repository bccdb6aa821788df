"""The guidance LoRA through the patch, in the real ComfyUI (tiny FLUX, CPU, float32).

References: the unpatched layer's own output plus the low-rank update written out by hand, the
patch without the LoRA, and ComfyUI's own weight patches (a style LoRA) applied beside it.
"""

from __future__ import annotations

import pytest
import torch

from patching import guidance_of, inputs, patched

pytestmark = pytest.mark.usefixtures("comfyui")


@pytest.fixture(scope="module")
def flux(comfyui):
    from comfy_flux import tiny_flux

    return tiny_flux(seed=0)


# -- the guidance LoRA ---------------------------------------------------------------------


def _lora_file(tmp_path, layers: dict, name="guide.safetensors", seed=0, zero_up=False):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for path, (rows, inputs_) in layers.items():
        tensors[f"{path}.lora_A.weight"] = torch.randn(4, inputs_, generator=g) * 0.2
        up = torch.zeros(rows, 4) if zero_up else torch.randn(rows, 4, generator=g) * 0.2
        tensors[f"{path}.lora_B.weight"] = up
    file = tmp_path / name
    save_file(tensors, str(file))
    return file


ALL_GUIDANCE_LAYERS = {
    "img_in": (96, 64),
    "double_blocks.0.img_attn.qkv": (288, 96),
    "double_blocks.1.img_attn.proj": (96, 96),
    "double_blocks.0.img_mlp.0": (384, 96),
    "double_blocks.1.img_mlp.2": (96, 384),
    "single_blocks.0.linear1": (288, 96),  # q, k, v rows only
    "single_blocks.1.linear2": (96, 480),
}


def test_zero_lora_equals_no_lora(flux, tmp_path):
    from ultragen.patch import load_guidance_lora

    from comfy_flux import denoise

    x, ctx, y = inputs(h=16, w=20)
    g = guidance_of(4, 5, (16, 20))
    lora = load_guidance_lora(_lora_file(tmp_path, ALL_GUIDANCE_LAYERS, zero_up=True))
    without = denoise(patched(flux, guidance=g, window=4), x, 0.6, ctx, y)
    with_zero = denoise(patched(flux, guidance=g, lora=lora, window=4), x, 0.6, ctx, y)
    assert torch.equal(without, with_zero)


def test_lora_changes_only_guidance_rows(flux, tmp_path):
    from ultragen.core.guidance_lora import guidance_rows_forward
    from ultragen.patch import load_guidance_lora

    from comfy_flux import denoise

    # Layer level: the patched forward adds the update to the last n rows, and only to q, k, v columns.
    lora = load_guidance_lora(_lora_file(tmp_path, {"single_blocks.0.linear1": (288, 96)}))["single_blocks.0.linear1"]
    layer = flux.model.diffusion_model.single_blocks[0].linear1
    x = torch.randn(2, 10, 96, device=layer.weight.device)
    out = guidance_rows_forward(layer, lora, lambda: 3, 1.0)(x)
    base = layer(x)
    assert torch.equal(out[:, :7], base[:, :7]) and torch.equal(out[:, 7:, 288:], base[:, 7:, 288:])
    expected = base[:, 7:, :288] + (x[:, 7:] @ lora.down.t() @ lora.up.t()) * lora.scale
    assert torch.allclose(out[:, 7:, :288], expected, atol=1e-5)

    # Model level: guidance rows leave the sequence after the last block, so a LoRA on the last
    # layer's guidance rows cannot change the image; one on an earlier layer does (through attention).
    x, ctx, y = inputs(h=16, w=20)
    g = guidance_of(4, 5, (16, 20))
    plain = denoise(patched(flux, guidance=g, window=4), x, 0.6, ctx, y)
    last = load_guidance_lora(_lora_file(tmp_path, {"single_blocks.1.linear2": (96, 480)}, name="last.safetensors"))
    assert torch.equal(denoise(patched(flux, guidance=g, lora=last, window=4), x, 0.6, ctx, y), plain)
    for path in ("img_in", "double_blocks.0.img_attn.qkv"):
        early = load_guidance_lora(_lora_file(tmp_path, {path: ALL_GUIDANCE_LAYERS[path]}, name=f"{path}.safetensors"))
        changed = denoise(patched(flux, guidance=g, lora=early, strength=2.0, window=4), x, 0.6, ctx, y)
        assert (changed - plain).abs().max().item() > 1e-5, path


def test_user_weight_patches_keep_working_with_the_guidance_lora(flux, tmp_path):
    from ultragen.patch import load_guidance_lora

    from comfy_flux import denoise

    x, ctx, y = inputs(h=16, w=20)
    g = guidance_of(4, 5, (16, 20))
    lora = load_guidance_lora(_lora_file(tmp_path, {"double_blocks.0.img_attn.qkv": (288, 96)}))
    style = {"diffusion_model.double_blocks.0.img_attn.qkv.weight": (torch.randn(288, 96) * 0.05,)}  # a "diff" patch

    def with_style(m):
        m = m.clone()
        m.add_patches(style, 1.0)
        return m

    a = denoise(patched(flux, guidance=g, lora=lora, window=4), x, 0.6, ctx, y)
    b = denoise(with_style(patched(flux, guidance=g, lora=lora, window=4)), x, 0.6, ctx, y)
    c = denoise(with_style(patched(flux, guidance=g, window=4)), x, 0.6, ctx, y)
    assert (a - b).abs().max().item() > 1e-5  # the style weight patch still applies
    assert (b - c).abs().max().item() > 1e-5  # and so does the guidance LoRA on the same layer


def test_source_patcher_is_unchanged_and_object_patches_are_undone(flux, tmp_path):
    from ultragen.patch import load_guidance_lora

    from comfy_flux import denoise

    x, ctx, y = inputs(h=16, w=20)
    before = denoise(flux, x, 0.6, ctx, y)
    state = (dict(flux.object_patches), repr(flux.model_options), {k: dict(v) for k, v in flux.wrappers.items()})
    dm = flux.model.diffusion_model
    embedder, sampling = dm.pe_embedder, flux.model.model_sampling
    lora = load_guidance_lora(_lora_file(tmp_path, ALL_GUIDANCE_LAYERS))
    model = patched(flux, guidance=guidance_of(4, 5, (16, 20)), lora=lora, window=4)
    assert set(model.object_patches) >= {"diffusion_model.pe_embedder", "model_sampling"}
    assert state == (
        dict(flux.object_patches),
        repr(flux.model_options),
        {k: dict(v) for k, v in flux.wrappers.items()},
    )
    denoise(model, x, 0.6, ctx, y)
    after = denoise(flux, x, 0.6, ctx, y)  # loading the source again undoes the clone's object patches
    assert torch.equal(before, after)
    assert dm.pe_embedder is embedder and flux.model.model_sampling is sampling


def test_lora_files_that_do_not_fit_are_explained(flux, tmp_path):
    from ultragen.patch import GuidanceLoRAError, load_guidance_lora

    misfit = load_guidance_lora(_lora_file(tmp_path, {"double_blocks.0.img_attn.qkv": (288, 95)}, name="m.safetensors"))
    with pytest.raises(GuidanceLoRAError, match="takes 96 inputs .* but the LoRA maps 95 inputs"):
        patched(flux, lora=misfit)

    pt = tmp_path / "guide.pt"
    torch.save({}, pt)
    with pytest.raises(GuidanceLoRAError, match="must be a .safetensors file"):
        load_guidance_lora(pt)

    text_layer = _lora_file(tmp_path, {"double_blocks.0.txt_attn.qkv": (288, 96)}, name="t.safetensors")
    with pytest.raises(GuidanceLoRAError, match="not a guidance-stream layer"):
        load_guidance_lora(text_layer)
