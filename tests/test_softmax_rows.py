"""Scaled softmax over long float32 rows (kernels/softmax_rows.py) against PyTorch's softmax in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ultragen.core import long_attention
from ultragen.kernels import softmax_rows
from ultragen.kernels.softmax_rows import triton_softmax_rows

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference(scores: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.softmax(scores.double() * scale, dim=-1)


# Under Triton's CPU interpreter exp(-inf - -inf) is evaluated (and discarded by tl.where) in NumPy, which warns.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("rows,n", [(3, 10_000), (2, 4096), (1, 1), (5, 4097)])
def test_kernel_matches_the_softmax_in_float32(rows, n):
    """Rows longer than a block, exactly one block, one column, one block and one column."""
    if softmax_rows.triton is None:
        pytest.skip("Triton is not installed")
    g = torch.Generator().manual_seed(n)
    scores = (torch.randn(rows, n, generator=g) * 30).to(DEVICE)  # scaled scores up to ~10: exp spans e^20
    out = triton_softmax_rows(scores, 512**-0.5, torch.float32)  # the kernel, also under Triton's CPU interpreter
    expected = reference(scores, 512**-0.5)
    assert out.dtype == torch.float32 and out.shape == (rows, n)
    assert (out.double() - expected).abs().max().item() <= 1e-6 * expected.max().item()
    ones = torch.ones(rows, dtype=torch.float64, device=out.device)
    torch.testing.assert_close(out.double().sum(-1), ones, rtol=0, atol=1e-5)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_masked_scores_get_no_probability():
    """-inf scores (a lane that meets only -inf for a while, then a value) give 0, the others PyTorch's."""
    if softmax_rows.triton is None:
        pytest.skip("Triton is not installed")
    scores = torch.randn(2, 9000, generator=torch.Generator().manual_seed(3))
    scores[0, :5000] = -torch.inf
    scores[1, 4096:] = -torch.inf
    out = triton_softmax_rows(scores.to(DEVICE), 0.5, torch.float32).cpu()
    assert torch.equal(out[0, :5000], torch.zeros(5000)) and torch.equal(out[1, 4096:], torch.zeros(9000 - 4096))
    assert (out.double() - reference(scores, 0.5)).abs().max().item() <= 1e-6


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("top", [-torch.inf, 0.5, 40.0])
def test_one_key_chunk_of_the_online_softmax(top):
    """exp_rows by hand: the new running maximum (the old one, or the chunk's scaled maximum), the probabilities
    against it and their float32 sums — first chunk (top -inf), a chunk below and one above the running maximum."""
    if softmax_rows.triton is None:
        pytest.skip("Triton is not installed")
    scores = torch.randn(3, 9000, generator=torch.Generator().manual_seed(8)) * 30
    running = torch.tensor([[top], [top], [-torch.inf]])
    probs, new_top, sums = softmax_rows.triton_exp_rows(scores.to(DEVICE), 0.3, running.to(DEVICE), torch.float32)
    scaled = scores * 0.3  # float32, as the kernel scales them
    expected_top = torch.maximum(running, scaled.amax(-1, keepdim=True))  # a maximum: exact
    expected = torch.exp(scaled.double() - expected_top.double())
    assert torch.equal(new_top.cpu(), expected_top)
    torch.testing.assert_close(probs.cpu().double(), expected, rtol=1e-5, atol=1e-30)  # x - m rounded in float32
    torch.testing.assert_close(sums.cpu().double(), expected.sum(-1, keepdim=True), rtol=1e-5, atol=0)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("length,budget,kernel", [(700, 8 * 700 * 700, "softmax_rows"),
                                                  (700, 8 * 700 * 128, "softmax_rows"),
                                                  (1500, 8 * 1024 * 100, "exp_rows")])  # fmt: skip
