"""The exact, memory-bounded VAE against ComfyUI's own full-image decode and encode."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.usefixtures("comfyui")

TINY_BANDS = 4096  # forces bands of a row or two everywhere: every halo path runs


@pytest.fixture(scope="module", autouse=True)
def float32_convolutions():
    """On a GPU, convolutions without TF32: the exactness tests compare to 2e-5 in float32, and there they are what
    checks the pinned host memory and the side-stream copies."""
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = tf32


@pytest.fixture(scope="module")
def vae(comfyui):
    """float32, also on a GPU (where ComfyUI would pick bf16)."""
    from comfy_flux import flux_vae

    return flux_vae(seed=1, dtype=torch.float32)


@pytest.mark.parametrize("shape", [(2, 16, 8, 6), (1, 16, 5, 7)])
def test_decode_equals_full_decode(vae, shape):
    from ultragen.nodes.exact_vae import UltraGenVAEDecodeExact
    from ultragen.patch.exact_vae import exact_decode

    z = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    full = vae.decode(z)
    split = exact_decode(vae, z, band_elements=TINY_BANDS, direct_elements=0)
    assert split.shape == full.shape == (shape[0], shape[2] * 8, shape[3] * 8, 3)
    assert (split - full).abs().max().item() <= 2e-5
    node = UltraGenVAEDecodeExact.execute({"samples": z}, vae).result[0]  # default bands: one band here
    assert (node - full).abs().max().item() <= 2e-5


def test_progress_bar_moves_band_by_band(vae, monkeypatch):
    """The bar moves within layers (more values than layers, never backwards, never past the end) and ends full,
    decoding and encoding. (Recorded where the node sets it: ComfyUI 0.29 throttles what reaches the UI.)"""
    import comfy.utils

    from ultragen.patch.exact_vae import PROGRESS_PER_LAYER, exact_decode, exact_encode

    bars = []
    original = comfy.utils.ProgressBar.update_absolute

    def update_absolute(bar, value, total=None, preview=None):
        if bar not in bars:
            bars.append(bar)
        bar.values = [*getattr(bar, "values", []), value]
        return original(bar, value, total, preview)

    monkeypatch.setattr(comfy.utils.ProgressBar, "update_absolute", update_absolute)
    z = torch.randn(1, 16, 8, 6, generator=torch.Generator().manual_seed(3))
    image = exact_decode(vae, z, band_elements=TINY_BANDS, direct_elements=0)
    exact_encode(vae, image, band_elements=TINY_BANDS, direct_elements=0)
    assert len(bars) == 2
    for bar in bars:
        layers = bar.total // PROGRESS_PER_LAYER
        assert bar.values == sorted(bar.values) and bar.values[-1] == bar.total
        assert len(set(bar.values)) > 2 * layers  # the full-resolution layers run in 8+ bands each here
        assert sum(v % PROGRESS_PER_LAYER == 0 for v in bar.values) == layers  # one tick per layer, each reached


def test_long_middle_attention_equals_the_full_decode(vae, monkeypatch):
    """The middle attention query rows at a time (as from 2048^2 images; here forced, in chunks of one row): still
    ComfyUI's full decode."""
    import ultragen.patch.exact_vae as exact_vae
    from ultragen.core import long_attention

    calls = []
    original = long_attention.attention

    def one_row_at_a_time(q, k, v, budget_bytes, between_chunks):
        calls.append(q.shape)
        return original(q, k, v, budget_bytes=1, between_chunks=between_chunks)

    z = torch.randn(1, 16, 6, 7, generator=torch.Generator().manual_seed(8))
    monkeypatch.setattr(exact_vae, "LONG_ATTENTION_TOKENS", 0)
    monkeypatch.setattr(long_attention, "attention", one_row_at_a_time)
    split = exact_vae.exact_decode(vae, z, band_elements=TINY_BANDS, direct_elements=0)
    assert (split - vae.decode(z)).abs().max().item() <= 2e-5
    assert calls == [(1, 42, vae.first_stage_model.decoder.mid.attn_1.in_channels)]


