"""Kernel launches past CUDA's grid limits, and attention written over its own q (the chunked blocks' buffer).

References: CUDA's grid limits (axis 0 up to 2^31 - 1 programs, axes 1 and 2 up to 65,535) against
each launcher's computed grid at the token counts of 16384^2 and 32768^2 images; a dense masked
attention built from the rules (``reference.py``) for the in-place output.
"""

from __future__ import annotations

import pytest
import torch

from ultragen.kernels import sparse_attention
from ultragen.kernels.rope import rope_launch_grid
from ultragen.kernels.row_tiles import row_tile_grid
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
    assert fits(row_tile_grid(batch * tokens, 4 * hidden))  # the GELU's
    assert fits(row_tile_grid(batch * tokens, 3 * 4096))  # FLUX.2 dev / klein 9B: MLP halves of 3 hidden
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


# Shared memory one block may opt into, by GPU (NVIDIA's CUDA C++ Programming Guide, "Technical Specifications
# per Compute Capability"): the limit a kernel's tiles must fit, or the launch fails on the artist's card.
GPUS = {
    "A100 (sm_80)": ((8, 0), 166_912),
    "RTX 3060-3090, A6000 (sm_86)": ((8, 6), 101_376),
    "RTX 4060-4090, L40 (sm_89)": ((8, 9), 101_376),
    "H100 / H200 (sm_90)": ((9, 0), 232_448),
    "B200 (sm_100)": ((10, 0), 232_448),
    "RTX 5060-5090, RTX PRO 6000 (sm_120)": ((12, 0), 101_376),
}


def compiled_shared_bytes(builds: list[tuple[tuple[int, int], int, tuple]]) -> list[int]:
    """The block-sparse kernel compiled (on this machine: no GPU needed) for each (GPU capability, head_dim,
    launch configuration): the shared memory each asks for. In a process of its own, since the tests run
    Triton's interpreter, whose kernels cannot be compiled."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("compile_shared.py")
    done = subprocess.run([sys.executable, str(script), json.dumps(builds)], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_attention_tiles_fit_each_gpus_shared_memory(monkeypatch):
    """The launch configuration chosen for each kind of GPU, compiled for it, fits its shared memory (the
    H200-tuned 128x128 TMA tiles need ~176 KB: an RTX 5090, compute capability 12, gives 99 KB); Hopper-class
    GPUs keep the tuned tiles."""
    from types import SimpleNamespace

    pytest.importorskip("triton")
    from ultragen.kernels import triton_block_sparse as tbs

    builds, limits, tuned = [], [], {}
    for gpu, (capability, optin) in GPUS.items():
        props = SimpleNamespace(major=capability[0], minor=capability[1], shared_memory_per_block_optin=optin)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None, props=props: props)
        for head_dim in (128, 64):  # FLUX's, and a smaller head
            builds.append((capability, head_dim, tuple(tbs.launch_config(head_dim, torch.device("cuda", 0)))))
            limits.append((gpu, head_dim, optin))
        tuned[gpu] = tbs.launch_config(128, torch.device("cuda", 0)).kv_tma
    for (gpu, head_dim, optin), (_, _, cfg), shared in zip(limits, builds, compiled_shared_bytes(builds), strict=True):
        assert 0 < shared <= optin, (gpu, head_dim, cfg, shared)
    assert tuned == {gpu: capability[0] >= 9 and optin > 200_000 for gpu, (capability, optin) in GPUS.items()}
