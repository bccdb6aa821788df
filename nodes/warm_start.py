"""Node "Warm-Start Latent": the low-res result upsampled, and the sigmas left to run."""

from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io

from ..core.flow_matching import FLUX_MU_1024
from ..patch.flux_family import shift_mu_for
from ..patch.warm_start import METHODS, WarmStartOptions, upsample_latent, warm_start_sigmas

D = WarmStartOptions()  # defaults, from UltraGen


class UltraGenWarmStartLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="UltraGenWarmStartLatent",
            display_name="Warm-Start Latent",
            category="UltraGen",
            description=(
                "Starts the high-res pass from your low-res image instead of from noise: upsamples the latent to the "
                "target size and gives the sigmas that remain after skipping the first steps. Connect LATENT to "
                "SamplerCustomAdvanced's latent_image and SIGMAS to its sigmas; the sampler adds the right noise."
            ),
            inputs=[
                io.Latent.Input("latent", tooltip="The low-res latent (e.g. from the 1024 px KSampler)."),
                io.Int.Input(
                    "target_width", default=4096, min=64, max=16384, step=16, tooltip="Target width in pixels."
                ),
                io.Int.Input(
                    "target_height", default=4096, min=64, max=16384, step=16, tooltip="Target height in pixels."
                ),
                io.Combo.Input(
                    "method", options=list(METHODS), default=D.method,
                    tooltip="latent bicubic: fast, keeps structure (UltraGen). RGB upsample: decode, upsample, "
                    "re-encode (clean but soft). LFM mix: low band of the first + high band of the second "
                    "(ScaleDiff). RGB and LFM need the VAE.",
                ),
                io.Float.Input(
                    "sharpen", default=D.sharpen, min=0.0, max=2.0, step=0.05,
                    tooltip="Unsharp-mask amount on the upsampled image (0 = off; 0.2-0.5 counters upsampling blur).",
                ),
                io.Int.Input("steps", default=D.steps, min=1, max=200, tooltip="Total steps of the full schedule."),
                io.Int.Input(
                    "skip", default=D.skip, min=0, max=199,
                    tooltip="Steps skipped from the start (UltraGen: 10 of 28). More = closer to the low-res "
                    "image and faster; fewer = more freedom for new detail.",
                ),
                io.Float.Input(
                    "start_sigma", default=D.start_sigma, min=0.0, max=1.0, step=0.01,
                    tooltip="Start at exactly this noise level instead (0 = use skip). ScaleDiff restarts at 0.6.",
                ),
                io.Float.Input(
                    "shift_mu", default=D.shift_mu, min=0.0, max=10.0, step=0.01,
                    tooltip=f"Constant FLUX shift of the schedule, at any size. The default ({FLUX_MU_1024}, FLUX.1's "
                    "at 1024 px) means the model's own: on a FLUX.2 latent, FLUX.2's 2.02.",
                ),
                io.Combo.Input(
                    "scheduler", options=list(comfy.samplers.SCHEDULER_NAMES), default=D.scheduler,
                    tooltip="ComfyUI scheduler of the full schedule (FLUX: simple).",
                ),
                io.Vae.Input("vae", optional=True, tooltip="The FLUX VAE; needed by RGB upsample and LFM mix."),
            ],
            outputs=[
                io.Latent.Output(display_name="latent", tooltip="The upsampled latent, the sampler's latent_image."),
                io.Sigmas.Output(display_name="sigmas", tooltip="The sigmas left to run, for the sampler's sigmas."),
            ],
        )  # fmt: skip

    @classmethod
    def execute(
        cls, latent, target_width, target_height, method, sharpen, steps, skip, start_sigma, shift_mu, scheduler,
        vae=None,
    ) -> io.NodeOutput:  # fmt: skip
        mu = shift_mu_for(latent["samples"].shape[1], shift_mu)  # FLUX.2's latent: its own shift for the default
        sigmas = warm_start_sigmas(steps, skip, start_sigma, mu, scheduler)  # check before heavy work
        samples = upsample_latent(latent["samples"], target_width, target_height, method, vae, sharpen)
        out = {k: v for k, v in latent.items() if k not in ("samples", "noise_mask")}
        out["samples"] = samples
        return io.NodeOutput(out, sigmas)
