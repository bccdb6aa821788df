"""Streamed weights page-locked again after a dropped clone unpinned them: ComfyUI's own loader calls reproduce the
loss (its pins, then a clone's ``__del__``, then a load that skips the layers already streamed), against the state
ComfyUI's first load leaves (every streamed weight pinned); and the run's first model call re-pins them."""

from __future__ import annotations

import gc

import pytest
import torch

pytestmark = pytest.mark.usefixtures("comfyui")


def _pins_streamed_weights() -> bool:
    """ComfyUI 0.29's legacy loader page-locks what it streams; 0.3.64 has no pinning at all."""
    import comfy.model_management as mm
    import comfy.model_patcher

    return hasattr(comfy.model_patcher.ModelPatcher, "pin_weight_to_device") and mm.MAX_PINNED_MEMORY > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked memory needs CUDA")
def test_streamed_weights_unpinned_by_a_dropped_clone_are_pinned_again():
    from ultragen.patch.streamed_pins import repin_streamed_weights, streamed_weights

    from patching import patched
    from random_models import tiny_flux

    base = tiny_flux(seed=0, device=torch.device("cuda"))
    half = base.model_size() // 2
    first = base.clone()
    first.partially_load(first.load_device, extra_memory=half)  # ComfyUI streams the layers past half the weights
    streamed = streamed_weights(first)
    assert streamed and 0 < sum(p.nbytes for p in streamed.values()) < base.model_size()
    if not _pins_streamed_weights():  # ComfyUI 0.3.64: nothing pinned, nothing to pin again
        assert not any(p.is_pinned() for p in streamed.values())
        assert repin_streamed_weights(patched(base)) == 0
        return
    assert all(p.is_pinned() for p in streamed.values())  # ComfyUI's own first load: every streamed weight pinned

    del first
    gc.collect()  # the clone's __del__ unpins the set every clone shares
    assert not any(p.is_pinned() for p in streamed.values())
    ours = patched(base)
    ours.partially_load(ours.load_device, extra_memory=0)  # the same room: ComfyUI skips the layers streamed already
    now = streamed_weights(ours)
    assert now and now.keys() <= streamed.keys() and not any(p.is_pinned() for p in now.values())

    assert repin_streamed_weights(ours) == sum(p.nbytes for p in now.values())
    assert all(p.is_pinned() for p in now.values()) and set(now) <= ours.pinned  # in ComfyUI's books
    assert repin_streamed_weights(ours) == 0  # nothing left to pin
    ours.detach()  # ComfyUI's unload unpins them itself
    assert not any(p.is_pinned() for p in now.values())


def test_a_sampling_run_repins_once_at_its_first_model_call(monkeypatch):
    """Wiring: every run asks once, after ComfyUI has loaded the model, with the patcher it samples."""
    from ultragen.patch import flux_patch

    from comfy_flux import conditioning, ksampler
    from patching import patched
    from random_models import tiny_flux

    asked = []
    monkeypatch.setattr(flux_patch, "repin_streamed_weights", lambda patcher: asked.append(patcher) or 0)
    model = patched(tiny_flux(seed=0))
    latent = torch.zeros(1, 16, 16, 16)
    for _ in range(2):
        ksampler(model, latent, conditioning(8, 0), conditioning(8, 1), steps=3)  # 3 steps x cond and uncond
    assert len(asked) == 2 and all(p.model is model.model for p in asked)