@pytest.mark.parametrize("size", [(64, 48), (40, 56)])
def test_encode_equals_full_encode(vae, size):
    from ultragen.nodes.exact_vae import UltraGenVAEEncodeExact
    from ultragen.patch.exact_vae import exact_encode

    pixels = torch.rand(2, *size, 3, generator=torch.Generator().manual_seed(size[0]))
    full = vae.encode(pixels)
    split = exact_encode(vae, pixels, band_elements=TINY_BANDS, direct_elements=0)
    assert split.shape == full.shape
    assert (split - full).abs().max().item() <= 5e-5 * max(1.0, full.abs().max().item())
    node = UltraGenVAEEncodeExact.execute(pixels, vae).result[0]["samples"]
    assert (node - full).abs().max().item() <= 5e-5 * max(1.0, full.abs().max().item())


@pytest.mark.parametrize("shape", [(1, 16, 6, 5), (2, 16, 7, 4)])
def test_streamed_activations_equal_the_full_decode_and_encode(vae, shape, monkeypatch):
    """Full activations kept in host memory row-major, every layer streamed a band of one to three rows at a time,
    group norms from the sums their producers accumulate, the upsamples before a channel change made as their
    reader needs them: ComfyUI's own full decode and encode (float32, odd sizes, batch 2)."""
    from ultragen.core import split_ops
    from ultragen.patch.exact_vae import ExactVAEError, exact_decode, exact_encode

    made = []
    monkeypatch.setattr(split_ops.Upsampled, "sums", lambda self, f=split_ops.Upsampled.sums: made.append(1) or f(self))
    z = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    streamed = exact_decode(vae, z, band_elements=TINY_BANDS, direct_elements=0, offload="always")
    assert (streamed - vae.decode(z)).abs().max().item() <= 2e-5
    assert len(made) == 2 * shape[0]  # per image, the upsamples before a channel change (512 -> 256, 256 -> 128)
    pixels = torch.rand(shape[0], 8 * shape[2], 8 * shape[3], 3, generator=torch.Generator().manual_seed(4))
    ref = vae.encode(pixels)
    ours = exact_encode(vae, pixels, band_elements=TINY_BANDS, direct_elements=0, offload="always")
    assert (ours - ref).abs().max().item() <= 5e-5 * max(1.0, ref.abs().max().item())
    with pytest.raises(ExactVAEError, match="offload must be one of"):
        exact_decode(vae, z, offload="sometimes")


