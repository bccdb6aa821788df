"""FLUX-architecture models with seeded random weights, built by ComfyUI itself.

Why: no pretrained weights can be downloaded where this pack is developed and tested;
tests use tiny FLUX-architecture models, benchmarks the full FLUX.1-dev architecture and
FLUX's autoencoder, all built through ComfyUI's own model classes (never imitations).
"""

from __future__ import annotations

import comfy.ldm.flux.model
import comfy.model_management as mm
import comfy.model_patcher
import comfy.supported_models
import torch

FLUX_DEV = dict(
    image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072,
    mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56], theta=10000, patch_size=2,
    qkv_bias=True, guidance_embed=True,
)  # fmt: skip
TINY_FLUX = dict(FLUX_DEV, vec_in_dim=32, context_in_dim=64, hidden_size=96, num_heads=2, axes_dim=[8, 20, 20])
# FLUX.2's differences from FLUX.1 in ComfyUI's config (``model_detection.py``), for tiny FLUX.2 models: 4 RoPE axes
# (here 4 x 12 for 48-dim heads), theta 2000, 1x1 patches on 128 channels, SiLU-gated MLP (ratio 3), global
# modulation, no biases, text positions on axis 3, no pooled vector and no guidance embedding (klein).
FLUX2_CHANGES = dict(image_model="flux2", in_channels=128, out_channels=128, patch_size=1, axes_dim=[12, 12, 12, 12],
                     theta=2000, mlp_ratio=3.0, global_modulation=True, mlp_silu_act=True, qkv_bias=False,
                     ops_bias=False, txt_ids_dims=[3], vec_in_dim=None, guidance_embed=False)  # fmt: skip
# Full FLUX.2 architectures for benchmarks (random weights), from diffusers' scripts/convert_flux2_to_diffusers.py
# (get_flux2_transformer_config: flux2-dev L388-405, klein-4b L408-426, klein-9b L430-448, huggingface/diffusers
# 58eb52c0), as ComfyUI reads them from a checkpoint (model_detection.py: heads = hidden / 128, context width from
# txt_in). klein has no guidance embedding; dev has. Text: Qwen3 4B / 8B (3 x 2560 / 3 x 4096), Mistral 24B (3 x 5120).
_FLUX2_FULL = dict(FLUX2_CHANGES, axes_dim=[32, 32, 32, 32])
FLUX2_KLEIN_4B = dict(_FLUX2_FULL, hidden_size=3072, num_heads=24, depth=5, depth_single_blocks=20, context_in_dim=7680)
FLUX2_KLEIN_9B = dict(_FLUX2_FULL, hidden_size=4096, num_heads=32, depth=8, depth_single_blocks=24,
                      context_in_dim=12288)  # fmt: skip
FLUX2_DEV = dict(_FLUX2_FULL, hidden_size=6144, num_heads=48, depth=8, depth_single_blocks=48, context_in_dim=15360,
                 guidance_embed=True)  # fmt: skip
FLUX_VAE = dict(
    double_z=True, z_channels=16, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
    num_res_blocks=2, attn_resolutions=[], dropout=0.0,
)  # fmt: skip


def flux_model(config: dict, dtype=torch.float32, std: float = 0.05, seed: int = 0, device=None,
               load_device=None, config_class: str = "Flux") -> comfy.model_patcher.ModelPatcher:  # fmt: skip
    """A ModelPatcher of ComfyUI's ``supported_models.<config_class>`` for ``config`` (FLUX.1 by default)
    with weights ~ N(0, std) (norm scales 1 where present)."""
    config = dict(config)
    if "txt_ids_dims" in comfy.ldm.flux.model.FluxParams.__dataclass_fields__:  # required in newer ComfyUI (0.29)
        config.setdefault("txt_ids_dims", [])  # FLUX.1: text tokens sit at position 0 on every axis
    model_config = getattr(comfy.supported_models, config_class)(config)
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({}, device=device)
    gen = torch.Generator(device=device or "cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in model.diffusion_model.named_parameters():
            if "norm" in name and name.endswith("scale"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, device=gen.device, dtype=torch.float32) * std)
    load = torch.device(load_device) if load_device else mm.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=load, offload_device=mm.unet_offload_device())


def tiny_flux(seed: int = 0, depth: int = 2, single: int = 2, dtype=torch.float32, device=None):
    """FLUX with hidden 96, 2 heads of 48, axes [8, 20, 20]: samples on a CPU in seconds."""
    config = dict(TINY_FLUX, depth=depth, depth_single_blocks=single)
    return flux_model(config, dtype=dtype, seed=seed, load_device=device)


def host_has_flux2() -> bool:
    """Whether this ComfyUI runs FLUX.2 (0.29+). Where it does not (0.3.64) it must have none of it: no model
    class and no FLUX.2 field in FLUX's parameters (so a FLUX.2 test that stops there still checks that)."""
    import comfy.ldm.flux.model
    import comfy.supported_models

    if hasattr(comfy.supported_models, "Flux2"):
        return True
    assert "txt_ids_dims" not in comfy.ldm.flux.model.FluxParams.__dataclass_fields__, "FLUX.2 half present"
    return False


def tiny_flux2(seed: int = 0, depth: int = 2, single: int = 2, dtype=torch.float32, device=None):
    """FLUX.2 (``supported_models.Flux2``, ComfyUI 0.29+) with hidden 96, 2 heads of 48: samples on a CPU in seconds."""
    config = dict(TINY_FLUX, depth=depth, depth_single_blocks=single, **FLUX2_CHANGES)
    return flux_model(config, dtype=dtype, seed=seed, load_device=device, config_class="Flux2")


def flux_vae(seed: int = 0, flux2: bool = False, dtype: torch.dtype | None = None):
    """ComfyUI's VAE with FLUX's autoencoder architecture (16 channels, 8x) and seeded random
    weights, loaded the way ComfyUI loads ae.safetensors: from a state dict. ``flux2``: FLUX.2's
    (32 channels, and a batch norm over 2x2-unshuffled latents: 128 channels at 1/16), which
    ComfyUI recognises by its ``bn.*`` entries where it knows FLUX.2. ``dtype``: ComfyUI's choice when None
    (bf16 on a recent GPU, float32 on a CPU)."""
    import comfy.sd
    from comfy.ldm.modules.diffusionmodules.model import Decoder, Encoder

    gen = torch.Generator().manual_seed(seed)
    config = dict(FLUX_VAE, z_channels=32) if flux2 else FLUX_VAE
    state = {}
    if flux2:  # with quant convs (1x1), as FLUX.2's ae file has them; ComfyUI reads the latent batch norm there
        state["bn.running_mean"] = torch.randn(128, generator=gen) * 0.1
        state["bn.running_var"] = torch.rand(128, generator=gen) + 0.5
        state["quant_conv.weight"] = torch.randn(64, 64, 1, 1, generator=gen) / 8
        state["quant_conv.bias"] = torch.zeros(64)
        state["post_quant_conv.weight"] = torch.randn(32, 32, 1, 1, generator=gen) / 32**0.5
        state["post_quant_conv.bias"] = torch.zeros(32)
    for prefix, net in (("encoder.", Encoder(**config)), ("decoder.", Decoder(**config))):
        for name, p in net.state_dict().items():
            if p.dim() > 1:  # conv / linear weights: variance-preserving
                value = torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5
            else:  # norms 1, biases 0
                value = torch.ones(p.shape) if name.endswith("weight") else torch.zeros(p.shape)
            state[prefix + name] = value
    return comfy.sd.VAE(sd=state, dtype=dtype)
