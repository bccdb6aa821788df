"""Bench-only: modules a bare GPU machine's Python may lack, stubbed so that ComfyUI's ``nodes.py`` imports.

ComfyUI 0.29 imports PyAV, pydantic, torchaudio ... at import time for video, audio and server nodes that
``bench/pipeline.py`` never runs. Put this folder on ``PYTHONPATH`` and name the modules to stub in
``STUB_MODULES`` (comma-separated): each is stubbed only if it is not installed (the names stubbed are printed).
Never used by the pack or its tests.
"""

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import types

NAMES = set(filter(None, os.environ.get("STUB_MODULES", "").split(",")))


class _Any(type):
    def __getattr__(cls, name):
        return _Dummy

    def __or__(cls, other):
        return cls

    __ror__ = __or__


class _Dummy(metaclass=_Any):
    def __init__(self, *a, **k):
        pass


class _Module(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Dummy


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] not in NAMES:
            return None
        return importlib.machinery.ModuleSpec(name, self, is_package=True)

    def create_module(self, spec):
        m = _Module(spec.name)
        m.__path__ = []
        return m

    def exec_module(self, module):
        pass


missing = set()
for n in NAMES:
    try:
        if importlib.util.find_spec(n) is None:
            missing.add(n)
    except Exception:
        missing.add(n)
NAMES = missing
if NAMES:
    sys.meta_path.append(_Finder())
    print(f"[bench stubs] {sorted(NAMES)}", file=sys.stderr)
