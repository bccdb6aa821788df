"""One sampling run = one state: the same seed gives the same image, whatever ran before.

References: the image of the first run of a seed (bit for bit), ComfyUI's own unpatched
output under ScaleROPE, and positions worked out by hand.
"""

from __future__ import annotations

import pytest
import torch

from patching import IDENTITY, guidance_of, patched

pytestmark = pytest.mark.usefixtures("comfyui")

MODES = {
    "local guidance, noised": dict(window=4),
    "global guidance": dict(window=4, guidance_scope="global"),
    "clean guidance": dict(window=4, guidance_tokens="clean"),
    "npa": dict(mode="npa", npa_patch=4, npa_window=8),
    "hilbert": dict(window=4, token_order="hilbert"),
}


@pytest.fixture(scope="module")
def flux(comfyui):
    from comfy_flux import tiny_flux

    return tiny_flux(seed=0)


def guided(model, **options):
    """``model`` patched with ``options`` and a 6x5 guidance latent for a 24x20 latent."""
    return patched(model, guidance=guidance_of(6, 5, (24, 20)), **options)


@pytest.mark.parametrize("mode", list(MODES))
def test_same_seed_same_image_on_requeue_and_after_other_runs(flux, mode):
    from comfy_flux import conditioning, ksampler

    latent = torch.zeros(1, 16, 24, 20)
    positive, negative = conditioning(6, seed=1), conditioning(6, seed=2)
    model = guided(flux, **MODES[mode])
    first = ksampler(model, latent, positive, negative, steps=3, seed=11)
    again = ksampler(model, latent, positive, negative, steps=3, seed=11)  # re-queue
    ksampler(guided(flux, **MODES[mode]), latent, positive, negative, steps=2, seed=12)  # another run between
    after = ksampler(model, latent, positive, negative, steps=3, seed=11)
    assert torch.equal(first, again) and torch.equal(first, after)


def test_a_run_builds_once_lives_in_the_samplers_options_and_is_dropped(flux):
    from ultragen.patch.flux_patch import RUN_KEY
    from ultragen.patch.run_state import PatchRun

    from comfy_flux import conditioning, ksampler

    run, built = PatchRun(3, None), []

    def build():
        built.append(1)
        return torch.zeros(1)

    assert run.reuse("plan", build) is run.reuse("plan", build) and len(built) == 1
    run.close()
    run.reuse("plan", build)
    assert len(built) == 2  # closed: nothing kept

    import comfy.patcher_extension as pe

    seen = []

    def record(executor, *args, **kwargs):
        seen.append(kwargs.get("transformer_options", args[7] if len(args) > 7 else {}).get(RUN_KEY))
        return executor(*args, **kwargs)

    model = guided(flux)
    model.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "test", record)
    for _ in range(2):
        ksampler(model, torch.zeros(1, 16, 24, 20), conditioning(6, 1), conditioning(6, 2), steps=2)
    first, second = seen[: len(seen) // 2], seen[len(seen) // 2 :]
    assert all(isinstance(r, PatchRun) for r in seen)
    assert all(r is first[0] for r in first) and all(r is second[0] for r in second)  # one run per sampling
    assert first[0] is not second[0] and first[0].seed == second[0].seed == 1  # a new one each time, same seed
    assert RUN_KEY not in model.model_options["transformer_options"]  # none stays on the clone


def test_layout_tables_and_schedules_are_released_when_the_run_ends(flux):
    """Attention's cached token tables, orders and tile schedules live on the model's device: a sampling run
    leaves none behind (they would sit out of reach of ComfyUI's unloading); a call outside a sampler keeps them."""
    from ultragen.core import cached

    from comfy_flux import conditioning, denoise, ksampler

    cached.release()
    seen = []

    def record(executor, *args, **kwargs):
        out = executor(*args, **kwargs)
        seen.append(cached.cached_entries())
        return out

    import comfy.patcher_extension as pe

    model = guided(flux, mode="npa", npa_patch=4, npa_window=8)
    model.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "test", record)
    ksampler(model, torch.zeros(1, 16, 24, 20), conditioning(6, 1), conditioning(6, 2), steps=3)
    assert min(seen) > 0  # built and reused during the run
    assert cached.cached_entries() == 0  # released at its end
    x = torch.zeros(1, 16, 24, 20)
    denoise(guided(flux), x, 0.5, conditioning(6, 1)[0][0], conditioning(6, 1)[0][1]["pooled_output"])
    assert cached.cached_entries() > 0  # no run to end: kept for the next call


def test_npa_offsets_follow_the_seed_and_step_only():
    from ultragen.patch import PatchOptions
    from ultragen.patch.planning import npa_offset

    o = PatchOptions(mode="npa", npa_patch=32)
    sigmas = [1.0, 0.9, 0.75, 0.5, 0.25, 0.1]
    run = [npa_offset(o, 7, s) for s in sigmas]
    assert run == [npa_offset(o, 7, s) for s in reversed(sigmas)][::-1]  # the order of calls does not matter
    assert all(a in (0, 8, 16, 24) and b in (0, 8, 16, 24) for a, b in run)
    assert len(set(run)) > 1  # the grid moves between steps
    assert [npa_offset(o, 8, s) for s in sigmas] != run  # and with the seed
    assert npa_offset(PatchOptions(mode="npa", npa_jitter=False), 7, 0.5) == (0, 0)


def test_scale_rope_is_honoured(flux):
    """ComfyUI's ScaleROPE (rope_options) moves image positions; the patch's float32 ids follow the same rule,
    so the identity configuration still gives ComfyUI's own output."""
    from comfy_flux import conditioning, ksampler

    rope = dict(scale_x=1.5, shift_x=3.0, scale_y=0.5, shift_y=-2.0, scale_t=1.0, shift_t=1.0)
    if not hasattr(flux, "set_model_rope_options"):  # ComfyUI 0.3.64 has no ScaleROPE: check the ids by hand
        from ultragen.patch.planning import rope_positions

        ids = torch.tensor([[0.0, 2.0, 5.0], [0.0, 0.0, 1.0]])
        assert torch.equal(rope_positions(ids, rope), torch.tensor([[1.0, -1.0, 10.5], [1.0, -2.0, 4.5]]))
        return
    scaled = flux.clone()
    scaled.set_model_rope_options(**rope)
    latent = torch.zeros(1, 16, 12, 20)
    positive, negative = conditioning(6, seed=1), conditioning(6, seed=2)
    ref = ksampler(scaled, latent, positive, negative, steps=2)
    assert (ref - ksampler(flux, latent, positive, negative, steps=2)).abs().max() > 1e-4  # the positions matter
    out = ksampler(patched(scaled, **IDENTITY), latent, positive, negative, steps=2)
    assert (out - ref).abs().max().item() <= 1e-4


def test_flux1_and_flux2_are_patched_other_flux_class_models_refused(flux):
    """FLUX.1 and FLUX.2 are patched; the other models of ComfyUI's Flux class (where this ComfyUI has them) are
    refused, naming what they are."""

    from ultragen.patch.options import UltraGenPatchError

    from random_models import TINY_FLUX, flux_model, host_has_flux2, tiny_flux2

    guided(flux)  # FLUX.1
    if not host_has_flux2():
        return  # 0.3.64: no other model of the class exists here
    patched(tiny_flux2(depth=1, single=1))  # FLUX.2
    longcat = dict(TINY_FLUX, vec_in_dim=None, guidance_embed=False, txt_ids_dims=[1, 2], depth=1,
                   depth_single_blocks=1)  # fmt: skip
    with pytest.raises(UltraGenPatchError, match="works with FLUX.1 .* and FLUX.2 .* this MODEL is LongCat-Image"):
        patched(flux_model(longcat, config_class="LongCatImage"))


def test_a_comfyui_without_attention_overrides_is_refused(flux, monkeypatch):
    """ComfyUI 0.3.59 had no optimized_attention_override and made silently wrong images with the pack."""
    import comfy.ldm.modules.attention

    from ultragen.patch.host import UltraGenHostError

    monkeypatch.delattr(comfy.ldm.modules.attention, "wrap_attn")
    with pytest.raises(UltraGenHostError, match=r"lacks attention overrides .* Update ComfyUI to 0\.3\.64 or newer"):
        guided(flux)


def test_model_sampling_flux_after_the_patch_is_refused(flux):
    from comfy_extras.nodes_model_advanced import ModelSamplingFlux

    from ultragen.patch.options import UltraGenPatchError

    from comfy_flux import conditioning, ksampler

    def model_sampling_flux(model, width, height):
        node = ModelSamplingFlux()
        out = node.patch(model, 1.15, 0.5, width, height)
        return (out.result if hasattr(out, "result") else out)[0]

    latent = torch.zeros(1, 16, 24, 20)
    positive, negative = conditioning(6, seed=1), conditioning(6, seed=2)
    after = model_sampling_flux(guided(flux), 4096, 4096)
    with pytest.raises(UltraGenPatchError, match="ModelSamplingFlux.*constant_shift"):
        ksampler(after, latent, positive, negative, steps=2)
    # The same shift as the patch's (1024 px) is no conflict; before the patch, the patch's shift wins.
    ksampler(model_sampling_flux(guided(flux), 1024, 1024), latent, positive, negative, steps=2)
    before = guided(model_sampling_flux(flux, 4096, 4096))
    assert before.get_model_object("model_sampling").shift == pytest.approx(1.15)


def test_guidance_batch_is_one_shared_image_or_one_per_latent(flux):
    from ultragen.patch import Guidance, PatchOptions, UltraGenFluxPatch
    from ultragen.patch.options import UltraGenPatchError

    from comfy_flux import conditioning, denoise, ksampler

    g = torch.Generator().manual_seed(4)
    latents = torch.randn(2, 16, 6, 5, generator=g)
    options = PatchOptions(window=4, guidance_tokens="clean")

    def guided_by(latent):
        return UltraGenFluxPatch(options, guidance=Guidance(latent, 160, 192)).apply(flux)

    x = torch.randn(2, 16, 24, 20, generator=g)
    ctx, y = torch.randn(2, 6, 64, generator=g), torch.randn(2, 32, generator=g)
    both = denoise(guided_by(latents), x, 0.6, ctx, y)
    for i in range(2):  # item i is guided by guidance image i
        alone = denoise(guided_by(latents[i : i + 1]), x[i : i + 1], 0.6, ctx[i : i + 1], y[i : i + 1])
        assert (both[i : i + 1] - alone).abs().max().item() <= 1e-5
    three = guided_by(torch.randn(3, 16, 6, 5, generator=g))
    with pytest.raises(UltraGenPatchError, match="guidance holds 3 images but the sampler's latent batch has 2"):
        ksampler(three, torch.zeros(2, 16, 24, 20), conditioning(6, 1), conditioning(6, 2), steps=1)


def test_stretched_guidance_is_refused(flux):
    from ultragen.core.guidance import aspect_mismatch
    from ultragen.patch.options import UltraGenPatchError

    from comfy_flux import conditioning, ksampler

    assert not aspect_mismatch(125, 70, 500, 281)  # rounding to whole pixels
    assert not aspect_mismatch(6, 5, 24, 20)
    assert aspect_mismatch(64, 64, 512, 256)
    with pytest.raises(UltraGenPatchError, match="would be stretched"):  # 6x5 guidance, 24x40 latent
        ksampler(guided(flux), torch.zeros(1, 16, 24, 40), conditioning(6, 1), conditioning(6, 2), steps=1)
