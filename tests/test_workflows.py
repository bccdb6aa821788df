"""The shipped workflows: ComfyUI's template browser offers them, they load, validate in ComfyUI,
and run end to end in its executor."""

from __future__ import annotations

import asyncio
import glob
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.usefixtures("comfyui")

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"  # build.py, and the API files in api/
UI_DIR = ROOT / "example_workflows"  # what ComfyUI's template browser lists
API_DIR = WORKFLOWS / "api"
FLUX2_NAMES = ["flux2_klein_4k_from_1k", "flux2_klein_8k_recursive"]  # need ComfyUI 0.29's FLUX.2 nodes
NAMES = ["flux_2k_from_1k", "flux_4k_from_1k", "flux_8k_recursive", "scalediff_4k", *FLUX2_NAMES]
MODEL_FILES = {
    "diffusion_models": ["flux1-dev.safetensors", "flux-2-klein-4b.safetensors"],
    "text_encoders": ["clip_l.safetensors", "t5xxl_fp16.safetensors", "qwen_3_4b.safetensors"],
    "vae": ["ae.safetensors", "flux2-vae.safetensors"],
}
FLUX2_NODES = {"EmptyFlux2LatentImage", "Flux2Scheduler"}


def host_lacks_flux2(name: str) -> bool:
    """A FLUX.2 workflow on a ComfyUI without FLUX.2 (0.3.64): it cannot load there, and must say why."""
    import nodes

    return name in FLUX2_NAMES and not FLUX2_NODES <= set(nodes.NODE_CLASS_MAPPINGS)


SIZE_INPUTS = ("width", "height", "target_width", "target_height")


@pytest.fixture(scope="module")
def registry(comfyui):
    sys.path.insert(0, str(WORKFLOWS))
    import build

    build.load_node_registry(build.HERE.parent)
    return build


@pytest.fixture
def model_files(tmp_path):
    """Empty files with the workflows' model names, so that ComfyUI's validation finds them."""
    import folder_paths

    for folder, names in MODEL_FILES.items():
        (tmp_path / folder).mkdir()
        for name in names:
            (tmp_path / folder / name).touch()
        folder_paths.add_model_folder_path(folder, str(tmp_path / folder))
    return tmp_path


def load(name: str):
    return json.loads((UI_DIR / f"{name}.json").read_text()), json.loads((API_DIR / f"{name}.api.json").read_text())


def is_ui_workflow(data) -> bool:
    """What the frontend needs to open a file as a workflow: the UI format's version and node list."""
    return (
        isinstance(data, dict) and isinstance(data.get("version"), (int, float)) and isinstance(data.get("nodes"), list)
    )


def is_api_workflow(data) -> bool:
    """ComfyUI's API format: node id -> {"class_type", "inputs"}."""
    return (
        isinstance(data, dict)
        and bool(data)
        and all(isinstance(v, dict) and "class_type" in v and "inputs" in v for v in data.values())
    )


def _template_browser(tmp_path, monkeypatch, module: str):
    """ComfyUI's own template routes for this pack installed as ``custom_nodes/<module>``: the
    files its scan matched, what ``/workflow_templates`` lists, and what the browser gets when it
    opens each listed name (status, body)."""
    import folder_paths
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer
    from app import custom_node_manager

    custom_nodes = tmp_path / "custom_nodes"
    custom_nodes.mkdir()
    (custom_nodes / module).symlink_to(ROOT, target_is_directory=True)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "custom_nodes", ([str(custom_nodes)], set()))
    matched: list[str] = []

    def recording_glob(pattern, *args, **kwargs):
        found = glob.glob(pattern, *args, **kwargs)
        matched.extend(found)
        return found

    monkeypatch.setattr(custom_node_manager, "glob", SimpleNamespace(glob=recording_glob))
    routes = web.RouteTableDef()
    app = web.Application()
    custom_node_manager.CustomNodeManager().add_routes(routes, app, [(module, str(custom_nodes / module))])
    app.add_routes(routes)

    async def browse():
        async with TestClient(TestServer(app)) as client:
            listing = await (await client.get("/workflow_templates")).json()
            opened = {}
            for name in listing.get(module, []):
                response = await client.get(f"/api/workflow_templates/{module}/{name}.json")
                opened[name] = (response.status, await response.text())
            return listing, opened

    listing, opened = asyncio.run(browse())
    return [Path(f) for f in matched], listing, opened


def test_template_browser_lists_and_opens_every_ui_workflow(comfyui, tmp_path, monkeypatch):
    module = "ComfyUI-UltraGen"
    _, listing, opened = _template_browser(tmp_path, monkeypatch, module)
    assert sorted(listing.get(module, [])) == sorted(NAMES), listing
    for name, (status, body) in opened.items():  # what the browser gets when it opens each listed name
        assert status == 200, (name, status)
        assert is_ui_workflow(json.loads(body)), name
        assert body == (UI_DIR / f"{name}.json").read_text()


