"""Recursive Upscale in the real ComfyUI, on a tiny FLUX and a FLUX-architecture VAE."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.usefixtures("comfyui")

FAST = dict(scale=2.0, steps=4, skip=1, cfg=1.0, sampler_name="euler", scheduler="simple", method="latent bicubic",
            sharpen=0.0, shift_mu=1.15, guidance_scope="global")  # fmt: skip


@pytest.fixture(scope="module")
def parts(comfyui):
    from comfy_flux import conditioning, flux_vae, tiny_flux

    return tiny_flux(seed=7), conditioning(6, 1), conditioning(6, 2), flux_vae(seed=3)


def upscale(parts, seed, stages, **inputs):
    from ultragen.nodes.recursive_upscale import UltraGenRecursiveUpscale

    model, pos, neg, vae = parts
    return UltraGenRecursiveUpscale.execute(model, pos, neg, vae, seed, stages, **{**FAST, **inputs}).result


def test_two_stages_equal_two_chained_single_stage_nodes(parts):
    low = {"samples": torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(0))}  # 48 x 32 px
    image2, latent2 = upscale(parts, 5, 2, latent=low)
    _, mid = upscale(parts, 5, 1, latent=low)
    image_b, latent_b = upscale(parts, 6, 1, latent=mid)
    assert latent2["samples"].shape == (1, 16, 16, 24) and image2.shape == (1, 128, 192, 3)
    assert torch.equal(latent2["samples"], latent_b["samples"])
    assert torch.equal(image2, image_b)
    mid_image, mid_again = upscale(parts, 5, 1, latent=low)  # the first node's image output, passed on as well
    image_c, latent_c = upscale(parts, 6, 1, latent=mid_again, image=mid_image)
    assert torch.equal(latent_c["samples"], latent_b["samples"]) and torch.equal(image_c, image_b)
    assert torch.isfinite(latent2["samples"]).all()


def test_image_input_and_progress(parts, monkeypatch):
    import comfy.utils

    calls = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", lambda v, t, p, node_id=None: calls.append((v, t, p)))
    image, latent = upscale(parts, 1, 2, image=torch.rand(1, 32, 48, 3, generator=torch.Generator().manual_seed(1)))
    assert image.shape == (1, 128, 192, 3)
    first = next(i for i, (_, t, _) in enumerate(calls) if t == 6)  # after the input image's own encode bar
    assert {t for _, t, _ in calls[first:]} == {2 * 3}  # then one bar: 2 stages x 3 remaining steps
    assert [v for v, _, _ in calls][-1] == 6
    stage_previews = [p for _, _, p in calls if p is not None and p[1].size == (192, 128)]
    assert len(stage_previews) == 1  # the last stage's decoded image (the first is 96 x 64)


def test_an_image_off_the_latent_grid_alone_is_cropped_as_the_vae_encodes_it(parts):
    """36 x 52 px is not a multiple of the VAE's 8: the encode crops it to 32 x 48 (centred), and the stage takes
    that cropped image as the latent's pixels, not the uncropped one (which would not be the latent's decode)."""
    image, latent = upscale(parts, 1, 1, image=torch.rand(1, 36, 52, 3, generator=torch.Generator().manual_seed(2)))
    assert latent["samples"].shape[-2:] == (8, 12) and image.shape == (1, 64, 96, 3)


def test_errors_name_the_stage(parts, monkeypatch):
    import comfy.sample

    from ultragen.patch.recursive_upscale import RecursiveUpscaleError

    with pytest.raises(ValueError, match="connect a latent or an image"):
        upscale(parts, 0, 1)
    low = {"samples": torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(0))}  # 48 x 32 px
    with pytest.raises(RecursiveUpscaleError, match=r"the image \(48x48 px, batch 1\) is not the latent's decoded "
                       r"image \(48x32 px"):  # fmt: skip
        upscale(parts, 0, 1, latent=low, image=torch.rand(1, 48, 48, 3))
    four_channels = {"samples": torch.randn(1, 4, 4, 6)}  # e.g. an SD latent: said up front, as the input's fault
    with pytest.raises(RecursiveUpscaleError, match=r"the latent to upscale has shape \(1, 4, 4, 6\), but FLUX.1's"):
        upscale(parts, 0, 2, latent=four_channels)
    with pytest.raises(ValueError, match="scale per stage must be above 1"):
        upscale(parts, 0, 1, latent=four_channels, scale=1.0)
    calls, sample = [], comfy.sample.sample_custom

    def failing_second_stage(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory (simulated)")
        return sample(*args, **kwargs)

    monkeypatch.setattr(comfy.sample, "sample_custom", failing_second_stage)
    low = {"samples": torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(0))}
    with pytest.raises(RecursiveUpscaleError, match=r"stage 2 of 2 \(192x128 px\) failed: out of memory"):
        upscale(parts, 0, 2, latent=low)


def test_cancelling_stops_between_steps(parts, monkeypatch):
    import comfy.model_management as mm

    calls = {"n": 0}

    def interrupt_on_second_step():
        calls["n"] += 1
        if calls["n"] == 2:
            raise mm.InterruptProcessingException()

    monkeypatch.setattr(mm, "throw_exception_if_processing_interrupted", interrupt_on_second_step)
    low = {"samples": torch.randn(1, 16, 4, 6)}
    with pytest.raises(mm.InterruptProcessingException):
        upscale(parts, 0, 2, latent=low)
    assert calls["n"] == 2


def guidance_seen(parts, monkeypatch, **inputs) -> list:
    """The guidance each stage patched the model with."""
    import ultragen.patch.recursive_upscale as ru

    seen, patch = [], ru.UltraGenFluxPatch

    def recording(options, guidance):
        seen.append(guidance)
        return patch(options, guidance=guidance)

    monkeypatch.setattr(ru, "UltraGenFluxPatch", recording)
    upscale(parts, 3, **inputs)
    return seen


def test_guidance_is_the_previous_stage_at_a_quarter_of_the_new_size(parts, monkeypatch):
    """The default ratio 4, by hand with ComfyUI's own VAE: decode, antialiased bicubic resize, encode."""
    vae = parts[3]
    low = torch.randn(1, 16, 8, 12, generator=torch.Generator().manual_seed(4))  # 96 x 64 px -> a 192 x 128 stage
    (guidance,) = guidance_seen(parts, monkeypatch, stages=1, latent={"samples": low})
    pixels = vae.decode(low).movedim(-1, 1).float()  # (1, 3, 64, 96)
    small = torch.nn.functional.interpolate(pixels, size=(32, 48), mode="bicubic", antialias=True).clamp(0, 1)
    expected = vae.encode(small.movedim(1, -1))
    assert guidance.latent.shape == (1, 16, 4, 6) and (guidance.target_width, guidance.target_height) == (192, 128)
    torch.testing.assert_close(guidance.latent, expected.float(), rtol=1e-4, atol=1e-4)


