"""UltraGen's windowed attention, patched into ComfyUI's FLUX through public hooks only.

Why this shape: ComfyUI gives per-clone hooks that are undone after sampling; using only
those (no replaced ``forward_orig``, no replaced block class) keeps every other patch a
user stacks — style LoRAs, ControlNets, Sage attention, caches — working.

Three lifetimes, three places:

- the *patch* (:class:`UltraGenFluxPatch`, what the node was set to) and its *installed
  hooks* (:class:`InstalledPatch`, one per patched clone) never change after ``apply``;
- a *sampling run* (``run_state.PatchRun``) is created by the OUTER_SAMPLE wrapper from the
  sampling seed and dropped when sampling ends: per-size plans, layouts, warnings;
- a *model call* (``call_state.CallState``: one step of one CFG batch) is prepared by the
  DIFFUSION_MODEL wrapper and active while the model runs.

Per model call:

1. the DIFFUSION_MODEL wrapper measures the call (image grid, Kontext reference and
   guidance tokens), prepares the guidance tokens (noised to this step's sigma or clean),
   permutes ControlNet residuals like the image tokens, and at the end puts the output
   back in raster order (once);
2. the post_input patch (after ``img_in``, before RoPE) puts the image tokens in
   window-first order (once), replaces their position ids by float32 ones (placed as
   ComfyUI's ScaleROPE asks), and appends the embedded guidance tokens with positions
   scaled onto the high-res grid;
3. the chunked blocks (``chunked_blocks.py``, installed as ComfyUI block replacements)
   compute each double and single block a slice of tokens at a time around one
   block-sparse attention over the whole sequence, which writes its output over q; blocks
   that must run ComfyUI's own code (training, another node's attention patches) reach
   the attention override, which sends them through the same backend, on the layout of
   this call (the text length is whatever the sequence leaves:
   CFG batches pad cond and uncond to a common length); it also applies RoPE, in one
   low-memory pass, since the rotary-table embedder hands the table to it instead of to
   ComfyUI (whose rotation makes float32 copies of q and k);
4. object patches: the rotary-table embedder (NTK-scaled), constant-shift sampling, the
   single blocks' MLP activation computed in place (the step's memory peak), and the
   guidance LoRA on the ``forward`` of the layers it names (guidance rows only).

Sequence seen by attention: [text | image (window-first) | references | guidance].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import comfy.ldm.flux.model
import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.utils
import torch
from comfy.ldm.common_dit import pad_to_patch_size
from einops import rearrange

from ..core.guidance import noised
from ..core.guidance_lora import LoRALayer, check_fits, guidance_rows_forward
from ..core.token_order import to_raster, to_window_first
from ..kernels import sparse_attention
from .call_state import CallState, HandOver, active_call, calling
from .chunked_blocks import double_block, fallback_reason, install_chunked_blocks, is_last_block, single_block
from .flux_family import MAX_TEXT_TOKENS
from .host import check_host
from .inplace_gelu import inplace_gelu_patches
from .options import Guidance, PatchOptions, UltraGenPatchError
from .planning import (
    NODE,
    SizePlan,
    call_layout,
    check_guidance_fits,
    check_model,
    check_sampling,
    npa_offset,
    plan_size,
)
from .rotary_table import RotaryTable, rotate
from .run_state import PatchRun
from .sampling import constant_shift_sampling, memory_estimate_wrapper, model_shift_mu
from .slice_ops import BlockContext
from .streamed_pins import repin_streamed_weights
from .zero_timestep import timestep_zero_vector

KEY = "ultragen"  # transformer_options: the model call being run (read by the attention override)
RUN_KEY = "ultragen_run"  # transformer_options: the sampling run (PatchRun)


@dataclass(frozen=True)
class UltraGenFluxPatch:
    """What the patch is set to; :meth:`apply` returns a patched clone of a FLUX ModelPatcher."""

    options: PatchOptions = field(default_factory=PatchOptions)
    guidance: Guidance | None = None
    lora: dict[str, LoRALayer] = field(default_factory=dict)
    lora_strength: float = 1.0

    def __post_init__(self):
        self.options.check()
        if self.lora is None:
            object.__setattr__(self, "lora", {})

    def apply(self, model):
        """A clone of ``model`` (a FLUX.1 ModelPatcher) with every hook installed."""
        check_host(NODE)
        dm = check_model(model, self.guidance)
        if self.lora:
            check_fits(self.lora, dm)

        m = model.clone()
        to = m.model_options["transformer_options"]
        shift_mu = model_shift_mu(model.model.model_config, self.options.shift_mu)
        hooks = InstalledPatch(self, model.get_model_object("latent_format"), to.get("optimized_attention_override"),
                               shift_mu)  # fmt: skip
        to["optimized_attention_override"] = hooks.attention
        m.set_model_post_input_patch(hooks.post_input)
        W = comfy.patcher_extension.WrappersMP
        m.add_wrapper_with_key(W.OUTER_SAMPLE, KEY, hooks.outer_sample)
        m.add_wrapper_with_key(W.DIFFUSION_MODEL, KEY, hooks.diffusion_model)
        m.add_wrapper_with_key(W.PREPARE_SAMPLING, KEY, memory_estimate_wrapper(hooks.extra_tokens))
        # get_model_object: the shared model may hold another clone's objects right now.
        embedder = model.get_model_object("diffusion_model.pe_embedder")
        m.add_object_patch(
            "diffusion_model.pe_embedder", RotaryTable(embedder, self.options.ntk_factor, hooks.take_rotary_table)
        )
        for path, module in inplace_gelu_patches(dm, model.get_model_object).items():
            m.add_object_patch(path, module)
        if self.options.constant_shift:
            m.add_object_patch("model_sampling", constant_shift_sampling(model.model.model_config, shift_mu))
        install_chunked_blocks(m, dm, hooks.block)
        for path, layer in self.lora.items():
            if path != "img_in":  # img_in sees the guidance tokens alone: applied in post_input
                forward = guidance_rows_forward(dm.get_submodule(path), layer, hooks.guidance_rows, self.lora_strength)
                m.add_object_patch(f"diffusion_model.{path}.forward", forward)
        return m

    def run_options(self, seed: int, guidance: Guidance | None = None) -> dict:
        """``transformer_options`` entries that make the model calls given them one run with ``seed``
        (and ``guidance`` instead of the patch's own), for callers that run the model without a
        sampler (training: one run per micro-batch)."""
        return {RUN_KEY: PatchRun(seed, self.guidance if guidance is None else guidance)}


@dataclass(frozen=True, eq=False)
class InstalledPatch:
    """The hooks of one patched clone. Holds nothing that changes: see the module docstring."""

    patch: UltraGenFluxPatch
    latent_format: object
    previous_override: object  # the attention override installed before ours, chained to
    shift_mu: float  # the constant shift (the node's, or on FLUX.2 for the default the model's own)

    # ComfyUI deep-copies model_options on clone(); the hooks stored there stay this (immutable) object.
    def __deepcopy__(self, memo):
        return self

    @property
    def options(self) -> PatchOptions:
        return self.patch.options

    # -- the sampling run: OUTER_SAMPLE wrapper ---------------------------------------------
    def outer_sample(self, executor, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None,
                     disable_pbar=False, seed=None, **kwargs):  # fmt: skip
        guider = executor.class_obj
        check_sampling(guider.model_patcher, (kwargs.get("latent_shapes") or [latent_image.shape])[0],
                       self.shift_mu if self.options.constant_shift else None, self.patch.guidance)  # fmt: skip
        run = PatchRun(0 if seed is None else int(seed), self.patch.guidance, guider.model_patcher)
        original = guider.model_options
        guider.model_options = comfy.model_patcher.create_model_options_clone(original)
        guider.model_options["transformer_options"][RUN_KEY] = run
        try:
            return executor(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed, **kwargs)
        finally:
            guider.model_options = original
            run.close()

    # -- 1. the DIFFUSION_MODEL wrapper ---------------------------------------------------
    def diffusion_model(
        self, executor, x, timestep, context, y=None, guidance=None, ref_latents=None, control=None,
        transformer_options={}, **kwargs,  # noqa: B006 - ComfyUI's signature
    ):  # fmt: skip
        def unpatched():
            return executor(x, timestep, context, y, guidance, ref_latents, control, transformer_options, **kwargs)

        # A call outside a sampler (a benchmark, a test, training's own loop) is a run of its own.
        run = transformer_options.get(RUN_KEY) or PatchRun(0, self.patch.guidance)
        if kwargs.get("attention_mask") is not None:
            run.warn_once(
                "mask",
                "UltraGen: a conditioning with an attention mask reached the model; those calls use ComfyUI's "
                "dense attention (slow at high resolution). Remove the mask to use windowed attention.",
            )
            return unpatched()
        if run.model_patcher is not None:  # the weights are loaded by now: pin what a dropped clone unpinned
            run.reuse("streamed weights pinned", lambda: repin_streamed_weights(run.model_patcher))
        dm = executor.class_obj
        p = dm.patch_size
        h_orig, w_orig = x.shape[-2:]
        x = pad_to_patch_size(x, (p, p))  # so that _forward crops nothing we must restore
        call = self._prepare_call(run, dm, x, timestep, ref_latents, transformer_options.get("rope_options"))
        if call.guidance_tokens is not None and self.options.guidance_tokens == "clean":
            call.vec_zero = timestep_zero_vector(dm, x, timestep, y, guidance)
        if control is not None:
            control = _window_first_control(run, control, call)
            if control is None:
                return unpatched()
        with calling(call):
            out = executor(x, timestep, context, y, guidance, ref_latents, control,
                           {**transformer_options, KEY: call}, **kwargs)  # fmt: skip
        # _forward laid the window-first tokens out as if they were raster: undo that once.
        tokens = rearrange(out, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=p, pw=p)
        tokens = to_raster(tokens, call.order)
        out = rearrange(tokens, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=call.grid[0], w=call.grid[1], ph=p, pw=p)
        return out[:, :, :h_orig, :w_orig]

    def _prepare_call(self, run: PatchRun, dm, x, timestep, ref_latents, rope_options) -> CallState:
        p = dm.patch_size
        size = (x.shape[-2] // p, x.shape[-1] // p)
        plan = self._plan(run, dm, size, x, rope_options)
        n_ref = sum(-(-r.shape[-2] // p) * -(-r.shape[-1] // p) for r in ref_latents or [])
        call = CallState(grid=size, order=plan.order, image_ids=plan.image_ids, n_ref=n_ref, diffusion_model=dm,
                         warn_once=run.warn_once, guidance_grid=plan.guidance_grid,
                         guidance_ids=plan.guidance_ids)  # fmt: skip
        o = self.options
        if o.mode == "npa":
            call.npa_offset = npa_offset(o, run.seed, float(timestep.flatten()[0]))
        if plan.guidance_clean is not None:
            batch = x.shape[0]
            if batch % plan.guidance_clean.shape[0]:
                raise UltraGenPatchError(
                    f"{NODE}: the guidance holds {plan.guidance_clean.shape[0]} images, which does not divide the "
                    f"model's batch of {batch}; encode one guidance image, or one per latent"
                )
            tokens = comfy.utils.repeat_to_batch_size(plan.guidance_clean, batch)
            if o.guidance_tokens == "noised":
                noise = comfy.utils.repeat_to_batch_size(plan.guidance_noise, batch)
                tokens = noised(tokens, noise, timestep.float().reshape(-1))
            call.guidance_tokens = tokens.to(x.dtype)
        return call

    def _plan(self, run: PatchRun, dm, size: tuple[int, int], x: torch.Tensor, rope_options) -> SizePlan:
        """The run's plan for this size (built on the run's first call at it)."""
        g = run.guidance

        def build() -> SizePlan:
            latent = None
            if g is not None:
                warning = check_guidance_fits(g, (x.shape[-2], x.shape[-1]), dm.patch_size)
                if warning:
                    run.warn_once("size", warning)
                latent = self.latent_format.process_in(g.latent.to(x.device, torch.float32))
            return plan_size(dm, self.options, g, latent, size, x.device, run.seed, rope_options)

        rope = tuple(sorted(rope_options.items())) if rope_options else None
        return run.reuse(("plan", size, x.device, rope), build)

    # -- 2. the post_input patch ------------------------------------------------------------
    def post_input(self, args: dict) -> dict:
        call = active_call()
        if call is None:
            return args
        img, img_ids, txt, txt_ids = args["img"], args["img_ids"], args["txt"], args["txt_ids"]
        n = call.n_img
        parts = [to_window_first(img[:, :n], call.order), img[:, n:]]
        id_parts = [call.image_ids.expand(img.shape[0], -1, -1), img_ids[:, n:].float()]
        if call.guidance_tokens is not None:
            tokens = call.guidance_tokens.to(img.dtype)
            call.embedding_guidance = True
            try:
                embedded = call.diffusion_model.img_in(tokens)
            finally:
                call.embedding_guidance = False
            lora = self.patch.lora.get("img_in")
            if lora is not None:
                embedded = embedded + lora.delta(tokens, self.patch.lora_strength).to(embedded.dtype)
            parts.append(embedded)
            id_parts.append(call.guidance_ids.expand(img.shape[0], -1, -1))
        return HandOver(img=torch.cat(parts, 1), txt=txt, img_ids=torch.cat(id_parts, 1), txt_ids=txt_ids.float())

    # -- 3. the chunked blocks, and the attention override for blocks that run whole ---------
    def block(self, kind: str, index: int, args: dict, extra: dict) -> dict:
        """ComfyUI block replacement (``patches_replace["dit"]``) for FLUX's ``kind`` block ``index``."""
        call = (args.get("transformer_options") or {}).get(KEY)
        reason = fallback_reason(args, call)
        if reason is not None:
            if reason:
                call.warn_once(reason, f"UltraGen: {reason}.")
            if call is not None and call.vec_zero is not None:
                call.warn_once("clean-whole", "UltraGen: blocks that run whole modulate the clean guidance tokens at "
                               "the current step, not at timestep 0 (only UltraGen's sliced blocks can).")  # fmt: skip
            return extra["original_block"](args)
        comfy.model_management.throw_exception_if_processing_interrupted()  # as ComfyUI's layers check
        ctx = BlockContext(call, self._attend, self.patch.lora.get, self.patch.lora_strength)
        dm = call.diffusion_model
        if kind == "double_block":
            out = double_block(dm.double_blocks[index], args, ctx, f"double_blocks.{index}")
        else:
            out = single_block(dm.single_blocks[index], args, ctx, f"single_blocks.{index}")
        if is_last_block(dm, kind, index):
            call.release_block_buffers()
        return out

    def _layout(self, call: CallState, length: int):
        """The attention layout of this call's sequence of ``length`` tokens (None: not this call's sequence)."""
        text_len = length - call.n_img - call.n_ref - call.n_guid
        if text_len < 1:
            return None
        if call.layout is None or call.layout.seq_len != length:  # the same for every block of a call
            call.layout = call_layout(self.options, call.grid, text_len, call.n_ref, call.guidance_grid,
                                      call.npa_offset)  # fmt: skip
        return call.layout

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: CallState) -> None:
        """Block-sparse attention of a chunked block, written over q (all (B, H, L, D))."""
        layout = self._layout(call, q.shape[2])
        if layout is None:
            raise UltraGenPatchError(
                f"UltraGen: a block's sequence of {q.shape[2]} tokens does not hold the {call.n_img} image tokens "
                f"this call prepared; another node changes FLUX's sequence in a way UltraGen cannot follow. "
                f"Remove that node, or {NODE}, from this model."
            )
        sparse_attention(q, k, v, layout, backend=self.options.backend, out=q)

    def attention(self, func, *args, **kwargs):
        call = (kwargs.get("transformer_options") or {}).get(KEY)
        q, k, v = args[:3]
        if call is not None and call.rotary_table is not None:
            q, k = rotate(q, k, call.rotary_table, kwargs, NODE)
            args = (q, k, v, *args[3:])
        if call is None or kwargs.get("mask") is not None or not kwargs.get("skip_reshape") or q.dim() != 4:
            return self._fallback(func, args, kwargs)
        if k.shape[2] != q.shape[2]:  # another node's attn1_patch added keys (Flux KV Cache's cached references)
            call.warn_once("keys", "UltraGen: another node adds keys to FLUX's attention (e.g. Flux KV Cache); those "
                           "calls use dense attention (slow at high resolution).")  # fmt: skip
            return self._fallback(func, args, kwargs)
        batch, heads, length, dim = q.shape
        layout = self._layout(call, length)
        if layout is None:  # not the sequence this call prepared (e.g. another model sharing the options)
            return self._fallback(func, args, kwargs)
        buf = torch.empty(batch, length, heads, dim, dtype=q.dtype, device=q.device)
        sparse_attention(q, k, v, layout, backend=self.options.backend, out=buf.transpose(1, 2))
        if kwargs.get("skip_output_reshape"):
            return buf.transpose(1, 2)
        return buf.view(batch, length, heads * dim)

    def _fallback(self, func, args, kwargs):
        if self.previous_override is not None:
            return self.previous_override(func, *args, **kwargs)
        return func(*args, **kwargs)

    # -- what the object patches ask ------------------------------------------------------
    def take_rotary_table(self, table: torch.Tensor) -> bool:
        """Keep this forward's RoPE table for the attention override (only in calls this patch prepared)."""
        call = active_call()
        if call is None:
            return False
        call.rotary_table = table
        return True

    def guidance_rows(self) -> int:
        """How many last rows of a guidance-LoRA layer's input are guidance tokens (a chunked block's slice
        may hold fewer than the call)."""
        call = active_call()
        if call is None:
            return 0
        return call.n_guid if call.guidance_rows_override is None else call.guidance_rows_override

    def extra_tokens(self, input_shape) -> int:
        """Tokens besides the image in a call of this latent shape (for the memory estimate)."""
        guid = self.patch.guidance.grid() if self.patch.guidance is not None else (0, 0)
        return MAX_TEXT_TOKENS + guid[0] * guid[1]


def _window_first_control(run: PatchRun, control: dict, call: CallState) -> dict | None:
    """ControlNet residuals in window-first order; None (dense call) if one does not fit."""
    out = {}
    for key, value in control.items():
        if not isinstance(value, (list, tuple)):
            out[key] = value
            continue
        items = []
        for t in value:
            if t is not None and (t.dim() != 3 or t.shape[1] != call.n_img):
                run.warn_once(
                    "control",
                    f"UltraGen: a ControlNet residual covers {t.shape[1]} tokens, not the image's "
                    f"{call.n_img}; those calls use dense attention.",
                )
                return None
            items.append(None if t is None else to_window_first(t, call.order))
        out[key] = items
    return out