def test_attention_through_the_kernels_equals_sdpa(length, budget, kernel, monkeypatch):
    """The attention with the kernels in its path (forced; on a CPU under the interpreter; float32 values: 8 bytes a
    score): all rows at once, 128 whole rows a chunk, and 1024 rows against 100 keys at a time; PyTorch's SDPA
    result."""
    if softmax_rows.triton is None:
        pytest.skip("Triton is not installed")
    monkeypatch.setattr(softmax_rows, "can_run", lambda scores, dtype: True)
    monkeypatch.setattr(softmax_rows, "can_run_on", lambda device, dtype: True)
    calls = []
    real = getattr(softmax_rows, f"triton_{kernel}")
    monkeypatch.setattr(softmax_rows, f"triton_{kernel}", lambda *args: calls.append(1) or real(*args))
    g = torch.Generator().manual_seed(9)
    q, k, v = ((torch.randn(1, length, 48, generator=g) * 2).to(DEVICE) for _ in range(3))
    expected = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
    out = long_attention.attention(q, k, v, budget)
    assert (out - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()
    assert calls and softmax_rows.GUARD.usable  # the kernel of that path ran, and did not fall back


def test_without_cuda_pytorch_computes_it():
    """On a CPU the dispatch takes PyTorch's softmax (the kernel is for CUDA) and keeps 10 bytes a score."""
    scores = torch.randn(4, 300, generator=torch.Generator().manual_seed(4))
    expected = reference(scores, 0.1).to(torch.bfloat16)
    if DEVICE == "cpu":
        assert not softmax_rows.can_run(scores, torch.bfloat16)
        assert long_attention.score_bytes(scores, scores.bfloat16()) == long_attention.BYTES_PER_SCORE
    assert torch.equal(softmax_rows.softmax_rows(scores.clone(), 0.1, torch.bfloat16), expected)


@pytest.mark.kernel_failure
def test_a_kernel_that_fails_falls_back_once_with_a_warning(monkeypatch, caplog):
    """A Triton that cannot compile the kernel on some GPU: PyTorch's operations in the scores' memory, the same
    values, one warning, and the kernel not tried again."""
    calls = []

    def failing(*args):
        calls.append(1)
        raise RuntimeError("simulated compile error")

    monkeypatch.setattr(softmax_rows, "can_run", lambda scores, dtype: softmax_rows.GUARD.usable)
    monkeypatch.setattr(softmax_rows, "triton_softmax_rows", failing)
    scores = torch.randn(3, 500, generator=torch.Generator().manual_seed(7)) * 30
    for _ in range(2):
        out = softmax_rows.softmax_rows(scores.clone(), 0.2, torch.float32)
        assert (out.double() - reference(scores, 0.2)).abs().max().item() <= 1e-6
    assert len(calls) == 1 and "simulated compile error" in caplog.text


@pytest.mark.skipif(DEVICE != "cuda" or softmax_rows.triton is None, reason="needs a CUDA GPU with Triton")
def test_bf16_probabilities_are_rounded_once_on_the_gpu():
    """On a GPU: bf16 output within one bf16 step of the float64 softmax (rounded once, from float32); the
    attention's chunks then take 6 bytes a score (float32 scores, bf16 probabilities)."""
    scores = torch.randn(128, 300_000, device="cuda", generator=torch.Generator(device="cuda").manual_seed(5)) * 30
    assert softmax_rows.can_run(scores, torch.bfloat16)
    out = softmax_rows.softmax_rows(scores, 512**-0.5, torch.bfloat16)
    expected = reference(scores, 512**-0.5)
    assert ((out.double() - expected).abs() <= expected.abs() * 2**-7 + 1e-30).all()  # within one bf16 step
    v = torch.zeros(1, 1, 8, device="cuda", dtype=torch.bfloat16)
    assert long_attention.score_bytes(v, v) == 6
    assert long_attention.chunk_shape(1024 * 1024, 2 << 30, 6) == (256, 1024 * 1024)  # 8192^2: 341 rows fit


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU")
def test_whole_rows_through_the_kernel_match_sdpa_on_the_gpu():
    """The VAE's case on a GPU (bf16, a 512-wide head, whole rows): as close to float32 as PyTorch's own bf16 SDPA."""
    g = torch.Generator(device="cuda").manual_seed(6)
    q, k, v = (torch.randn(1, 20_000, 512, generator=g, device="cuda") for _ in range(3))
    exact = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
    half = [t.bfloat16() for t in (q, k, v)]
    ours = long_attention.attention(*half, budget_bytes=6 * 20_000 * 300)  # chunks of 256 whole rows
    sdpa = F.scaled_dot_product_attention(*(t[:, None] for t in half))[:, 0]
    assert (ours.float() - exact).abs().max().item() <= 1.5 * (sdpa.float() - exact).abs().max().item() + 1e-3
