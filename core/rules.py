"""The vocabulary of attention layouts: token kinds, sequence segments and the rules.

Why a module of its own: the layout (``layout.py``) and the tile classifier
(``tile_classifier.py``) both speak it, and a reader should find the rules in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import UltraGenError

TEXT, IMAGE, GUIDANCE, REFERENCE = 0, 1, 2, 3
KIND_NAMES = {TEXT: "text", IMAGE: "image", GUIDANCE: "guidance", REFERENCE: "reference"}


class LayoutError(UltraGenError, ValueError):
    """A layout or rule setting that cannot work; the message says what to change."""


@dataclass(frozen=True)
class TextSegment:
    """``length`` text tokens (their order does not matter to any rule)."""

    length: int


@dataclass(frozen=True)
class ImageSegment:
    """The high-res image: a (height, width) token grid in window-first order."""

    height: int
    width: int
    window: tuple[int, int] = (16, 16)
    token_order: Literal["window-first", "hilbert"] = "window-first"  # windows in raster order, or Hilbert


@dataclass(frozen=True)
class GuidanceSegment:
    """Low-res guidance tokens: their own (height, width) grid, scaled onto the image.

    A guidance token belongs to the image window that contains its scaled centre;
    guidance tokens are ordered like those windows, so local rules see contiguous runs.
    """

    height: int
    width: int


@dataclass(frozen=True)
class ReferenceSegment:
    """Other reference tokens (e.g. Kontext reference latents): context, seen by everyone.

    They attend like text: to context, or to everything with ``text_sees="all"``.
    """

    length: int


Segment = TextSegment | ImageSegment | GuidanceSegment | ReferenceSegment
SEGMENT_KIND = {TextSegment: TEXT, ImageSegment: IMAGE, GuidanceSegment: GUIDANCE, ReferenceSegment: REFERENCE}


@dataclass(frozen=True)
class AttentionRules:
    """Who may attend to whom. Defaults follow UltraGen. Everyone sees text and references.

    - ``text_sees``: text and reference queries see the context (text, references, guidance), or
      ``"all"`` tokens;
    - ``image_sees``: image queries see image keys in their window's ``neighbour_radius`` windows, or
      ScaleDiff's ``"npa"`` neighbourhood of their patch;
    - ``guidance_scope``: image queries see all guidance tokens, or (``"local"``) those whose home
      window lies within ``guidance_radius`` windows of theirs;
    - ``guidance_self_scope``: guidance queries see all guidance tokens, or those within
      ``guidance_self_radius`` windows.
    """

    text_sees: Literal["context", "all"] = "context"
    image_sees: Literal["windows", "npa"] = "windows"
    neighbour_radius: int = 1
    npa_patch: int = 32
    npa_window: int = 64
    npa_offset: tuple[int, int] = (0, 0)
    guidance_scope: Literal["global", "local"] = "local"
    guidance_radius: int = 1
    guidance_self_scope: Literal["global", "local"] = "global"
    guidance_self_radius: int = 2

    @classmethod
    def npa(cls, patch: int = 32, window: int = 64, offset: tuple[int, int] = (0, 0), **kw) -> AttentionRules:
        """ScaleDiff's Neighborhood Patch Attention; text sees everything by default."""
        kw.setdefault("text_sees", "all")
        return cls(image_sees="npa", npa_patch=patch, npa_window=window, npa_offset=offset, **kw)

    def check(self) -> None:
        choices = {
            "text_sees": ("context", "all"),
            "image_sees": ("windows", "npa"),
            "guidance_scope": ("global", "local"),
            "guidance_self_scope": ("global", "local"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise LayoutError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("neighbour_radius", "guidance_radius", "guidance_self_radius"):
            if getattr(self, name) < 0:
                raise LayoutError(f"{name} must be 0 or more windows, got {getattr(self, name)}")
        if self.npa_patch < 1 or self.npa_window < self.npa_patch:
            raise LayoutError(
                f"NPA needs patch >= 1 and key window >= patch, got patch {self.npa_patch}, window {self.npa_window}"
            )
        if not all(0 <= o < self.npa_patch for o in self.npa_offset):
            raise LayoutError(f"NPA offset must lie in [0, patch={self.npa_patch}), got {self.npa_offset}")
