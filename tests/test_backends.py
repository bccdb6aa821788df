"""Every attention backend against dense SDPA with a mask built token by token from the rules."""

import os
import warnings

import pytest
import torch

from ultragen.core import (
    AttentionRules,
    GuidanceSegment,
    ImageSegment,
    Layout,
    TextSegment,
    cached,
    frequency,
    window_first_order,
)
from ultragen.kernels import AttentionInputError, choose_backend, sparse_attention
from ultragen.kernels.flex import flex_block_sparse_attention
from ultragen.kernels.triton_block_sparse import block_sparse_attention

from layouts import NAMED, random_layouts
from reference import dense_mask, masked_attention

# On a GPU machine the same tests check the compiled kernels; references stay on the CPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = list(NAMED.items()) + [(f"random-{i}", lay) for i, lay in enumerate(random_layouts(16, seed=7))]
IDS = [c[0] for c in CASES]
_MASKS: dict = {}


def reference(layout, q, k, v):
    if layout not in _MASKS:
        _MASKS[layout] = dense_mask(layout)
    return masked_attention(q.cpu(), k.cpu(), v.cpu(), _MASKS[layout]).to(q.device)


def qkv(layout, batch=2, heads=3, dim=32, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, layout.seq_len, dim, generator=g).to(DEVICE, dtype) for _ in range(3)]


def run(backend, layout, q, k, v):
    if backend == "flex-eager":  # eager flex materialises L x L scores: fine for tiny test shapes
        with warnings.catch_warnings():  # and PyTorch says so ("called without torch.compile()"): meant here
            warnings.filterwarnings("ignore", "flex_attention called without torch.compile", UserWarning)
            return flex_block_sparse_attention(
                q, k, v, layout.block_schedule(128, 128, q.device), q.shape[-1] ** -0.5, False
            )
    return sparse_attention(q, k, v, layout, backend=backend)


@pytest.mark.parametrize("backend", ["triton", "portable", "flex-eager"])
@pytest.mark.parametrize("name,layout", CASES, ids=IDS)
def test_backend_matches_dense_reference(backend, name, layout):
    q, k, v = qkv(layout, seed=len(name))
    err = (run(backend, layout, q, k, v) - reference(layout, q, k, v)).abs().max().item()
    assert err <= 1e-5


@pytest.mark.parametrize("block", [(16, 64), (64, 32), (32, 128)])
@pytest.mark.parametrize("name", ["partial-border-windows", "guidance-local", "npa-offset"])
def test_triton_kernel_at_other_tile_shapes(name, block):
    layout = NAMED[name]
    q, k, v = qkv(layout, batch=1, heads=2)
    out = block_sparse_attention(q, k, v, layout.block_schedule(*block, DEVICE), q.shape[-1] ** -0.5, num_warps=4)
    assert (out - reference(layout, q, k, v)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 4e-3)])
def test_triton_half_precision_and_head_dims(dim, dtype, tol):
    if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip(
            "Triton's interpreter gets bf16 tl.dot wrong (a 16x16 product is off by 1e10 with Triton 3.9); "
            "bf16 is checked on the GPU (tests on CUDA, bench/attention.py --check)"
        )
    layout = NAMED["odd-text-non-square-hilbert"]
    q, k, v = qkv(layout, batch=2, heads=2, dim=dim, dtype=dtype)
    out = sparse_attention(q, k, v, layout, backend="triton")
    assert out.dtype == dtype and out.shape == q.shape
    ref = masked_attention(q.float().cpu(), k.float().cpu(), v.float().cpu(), dense_mask(layout))
    assert (out.float().cpu() - ref).abs().max().item() <= tol


def test_triton_writes_through_output_strides():
    # ComfyUI wants (B, L, H*D): the kernel can write a (B, L, H, D) buffer seen as (B, H, L, D).
    layout = NAMED["guidance-global"]
    q, k, v = qkv(layout, batch=2, heads=3)
    buf = torch.full((2, layout.seq_len, 3, 32), float("nan"), device=DEVICE)
    block_sparse_attention(q, k, v, layout.block_schedule(32, 32, DEVICE), 32**-0.5, out=buf.transpose(1, 2))
    assert (buf.transpose(1, 2) - reference(layout, q, k, v)).abs().max().item() <= 1e-5


