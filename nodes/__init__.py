"""ComfyUI nodes (V3). Thin: parse inputs, call ``patch/`` and ``core/``, return outputs."""

from comfy_api.latest import ComfyExtension, io


class UltraGenExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return []
