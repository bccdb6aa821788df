"""The FLUX patch in the real ComfyUI, on tiny FLUX-architecture models (CPU, float32).

References: ComfyUI's own unpatched output (identity cases), positions worked out by
hand (guidance ids), and ComfyUI's samplers run end to end.
"""

from __future__ import annotations

import logging

import pytest
import torch

from patching import IDENTITY, device, guidance_of, inputs, one_run, patched, references_and_control

pytestmark = pytest.mark.usefixtures("comfyui")


@pytest.fixture(scope="module")
def flux(comfyui):
    from comfy_flux import tiny_flux

    return tiny_flux(seed=0)


# -- the patched model is the unpatched one when the window covers the image --------------


@pytest.mark.parametrize("order", ["window-first", "hilbert"])
def test_dense_windows_without_guidance_equal_unpatched(flux, order):
    from comfy_flux import denoise

    x, ctx, y = inputs()  # 21 x 37 latent: odd sizes, padded to whole patches
    ref = denoise(flux, x, 0.6, ctx, y)
    out = denoise(patched(flux, token_order=order, **IDENTITY), x, 0.6, ctx, y)
    assert (out - ref).abs().max().item() <= 1e-5


def test_identity_holds_with_batch_kontext_references_and_controlnet(flux):
    from comfy_flux import denoise

    x, ctx, y = inputs(batch=2, h=16, w=24)
    refs, control = references_and_control(2, 8 * 12)
    ref = denoise(flux, x, 0.5, ctx, y, ref_latents=refs, control=control)
    for order in ("window-first", "hilbert"):
        out = denoise(patched(flux, token_order=order, **IDENTITY), x, 0.5, ctx, y, ref_latents=refs, control=control)
        assert (out - ref).abs().max().item() <= 1e-5


def test_attention_mask_falls_back_to_dense_with_one_warning(flux, caplog):
    from comfy_flux import denoise

    x, ctx, y = inputs(h=8, w=12)
    length = ctx.shape[1] + 4 * 6
    mask = torch.zeros(1, length, length, device=device())
    mask[..., -3:] = -float("inf")  # a real mask: the last image tokens are hidden
    ref = denoise(flux, x, 0.5, ctx, y, attention_mask=mask)
    model = patched(flux, window=2, ntk_factor=1.0, constant_shift=False)  # windows of 2 would differ a lot
    caplog.set_level(logging.WARNING)
    run = one_run()  # two steps of one sampling run: one warning
    out = denoise(model, x, 0.5, ctx, y, attention_mask=mask, options=run)
    denoise(model, x, 0.4, ctx, y, attention_mask=mask, options=run)
    assert (out - ref).abs().max().item() <= 1e-6
    warnings = [r for r in caplog.records if "attention mask" in r.getMessage()]
    assert len(warnings) == 1


def test_single_block_activation_is_computed_in_place_with_the_same_bits(flux):
    from ultragen.patch.inplace_gelu import InPlaceGELU

    model = patched(flux, window=4)
    acts = [model.object_patches[f"diffusion_model.single_blocks.{i}.mlp_act"] for i in range(2)]
    assert all(isinstance(a, InPlaceGELU) for a in acts)
    gelu = torch.nn.GELU(approximate="tanh")  # FLUX's activation
    x = torch.randn(3, 10, 40)
    mlp = x[:, :, 8:]  # a column view, as FLUX's split of linear1's output
    expected = gelu(mlp)
    with torch.inference_mode():
        mlp_inf = mlp.clone()
        out = acts[0](mlp_inf)
    assert out.data_ptr() == mlp_inf.data_ptr() and torch.equal(out, expected)
    with torch.no_grad():
        view = x.clone()[:, :, 8:]
        assert acts[0](view).data_ptr() == view.data_ptr() and torch.equal(view, expected)
    leaf = mlp.clone().requires_grad_()  # training: the input stays, gradients flow
    out = acts[0](leaf)
    out.sum().backward()
    ref = mlp.clone().requires_grad_()
    gelu(ref).sum().backward()
    assert torch.equal(leaf.detach(), mlp) and torch.equal(out, expected) and torch.equal(leaf.grad, ref.grad)


# -- guidance ----------------------------------------------------------------------------


