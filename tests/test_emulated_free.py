"""bench/emulated_card.emulated_free: the free memory ComfyUI would read on an N-GiB card, from an H200's figures.
Checked against numbers worked by hand from measured H200 figures (2026-12-02, ComfyUI 0.29 with DynamicVRAM and
cudaMallocAsync, emulated 24 GB card: cap 23.5 GiB; CUDA context 0.58 GiB)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from emulated_card import emulated_free, host_weights_gib  # noqa: E402

G = 2**30
CARD, CAP = 24 * G, int(23.5 * G)


def test_a_fresh_card_is_its_size_less_the_context():
    # nothing allocated: CUDA says 0.58 GiB in use (the context)
    assert emulated_free(CARD, int(0.58 * G), 0, CAP, 0) == CARD - int(0.58 * G)


def test_live_tensors_are_occupied_and_freed_cached_blocks_are_free():
    # 18.5 GiB allocated, the pool reserved 18.53, CUDA 19.11 in use: 24 - 19.11 + 0.03 = 4.92 GiB free
    assert emulated_free(CARD, int(19.11 * G), int(0.03 * G), CAP, int(18.5 * G)) / G == pytest.approx(4.92, abs=1e-6)
    # 16 GiB of it freed, the pool keeps it: 24 - 19.11 + 16.03 = 20.92 GiB, within the cap's 23.5 - 2.5 = 21
    assert emulated_free(CARD, int(19.11 * G), int(16.03 * G), CAP, int(2.5 * G)) / G == pytest.approx(20.92, abs=1e-6)


def test_pool_slack_beyond_the_card_is_not_free():
    # The failing exact decode: 16.07 GiB in use, CUDA said the process held 63.3 GiB — the pool kept far more than
    # a 24 GB card could hold. Reading the cap less the reserved memory plus the slack said > 16 GiB free;
    # the card has at most 24 - 16.07 - 0.58 = 7.35 GiB, and the cap leaves 23.5 - 16.07 = 7.43.
    slack = int(63.3 * G) - int(16.07 * G) - int(0.58 * G) - int(22.2 * G)  # less the live tensors, context, weights
    free = emulated_free(CARD, int(63.3 * G), slack, CAP, int(16.07 * G))
    assert free < 16 * G
    assert free <= CARD - int(16.07 * G) - int(0.58 * G)


def test_never_negative():
    assert emulated_free(CARD, 30 * G, 0, CAP, 20 * G) == 0


def test_host_weights_count_parameters_in_host_memory_only():
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(1024, 256), torch.nn.Linear(256, 512, bias=False, device="meta"))
    model[0].to(torch.bfloat16)
    # host: 1024 x 256 weight + 256 bias in bf16 = 524,800 bytes; the meta layer holds no memory anywhere
    host, pinned = host_weights_gib(model)
    assert host * G == pytest.approx(524_800) and pinned == 0.0  # nothing page-locked here
