"""FLUX.2's MLP gate in one pass (kernels/silu_gate.py) against ComfyUI's SiLUActivation formula in float64."""

import pytest
import torch

from ultragen.kernels import silu_gate as module
from ultragen.kernels.silu_gate import can_take, silu_gate, triton_silu_gate

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference(x: torch.Tensor) -> torch.Tensor:
    """ComfyUI's ``SiLUActivation``: ``x1, x2 = x.chunk(2, -1); silu(x1) * x2``, in float64."""
    x1, x2 = x.double().chunk(2, dim=-1)
    return x1 * torch.sigmoid(x1) * x2


@pytest.mark.filterwarnings("error:overflow encountered:RuntimeWarning")  # the kernel's sigmoid never overflows
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1, 37, 3000), (2, 5, 2050), (3, 1, 2)])
def test_kernel_matches_the_gate(shape, dtype):
    """Halves wider than a tile (1500 = 1024 + 476), narrower, and one column; rows past a 4-row tile."""
    if module.triton is None:
        pytest.skip("Triton is not installed")
    x = (torch.randn(*shape, generator=torch.Generator().manual_seed(shape[-1])) * 4).to(DEVICE, dtype)
    x[..., 0] = -200.0  # exp(200) would overflow float32
    before = x.clone()
    out = triton_silu_gate(x)  # the kernel, also under Triton's CPU interpreter
    assert out.shape == (*shape[:-1], shape[-1] // 2) and out.dtype == dtype and out.is_contiguous()
    expected = reference(x)
    step = 1e-6 if dtype == torch.float32 else 2**-10  # float16: the one rounding of the float32 result
    assert ((out.double() - expected).abs() <= step * expected.abs().clamp(min=1)).all()
    assert torch.equal(x, before)  # the input is only read


def test_a_column_slice_is_read_through_its_row_stride():
    """A (tokens, 2F) slice of a wider tensor (as a fused projection's part would be)."""
    if module.triton is None:
        pytest.skip("Triton is not installed")
    wide = torch.randn(9, 70, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    x = wide[:, 10:50]
    assert can_take(x)
    assert (triton_silu_gate(x).double() - reference(x)).abs().max().item() <= 1e-6


def test_what_the_kernel_does_not_take_goes_to_pytorch(monkeypatch):
    """An odd width, a tensor autograd records, a dtype the kernel does not write, and a machine without Triton:
    PyTorch's two operations, ComfyUI's values."""
    x = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    assert not can_take(x) and not can_take(torch.randn(2, 5))
    assert not can_take(torch.randn(2, 6, requires_grad=True))
    torch.testing.assert_close(silu_gate(x), reference(x), rtol=1e-12, atol=0)
    monkeypatch.setattr(module, "triton_runs_on", lambda device: False)
    y = torch.randn(2, 8, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(silu_gate(y).double(), reference(y), rtol=1e-6, atol=1e-7)


def test_bf16_is_within_one_rounding_on_the_gpu():
    if module.triton is None or DEVICE != "cuda":
        pytest.skip("Triton's interpreter truncates float32 -> bf16 (GPUs round to nearest); checked on the GPU")
    x = (torch.randn(300, 2 * 4096, generator=torch.Generator().manual_seed(6)) * 4).to(DEVICE, torch.bfloat16)
    expected = reference(x)
    out = silu_gate(x).double()
    assert ((out - expected).abs() <= expected.abs() * 2**-8 + 1e-30).all()  # half a bf16 step, rounded once
