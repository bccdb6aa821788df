"""The training objective and NTK scaling, against formulas worked by hand and ComfyUI's own shift."""

from __future__ import annotations

import math

import pytest
import torch

from ultragen.core.flow_matching import (
    FLUX_MU_1024,
    flow_matching_loss,
    noised_latent,
    time_shift,
    training_sigmas,
    velocity_target,
)
from ultragen.core.rope import ntk_theta


def test_ntk_stretches_the_lowest_frequency_by_the_factor_and_keeps_the_highest():
    """NTK-aware scaling's definition: rotary frequencies theta^(-2i/d); the new base divides the lowest one
    (i = d/2 - 1) by exactly the factor and leaves the highest (i = 0, frequency 1) alone."""
    for theta, dim, factor in ((10000, 56, 10.0), (10000, 16, 10.0), (2000, 32, 4.0)):
        exponent = -(dim - 2) / dim  # the lowest frequency, base^(-(d - 2) / d)
        assert ntk_theta(theta, dim, factor) ** exponent == pytest.approx(theta**exponent / factor, rel=1e-12)
    assert ntk_theta(10000, 56, 10.0) == pytest.approx(10000 * 10 ** (56 / 54))  # 108,893
    assert ntk_theta(10000, 56, 1.0) == 10000.0 and ntk_theta(10000, 2, 10.0) == 10000.0
    with pytest.raises(ValueError, match="positive"):
        ntk_theta(10000, 56, 0.0)


def test_noised_latent_velocity_and_loss_by_hand():
    x0 = torch.tensor([[1.0, -2.0], [0.5, 4.0]])
    noise = torch.tensor([[3.0, 0.0], [-1.0, 2.0]])
    sigma = torch.tensor([0.25, 0.5])
    xt = noised_latent(x0, noise, sigma)
    assert torch.equal(xt, torch.tensor([[1.5, -1.5], [-0.25, 3.0]]))  # 0.25 * n + 0.75 * x0; 0.5 * (n + x0)
    v = velocity_target(x0, noise)
    assert torch.equal(v, torch.tensor([[2.0, 2.0], [-1.5, -2.0]]))
    assert torch.allclose(xt - sigma[:, None] * v, x0)  # the sampler's x0 = x_t - sigma * v recovers it
    assert flow_matching_loss(v + 0.5, x0, noise).item() == pytest.approx(0.25)  # every error 0.5
    assert flow_matching_loss(v.half(), x0, noise).dtype == torch.float32


def test_time_shift_is_fluxs(comfyui):
    import comfy.model_sampling

    t = torch.tensor([0.1, 0.5, 0.9])
    ours = time_shift(t, FLUX_MU_1024)
    assert torch.allclose(ours, comfy.model_sampling.flux_time_shift(FLUX_MU_1024, 1.0, t))
    assert ours[1].item() == pytest.approx(1 / (1 + math.exp(-FLUX_MU_1024)))  # t = 1/2: sigmoid(mu)
    sigmas = training_sigmas(1000, generator=torch.Generator().manual_seed(0))
    assert sigmas.shape == (1000,) and 0 < sigmas.min() and sigmas.max() < 1
    assert sigmas.median().item() == pytest.approx(1 / (1 + math.exp(-FLUX_MU_1024)), abs=0.03)  # median t = 1/2


def test_no_shift_is_the_plain_logit_normal_draw():
    """mu 0 (the authors' FLUX.2 training): sigmoid(n) itself, n ~ N(0, 1) from the same generator."""
    n = torch.randn(500, generator=torch.Generator().manual_seed(3))
    assert torch.equal(training_sigmas(500, 0.0, torch.Generator().manual_seed(3)), torch.sigmoid(n))
    assert not torch.equal(training_sigmas(500, FLUX_MU_1024, torch.Generator().manual_seed(3)), torch.sigmoid(n))
