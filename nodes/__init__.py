"""ComfyUI nodes (V3). Thin: parse inputs, call ``patch/`` and ``core/``, return outputs."""

from comfy_api.latest import ComfyExtension, io

from .attention_patch import UltraGenAttentionPatch
from .guidance_encode import UltraGenLowResGuidanceEncode

NODES: list[type[io.ComfyNode]] = [UltraGenAttentionPatch, UltraGenLowResGuidanceEncode]


class UltraGenExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES
