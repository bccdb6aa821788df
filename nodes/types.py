"""Custom socket types of the pack."""

from comfy_api.latest import io

# A low-res guidance latent and the size it guides (patch.Guidance).
UltraGenGuidance = io.Custom("ULTRAGEN_GUIDANCE")
