"""A Triton kernel that fails on a GPU (it cannot compile or launch there): the first failure is warned once,
PyTorch's operations compute the same values from then on, and the kernel is not tried again. Simulated on each
elementwise kernel's dispatch (the exact VAE's softmax kernels: tests/test_softmax_rows.py); references are the
formulas, computed here in float64."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from ultragen.kernels import gelu, rope, silu_gate
from ultragen.kernels.rope import RopeInputError


def failing(calls: list):
    def kernel(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("simulated compile error")

    return kernel


def rope_case(monkeypatch, calls):
    monkeypatch.setattr(rope, "triton_runs_on", lambda device: True)
    monkeypatch.setattr(rope, "_rope_triton", failing(calls))
    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(1, 2, 7, 8, generator=g) for _ in range(2))
    theta = torch.rand(1, 1, 7, 4, generator=g, dtype=torch.float64) * 7
    cos, sin = theta.cos(), theta.sin()
    table = torch.stack([cos, -sin, sin, cos], dim=-1).reshape(*theta.shape, 2, 2).float()

    def turned(x):  # each channel pair (a, b) turned by its angle: (a cos - b sin, a sin + b cos)
        a, b = x.double().reshape(*x.shape[:-1], -1, 2).unbind(-1)
        return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).reshape(x.shape)

    return (lambda: torch.cat(rope.apply_rope(q, k, table))), torch.cat([turned(q), turned(k)]), rope.GUARD


def gelu_case(monkeypatch, calls):
    monkeypatch.setattr(gelu, "kernel_takes", lambda x: True)
    monkeypatch.setattr(gelu, "triton_gelu_tanh_", failing(calls))
    x = torch.randn(5, 300, generator=torch.Generator().manual_seed(2))
    d = x.double()
    expected = 0.5 * d * (1 + torch.tanh(math.sqrt(2 / math.pi) * (d + 0.044715 * d**3)))
    return (lambda: gelu.gelu_tanh_(x.clone())), expected, gelu.GUARD


def silu_gate_case(monkeypatch, calls):
    monkeypatch.setattr(silu_gate, "triton_runs_on", lambda device: True)
    monkeypatch.setattr(silu_gate, "triton_silu_gate", failing(calls))
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(3))
    x1, x2 = x.double().chunk(2, -1)
    return (lambda: silu_gate.silu_gate(x)), x1 * torch.sigmoid(x1) * x2, silu_gate.GUARD


@pytest.mark.kernel_failure
@pytest.mark.parametrize("case", [rope_case, gelu_case, silu_gate_case], ids=["rope", "gelu", "silu_gate"])
def test_a_failing_kernel_warns_once_and_pytorch_computes_the_same(case, monkeypatch, caplog):
    calls = []
    run, expected, guard = case(monkeypatch, calls)
    with caplog.at_level(logging.WARNING, logger="UltraGen"):
        for _ in range(2):
            out = run()
            assert (out.double() - expected).abs().max().item() <= 1e-6 * expected.abs().max().item()
    assert calls == [1], "the kernel is tried once"
    assert not guard.usable and caplog.text.count("simulated compile error") == 1


@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError("simulated"), RopeInputError("simulated")])
def test_out_of_memory_and_input_errors_are_not_kernel_failures(error, monkeypatch):
    """Out of memory (a smaller size or a card with room is the answer) and the pack's own input errors (what the
    caller must change) are raised, not hidden by PyTorch's path, and the kernel stays in use."""

    def raising(x):
        raise error

    monkeypatch.setattr(silu_gate, "triton_runs_on", lambda device: True)
    monkeypatch.setattr(silu_gate, "triton_silu_gate", raising)
    with pytest.raises(type(error)):
        silu_gate.silu_gate(torch.randn(2, 8))
    assert silu_gate.GUARD.usable


@pytest.mark.kernel_failure
def test_a_failing_attention_kernel_hands_auto_to_the_next_backend(monkeypatch, caplog):
    """``auto`` on a GPU where the block-sparse kernel fails: the next backend computes the masked attention of the
    rules (dense reference), one warning, the kernel not tried again; asked for by name, it says why it cannot."""
    from ultragen.kernels import AttentionInputError, sparse_attention, triton_block_sparse

    from layouts import NAMED
    from reference import dense_mask, masked_attention

    if triton_block_sparse.triton is None:
        pytest.skip("Triton is not installed")
    calls = []
    monkeypatch.setattr(triton_block_sparse, "AUTO_DEVICES", None)  # "auto" may pick it for these CPU tensors
    monkeypatch.setattr(triton_block_sparse, "interpreting", lambda: True)
    monkeypatch.setattr(triton_block_sparse, "run", failing(calls))
    layout = NAMED["guidance-global"]
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, layout.seq_len, 32, generator=g) for _ in range(3))
    expected = masked_attention(q, k, v, dense_mask(layout))
    with caplog.at_level(logging.WARNING, logger="UltraGen"):
        for _ in range(2):
            assert (sparse_attention(q, k, v, layout) - expected).abs().max().item() <= 1e-5
    assert calls == [1] and caplog.text.count("simulated compile error") == 1
    with pytest.raises(AttentionInputError, match="failed on this GPU .*simulated compile error"):
        sparse_attention(q, k, v, layout, backend="triton")
