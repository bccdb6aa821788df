"""Node "Constant-Shift Sigmas": a FLUX schedule with one shift at every resolution."""

from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io

from ..patch.sampling import constant_shift_sigmas


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
                io.Int.Input("steps", default=28, min=1, max=200, tooltip="Number of steps."),
                io.Float.Input(
                    "shift_mu", default=1.15, min=0.0, max=10.0, step=0.01,
                    tooltip="The constant shift (1024 px FLUX: 1.15).",
                ),
                io.Combo.Input(
                    "scheduler", options=list(comfy.samplers.SCHEDULER_NAMES), default="simple",
                    tooltip="ComfyUI scheduler (FLUX: simple).",
                ),
            ],
            outputs=[io.Sigmas.Output(display_name="sigmas")],
        )  # fmt: skip

    @classmethod
    def execute(cls, steps, shift_mu, scheduler) -> io.NodeOutput:
        return io.NodeOutput(constant_shift_sigmas(steps, shift_mu, scheduler))