def test_flex_compiled_matches():
    # Several 128-token key blocks, rows of different lengths and partial tiles: compiled flex
    # once misread index arrays narrower than the number of key blocks.
    layout = Layout(
        (TextSegment(21), ImageSegment(32, 30, window=(4, 4)), GuidanceSegment(8, 7)),
        AttentionRules(neighbour_radius=0, guidance_scope="local", guidance_radius=1),
    )
    q, k, v = qkv(layout, batch=1, heads=2)
    out = sparse_attention(q, k, v, layout, backend="flex")
    assert (out - reference(layout, q, k, v)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("backend", ["triton", "portable", "flex-eager"])
@pytest.mark.parametrize("order", ["window-first", "hilbert"])
def test_single_window_without_guidance_is_plain_attention(backend, order):
    image = ImageSegment(10, 7, window=(10, 7), token_order=order)
    layout = Layout((TextSegment(9), image), AttentionRules(text_sees="all"))
    q, k, v = qkv(layout)
    dense = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double()).float()
    assert (run(backend, layout, q, k, v) - dense).abs().max().item() <= 1e-5


def test_auto_matches_reference():
    assert choose_backend("cpu") == "portable"
    layout = NAMED["guidance-global"]
    q, k, v = qkv(layout)
    assert (sparse_attention(q, k, v, layout) - reference(layout, q, k, v)).abs().max().item() <= 1e-5


