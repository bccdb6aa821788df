"""UltraGen's windowed attention, patched into ComfyUI's FLUX through public hooks only.

Why this shape: ComfyUI gives per-clone hooks that are undone after sampling; using only
those (no replaced ``forward_orig``, no replaced block class) keeps every other patch a
user stacks — style LoRAs, ControlNets, Sage attention, caches — working. Per model call
(one denoising step of one CFG batch):

1. a DIFFUSION_MODEL wrapper measures the call (image grid, Kontext reference and
   guidance tokens), prepares the guidance tokens (noised to this step's sigma or clean),
   permutes ControlNet residuals like the image tokens, and at the end puts the output
   back in raster order (once);
2. a post_input patch (after ``img_in``, before RoPE) puts the image tokens in
   window-first order (once), rebuilds their position ids in float32, and appends the
   embedded guidance tokens with positions scaled onto the high-res grid;
3. an attention override sends all 19 double and 38 single blocks through the
   block-sparse backend, on the layout of this call (the text length is whatever the
   sequence leaves: CFG batches pad cond and uncond to a common length); it also applies
   RoPE, in one low-memory pass, since the rotary-table embedder hands the table to it
   instead of to ComfyUI (whose rotation makes float32 copies of q and k);
4. object patches: the rotary-table embedder (NTK-scaled), constant-shift sampling, the
   single blocks' MLP activation computed in place (the step's memory peak), and the
   guidance LoRA on the ``forward`` of the layers it names (guidance rows only).

Sequence seen by attention: [text | image (window-first) | references | guidance].
"""

from __future__ import annotations

import dataclasses
import logging
import random

import comfy.ldm.flux.model
import comfy.patcher_extension
import comfy.utils
import torch
from comfy.ldm.common_dit import pad_to_patch_size
from einops import rearrange

from ..core import GuidanceSegment, ImageSegment, Layout, ReferenceSegment, TextSegment
from ..core.guidance import guidance_ids, noised
from ..core.guidance_lora import LoRALayer, check_fits, guidance_rows_forward
from ..core.token_order import to_raster, to_window_first, window_first_order
from ..kernels import sparse_attention
from ..kernels.rope import apply_rope
from .call_state import CallState, HandOver, SizeState
from .inplace_gelu import inplace_gelu_patches
from .options import Guidance, PatchOptions, UltraGenPatchError
from .rotary_table import RotaryTable
from .sampling import constant_shift_sampling, memory_estimate_wrapper

KEY = "ultragen"
log = logging.getLogger("UltraGen")


