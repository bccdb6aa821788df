"""Clean guidance tokens modulated at timestep 0 (as the UltraGen authors train them), in the real ComfyUI.

References: ComfyUI's own blocks given both modulations and ``modulation_dims`` (its per-token mechanism for
Kontext references at timestep 0), and ComfyUI's own ``vec`` at sigma 0 read from an unpatched call.
"""

from __future__ import annotations

import logging

import pytest
import torch

from patching import block_inputs, dense_block_context, guidance_of, inputs, patched, whole_blocks

pytestmark = pytest.mark.usefixtures("comfyui")


@pytest.fixture(scope="module")
def flux(comfyui):
    from comfy_flux import tiny_flux

    return tiny_flux(seed=0)


@pytest.mark.parametrize("family", ["FLUX.1", "FLUX.2"])
@pytest.mark.parametrize("tokens", [1, 5, 4096])
def test_clean_guidance_rows_are_modulated_at_timestep_zero_as_comfyui_does(comfyui, slices, family, tokens):
    """ "clean" guidance tokens take the modulation of timestep 0 (as the authors train them): block by block against
    ComfyUI's own blocks given both modulations and ``modulation_dims`` (its mechanism for Kontext references at
    timestep 0) with the guidance rows on the second; slices of 1 and 5 straddle the guidance boundary."""
    import inspect

    import comfy.ldm.flux.layers

    from ultragen.patch.chunked_blocks import double_block, single_block

    from random_models import host_has_flux2, tiny_flux, tiny_flux2

    if "modulation_dims_img" not in inspect.signature(comfy.ldm.flux.layers.DoubleStreamBlock.forward).parameters:
        assert not host_has_flux2()  # only 0.3.64 lacks per-token modulation, and FLUX.2 with it
        return  # no per-token modulation in ComfyUI's blocks to compare with
    if family == "FLUX.2" and not host_has_flux2():
        return
    dm = (tiny_flux2 if family == "FLUX.2" else tiny_flux)(depth=1, single=1).model.diffusion_model
    slices(tokens)
    # 0.3.64's apply_mod indexes the modulation as (B, D) and so broadcasts a batch of 2 over the tokens: batch 1 there
    batch = 2 if "d[2] + 1" in inspect.getsource(comfy.ldm.flux.layers.apply_mod) else 1
    n_txt, n_img, n_guid = 5, 13, 4
    img, txt, ids = block_inputs(dm, batch, n_txt, n_img, seed=12)
    g = torch.Generator().manual_seed(13)
    v, v0 = torch.randn(batch, dm.hidden_size, generator=g), torch.randn(batch, dm.hidden_size, generator=g)
    both = torch.stack((v, v0), 1)  # (B, 2, D): ComfyUI's layout for two modulations
    ctx = dense_block_context(n_guid=n_guid, vec_zero=v0, diffusion_model=dm)
    split = n_img - n_guid
    dims_img = [(0, split, 0), (split, n_img, 1)]
    dims_x = [(0, n_txt + split, 0), (n_txt + split, n_txt + n_img, 1)]
    with torch.inference_mode():
        pe = dm.pe_embedder(ids)
        block, single = dm.double_blocks[0], dm.single_blocks[0]
        x = torch.cat((txt, img), 1)
        if family == "FLUX.2":
            ours_double = (dm.double_stream_modulation_img(v), dm.double_stream_modulation_txt(v))
            ref_double = (dm.double_stream_modulation_img(both), dm.double_stream_modulation_txt(v))
            ours_single, ref_single = dm.single_stream_modulation(v)[0], dm.single_stream_modulation(both)[0]
            ref_img, ref_txt = block(img=img.clone(), txt=txt.clone(), vec=ref_double, pe=pe,
                                     modulation_dims_img=dims_img)  # fmt: skip
        else:
            ours_double, ours_single, ref_single = v, v, both
            ref_img, ref_txt = block(img=img.clone(), txt=txt.clone(), vec=both, pe=pe, modulation_dims_img=dims_img,
                                     modulation_dims_txt=[(0, n_txt, 0)])  # fmt: skip
        out = double_block(block, {"img": img.clone(), "txt": txt.clone(), "vec": ours_double, "pe": pe}, ctx, "d")
        out_img, out_txt = out["img"], out["txt"]
        ref_x = single(x.clone(), vec=ref_single, pe=pe, modulation_dims=dims_x)
        out_x = single_block(single, {"img": x.clone(), "vec": ours_single, "pe": pe}, ctx, "s")["img"]
        plain = single_block(single, {"img": x.clone(), "vec": ours_single, "pe": pe},
                             dense_block_context(n_guid=n_guid, diffusion_model=dm), "s")["img"]  # fmt: skip
    for ours, ref in ((out_img, ref_img), (out_txt, ref_txt), (out_x, ref_x)):
        assert (ours - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    assert (plain[:, -n_guid:] - out_x[:, -n_guid:]).abs().max() > 1e-3  # timestep 0 really changes those rows


def test_timestep_zero_vector_is_comfyuis_vec_at_timestep_zero(flux):
    """The modulation input the clean guidance rows get is the ``vec`` ComfyUI's FLUX builds at timestep 0 (read from
    a block of an unpatched call at sigma 0), with the same pooled text and guidance strength."""
    from ultragen.patch.zero_timestep import timestep_zero_vector

    from comfy_flux import denoise

    seen = []
    m = flux.clone()

    def record(args, extra):
        seen.append(args["vec"].clone())
        return extra["original_block"](args)

    m.set_model_patch_replace(record, "dit", "double_block", 0)
    x, ctx, y = inputs(batch=2, h=8, w=8)
    denoise(m, x, 0.0, ctx, y, guidance=3.5)
    dm = flux.model.diffusion_model
    with torch.inference_mode():
        ours = timestep_zero_vector(dm, x, torch.full((2,), 0.7), y, torch.full((2,), 3.5))
    torch.testing.assert_close(ours, seen[0])


def test_clean_guidance_in_whole_blocks_says_it_is_modulated_at_the_step(flux, caplog):
    from comfy_flux import denoise

    x, ctx, y = inputs(h=16, w=20)
    g = guidance_of(4, 5, (16, 20))
    model = whole_blocks(patched(flux, guidance=g, guidance_tokens="clean", window=4))
    caplog.set_level(logging.WARNING)
    denoise(model, x, 0.6, ctx, y)  # one call, its own run: 4 blocks, one warning
    assert sum("not at timestep 0" in r.message for r in caplog.records) == 1
