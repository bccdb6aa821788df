"""A workflow queued on a running ComfyUI over its HTTP API, with progress over its websocket.

Why: on a render server ComfyUI is already running with its models loaded; queueing there
(``POST /prompt``) reuses it. The websocket (``/ws?clientId=``) reports each node and sampling step;
when the prompt is done its images are fetched from ``/history`` and ``/view`` into ``--out``.
ComfyUI's validation errors come back from ``/prompt`` and are explained as in-process runs do;
Ctrl-C asks the server to stop (``POST /interrupt``). Needs aiohttp, which ComfyUI itself requires.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from pathlib import Path
from typing import TextIO

from .declared import RunError
from .local import Progress, RunResult, invalid_workflow


def run_on_server(
    prompt: dict, url: str, out_dir: Path, stream: TextIO = sys.stderr, timeout: float = 24 * 3600
) -> RunResult:
    """Queue ``prompt`` on the ComfyUI at ``url`` and wait for it; its images land in ``out_dir``."""
    url = url.rstrip("/")
    try:
        return asyncio.run(_run(prompt, url, Path(out_dir), stream, timeout))
    except KeyboardInterrupt:
        asyncio.run(_post(url, "/interrupt", {}))
        stream.write("\nultragen-run: asked the server to stop the prompt\n")
        return RunResult("cancelled", [], 0.0, "cancelled on the server")


async def _post(url: str, route: str, body: dict) -> tuple[int, dict]:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.post(url + route, json=body) as response:
        text = await response.text()
        return response.status, (json.loads(text) if text.strip().startswith("{") else {})


async def _run(prompt: dict, url: str, out_dir: Path, stream: TextIO, timeout: float) -> RunResult:
    import aiohttp

    client_id = f"ultragen-run-{uuid.uuid4()}"
    progress = Progress(prompt, stream, client_id=client_id)
    start = time.perf_counter()
    try:
        session = aiohttp.ClientSession()
    except Exception as exc:  # pragma: no cover - aiohttp missing or broken
        raise RunError(f"cannot talk to {url}: {exc}") from exc
    async with session:
        try:
            ws = await session.ws_connect(f"{url.replace('http', 'ws', 1)}/ws?clientId={client_id}")
        except aiohttp.ClientError as exc:
            raise RunError(f"no ComfyUI answers at {url} ({exc}); start one, or leave out --server") from exc
        async with ws:
            async with session.post(f"{url}/prompt", json={"prompt": prompt, "client_id": client_id}) as response:
                answer = await response.json(content_type=None)
            if response.status != 200:
                raise invalid_workflow(answer.get("error") or {}, answer.get("node_errors") or {})
            prompt_id = answer["prompt_id"]
            status = await _follow(ws, prompt_id, progress, timeout)
        stream.write("\n")
        images = await _fetch_images(session, url, prompt_id, out_dir)
    seconds = time.perf_counter() - start
    if status == "failed":
        error = next((d for e, d in progress.messages if e == "execution_error"), {})
        message = f"node {error.get('node_id')} ({error.get('node_type')}) failed: {error.get('exception_message')}"
        return RunResult("failed", images, seconds, message.strip())
    if status == "cancelled":
        return RunResult("cancelled", images, seconds, "cancelled on the server; the images saved before are kept")
    return RunResult("done", images, seconds)


async def _follow(ws, prompt_id: str, progress: Progress, timeout: float) -> str:
    """Relay the server's messages about ``prompt_id`` until it ends: "done", "failed" or "cancelled"."""
    import aiohttp

    deadline = time.monotonic() + timeout
    while True:
        message = await ws.receive(timeout=max(1.0, deadline - time.monotonic()))
        if message.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
            raise RunError("the server closed the connection before the prompt finished")
        if message.type != aiohttp.WSMsgType.TEXT:
            continue  # binary previews
        event = json.loads(message.data)
        kind, data = event.get("type"), event.get("data") or {}
        if data.get("prompt_id") not in (None, prompt_id):
            continue
        if kind == "progress":
            progress.step(data.get("value", 0), data.get("max", 1))
            continue
        if kind == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
            return "done"
        progress.send_sync(kind, data)
        if kind == "execution_error":
            return "failed"
        if kind == "execution_interrupted":
            return "cancelled"
        # execution_success comes before the prompt's history is stored; "executing" with no node comes after


async def _fetch_images(session, url: str, prompt_id: str, out_dir: Path) -> list[Path]:
    """The prompt's output images (``/history``), downloaded from ``/view`` under ``out_dir``."""
    async with session.get(f"{url}/history/{prompt_id}") as response:
        history = (await response.json(content_type=None)).get(prompt_id, {})
    saved = []
    for output in history.get("outputs", {}).values():
        for image in output.get("images", []):
            if image.get("type") != "output":
                continue
            params = {"filename": image["filename"], "subfolder": image.get("subfolder", ""), "type": "output"}
            async with session.get(f"{url}/view", params=params) as response:
                data = await response.read()
            path = out_dir / image.get("subfolder", "") / image["filename"]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            saved.append(path)
    return sorted(saved)
