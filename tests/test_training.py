"""Guidance LoRA training in the real ComfyUI: tiny FLUX, FLUX-architecture VAE, synthetic images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

SIZE, RATIO, WINDOW = 128, 4, 4  # 8x8 image tokens in 2x2 windows, 2x2 guidance tokens


def settings(**kw):
    from ultragen.training.trainer import TrainSettings

    base = dict(size=SIZE, ratio=RATIO, window=WINDOW, grad_accum=1, learning_rate=1e-2, save_every=0, sample_every=0)
    return TrainSettings(**{**base, **kw})


def write_images(folder, count=4, captions=True):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:160, 0:176] / 160
    for i in range(count):
        img = np.stack([np.sin(6 * xx + i), np.cos(5 * yy * (i + 1)), xx * yy], -1) * 0.5 + 0.5
        Image.fromarray((img * 255).astype("uint8")).save(folder / f"img{i}.png")
        if captions:
            (folder / f"img{i}.txt").write_text(f"pattern {i}")
    return folder


def encode_text(caption: str):
    g = torch.Generator().manual_seed(sum(map(ord, caption)))
    return torch.randn(8, 64, generator=g), torch.randn(32, generator=g)


@pytest.fixture(scope="module")
def vae(comfyui):
    from comfy_flux import flux_vae

    return flux_vae()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, vae):
    from ultragen.training.dataset import CachedDataset, build_cache, scan_folder

    folder = write_images(tmp_path_factory.mktemp("data"))
    files = build_cache(scan_folder(folder), folder / ".cache", SIZE, RATIO, vae.encode, encode_text)
    return CachedDataset(files, seed=0)


def trainer(dataset, out, vae=None, **kw):
    from ultragen.training.trainer import GuidanceLoRATrainer

    from comfy_flux import tiny_flux

    return GuidanceLoRATrainer(
        tiny_flux(), dataset, out, settings(**kw), decode=vae.decode if vae else None, device=torch.device("cpu")
    )


def test_cache_holds_latents_guidance_and_embeddings(dataset):
    ex = dataset.batch(0, 2)
    assert ex.latent.shape == (2, 16, SIZE // 8, SIZE // 8)
    assert ex.guidance.shape == (2, 16, SIZE // 8 // RATIO, SIZE // 8 // RATIO)
    assert ex.context.shape == (2, 8, 64) and ex.pooled.shape == (2, 32)
    # the seeded order is a permutation per epoch, identical for every reader
    seen = [dataset.index(i) for i in range(len(dataset))]
    assert sorted(seen) == list(range(len(dataset)))
    assert seen == [type(dataset)(dataset.files, seed=0).index(i) for i in range(len(dataset))]


@pytest.mark.parametrize("targets", ["qkv", "all"])
def test_loss_falls(dataset, tmp_path, targets):
    t = trainer(dataset, tmp_path, targets=targets, steps=40)
    assert t.sigma_shift == pytest.approx(1.15)  # FLUX.1: the SD3 / FLUX training shift at 1024^2
    before = t.validation_loss(8)
    t.train()
    after = t.validation_loss(8)
    assert after < 0.97 * before, (before, after)  # fixed batches: no sampling noise


def test_saved_lora_is_what_the_patch_applies(dataset, tmp_path):
    """The node's inference LoRA (patch object patches, core LoRALayer) reproduces the trained
    model's prediction, and the file changes only the guidance rows."""
    from ultragen.patch import Guidance, PatchOptions, UltraGenFluxPatch, load_guidance_lora

    from comfy_flux import denoise, tiny_flux

    t = trainer(dataset, tmp_path, targets="all", steps=8)
    t.train()
    path = t.save()
    meta = json.loads(__import__("safetensors").safe_open(str(path), "pt").metadata()["ultragen"])
    assert meta["step"] == 8 and meta["targets"] == "all"
    lora = load_guidance_lora(path)
    assert sorted(lora) == sorted(t.layers)

    ex = dataset.example(1)
    x = torch.randn(ex.latent.shape, generator=torch.Generator().manual_seed(3))
    sigma = 0.6
    with torch.no_grad():
        trained_v = t.velocity(x, torch.tensor([sigma]), ex, t._run(ex, noise_seed=77)).float()

    options = PatchOptions(window=WINDOW, constant_shift=False)
    guidance = Guidance(ex.guidance, SIZE, SIZE)
    fresh = tiny_flux()
    patch = UltraGenFluxPatch(options, guidance, lora=lora)
    with_lora = patch.apply(fresh)
    den = denoise(with_lora, x, sigma, ex.context, ex.pooled, options=patch.run_options(seed=77))
    assert torch.allclose((x - den) / sigma, trained_v, atol=2e-4)

    # Rows: the first adapted layer's input rows before the guidance get the base output.
    captured = {}
    layer = fresh.model.diffusion_model.double_blocks[0].img_attn.qkv
    hook = layer.register_forward_hook(lambda m, i, o: captured.setdefault(len(captured), o.detach().clone()))
    try:
        denoise(UltraGenFluxPatch(options, guidance).apply(fresh), x, sigma, ex.context, ex.pooled)
        denoise(with_lora, x, sigma, ex.context, ex.pooled)
    finally:
        hook.remove()
    plain, adapted = captured[0], captured[1]
    n_guid = (ex.guidance.shape[-2] // 2) * (ex.guidance.shape[-1] // 2)
    assert torch.equal(plain[:, :-n_guid], adapted[:, :-n_guid])
    assert (plain[:, -n_guid:] - adapted[:, -n_guid:]).abs().max() > 1e-4


def test_resume_continues_exactly(dataset, tmp_path):
    from ultragen.training.row_lora import lora_tensors

    straight = trainer(dataset, tmp_path / "a", steps=6, save_every=3, grad_accum=2)
    straight.train()
    first = trainer(dataset, tmp_path / "b", steps=6, save_every=3, grad_accum=2)
    first.train(until=3)
    second = trainer(dataset, tmp_path / "b", steps=6, save_every=3, grad_accum=2)
    assert second.resume() == 3
    second.train()
    want, got = lora_tensors(straight.dm), lora_tensors(second.dm)
    assert all(torch.allclose(got[k], v, atol=1e-6) for k, v in want.items())
    assert not all(torch.equal(lora_tensors(first.dm)[k], v) for k, v in want.items())  # 3 steps differ from 6
    lines = (tmp_path / "b" / "loss.csv").read_text().split()
    assert [int(line.split(",")[0]) for line in lines] == [1, 2, 3, 4, 5, 6]
    state_path = tmp_path / "b" / "training_state.pt"
    state = torch.load(state_path, weights_only=True)
    assert state["sigma_shift"] == pytest.approx(1.15)
    del state["sigma_shift"]  # a run saved before the shift was recorded: it had 1.15 for every family
    torch.save(state, state_path)
    older = trainer(dataset, tmp_path / "b", steps=6, save_every=3, grad_accum=2)
    older.sigma_shift = 0.0  # as a FLUX.2 run would start now
    older.resume()
    assert older.sigma_shift == pytest.approx(1.15)  # it continues with the sigmas it was trained with


def test_resume_with_other_settings_says_which(dataset, tmp_path):
    from ultragen.training.trainer import TrainingError

    trainer(dataset, tmp_path, steps=1).train()
    with pytest.raises(TrainingError, match=r"rank 16 \(now 8\)"):
        trainer(dataset, tmp_path, steps=2, rank=8).resume()
    with pytest.raises(TrainingError, match=r"mu 1.15 \(now 0.5\)"):
        trainer(dataset, tmp_path, steps=2, mu=0.5).resume()
    with pytest.raises(TrainingError, match="nothing to resume"):
        trainer(dataset, tmp_path / "empty").resume()


def test_periodic_sample_is_written(dataset, tmp_path, vae):
    from PIL import Image

    t = trainer(dataset, tmp_path, vae, steps=2, sample_every=2, sample_steps=2)
    t.train()
    with Image.open(tmp_path / "samples" / "step_000002.png") as im:
        assert im.size == (SIZE, SIZE)


def test_training_shift_by_family_unless_set():
    from ultragen.training.settings import TrainSettings

    assert TrainSettings().sigma_shift(flux2=False) == pytest.approx(1.15)
    assert TrainSettings().sigma_shift(flux2=True) == 0.0
    assert TrainSettings(mu=2.0).sigma_shift(flux2=True) == 2.0 and TrainSettings(mu=0.5).sigma_shift(False) == 0.5


def test_bad_folders_and_settings_say_what_to_fix(tmp_path, vae):
    from ultragen.training.dataset import DatasetError, build_cache, scan_folder
    from ultragen.training.trainer import TrainingError

    with pytest.raises(DatasetError, match="not found"):
        scan_folder(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="no images"):
        scan_folder(tmp_path)
    folder = write_images(tmp_path / "uncaptioned", count=2, captions=False)
    with pytest.raises(DatasetError, match="2 image\\(s\\) have no caption: img0.png, img1.png"):
        scan_folder(folder)
    (folder / "img0.txt").write_text("a")
    (folder / "img1.txt").write_text("b")
    with pytest.raises(DatasetError, match="pass --vae"):
        build_cache(scan_folder(folder), folder / ".c", SIZE, RATIO, None, encode_text)
    with pytest.raises(DatasetError, match="pass --clip-l and --t5"):
        build_cache(scan_folder(folder), folder / ".c", SIZE, RATIO, vae.encode, None)
    with pytest.raises(TrainingError, match="multiple of 16 x ratio"):
        settings(size=100).check()
    with pytest.raises(TrainingError, match="forward-only"):
        settings(backend="triton").check()


def test_command_line_end_to_end(tmp_path, comfyui, vae, monkeypatch):
    """ultragen-train on files: FLUX's VAE file and precomputed text embeddings; then --resume
    adds steps. The FLUX loader is swapped for the tiny model inside this test only (ComfyUI
    detects FLUX.1's full width from any FLUX checkpoint)."""
    from safetensors.torch import save_file

    from ultragen.training import cli

    from comfy_flux import tiny_flux

    loaded = []
    monkeypatch.setattr(cli, "load_flux_model", lambda path, dtype: loaded.append(path) or tiny_flux())
    main = cli.main
    save_file({"stand_in": torch.zeros(1)}, str(tmp_path / "flux.safetensors"))  # readable; never loaded here
    save_file({k: v.contiguous() for k, v in vae.get_sd().items()}, str(tmp_path / "ae.safetensors"))
    data = write_images(tmp_path / "data", count=2, captions=False)
    for i in range(2):
        context, pooled = encode_text(f"x{i}")
        save_file({"context": context, "pooled": pooled}, str(data / f"img{i}.safetensors"))
    common = [
        "--checkpoint", str(tmp_path / "flux.safetensors"), "--vae", str(tmp_path / "ae.safetensors"),
        "--data", str(data), "--output-dir", str(tmp_path / "run"), "--size", str(SIZE), "--window", str(WINDOW),
        "--grad-accum", "1", "--save-every", "2", "--sample-every", "2", "--sample-steps", "2", "--cpu",
    ]  # fmt: skip
    assert main(common + ["--steps", "2"]) == 0
    assert loaded == [tmp_path / "flux.safetensors"]
    assert (tmp_path / "run" / "guidance_lora.safetensors").is_file()
    assert (tmp_path / "run" / "samples" / "step_000002.png").is_file()
    with pytest.raises(SystemExit, match="pass --resume"):
        main(common + ["--steps", "4"])
    assert main(common + ["--steps", "4", "--resume"]) == 0
    assert (tmp_path / "run" / "checkpoints" / "step_000004.safetensors").is_file()
    with pytest.raises(SystemExit, match="checkpoint not found"):
        main(common[:1] + [str(tmp_path / "missing.safetensors")] + common[2:])


def test_flux2_trains_and_its_lora_is_what_the_patch_applies(tmp_path, comfyui):
    """FLUX.2 (ComfyUI 0.29+): its VAE's 128-channel latents, text without a pooled vector, the same loop; the
    loss falls and the saved LoRA, applied by the patch on a fresh FLUX.2, reproduces the trained prediction."""

    from ultragen.patch import Guidance, PatchOptions, UltraGenFluxPatch, load_guidance_lora
    from ultragen.training.dataset import CachedDataset, build_cache, scan_folder
    from ultragen.training.trainer import GuidanceLoRATrainer

    from comfy_flux import denoise, flux_vae
    from random_models import host_has_flux2, tiny_flux2

    if not host_has_flux2():
        return  # no FLUX.2 in this ComfyUI (0.3.64)
    vae = flux_vae(seed=1, flux2=True)
    folder = write_images(tmp_path / "data")
    size = 128  # 8 x 8 tokens at 16 px each, guidance 2 x 2 (as the FLUX.1 runs here)

    def text_only(caption):
        return encode_text(caption)[0], None

    files = build_cache(scan_folder(folder), folder / ".cache", size, RATIO, vae.encode, text_only)
    data = CachedDataset(files, seed=0)
    ex = data.example(0)
    assert ex.latent.shape == (1, 128, 8, 8) and ex.guidance.shape == (1, 128, 2, 2) and ex.pooled.numel() == 0
    run = settings(size=size, steps=40, targets="all", learning_rate=3e-2)
    t = GuidanceLoRATrainer(tiny_flux2(), data, tmp_path / "out", run, device=torch.device("cpu"))
    assert t.sigma_shift == 0.0  # the authors' FLUX.2 training sigmas: sigmoid(N(0, 1)), no shift
    before = t.validation_loss(4)
    t.train()
    assert t.validation_loss(4) < 0.97 * before
    lora = load_guidance_lora(t.save())
    x = torch.randn(ex.latent.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        trained_v = t.velocity(x, torch.tensor([0.6]), ex, t._run(ex, noise_seed=77)).float()
    patch = UltraGenFluxPatch(PatchOptions(window=WINDOW, constant_shift=False), Guidance(ex.guidance, size, size),
                              lora=lora)  # fmt: skip
    den = denoise(patch.apply(tiny_flux2()), x, 0.6, ex.context, None, options=patch.run_options(seed=77))
    assert torch.allclose((x - den) / 0.6, trained_v, atol=2e-4)