def _record_post_input(model):
    seen = {}

    def recorder(args):
        seen.update(args)
        return args

    m = model.clone()
    m.set_model_post_input_patch(recorder)  # runs after UltraGen's
    return m, seen


def test_guidance_ids_are_the_scaled_grid_in_float32(flux):
    from comfy_flux import denoise

    x, ctx, y = inputs(h=22, w=38)  # 11 x 19 tokens
    model, seen = _record_post_input(patched(flux, guidance=guidance_of(6, 10, (22, 38)), window=4))
    out = denoise(model, x, 0.7, ctx, y)
    assert out.shape == x.shape and torch.isfinite(out).all()
    ids = seen["img_ids"][0]
    assert ids.dtype == torch.float32
    n_img, n_guid = 11 * 19, 3 * 5
    assert ids.shape[0] == n_img + n_guid
    got = sorted((round(r, 5), round(c, 5)) for _, r, c in ids[n_img:].tolist())
    # By hand: guidance token g covers image tokens [g * 11/3, (g + 1) * 11/3); its centre, minus half a token.
    expected = sorted(
        (round((gy + 0.5) * 11 / 3 - 0.5, 5), round((gx + 0.5) * 19 / 5 - 0.5, 5)) for gy in range(3) for gx in range(5)
    )
    assert got == expected
    image = sorted((int(r), int(c)) for _, r, c in ids[:n_img].tolist())
    assert image == [(r, c) for r in range(11) for c in range(19)]


def test_image_ids_stay_exact_past_256_tokens_in_bf16(comfyui):
    from comfy_flux import CONTEXT_DIM, VEC_DIM, denoise, tiny_flux

    model = tiny_flux(seed=1, depth=1, single=1, dtype=torch.bfloat16)
    m, seen = _record_post_input(patched(model, window=16, ntk_factor=1.0, constant_shift=False))
    x, ctx, y = (torch.randn(*shape, dtype=torch.bfloat16).to(device()) for shape in (
        (1, 16, 4, 600), (1, 5, CONTEXT_DIM), (1, VEC_DIM)
    ))  # fmt: skip
    denoise(m, x, 0.5, ctx, y)
    cols = seen["img_ids"][0, :, 2]
    assert cols.dtype == torch.float32
    assert sorted(set(cols.tolist())) == [float(c) for c in range(300)]  # bf16 would merge 257 into 256


def test_guidance_noised_and_clean_differ_and_keep_shape(flux):
    from comfy_flux import denoise

    x, ctx, y = inputs(h=16, w=20)
    g = guidance_of(4, 5, (16, 20))
    noised = denoise(patched(flux, guidance=g, window=4), x, 0.8, ctx, y)
    clean = denoise(patched(flux, guidance=g, window=4, guidance_tokens="clean"), x, 0.8, ctx, y)
    assert noised.shape == clean.shape == x.shape
    assert (noised - clean).abs().max().item() > 1e-4


# -- full sampling runs --------------------------------------------------------------------


@pytest.mark.parametrize("run", ["ksampler", "sampler_custom_advanced"])
def test_sampling_with_cfg_uneven_text_batch_and_odd_size(flux, run):
    import comfy_flux

    sample = getattr(comfy_flux, run)
    latent = torch.zeros(2, 16, 25, 17)  # 200 x 136 px: odd latent, not a multiple of the window
    positive, negative = comfy_flux.conditioning(8, seed=1), comfy_flux.conditioning(4, seed=2)  # padded to 8
    guided = patched(flux, guidance=guidance_of(7, 5, (25, 17)), window=4)
    out = sample(guided, latent, positive, negative, cfg=3.0)
    assert out.shape == latent.shape and torch.isfinite(out).all()
    # The identity configuration samples exactly like the unpatched model.
    ref = sample(flux, latent, positive, negative, cfg=3.0)
    same = sample(patched(flux, **IDENTITY), latent, positive, negative, cfg=3.0)
    assert (same - ref).abs().max().item() <= 1e-4


