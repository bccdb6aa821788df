"""NTK-aware RoPE scaling.

Why: at 4K and 8K the image spans far more positions than FLUX saw in training. Raising
RoPE's base theta (NTK-aware scaling, as UltraGen and I-Max do with factor 10) stretches
the low frequencies so long distances look familiar while nearby positions keep almost
their original rotation.
"""

from __future__ import annotations


def ntk_theta(theta: float, dim: int, factor: float) -> float:
    """Base for an axis of ``dim`` rotary channels scaled by ``factor``: theta * factor^(dim / (dim - 2))."""
    if factor <= 0:
        raise ValueError(f"NTK factor must be positive, got {factor}")
    if factor == 1 or dim <= 2:
        return float(theta)
    return float(theta) * factor ** (dim / (dim - 2))
