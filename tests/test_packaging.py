"""Registry metadata (pyproject.toml's [tool.comfy]) agrees with the code and the repository. No ComfyUI needed.

Why: ComfyUI-Manager and the Comfy Registry read pyproject.toml, not the code. The ComfyUI range
they enforce must be the one patch/host.py checks at run time, the icon they show must exist, and
the dependencies they list must be those requirements.txt installs.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from PIL import Image

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml on Python 3.10 needs tomli")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
COMFY = PYPROJECT["tool"]["comfy"]
MAX_ICON_PX = 400
# requirements.txt is what ComfyUI-Manager / comfy-cli pip-install into ComfyUI's Python; it leaves
# these out on purpose (they come with ComfyUI, and installing them could replace its CUDA PyTorch).
LEFT_TO_COMFYUI = {"torch", "triton"}


def oldest_comfyui() -> str:
    """``OLDEST_COMFYUI`` as written in patch/host.py.

    Read from the source rather than imported: importing ``ultragen.patch.host`` runs
    ``patch/__init__.py``, which imports the FLUX patch and with it ComfyUI.
    """
    tree = ast.parse((ROOT / "patch" / "host.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "OLDEST_COMFYUI" for t in node.targets
        ):
            return ast.literal_eval(node.value)
    raise AssertionError("patch/host.py no longer defines OLDEST_COMFYUI")


def test_requires_comfyui_is_the_oldest_comfyui_the_patch_accepts():
    assert COMFY["requires-comfyui"] == ">=" + oldest_comfyui()


def test_icon_is_a_small_square_png_in_this_repository():
    repository = PYPROJECT["project"]["urls"]["Repository"]
    prefix = repository.replace("https://github.com/", "https://raw.githubusercontent.com/", 1) + "/main/"
    icon_url = COMFY["Icon"]
    assert repository.startswith("https://github.com/") and icon_url.startswith(prefix), icon_url
    relative = icon_url.removeprefix(prefix)
    path = ROOT / relative
    assert path.is_file(), f"Icon points at {relative}, which is not in the repository"
    if (ROOT / ".git").exists() and shutil.which("git"):
        tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files", "--error-unmatch", relative], capture_output=True)
        assert tracked.returncode == 0, f"{relative} is not committed, so its raw GitHub URL would not exist"
    assert path.stat().st_size < 100_000
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width == image.height <= MAX_ICON_PX, image.size


def _requirements(lines: list[str]) -> dict[str, Requirement]:
    requirements = [Requirement(line) for line in lines]
    return {canonicalize_name(r.name): r for r in requirements}


def test_pyproject_and_requirements_txt_list_the_same_dependencies():
    text = (ROOT / "requirements.txt").read_text(encoding="utf-8")
    lines = [line.split(" #")[0].strip() for line in text.splitlines()]
    from_txt = _requirements([line for line in lines if line and not line.startswith("#")])
    from_pyproject = _requirements(PYPROJECT["project"]["dependencies"])
    for name in from_txt.keys() & from_pyproject.keys():
        assert str(from_txt[name]) == str(from_pyproject[name]), name
    assert from_txt.keys() == from_pyproject.keys(), "pyproject.toml and requirements.txt install different things"
    assert not from_txt.keys() & LEFT_TO_COMFYUI  # never replace ComfyUI's own CUDA PyTorch
    comments = " ".join(line for line in text.splitlines() if line.lstrip().startswith("#"))
    assert all(name in comments for name in LEFT_TO_COMFYUI), "requirements.txt should say why it omits them"
    extra = _requirements(PYPROJECT["project"]["optional-dependencies"]["torch"])
    assert extra.keys() == LEFT_TO_COMFYUI  # outside ComfyUI they come from the "torch" extra
