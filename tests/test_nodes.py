"""The nodes in the real ComfyUI: schemas, messages, and a run from node to sampler."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.usefixtures("comfyui")


def _nodes():
    from ultragen.nodes import NODES

    return {n.GET_SCHEMA().node_id: n for n in NODES}


def test_node_ids_names_and_tooltips():
    nodes = _nodes()
    assert {k: n.GET_SCHEMA().display_name for k, n in nodes.items()} == {
        "UltraGenAttentionPatch": "UltraGen Attention Patch",
        "UltraGenLowResGuidanceEncode": "Low-Res Guidance Encode",
        "UltraGenWarmStartLatent": "Warm-Start Latent",
        "UltraGenStructureGuidance": "Structure Guidance",
        "UltraGenConstantShiftSigmas": "Constant-Shift Sigmas",
        "UltraGenVAEDecodeExact": "VAE Decode (Exact, Low Memory)",
        "UltraGenVAEEncodeExact": "VAE Encode (Exact, Low Memory)",
        "UltraGenRecursiveUpscale": "Recursive Upscale",
        "UltraGenSaveImage": "Fast Save Image",
    }
    for node in nodes.values():
        schema = node.GET_SCHEMA()
        assert schema.description
        missing = [i.id for i in schema.inputs if not i.tooltip]
        assert not missing, f"{schema.node_id} inputs without a tooltip: {missing}"


def test_guidance_encode_messages():
    from ultragen.nodes.guidance_encode import UltraGenLowResGuidanceEncode as Encode

    latent = {"samples": torch.randn(1, 16, 32, 32)}  # 256 px
    with pytest.raises(ValueError, match="either an image .* or a latent, not both"):
        Encode.execute(1024, 1024)
    with pytest.raises(ValueError, match="either an image .* or a latent, not both"):
        Encode.execute(1024, 1024, image=torch.rand(1, 256, 256, 3), latent=latent)
    with pytest.raises(ValueError, match="an image needs the VAE"):
        Encode.execute(1024, 1024, image=torch.rand(1, 256, 256, 3))
    with pytest.raises(ValueError, match=r"guidance \(256x256 px\) is larger than the target \(192x1024 px\)"):
        Encode.execute(192, 1024, latent=latent)
    with pytest.raises(ValueError, match=r"guidance \(256x256 px\) and the target \(1024x768 px\) differ in shape"):
        Encode.execute(1024, 768, latent=latent)
    guidance = Encode.execute(1024, 1024, latent=latent).result[0]
    assert guidance.latent.shape == (1, 16, 32, 32) and (guidance.target_width, guidance.target_height) == (1024, 1024)
    assert guidance.ratio() == 4.0
    wide = Encode.execute(1000, 560, latent={"samples": torch.randn(1, 16, 17, 31)}).result[0]  # 248x136: rounding
    assert (wide.target_width, wide.target_height) == (1000, 560)


def test_nodes_from_guidance_to_sampler(tmp_path):
    import folder_paths
    from safetensors.torch import save_file

    from ultragen.nodes.attention_patch import UltraGenAttentionPatch as Patch
    from ultragen.nodes.guidance_encode import UltraGenLowResGuidanceEncode as Encode

    from comfy_flux import conditioning, ksampler, tiny_flux

    g = torch.Generator().manual_seed(0)
    save_file(
        {
            "double_blocks.0.img_attn.qkv.lora_A.weight": torch.randn(4, 96, generator=g) * 0.1,
            "double_blocks.0.img_attn.qkv.lora_B.weight": torch.randn(288, 4, generator=g) * 0.1,
        },
        str(tmp_path / "ultragen_guidance.safetensors"),
    )
    folder_paths.add_model_folder_path("loras", str(tmp_path))
    model = tiny_flux(seed=4)
    low_res = {"samples": torch.randn(1, 16, 6, 8, generator=g)}
    guidance = Encode.execute(256, 192, latent=low_res).result[0]  # latent 24 x 32 = 4x the guidance
    patched = Patch.execute(
        model, "ultragen_guidance.safetensors", 1.0, "ultragen", 4, 1, "hilbert", "local", 1, "noised", 10.0, True,
        1.15, "auto", guidance=guidance,
    ).result[0]  # fmt: skip
    out = ksampler(patched, torch.zeros(1, 16, 24, 32), conditioning(5, 1), conditioning(5, 2))
    assert out.shape == (1, 16, 24, 32) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="LoRA 'missing.safetensors' is not in models/loras"):
        Patch.execute(model, "missing.safetensors", 1.0, "ultragen", 16, 1, "window-first", "global", 1, "noised",
                      10.0, True, 1.15, "auto")  # fmt: skip
