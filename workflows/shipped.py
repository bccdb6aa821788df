"""The shipped workflows, described: each a ``Graph`` of nodes in stages, with its Note and the inputs
``ultragen-run``'s options set.

Why apart from ``build.py``: that module writes any description into ComfyUI's two formats; this one says
what the pack ships (FLUX.1: 2K / 4K from 1K, the 8K chain, ScaleDiff; FLUX.2 klein: 4K from 1K, the 8K chain).
"""

from __future__ import annotations

from graph import Graph

PROMPT = (
    "a sunlit alpine valley with a wooden chalet, wildflowers in the foreground, snow-capped peaks, "
    "crisp detail, photograph"
)
MODEL_FILES = (
    "Model files (put them in ComfyUI/models/...): diffusion_models/flux1-dev.safetensors, "
    "text_encoders/clip_l.safetensors, text_encoders/t5xxl_fp16.safetensors, vae/ae.safetensors."
)


def _base(g: Graph, size_scale: float):
    """Loaders, prompt, and the 1K FLUX image everything starts from (``size_scale``: its size over the
    final image's, for ultragen-run's --width and --height)."""
    g.stage("1K base")
    model = g.node("UNETLoader", unet_name="flux1-dev.safetensors", weight_dtype="default")
    clip = g.node("DualCLIPLoader", clip_name1="clip_l.safetensors", clip_name2="t5xxl_fp16.safetensors", type="flux")
    vae = g.node("VAELoader", vae_name="ae.safetensors")
    text = g.node("CLIPTextEncode", title="Prompt", text=PROMPT, clip=clip[0])
    positive = g.node("FluxGuidance", conditioning=text[0], guidance=3.5)
    negative = g.node("ConditioningZeroOut", conditioning=text[0])
    empty = g.node("EmptyLatentImage", width=1024, height=1024, batch_size=1)
    low = g.node("KSampler", title="Low-res 1K", model=model[0], seed=42, steps=28, cfg=1.0, sampler_name="euler",
                 scheduler="simple", positive=positive[0], negative=negative[0], latent_image=empty[0],
                 denoise=1.0)  # fmt: skip
    g.expose("prompt", text, "text")
    g.expose("seed", low, "seed")
    g.expose("width", empty, "width", scale=size_scale)
    g.expose("height", empty, "height", scale=size_scale)
    preview = g.node("VAEDecode", samples=low[0], vae=vae[0])
    g.node("UltraGenSaveImage", images=preview[0], filename_prefix="ultragen/1k")
    return model, positive, negative, vae, low


def _attention_patch(g: Graph, model, **options):
    """UltraGen Attention Patch with the papers' defaults, overridden by ``options``."""
    defaults = dict(guidance_lora="none", lora_strength=1.0, mode="ultragen", window=16, neighbour_radius=1,
                    token_order="window-first", guidance_scope="local", guidance_radius=1, guidance_tokens="noised",
                    ntk_factor=10.0, constant_shift=True, shift_mu=1.15, backend="auto")  # fmt: skip
    return g.node("UltraGenAttentionPatch", model=model[0], **{**defaults, **options})


def _ultragen_stage(g: Graph, model, positive, vae, latent, size: int, seed: int, prefix: str, steps: int = 28,
                    skip: int = 10, **patch_options):  # fmt: skip
    """Low-res guidance + warm start (``steps``, the first ``skip`` skipped) + windowed attention (the papers'
    defaults, overridden by ``patch_options``) + sampling + exact decode."""
    guidance = g.node("UltraGenLowResGuidanceEncode", target_width=size, target_height=size, latent=latent)
    patched = _attention_patch(g, model, guidance=guidance[0], **patch_options)
    warm = g.node("UltraGenWarmStartLatent", latent=latent, target_width=size, target_height=size,
                  method="latent bicubic", sharpen=0.0, steps=steps, skip=skip, start_sigma=0.0, shift_mu=1.15,
                  scheduler="simple")  # fmt: skip
    for node in (guidance, warm):
        g.expose("width", node, "target_width")
        g.expose("height", node, "target_height")
    return _sample_and_save(g, patched, positive, vae, warm, seed, prefix)


