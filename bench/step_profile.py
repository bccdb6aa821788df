"""Where a sampling step's seconds go, in a few numbers a JSON row can keep: the largest GPU kernels and copies,
the CUDA runtime calls the host waited in (copies from pageable memory, synchronisations, the allocator's own
calls), how long the GPU was doing anything at all (its span: a step's seconds less that is time the GPU waited for
the host), and how much of the host-to-device copies ran beside a kernel (streamed weights that overlap the
compute cost little; copies that take turns with it add their whole time).

Why: on an emulated 12 GB card with bf16 weights and DynamicVRAM off, a 2048² UltraGen step took 2.61 s where
ComfyUI's dense step took 0.85 s and the same step with fp8 weights 0.69 s (2026-12-02). Whether the time goes to
streamed weights copied without overlap, to an allocator trimming and regrowing its pool near the card's cap, or
to something else is read off these numbers (``vram_cards.py --profile``).
"""

from __future__ import annotations

import contextlib
import cProfile
import pstats
from collections.abc import Iterator

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

TOP = 10


@contextlib.contextmanager
def profiled(summary: dict) -> Iterator[None]:
    """Profile the block (CPU, and CUDA where there is a GPU); fill ``summary`` (see :func:`summarize`) after it."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        yield
    summary.clear()
    summary.update(summarize(prof.key_averages()))
    summary.update(timeline(prof.events()))


@contextlib.contextmanager
def host_profiled(summary: dict) -> Iterator[None]:
    """Profile the host's Python time in the block (cProfile: far less overhead than torch's profiler on a step of
    thousands of small ops); fill ``summary`` with ``host_s`` and ``host_top``, the ``TOP`` functions by their own
    time, each ``[function, calls, seconds]``. A copy from pageable memory, or any call that waits for the GPU, shows
    as the host's time in that call (2026-12-02: 1.99 s of a 2.61 s step in ``Tensor.copy_``)."""
    prof = cProfile.Profile()
    prof.enable()
    try:
        yield
    finally:
        prof.disable()
    summary.clear()
    summary.update(host_summary(pstats.Stats(prof)))


def host_summary(stats: pstats.Stats) -> dict:
    """``host_s`` (the profiled time) and ``host_top`` from cProfile's statistics."""
    rows = []
    for (filename, line, name), (_, calls, own, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        where = name if filename == "~" else f"{filename.rsplit('/', 1)[-1]}:{line}({name})"
        rows.append([where[:80], calls, round(own, 4)])
    rows.sort(key=lambda r: -r[2])
    return {"host_s": round(stats.total_tt, 4), "host_top": rows[:TOP]}  # type: ignore[attr-defined]


def _device_us(event) -> float:
    return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)


def summarize(events) -> dict:
    """From ``key_averages()``: the ``TOP`` largest GPU items (kernels and copies) and host-side CUDA runtime calls,
    each ``[name, count, ms]``; the GPU's busy milliseconds (the sum of its items, copies included) and the
    host-to-device copies' milliseconds and count."""
    device = [(e.key, e.count, _device_us(e) / 1e3) for e in events if _device_us(e) > 0]
    runtime = [(e.key, e.count, e.self_cpu_time_total / 1e3) for e in events if e.key.startswith("cuda")]
    copies = [d for d in device if "HtoD" in d[0]]

    def top(rows):
        return [[name[:80], count, round(ms, 2)] for name, count, ms in sorted(rows, key=lambda r: -r[2])[:TOP]]

    return {
        "gpu_busy_ms": round(sum(ms for _, _, ms in device), 1),
        "h2d_ms": round(sum(ms for _, _, ms in copies), 1),
        "h2d_count": sum(count for _, count, _ in copies),
        "gpu_top": top(device),
        "runtime_top": top(runtime),
    }


def _union_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def timeline(events) -> dict:
    """From ``events()`` (each with ``name``, ``device_type`` and ``time_range`` in µs): ``gpu_span_ms``, the time any
    kernel or copy ran (overlaps counted once), and ``h2d_overlapped_ms``, the part of the host-to-device copies'
    time during which some other GPU work ran."""
    device = [(e.time_range.start, e.time_range.end, "HtoD" in e.name) for e in events
              if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start]  # fmt: skip
    copies = [(start, end) for start, end, h2d in device if h2d]
    other = [(start, end) for start, end, h2d in device if not h2d]
    both = _union_us(copies) + _union_us(other) - _union_us(copies + other)
    return {"gpu_span_ms": round(_union_us(copies + other) / 1e3, 1), "h2d_overlapped_ms": round(both / 1e3, 1)}
