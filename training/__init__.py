"""Guidance LoRA training (peft) for the UltraGen patch: ``ultragen-train``."""
