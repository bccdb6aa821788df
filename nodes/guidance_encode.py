"""Node "Low-Res Guidance Encode": the low-res image as guidance for a high-res sampler."""

from __future__ import annotations

from comfy_api.latest import io

from ..core.guidance import aspect_mismatch
from ..patch import Guidance, UltraGenPatchError
from ..patch.flux_family import not_a_flux_latent, pixels_per_latent
from .types import UltraGenGuidance


class UltraGenLowResGuidanceEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="UltraGenLowResGuidanceEncode",
            display_name="Low-Res Guidance Encode",
            category="UltraGen",
            description=(
                "Turns a low-resolution image (or its latent) into guidance for UltraGen Attention Patch: a small "
                "copy of the whole picture that the high-res windows look at (each at its own area), so the big "
                "image keeps one composition. The papers use a guidance 4x smaller than the target (e.g. 1024 px "
                "for 4096 px)."
            ),
            inputs=[
                io.Int.Input(
                    "target_width", default=4096, min=64, max=16384, step=16,
                    tooltip="Width in pixels of the high-res image this guidance is for.",
                ),
                io.Int.Input(
                    "target_height", default=4096, min=64, max=16384, step=16,
                    tooltip="Height in pixels of the high-res image this guidance is for.",
                ),
                io.Image.Input(
                    "image", optional=True,
                    tooltip="The low-res image (connect this and a VAE, or a latent instead).",
                ),
                io.Vae.Input("vae", optional=True, tooltip="The FLUX VAE (FLUX.1's or FLUX.2's), to encode the image."),
                io.Latent.Input(
                    "latent", optional=True,
                    tooltip="The low-res latent (e.g. the output of the low-res KSampler), instead of image + VAE.",
                ),
            ],
            outputs=[UltraGenGuidance.Output(
                display_name="guidance",
                tooltip="The low-res image as guidance for UltraGen Attention Patch at the target size.",
            )],
        )  # fmt: skip

    @classmethod
    def execute(cls, target_width, target_height, image=None, vae=None, latent=None) -> io.NodeOutput:
        if (image is None) == (latent is None):
            raise UltraGenPatchError(
                "Low-Res Guidance Encode: connect either an image (with a VAE) or a latent, not both"
            )
        if image is not None:
            if vae is None:
                raise UltraGenPatchError("Low-Res Guidance Encode: an image needs the VAE connected to encode it")
            samples = vae.encode(image[:, :, :, :3])
            px = int(vae.spacial_compression_encode())
        else:
            samples = latent["samples"]
            px = None
        if samples.dim() != 4:
            raise UltraGenPatchError(
                f"Low-Res Guidance Encode: expected an image latent (B, C, H, W), got {tuple(samples.shape)}"
            )
        px = px or pixels_per_latent(samples.shape[1])
        if px is None:
            raise UltraGenPatchError(f"Low-Res Guidance Encode: {not_a_flux_latent(samples.shape[1])}")
        width, height = samples.shape[-1] * px, samples.shape[-2] * px
        if width > target_width or height > target_height:
            raise UltraGenPatchError(
                f"Low-Res Guidance Encode: the guidance ({width}x{height} px) is larger than the target "
                f"({target_width}x{target_height} px); guidance is the low-res version of the target"
            )
        target_cells = (target_width // px, target_height // px)
        if aspect_mismatch(samples.shape[-1], samples.shape[-2], *target_cells):
            raise UltraGenPatchError(
                f"Low-Res Guidance Encode: the guidance ({width}x{height} px) and the target ({target_width}x"
                f"{target_height} px) differ in shape, so the guidance would be stretched; make the low-res image "
                "the target's aspect ratio (or set the target to a multiple of the low-res size)"
            )
        return io.NodeOutput(Guidance(samples.detach().cpu().float(), target_width, target_height, px))
