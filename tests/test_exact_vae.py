"""The exact, memory-bounded VAE against ComfyUI's own full-image decode and encode."""

from __future__ import annotations

import pytest
import torch

from ultragen.core import split_ops

pytestmark = pytest.mark.usefixtures("comfyui")

TINY_BANDS = 4096  # forces bands of a row or two everywhere: every halo path runs


@pytest.fixture(scope="module")
def vae(comfyui):
    from comfy_flux import flux_vae

    return flux_vae(seed=1)


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


def test_split_ops_match_full_ops():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 13, 11, generator=g, dtype=torch.float64)
    conv = torch.nn.Conv2d(8, 6, 3, padding=1).double()
    norm = torch.nn.GroupNorm(4, 8, eps=1e-6).double()
    torch.nn.init.normal_(norm.weight, generator=g)
    torch.nn.init.normal_(norm.bias, generator=g)
    tiny = 2 * 8 * 11 * 2
    full = conv(torch.nn.functional.silu(norm(x)))
    stats = split_ops.group_stats(x, 4, 1e-6, tiny)
    assert torch.allclose(split_ops.conv3x3(x, conv, split_ops.group_norm_silu(norm, stats), band_elements=tiny),
                          full, atol=1e-6)  # fmt: skip
    up = conv(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))
    assert torch.allclose(split_ops.upsample2_conv3x3(x, conv, tiny), up, atol=1e-12)
    down = torch.nn.Conv2d(8, 6, 3, stride=2).double()
    for h, w in ((13, 11), (12, 10)):
        y = torch.randn(2, 8, h, w, generator=g, dtype=torch.float64)
        ref = down(torch.nn.functional.pad(y, (0, 1, 0, 1)))
        assert torch.allclose(split_ops.pad_conv3x3_stride2(y, down, tiny), ref, atol=1e-12)


def test_offloaded_activations_give_the_same_result(vae):
    """Full activations in CPU memory, bands computed on the VAE's device (the CPU here too)."""
    from ultragen.patch.exact_vae import ExactVAEError, exact_decode

    z = torch.randn(1, 16, 6, 5, generator=torch.Generator().manual_seed(3))
    a = exact_decode(vae, z, band_elements=TINY_BANDS, direct_elements=0, offload="always")
    b = exact_decode(vae, z, band_elements=TINY_BANDS, direct_elements=0, offload="never")
    assert torch.equal(a, b)
    with pytest.raises(ExactVAEError, match="offload must be one of"):
        exact_decode(vae, z, offload="sometimes")
