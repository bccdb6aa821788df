"""Core math: token orders and attention layouts. Imports torch and kernels/, never ComfyUI."""

from .layout import Layout, TokenTable
from .rules import AttentionRules, GuidanceSegment, ImageSegment, LayoutError, ReferenceSegment, TextSegment
from .token_order import WindowOrder, window_first_order

__all__ = [
    "AttentionRules",
    "GuidanceSegment",
    "ImageSegment",
    "Layout",
    "LayoutError",
    "ReferenceSegment",
    "TextSegment",
    "TokenTable",
    "WindowOrder",
    "window_first_order",
]
