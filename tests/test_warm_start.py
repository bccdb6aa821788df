"""Warm-Start Latent, Structure Guidance and constant-shift sigmas in the real ComfyUI."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.usefixtures("comfyui")


@pytest.fixture(scope="module")
def vae(comfyui):
    from comfy_flux import flux_vae

    return flux_vae(seed=0)


@pytest.fixture(scope="module")
def flux(comfyui):
    from comfy_flux import tiny_flux

    return tiny_flux(seed=2)


def _warm_start(latent, width, height, method="latent bicubic", vae=None, steps=8, skip=3, start_sigma=0.0,
                mu=1.15, sharpen=0.0):  # fmt: skip
    from ultragen.nodes.warm_start import UltraGenWarmStartLatent

    return UltraGenWarmStartLatent.execute(
        {"samples": latent}, width, height, method, sharpen, steps, skip, start_sigma, mu, "simple", vae=vae
    ).result


@pytest.mark.parametrize("mu", [1.15, 0.5, 3.0])
def test_sigmas_match_comfyuis_scheduler_with_the_same_shift(flux, mu):
    from comfy_extras.nodes_custom_sampler import BasicScheduler
    from comfy_extras.nodes_model_advanced import ModelSamplingFlux

    # ComfyUI's own node with max_shift = base_shift = mu gives shift mu at any size.
    shifted = ModelSamplingFlux().patch(flux, mu, mu, 4096, 4096)[0]
    reference = BasicScheduler().get_sigmas(shifted, "simple", 20, 1.0)[0]
    _, sigmas = _warm_start(torch.zeros(1, 16, 4, 4), 64, 64, steps=20, skip=7, mu=mu)
    assert torch.allclose(sigmas, reference[7:], atol=1e-6)
    _, started = _warm_start(torch.zeros(1, 16, 4, 4), 64, 64, steps=20, start_sigma=0.6, mu=mu)
    assert started[0].item() == pytest.approx(0.6)
    assert torch.allclose(started[1:], reference[reference < 0.6], atol=1e-6)


def test_the_sampler_noises_the_clean_latent_itself(flux):
    """Starting at sigma s, the sampler's first model input is s * eps + (1 - s) * x0."""
    import comfy.patcher_extension as pe
    from comfy_extras.nodes_custom_sampler import (
        CFGGuider,
        KSamplerSelect,
        Noise_RandomNoise,
        SamplerCustomAdvanced,
    )

    from comfy_flux import conditioning

    g = torch.Generator().manual_seed(3)
    low = torch.randn(1, 16, 6, 5, generator=g)
    latent, sigmas = _warm_start(low, 80, 96, start_sigma=0.6)
    assert latent["samples"].shape == (1, 16, 12, 10)
    seen = []

    def first_input(executor, x, *args, **kwargs):
        seen.append(x.clone())
        return executor(x, *args, **kwargs)

    model = flux.clone()
    model.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "probe", first_input)
    noise = Noise_RandomNoise(11)
    guider = CFGGuider().get_guider(model, conditioning(5, 1), conditioning(5, 2), 1.0)[0]
    SamplerCustomAdvanced().sample(noise, guider, KSamplerSelect().get_sampler("euler")[0], sigmas, latent)
    x0 = flux.model.latent_format.process_in(latent["samples"])  # the sampler works in the model's latent space
    eps = noise.generate_noise(latent)
    s = sigmas[0]  # 0.6 in float32, as the sampler holds it
    assert s.item() == pytest.approx(0.6)
    expected = s * eps + (1.0 - s) * x0
    assert torch.equal(seen[0].cpu(), expected)  # bit for bit: the latent carried no noise of its own


@pytest.mark.parametrize("method", ["latent bicubic", "RGB upsample", "LFM mix"])
def test_upsample_methods(vae, method):
    from ultragen.core.frequency import high_pass, low_pass
    from ultragen.patch.warm_start import upsample_latent

    g = torch.Generator().manual_seed(4)
    low = torch.randn(1, 16, 4, 4, generator=g)
    up = upsample_latent(low, 64, 64, method, vae)
    assert up.shape == (1, 16, 8, 8) and torch.isfinite(up).all()
    if method == "LFM mix":
        lat = upsample_latent(low, 64, 64, "latent bicubic")
        rgb = upsample_latent(low, 64, 64, "RGB upsample", vae)
        assert torch.allclose(low_pass(up), low_pass(lat), atol=1e-4)
        assert torch.allclose(high_pass(up), high_pass(rgb), atol=1e-4)


