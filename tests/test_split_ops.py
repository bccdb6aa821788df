"""Split convolutions, the nearest upsample fused with its convolution, and the whole-image group norm
against the plain PyTorch layers (float64; pure torch: no ComfyUI needed)."""

from __future__ import annotations

import torch

from ultragen.core import split_ops


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
