"""``ultragen-run``: a workflow run without the canvas, in-process through ComfyUI's executor."""