def test_npa_mode_and_kontext_references_sample(flux):
    import comfy_flux

    latent = torch.zeros(1, 16, 24, 20)
    positive, negative = comfy_flux.conditioning(6, seed=1), comfy_flux.conditioning(6, seed=2)
    npa = patched(flux, mode="npa", npa_patch=4, npa_window=8)
    assert torch.isfinite(comfy_flux.ksampler(npa, latent, positive, negative)).all()
    guided = patched(flux, guidance=guidance_of(6, 5, (24, 20)), window=4)
    without = comfy_flux.ksampler(guided, latent, positive, negative)
    g = torch.Generator().manual_seed(9)
    positive[0][1]["reference_latents"] = [torch.randn(1, 16, 8, 8, generator=g)]  # Kontext
    with_refs = comfy_flux.ksampler(guided, latent, positive, negative)
    assert torch.isfinite(with_refs).all()
    assert (with_refs - without).abs().max().item() > 1e-4  # the reference tokens took part


def test_memory_estimate_is_windowed_during_prepare_sampling(flux):
    import comfy.patcher_extension as pe

    model = patched(flux, guidance=guidance_of(64, 64, (512, 512)))
    shape = [2, 16, 512, 512]  # a 4096 px batch of 2
    seen = {}

    def prepare(model_patcher, noise_shape, conds, model_options=None):
        seen["estimate"] = model_patcher.model.memory_required(shape)
        return "prepared"

    wrappers = model.get_all_wrappers(pe.WrappersMP.PREPARE_SAMPLING)
    original = flux.model.memory_required(shape)
    assert pe.WrapperExecutor.new_executor(prepare, wrappers).execute(model, shape, {}, model_options={}) == "prepared"
    # By hand: U = 2 x (256 x 256 image + 512 text + 32 x 32 guidance) tokens x 96 units x 4 bytes (float32);
    # 7 U, one slice (67,072 / 16 = 4,192 tokens, up to 4,352 = 17 x 256) x 16 widths for the batch of 2,
    # and 512 MiB for cast weights.
    u = 2 * (65536 + 512 + 1024) * 96 * 4
    assert seen["estimate"] == 7 * u + 16 * 2 * 4352 * 96 * 4 + 512 * 2**20
    assert seen["estimate"] < original
    assert "memory_required" not in flux.model.__dict__  # restored after the call


def test_weights_allowed_is_comfyui_029_loader_rule_worked_by_hand():
    from ultragen.patch.sampling import weights_allowed

    gib = 2**30
    # A 32 GB card holding FLUX.1's 22 GiB of bf16 weights from a 4096^2 run, 9 GiB free, asked for an 8192^2
    # step that needs 13 GiB: 9 + 22 - 13 = 18 GiB of weights may stay (0.29's loader unloads the other 4).
    assert weights_allowed(9 * gib, 22 * gib, 13 * gib, 0.0, 1.2 * gib) == 18 * gib
    # A step needing more than the whole card keeps no weight on NVIDIA (ratio 0) ...
    assert weights_allowed(1 * gib, 3 * gib, 6 * gib, 0.0, 1 * gib) == 0
    # ... and elsewhere the host's share: min(4 x 0.4, 4 - 1) = 1.6 GiB; min(1.5 x 0.4, 1.5 - 1.2) = 0.3 GiB.
    assert weights_allowed(1 * gib, 3 * gib, 6 * gib, 0.4, 1 * gib) == pytest.approx(1.6 * gib)
    assert weights_allowed(0.5 * gib, 1 * gib, 6 * gib, 0.4, 1.2 * gib) == pytest.approx(0.3 * gib)


@pytest.fixture
def emulated_nvidia_card(monkeypatch):
    """ComfyUI's loader state on a normal-VRAM NVIDIA card, its free memory set by the test (``card["free"]``)."""
    import comfy.model_management as mm

    card = {"free": 0}
    monkeypatch.setattr(mm, "vram_state", mm.VRAMState.NORMAL_VRAM)
    monkeypatch.setattr(mm, "is_device_cpu", lambda device: False)
    monkeypatch.setattr(mm, "MIN_WEIGHT_MEMORY_RATIO", 0.0)  # NVIDIA's, on both snapshots
    monkeypatch.setattr(mm, "get_free_memory", lambda dev=None, torch_free_too=False: card["free"])
    return card