def test_no_api_file_where_the_template_scan_looks(comfyui, tmp_path, monkeypatch):
    matched, _, _ = _template_browser(tmp_path, monkeypatch, "ComfyUI-UltraGen")
    assert matched
    for f in matched:  # every file ComfyUI's scan lists, in whichever of its folders it found it
        data = json.loads(f.read_text())
        assert not is_api_workflow(data), f"{f}: an API-format file where the template browser lists it"
        assert is_ui_workflow(data), f"{f}: the template browser would fail to open it"
    api_files = sorted(API_DIR.glob("*.api.json"))
    assert [f.name for f in api_files] == sorted(f"{name}.api.json" for name in NAMES)
    declared = sorted(f.name for f in API_DIR.glob("*.json") if f not in api_files)
    assert declared == sorted(f"{name}.inputs.json" for name in NAMES)  # what ultragen-run's options set
    assert all(is_api_workflow(json.loads(f.read_text())) for f in api_files)
    assert not {f.resolve() for f in api_files} & {f.resolve() for f in matched}


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_matches_the_registry_and_its_api_version(registry, name):
    ui, api = load(name)
    if host_lacks_flux2(name):
        import nodes

        missing = {n["type"] for n in ui["nodes"] if n["type"] != "Note"} - set(nodes.NODE_CLASS_MAPPINGS)
        assert missing == FLUX2_NODES  # exactly FLUX.2's nodes; everything else exists here too
        return
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert any(n["type"] == "Note" for n in ui["nodes"]), "every workflow explains itself in a Note"
    converted = {}
    for n in ui["nodes"]:
        if n["type"] == "Note":
            continue
        inputs_def, outputs_def = registry.definition(n["type"])  # raises if the node type does not exist
        values = iter(n["widgets_values"])
        inputs = {}
        for input_name, _, widget, seed, _ in inputs_def:
            if widget:
                inputs[input_name] = next(values)
                if seed:
                    assert next(values) in ("fixed", "randomize", "increment", "decrement")
        assert next(values, None) is None, f"{n['type']}: more widget values than widgets"
        for socket in n["inputs"]:
            if socket["link"] is not None:
                link = next(lk for lk in ui["links"] if lk[0] == socket["link"])
                source = nodes[link[1]]
                assert source["outputs"][link[2]]["type"] == socket["type"] == link[5]
                assert link[3] == n["id"]
                inputs[socket["name"]] = [str(link[1]), link[2]]
        # The files are written against the oldest ComfyUI we support; a newer one may append outputs
        # to a node (0.29's SaveImage returns its IMAGE), which a loaded workflow simply leaves unconnected.
        assert [o["type"] for o in n["outputs"]] == [t for _, t in outputs_def][: len(n["outputs"])]
        converted[str(n["id"])] = {"class_type": n["type"], "inputs": inputs}
    assert converted == {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}


@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_passes_comfyuis_validation(registry, model_files, name):
    import execution

    _, api = load(name)
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt("test", api, None))
    if host_lacks_flux2(name):  # ComfyUI itself says which node types it lacks
        assert not valid and "Flux2" in json.dumps(error), error
        return
    assert valid, (error, node_errors)
    assert outputs


def _small(prompt: dict) -> dict:
    """The same workflow at 1/16 of the size, with tiny step counts for a CPU."""
    prompt = json.loads(json.dumps(prompt))
    for node in prompt.values():
        inputs = node["inputs"]
        for key in SIZE_INPUTS:
            if key in inputs and not isinstance(inputs[key], list):
                inputs[key] //= 16
        if node["class_type"] in ("KSampler", "UltraGenWarmStartLatent", "UltraGenRecursiveUpscale"):
            inputs["steps"] = min(inputs["steps"], 4)
            if "skip" in inputs:
                inputs["skip"] = min(inputs["skip"], 1)
        if node["class_type"] == "UltraGenAttentionPatch" and inputs["mode"] == "npa":
            inputs["window"] = 4
    return prompt


@pytest.mark.parametrize("name", NAMES)
def test_workflow_runs_end_to_end_in_comfyuis_executor(registry, model_files, tmp_path, monkeypatch, name):
    import execution
    import folder_paths

    import nodes

    from comfy_flux import RecordingServer, TinyCLIP, TinyFlux2Text, flux_loaders, flux_vae, prompt_executor, tiny_flux
    from random_models import tiny_flux2

    if host_lacks_flux2(name):
        return  # cannot run here (see the validation test); runs on ComfyUI 0.29
    loaders = flux_loaders(
        lambda name: tiny_flux2(seed=1) if name.startswith("flux-2") else tiny_flux(seed=1),
        lambda name: TinyFlux2Text() if name.startswith("qwen") else TinyCLIP(),
        lambda name: flux_vae(seed=2, flux2=name.startswith("flux2")),
    )
    for key, cls in loaders.items():
        monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, key, cls)
    out_dir = tmp_path / "output"
    out_dir.mkdir()
    monkeypatch.setattr(folder_paths, "output_directory", str(out_dir))

    _, api = load(name)
    prompt = _small(api)
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt("test", prompt, None))
    assert valid, (error, node_errors)
    server = RecordingServer()
    executor = prompt_executor(server)
    executor.execute(prompt, "test", {}, outputs)
    errors = [m for m in server.messages if m[0] == "execution_error"]
    assert executor.success, errors
    saved = sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*.png"))
    prefixes = sorted(n["inputs"]["filename_prefix"] for n in prompt.values() if n["class_type"] == "UltraGenSaveImage")
    assert len(saved) == len(prefixes) and all(any(s.startswith(p) for s in saved) for p in prefixes), saved


