"""Node "Constant-Shift Sigmas": a FLUX schedule with one shift at every resolution."""

from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io

from ..core.flow_matching import FLUX_MU_1024
from ..patch.sampling import constant_shift_sigmas
from ..patch.warm_start import WarmStartOptions

D = WarmStartOptions()  # the schedule part of its defaults


class UltraGenConstantShiftSigmas(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="UltraGenConstantShiftSigmas",
            display_name="Constant-Shift Sigmas",
            category="UltraGen",
            description=(
                "FLUX sigmas with a fixed shift at any size. ComfyUI's ModelSamplingFlux raises the shift with the "
                "image area, which at 4K puts every step at full noise; the papers keep 1024 px's shift."
            ),
            inputs=[
                io.Int.Input("steps", default=D.steps, min=1, max=200, tooltip="Number of steps."),
                io.Float.Input(
                    "shift_mu", default=D.shift_mu, min=0.0, max=10.0, step=0.01,
                    tooltip=f"The constant shift (1024 px FLUX: {FLUX_MU_1024}).",
                ),
                io.Combo.Input(
                    "scheduler", options=list(comfy.samplers.SCHEDULER_NAMES), default=D.scheduler,
                    tooltip="ComfyUI scheduler (FLUX: simple).",
                ),
            ],
            outputs=[io.Sigmas.Output(display_name="sigmas", tooltip="The schedule, for a sampler's sigmas.")],
        )  # fmt: skip

    @classmethod
    def execute(cls, steps, shift_mu, scheduler) -> io.NodeOutput:
        return io.NodeOutput(constant_shift_sigmas(steps, shift_mu, scheduler))
