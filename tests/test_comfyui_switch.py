"""Without a ComfyUI, its tests skip under one line saying how to enable them; where CI demands
them (``ULTRAGEN_REQUIRE_COMFYUI=1``, set by tests/run-all) they fail instead of skipping.

Checked in a fresh pytest process, without COMFYUI_PATH, on the pack's own load test.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ultragen.comfy_env import find_comfyui

from conftest import HOW_TO_ENABLE, PACK_ROOT


def pytest_without_comfyui(**env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("COMFYUI_PATH", "ULTRAGEN_REQUIRE_COMFYUI")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", "tests/test_comfyui_load.py"],
        cwd=PACK_ROOT, env={**environ, **env}, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


@pytest.fixture(autouse=True)
def no_surrounding_comfyui(monkeypatch):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    if find_comfyui() is not None:
        pytest.skip("this pack sits in a ComfyUI's custom_nodes/, so its ComfyUI tests always find one")


def test_without_comfyui_its_tests_skip_under_one_line():
    result = pytest_without_comfyui()
    assert result.returncode == 0, result.stdout
    skips = [line for line in result.stdout.splitlines() if line.startswith("SKIPPED")]
    assert len(skips) == 1 and "SKIPPED [2]" in skips[0] and HOW_TO_ENABLE in skips[0], result.stdout


def test_where_ci_demands_comfyui_its_tests_fail_instead():
    result = pytest_without_comfyui(ULTRAGEN_REQUIRE_COMFYUI="1")
    assert result.returncode != 0
    assert "2 errors" in result.stdout and "ULTRAGEN_REQUIRE_COMFYUI is set but" in result.stdout, result.stdout