def test_structure_guidance_gamma_zero_is_a_no_op_and_one_sets_the_low_band(flux):
    from ultragen.core.frequency import low_pass
    from ultragen.patch.structure_guidance import StructureGuidance

    import comfy_flux

    g = torch.Generator().manual_seed(5)
    reference = torch.randn(1, 16, 12, 10, generator=g)
    fmt = flux.model.latent_format
    x0 = torch.randn(2, 16, 12, 10, generator=g)
    full = StructureGuidance(reference, fmt, 1.0, "constant")
    out = full({"denoised": x0, "sigma": torch.tensor([0.7, 0.2])})
    assert torch.allclose(low_pass(out), low_pass(fmt.process_in(reference)).expand(2, -1, -1, -1), atol=1e-5)
    assert torch.allclose(out - low_pass(out), x0 - low_pass(x0), atol=1e-5)  # the high band is untouched
    half = StructureGuidance(reference, fmt, 1.0, "sigma")({"denoised": x0, "sigma": torch.tensor([0.5, 0.5])})
    assert torch.allclose(half, (x0 + out) / 2, atol=1e-5)  # gamma = sigma

    from ultragen.nodes.structure_guidance import UltraGenStructureGuidance as SG

    latent = torch.zeros(1, 16, 12, 10)
    pos, neg = comfy_flux.conditioning(5, 1), comfy_flux.conditioning(5, 2)
    plain = comfy_flux.sampler_custom_advanced(flux, latent, pos, neg, steps=2)
    off = SG.execute(flux, {"samples": reference}, 0.0, "sigma").result[0]
    assert torch.equal(comfy_flux.sampler_custom_advanced(off, latent, pos, neg, steps=2), plain)
    on = SG.execute(flux, {"samples": reference}, 1.0, "sigma").result[0]
    assert not torch.equal(comfy_flux.sampler_custom_advanced(on, latent, pos, neg, steps=2), plain)


def test_structure_guidance_reference_rules(flux):
    """A reference of the sampled shape but another size is resized (bicubic, ComfyUI's upscale); another shape,
    or a batch that does not divide the sampler's, is an error naming the node."""
    import comfy.utils

    from ultragen.patch.structure_guidance import StructureGuidance

    g = torch.Generator().manual_seed(6)
    fmt = flux.model.latent_format
    x0 = torch.randn(2, 16, 12, 10, generator=g)
    args = {"denoised": x0, "sigma": torch.tensor([0.7, 0.7])}
    small = torch.randn(1, 16, 6, 5, generator=g)
    resized = comfy.utils.common_upscale(fmt.process_in(small), 10, 12, "bicubic", "disabled")
    expected = StructureGuidance(fmt.process_out(resized), fmt, 1.0, "sigma")(args)
    assert torch.allclose(StructureGuidance(small, fmt, 1.0, "sigma")(args), expected, atol=1e-5)
    with pytest.raises(ValueError, match=r"Structure Guidance: the reference is 80x80 px but the sampler runs at "
                                         r"80x96 px, another shape"):  # fmt: skip
        StructureGuidance(torch.randn(1, 16, 10, 10), fmt, 1.0, "sigma")(args)
    with pytest.raises(ValueError, match="Structure Guidance: the reference holds 3 latents"):
        StructureGuidance(torch.randn(3, 16, 12, 10), fmt, 1.0, "sigma")(args)


def test_low_res_to_warm_start_to_patched_guided_sampling(flux, vae):
    """Low-res latent -> Warm-Start (LFM) -> UltraGen patch + Structure Guidance -> SamplerCustomAdvanced."""
    from comfy_extras.nodes_custom_sampler import CFGGuider, KSamplerSelect, RandomNoise, SamplerCustomAdvanced

    from ultragen.nodes.attention_patch import UltraGenAttentionPatch as Patch
    from ultragen.nodes.guidance_encode import UltraGenLowResGuidanceEncode as Encode
    from ultragen.nodes.structure_guidance import UltraGenStructureGuidance as SG

    from comfy_flux import conditioning

    g = torch.Generator().manual_seed(6)
    low = {"samples": torch.randn(1, 16, 4, 6, generator=g)}  # 48 x 32 px
    latent, sigmas = _warm_start(low["samples"], 96, 64, method="LFM mix", vae=vae, steps=6, skip=2, sharpen=0.3)
    guidance = Encode.execute(96, 64, latent=low).result[0]
    model = Patch.execute(flux, "none", 1.0, "ultragen", 4, 1, "window-first", "global", 1, "noised", 10.0, True,
                          1.15, "auto", guidance=guidance).result[0]  # fmt: skip
    model = SG.execute(model, latent, 1.0, "sigma").result[0]
    guider = CFGGuider().get_guider(model, conditioning(6, 1), conditioning(6, 2), 2.0)[0]
    sampler = KSamplerSelect().get_sampler("euler")[0]
    out = SamplerCustomAdvanced().sample(RandomNoise().get_noise(1)[0], guider, sampler, sigmas, latent)[0]
    assert out["samples"].shape == (1, 16, 8, 12) and torch.isfinite(out["samples"]).all()


def test_bad_inputs_are_explained(vae):
    from ultragen.patch.warm_start import WarmStartError

    low = torch.randn(1, 16, 8, 8)  # 64 px
    with pytest.raises(WarmStartError, match=r"target 48x64 px is smaller than the low-res latent \(64x64 px\)"):
        _warm_start(low, 48, 64)
    with pytest.raises(WarmStartError, match="'RGB upsample' method decodes and re-encodes: connect the VAE"):
        _warm_start(low, 128, 128, method="RGB upsample")
    with pytest.raises(WarmStartError, match="'LFM mix' method decodes and re-encodes: connect the VAE"):
        _warm_start(low, 128, 128, method="LFM mix")
    for method in ("latent bicubic", "RGB upsample"):  # an SD latent would fail later, in the sampler
        with pytest.raises(WarmStartError, match="latent has 4 channels, but FLUX.1's have 16"):
            _warm_start(torch.randn(1, 4, 8, 8), 128, 128, method=method, vae=vae)
    with pytest.raises(WarmStartError, match=r"skip \(8\) must be less than the total steps \(8\)"):
        _warm_start(low, 128, 128, steps=8, skip=8)
