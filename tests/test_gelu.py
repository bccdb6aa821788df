"""In-place tanh GELU over row-strided views (kernels/gelu.py) against PyTorch's nn.GELU."""

import pytest
import torch

from ultragen.kernels import gelu
from ultragen.kernels.gelu import gelu_tanh_, triton_gelu_tanh_
from ultragen.kernels.row_tiles import row_layout

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def fused_rows(batch, tokens, width, start, dtype, seed=0):
    """A (batch, tokens, width - start) column slice of a (batch, tokens, width) tensor, as FLUX's mlp."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, tokens, width, generator=g) * 4).to(DEVICE, dtype)[:, :, start:]


# Under Triton's CPU interpreter, sigmoid(2u) = 1 / (1 + exp(-2u)) evaluates exp in NumPy, which warns when
# it overflows to inf for large negative inputs; 1 / inf = 0 is the right value there (as on a GPU, silently).
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("batch,tokens,width,start", [(1, 37, 1500, 300), (2, 5, 2100, 51), (3, 1, 9, 0)])
def test_gelu_in_place_matches_pytorch_in_float32(batch, tokens, width, start):
    if gelu.triton is None:
        pytest.skip("Triton is not installed")
    x = fused_rows(batch, tokens, width, start, torch.float32)
    base = x._base.clone()
    expected = torch.nn.GELU(approximate="tanh")(x)
    out = triton_gelu_tanh_(x)  # the kernel, also under Triton's CPU interpreter
    assert out.data_ptr() == x.data_ptr()
    assert (x - expected).abs().max().item() <= 2e-6 * max(1.0, expected.abs().max().item())
    assert torch.equal(x._base[:, :, :start], base[:, :, :start])  # the columns before the slice are untouched


def test_gelu_in_place_is_within_one_bf16_rounding_of_pytorch():
    if gelu.triton is None or DEVICE != "cuda":
        pytest.skip("Triton's interpreter truncates float32 -> bf16 (GPUs round to nearest); checked on the GPU")
    x = fused_rows(2, 300, 4096, 1024, torch.bfloat16)
    exact = torch.nn.functional.gelu(x.double(), approximate="tanh")
    pytorch = torch.nn.GELU(approximate="tanh")(x).double()
    gelu_tanh_(x)  # the kernel on CUDA
    step = exact.abs() * 2**-7  # one bf16 rounding step (at most)
    # Below 1e-6 in magnitude (x under about -5) both float32 formulas lose relative accuracy:
    # PyTorch's 0.5 x (1 + tanh(u)) cancels, the GPU's fast exp in the sigmoid is approximate.
    ours = (x.double() - exact).abs() - step
    assert (ours <= 1e-6).all(), f"worst excess {ours.max().item():.3g}"
    theirs = (pytorch - exact).abs() - step
    assert (theirs <= 1e-6).all() and ((x.double() - pytorch).abs() <= 2 * step + 1e-6).all()


def test_views_that_do_not_fold_into_rows_use_pytorch():
    x = torch.randn(4, 6, 8)
    assert row_layout(x[:, :, 2:]) == (24, 6, 8)
    assert row_layout(x.transpose(0, 1)) is None  # leading dims out of order
    assert row_layout(x[:, :, ::2]) is None  # columns not unit-stride
    y = x.transpose(0, 1)
    expected = torch.nn.functional.gelu(y, approximate="tanh")
    assert torch.equal(gelu_tanh_(y), expected)