def _sample_and_save(g: Graph, model, positive, vae, warm, seed: int, prefix: str):
    """SamplerCustomAdvanced on a warm start (its latent and sigmas), exact decode, save."""
    noise = g.node("RandomNoise", noise_seed=seed)
    g.expose("seed", noise, "noise_seed", offset=seed - 42)
    guider = g.node("BasicGuider", model=model[0], conditioning=positive[0])
    sampler = g.node("KSamplerSelect", sampler_name="euler")
    sampled = g.node("SamplerCustomAdvanced", noise=noise[0], guider=guider[0], sampler=sampler[0],
                     sigmas=warm[1], latent_image=warm[0])  # fmt: skip
    image = g.node("UltraGenVAEDecodeExact", samples=sampled[0], vae=vae[0], offload="auto")
    g.node("UltraGenSaveImage", images=image[0], filename_prefix=prefix)
    return sampled


def flux_from_1k(size: int) -> Graph:
    g = Graph(f"flux_{size // 1024}k_from_1k")
    model, positive, _, vae, low = _base(g, size_scale=1024 / size)
    g.stage(f"{size // 1024}K")
    _ultragen_stage(g, model, positive, vae, low[0], size, 43, f"ultragen/{size // 1024}k")
    g.note(
        f"UltraGen: FLUX at {size}x{size} from a 1024x1024 image.\n\n"
        "1. The KSampler makes the 1K image as usual (change the prompt and seed there).\n"
        "2. Low-Res Guidance Encode turns it into guidance: every 256-px window of the big image sees the "
        "matching part of the small one and the parts around it, which keeps one composition.\n"
        "3. UltraGen Attention Patch makes FLUX attend in windows (fast at high resolution).\n"
        "4. Warm-Start Latent upsamples the 1K latent and skips 10 of 28 steps; SamplerCustomAdvanced runs "
        "the other 18 and adds the noise itself.\n"
        "5. VAE Decode (Exact, Low Memory) decodes without tiles or seams.\n\n"
        "Knobs: skip (more = closer to the 1K image, faster), guidance_scope (global = every window sees the "
        "whole small image: more context, slower), window.\n"
        f"{MODEL_FILES}"
    )
    return g


def _recursive_chain(g: Graph, model, positive, negative, vae, latent, steps: int, skip: int, prefix: str) -> None:
    """Three Recursive Upscale nodes, 2K -> 4K -> 8K, each in its stage, each stage saved (``prefix`` + "2k" ...)."""
    image = {}  # the first stage starts from the base latent; each later one also takes the previous stage's image
    for size, seed in ((2048, 43), (4096, 44), (8192, 45)):
        g.stage(f"{size // 1024}K")
        stage = g.node("UltraGenRecursiveUpscale", title=f"Upscale to {size // 1024}K", model=model[0],
                       positive=positive[0], negative=negative[0], vae=vae[0], latent=latent, **image, seed=seed,
                       stages=1, scale=2.0, steps=steps, skip=skip, cfg=1.0, sampler_name="euler", scheduler="simple",
                       method="latent bicubic", sharpen=0.0, shift_mu=1.15, guidance_scope="local",
                       guidance_ratio=4.0)  # fmt: skip
        g.node("UltraGenSaveImage", images=stage[0], filename_prefix=f"{prefix}{size // 1024}k")
        g.expose("seed", stage, "seed", offset=seed - 42)
        latent, image = stage[1], {"image": stage[0]}  # its exact decode: the next guidance needs no decode


