"""Tiny FLUX-architecture models in the real ComfyUI, and ways to run them.

Import only after the ``comfyui`` fixture has put ComfyUI on the path. Models are built
by ComfyUI itself (``supported_models.Flux`` -> ``model_base.Flux`` -> ``ModelPatcher``)
with seeded random weights; nothing here imitates ComfyUI.
"""

from __future__ import annotations

import comfy.model_management as mm
import comfy.model_patcher
import comfy.supported_models
import torch

from ultragen.patch.model_call import denoise

__all__ = ["denoise"]

CONTEXT_DIM, VEC_DIM = 64, 32


def tiny_flux(
    seed: int = 0, depth: int = 2, single: int = 2, dtype=torch.float32, device=None
) -> comfy.model_patcher.ModelPatcher:
    """FLUX with hidden 96, 2 heads of 48, axes [8, 20, 20]; weights ~ N(0, 0.05)."""
    config = dict(
        image_model="flux", in_channels=16, out_channels=16, vec_in_dim=VEC_DIM, context_in_dim=CONTEXT_DIM,
        hidden_size=96, mlp_ratio=4.0, num_heads=2, depth=depth, depth_single_blocks=single, axes_dim=[8, 20, 20],
        theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True,
    )  # fmt: skip
    model_config = comfy.supported_models.Flux(config)
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({})
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.diffusion_model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)  # cast to the parameter's dtype
    return comfy.model_patcher.ModelPatcher(
        model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
    )


def conditioning(text_len: int, seed: int, batch: int = 1) -> list:
    """A FLUX conditioning (T5 tokens + pooled CLIP + guidance scale) with random embeddings."""
    gen = torch.Generator().manual_seed(seed)
    cond = torch.randn(batch, text_len, CONTEXT_DIM, generator=gen)
    pooled = torch.randn(batch, VEC_DIM, generator=gen)
    return [[cond, {"pooled_output": pooled, "guidance": 3.5}]]


def ksampler(model, latent: torch.Tensor, positive, negative, cfg: float = 3.0, steps: int = 3, seed: int = 1):
    import nodes

    return nodes.common_ksampler(model, seed, steps, cfg, "euler", "simple", positive, negative, {"samples": latent})[
        0
    ]["samples"]


def sampler_custom_advanced(model, latent: torch.Tensor, positive, negative, cfg: float = 3.0, steps: int = 3):
    from comfy_extras.nodes_custom_sampler import (
        BasicScheduler,
        CFGGuider,
        KSamplerSelect,
        RandomNoise,
        SamplerCustomAdvanced,
    )

    noise = RandomNoise().get_noise(1)[0]
    guider = CFGGuider().get_guider(model, positive, negative, cfg)[0]
    sampler = KSamplerSelect().get_sampler("euler")[0]
    sigmas = BasicScheduler().get_sigmas(model, "simple", steps, 1.0)[0]
    return SamplerCustomAdvanced().sample(noise, guider, sampler, sigmas, {"samples": latent})[0]["samples"]


def flux_vae(seed: int = 0):
    """ComfyUI's VAE with the FLUX autoencoder architecture (16 latent channels, 8x) and seeded
    random weights, loaded the way ComfyUI loads ae.safetensors: from a state dict."""
    import comfy.sd
    from comfy.ldm.modules.diffusionmodules.model import Decoder, Encoder

    config = dict(
        double_z=True, z_channels=16, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
        num_res_blocks=2, attn_resolutions=[], dropout=0.0,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for prefix, net in (("encoder.", Encoder(**config)), ("decoder.", Decoder(**config))):
        for name, p in net.state_dict().items():
            if p.dim() > 1:  # conv / linear weights: variance-preserving
                fan_in = p[0].numel()
                value = torch.randn(p.shape, generator=gen) / fan_in**0.5
            else:  # norms 1, biases 0
                value = torch.ones(p.shape) if name.endswith("weight") else torch.zeros(p.shape)
            state[prefix + name] = value
    return comfy.sd.VAE(sd=state)
