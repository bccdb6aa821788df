"""Node "Structure Guidance": keep each step's global structure close to a reference."""

from __future__ import annotations

from comfy_api.latest import io

from ..patch.structure_guidance import GAMMA_SCHEDULES, apply_structure_guidance


class UltraGenStructureGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="UltraGenStructureGuidance",
            display_name="Structure Guidance",
            category="UltraGen",
            description=(
                "ScaleDiff's Structure Guidance: at every step the coarse structure (low frequencies) of the "
                "prediction is pulled towards the reference, strongly while the image is noisy and hardly at the "
                "end, so the high-res image keeps the low-res composition and adds its own detail."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model to guide (e.g. after UltraGen Attention Patch)."),
                io.Latent.Input(
                    "reference",
                    tooltip="The reference at the target size, e.g. Warm-Start Latent's LFM output. A reference of "
                    "the same shape but another size is resized; one of another shape is an error.",
                ),
                io.Float.Input(
                    "strength", default=1.0, min=0.0, max=4.0, step=0.05,
                    tooltip="Scale of the pull; 0 turns it off.",
                ),
                io.Combo.Input(
                    "schedule", options=list(GAMMA_SCHEDULES), default="sigma",
                    tooltip="How the pull fades over the steps: sigma (ScaleDiff), sigma squared (fades faster), "
                    "constant.",
                ),
            ],
            outputs=[io.Model.Output(tooltip="The model steered toward the reference's structure.")],
        )  # fmt: skip

    @classmethod
    def execute(cls, model, reference, strength, schedule) -> io.NodeOutput:
        return io.NodeOutput(apply_structure_guidance(model, reference["samples"], strength, schedule))