def flux_8k_recursive() -> Graph:
    g = Graph("flux_8k_recursive")
    model, positive, negative, vae, low = _base(g, size_scale=1 / 8)
    _recursive_chain(g, model, positive, negative, vae, low[0], 28, 10, "ultragen/")
    g.note(
        "UltraGen recursive: 1K -> 2K -> 4K -> 8K. Each Recursive Upscale node doubles the size, starting from "
        "the previous image (10 of 28 steps skipped) and guided by it at a quarter of the new size (guidance_ratio "
        "4, the paper's), and saves its stage.\n"
        "Each window sees the previous stage around its own area (local guidance, as in the authors' code); "
        "global guidance is possible but much slower at 8K.\n"
        "Set stages > 1 on one node to do several doublings in one node instead.\n"
        "Memory: the 8K steps fit a 24 GB card with ComfyUI's DynamicVRAM (its default on NVIDIA), 4K a 12 GB "
        "card with fp8 weights; the exact decode keeps 8K's activations in CPU memory on such cards (slower).\n"
        f"{MODEL_FILES}"
    )
    return g


def scalediff_4k() -> Graph:
    g = Graph("scalediff_4k")
    model, positive, _, vae, low = _base(g, size_scale=1 / 4)
    latent = low[0]
    for size, seed in ((2048, 43), (4096, 44)):
        g.stage(f"{size // 1024}K")
        warm = g.node("UltraGenWarmStartLatent", title=f"LFM to {size // 1024}K", latent=latent, target_width=size,
                      target_height=size, method="LFM mix", sharpen=0.0, steps=30, skip=0, start_sigma=0.6,
                      shift_mu=1.15, scheduler="simple", vae=vae[0])  # fmt: skip
        g.expose("width", warm, "target_width", scale=size / 4096)
        g.expose("height", warm, "target_height", scale=size / 4096)
        npa = _attention_patch(g, model, mode="npa", ntk_factor=1.0)
        guided = g.node("UltraGenStructureGuidance", model=npa[0], reference=warm[0], strength=1.0, schedule="sigma")
        latent = _sample_and_save(g, guided, positive, vae, warm, seed, f"scalediff/{size // 1024}k")[0]
    g.note(
        "ScaleDiff (training-free): 1K -> 2K -> 4K. Each stage mixes frequencies of the latent- and RGB-upsampled "
        "image (LFM), restarts at noise 0.6, samples with Neighborhood Patch Attention (npa), and keeps the "
        "structure of the upsampled image with Structure Guidance.\n"
        f"{MODEL_FILES}"
    )
    return g


def distinct_titles(g: Graph) -> Graph:
    """A node type that appears in several stages gets the stage in its title ("KSampler Select (4K)"), so the
    canvas and ComfyUI's progress say which copy is running; explicit titles stay."""
    import nodes

    stages_of: dict[str, set[str]] = {}
    for n in g.nodes:
        stages_of.setdefault(n.type, set()).add(n.stage)
    for n in g.nodes:
        if n.title is None and len(stages_of[n.type]) > 1:
            name = nodes.NODE_DISPLAY_NAME_MAPPINGS.get(n.type, n.type)
            n.title = f"{name} ({n.stage.split()[0]})"
    return g


# -- FLUX.2 klein (ComfyUI 0.29+: EmptyFlux2LatentImage, Flux2Scheduler, CLIPLoader's "flux2") -----------------
KLEIN_FILES = (
    "Model files (put them in ComfyUI/models/...): diffusion_models/flux-2-klein-4b.safetensors (FLUX.2 klein 4B, "
    "4-step, Apache-2.0; klein 9B and FLUX.2 dev work too but are non-commercial: select their files in Load "
    "Diffusion Model, and for 9B the qwen_3_8b text encoder), text_encoders/qwen_3_4b.safetensors, "
    "vae/flux2-vae.safetensors."
)


