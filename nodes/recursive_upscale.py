"""Node "Recursive Upscale": 1K -> 2K -> 4K -> 8K in stages, each guided by the last."""

from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io

from ..patch import UltraGenPatchError
from ..patch.exact_vae import exact_encode
from ..patch.recursive_upscale import StageSettings, recursive_upscale
from ..patch.warm_start import METHODS

D = StageSettings()


class UltraGenRecursiveUpscale(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="UltraGenRecursiveUpscale",
            display_name="Recursive Upscale",
            category="UltraGen",
            description=(
                "Upscales in stages (e.g. 1K -> 2K -> 4K -> 8K). Each stage uses the previous result as low-res "
                "guidance and as warm start, samples with UltraGen's windowed attention, and decodes with the "
                "exact low-memory VAE. Chain nodes (one stage each) or set stages; each stage uses seed + its index."
            ),
            inputs=[
                io.Model.Input("model", tooltip="FLUX.1 or FLUX.2 (add LoRAs before this node)."),
                io.Conditioning.Input("positive", tooltip="The prompt."),
                io.Conditioning.Input("negative", tooltip="The negative prompt (FLUX dev with cfg 1 ignores it)."),
                io.Vae.Input("vae", tooltip="The FLUX VAE."),
                io.Latent.Input("latent", optional=True, tooltip="The image to upscale, as a latent (or an image)."),
                io.Image.Input("image", optional=True,
                               tooltip="The image to upscale (or connect a latent). With the latent connected too: "
                               "its decoded image (e.g. the previous Recursive Upscale's image output), which then "
                               "makes the guidance without decoding the latent again."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the first stage; stage i uses seed + i."),
                io.Int.Input("stages", default=1, min=1, max=4, tooltip="How many times to upscale."),
                io.Float.Input("scale", default=D.scale, min=1.25, max=4.0, step=0.25,
                               tooltip="Size factor per stage (the result is rounded to 16 px)."),
                io.Int.Input("steps", default=D.steps, min=1, max=200, tooltip="Full schedule length per stage."),
                io.Int.Input("skip", default=D.skip, min=0, max=199,
                             tooltip="Steps skipped per stage thanks to the warm start (UltraGen: 10 of 28)."),
                io.Float.Input("cfg", default=D.cfg, min=0.0, max=20.0, step=0.1,
                               tooltip="Classifier-free guidance (FLUX dev: 1, with the guidance in the prompt)."),
                io.Combo.Input("sampler_name", options=list(comfy.samplers.SAMPLER_NAMES), default=D.sampler_name,
                               tooltip="ComfyUI sampler."),
                io.Combo.Input("scheduler", options=list(comfy.samplers.SCHEDULER_NAMES), default=D.scheduler,
                               tooltip="ComfyUI scheduler (FLUX: simple)."),
                io.Combo.Input("method", options=list(METHODS), default=D.method,
                               tooltip="How each stage upsamples the previous one (see Warm-Start Latent)."),
                io.Float.Input("sharpen", default=D.sharpen, min=0.0, max=2.0, step=0.05,
                               tooltip="Unsharp mask on each upsampled stage (0 = off)."),
                io.Float.Input("shift_mu", default=D.shift_mu, min=0.0, max=10.0, step=0.01,
                               tooltip="Constant FLUX shift at every size; the default (FLUX.1's 1.15) means the "
                               "model's own: FLUX.2 keeps its 2.02."),
                io.Combo.Input("guidance_scope", options=["global", "local"], default=D.guidance_scope,
                               tooltip="local: each window sees the previous stage around its own area (the "
                               "authors' choice); global: the whole previous stage (steps ~15% longer at 4K, "
                               "~70% at 8K)."),
                io.Float.Input("guidance_ratio", default=D.guidance_ratio, min=1.0, max=16.0, step=0.5,
                               tooltip="The previous stage guides at 1 / this of the new size (the paper's 4, at "
                               "which the guidance LoRAs are trained). Lower = more guidance tokens: 2 with scale 2 "
                               "uses the previous stage as it is, with 8K steps ~1.9x as long."),
            ],
            outputs=[
                io.Image.Output(display_name="image", tooltip="The upscaled image of the last stage."),
                io.Latent.Output(display_name="latent", tooltip="Its latent, for the next Recursive Upscale."),
            ],
        )  # fmt: skip

    @classmethod
    def execute(
        cls, model, positive, negative, vae, seed, stages, scale, steps, skip, cfg, sampler_name, scheduler, method,
        sharpen, shift_mu, guidance_scope, guidance_ratio=D.guidance_ratio, latent=None, image=None,
    ) -> io.NodeOutput:  # fmt: skip
        if latent is None and image is None:
            raise UltraGenPatchError("Recursive Upscale: connect a latent or an image to upscale")
        if latent is None:  # the image as the VAE encodes it (cropped to its grid), so that it is the latent's
            image = vae.vae_encode_crop_pixels(image)
        samples = latent["samples"] if latent is not None else exact_encode(vae, image)
        settings = StageSettings(
            scale=scale, steps=steps, skip=skip, cfg=cfg, sampler_name=sampler_name, scheduler=scheduler,
            method=method, sharpen=sharpen, shift_mu=shift_mu, guidance_scope=guidance_scope,
            guidance_ratio=guidance_ratio,
        )  # fmt: skip
        out, decoded = recursive_upscale(model, positive, negative, vae, samples, stages, settings, seed, image)
        return io.NodeOutput(decoded, {"samples": out})
