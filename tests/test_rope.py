"""RoPE on q and k (kernels/rope.py) against rotations of complex numbers, worked independently.

The reference rotates each channel pair (x[2i], x[2i+1]) as the complex number
x[2i] + i x[2i+1] by its angle, with ``torch.polar``; the table under test is FLUX's
(B, 1, L, D/2, 2, 2) matrix form [[cos, -sin], [sin, cos]] of the same angles.
"""

import pytest
import torch

from ultragen.kernels import rope
from ultragen.kernels.rope import RopeInputError, apply_rope

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def angles(batch, length, dim, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 1, length, dim // 2, generator=gen, dtype=torch.float64) * 7


def flux_table(theta: torch.Tensor) -> torch.Tensor:
    cos, sin = theta.cos(), theta.sin()
    return torch.stack([cos, -sin, sin, cos], dim=-1).reshape(*theta.shape, 2, 2).float()


def rotated(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    pairs = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(pairs * torch.polar(torch.ones_like(theta), theta)).reshape(x.shape)


def qk(batch, heads, length, dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, length, dim, generator=g).to(DEVICE, dtype) for _ in range(2)]


@pytest.mark.parametrize(
    "batch,table_batch,heads,length,dim",
    [(1, 1, 2, 70, 32), (2, 1, 3, 33, 48), (2, 2, 1, 5, 128), (1, 1, 2, 129, 16)],
)
@pytest.mark.parametrize("path", ["triton", "chunked"])
def test_rope_matches_complex_rotation(path, batch, table_batch, heads, length, dim, monkeypatch):
    if path == "chunked":
        monkeypatch.setattr(rope, "triton_runs_on", lambda device: False)  # the path of machines without Triton
        monkeypatch.setattr(rope, "CHUNK_TOKENS", 16)
    elif rope.triton is None:
        pytest.skip("Triton is not installed")
    theta = angles(table_batch, length, dim, seed=dim)
    q, k = qk(batch, heads, length, dim, torch.float32)
    q_out, k_out = apply_rope(q, k, flux_table(theta).to(DEVICE))
    for x, out in ((q, q_out), (k, k_out)):
        assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous()
        assert (out.cpu().double() - rotated(x.cpu(), theta)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("path", ["triton", "chunked"])
@pytest.mark.parametrize("in_place", [False, True])
def test_rope_writes_into_a_qkv_buffers_slots(path, in_place, monkeypatch):
    """``out``: q's and k's slots of a (B, L, 3, H, D) buffer (the chunked blocks' layout) get the rotation,
    v's slot is untouched; ``in_place``: the inputs are those slots themselves."""
    if path == "chunked":
        monkeypatch.setattr(rope, "triton_runs_on", lambda device: False)
        monkeypatch.setattr(rope, "CHUNK_TOKENS", 16)
    elif rope.triton is None:
        pytest.skip("Triton is not installed")
    batch, heads, length, dim = 2, 3, 37, 32
    theta = angles(1, length, dim, seed=5)
    buffer = torch.randn(batch, length, 3, heads, dim, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    before = buffer.clone()
    slots = buffer[:, :, 0].transpose(1, 2), buffer[:, :, 1].transpose(1, 2)  # (B, H, L, D) views
    q, k = slots if in_place else (before[:, :, 0].transpose(1, 2).clone(), before[:, :, 1].transpose(1, 2).clone())
    returned = apply_rope(q, k, flux_table(theta).to(DEVICE), out=slots)
    assert returned[0].data_ptr() == slots[0].data_ptr() and returned[1].data_ptr() == slots[1].data_ptr()
    for i in (0, 1):
        expected = rotated(before[:, :, i].transpose(1, 2).cpu(), theta)
        assert (buffer[:, :, i].transpose(1, 2).cpu().double() - expected).abs().max().item() <= 1e-5
    assert torch.equal(buffer[:, :, 2], before[:, :, 2])


@pytest.mark.parametrize("path", ["triton", "chunked"])
@pytest.mark.parametrize("eps", [1e-6, 0.0078125])
def test_rope_normalises_q_and_k_in_its_pass(path, eps, monkeypatch):
    """``norm``: each head's row RMS-normalised (FLUX's QK-norm: x * rsqrt(mean(x^2) + eps) * weight, q's and k's
    own weights) before the rotation, in place in a q/k/v buffer, against the formula in float64; rows of mean
    square ~1e-6 and ~1, so eps shows (FLUX.1 on ComfyUI 0.3.64: 1e-6; bf16's epsilon on 0.29)."""
    from ultragen.kernels.rope import QKNorm

    if path == "chunked":
        monkeypatch.setattr(rope, "triton_runs_on", lambda device: False)
    elif rope.triton is None:
        pytest.skip("Triton is not installed")
    batch, heads, length, dim = 1, 2, 21, 32
    theta = angles(1, length, dim, seed=8)
    g = torch.Generator().manual_seed(9)
    buffer = torch.randn(batch, length, 3, heads, dim, generator=g)
    buffer[:, ::2] *= 1e-3  # every other token: mean square ~1e-6
    buffer = buffer.to(DEVICE)
    before = buffer.clone()
    weights = [torch.rand(dim, generator=g).add(0.5).to(DEVICE) for _ in range(2)]
    slots = buffer[:, :, 0].transpose(1, 2), buffer[:, :, 1].transpose(1, 2)
    apply_rope(*slots, flux_table(theta).to(DEVICE), out=slots, norm=QKNorm(*weights, eps))
    for i, weight in ((0, weights[0]), (1, weights[1])):
        x = before[:, :, i].transpose(1, 2).cpu().double()
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.cpu().double()
        expected = rotated(normed, theta)
        assert (buffer[:, :, i].transpose(1, 2).cpu().double() - expected).abs().max().item() <= 1e-5
    assert torch.equal(buffer[:, :, 2], before[:, :, 2])


def test_rope_says_what_outputs_do_not_fit():
    q, k = qk(1, 2, 8, 16, torch.float32)
    table = flux_table(angles(1, 8, 16, seed=1)).to(DEVICE)
    with pytest.raises(RopeInputError, match="one layout and unit channel stride"):
        apply_rope(q, k, table, out=(torch.empty_like(q), torch.empty_like(q).transpose(2, 3).contiguous().mT))
    with pytest.raises(RopeInputError, match="like q"):
        apply_rope(q, k, table, out=(torch.empty_like(q).double(), torch.empty_like(q).double()))


@pytest.mark.parametrize("path", ["triton", "chunked"])
def test_rope_reads_strided_inputs_and_rounds_once_to_bf16(path, monkeypatch):
    """FLUX's single blocks hand q and k over as permuted views; bf16 output is the float32 result rounded."""
    if path == "chunked":
        monkeypatch.setattr(rope, "triton_runs_on", lambda device: False)
    elif rope.triton is None or DEVICE != "cuda":
        pytest.skip("Triton's interpreter truncates float32 -> bf16 (GPUs round to nearest); checked on the GPU")
    length, heads, dim = 40, 2, 32
    theta = angles(1, length, dim, seed=3)
    fused = torch.randn(1, length, 3, heads, dim, generator=torch.Generator().manual_seed(1)).to(DEVICE, torch.bfloat16)
    q, k, _ = fused.permute(2, 0, 3, 1, 4)  # (B, H, L, D) views with the token stride of the fused layout
    q_out, k_out = apply_rope(q, k, flux_table(theta).to(DEVICE))
    for x, out in ((q, q_out), (k, k_out)):
        exact = rotated(x.cpu(), theta)
        assert ((out.cpu().double() - exact).abs() <= exact.abs() * 2**-8 + 1e-6).all()


def test_rope_is_differentiable_where_autograd_records():
    theta = angles(1, 9, 16, seed=5)
    table = flux_table(theta)
    q, k = (t.cpu().requires_grad_() for t in qk(1, 2, 9, 16, torch.float32))
    q_out, k_out = apply_rope(q, k, table)
    (q_out.square().sum() + 3 * k_out.sum()).backward()
    q_ref, k_ref = (t.detach().clone().requires_grad_() for t in (q, k))
    (rotated(q_ref, theta).square().sum() + 3 * rotated(k_ref, theta).sum()).backward()
    assert torch.allclose(q.grad.double(), q_ref.grad.double(), atol=1e-5)
    assert torch.allclose(k.grad.double(), k_ref.grad.double(), atol=1e-5)


@pytest.mark.parametrize(
    "q_shape,k_shape,table_shape,message",
    [
        ((1, 2, 8, 16), (1, 2, 9, 16), (1, 1, 8, 8, 2, 2), "one shape"),
        ((1, 2, 8, 16), (1, 2, 8, 16), (1, 1, 7, 8, 2, 2), "rotary table must be"),
        ((2, 2, 8, 16), (2, 2, 8, 16), (3, 1, 8, 8, 2, 2), "rotary table must be"),
        ((1, 2, 8, 15), (1, 2, 8, 15), (1, 1, 8, 7, 2, 2), "rotary table must be"),
    ],
)
def test_rope_says_what_does_not_fit(q_shape, k_shape, table_shape, message):
    with pytest.raises(RopeInputError, match=message):
        apply_rope(torch.zeros(q_shape), torch.zeros(k_shape), torch.zeros(table_shape))


@pytest.mark.parametrize("pixels", [16384, 32768])
def test_grid_fits_cudas_limits_past_8k(pixels):
    """The launch grid at 16384^2 and 32768^2 (FLUX: 16 px a token; guidance at ratio 4, 512 text tokens):
    axis 0 holds every (head group, token block), up to 2^31 - 1; axis 1 (batch) stays far below 65,535."""
    tokens = (pixels // 16) ** 2
    length = 512 + tokens + tokens // 16
    grid = rope.rope_launch_grid(batch=2, groups=3, length=length, block_l=16)
    assert grid == (3 * -(-length // 16), 2)
    assert grid[0] < 2**31 and grid[1] <= 65535
    assert -(-length // 16) > 65535  # the old layout (token blocks on axis 1) could not launch this