def test_bad_inputs_name_what_differs(monkeypatch):
    layout = NAMED["guidance-global"]
    q, k, v = qkv(layout)
    n = layout.seq_len
    with pytest.raises(AttentionInputError, match=r"layout describes \d+ tokens but .* L = 10"):
        sparse_attention(q[:, :, :10], k[:, :, :10], v[:, :, :10], layout)
    with pytest.raises(AttentionInputError, match="same .* shape.*k \\(2, 3, 10, 32\\)"):
        sparse_attention(q, k[:, :, :10], v, layout)
    with pytest.raises(AttentionInputError, match="share a dtype.*k torch.float16"):
        sparse_attention(q, k.half(), v, layout)
    with pytest.raises(AttentionInputError, match="one device.*k on meta"):
        sparse_attention(q, k.to("meta"), v, layout)
    with pytest.raises(AttentionInputError, match="4-D"):
        sparse_attention(q[0], k[0], v[0], layout)
    with pytest.raises(AttentionInputError, match="floating point"):
        sparse_attention(*(torch.zeros(1, 1, n, 8, dtype=torch.int64),) * 3, layout)
    with pytest.raises(AttentionInputError, match="backend must be one of"):
        sparse_attention(q, k, v, layout, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not torch.cuda.is_available():
        with pytest.raises(AttentionInputError, match="needs a CUDA device.*use one of 'auto'"):
            sparse_attention(q, k, v, layout, backend="triton")


@pytest.mark.parametrize("backend", ["portable", "flex"])
@pytest.mark.parametrize("name", ["guidance-global", "guidance-local", "partial-border-windows"])
def test_gradients_match_dense_reference(backend, name):
    # Training the guidance LoRA differentiates through attention: d out / d (q, k, v) must be
    # the masked attention's, taken by autograd through the dense reference.
    if backend == "flex" and DEVICE != "cuda":
        pytest.skip("flex_attention has no backward on the CPU; checked on the GPU")
    layout = NAMED[name]
    q, k, v = (t.requires_grad_() for t in qkv(layout, batch=1, heads=2, seed=3))
    cached.release()
    with torch.inference_mode():  # as ComfyUI samples: the layout's tables and schedule are built (and kept) here
        sparse_attention(q.detach(), k.detach(), v.detach(), layout, backend=backend)
    weight = torch.randn(q.shape, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    (sparse_attention(q, k, v, layout, backend=backend) * weight).sum().backward()
    qr, kr, vr = (t.detach().cpu().requires_grad_() for t in (q, k, v))
    (masked_attention(qr, kr, vr, dense_mask(layout)) * weight.cpu()).sum().backward()
    for got, want in ((q.grad, qr.grad), (k.grad, kr.grad), (v.grad, vr.grad)):
        assert (got.cpu() - want).abs().max().item() <= 1e-4


def _tensors(obj, seen=None):
    """Every tensor reachable from ``obj`` through dataclass fields, containers, attributes and closures."""
    seen = set() if seen is None else seen
    if id(obj) in seen or obj is None or isinstance(obj, (int, float, str, bool, torch.device, torch.dtype)):
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
        return
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        children = list(obj)
    elif callable(obj) and getattr(obj, "__closure__", None):
        children = [cell.cell_contents for cell in obj.__closure__]
    else:
        children = list(getattr(obj, "__dict__", {}).values())
    for child in children:
        yield from _tensors(child, seen)


@pytest.mark.parametrize("name", ["guidance-local", "npa-offset"])
def test_nothing_cached_under_inference_mode_is_an_inference_tensor(name):
    # ComfyUI samples under torch.inference_mode(); the tables, schedules and backend masks built there are
    # kept, and a differentiated call later saves them for backward, which PyTorch refuses for inference
    # tensors (flex's backward on CUDA did, in a test run after inference-mode tests).
    from ultragen.kernels import flex
    from ultragen.kernels.flex import block_mask
    from ultragen.kernels.portable import _row_slots
    from ultragen.kernels.triton_block_sparse import _byte_masks

    layout = NAMED[name]
    cached.release()
    with torch.inference_mode():
        schedule = layout.block_schedule(128, 128, DEVICE)
        built = [layout.tokens(DEVICE), layout.predicate(DEVICE), schedule, _row_slots(schedule), _byte_masks(schedule)]
        built += [block_mask(schedule, backward=True)] if flex.available() else []
        if layout.guidance is not None:
            built.append(layout.guidance_order(DEVICE))
        built.append(window_first_order(layout.image.height, layout.image.width, layout.image.window, device=DEVICE))
        built.append(frequency._axis_low_pass(16, 4, torch.device(DEVICE)))
    tensors = list(_tensors(built))
    assert len(tensors) > 20  # the walk reached the tables inside the schedule, the predicate and the masks
    assert not [t.shape for t in tensors if t.is_inference()]


def test_auto_skips_the_forward_only_kernel_when_training():
    assert choose_backend("cuda", torch.bfloat16, 128, grad=True) in ("flex", "portable")
    layout = NAMED["guidance-global"]
    q, k, v = (t.requires_grad_() for t in qkv(layout, batch=1, heads=1))
    with pytest.raises(AttentionInputError, match="forward-only"):
        sparse_attention(q, k, v, layout, backend="triton")
    if DEVICE == "cpu":
        with pytest.raises(AttentionInputError, match="no backward pass on the CPU"):
            sparse_attention(q, k, v, layout, backend="flex")
    with torch.no_grad():  # inference inputs that happen to require grad still take the kernel
        sparse_attention(q, k, v, layout, backend="triton")


def test_backends_share_one_interface_and_auto_tries_them_in_order(monkeypatch):
    """Each backend module answers usable / tile / run; auto takes the first usable one on the device, so a new
    backend is one module and one entry in PREFERENCE."""
    import types

    from ultragen.kernels import attention

    for b in attention.PREFERENCE:
        assert {"NAME", "AUTO_DEVICES", "usable", "tile", "run"} <= set(dir(b)), b.__name__
    assert attention.BACKENDS == ("auto", "triton", "flex", "portable")
    cpu = torch.device("cpu")
    assert choose_backend(cpu) == "portable"  # triton and flex are not auto-picked on a CPU
    ran = []
    fake = types.SimpleNamespace(
        NAME="fake", AUTO_DEVICES=None, usable=lambda *a: None, tile=lambda device, d: (64, 64),
        run=lambda q, k, v, schedule, scale, out, training: ran.append(schedule.block_m) or v,
    )  # fmt: skip
    monkeypatch.setattr(attention, "PREFERENCE", (fake, *attention.PREFERENCE))
    monkeypatch.setattr(attention, "BACKENDS", ("auto", "fake", *attention.BACKENDS[1:]))
    layout = NAMED["guidance-global"]
    q, k, v = qkv(layout)
    assert attention.sparse_attention(q, k, v, layout) is v and ran == [64]  # auto: the first that is usable
    fake.usable = lambda *a: "not today"
    assert choose_backend(cpu) == "portable"
    with pytest.raises(AttentionInputError, match="backend 'fake' cannot run here: not today"):
        attention.sparse_attention(q, k, v, layout, backend="fake")
