"""ComfyUI nodes (V3). Thin: parse inputs, call ``patch/`` and ``core/``, return outputs."""

from comfy_api.latest import ComfyExtension, io

from .attention_patch import UltraGenAttentionPatch
from .exact_vae import UltraGenVAEDecodeExact, UltraGenVAEEncodeExact
from .guidance_encode import UltraGenLowResGuidanceEncode
from .recursive_upscale import UltraGenRecursiveUpscale
from .save_image import UltraGenSaveImage
from .sigmas import UltraGenConstantShiftSigmas
from .structure_guidance import UltraGenStructureGuidance
from .warm_start import UltraGenWarmStartLatent

NODES: list[type[io.ComfyNode]] = [
    UltraGenAttentionPatch,
    UltraGenLowResGuidanceEncode,
    UltraGenWarmStartLatent,
    UltraGenStructureGuidance,
    UltraGenConstantShiftSigmas,
    UltraGenVAEDecodeExact,
    UltraGenVAEEncodeExact,
    UltraGenRecursiveUpscale,
    UltraGenSaveImage,
]


class UltraGenExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES
