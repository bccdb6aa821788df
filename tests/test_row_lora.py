"""peft guidance-row LoRA layers against the update written out by hand (no ComfyUI needed)."""

import pytest
import torch
from torch import nn

from ultragen.core.guidance_lora import parse_guidance_lora
from ultragen.training.row_lora import GuidanceRows, inject_guidance_lora, load_lora_tensors, lora_tensors

HIDDEN = 8


class Block(nn.Module):
    def __init__(self, **layers):
        super().__init__()
        for name, layer in layers.items():
            setattr(self, name, layer)


def flux_like(seed: int = 0) -> nn.Module:
    """FLUX's layer names and shapes (hidden 8, MLP ratio 4), without the FLUX forward."""
    torch.manual_seed(seed)
    h = HIDDEN
    model = Block(
        img_in=nn.Linear(4, h),
        double_blocks=nn.ModuleList(
            [
                Block(
                    img_attn=Block(qkv=nn.Linear(h, 3 * h), proj=nn.Linear(h, h)),
                    img_mlp=nn.Sequential(nn.Linear(h, 4 * h), nn.GELU(), nn.Linear(4 * h, h)),
                    txt_attn=Block(qkv=nn.Linear(h, 3 * h)),
                )
            ]
        ),
        single_blocks=nn.ModuleList([Block(linear1=nn.Linear(h, 7 * h), linear2=nn.Linear(5 * h, h))]),
    )
    return model


def randomise(model: nn.Module, seed: int = 1) -> None:
    """peft starts lora_B at zero; give every adapter weight a value so updates are visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize(
    "targets,expected",
    [
        ("qkv", {"double_blocks.0.img_attn.qkv": 3 * HIDDEN, "single_blocks.0.linear1": 3 * HIDDEN}),
        (
            "all",
            {
                "img_in": HIDDEN, "double_blocks.0.img_attn.qkv": 3 * HIDDEN, "double_blocks.0.img_attn.proj": HIDDEN,
                "double_blocks.0.img_mlp.0": 4 * HIDDEN, "double_blocks.0.img_mlp.2": HIDDEN,
                "single_blocks.0.linear1": 7 * HIDDEN, "single_blocks.0.linear2": HIDDEN,
            },
        ),
    ],
)  # fmt: skip
def test_targets_and_covered_outputs(targets, expected):
    model = flux_like()
    layers = inject_guidance_lora(model, GuidanceRows(), targets, rank=2, alpha=2)
    assert sorted(layers) == sorted(expected)
    tensors = lora_tensors(model)
    assert {k: v.shape[0] for k, v in tensors.items() if k.endswith("lora_B.weight")} == {
        f"{k}.lora_B.weight": rows for k, rows in expected.items()
    }
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


@pytest.mark.parametrize("layer", ["single_blocks.0.linear1", "double_blocks.0.img_attn.qkv"])
def test_update_reaches_only_guidance_rows_and_covered_outputs(layer):
    model = flux_like()
    base = model.get_submodule(layer)
    reference = nn.Linear(base.in_features, base.out_features)
    reference.load_state_dict(base.state_dict())
    rows = GuidanceRows(count=3)
    inject_guidance_lora(model, rows, "qkv", rank=2, alpha=4)
    randomise(model)
    x = torch.randn(2, 10, HIDDEN)
    out = model.get_submodule(layer)(x)
    want = reference(x)
    layer_lora = parse_guidance_lora(lora_tensors(model))[layer]
    assert layer_lora.scale == 2.0
    by_hand = x[:, -3:] @ layer_lora.down.t() @ layer_lora.up.t() * 2.0  # (2, 3, covered)
    covered = by_hand.shape[-1]
    want[:, -3:, :covered] += by_hand
    assert torch.allclose(out, want, atol=1e-6)
    assert torch.equal(out[:, :-3], reference(x)[:, :-3])  # image rows: the base layer's, bit for bit
    # the inference LoRA (the patch's) computes the same update from the exported file
    assert torch.allclose(layer_lora.delta(x[:, -3:], 1.0), by_hand, atol=1e-6)


def test_img_in_updates_only_while_embedding_guidance():
    model = flux_like()
    embedding = [False]
    inject_guidance_lora(model, GuidanceRows(count=3, embedding=lambda: embedding[0]), "all", rank=2)
    randomise(model)
    x = torch.randn(1, 5, 4)
    layer = model.img_in
    plain = layer.base_layer(x)
    assert torch.equal(layer(x), plain)  # image tokens through img_in: untouched
    embedding[0] = True
    lora = parse_guidance_lora(lora_tensors(model))["img_in"]
    assert torch.allclose(layer(x), plain + lora.delta(x, 1.0), atol=1e-6)  # guidance tokens: every row


def test_gradients_reach_only_the_adapters():
    model = flux_like()
    rows = GuidanceRows(count=2)
    inject_guidance_lora(model, rows, "qkv", rank=2)
    x = torch.randn(1, 6, HIDDEN)
    model.double_blocks[0].img_attn.qkv(x).square().sum().backward()
    qkv = model.double_blocks[0].img_attn.qkv
    assert qkv.base_layer.weight.grad is None
    assert qkv.lora_B[next(iter(qkv.lora_B))].weight.grad.abs().sum() > 0  # B starts at 0, A gets no grad yet
    rows.count = 0
    assert torch.equal(qkv(x), qkv.base_layer(x))


def test_saved_adapters_load_back_and_mismatches_are_named():
    model = flux_like()
    inject_guidance_lora(model, GuidanceRows(), "qkv", rank=2)
    randomise(model, seed=5)
    saved = lora_tensors(model)
    other = flux_like()
    inject_guidance_lora(other, GuidanceRows(), "qkv", rank=2)
    load_lora_tensors(other, saved)
    assert all(torch.equal(v, lora_tensors(other)[k]) for k, v in saved.items())
    wide = flux_like()
    inject_guidance_lora(wide, GuidanceRows(), "qkv", rank=4)
    with pytest.raises(ValueError, match="another rank"):
        load_lora_tensors(wide, saved)
    everything = flux_like()
    inject_guidance_lora(everything, GuidanceRows(), "all", rank=2)
    with pytest.raises(ValueError, match="has no img_in.lora_A.weight"):
        load_lora_tensors(everything, saved)