class UltraGenFluxPatch:
    """One configured patch; :meth:`apply` returns a patched clone of a FLUX ModelPatcher."""

    def __init__(
        self,
        options: PatchOptions | None = None,
        guidance: Guidance | None = None,
        lora: dict[str, LoRALayer] | None = None,
        lora_strength: float = 1.0,
    ):
        options = options or PatchOptions()
        options.check()
        self.options = options
        self.guidance = guidance
        self.lora = lora or {}
        self.lora_strength = lora_strength
        self._call: CallState | None = None
        self._previous_override = None
        self._warned: set[str] = set()
        self._noise_seed = options.seed
        self.embedding_guidance = False  # True while img_in embeds the guidance tokens (training LoRA reads it)
        self._grids: dict = {}
        self._image_grids: dict = {}  # the guidance-free part of _grids
        self._layouts: dict = {}
        self._rng = random.Random(options.seed)

    # ComfyUI deep-copies model_options on clone(); the hooks stored there must stay this object.
    def __deepcopy__(self, memo):
        return self

    # -- installing ---------------------------------------------------------------------
    def apply(self, model):
        """A clone of ``model`` (a FLUX ModelPatcher) with every hook installed."""
        dm = model.get_model_object("diffusion_model")
        if not isinstance(dm, comfy.ldm.flux.model.Flux):
            raise UltraGenPatchError(
                f"UltraGen Attention Patch needs a FLUX model, but this MODEL is {type(dm).__name__}; "
                "load FLUX.1 (dev, schnell, Kontext) with Load Diffusion Model or Load Checkpoint"
            )
        if isinstance(model.get_model_object("diffusion_model.pe_embedder"), RotaryTable):
            raise UltraGenPatchError(
                "this MODEL is already patched by UltraGen Attention Patch; connect the model from before that "
                "node (Recursive Upscale applies the patch itself)"
            )
        self._base_model = model.model
        if self.guidance is not None:
            self._check_guidance_channels(dm)
        if self.lora:
            check_fits(self.lora, dm)
        m = model.clone()
        to = m.model_options["transformer_options"]
        self._previous_override = to.get("optimized_attention_override")
        to["optimized_attention_override"] = self._attention
        m.set_model_post_input_patch(self._post_input)
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, KEY, self._diffusion_model)
        m.add_wrapper_with_key(
            comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, KEY, memory_estimate_wrapper(self._extra_tokens)
        )
        # get_model_object: the shared model may hold another clone's objects right now.
        embedder = model.get_model_object("diffusion_model.pe_embedder")
        m.add_object_patch(
            "diffusion_model.pe_embedder", RotaryTable(embedder, self.options.ntk_factor, self._take_rotary_table)
        )
        for path, module in inplace_gelu_patches(dm, model.get_model_object).items():
            m.add_object_patch(path, module)
        if self.options.constant_shift:
            m.add_object_patch(
                "model_sampling", constant_shift_sampling(model.model.model_config, self.options.shift_mu)
            )
        for path, layer in self.lora.items():
            if path != "img_in":  # img_in sees the guidance tokens alone: applied in post_input
                forward = guidance_rows_forward(dm.get_submodule(path), layer, self._guidance_rows, self.lora_strength)
                m.add_object_patch(f"diffusion_model.{path}.forward", forward)
        return m

    def set_guidance(self, guidance: Guidance | None, noise_seed: int | None = None) -> None:
        """Guide the following calls with ``guidance`` (training: a new one per batch).

        ``noise_seed`` reseeds the noise the guidance tokens are noised with ("noised" mode).
        """
        self.guidance = guidance
        if noise_seed is not None:
            self._noise_seed = noise_seed
        self._grids.clear()

    def _check_guidance_channels(self, dm) -> None:
        channels = dm.img_in.weight.shape[1] // (dm.patch_size * dm.patch_size)
        if self.guidance.latent.shape[1] != channels:
            raise UltraGenPatchError(
                f"the guidance latent has {self.guidance.latent.shape[1]} channels but this model takes {channels}; "
                "encode the guidance with this model's VAE"
            )

    def _take_rotary_table(self, table: torch.Tensor) -> bool:
        """Keep this forward's RoPE table for the attention override (only in calls this patch prepared)."""
        if self._call is None:
            return False
        self._call.rotary_table = table
        return True

    def _guidance_rows(self) -> int:
        return 0 if self._call is None else self._call.n_guid

    def _extra_tokens(self, input_shape) -> int:
        """Tokens besides the image in a call of this latent shape (for the memory estimate)."""
        guid = self.guidance.grid() if self.guidance is not None else (0, 0)
        return 512 + guid[0] * guid[1]

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)

    # -- 1. the DIFFUSION_MODEL wrapper ---------------------------------------------------
    def _diffusion_model(
        self, executor, x, timestep, context, y=None, guidance=None, ref_latents=None, control=None,
        transformer_options={}, **kwargs,  # noqa: B006 - ComfyUI's signature
    ):  # fmt: skip
        def unpatched():
            return executor(x, timestep, context, y, guidance, ref_latents, control, transformer_options, **kwargs)

        if kwargs.get("attention_mask") is not None:
            self._warn_once(
                "mask",
                "UltraGen: a conditioning with an attention mask reached the model; those calls use ComfyUI's "
                "dense attention (slow at high resolution). Remove the mask to use windowed attention.",
            )
            return unpatched()
        dm = executor.class_obj
        p = dm.patch_size
        h_orig, w_orig = x.shape[-2:]
        x = pad_to_patch_size(x, (p, p))  # so that _forward crops nothing we must restore
        call = self._prepare_call(dm, x, timestep, ref_latents)
        if control is not None:
            control = self._permute_control(control, call)
            if control is None:
                return unpatched()
        options = {**transformer_options, KEY: call}
        self._call = call
        try:
            out = executor(x, timestep, context, y, guidance, ref_latents, control, options, **kwargs)
        finally:
            self._call = None
        # _forward laid the window-first tokens out as if they were raster: undo that once.
        tokens = rearrange(out, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=p, pw=p)
        tokens = to_raster(tokens, call.order)
        out = rearrange(tokens, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=call.grid[0], w=call.grid[1], ph=p, pw=p)
        return out[:, :, :h_orig, :w_orig]

    def _prepare_call(self, dm, x, timestep, ref_latents) -> CallState:
        p = dm.patch_size
        size = (x.shape[-2] // p, x.shape[-1] // p)
        grid = self._grid(dm, size, x)
        n_ref = sum(-(-r.shape[-2] // p) * -(-r.shape[-1] // p) for r in ref_latents or [])
        call = CallState(
            grid=size, order=grid.order, image_ids=grid.image_ids, n_ref=n_ref,
            guidance_grid=grid.guidance_grid, guidance_tokens=None, guidance_ids=grid.guidance_ids,
        )  # fmt: skip
        o = self.options
        if o.mode == "npa" and o.npa_jitter:
            steps = list(range(0, o.npa_patch, max(1, min(8, o.npa_patch))))  # few offsets: schedules stay cached
            call.npa_offset = (self._rng.choice(steps), self._rng.choice(steps))
        if grid.guidance_clean is not None:
            batch = x.shape[0]
            tokens = comfy.utils.repeat_to_batch_size(grid.guidance_clean, batch)
            if o.guidance_tokens == "noised":
                noise = comfy.utils.repeat_to_batch_size(grid.guidance_noise, batch)
                tokens = noised(tokens, noise, timestep.float().reshape(-1))
            call.guidance_tokens = tokens.to(x.dtype)
        return call

    def _grid(self, dm, size: tuple[int, int], x: torch.Tensor) -> SizeState:
        """The shared state of calls at this image size (built on the first call of a sampling run).

        The image part (order, ids) outlives :meth:`set_guidance`; the guidance part is rebuilt.
        """
        key = (size, x.device)
        if key not in self._grids:
            if len(self._grids) > 8:
                self._grids.clear()
                self._image_grids.clear()
            grid = self._image_grids.get(key)
            if grid is None:
                order = window_first_order(size[0], size[1], self._window(), self._curve(), x.device)
                image_ids = torch.zeros(order.perm.numel(), 3, dtype=torch.float32, device=x.device)
                image_ids[:, 1], image_ids[:, 2] = order.y, order.x
                grid = self._image_grids[key] = SizeState(order=order, image_ids=image_ids)
            self._grids[key] = grid if self.guidance is None else self._with_guidance(dm, grid, size, x)
        return self._grids[key]

    def _with_guidance(self, dm, grid: SizeState, size: tuple[int, int], x: torch.Tensor) -> SizeState:
        g = self.guidance
        gh, gw = g.grid(dm.patch_size)
        if gh > size[0] or gw > size[1]:
            raise UltraGenPatchError(
                f"the guidance ({g.latent.shape[-1] * 8}x{g.latent.shape[-2] * 8} px) is larger than the image being "
                f"sampled ({x.shape[-1] * 8}x{x.shape[-2] * 8} px); guidance must be the low-res image: encode a "
                "smaller one or sample at a larger size"
            )
        target = (g.target_height // 8, g.target_width // 8)
        if abs(target[0] - x.shape[-2]) > 1 or abs(target[1] - x.shape[-1]) > 1:
            self._warn_once(
                "size",
                f"UltraGen: the guidance was encoded for {g.target_width}x{g.target_height} px but the sampler runs "
                f"at {x.shape[-1] * 8}x{x.shape[-2] * 8} px; guidance positions are scaled to the sampled size.",
            )
        latent = self._base_model.process_latent_in(g.latent.to(x.device, torch.float32))
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(self._noise_seed)).to(x.device)
        layout = Layout((ImageSegment(size[0], size[1], self._window(), self._curve()), GuidanceSegment(gh, gw)))
        perm = layout.guidance_order(x.device)
        return dataclasses.replace(
            grid,
            guidance_grid=(gh, gw),
            guidance_clean=dm.process_img(latent)[0].index_select(1, perm),
            guidance_noise=dm.process_img(noise)[0].index_select(1, perm),
            guidance_ids=guidance_ids((gh, gw), size, x.device).index_select(0, perm),
        )

    def _window(self) -> tuple[int, int]:
        return (self.options.window, self.options.window)

    def _curve(self) -> str:
        return "hilbert" if self.options.token_order == "hilbert" else "raster"

    def _permute_control(self, control: dict, call: CallState) -> dict | None:
        """ControlNet residuals in window-first order; None (dense call) if one does not fit."""
        out = {}
        for key, value in control.items():
            if not isinstance(value, (list, tuple)):
                out[key] = value
                continue
            items = []
            for t in value:
                if t is not None and (t.dim() != 3 or t.shape[1] != call.n_img):
                    self._warn_once(
                        "control",
                        f"UltraGen: a ControlNet residual covers {t.shape[1]} tokens, not the image's "
                        f"{call.n_img}; those calls use dense attention.",
                    )
                    return None
                items.append(None if t is None else to_window_first(t, call.order))
            out[key] = items
        return out

    # -- 2. the post_input patch ------------------------------------------------------------
    def _post_input(self, args: dict) -> dict:
        call = self._call
        if call is None:
            return args
        img, img_ids, txt, txt_ids = args["img"], args["img_ids"], args["txt"], args["txt_ids"]
        n = call.n_img
        parts = [to_window_first(img[:, :n], call.order), img[:, n:]]
        id_parts = [call.image_ids.expand(img.shape[0], -1, -1), img_ids[:, n:].float()]
        if call.guidance_tokens is not None:
            dm = self._base_model.diffusion_model
            tokens = call.guidance_tokens.to(img.dtype)
            self.embedding_guidance = True
            try:
                embedded = dm.img_in(tokens)
            finally:
                self.embedding_guidance = False
            if "img_in" in self.lora:
                embedded = embedded + self.lora["img_in"].delta(tokens, self.lora_strength).to(embedded.dtype)
            parts.append(embedded)
            id_parts.append(call.guidance_ids.expand(img.shape[0], -1, -1))
        return HandOver(img=torch.cat(parts, 1), txt=txt, img_ids=torch.cat(id_parts, 1), txt_ids=txt_ids.float())

    # -- 3. the attention override ----------------------------------------------------------
    def _attention(self, func, *args, **kwargs):
        call = (kwargs.get("transformer_options") or {}).get(KEY)
        q, k, v = args[:3]
        if call is not None and call.rotary_table is not None:
            q, k = self._rotate(q, k, call.rotary_table, kwargs)
            args = (q, k, v, *args[3:])
        if call is None or kwargs.get("mask") is not None or not kwargs.get("skip_reshape") or q.dim() != 4:
            return self._fallback(func, args, kwargs)
        batch, heads, length, dim = q.shape
        text_len = length - call.n_img - call.n_ref - call.n_guid
        if text_len < 1:  # not the sequence this call prepared (e.g. another model sharing the options)
            return self._fallback(func, args, kwargs)
        layout = self._layout(call, text_len)
        buf = torch.empty(batch, length, heads, dim, dtype=q.dtype, device=q.device)
        sparse_attention(q, k, v, layout, backend=self.options.backend, out=buf.transpose(1, 2))
        if kwargs.get("skip_output_reshape"):
            return buf.transpose(1, 2)
        return buf.view(batch, length, heads * dim)

    @staticmethod
    def _rotate(q, k, table, kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE on q and k, which FLUX's attention left unrotated because the table came here."""
        if not kwargs.get("skip_reshape") or q.dim() != 4 or q.shape[2] != table.shape[2]:
            raise UltraGenPatchError(
                f"UltraGen: an attention call of shape {tuple(q.shape)} reached the patch in a forward whose "
                f"positions cover {table.shape[2]} tokens; another node replaces FLUX's blocks in a way UltraGen "
                "cannot follow. Remove that node, or UltraGen Attention Patch, from this model."
            )
        return apply_rope(q, k, table)

    def _fallback(self, func, args, kwargs):
        if self._previous_override is not None:
            return self._previous_override(func, *args, **kwargs)
        return func(*args, **kwargs)

    def _layout(self, call: CallState, text_len: int) -> Layout:
        key = (text_len, call.grid, call.n_ref, call.guidance_grid, call.npa_offset)
        layout = self._layouts.get(key)
        if layout is None:
            segments = [TextSegment(text_len), ImageSegment(call.grid[0], call.grid[1], self._window(), self._curve())]
            if call.n_ref:
                segments.append(ReferenceSegment(call.n_ref))
            if call.guidance_grid is not None:
                segments.append(GuidanceSegment(*call.guidance_grid))
            layout = Layout(tuple(segments), self.options.rules(call.npa_offset))
            if len(self._layouts) > 64:
                self._layouts.clear()
            self._layouts[key] = layout
        return layout