@pytest.mark.parametrize("keep", [0.5, 0.0, 1.0])
def test_weights_a_loaded_model_keeps_past_the_step_are_released(emulated_nvidia_card, keep):
    """ComfyUI 0.3.64's loader keeps every weight of a model already loaded; the wrapper then moves off what the
    step's estimate leaves no room for, as 0.29's loader would (a fresh model: this test changes its modules)."""
    import comfy.model_management as mm
    import comfy.patcher_extension as pe
    import comfy.sampler_helpers

    from comfy_flux import tiny_flux

    model = patched(tiny_flux(seed=0))
    size = model.model_size()
    leaves = [m for m in model.model.modules() if not list(m.children())]
    largest = max(mm.module_size(m) for m in leaves)
    fixed = sum(mm.module_size(m) for m in leaves if not hasattr(m, "comfy_cast_weights"))  # ComfyUI never moves
    shape = [1, 16, 64, 64]

    def prepare(model_patcher, noise_shape, conds, model_options=None):
        model_patcher.load(model_patcher.load_device, full_load=True)  # every weight on the "GPU"
        step = comfy.sampler_helpers.estimate_memory(model_patcher, noise_shape, conds)[1]
        required = max(mm.minimum_inference_memory(), step + mm.extra_reserved_memory())
        emulated_nvidia_card["free"] = required - size + int(keep * size)  # room for `keep` of the weights
        return "prepared"

    wrappers = model.get_all_wrappers(pe.WrappersMP.PREPARE_SAMPLING)
    assert pe.WrapperExecutor.new_executor(prepare, wrappers).execute(model, shape, {}, model_options={}) == "prepared"
    # Released per module, at least what is too much: no more than `keep` stays (and what ComfyUI cannot move
    # off, parameters of layers without a cast path), less only by one module.
    assert 0 < fixed < largest
    assert keep * size - largest <= model.loaded_size() <= max(keep * size, fixed)


def test_no_weight_is_released_without_low_vram_loading(emulated_nvidia_card, monkeypatch):
    import comfy.model_management as mm

    from ultragen.patch.sampling import release_surplus_weights

    from comfy_flux import tiny_flux

    model = patched(tiny_flux(seed=0))
    model.load(model.load_device, full_load=True)
    emulated_nvidia_card["free"] = 0  # the step would want every weight gone
    monkeypatch.setattr(mm, "vram_state", mm.VRAMState.HIGH_VRAM)  # --highvram: ComfyUI keeps them all
    assert release_surplus_weights(model, [1, 16, 64, 64], {}) == 0
    monkeypatch.setattr(mm, "vram_state", mm.VRAMState.NORMAL_VRAM)
    assert release_surplus_weights(model, [1, 16, 64, 64], {}, force_full_load=True) == 0
    assert model.loaded_size() == model.model_size()
    assert release_surplus_weights(model, [1, 16, 64, 64], {}) > 0.9 * model.model_size()  # the rule applies


# -- bad input -----------------------------------------------------------------------------


def test_bad_inputs_are_explained(flux):
    import comfy.model_patcher

    from ultragen.patch import Guidance, UltraGenPatchError

    from comfy_flux import denoise

    class NotFlux(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.diffusion_model = torch.nn.Linear(2, 2)

    not_flux = comfy.model_patcher.ModelPatcher(NotFlux(), load_device="cpu", offload_device="cpu")
    with pytest.raises(UltraGenPatchError, match="needs a FLUX model, but this MODEL is Linear"):
        patched(not_flux)

    x, ctx, y = inputs(h=16, w=20)
    too_big = patched(flux, guidance=guidance_of(20, 24, (16, 20)), window=4)
    with pytest.raises(UltraGenPatchError, match=r"guidance \(192x160 px\) is larger than the image being sampled"):
        denoise(too_big, x, 0.6, ctx, y)

    with pytest.raises(UltraGenPatchError, match="guidance latent has 4 channels but this model takes 16"):
        patched(flux, guidance=Guidance(torch.randn(1, 4, 4, 5), 160, 128))

    with pytest.raises(UltraGenPatchError, match="backend must be one of"):
        patched(flux, backend="cuda")

    with pytest.raises(UltraGenPatchError, match="already patched by UltraGen Attention Patch"):
        patched(patched(flux))
