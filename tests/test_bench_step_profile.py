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
                                                       "runtime_top", "gpu_span_ms", "h2d_overlapped_ms"}  # fmt: skip


def _on_gpu(name, start, end):
    from torch.autograd import DeviceType

    return SimpleNamespace(name=name, device_type=DeviceType.CUDA, time_range=SimpleNamespace(start=start, end=end))


def test_timeline_spans_the_gpu_work_once_and_finds_copies_beside_kernels():
    from torch.autograd import DeviceType

    events = [
        _on_gpu("Memcpy HtoD (Pinned -> Device)", 0, 400),  # beside the first kernel for 300 us
        _on_gpu("gemm", 100, 700),
        _on_gpu("gemm", 650, 900),  # overlaps the first kernel: counted once
        _on_gpu("Memcpy HtoD (Pageable -> Device)", 1000, 1500),  # alone: the GPU computes nothing meanwhile
        _on_gpu("Memcpy DtoD (Device -> Device)", 1400, 1600),  # other GPU work beside the copy's last 100 us
        SimpleNamespace(name="aten::mm", device_type=DeviceType.CPU, time_range=SimpleNamespace(start=0, end=5000)),
    ]
    t = step_profile.timeline(events)
    assert t["gpu_span_ms"] == 1.5  # 0-900 and 1000-1600 us
    assert t["h2d_overlapped_ms"] == 0.4  # 100-400 and 1400-1500 us


def test_a_profiled_cells_line_says_span_and_overlap():
    import vram_cards

    profile = {
        "gpu_busy_ms": 1500.0,
        "gpu_span_ms": 1200.0,
        "h2d_ms": 700.0,
        "h2d_count": 300,
        "h2d_overlapped_ms": 200.0,
        "runtime_top": [["cudaMemcpyAsync", 300, 650.0]],
        "gpu_top": [],
    }
    row = {"card_gib": 12, "weights": "bf16", "pixels": 2048, "mode": "ultragen", "status": "runs", "s": 1.9,
           "peak_gib": 10.2, "weights_gib": 9.2, "activations_u": 8.6, "profile": profile}  # fmt: skip
    line = vram_cards._line(row)
    assert "span 1200 ms" in line and "700 ms x300 (200 ms beside other GPU work)" in line
    assert "cudaMemcpyAsync 650 ms x300" in line


def test_host_profile_names_the_call_the_host_waited_in():
    """A function that sleeps 50 ms stands in for a copy that blocks the host: it must lead host_top with about
    that time, and host_s must cover it (cProfile's own clock, not this test's)."""
    import time

    def blocking_copy():
        time.sleep(0.05)

    summary = {"stale": 1}
    with step_profile.host_profiled(summary):
        for _ in range(2):
            blocking_copy()
        sum(range(1000))
    assert set(summary) == {"host_s", "host_top"}
    name, calls, seconds = summary["host_top"][0]
    assert name == "<built-in method time.sleep>"
    assert calls == 2 and 0.09 <= seconds < 0.5
    assert summary["host_s"] >= seconds
