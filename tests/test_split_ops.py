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


def test_row_major_storage_round_trip_and_bands():
    """A (B, C, H, W) activation kept row-major: the whole comes back unchanged, rows [lo, hi) come back as the
    tensor's rows, written rows land where they belong, and a band is one contiguous block of storage."""
    from ultragen.core.row_major import RowMajor, read_rows, write_rows

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 9, 7, generator=g)
    stored = RowMajor.of(x)
    assert stored.shape == x.shape and torch.equal(stored.tensor(), x)
    assert torch.equal(read_rows(stored, 3, 6, torch.device("cpu")), x[:, :, 3:6])
    assert stored.data[3:6].is_contiguous()  # one block: one transfer
    band = torch.randn(2, 5, 2, 7, generator=g)
    write_rows(stored, 4, band)
    expected = x.clone()
    expected[:, :, 4:6] = band
    assert torch.equal(stored.tensor(), expected)


def test_split_ops_on_row_major_storage_and_fused_sums():
    """The same split layers with activations kept row-major give the plain layers' results, and the per-channel
    sums a convolution accumulates as it writes give the group norm's statistics of its output."""
    from ultragen.core.row_major import RowMajor

    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 8, 13, 11, generator=g, dtype=torch.float64)
    conv = torch.nn.Conv2d(8, 6, 3, padding=1).double()
    tiny = 2 * 8 * 11 * 2
    rows = RowMajor.of(x)
    sums = split_ops.ChannelSums()
    out = split_ops.conv3x3(rows, conv, band_elements=tiny, sums=sums)
    assert isinstance(out, RowMajor)
    full = conv(x)
    assert torch.allclose(out.tensor(), full, atol=1e-12)
    mean, rstd = sums.group_stats(3, 1e-6)
    ref = full.reshape(2, 3, -1)
    assert torch.allclose(mean.double(), ref.mean(-1), atol=1e-6)
    assert torch.allclose(rstd.double(), torch.rsqrt(ref.var(-1, unbiased=False) + 1e-6), rtol=1e-5)
    up = split_ops.upsample2_conv3x3(x, conv, tiny, alloc=RowMajor)  # a tensor in, host rows out
    assert isinstance(up, RowMajor)
    assert torch.allclose(up.tensor(), conv(torch.nn.functional.interpolate(x, scale_factor=2.0)), atol=1e-12)
    down = torch.nn.Conv2d(8, 6, 3, stride=2).double()
    assert torch.allclose(split_ops.pad_conv3x3_stride2(rows, down, tiny).tensor(),
                          down(torch.nn.functional.pad(x, (0, 1, 0, 1))), atol=1e-12)  # fmt: skip


def test_upsample_made_on_demand_and_the_one_pass_resnet_entry():
    """An upsample never stored (rows made as they are read, from a tensor or host rows), its sums, and a resnet
    block's first convolution with its 1x1 channel-changing shortcut in one pass: the plain layers' results."""
    from ultragen.core.row_major import RowMajor

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 8, 7, 5, generator=g, dtype=torch.float64)
    up_conv = torch.nn.Conv2d(8, 8, 3, padding=1).double()
    conv1 = torch.nn.Conv2d(8, 4, 3, padding=1).double()
    nin = torch.nn.Conv2d(8, 4, 1).double()
    norm = torch.nn.GroupNorm(2, 8, eps=1e-6).double()
    torch.nn.init.normal_(norm.weight, generator=g)
    full_up = up_conv(torch.nn.functional.interpolate(x, scale_factor=2.0))
    expected_h = conv1(torch.nn.functional.silu(norm(full_up)))
    expected_skip = nin(full_up)
    cpu = torch.device("cpu")
    for source in (x, RowMajor.of(x)):
        for tiny in (2 * 8 * 10 * 1, 2 * 8 * 10 * 3):  # bands of one and three rows
            up = split_ops.Upsampled(source, up_conv, cpu, tiny)
            assert up.shape == full_up.shape
            assert torch.allclose(up.compute_rows(3, 9), full_up[:, :, 3:9], atol=1e-12)
            sums = up.sums()
            assert torch.allclose(sums.total, full_up.sum((2, 3)), atol=1e-9)
            pre = split_ops.group_norm_silu(norm, sums.group_stats(2, 1e-6))
            h, skip = split_ops.conv3x3_with_shortcut(up, conv1, pre, nin, band_elements=tiny)
            assert torch.allclose(h if isinstance(h, torch.Tensor) else h.tensor(), expected_h, atol=1e-6)
            assert torch.allclose(skip if isinstance(skip, torch.Tensor) else skip.tensor(), expected_skip, atol=1e-12)
            assert isinstance(h, RowMajor) == isinstance(source, RowMajor)  # kept where the upsample's input is


def test_memory_the_system_will_not_pin_is_used_unpinned(monkeypatch, caplog):
    """cudaHostRegister refused (e.g. WSL's pinning limit): ordinary memory of the asked shape, CUDA's error cleared
    so that no later operation reports it, and one warning however often it happens."""
    from types import SimpleNamespace

    import ultragen.core.row_major as row_major

    cleared = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: SimpleNamespace(cudaHostRegister=lambda ptr, size, flags: 2))
    monkeypatch.setattr(row_major, "_clear_cuda_error", lambda: cleared.append(1))
    monkeypatch.setattr(row_major, "_warned", set())
    with caplog.at_level("WARNING"):
        for _ in range(2):
            t = row_major.pinned_empty((3, 4), torch.float16)
            assert t.shape == (3, 4) and t.dtype == torch.float16 and not t.is_pinned()
    assert cleared == [1, 1]
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "would not pin" in caplog.records[0].message


def test_the_callers_check_runs_before_every_band():
    """Cancel and progress reach into a layer: the check runs once per band (13 rows in bands of 2: 7 bands; the
    upsample's 26 output rows, twice as wide, in bands of 1), for each kind of split layer, with the fraction of the
    bands done."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 8, 13, 11, generator=g, dtype=torch.float64)
    conv = torch.nn.Conv2d(8, 8, 3, padding=1).double()
    two_rows = 8 * 11 * 2
    runs = ((lambda check: split_ops.conv3x3(x, conv, band_elements=two_rows, between_bands=check), 7),
            (lambda check: split_ops.group_stats(x, 4, 1e-6, two_rows, between_bands=check), 7),
            (lambda check: split_ops.upsample2_conv3x3(x, conv, two_rows, between_bands=check), 26))  # fmt: skip
    for run, bands in runs:
        seen = []
        run(seen.append)
        assert seen == [n / bands for n in range(bands)]
