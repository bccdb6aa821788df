"""ComfyUI integration: the FLUX patch and its sampling-side settings. Imports ComfyUI (comfy.*)."""

from ..core.guidance_lora import GuidanceLoRAError, load_guidance_lora
from .flux_patch import UltraGenFluxPatch
from .options import Guidance, PatchOptions, UltraGenPatchError

__all__ = [
    "Guidance",
    "GuidanceLoRAError",
    "PatchOptions",
    "UltraGenFluxPatch",
    "UltraGenPatchError",
    "load_guidance_lora",
]
