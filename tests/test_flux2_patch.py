"""The patch on FLUX.2 (tiny models built by ComfyUI's own ``supported_models.Flux2``, CPU, float32).

References: ComfyUI's own unpatched FLUX.2 output (windows that cover the image = dense attention),
ComfyUI's own FLUX.2 block code with the patch's attention (blocks forced whole by an ``attn1_patch``
that changes nothing: where guidance tokens have no unpatched equivalent), and position ids worked
out by hand on FLUX.2's four axes. ComfyUI 0.3.64 has no FLUX.2: there each test checks that it
really has none (nothing to patch) and stops.
"""

from __future__ import annotations

import pytest
import torch

from patching import IDENTITY, device, patched, whole_blocks

pytestmark = pytest.mark.usefixtures("comfyui")


@pytest.fixture(scope="module")
def flux2(comfyui):
    """A tiny FLUX.2 (hidden 96, 2 heads, axes 4 x 12), or None where this ComfyUI has no FLUX.2."""
    from random_models import host_has_flux2, tiny_flux2

    return tiny_flux2() if host_has_flux2() else None


def flux2_inputs(batch=1, h=13, w=22, text=7, seed=0):
    """A FLUX.2 latent (128 channels, 1 token per cell) and text; FLUX.2 has no pooled vector."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 128, h, w, generator=g)
    ctx = torch.randn(batch, text, 64, generator=g)
    return x.to(device()), ctx.to(device()), None


def guidance2(h, w, target_hw, seed=3):
    from ultragen.patch import Guidance

    g = torch.Generator().manual_seed(seed)
    return Guidance(torch.randn(1, 128, h, w, generator=g), target_hw[1] * 16, target_hw[0] * 16)


def test_dense_windows_equal_unpatched_flux2(flux2):
    """Windows whose neighbourhood covers the image: the patched FLUX.2 is ComfyUI's own (non-square, batch 2,
    both token orders), with its four position axes, text positions on axis 3 and no pooled vector."""
    from comfy_flux import denoise

    if flux2 is None:
        return
    x, ctx, y = flux2_inputs(batch=2)
    ref = denoise(flux2, x, 0.6, ctx, y)
    for order in ("window-first", "hilbert"):
        out = denoise(patched(flux2, token_order=order, **IDENTITY), x, 0.6, ctx, y)
        assert (out - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())


def test_dense_windows_equal_unpatched_flux2_with_reference_images(flux2):
    """FLUX.2's reference images (ComfyUI's "index" method: each reference at its own index on axis 0)."""
    from comfy_flux import denoise

    if flux2 is None:
        return
    x, ctx, y = flux2_inputs(batch=2, h=12, w=16)
    g = torch.Generator().manual_seed(4)
    refs = [torch.randn(2, 128, 6, 9, generator=g).to(device()), torch.randn(2, 128, 5, 5, generator=g).to(device())]
    ref = denoise(flux2, x, 0.5, ctx, y, ref_latents=refs)
    out = denoise(patched(flux2, **IDENTITY), x, 0.5, ctx, y, ref_latents=refs)
    assert (out - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())


def test_windows_change_flux2(flux2):
    """Small windows without a full neighbourhood really restrict attention (the identity test is not vacuous)."""
    from comfy_flux import denoise

    if flux2 is None:
        return
    x, ctx, y = flux2_inputs(h=16, w=16)
    ref = denoise(flux2, x, 0.6, ctx, y)
    out = denoise(patched(flux2, window=2, neighbour_radius=0, ntk_factor=1.0, constant_shift=False), x, 0.6, ctx, y)
    assert (out - ref).abs().max().item() > 1e-3


def test_flux2_guidance_ids_by_hand(flux2):
    """Guidance positions on FLUX.2's four axes: index 0, centre-aligned rows and columns on the high-res token grid,
    axis 3 (text positions) 0 — a 2x3 guidance over a 8x12 token image (ratio 4): (g + 1/2) * 4 - 1/2."""
    from ultragen.patch import PatchOptions
    from ultragen.patch.planning import plan_size

    if flux2 is None:
        return
    dm = flux2.model.diffusion_model
    g = guidance2(2, 3, (8, 12))
    plan = plan_size(dm, PatchOptions(window=4), g, g.latent, (8, 12), torch.device("cpu"), 0, None)
    assert plan.image_ids.shape == (96, 4) and plan.guidance_ids.shape == (6, 4)
    assert plan.guidance_grid == (2, 3)
    expected = {(0.0, r, c, 0.0) for r in (1.5, 5.5) for c in (1.5, 5.5, 9.5)}
    assert {tuple(row) for row in plan.guidance_ids.tolist()} == expected
    # image ids: every (row, col) of the grid once, index and axis 3 zero
    ids = plan.image_ids
    assert ids[:, 0].eq(0).all() and ids[:, 3].eq(0).all()
    assert sorted(map(tuple, ids[:, 1:3].long().tolist())) == [(r, c) for r in range(8) for c in range(12)]


def test_flux2_guidance_equals_comfyuis_own_blocks(flux2):
    """With 128-channel guidance at ratio 4 (tokens embedded by FLUX.2's img_in, positions on 4 axes): the chunked
    blocks equal ComfyUI's own FLUX.2 block code running the same attention, and the guidance changes the output."""
    from comfy_flux import denoise

    if flux2 is None:
        return
    x, ctx, y = flux2_inputs(h=16, w=20)
    g = guidance2(4, 5, (16, 20))
    options = dict(window=4, ntk_factor=10.0)
    out = denoise(patched(flux2, guidance=g, **options), x, 0.6, ctx, y)
    whole = whole_blocks(flux2)  # ComfyUI's blocks, the patch's attention
    ref = denoise(patched(whole, guidance=g, **options), x, 0.6, ctx, y)
    assert (out - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())
    unguided = denoise(patched(flux2, **options), x, 0.6, ctx, y)
    assert (out - unguided).abs().max().item() > 1e-3


def test_flux2_keeps_its_own_shift_unless_set(flux2):
    """FLUX.2's sampling shift is 2.02 (ComfyUI's, the same at every size); the node's default (FLUX.1's 1.15) keeps
    it, any other value is used as set."""
    from ultragen.patch.sampling import model_shift_mu

    if flux2 is None:
        return
    default = patched(flux2)
    assert float(default.get_model_object("model_sampling").shift) == pytest.approx(2.02)
    assert float(patched(flux2, shift_mu=3.0).get_model_object("model_sampling").shift) == pytest.approx(3.0)
    assert model_shift_mu(flux2.model.model_config, 1.15) == pytest.approx(2.02)


def test_flux1_guidance_on_flux2_is_refused(flux2):
    from ultragen.patch import Guidance
    from ultragen.patch.options import UltraGenPatchError

    if flux2 is None:
        return
    flux1_guidance = Guidance(torch.randn(1, 16, 8, 8), 256, 256)
    with pytest.raises(UltraGenPatchError, match="16 channels but this model takes 128"):
        patched(flux2, guidance=flux1_guidance)


def test_warm_start_on_a_flux2_latent(flux2):
    """Warm-Start Latent on FLUX.2's latent (128 channels, 16 px a cell): bicubic on the latent grid to the target's
    cells, and the sigmas of ComfyUI's own FLUX.2 sampling (its shift, 2.02) without the skipped steps."""
    import comfy.model_sampling
    import comfy.samplers
    import comfy.supported_models
    import comfy.utils

    from ultragen.nodes.warm_start import UltraGenWarmStartLatent

    if flux2 is None:
        return
    g = torch.Generator().manual_seed(2)
    low = torch.randn(1, 128, 16, 24, generator=g)  # 256 x 384 px
    out = UltraGenWarmStartLatent.execute({"samples": low}, 1024, 768, "latent bicubic", 0.0, 28, 10, 0.0, 1.15,
                                          "simple")  # fmt: skip
    latent, sigmas = out.args if hasattr(out, "args") else out
    assert latent["samples"].shape == (1, 128, 48, 64)
    expected_latent = comfy.utils.common_upscale(low, 64, 48, "bicubic", "disabled")
    assert torch.equal(latent["samples"], expected_latent)
    sampling = comfy.model_sampling.ModelSamplingFlux(flux2.model.model_config)  # ComfyUI's FLUX.2 sampling
    assert float(sampling.shift) == pytest.approx(2.02)
    expected = comfy.samplers.calculate_sigmas(sampling, "simple", 28)[10:]
    assert torch.allclose(sigmas.float(), expected.float(), atol=1e-6)


def test_recursive_upscale_runs_flux2(flux2):
    """One Recursive Upscale stage on FLUX.2 (its 128-channel latent at 16 px a cell, its VAE decoded exactly):
    twice the pixels, a latent of FLUX.2's shape, the same result for the same seed."""
    from ultragen.nodes.recursive_upscale import UltraGenRecursiveUpscale

    from random_models import flux_vae

    if flux2 is None:
        return
    g = torch.Generator().manual_seed(0)
    cond = [[torch.randn(1, 6, 64, generator=g), {}]]
    vae = flux_vae(seed=3, flux2=True)
    low = {"samples": torch.randn(1, 128, 3, 4, generator=g)}  # 64 x 48 px
    settings = dict(scale=2.0, steps=3, skip=1, cfg=1.0, sampler_name="euler", scheduler="simple",
                    method="latent bicubic", sharpen=0.0, shift_mu=1.15, guidance_scope="global")  # fmt: skip

    def run():
        return UltraGenRecursiveUpscale.execute(flux2, cond, cond, vae, 5, 1, latent=low, **settings).result

    image, latent = run()
    assert latent["samples"].shape == (1, 128, 6, 8) and image.shape == (1, 96, 128, 3)
    assert torch.isfinite(latent["samples"]).all()
    again, _ = run()
    assert torch.equal(image, again)


def test_the_authors_flux2_lora_applies_to_guidance_rows(flux2):
    """A guidance LoRA in the authors' diffusers format on a FLUX.2: it fits the model's layers, changes the guided
    output, and the chunked blocks apply it as ComfyUI's own block code does with the LoRA's layer forwards."""
    from ultragen.core.guidance_lora import parse_guidance_lora

    from comfy_flux import denoise

    if flux2 is None:
        return
    g = torch.Generator().manual_seed(8)
    hidden = 96
    tensors = {}
    for module, (inp, out) in {"transformer_blocks.0.attn.to_q": (hidden, hidden),
                               "transformer_blocks.0.attn.to_v": (hidden, hidden),
                               "transformer_blocks.1.ff.linear_in": (hidden, 2 * 3 * hidden),
                               "single_transformer_blocks.1.attn.to_qkv_mlp_proj": (hidden, 3 * hidden + 6 * hidden),
                               "single_transformer_blocks.0.attn.to_out": (hidden + 3 * hidden, hidden),
                               "x_embedder": (128, hidden)}.items():  # fmt: skip
        tensors[f"transformer.{module}.lora_A.weight"] = torch.randn(4, inp, generator=g) * 0.1
        tensors[f"transformer.{module}.lora_B.weight"] = torch.randn(out, 4, generator=g) * 0.1
    lora = parse_guidance_lora(tensors, "authors.safetensors")
    x, ctx, y = flux2_inputs(h=16, w=20)
    guidance = guidance2(4, 5, (16, 20))
    options = dict(window=4, ntk_factor=10.0)
    out = denoise(patched(flux2, guidance=guidance, lora=lora, **options), x, 0.6, ctx, y)
    whole = whole_blocks(flux2)
    ref = denoise(patched(whole, guidance=guidance, lora=lora, **options), x, 0.6, ctx, y)
    assert (out - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())
    without = denoise(patched(flux2, guidance=guidance, **options), x, 0.6, ctx, y)
    assert (out - without).abs().max().item() > 1e-4


def test_dense_windows_equal_unpatched_flux2_with_flux_kv_cache(flux2):
    """ComfyUI's Flux KV Cache (references' k/v cached on the first step, their queries dropped after; references at
    timestep 0), in a real 3-step sampling run: the patch applied before or after it gives ComfyUI's own result;
    with guidance (whose tokens the dropped references would move) it is refused, naming the node."""
    import comfy.sample

    from ultragen.patch.options import UltraGenPatchError

    if flux2 is None:
        return
    from comfy_extras.nodes_flux import FluxKVCache  # ComfyUI 0.29 and newer, as FLUX.2

    g = torch.Generator().manual_seed(6)
    latent, noise = torch.zeros(1, 128, 12, 16), torch.randn(1, 128, 12, 16, generator=g)
    ctx, refs = torch.randn(1, 7, 64, generator=g), [torch.randn(1, 128, 6, 8, generator=g)]
    positive, negative = [[ctx, {"reference_latents": refs}]], [[ctx * 0, {"reference_latents": refs}]]

    def kv(model):
        return FluxKVCache.execute(model).result[0]

    def sample(model):
        return comfy.sample.sample(model, noise, 3, 1.0, "euler", "simple", positive, negative, latent, seed=0,
                                   disable_pbar=True)  # fmt: skip

    ref = sample(kv(flux2))
    for ours in (kv(patched(flux2, **IDENTITY)), patched(kv(flux2), **IDENTITY)):
        assert (sample(ours) - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())
    with pytest.raises(UltraGenPatchError, match="Flux KV Cache drops the reference images"):
        sample(kv(patched(flux2, guidance=guidance2(3, 4, (12, 16)), window=4)))


def test_a_flux1_guidance_lora_on_flux2_is_refused(flux2):
    """A LoRA trained on FLUX.1 (img_in takes 2x2 patches of 16 channels: 64 inputs) does not fit FLUX.2's layers."""
    from ultragen.core.guidance_lora import GuidanceLoRAError, parse_guidance_lora

    if flux2 is None:
        return
    g = torch.Generator().manual_seed(9)
    lora = parse_guidance_lora({"img_in.lora_A.weight": torch.randn(4, 64, generator=g),
                                "img_in.lora_B.weight": torch.randn(96, 4, generator=g)})  # fmt: skip
    with pytest.raises(GuidanceLoRAError, match=r"layer .img_in. takes 128 inputs .* \(is it for another model\?\)"):
        patched(flux2, guidance=guidance2(2, 2, (8, 8)), lora=lora)


def test_guidance_encode_reads_pixels_per_latent_from_the_vae_and_the_patch_checks_the_models(flux2):
    """Low-Res Guidance Encode on an image with FLUX.2's VAE: a 128-channel latent at 16 px a cell (the VAE's ratio,
    not a constant); a guidance claiming another ratio than the model's latent format is refused."""
    from ultragen.nodes.guidance_encode import UltraGenLowResGuidanceEncode
    from ultragen.patch import Guidance
    from ultragen.patch.options import UltraGenPatchError

    from random_models import flux_vae

    if flux2 is None:
        return
    image = torch.rand(1, 64, 96, 3, generator=torch.Generator().manual_seed(2))
    guidance = UltraGenLowResGuidanceEncode.execute(384, 256, image=image, vae=flux_vae(seed=4, flux2=True)).result[0]
    assert guidance.latent.shape == (1, 128, 4, 6) and guidance.pixels_per_latent == 16 and guidance.ratio() == 4.0
    patched(flux2, guidance=guidance)  # fits
    odd = Guidance(guidance.latent, 384, 256, latent_pixels=8)
    with pytest.raises(UltraGenPatchError, match="encoded at 8 px a latent cell, this model works at 16"):
        patched(flux2, guidance=odd)
