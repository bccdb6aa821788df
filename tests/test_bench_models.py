"""bench/flux_step.py's architectures: the latent and text shapes it feeds each one match the model's config (the
GPU run would otherwise fail after building tens of GB of weights)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("comfyui")  # random_models builds through ComfyUI's classes
BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize("name", ["flux1-dev", "flux2-klein-4b", "flux2-klein-9b", "flux2-dev"])
def test_inputs_match_the_architecture(name, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("flux_step", None)
    import flux_step
    import random_models

    arch = flux_step.MODELS[name]
    config = getattr(random_models, arch.config)
    assert arch.channels == config["in_channels"]
    assert arch.text_width == config["context_in_dim"]
    assert arch.pooled == (config.get("vec_in_dim") is not None)
    assert config["hidden_size"] == 128 * config["num_heads"]  # ComfyUI: heads = hidden / 128
    assert sum(config["axes_dim"]) == 128
    assert arch.pixels_per_latent == (8 if arch.channels == 16 else 16)
