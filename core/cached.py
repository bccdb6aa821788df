"""The per-process caches of layout tables, tile schedules, token orders and low-pass matrices, and
their release.

Why: these are built on the device the model runs on (GPU tables and schedules of up to tens of MB
per layout at 8192^2) and reused by every block and step of a sampling run, but module-level caches
outlive it, out of reach of ComfyUI's model unloading. The patch releases them when a sampling run
ends (``patch/run_state.PatchRun.close``); calls outside a sampler (benchmarks, tests) keep them.
"""

from __future__ import annotations

from . import frequency, layout, token_order

_CACHES = (
    layout._guidance_order,
    layout._token_table,
    layout._predicate,
    layout._schedule,
    token_order._window_first_order,
    frequency._axis_low_pass,
)


def cached_entries() -> int:
    """How many results the caches hold now."""
    return sum(fn.cache_info().currsize for fn in _CACHES)


def release() -> None:
    """Drop every cached table, schedule, order and matrix (the next use builds them again)."""
    for fn in _CACHES:
        fn.cache_clear()
