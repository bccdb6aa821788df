"""Core math: token orders and attention layouts. Imports torch and kernels/, never ComfyUI."""

from .layout import (
    AttentionRules,
    GuidanceSegment,
    ImageSegment,
    Layout,
    LayoutError,
    ReferenceSegment,
    TextSegment,
)
from .token_order import WindowOrder, window_first_order

__all__ = [
    "AttentionRules",
    "GuidanceSegment",
    "ImageSegment",
    "Layout",
    "LayoutError",
    "ReferenceSegment",
    "TextSegment",
    "WindowOrder",
    "window_first_order",
]
