"""Query-chunked one-head attention against PyTorch's own scaled_dot_product_attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ultragen.core import long_attention


@pytest.mark.parametrize("length,budget", [(37, 1), (300, 10 * 300 * 7), (300, 10 * 300 * 128)])
def test_chunked_attention_equals_sdpa(length, budget):
    """Chunks of 1, 7 and 128 query rows (the last chunk short), batch 2, a 48-wide head: SDPA's result."""
    g = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(2, length, 48, generator=g) * 2 for _ in range(3))
    expected = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
    out = long_attention.attention(q, k, v, budget)
    assert (out - expected).abs().max().item() <= 1e-5


def test_rows_per_chunk_by_hand():
    assert long_attention.query_rows(1000, 10 * 1000 * 300) == 256  # 300 fit: whole tiles of 128
    assert long_attention.query_rows(1000, 10 * 1000 * 100) == 100
    assert long_attention.query_rows(1000, 1) == 1
    assert long_attention.query_rows(50, 10**12) == 50


def test_half_precision_needs_float32_scores():
    """bf16 on a CPU: torch.mm cannot write float32 scores there, so the VAE keeps ComfyUI's own attention."""
    assert long_attention.can_run(torch.zeros(1, 2, 2))
    assert not long_attention.can_run(torch.zeros(1, 2, 2, dtype=torch.bfloat16))
