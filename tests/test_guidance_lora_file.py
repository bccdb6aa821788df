"""Guidance LoRA files as a user's ``models/loras`` holds them: written with safetensors, read
by ``load_guidance_lora`` (core; no ComfyUI). A file the patch cannot use must fail when it is
loaded, naming the file, the layer, the problem and what to do; never load silently into a
non-finite image, never a bare RuntimeError or ZeroDivisionError."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from ultragen.core.guidance_lora import GuidanceLoRAError, load_guidance_lora

LAYER = "double_blocks.0.img_attn.qkv"
RANK, IN, OUT = 4, 6, 9


def lora_file(tmp_path, name="my_guidance.safetensors", dtype=torch.float32, **override):
    g = torch.Generator().manual_seed(0)
    tensors = {
        f"{LAYER}.lora_A.weight": torch.randn(RANK, IN, generator=g),
        f"{LAYER}.lora_B.weight": torch.randn(OUT, RANK, generator=g),
        f"{LAYER}.alpha": torch.tensor(8.0),
    }
    for key, value in override.items():
        tensors[f"{LAYER}.{key}"] = value
    path = tmp_path / name
    save_file({k: v.to(dtype) for k, v in tensors.items() if v is not None}, str(path))
    return path


@pytest.mark.parametrize("alpha", [torch.tensor(8.0), torch.tensor([8.0]), None], ids=["scalar", "shape-1", "absent"])
def test_a_good_file_loads_with_alpha_over_rank(tmp_path, alpha):
    path = lora_file(tmp_path, alpha=alpha)
    layer = load_guidance_lora(path)[LAYER]
    want_scale = (8.0 if alpha is not None else RANK) / RANK  # peft's scaling: alpha / rank, default alpha = rank
    assert math.isclose(layer.scale, want_scale)
    x = torch.randn(3, IN, generator=torch.Generator().manual_seed(1))
    a, b = layer.down, layer.up
    want = torch.stack([sum(b[:, r] * (a[r] @ row) for r in range(RANK)) for row in x]) * want_scale * 0.5
    assert torch.allclose(layer.delta(x, 0.5), want, atol=1e-5)


def assert_clear(excinfo, *parts: str) -> None:
    message = str(excinfo.value)
    for part in ("my_guidance.safetensors", repr(LAYER), "re-export", "retrain", *parts):
        assert part in message, (part, message)


def test_alpha_that_is_not_one_number(tmp_path):
    with pytest.raises(GuidanceLoRAError) as excinfo:
        load_guidance_lora(lora_file(tmp_path, alpha=torch.full((4,), 8.0)))
    assert_clear(excinfo, "alpha of shape (4,)", "single number")


@pytest.mark.parametrize(
    "tensor,bad",
    [
        ("lora_A", torch.tensor([[math.nan] + [0.0] * (IN - 1)] + [[0.0] * IN] * (RANK - 1))),
        ("lora_B", torch.full((OUT, RANK), math.inf)),
        ("alpha", torch.tensor(math.nan)),
        ("alpha", torch.tensor(-math.inf)),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nan_or_inf_values(tmp_path, tensor, bad, dtype):
    key = tensor + ".weight" if tensor.startswith("lora_") else tensor
    with pytest.raises(GuidanceLoRAError) as excinfo:
        load_guidance_lora(lora_file(tmp_path, dtype=dtype, **{key: bad}))
    count = int((~torch.isfinite(bad)).sum())
    assert_clear(excinfo, f"{count} non-finite value(s) (NaN or Inf) in {tensor}")


def test_a_value_too_large_for_float32_is_not_finite(tmp_path):
    """float64 values beyond float32's range become Inf where the patch computes; caught at load."""
    huge = torch.full((OUT, RANK), 1e300, dtype=torch.float64)
    path = lora_file(tmp_path, dtype=torch.float64, **{"lora_B.weight": huge})
    with pytest.raises(GuidanceLoRAError) as excinfo:
        load_guidance_lora(path)
    assert_clear(excinfo, f"{OUT * RANK} non-finite value(s) (NaN or Inf) in lora_B")


def test_rank_zero(tmp_path):
    path = lora_file(tmp_path, **{"lora_A.weight": torch.zeros(0, IN), "lora_B.weight": torch.zeros(OUT, 0)})
    with pytest.raises(GuidanceLoRAError) as excinfo:
        load_guidance_lora(path)
    assert_clear(excinfo, "rank 0")


