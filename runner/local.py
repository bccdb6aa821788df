"""A workflow run in this process through ComfyUI's own validation and executor.

Why in-process: batch users and servers want the pack's workflows without the canvas and without
a ComfyUI server to start; ComfyUI's ``PromptExecutor`` runs exactly what the queue would (caching,
progress, errors per node). Before anything loads, ComfyUI's validation names the missing model
files; Ctrl-C interrupts the way ComfyUI's cancel button does.
"""

from __future__ import annotations

import asyncio
import inspect
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from .declared import RunError

# Where ComfyUI looks for the files of the usual loaders' inputs (models/<folder>).
MODEL_FOLDERS = {
    "unet_name": "diffusion_models", "clip_name": "text_encoders", "clip_name1": "text_encoders",
    "clip_name2": "text_encoders", "vae_name": "vae", "ckpt_name": "checkpoints", "lora_name": "loras",
    "guidance_lora": "loras", "control_net_name": "controlnet", "model_name": "upscale_models",
}  # fmt: skip
MODEL_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".gguf")


def load_comfyui(explicit: str | None, cpu: bool, like_main: bool = False, dynamic_vram: bool | None = None) -> Path:
    """Import ComfyUI (found as the tests find it) with its extra nodes, installed custom nodes and this pack;
    ``like_main``: on a GPU, with the allocator and DynamicVRAM ComfyUI's main.py would choose (``gpu_start.py``);
    ``dynamic_vram`` True / False: DynamicVRAM on / off whatever main.py's rule says (``comfy_env.import_comfyui``)."""
    from ..comfy_env import PACK_ROOT, ComfyUINotUsable, find_comfyui, import_comfyui

    path = find_comfyui(explicit)
    if path is None:
        raise RunError("no ComfyUI found: pass --comfyui /path/to/ComfyUI or set COMFYUI_PATH")
    try:
        import_comfyui(path, cpu=cpu, also=("nodes", "execution"), like_main=like_main, dynamic_vram=dynamic_vram)
    except ComfyUINotUsable as exc:
        raise RunError(str(exc)) from exc
    import folder_paths

    import nodes

    if "FluxGuidance" not in nodes.NODE_CLASS_MAPPINGS:  # ComfyUI's extra nodes, and the installed custom nodes
        installed = all(Path(p).is_dir() for p in folder_paths.get_folder_paths("custom_nodes"))
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=installed, init_api_nodes=False))
    if "UltraGenAttentionPatch" not in nodes.NODE_CLASS_MAPPINGS:  # a checkout outside custom_nodes/
        asyncio.run(nodes.load_custom_node(str(PACK_ROOT)))
    return path


def validate(prompt: dict) -> list[str]:
    """Output node ids to run; raises naming every missing model file (then every other problem)."""
    import execution

    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(str(uuid.uuid4()), prompt, None))
    if valid:
        return outputs
    raise invalid_workflow(error, node_errors)


def invalid_workflow(error: dict, node_errors: dict) -> RunError:
    """ComfyUI's validation result as one message: every missing model file first, then the rest."""
    missing, other = [], []
    for node_id, entry in (node_errors or {}).items():
        for e in entry.get("errors", []):
            info = e.get("extra_info") or {}
            value, name = info.get("received_value"), info.get("input_name", "")
            if e.get("type") == "value_not_in_list" and isinstance(value, str) and value.endswith(MODEL_SUFFIXES):
                folder = MODEL_FOLDERS.get(name, "the loader's folder")
                missing.append(f"models/{folder}/{value} (node {node_id}, {entry.get('class_type')}.{name})")
            else:
                other.append(f"node {node_id} ({entry.get('class_type')}): {e.get('message')}: {e.get('details')}")
    if missing:
        return RunError("missing model files, nothing was loaded:\n  " + "\n  ".join(missing))
    detail = "\n  ".join(other) or f"{(error or {}).get('message')}: {(error or {}).get('details')}"
    return RunError(f"the workflow does not validate:\n  {detail}")


@dataclass
class Progress:
    """Stands in for ComfyUI's server: node and step progress on ``stream``, the messages kept."""

    prompt: dict
    stream: TextIO = sys.stderr
    client_id: str = "ultragen-run"  # ComfyUI sends its progress messages only to a client
    last_node_id: str | None = None
    messages: list[tuple[str, dict]] = field(default_factory=list)
    done: int = 0

    def send_sync(self, event: str, data: dict, sid=None) -> None:
        self.messages.append((event, data))
        if event == "executing" and data.get("node") is not None:
            node = self.prompt.get(str(data["node"]), {})
            title = (node.get("_meta") or {}).get("title") or node.get("class_type", data["node"])
            self.done += 1
            self.stream.write(f"\n[{self.done}/{len(self.prompt)}] {title}")
            self.stream.flush()

    def step(self, value, total, *args, **kwargs) -> None:
        """ComfyUI's progress-bar hook: a sampler's steps (or any node's own progress)."""
        width = 24
        filled = int(width * value / max(total, 1))
        self.stream.write(f"\r    {'#' * filled}{'.' * (width - filled)} {value}/{total}")
        self.stream.flush()


@dataclass
class RunResult:
    status: str  # "done", "cancelled" or "failed"
    images: list[Path]
    seconds: float
    message: str = ""


def prompt_executor(server):
    """ComfyUI's PromptExecutor, given the cache settings its ``main.py`` would give (0.29 reads them)."""
    import execution

    if "cache_args" in inspect.signature(execution.PromptExecutor).parameters:  # ComfyUI 0.29
        return execution.PromptExecutor(server, cache_args={"lru": 0, "ram": 0.0, "ram_inactive": 0.0})
    return execution.PromptExecutor(server)


def run(prompt: dict, out_dir: Path, stream: TextIO = sys.stderr) -> RunResult:
    """Validate (missing files first), then execute ``prompt``; images are saved under ``out_dir``."""
    import comfy.model_management
    import comfy.utils
    import folder_paths

    outputs = validate(prompt)
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    previous_output = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(out_dir))
    before = set(out_dir.rglob("*"))
    progress = Progress(prompt, stream)
    comfy.utils.set_progress_bar_global_hook(progress.step)

    def cancel(signum, frame):  # Ctrl-C: what ComfyUI's cancel button does
        comfy.model_management.interrupt_current_processing(True)
        stream.write("\nultragen-run: cancelling after the current step...\n")

    previous = signal.signal(signal.SIGINT, cancel) if _main_thread() else None
    start = time.perf_counter()
    try:
        executor = prompt_executor(progress)
        executor.execute(prompt, str(uuid.uuid4()), {"client_id": progress.client_id}, outputs)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        comfy.utils.set_progress_bar_global_hook(None)
        comfy.model_management.interrupt_current_processing(False)
        folder_paths.set_output_directory(previous_output)
    seconds = time.perf_counter() - start
    stream.write("\n")
    images = sorted(p for p in set(out_dir.rglob("*")) - before if p.is_file())
    events = [e for e, _ in progress.messages]
    if "execution_interrupted" in events:
        return RunResult("cancelled", images, seconds, "cancelled; the images saved before are kept")
    if not executor.success:
        error = next((d for e, d in progress.messages if e == "execution_error"), {})
        message = f"node {error.get('node_id')} ({error.get('node_type')}) failed: {error.get('exception_message')}"
        return RunResult("failed", images, seconds, message.strip())
    return RunResult("done", images, seconds)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