def test_guidance_from_an_image_input_resizes_that_image(parts, monkeypatch):
    vae = parts[3]
    image = torch.rand(1, 64, 96, 3, generator=torch.Generator().manual_seed(5))
    (guidance,) = guidance_seen(parts, monkeypatch, stages=1, image=image)
    small = torch.nn.functional.interpolate(image.movedim(-1, 1), size=(32, 48), mode="bicubic", antialias=True)
    torch.testing.assert_close(guidance.latent, vae.encode(small.clamp(0, 1).movedim(1, -1)).float(), rtol=1e-4,
                               atol=1e-4)  # fmt: skip


def test_previous_stage_already_small_enough_guides_as_it_is(parts, monkeypatch):
    low = torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(6))
    first, second = guidance_seen(parts, monkeypatch, stages=2, latent={"samples": low}, guidance_ratio=2.0)
    assert torch.equal(first.latent, low)  # ratio 2 with scale 2: the previous stage itself, no VAE round trip
    assert second.latent.shape == (1, 16, 8, 12)
    (quarter,) = guidance_seen(parts, monkeypatch, stages=1, latent={"samples": low}, scale=4.0)
    assert torch.equal(quarter.latent, low)  # scale 4 at ratio 4: the same


def test_guidance_size_by_hand():
    from ultragen.patch.recursive_upscale import StageSettings

    assert StageSettings().guidance_size(8192, 8192, 8) == (2048, 2048)
    assert StageSettings().guidance_size(8192, 4608, 16) == (2048, 1152)
    assert StageSettings(guidance_ratio=3.0).guidance_size(3000, 2000, 8) == (1000, 664)  # 666.7 -> 83 cells
    assert StageSettings().guidance_size(16, 16, 8) == (8, 8)  # never below one cell


def test_guidance_ratio_below_one_is_refused(parts):
    low = {"samples": torch.randn(1, 16, 4, 6)}
    with pytest.raises(ValueError, match="guidance_ratio must be 1 or more"):
        upscale(parts, 0, 1, latent=low, guidance_ratio=0.5)
