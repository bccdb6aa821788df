"""``ultragen-run WORKFLOW.api.json --prompt "..." --seed N --width W --height H --out DIR``

Runs a shipped (or any API-format) workflow in this process through ComfyUI's executor (or queues it
on a running ComfyUI with ``--server URL``): progress
per node and per sampling step, images saved in ``--out``, missing model files listed before
anything loads, Ctrl-C cancels cleanly. Which inputs ``--prompt``, ``--seed``, ``--width`` and
``--height`` set is declared per workflow (``<name>.inputs.json`` beside it); ``--set`` sets any input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .declared import OPTIONS, RunError, apply_options, load_workflow

SHIPPED = Path(__file__).resolve().parents[1] / "workflows" / "api"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ultragen-run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("workflow", help=f"an API-format workflow, or a shipped one by name ({_shipped_names()})")
    p.add_argument("--prompt", help="the text prompt")
    p.add_argument("--seed", type=int, help="the seed (each stage of a chain uses seed + its index)")
    p.add_argument("--width", type=int, help="width of the final image in pixels (a multiple of 16)")
    p.add_argument("--height", type=int, help="height of the final image in pixels (a multiple of 16)")
    p.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                   help="set any input of the workflow (JSON values; repeatable)")  # fmt: skip
    p.add_argument("--out", default="ultragen-output", help="folder for the saved images (default: %(default)s)")
    p.add_argument("--server", metavar="URL", help="queue on this running ComfyUI (e.g. http://127.0.0.1:8188) "
                   "instead of running in this process")  # fmt: skip
    p.add_argument("--comfyui", help="ComfyUI checkout (default: $COMFYUI_PATH, or the ComfyUI this pack is in)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU (slow; for trying a workflow out)")
    return p


def _shipped_names() -> str:
    return ", ".join(sorted(p.name.removesuffix(".api.json") for p in SHIPPED.glob("*.api.json")))


def resolve(workflow: str) -> Path:
    path = Path(workflow)
    if path.is_file():
        return path
    shipped = SHIPPED / f"{workflow.removesuffix('.api.json')}.api.json"
    if shipped.is_file():
        return shipped
    raise RunError(f"no workflow {workflow!r}: give a path to an API-format .json or one of {_shipped_names()}")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        path = resolve(args.workflow)
        prompt, declared = load_workflow(path)
        options = {o: getattr(args, o) for o in OPTIONS}
        prompt = apply_options(prompt, declared, options, args.set, path.name)
        if args.server:
            from .server import run_on_server

            result = run_on_server(prompt, args.server, Path(args.out))
        else:
            from .local import load_comfyui, run

            load_comfyui(args.comfyui, args.cpu, like_main=True)  # the GPU set up as the artist's ComfyUI sets it
            result = run(prompt, Path(args.out))
    except RunError as exc:
        raise SystemExit(f"ultragen-run: {exc}") from None
    for image in result.images:
        print(image)
    if result.status == "cancelled":
        print(f"ultragen-run: {result.message}", file=sys.stderr)
        return 130
    if result.status == "failed":
        raise SystemExit(f"ultragen-run: {result.message}")
    print(f"ultragen-run: done in {result.seconds:.1f} s, {len(result.images)} image(s) in {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
