"""Test setup: Triton's interpreter on machines without a GPU, and the real ComfyUI on demand.

ComfyUI integration tests ask for the ``comfyui`` fixture. Without a ComfyUI they skip, all
under one summary line that says how to enable them; with ``ULTRAGEN_REQUIRE_COMFYUI=1``
(set by ``tests/run-all``, hence by CI) they fail instead, so that a CI run can never pass
while quietly testing nothing of the host.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Must be set before Triton kernels are defined (at import of ultragen.kernels).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ultragen.comfy_env import PACK_ROOT, ComfyUINotUsable, find_comfyui, import_comfyui

HOW_TO_ENABLE = (
    "ComfyUI integration tests need a real ComfyUI: run tests/run-all (builds an environment with ComfyUI's "
    "requirements and tests against ../shared/comfyui), or set COMFYUI_PATH=/path/to/ComfyUI in an environment "
    "where that ComfyUI's requirements.txt is installed, or run pytest from the pack in ComfyUI/custom_nodes/"
)
REQUIRED = os.environ.get("ULTRAGEN_REQUIRE_COMFYUI", "") not in ("", "0")

__all__ = ["PACK_ROOT"]


def _unavailable(reason: str):
    if REQUIRED:
        pytest.fail(f"ULTRAGEN_REQUIRE_COMFYUI is set but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def comfyui() -> Path:
    """Import the real ComfyUI (CPU mode when there is no GPU); skip with instructions if absent."""
    path = find_comfyui()
    if path is None:
        _unavailable(HOW_TO_ENABLE)
    try:
        import_comfyui(path, cpu=not torch.cuda.is_available(), also=("comfy.sd", "nodes"))
    except ComfyUINotUsable as exc:
        _unavailable(f"{exc}. {HOW_TO_ENABLE}")
    return path


@pytest.fixture(autouse=True)
def kernels_as_users_run_them(request, monkeypatch):
    """In ComfyUI tests, kernels dispatch as on a user's machine: Triton on CUDA only. Under
    ``TRITON_INTERPRET=1`` the RoPE kernel would otherwise run in Triton's CPU interpreter at every
    attention call, several times slower than the whole model; ``tests/test_rope.py`` checks it."""
    if "comfyui" in request.fixturenames:
        from ultragen.kernels import rope

        monkeypatch.setattr(rope, "triton_runs_on", lambda device: device.type == "cuda" and rope.triton is not None)


@pytest.fixture(autouse=True)
def kernels_do_not_fall_back(request):
    """A Triton kernel that fails hands its work to PyTorch's path (``KernelGuard``), which computes the same
    values: a test of the kernel would pass without it. Every test starts with no kernel failed and must end so,
    except those that simulate a failure (``@pytest.mark.kernel_failure``)."""
    from ultragen.kernels.triton_env import GUARDS

    for guard in GUARDS:
        guard.failure = None
    yield
    failed = [f"{guard.what}: {guard.failure}" for guard in GUARDS if guard.failure]
    if request.node.get_closest_marker("kernel_failure") is None:
        assert not failed, f"a Triton kernel failed and fell back to PyTorch: {failed}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Report every "needs ComfyUI" skip at this file's location, so ``-ra`` folds them into one line."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and isinstance(report.longrepr, tuple) and HOW_TO_ENABLE in str(report.longrepr[2]):
        report.longrepr = (__file__, 0, report.longrepr[2])


@pytest.fixture
def slices(monkeypatch):
    """Set the slice size of the chunked blocks (tokens)."""
    from ultragen.patch import chunked_blocks

    def set_size(tokens: int) -> None:
        monkeypatch.setattr(chunked_blocks, "MAX_CHUNK_TOKENS", tokens)

    return set_size
