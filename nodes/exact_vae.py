"""Nodes "VAE Decode (Exact, Low Memory)" and "VAE Encode (Exact, Low Memory)"."""

from __future__ import annotations

from comfy_api.latest import io

from ..patch.exact_vae import exact_decode, exact_encode
from ..patch.vae_memory import OFFLOAD


def _offload_input():
    return io.Combo.Input(
        "offload", options=list(OFFLOAD), default="auto",
        tooltip="Keep the full-size activations in CPU memory and stream them through the GPU in bands: auto does "
        "so only for those the GPU has no room for (8K on cards under ~100 GB; an 8K decode on a 12-24 GB card then "
        "needs about 40 GB of free system RAM), and if the GPU still runs out it runs again with all of them in CPU "
        "memory; always bounds GPU memory to a few GB; never keeps them on the GPU.",
    )  # fmt: skip


_WHY = (
    "Gives exactly what a full-image VAE pass gives (no tiles, no seams) with bounded memory: each layer runs in "
    "row bands with overlapping edges, and normalisation uses the whole image. For 4K-8K images, where the plain "
    "node runs out of memory and ComfyUI's tiled node blends tiles."
)


class UltraGenVAEDecodeExact(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="UltraGenVAEDecodeExact",
            display_name="VAE Decode (Exact, Low Memory)",
            category="UltraGen",
            description="Decodes a latent into an image. " + _WHY,
            inputs=[
                io.Latent.Input("samples", tooltip="The latent to decode."),
                io.Vae.Input("vae", tooltip="The VAE (FLUX: ae.safetensors)."),
                _offload_input(),
            ],
            outputs=[io.Image.Output(tooltip="The decoded image, exactly as a full-image VAE Decode gives it.")],
        )

    @classmethod
    def execute(cls, samples, vae, offload="auto") -> io.NodeOutput:
        return io.NodeOutput(exact_decode(vae, samples["samples"], offload=offload))


class UltraGenVAEEncodeExact(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="UltraGenVAEEncodeExact",
            display_name="VAE Encode (Exact, Low Memory)",
            category="UltraGen",
            description="Encodes an image into a latent. " + _WHY,
            inputs=[
                io.Image.Input("pixels", tooltip="The image to encode."),
                io.Vae.Input("vae", tooltip="The VAE (FLUX: ae.safetensors)."),
                _offload_input(),
            ],
            outputs=[io.Latent.Output(tooltip="The encoded latent, exactly as a full-image VAE Encode gives it.")],
        )

    @classmethod
    def execute(cls, pixels, vae, offload="auto") -> io.NodeOutput:
        return io.NodeOutput({"samples": exact_encode(vae, pixels, offload=offload)})
