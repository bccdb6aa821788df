"""Every error the pack raises about its inputs has one base, and keeps its builtin one.

Reference: the list of the pack's error classes, found by reading every module's source (so that a
new error class without the base fails here).
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from ultragen.errors import UltraGenError

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("", "kernels", "core", "patch", "nodes", "training", "evaluation")


def error_classes() -> list[tuple[str, str]]:
    """(module, class) for every class whose name ends in Error / NotUsable, read from the sources."""
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            module = ".".join(p for p in ("ultragen", package, path.stem) if p)
            for node in tree.body:
                if isinstance(node, ast.ClassDef) and node.name.endswith(("Error", "NotUsable")):
                    found.append((module, node.name))
    return found


@pytest.mark.usefixtures("comfyui")  # patch/ and nodes/ import ComfyUI
def test_every_error_has_the_one_base_and_a_builtin_one():
    classes = error_classes()
    assert len(classes) >= 13
    for module, name in classes:
        cls = getattr(importlib.import_module(module), name)
        if cls is UltraGenError:
            continue
        assert issubclass(cls, UltraGenError), f"{module}.{name}"
        assert any(issubclass(cls, b) for b in (ValueError, RuntimeError, ImportError)), f"{module}.{name}"


def test_the_node_facing_layers_raise_only_the_packs_errors():
    """patch/, nodes/ and training/ reach artists: what they raise is an UltraGenError (with its message style:
    where, what is wrong, what to change), never a bare ValueError or RuntimeError."""
    bare = []
    for package in ("patch", "nodes", "training"):
        for path in sorted((ROOT / package).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                    name = getattr(node.exc.func, "id", None)
                    if name in ("ValueError", "RuntimeError", "Exception"):
                        bare.append(f"{package}/{path.name}:{node.lineno}")
    assert bare == []
