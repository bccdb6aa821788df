"""bench/step_profile.summarize against hand-made profiler records: what it keeps, what it adds up."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import step_profile  # noqa: E402


def _event(key, count, device_us=0.0, cpu_us=0.0):
    return SimpleNamespace(key=key, count=count, self_device_time_total=device_us, self_cpu_time_total=cpu_us)


def test_summary_adds_gpu_items_and_copies_and_ranks_runtime_calls():
    events = [
        _event("ampere_bf16_gemm", 40, device_us=300_000),
        _event("Memcpy HtoD (Pageable -> Device)", 120, device_us=900_000),
        _event("Memcpy DtoD (Device -> Device)", 5, device_us=1_000),
        _event("aten::mm", 40, cpu_us=2_000),  # host-side operator: neither GPU time nor a runtime call
        _event("cudaMemcpyAsync", 120, cpu_us=850_000),
        _event("cudaStreamSynchronize", 3, cpu_us=10_000),
    ]
    s = step_profile.summarize(events)
    assert s["gpu_busy_ms"] == 1201.0  # 300 + 900 + 1 ms: kernels and copies
    assert s["h2d_ms"] == 900.0 and s["h2d_count"] == 120
    assert s["gpu_top"][0] == ["Memcpy HtoD (Pageable -> Device)", 120, 900.0]
    assert [r[0] for r in s["runtime_top"]] == ["cudaMemcpyAsync", "cudaStreamSynchronize"]


def test_profiled_fills_the_summary_from_a_real_profile():
    import torch

    summary = {"stale": 1}
    with step_profile.profiled(summary):
        torch.ones(64, 64) @ torch.ones(64, 64)
    assert "stale" not in summary and set(summary) == {"gpu_busy_ms", "h2d_ms", "h2d_count", "gpu_top",
                                                       "runtime_top"}  # fmt: skip
