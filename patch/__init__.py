"""ComfyUI integration: the FLUX patch and its sampling-side settings. Imports ComfyUI (comfy.*)."""

from .flux_patch import Guidance, PatchOptions, UltraGenFluxPatch, UltraGenPatchError
from .guidance_lora import GuidanceLoRAError, load_guidance_lora

__all__ = [
    "Guidance",
    "GuidanceLoRAError",
    "PatchOptions",
    "UltraGenFluxPatch",
    "UltraGenPatchError",
    "load_guidance_lora",
]
