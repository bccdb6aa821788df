"""bench/emulated_card.use_allocator: PyTorch reads its allocator backend when it loads, so a benchmark asking for
another one after ``import torch`` must start again with the setting in its environment (on the H200 a late
setting failed with "Allocator backend parsed at runtime != allocator backend parsed at load time")."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPT = """
import os, sys
import torch
from emulated_card import use_allocator
print("start", os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), flush=True)
with use_allocator(sys.argv[1]):
    pass
print("ran", torch.cuda.get_allocator_backend(), flush=True)
"""


def _run(tmp_path: Path, name: str) -> subprocess.CompletedProcess:
    script = tmp_path / "ask.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "ULTRAGEN_ALLOCATOR_RERUN")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, str(script), name], env=env, capture_output=True, text=True, timeout=120)


def test_another_backend_starts_the_process_again_with_the_setting(tmp_path):
    proc = _run(tmp_path, "cudaMallocAsync")
    starts = [line for line in proc.stdout.splitlines() if line.startswith("start")]
    # the first start had no setting; the second (once, not in a loop) had it from the first's environment
    assert starts == ["start None", "start backend:cudaMallocAsync"]
    assert proc.returncode == 0, proc.stderr
    assert starts[-1] == proc.stdout.splitlines()[-2] and proc.stdout.splitlines()[-1] == "ran cudaMallocAsync"


def test_a_setting_read_at_cuda_start_needs_no_second_start(tmp_path):
    proc = _run(tmp_path, "native-expandable")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["start None", "ran native"]