# -- how the workflows read when opened ---------------------------------------------------------
VIEWPORT = (1280, 720)  # a laptop's browser window, in screen pixels
CHROME = (58, 85)  # the frontend's left toolbar and top bars (tabs, graph breadcrumb), screen pixels
TITLE_BAR = 30  # drawn above a node's position


def drawn_height(registry, node: dict) -> int:
    """What ComfyUI's frontend draws: 20 px a socket row, 24 px a widget (seed controls included), 14 px of
    margins, 80 px more per multiline text box — 366 px for the Attention Patch, as seen in the frontend."""
    import nodes

    if node["type"] == "Note":
        return node["size"][1]
    spec = nodes.NODE_CLASS_MAPPINGS[node["type"]].INPUT_TYPES()
    multiline = sum(1 for sec in spec.values() if isinstance(sec, dict) for e in sec.values()
                    if len(e) > 1 and isinstance(e[1], dict) and e[1].get("multiline"))  # fmt: skip
    rows = max(len(node["inputs"]), len(node["outputs"]))
    return 20 * rows + 24 * len(node["widgets_values"]) + 14 + 80 * multiline


@pytest.mark.parametrize("name", NAMES)
def test_layout_reads_left_to_right_without_overlaps(registry, name):
    ui, _ = load(name)
    if host_lacks_flux2(name):
        return  # node heights come from ComfyUI 0.29's registry
    boxes = {}
    for n in ui["nodes"]:
        (x, y), (w, h) = n["pos"], n["size"]
        boxes[n["id"]] = (x, y, x + w, y + max(h, drawn_height(registry, n)))
    ids = sorted(boxes)
    for i, a in enumerate(ids):
        for b in ids[i + 1 :]:
            (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = boxes[a], boxes[b]
            assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0, f"nodes {a} and {b} overlap"
    # The Note, title bar included, is in sight when the workflow opens: the saved view in a laptop-sized window,
    # clear of the frontend's left toolbar and top bars (CHROME; seen in ComfyUI 0.29's frontend).
    ds = ui["extra"]["ds"]
    x0, y0, x1, y1 = next(boxes[n["id"]] for n in ui["nodes"] if n["type"] == "Note")
    screen = [(v + ds["offset"][i % 2]) * ds["scale"] for i, v in enumerate((x0, y0 - TITLE_BAR, x1, y1))]
    assert screen[0] >= CHROME[0] and screen[1] >= CHROME[1], screen
    assert screen[2] <= VIEWPORT[0] and screen[3] <= VIEWPORT[1], screen
    # One group per stage, left to right, each holding its nodes; the first is the 1K base.
    groups = ui["groups"]
    assert [g["title"] for g in groups][0] == "1K base" and len(groups) >= 2
    lefts = [g["bounding"][0] for g in groups]
    assert lefts == sorted(lefts)
    for g, nxt in zip(groups, groups[1:], strict=False):
        assert g["bounding"][0] + g["bounding"][2] <= nxt["bounding"][0]
    for n in ui["nodes"]:
        if n["type"] == "Note":
            continue
        x0, y0, x1, y1 = boxes[n["id"]]
        gx, gy, gw, gh = next(b for b in (g["bounding"] for g in groups) if b[0] <= x0 < b[0] + b[2])
        assert gy <= y0 and y1 <= gy + gh and x1 <= gx + gw, f"node {n['id']} sticks out of its group"


@pytest.mark.parametrize("name", NAMES)
def test_every_node_has_a_title_of_its_own(registry, name):
    import nodes

    ui, _ = load(name)
    if host_lacks_flux2(name):
        return  # display names come from ComfyUI 0.29's registry
    shown = [n.get("title") or nodes.NODE_DISPLAY_NAME_MAPPINGS.get(n["type"], n["type"]) for n in ui["nodes"]]
    assert len(shown) == len(set(shown)), sorted(t for t in shown if shown.count(t) > 1)


def test_every_output_of_the_packs_nodes_says_what_it_is(comfyui):
    from ultragen.nodes import NODES

    outputs = [(n.GET_SCHEMA().node_id, o) for n in NODES for o in n.GET_SCHEMA().outputs]
    assert len(outputs) == 11
    assert all(o.tooltip for _, o in outputs), [node for node, o in outputs if not o.tooltip]