def test_the_authors_flux2_format_maps_onto_comfyuis_layers(tmp_path):
    """diffusers' FLUX.2 names (``transformer.<module>.lora_A/B.weight``, no alpha: scale 1), as the authors save them:
    to_q / to_k / to_v land on their thirds of ComfyUI's fused qkv, each with exactly its own update; the other modules
    on their ComfyUI layers (worked by hand: B @ A @ x per module)."""
    g = torch.Generator().manual_seed(3)
    hidden, rank = 8, 2
    a = {p: torch.randn(rank, hidden, generator=g) for p in "qkv"}
    b = {p: torch.randn(hidden, rank, generator=g) for p in "qkv"}
    a_out, b_out = torch.randn(3, hidden, generator=g), torch.randn(hidden, 3, generator=g)
    a_in, b_in = torch.randn(rank, 5, generator=g), torch.randn(hidden, rank, generator=g)
    tensors = {f"transformer.transformer_blocks.1.attn.to_{p}.lora_{h}.weight": (a if h == "A" else b)[p]
               for p in "qkv" for h in "AB"}  # fmt: skip
    tensors.update({
        "transformer.single_transformer_blocks.0.attn.to_out.lora_A.weight": a_out,
        "transformer.single_transformer_blocks.0.attn.to_out.lora_B.weight": b_out,
        "transformer.x_embedder.lora_A.weight": a_in,
        "transformer.x_embedder.lora_B.weight": b_in,
    })  # fmt: skip
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(tensors, str(path))
    layers = load_guidance_lora(path)
    assert set(layers) == {"double_blocks.1.img_attn.qkv", "single_blocks.0.linear2", "img_in"}
    x = torch.randn(4, hidden, generator=g)
    fused = layers["double_blocks.1.img_attn.qkv"].delta(x, 1.0)
    assert fused.shape == (4, 3 * hidden)
    for i, p in enumerate("qkv"):
        torch.testing.assert_close(fused[:, i * hidden : (i + 1) * hidden], x @ a[p].t() @ b[p].t())
    torch.testing.assert_close(layers["single_blocks.0.linear2"].delta(x, 1.0), x @ a_out.t() @ b_out.t())
    x5 = torch.randn(4, 5, generator=g)
    torch.testing.assert_close(layers["img_in"].delta(x5, 0.5), 0.5 * (x5 @ a_in.t() @ b_in.t()))


def test_the_authors_flux2_format_with_only_q_and_k(tmp_path):
    """A LoRA on to_q and to_k only updates the first two thirds of the fused qkv; v keeps the base weights."""
    g = torch.Generator().manual_seed(4)
    a = {p: torch.randn(2, 6, generator=g) for p in "qk"}
    b = {p: torch.randn(6, 2, generator=g) for p in "qk"}
    tensors = {f"transformer.transformer_blocks.0.attn.to_{p}.lora_{h}.weight": (a if h == "A" else b)[p]
               for p in "qk" for h in "AB"}  # fmt: skip
    path = tmp_path / "qk.safetensors"
    save_file(tensors, str(path))
    layer = load_guidance_lora(path)["double_blocks.0.img_attn.qkv"]
    x = torch.randn(3, 6, generator=g)
    delta = layer.delta(x, 1.0)
    assert delta.shape == (3, 12)  # rows of q and k: the update covers the first 12 outputs
    torch.testing.assert_close(delta[:, :6], x @ a["q"].t() @ b["q"].t())
    torch.testing.assert_close(delta[:, 6:], x @ a["k"].t() @ b["k"].t())


def test_an_unknown_diffusers_module_is_named(tmp_path):
    path = tmp_path / "odd.safetensors"
    save_file({"transformer.norm_out.linear.lora_A.weight": torch.randn(2, 4),
               "transformer.norm_out.linear.lora_B.weight": torch.randn(4, 2)}, str(path))  # fmt: skip
    with pytest.raises(GuidanceLoRAError, match="norm_out.linear.* is not a guidance-stream layer"):
        load_guidance_lora(path)


@pytest.mark.parametrize("broken", ["no lora_B", "alpha of two numbers"])
def test_an_incomplete_q_k_v_part_of_the_authors_format_is_named(tmp_path, broken):
    """A to_k LoRA without its lora_B (or with an alpha that is not one number) is refused naming the file, the layer
    and the part, not dropped: the fused qkv would otherwise load without k's update."""
    g = torch.Generator().manual_seed(5)
    tensors = {f"transformer.transformer_blocks.0.attn.to_{p}.lora_{h}.weight": torch.randn(*shape, generator=g)
               for p in "qk" for h, shape in (("A", (2, 6)), ("B", (6, 2)))}  # fmt: skip
    if broken == "no lora_B":
        del tensors["transformer.transformer_blocks.0.attn.to_k.lora_B.weight"]
    else:
        tensors["transformer.transformer_blocks.0.attn.to_k.alpha"] = torch.tensor([1.0, 2.0])
    path = tmp_path / "broken.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(GuidanceLoRAError, match=r"broken.safetensors: double_blocks.0.img_attn.qkv: the to_k LoRA"):
        load_guidance_lora(path)
