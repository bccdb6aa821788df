"""Writes the shipped workflows, UI format (drag and drop) and API format, from one description.

Where: the UI files go to ``example_workflows/`` at the pack's root, the folder ComfyUI's
template browser lists (it offers every ``*.json`` directly in a pack's ``example_workflows``,
``example``, ``examples``, ``workflow`` or ``workflows`` folder, and opens each as a UI
workflow); the API files go to ``workflows/api/``, a folder it does not scan. Generate the FLUX.1
ones against the oldest ComfyUI the pack supports (see ``patch/host.py``), the FLUX.2 ones (``--flux2``)
against the oldest that runs FLUX.2 (0.29).

Why generated: a UI workflow lists each node's widget values by position (seeds carry an
extra "control after generate" value); reading every node's inputs from the real node
registry makes both formats right by construction and keeps them in step.

    COMFYUI_PATH=/path/to/ComfyUI-0.3.64 python workflows/build.py
    COMFYUI_PATH=/path/to/ComfyUI-0.29 python workflows/build.py --flux2
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from graph import Graph, Node, Out
from layout import NODE_WIDTH, NOTE_POS, NOTE_SIZE, VIEW, layout

HERE = Path(__file__).resolve().parent
UI_DIR = HERE.parent / "example_workflows"  # scanned by ComfyUI's template browser
API_DIR = HERE / "api"  # not scanned: ComfyUI could not open these as templates
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
PROMPT = (
    "a sunlit alpine valley with a wooden chalet, wildflowers in the foreground, snow-capped peaks, "
    "crisp detail, photograph"
)
MODEL_FILES = (
    "Model files (put them in ComfyUI/models/...): diffusion_models/flux1-dev.safetensors, "
    "text_encoders/clip_l.safetensors, text_encoders/t5xxl_fp16.safetensors, vae/ae.safetensors."
)


def definition(type_: str) -> tuple[list[tuple[str, str, bool, bool, object]], list[tuple[str, str]]]:
    """([(input, type, is_widget, has_seed_control, default)], [(output name, type)]) from the node registry."""
    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS[type_]
    spec = cls.INPUT_TYPES()
    inputs = []
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            kind, opts = entry[0], (entry[1] if len(entry) > 1 else {}) or {}
            options = list(kind) if isinstance(kind, (list, tuple)) else opts.get("options")
            kind = "COMBO" if isinstance(kind, (list, tuple)) else str(getattr(kind, "value", kind))
            widget = kind in WIDGET_TYPES and not opts.get("forceInput", False)
            default = opts.get("default", options[0] if options else None)
            inputs.append((name, kind, widget, bool(opts.get("control_after_generate", False)), default))
    types = [str(getattr(t, "value", t)) for t in cls.RETURN_TYPES]
    names = list(getattr(cls, "RETURN_NAMES", None) or types)
    return inputs, list(zip(names, types, strict=True))


def complete(n: Node) -> dict:
    """The node's inputs with every widget it leaves out at the node's own default."""
    inputs = dict(n.inputs)
    for name, _, widget, _, default in definition(n.type)[0]:
        if widget and name not in inputs:
            inputs[name] = default
    return inputs


def to_api(graph: Graph) -> dict:
    prompt = {}
    for n in graph.nodes:
        inputs = {k: [str(v.node), v.slot] if isinstance(v, Out) else v for k, v in complete(n).items()}
        prompt[str(n.id)] = {"class_type": n.type, "inputs": inputs, "_meta": {"title": n.title or n.type}}
    return prompt


def node_height(type_: str) -> int:
    """The height ComfyUI's frontend gives a node of this type: 20 px a socket row, 24 px a widget, 14 px of
    margins (366 px for the Attention Patch's 2 sockets and 13 widgets, as seen in the frontend), 80 px more for
    a multiline text box."""
    import nodes

    spec = nodes.NODE_CLASS_MAPPINGS[type_].INPUT_TYPES()
    inputs_def, outputs_def = definition(type_)
    sockets = sum(1 for _, _, widget, _, _ in inputs_def if not widget)
    widgets = sum(1 + seed for _, _, widget, seed, _ in inputs_def if widget)
    multiline = sum(
        1 for section in spec.values() if isinstance(section, dict) for entry in section.values()
        if len(entry) > 1 and isinstance(entry[1], dict) and entry[1].get("multiline")
    )  # fmt: skip
    return 20 * max(sockets, len(outputs_def)) + 24 * widgets + 14 + 80 * multiline


def to_ui(graph: Graph) -> dict:
    placed, groups = layout(graph, node_height)
    links, ui_nodes = [], []
    outputs: dict[int, list] = {}
    for n in graph.nodes:
        inputs_def, outputs_def = definition(n.type)
        outputs[n.id] = [
            {"name": name, "type": t, "links": [], "slot_index": i} for i, (name, t) in enumerate(outputs_def)
        ]
    for order, n in enumerate(graph.nodes):
        inputs_def, _ = definition(n.type)
        sockets, widgets = [], []
        values = complete(n)
        for name, kind, widget, seed, _ in inputs_def:
            value = values.get(name)
            if widget:
                if isinstance(value, Out):
                    raise ValueError(f"{n.type}.{name} is a widget; this builder does not link widgets")
                widgets.append(value)
                if seed:
                    widgets.append("fixed")
            else:
                link = None
                if isinstance(value, Out):
                    link = len(links) + 1
                    links.append([link, value.node, value.slot, n.id, len(sockets), kind])
                    outputs[value.node][value.slot]["links"].append(link)
                sockets.append({"name": name, "type": kind, "link": link})
        x, y, height = placed[n.id]
        ui_nodes.append({
            "id": n.id, "type": n.type, "pos": [x, y], "size": [NODE_WIDTH, height],
            "flags": {}, "order": order, "mode": 0, "inputs": sockets, "outputs": outputs[n.id],
            "properties": {"Node name for S&R": n.type}, "widgets_values": widgets,
            **({"title": n.title} if n.title else {}),
        })  # fmt: skip
    for i, text in enumerate(graph.notes):
        ui_nodes.append({
            "id": len(graph.nodes) + 1 + i, "type": "Note", "pos": [NOTE_POS[0], NOTE_POS[1] + i * (NOTE_SIZE[1] + 20)],
            "size": list(NOTE_SIZE), "flags": {}, "order": len(ui_nodes), "mode": 0, "inputs": [], "outputs": [],
            "properties": {}, "widgets_values": [text],
        })  # fmt: skip
    return {
        "last_node_id": len(ui_nodes), "last_link_id": len(links), "nodes": ui_nodes, "links": links,
        "groups": groups, "config": {}, "extra": {"ds": dict(VIEW)}, "version": 0.4,
    }  # fmt: skip


# -- the workflows --------------------------------------------------------------------------


def _base(g: Graph, width: int = 1024, height: int = 1024, size_scale: float = 0.25):
    """Loaders, prompt, and the 1K FLUX image everything starts from (``size_scale``: its size over the
    final image's, for ultragen-run's --width and --height)."""
    g.stage("1K base")
    model = g.node("UNETLoader", unet_name="flux1-dev.safetensors", weight_dtype="default")
    clip = g.node("DualCLIPLoader", clip_name1="clip_l.safetensors", clip_name2="t5xxl_fp16.safetensors", type="flux")
    vae = g.node("VAELoader", vae_name="ae.safetensors")
    text = g.node("CLIPTextEncode", title="Prompt", text=PROMPT, clip=clip[0])
    positive = g.node("FluxGuidance", conditioning=text[0], guidance=3.5)
    negative = g.node("ConditioningZeroOut", conditioning=text[0])
    empty = g.node("EmptyLatentImage", width=width, height=height, batch_size=1)
    low = g.node("KSampler", title="Low-res 1K", model=model[0], seed=42, steps=28, cfg=1.0, sampler_name="euler",
                 scheduler="simple", positive=positive[0], negative=negative[0], latent_image=empty[0],
                 denoise=1.0)  # fmt: skip
    g.expose("prompt", text, "text")
    g.expose("seed", low, "seed")
    g.expose("width", empty, "width", scale=size_scale)
    g.expose("height", empty, "height", scale=size_scale)
    preview = g.node("VAEDecode", samples=low[0], vae=vae[0])
    g.node("SaveImage", images=preview[0], filename_prefix="ultragen/1k")
    return model, positive, negative, vae, low


def _attention_patch(g: Graph, model, **options):
    """UltraGen Attention Patch with the papers' defaults, overridden by ``options``."""
    defaults = dict(guidance_lora="none", lora_strength=1.0, mode="ultragen", window=16, neighbour_radius=1,
                    token_order="window-first", guidance_scope="local", guidance_radius=1, guidance_tokens="noised",
                    ntk_factor=10.0, constant_shift=True, shift_mu=1.15, backend="auto")  # fmt: skip
    return g.node("UltraGenAttentionPatch", model=model[0], **{**defaults, **options})


def _ultragen_stage(g: Graph, model, positive, vae, latent, size: int, scope: str, seed: int, prefix: str):
    """Low-res guidance + warm start + windowed attention + sampling + exact decode."""
    guidance = g.node("UltraGenLowResGuidanceEncode", target_width=size, target_height=size, latent=latent)
    patched = _attention_patch(g, model, guidance=guidance[0], guidance_scope=scope)
    warm = g.node("UltraGenWarmStartLatent", latent=latent, target_width=size, target_height=size,
                  method="latent bicubic", sharpen=0.0, steps=28, skip=10, start_sigma=0.0, shift_mu=1.15,
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
    g.node("SaveImage", images=image[0], filename_prefix=prefix)
    return sampled


def flux_from_1k(size: int) -> Graph:
    g = Graph(f"flux_{size // 1024}k_from_1k")
    model, positive, _, vae, low = _base(g, size_scale=1024 / size)
    g.stage(f"{size // 1024}K")
    _ultragen_stage(g, model, positive, vae, low[0], size, "local", 43, f"ultragen/{size // 1024}k")
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


def flux_8k_recursive() -> Graph:
    g = Graph("flux_8k_recursive")
    model, positive, negative, vae, low = _base(g, size_scale=1 / 8)
    latent = low[0]
    for size, seed, scope in ((2048, 43, "local"), (4096, 44, "local"), (8192, 45, "local")):
        g.stage(f"{size // 1024}K")
        stage = g.node("UltraGenRecursiveUpscale", title=f"Upscale to {size // 1024}K", model=model[0],
                       positive=positive[0], negative=negative[0], vae=vae[0], latent=latent, seed=seed, stages=1,
                       scale=2.0, steps=28, skip=10, cfg=1.0, sampler_name="euler", scheduler="simple",
                       method="latent bicubic", sharpen=0.0, shift_mu=1.15, guidance_scope=scope)  # fmt: skip
        g.node("SaveImage", images=stage[0], filename_prefix=f"ultragen/{size // 1024}k")
        g.expose("seed", stage, "seed", offset=seed - 42)
        latent = stage[1]
    g.note(
        "UltraGen recursive: 1K -> 2K -> 4K -> 8K. Each Recursive Upscale node doubles the size, using the "
        "previous image as guidance and as its starting point (10 of 28 steps skipped), and saves its stage.\n"
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
    g.node("SaveImage", images=preview[0], filename_prefix="ultragen/klein-1k")
    return model, text, negative, vae, low


def klein_4k_from_1k() -> Graph:
    g = Graph("flux2_klein_4k_from_1k")
    model, positive, _, vae, low = _klein_base(g, size_scale=1 / 4)
    g.stage("4K")
    guidance = g.node("UltraGenLowResGuidanceEncode", target_width=4096, target_height=4096, latent=low[0])
    patched = _attention_patch(g, model, guidance=guidance[0], ntk_factor=1.0)
    warm = g.node("UltraGenWarmStartLatent", latent=low[0], target_width=4096, target_height=4096,
                  method="latent bicubic", sharpen=0.0, steps=4, skip=0, start_sigma=0.0, shift_mu=1.15,
                  scheduler="simple")  # fmt: skip
    for node in (guidance, warm):
        g.expose("width", node, "target_width")
        g.expose("height", node, "target_height")
    _sample_and_save(g, patched, positive, vae, warm, 43, "ultragen/klein-4k")
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
    latent = low[0]
    for size, seed in ((2048, 43), (4096, 44), (8192, 45)):
        g.stage(f"{size // 1024}K")
        stage = g.node("UltraGenRecursiveUpscale", title=f"Upscale to {size // 1024}K", model=model[0],
                       positive=positive[0], negative=negative[0], vae=vae[0], latent=latent, seed=seed, stages=1,
                       scale=2.0, steps=4, skip=0, cfg=1.0, sampler_name="euler", scheduler="simple",
                       method="latent bicubic", sharpen=0.0, shift_mu=1.15, guidance_scope="local")  # fmt: skip
        g.node("SaveImage", images=stage[0], filename_prefix=f"ultragen/klein-{size // 1024}k")
        g.expose("seed", stage, "seed", offset=seed - 42)
        latent = stage[1]
    g.note(
        "UltraGen recursive on FLUX.2 klein: 1K -> 2K -> 4K -> 8K, 4 steps a stage (needs ComfyUI 0.29 or newer). "
        "Each Recursive Upscale node doubles the size with the previous stage as guidance (local: each window sees "
        "the previous stage around its own area) and saves its stage.\n"
        "Speed and memory of FLUX.2 at 8K are not yet measured (the FLUX.1 chain fits a 24 GB card).\n"
        f"{KLEIN_FILES}"
    )
    return g


FLUX2_WORKFLOWS = {  # written against ComfyUI 0.29 (its FLUX.2 nodes): ``build.py --flux2``
    "flux2_klein_4k_from_1k": lambda: distinct_titles(klein_4k_from_1k()),
    "flux2_klein_8k_recursive": lambda: distinct_titles(klein_8k_recursive()),
}

WORKFLOWS = {
    "flux_2k_from_1k": lambda: distinct_titles(flux_from_1k(2048)),
    "flux_4k_from_1k": lambda: distinct_titles(flux_from_1k(4096)),
    "flux_8k_recursive": lambda: distinct_titles(flux_8k_recursive()),
    "scalediff_4k": lambda: distinct_titles(scalediff_4k()),
}


def load_node_registry(pack_root: Path) -> None:
    """ComfyUI's core and extra nodes, and this pack's, as a running ComfyUI would have them (once)."""
    import nodes

    if "FluxGuidance" not in nodes.NODE_CLASS_MAPPINGS:  # comfy_extras not loaded yet
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    if "UltraGenAttentionPatch" not in nodes.NODE_CLASS_MAPPINGS:
        asyncio.run(nodes.load_custom_node(str(pack_root)))


def main() -> None:
    sys.path.insert(0, str(HERE.parent.parent))
    from ultragen.comfy_env import PACK_ROOT, find_comfyui, import_comfyui

    path = find_comfyui()
    if path is None:
        sys.exit("workflows/build.py needs ComfyUI: set COMFYUI_PATH=/path/to/ComfyUI")
    import_comfyui(path, cpu=True)
    load_node_registry(PACK_ROOT)
    UI_DIR.mkdir(exist_ok=True)
    API_DIR.mkdir(exist_ok=True)
    workflows = FLUX2_WORKFLOWS if "--flux2" in sys.argv[1:] else WORKFLOWS
    for name, build in workflows.items():
        graph = build()
        (UI_DIR / f"{name}.json").write_text(json.dumps(to_ui(graph), indent=2) + "\n")
        (API_DIR / f"{name}.api.json").write_text(json.dumps(to_api(graph), indent=2) + "\n")
        (API_DIR / f"{name}.inputs.json").write_text(json.dumps(graph.inputs, indent=2) + "\n")
        print(f"wrote example_workflows/{name}.json, workflows/api/{name}.api.json and .inputs.json "
              f"({len(graph.nodes)} nodes)")  # fmt: skip


if __name__ == "__main__":
    main()