def test_streamed_bands_stay_within_the_budget(vae, monkeypatch):
    """Every band a streamed decode moves to the compute device holds at most the band budget's rows plus its two
    halo rows, and full activations are never moved whole (only small ones, once, by design)."""
    import ultragen.core.row_major as row_major
    from ultragen.patch.exact_vae import exact_decode

    budget = 3 * 4096
    moved = []
    original = row_major.read_rows

    def counting(x, lo, hi, device):
        band = original(x, lo, hi, device)
        moved.append((band.numel(), band.numel() // max(1, hi - lo), x.shape[2]))
        return band

    monkeypatch.setattr(row_major, "read_rows", counting)
    z = torch.randn(1, 16, 6, 8, generator=torch.Generator().manual_seed(5))
    exact_decode(vae, z, band_elements=budget, direct_elements=0, offload="always")
    assert moved
    for numel, per_row, height in moved:
        assert numel <= max(budget, per_row) + 2 * per_row or numel == per_row * height, (numel, per_row, budget)
    assert any(height >= 16 and numel < per_row * height for numel, per_row, height in moved)  # large ones in bands


def test_cancel_mid_decode_leaves_no_activation_behind(vae, monkeypatch):
    """Cancel (ComfyUI's interrupt) in the middle of a streamed decode: it stops, and every host activation it made is
    freed once the exception is gone."""
    import gc
    import weakref

    import comfy.model_management

    import ultragen.core.row_major as row_major
    from ultragen.patch.exact_vae import exact_decode

    alive = weakref.WeakSet()
    original_init = row_major.RowMajor.__init__

    def tracked(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        alive.add(self)

    calls = {"n": 0}

    def interrupt_on_the_eighth():
        calls["n"] += 1
        if calls["n"] == 8:
            raise comfy.model_management.InterruptProcessingException()

    monkeypatch.setattr(row_major.RowMajor, "__init__", tracked)
    monkeypatch.setattr(comfy.model_management, "throw_exception_if_processing_interrupted", interrupt_on_the_eighth)
    z = torch.randn(1, 16, 6, 8, generator=torch.Generator().manual_seed(6))
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        exact_decode(vae, z, band_elements=TINY_BANDS, direct_elements=0, offload="always", progress=False)
    assert calls["n"] == 8
    gc.collect()
    assert len(alive) == 0


def test_too_little_system_memory_is_a_clear_error(vae, monkeypatch):
    """An activation bound for host memory that the system cannot hold: an error naming the memory and the tiled
    nodes, before anything is allocated (not an operating system killing ComfyUI)."""
    from types import SimpleNamespace

    import ultragen.patch.exact_vae as exact_vae
    import ultragen.patch.vae_memory as vae_memory
    from ultragen.core.row_major import RowMajor

    made = []
    monkeypatch.setattr(RowMajor, "__init__", lambda self, *a, **k: made.append(a))
    monkeypatch.setattr(vae_memory.psutil, "virtual_memory", lambda: SimpleNamespace(available=3 << 30))
    z = torch.randn(1, 16, 6, 8, generator=torch.Generator().manual_seed(9))
    monkeypatch.setattr(vae_memory, "HOST_RESERVE_BYTES", (3 << 30) - 1000)  # room for 1,000 bytes: too little
    with pytest.raises(exact_vae.ExactVAEError, match=r"system memory .* VAE Decode \(Tiled\)"):
        exact_vae.exact_decode(vae, z, band_elements=TINY_BANDS, direct_elements=0, offload="always", progress=False)
    assert made == []


def test_memory_is_asked_for_as_comfyuis_own_vae_nodes_ask(vae, monkeypatch):
    """Before decoding / encoding, the VAE is loaded asking for the memory the pass can use — three of its largest
    activations (worked by hand from FLUX's VAE: 256 channels at full size in the decoder, 128 at full size in the
    encoder) and a band's temporaries — at most what ComfyUI's VAE Decode / Encode asks for one image; so the
    sampler's model leaves the GPU as far as that needs."""
    import comfy.model_management

    from ultragen.patch.exact_vae import exact_decode, exact_encode

    asked = []
    original = comfy.model_management.load_models_gpu

    def recording(models, memory_required=0, **kwargs):
        asked.append(memory_required)
        return original(models, memory_required=memory_required, **kwargs)

    monkeypatch.setattr(comfy.model_management, "load_models_gpu", recording)
    z = torch.randn(2, 16, 6, 8, generator=torch.Generator().manual_seed(10))
    exact_decode(vae, z, band_elements=TINY_BANDS, direct_elements=0)
    pixels = torch.rand(2, 48, 64, 3, generator=torch.Generator().manual_seed(11))
    exact_encode(vae, pixels, band_elements=TINY_BANDS, direct_elements=0)
    band = TINY_BANDS * 64  # the band's temporaries: 64 bytes an element
    assert asked[0] == 3 * (256 * 48 * 64) * 4 + band  # float32
    assert asked[0] < vae.memory_used_decode((1, 16, 6, 8), vae.vae_dtype)
    assert asked[-1] == 3 * (128 * 48 * 64) * 4 + band
    assert asked[-1] < vae.memory_used_encode((1, 3, 48, 64), vae.vae_dtype)


def test_where_activations_live_by_hand(monkeypatch):
    """On the GPU while three of the largest activation fit in 90% of its free memory, else spilled (each on the GPU
    while it fits, the rest in host memory); "always" / "never" as asked; a CPU computes in place unless asked."""
    import comfy.model_management

    from ultragen.patch.vae_memory import placement as _placement

    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.setattr(comfy.model_management, "get_free_memory", lambda device=None: 10_000)
    assert _placement(gpu, "auto", 1000, torch.float16) == "compute"  # 3 x 1000 x 2 = 6,000 bytes < 9,000
    assert _placement(gpu, "auto", 1500, torch.float32) == "spill"  # 18,000 bytes > 9,000
    assert _placement(gpu, "always", 1, torch.float16) == "host"
    assert _placement(gpu, "never", 10**9, torch.float32) == "compute"
    assert _placement(cpu, "auto", 10**12, torch.float16) == "compute"
    assert _placement(cpu, "always", 1, torch.float16) == "host"


def test_spilled_activations_equal_the_full_decode(vae, monkeypatch):
    """Spilling (the 16K case: some activations on the compute device, the largest in host memory, as free memory
    allows): the result is ComfyUI's full decode, and both kinds of storage were used."""
    import comfy.model_management

    import ultragen.patch.exact_vae as exact_vae
    import ultragen.patch.vae_memory as vae_memory
    from ultragen.core.row_major import RowMajor

    kinds = []
    original = exact_vae._Runner.alloc

    def recording(self, shape, dtype):
        out = original(self, shape, dtype)
        kinds.append(isinstance(out, RowMajor))
        return out

    monkeypatch.setattr(vae_memory, "placement", lambda *args: "spill")
    monkeypatch.setattr(exact_vae._Runner, "alloc", recording)
    room = TINY_BANDS * exact_vae.BYTES_PER_BAND_ELEMENT + (1 << 30) + 1_000_000  # fits activations under ~1 MB

    def free(dev=None, torch_free_too=False):  # ComfyUI's signature: its loader asks for both numbers on a GPU
        return (room, room) if torch_free_too else room

    monkeypatch.setattr(comfy.model_management, "get_free_memory", free)
    z = torch.randn(1, 16, 6, 8, generator=torch.Generator().manual_seed(7))  # 48 x 64 px: 128-ch ones are 1.5 MB
    spilled = exact_vae.exact_decode(vae, z, band_elements=TINY_BANDS, direct_elements=0)
    assert (spilled - vae.decode(z)).abs().max().item() <= 2e-5
    assert True in kinds and False in kinds, kinds


@pytest.mark.parametrize("kind", ["decode", "encode"])
def test_out_of_gpu_memory_runs_again_in_host_memory(vae, monkeypatch, kind, caplog):
    """A pass that runs out of GPU memory with its activations on the GPU (``auto``) runs again with them in host
    memory and still equals ComfyUI's own full decode / encode; asked to keep them on the GPU (``never``), the error
    stands."""
    import ultragen.patch.exact_vae as exact_vae

    name = "decode_latent" if kind == "decode" else "encode_pixels"
    original, asked = getattr(exact_vae, name), []

    def first_runs_out(net, x, band_elements, direct_elements, offload, progress=True):
        asked.append(offload)
        if len(asked) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 16.00 GiB")
        return original(net, x, band_elements, direct_elements, offload, progress)

    monkeypatch.setattr(exact_vae, name, first_runs_out)
    if kind == "decode":
        z = torch.randn(1, 16, 6, 5, generator=torch.Generator().manual_seed(11))
        ours, reference = exact_vae.exact_decode(vae, z, band_elements=TINY_BANDS, direct_elements=0), vae.decode(z)
        tolerance = 2e-5
    else:
        pixels = torch.rand(1, 48, 40, 3, generator=torch.Generator().manual_seed(12))
        ours, reference = exact_vae.exact_encode(vae, pixels, band_elements=TINY_BANDS, direct_elements=0), vae.encode(
            pixels)  # fmt: skip
        tolerance = 5e-5 * max(1.0, reference.abs().max().item())
    assert asked == ["auto", "always"]
    assert (ours - reference).abs().max().item() <= tolerance
    assert "ran out of GPU memory" in caplog.text
    asked.clear()
    with pytest.raises(torch.OutOfMemoryError):
        (exact_vae.exact_decode if kind == "decode" else exact_vae.exact_encode)(
            vae, z if kind == "decode" else pixels, offload="never")  # fmt: skip
    assert asked == ["never"]


def test_weights_come_through_comfyuis_cast_as_in_its_own_decode(vae, monkeypatch):
    """A partially loaded or DynamicVRAM VAE: ComfyUI casts each layer's weight on use and applies weight functions
    (LoRA patches) there. The split layers take their weights the same way, so the exact decode still equals
    ComfyUI's own decode with the same functions."""
    import comfy.ops

    from ultragen.patch.exact_vae import exact_decode

    z = torch.randn(1, 16, 6, 5, generator=torch.Generator().manual_seed(5))
    vae.decode(z)  # loaded first: ComfyUI's (full) load resets the layers' weight functions
    decoder = vae.first_stage_model.decoder
    layers = [m for m in decoder.modules() if isinstance(m, (comfy.ops.disable_weight_init.Conv2d,
                                                             comfy.ops.disable_weight_init.GroupNorm))]  # fmt: skip
    for m in layers:
        monkeypatch.setattr(m, "comfy_cast_weights", True, raising=False)
    conv = decoder.up[0].block[0].conv1  # a convolution that runs split
    delta = torch.randn(conv.weight.shape, generator=torch.Generator().manual_seed(4)) * 0.02
    monkeypatch.setattr(conv, "weight_function", [lambda w: w + delta.to(w)], raising=False)
    full = vae.decode(z)
    split = exact_decode(vae, z, band_elements=TINY_BANDS, direct_elements=0)
    assert (split - full).abs().max().item() <= 2e-5
    monkeypatch.setattr(conv, "weight_function", [], raising=False)
    assert (vae.decode(z) - full).abs().max().item() > 1e-4  # the function mattered


def test_flux2_vae_latents_decode_and_encode_exactly(comfyui):
    """FLUX.2's VAE (32 channels; latents batch-normed over 2x2-unshuffled channels: 128 at 1/16) gives ComfyUI's own
    result too, never a wrong-shaped latent. (A ComfyUI without FLUX.2, 0.3.64, cannot load that VAE file at all.)"""
    import comfy.supported_models

    from ultragen.patch.exact_vae import exact_decode, exact_encode

    from comfy_flux import flux_vae

    if not hasattr(comfy.supported_models, "Flux2"):
        with pytest.raises(RuntimeError, match="size mismatch"):  # read as a video VAE: ComfyUI's own refusal
            flux_vae(seed=3, flux2=True)
        return
    vae = flux_vae(seed=3, flux2=True, dtype=torch.float32)
    assert vae.first_stage_model.bn is not None
    channels, factor = 128, 16
    g = torch.Generator().manual_seed(6)
    z = torch.randn(1, channels, 48 // factor, 64 // factor, generator=g)
    full = vae.decode(z)
    pixels = torch.rand(1, 48, 64, 3, generator=g)
    ref = vae.encode(pixels)
    for offload in ("never", "always"):  # activations on the compute device / streamed from host memory
        split = exact_decode(vae, z, band_elements=TINY_BANDS, direct_elements=0, offload=offload)
        assert split.shape == full.shape == (1, 48, 64, 3) and (split - full).abs().max().item() <= 2e-5
        ours = exact_encode(vae, pixels, band_elements=TINY_BANDS, direct_elements=0, offload=offload)
        assert ours.shape == ref.shape == (1, channels, 48 // factor, 64 // factor)
        assert (ours - ref).abs().max().item() <= 5e-5 * max(1.0, ref.abs().max().item())