def _klein_base(g: Graph, size_scale: float):
    """Loaders, prompt, and the 1K FLUX.2 klein image (4 steps, ComfyUI's FLUX.2 schedule, cfg 1)."""
    g.stage("1K base")
    model = g.node("UNETLoader", unet_name="flux-2-klein-4b.safetensors", weight_dtype="default")
    clip = g.node("CLIPLoader", clip_name="qwen_3_4b.safetensors", type="flux2", device="default")
    vae = g.node("VAELoader", vae_name="flux2-vae.safetensors")
    text = g.node("CLIPTextEncode", title="Prompt", text=PROMPT, clip=clip[0])
    negative = g.node("ConditioningZeroOut", conditioning=text[0])
    empty = g.node("EmptyFlux2LatentImage", width=1024, height=1024, batch_size=1)
    schedule = g.node("Flux2Scheduler", steps=4, width=1024, height=1024)
    noise = g.node("RandomNoise", noise_seed=42)
    guider = g.node("BasicGuider", model=model[0], conditioning=text[0])
    sampler = g.node("KSamplerSelect", sampler_name="euler")
    low = g.node("SamplerCustomAdvanced", title="Low-res 1K", noise=noise[0], guider=guider[0], sampler=sampler[0],
                 sigmas=schedule[0], latent_image=empty[0])  # fmt: skip
    g.expose("prompt", text, "text")
    g.expose("seed", noise, "noise_seed")
    for node in (empty, schedule):
        g.expose("width", node, "width", scale=size_scale)
        g.expose("height", node, "height", scale=size_scale)
    preview = g.node("VAEDecode", samples=low[0], vae=vae[0])
    g.node("UltraGenSaveImage", images=preview[0], filename_prefix="ultragen/klein-1k")
    return model, text, negative, vae, low


def klein_4k_from_1k() -> Graph:
    g = Graph("flux2_klein_4k_from_1k")
    model, positive, _, vae, low = _klein_base(g, size_scale=1 / 4)
    g.stage("4K")
    _ultragen_stage(g, model, positive, vae, low[0], 4096, 43, "ultragen/klein-4k", steps=4, skip=0, ntk_factor=1.0)
    g.note(
        "UltraGen on FLUX.2 klein: 4096x4096 from a 1024x1024 image, 4 + 4 steps (needs ComfyUI 0.29 or newer).\n\n"
        "1. The 1K image: klein's 4 steps on ComfyUI's FLUX.2 schedule (change the prompt and seed there).\n"
        "2. Low-Res Guidance Encode turns its latent into guidance for every 256-px window of the 4K image.\n"
        "3. UltraGen Attention Patch: windowed attention (NTK 1, as the authors' 4-step klein setting).\n"
        "4. The 4K pass runs klein's 4 steps from fresh noise (skip 0, as the authors do for klein), at FLUX.2's "
        "own constant shift (2.02; shift_mu's default means the model's own).\n"
        "5. VAE Decode (Exact, Low Memory) decodes without tiles.\n\n"
        "With the authors' klein guidance LoRA: select it in guidance_lora and set guidance_tokens to clean.\n"
        f"{KLEIN_FILES}"
    )
    return g


def klein_8k_recursive() -> Graph:
    g = Graph("flux2_klein_8k_recursive")
    model, positive, negative, vae, low = _klein_base(g, size_scale=1 / 8)
    _recursive_chain(g, model, positive, negative, vae, low[0], 4, 0, "ultragen/klein-")
    g.note(
        "UltraGen recursive on FLUX.2 klein: 1K -> 2K -> 4K -> 8K, 4 steps a stage (needs ComfyUI 0.29 or newer). "
        "Each Recursive Upscale node doubles the size with the previous stage as guidance, at a quarter of the new "
        "size (local: each window sees it around its own area), and saves its stage.\n"
        "Speed and memory of FLUX.2 at 8K are not yet measured (the FLUX.1 chain fits a 24 GB card).\n"
        f"{KLEIN_FILES}"
    )
    return g


FLUX2_WORKFLOWS = {  # written against ComfyUI 0.29 (its FLUX.2 nodes): ``build.py --flux2``
    "flux2_klein_4k_from_1k": klein_4k_from_1k,
    "flux2_klein_8k_recursive": klein_8k_recursive,
}

WORKFLOWS = {
    "flux_2k_from_1k": lambda: flux_from_1k(2048),
    "flux_4k_from_1k": lambda: flux_from_1k(4096),
    "flux_8k_recursive": flux_8k_recursive,
    "scalediff_4k": scalediff_4k,
}
