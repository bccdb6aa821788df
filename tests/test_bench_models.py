"""bench/flux_step.py's architectures: the configs follow ComfyUI's rules for reading a checkpoint, and the inputs
the benchmarks feed each one (shapes read from that config) fit it (the GPU run would otherwise fail after building
tens of GB of weights)."""

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
    assert config["hidden_size"] == 128 * config["num_heads"]  # ComfyUI: heads = hidden / 128
    assert sum(config["axes_dim"]) == 128
    # latent channels by hand: FLUX.1's VAE 16 channels at 1/8, FLUX.2's 32 unshuffled 2x2: 128 at 1/16
    assert (arch.channels, arch.pixels_per_latent) == ((16, 8) if name == "flux1-dev" else (128, 16))
    assert arch.pooled == (name == "flux1-dev") and arch.config_class == ("Flux" if name == "flux1-dev" else "Flux2")
