"""Frequency bands, frequency mixing, sharpening and warm-start sigma slicing (no ComfyUI)."""

import math

import pytest
import torch

from ultragen.core.frequency import high_pass, low_pass, mix_frequencies, sharpen
from ultragen.core.sigmas import remaining_sigmas


def wave(period: float, along: str, size: int = 64) -> torch.Tensor:
    t = torch.arange(size, dtype=torch.float32)
    w = torch.cos(2 * math.pi * t / period)
    return (w[None, :] if along == "x" else w[:, None]).expand(size, size)[None, None].contiguous()


def share(x: torch.Tensor, component: torch.Tensor) -> float:
    """How much of ``component`` is in ``x`` (1 = all of it)."""
    return float((x * component).sum() / (component * component).sum())


@pytest.mark.parametrize("shape", [(2, 16, 64, 40), (1, 3, 9, 13), (1, 1, 3, 2)])
def test_low_and_high_band_add_up_and_low_pass_is_a_projection(shape):
    z = torch.randn(shape)
    assert torch.allclose(low_pass(z) + high_pass(z), z, atol=1e-6)
    lp = low_pass(z)
    assert torch.allclose(low_pass(lp), lp, atol=1e-5)
    assert torch.allclose(low_pass(torch.full(shape, 0.7)), torch.full(shape, 0.7), atol=1e-5)  # keeps constants


def test_frequency_response_on_sinusoids():
    assert share(low_pass(wave(32, "x")), wave(32, "x")) == pytest.approx(1.0, abs=0.02)  # well below the cut
    assert share(low_pass(wave(4, "y")), wave(4, "y")) == pytest.approx(0.0, abs=0.02)  # far above it


def test_lfm_takes_low_band_of_one_and_high_band_of_the_other():
    lo_a, hi_a, lo_b, hi_b = wave(32, "x"), wave(4, "y"), wave(32, "y"), wave(4, "x")
    mixed = mix_frequencies(lo_a + hi_a, lo_b + hi_b)
    assert share(mixed, lo_a) == pytest.approx(1.0, abs=0.02)
    assert share(mixed, hi_b) == pytest.approx(1.0, abs=0.02)
    assert share(mixed, hi_a) == pytest.approx(0.0, abs=0.02)
    assert share(mixed, lo_b) == pytest.approx(0.0, abs=0.02)
    with pytest.raises(ValueError, match="two latents of one shape"):
        mix_frequencies(lo_a, lo_a[..., :32])


def test_sharpen():
    z = torch.randn(1, 3, 32, 32)
    assert torch.equal(sharpen(z, 0.0), z)
    flat = torch.full((1, 3, 16, 16), 0.3)
    assert torch.allclose(sharpen(flat, 1.0), flat, atol=1e-6)
    assert high_pass(sharpen(z, 0.5)).norm() > high_pass(z).norm()


def test_remaining_sigmas_by_hand():
    sigmas = torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2, 0.0])
    assert remaining_sigmas(sigmas, skip=2).tolist() == pytest.approx([0.6, 0.4, 0.2, 0.0])
    assert remaining_sigmas(sigmas, start_sigma=0.5).tolist() == pytest.approx([0.5, 0.4, 0.2, 0.0])
    assert remaining_sigmas(sigmas, skip=3, start_sigma=0.9).tolist() == pytest.approx([0.9, 0.8, 0.6, 0.4, 0.2, 0.0])
    with pytest.raises(ValueError, match="less than the 5 steps"):
        remaining_sigmas(sigmas, skip=5)
    with pytest.raises(ValueError, match="start sigma must lie in"):
        remaining_sigmas(sigmas, start_sigma=1.5)
