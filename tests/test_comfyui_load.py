"""The pack loads in a real ComfyUI through its own custom-node loader."""

import asyncio
import inspect
import logging

from conftest import PACK_ROOT


def _load(nodes):
    result = nodes.load_custom_node(str(PACK_ROOT))
    return asyncio.run(result) if inspect.iscoroutine(result) else result


def test_pack_loads_and_logs_its_attention_backend_once(comfyui, caplog):
    import nodes  # ComfyUI's nodes.py
    from ultragen.nodes import NODES

    caplog.set_level(logging.INFO)
    assert _load(nodes) is True
    lines = [r.getMessage() for r in caplog.records if "attention backend" in r.getMessage()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("UltraGen ")
    assert any(name in lines[0] for name in ("triton block-sparse kernel", "flex_attention", "portable SDPA"))
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    for node in NODES:
        schema = node.GET_SCHEMA()
        assert nodes.NODE_DISPLAY_NAME_MAPPINGS[schema.node_id] == schema.display_name
    # The ids saved workflows use, written out: every one registered with ComfyUI, none renamed or lost.
    shipped = {
        "UltraGenAttentionPatch", "UltraGenLowResGuidanceEncode", "UltraGenWarmStartLatent",
        "UltraGenRecursiveUpscale", "UltraGenStructureGuidance", "UltraGenConstantShiftSigmas",
        "UltraGenVAEDecodeExact", "UltraGenVAEEncodeExact", "UltraGenSaveImage",
    }  # fmt: skip
    assert shipped <= set(nodes.NODE_CLASS_MAPPINGS)
    assert {n.GET_SCHEMA().node_id for n in NODES} == shipped


def test_a_too_old_comfyui_is_named_at_start_up(comfyui, caplog, monkeypatch):
    """As in ComfyUI 0.3.59: no attention overrides. The log says which ComfyUI to install."""
    import comfy.ldm.modules.attention

    import nodes

    monkeypatch.delattr(comfy.ldm.modules.attention, "wrap_attn")
    caplog.set_level(logging.INFO)
    _load(nodes)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "lacks attention overrides" in errors[0] and "0.3.64 or newer" in errors[0]
