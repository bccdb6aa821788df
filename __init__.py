"""UltraGen for ComfyUI: fast, coherent 2K-8K FLUX generation (ComfyUI entry point).

ComfyUI imports this file and calls :func:`comfy_entrypoint`. Everything that needs
ComfyUI is imported inside it, so ``kernels`` and ``core`` stay importable (and testable)
without ComfyUI.
"""

import logging

__version__ = "0.1.0"

log = logging.getLogger("UltraGen")


async def comfy_entrypoint():
    """V3 entry point: log the attention backend once, return the extension."""
    from .kernels import describe_backend
    from .nodes import UltraGenExtension

    try:
        backend = describe_backend()
    except Exception as exc:  # a broken GPU stack must not stop ComfyUI from starting
        backend = f"unknown ({exc})"
    logging.info(f"UltraGen {__version__}: attention backend: {backend}")
    return UltraGenExtension()
