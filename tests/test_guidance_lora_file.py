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
