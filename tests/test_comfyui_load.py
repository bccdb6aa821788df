"""The pack loads in a real ComfyUI through its own custom-node loader."""

import asyncio
import inspect
import logging

from conftest import PACK_ROOT


def test_pack_loads_and_logs_its_attention_backend_once(comfyui, caplog):
    import nodes  # ComfyUI's nodes.py

    caplog.set_level(logging.INFO)
    result = nodes.load_custom_node(str(PACK_ROOT))
    if inspect.iscoroutine(result):
        result = asyncio.run(result)
    assert result is True
    lines = [r.getMessage() for r in caplog.records if "attention backend" in r.getMessage()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("UltraGen ")
    assert any(name in lines[0] for name in ("triton block-sparse kernel", "flex_attention", "portable SDPA"))
    for node_id, name in (
        ("UltraGenAttentionPatch", "UltraGen Attention Patch"),
        ("UltraGenLowResGuidanceEncode", "Low-Res Guidance Encode"),
        ("UltraGenWarmStartLatent", "Warm-Start Latent"),
        ("UltraGenStructureGuidance", "Structure Guidance"),
        ("UltraGenConstantShiftSigmas", "Constant-Shift Sigmas"),
    ):
        assert node_id in nodes.NODE_CLASS_MAPPINGS
        assert nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id] == name
