"""Tiny FLUX-architecture models in the real ComfyUI, and ways to run them.

Import only after the ``comfyui`` fixture has put ComfyUI on the path. Models are built
by ComfyUI itself (``supported_models.Flux`` -> ``model_base.Flux`` -> ``ModelPatcher``)
with seeded random weights; nothing here imitates ComfyUI.
"""

from __future__ import annotations

import torch

from ultragen.patch.model_call import denoise

from random_models import flux_vae, tiny_flux

__all__ = ["denoise", "flux_vae", "tiny_flux"]

CONTEXT_DIM, VEC_DIM = 64, 32


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


class RecordingServer:
    """What ComfyUI's executor sends its server, kept (there is no browser to show it to)."""

    client_id = None
    last_node_id = None

    def __init__(self):
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))


def prompt_executor(server):
    """ComfyUI's PromptExecutor as ``ultragen-run`` makes it (the cache settings main.py would give)."""
    from ultragen.runner.local import prompt_executor as make

    return make(server)


def flux_loaders(unet, clip, vae) -> dict:
    """ComfyUI's FLUX loader node classes with their loading replaced: ``unet(name)``, ``clip(name1)`` and
    ``vae(name)`` return the objects to use (random-weight models: nothing can be downloaded here)."""
    import nodes

    class UNETLoader(nodes.UNETLoader):
        def load_unet(self, unet_name, weight_dtype):
            return (unet(unet_name),)

    class DualCLIPLoader(nodes.DualCLIPLoader):
        def load_clip(self, clip_name1, clip_name2, type, device="default"):
            return (clip(clip_name1),)

    class CLIPLoader(nodes.CLIPLoader):  # FLUX.2's single text encoder (Qwen3 / Mistral)
        def load_clip(self, clip_name, type="stable_diffusion", device="default"):
            return (clip(clip_name),)

    class VAELoader(nodes.VAELoader):
        def load_vae(self, vae_name):
            return (vae(vae_name),)

    return {"UNETLoader": UNETLoader, "DualCLIPLoader": DualCLIPLoader, "CLIPLoader": CLIPLoader,
            "VAELoader": VAELoader}  # fmt: skip


class TinyCLIP:
    """Stands in for FLUX's text encoders (CLIP-L + T5): seeded embeddings of the tiny model's sizes."""

    def tokenize(self, text: str):
        return text

    def encode_from_tokens_scheduled(self, tokens, **kwargs):
        seed = sum(ord(c) for c in tokens) % (2**31)
        return conditioning(8, seed)


class TinyFlux2Text(TinyCLIP):
    """Stands in for FLUX.2's text encoder: seeded embeddings of the tiny model's width, no pooled vector."""

    def encode_from_tokens_scheduled(self, tokens, **kwargs):
        ((cond, _),) = super().encode_from_tokens_scheduled(tokens)
        return [[cond, {}]]
