"""Kernel launches past CUDA's grid limits, and attention written over its own q (the chunked blocks' buffer).

References: CUDA's grid limits (axis 0 up to 2^31 - 1 programs, axes 1 and 2 up to 65,535) against
each launcher's computed grid at the token counts of 16384^2 and 32768^2 images; a dense masked
attention built from the rules (``reference.py``) for the in-place output.
"""

from __future__ import annotations

import pytest
import torch

from ultragen.kernels import sparse_attention
from ultragen.kernels.gelu import gelu_launch_grid
from ultragen.kernels.rope import rope_launch_grid
from ultragen.kernels.triton_block_sparse import attention_launch_grid

from layouts import NAMED
from reference import dense_mask, masked_attention

AXIS0, OTHER_AXES = 2**31 - 1, 65_535
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def fits(grid: tuple[int, ...]) -> bool:
    return grid[0] <= AXIS0 and all(n <= OTHER_AXES for n in grid[1:])


@pytest.mark.parametrize("pixels", [16384, 32768])
def test_every_launch_grid_fits_at_huge_images(pixels):
    tokens = (pixels // 16) ** 2 + 512 + (pixels // 64) ** 2  # image + text + guidance, FLUX.1
    assert tokens > 65_535 * 16  # past axis 1's limit even in blocks of 16 tokens
    batch, heads, hidden = 2, 24, 3072
    assert fits(rope_launch_grid(batch, heads // 8, tokens, 16))
    assert fits(attention_launch_grid(-(-tokens // 128), batch, heads))
    assert fits(gelu_launch_grid(batch * tokens, 4 * hidden))
    # The launchers put the token count on axis 0: it alone grows with the image.
    assert rope_launch_grid(batch, 3, tokens, 16)[0] == 3 * -(-tokens // 16)
    assert attention_launch_grid(-(-tokens // 128), batch, heads) == (-(-tokens // 128), batch * heads)


@pytest.mark.parametrize("backend", ["triton", "portable"])
def test_attention_written_over_q_of_a_qkv_buffer(backend):
    """q, k, v as (B, H, L, D) views of one (B, L, 3, H, D) buffer and the output written over q, as the
    chunked blocks call it: each program reads its q tile before writing the same rows."""
    layout = NAMED["guidance-local"]
    g = torch.Generator().manual_seed(4)
    buf = torch.randn(2, layout.seq_len, 3, 3, 32, generator=g).to(DEVICE)
    q, k, v = (buf[:, :, i].transpose(1, 2) for i in range(3))
    expected = masked_attention(q.cpu(), k.cpu(), v.cpu(), dense_mask(layout))
    with torch.inference_mode():
        out = sparse_attention(q, k, v, layout, backend=backend, out=q)
    assert out.data_ptr() == q.data_ptr()
    assert (buf[:, :, 0].transpose(1, 2).cpu() - expected).abs().max().item() <= 2e-5
    assert torch.equal(buf[:, :, 1].transpose(1, 2), k) and torch.equal(buf[:, :, 2].transpose(1, 2), v)
