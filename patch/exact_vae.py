"""Exact, memory-bounded VAE decode and encode for 4K-8K images.

Why: ComfyUI's full-image VAE decode needs tens of GB at 4096^2 and falls back to tiles on
OOM; its tiled decode averages three tilings (3x the work, soft seams, a different image).
This runs ComfyUI's own encoder/decoder modules layer by layer, every convolution and
group norm through :mod:`core.split_ops` (row bands with halos, whole-image statistics),
so the result is a full decode's, with temporaries bounded by the band size (itself
bounded by the free memory). Full activations stay on the GPU while about three of the
largest fit; else each stays there while it fits beside a band's temporaries and the rest
live in host memory, row-major (``core.row_major``), streamed through the GPU a band at a
time, the next band's copy overlapping the current band's work (``offload="always"``: all
in host memory). Group norms take the sums their producer accumulated; a resnet block's first
convolution and its 1x1 shortcut read their input in one pass; while streaming, an upsample
followed by such a block is never stored (its rows are made as the block reads them: the
largest activation, 32 GiB at 8192^2, neither pinned nor moved).

Layers whose activation is small (the 1/8-resolution middle, with its attention) run as
they are; everything else is split.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from types import SimpleNamespace

import comfy.model_management
import comfy.utils
import torch
from comfy.ldm.modules.diffusionmodules.model import AttnBlock, Decoder, Encoder, ResnetBlock
from einops import rearrange

from ..core import long_attention, split_ops
from ..core.row_major import RowMajor, read_rows
from . import vae_memory
from .layer_weights import take_weight
from .vae_memory import (
    BYTES_PER_BAND_ELEMENT,
    ExactVAEError,
    largest_decoder_activation,
    largest_encoder_activation,
    load_vae,
)

log = logging.getLogger("UltraGen")

# Activations at or below this many elements run through the module itself.
DIRECT_ELEMENTS = 1 << 24
LONG_ATTENTION_TOKENS = 1 << 16  # from here (2048^2 images) the middle attention runs query rows at a time
PROGRESS_PER_LAYER = 100  # the bar moves band by band within a layer


class _Runner:
    """Runs one encoder or decoder, layer by layer, with a progress bar over the bands and cancel checks.

    Bands are computed on ``compute``. Where full activations live (``placement``): ``"compute"``; ``"host"``:
    in host memory, row-major, streamed through ``compute`` a band at a time; ``"spill"``: each on ``compute``
    while it fits beside a band's temporaries, else in host memory. Small ones always stay on ``compute``. Each
    split layer returns its output with its per-channel sums (``ChannelSums``), which the group norm after it
    uses instead of reading the activation once more.
    """

    def __init__(self, net: torch.nn.Module, band_elements: int, direct_elements: int, steps: int,
                 compute: torch.device, placement: str, progress: bool = True):  # fmt: skip
        self.net = net
        self.band = band_elements
        self.direct = direct_elements
        self.compute, self.placement = compute, placement
        self.progress = comfy.utils.ProgressBar(steps * PROGRESS_PER_LAYER) if progress else None
        self.layers_done = 0
        self.split = dict(band_elements=band_elements, compute=compute, between_bands=self._between_bands)
        if placement != "compute":
            self.split["alloc"] = self.alloc

    def alloc(self, shape: tuple, dtype: torch.dtype):
        """A full activation: host rows, or (``spill``) on the compute device while it leaves room for a band."""
        return vae_memory.activation_storage(shape, dtype, self.placement, self.compute, self.band)

    @staticmethod
    def _check_cancel() -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()

    def _between_bands(self, fraction: float) -> None:
        """Before each band of a layer's pass: cancel, and the bar to this band (a layer's later passes, e.g. the
        second convolution of a resnet block, start again from 0 and leave it where the first one took it)."""
        self._check_cancel()
        if self.progress is not None:
            at = int((self.layers_done + fraction) * PROGRESS_PER_LAYER)
            if at > self.progress.current:
                self.progress.update_absolute(at)

    def _tick(self) -> None:
        """A layer done."""
        self._check_cancel()
        self.layers_done += 1
        if self.progress is not None:
            self.progress.update_absolute(self.layers_done * PROGRESS_PER_LAYER)

    def small(self, x) -> bool:
        return x.numel() <= self.direct

    def on_compute(self, x) -> torch.Tensor:
        """``x`` as a tensor on the compute device (a small activation leaving host memory, or made whole)."""
        if not isinstance(x, torch.Tensor):
            return read_rows(x, 0, x.shape[2], self.compute).contiguous()
        return x.to(self.compute)

    def stored(self, x: torch.Tensor):
        """Where a large activation made whole (the encoder's input) is kept: host rows only when asked (``host``);
        when spilling it stays where the caller made it, on the compute device."""
        if self.placement != "host" or self.small(x):
            return x
        vae_memory.check_host_room(x.numel() * x.element_size())
        return RowMajor.of(x)

    def whole(self, module, x) -> torch.Tensor:
        """Run ``module`` on the whole (small) activation."""
        return module(self.on_compute(x))

    def taken(self, module: torch.nn.Module, x):
        """``module``'s weights as its own forward would use them (cast, LoRA functions, moved to the compute
        device by ComfyUI) for the split operations, which read ``weight`` and ``bias`` directly."""
        weights = take_weight(module, torch.empty(0, device=self.compute, dtype=x.dtype))
        if weights is None:  # a layer of another kind: its parameters as they are
            return module
        return SimpleNamespace(weight=weights[0], bias=weights[1], num_groups=getattr(module, "num_groups", None),
                               eps=getattr(module, "eps", None))  # fmt: skip

    def norm_silu(self, norm, x, sums: split_ops.ChannelSums | None):
        if sums is not None:
            stats = sums.group_stats(norm.num_groups, norm.eps)
        else:
            stats = split_ops.group_stats(x, norm.num_groups, norm.eps, self.band, self.compute, self._between_bands)
        return split_ops.group_norm_silu(self.taken(norm, x), stats)

    def resnet(self, block: ResnetBlock, x, sums):
        if self.small(x):
            return self.whole(block, x), None
        h_sums = split_ops.ChannelSums()
        pre = self.norm_silu(block.norm1, x, sums)
        if _one_pass_shortcut(block):  # x read once for both
            h, skip = split_ops.conv3x3_with_shortcut(x, self.taken(block.conv1, x), pre,
                                                      self.taken(block.nin_shortcut, x), sums=h_sums,
                                                      **self.split)  # fmt: skip
            del x
        elif block.in_channels != block.out_channels:
            h = split_ops.conv3x3(x, self.taken(block.conv1, x), pre, sums=h_sums, **self.split)
            skip = split_ops.conv3x3(x, self.taken(block.conv_shortcut, x), **self.split)
            del x
        else:
            h = split_ops.conv3x3(x, self.taken(block.conv1, x), pre, sums=h_sums, **self.split)
            skip = x  # identity: each output band overwrites its own input rows, no longer needed
        pre = self.norm_silu(block.norm2, h, h_sums)
        out_sums = split_ops.ChannelSums()
        out = split_ops.conv3x3(h, self.taken(block.conv2, h), pre, out=skip, add=skip, sums=out_sums, **self.split)
        return out, out_sums

    def attention(self, block: AttnBlock, x):
        """ComfyUI's block (global by nature; at 1/8 resolution), its attention query rows at a time where the
        sequence is long (``core.long_attention``: PyTorch has no fused kernel for its 512-wide head)."""
        x = self.on_compute(x)
        tokens = x.shape[-2] * x.shape[-1]
        if tokens < LONG_ATTENTION_TOKENS or not long_attention.can_run(x):
            return block(x), None
        h = block.norm(x)
        q, k, v = (rearrange(conv(h), "b c h w -> b (h w) c") for conv in (block.q, block.k, block.v))
        del h
        out = long_attention.attention(q, k, v, self.band * BYTES_PER_BAND_ELEMENT // 2, self._between_bands)
        del q, k, v
        out = rearrange(out, "b (h w) c -> b c h w", h=x.shape[-2])
        return x + block.proj_out(out), None

    def stage(self, modules, x, sums=None):
        for m in modules:
            x, sums = self.resnet(m, x, sums) if isinstance(m, ResnetBlock) else self.attention(m, x)
            self._tick()
        return x, sums

    def out(self, x, sums) -> torch.Tensor:
        net = self.net
        if self.small(x):
            x = self.on_compute(x)
            y = net.conv_out(torch.nn.functional.silu(net.norm_out(x)))
        else:
            y = split_ops.conv3x3(x, self.taken(net.conv_out, x), self.norm_silu(net.norm_out, x, sums), **self.split)
        self._tick()
        return self.on_compute(y)

    def conv_in(self, x: torch.Tensor):
        if self.small(x):
            h, sums = self.whole(self.net.conv_in, x), None
        else:
            sums = split_ops.ChannelSums()
            x = self.stored(x)
            h = split_ops.conv3x3(x, self.taken(self.net.conv_in, x), sums=sums, **self.split)
        self._tick()
        return h, sums

    def upsample(self, module, x, consumer):
        """A level's upsample, split where its output is large. While activations stream through host memory and
        ``consumer`` (the next block) reads its input in one pass, the output is never stored: its rows are made as
        that block reads them (``split_ops.Upsampled``)."""
        if not module.with_conv or 4 * x.numel() <= self.direct:
            out = self.whole(module, x), None
        elif self.placement != "compute" and _one_pass_shortcut(consumer):
            up = split_ops.Upsampled(x, self.taken(module.conv, x), self.compute, self.band, self._between_bands)
            out = up, up.sums()
        else:
            sums = split_ops.ChannelSums()
            out = split_ops.upsample2_conv3x3(x, self.taken(module.conv, x), sums=sums, **self.split), sums
        self._tick()
        return out

    def downsample(self, module, x):
        """A level's downsample, split where x is large."""
        if not module.with_conv or self.small(x):
            out = self.whole(module, x), None
        else:
            sums = split_ops.ChannelSums()
            out = split_ops.pad_conv3x3_stride2(x, self.taken(module.conv, x), sums=sums, **self.split), sums
        self._tick()
        return out


def _one_pass_shortcut(block) -> bool:
    """A resnet block whose shortcut is a 1x1 convolution changing the channels: its first convolution and the
    shortcut read the input in one pass (``split_ops.conv3x3_with_shortcut``)."""
    return isinstance(block, ResnetBlock) and block.in_channels != block.out_channels and not block.use_conv_shortcut


def _blocks(level) -> list:
    blocks = []
    for i, block in enumerate(level.block):
        blocks.append(block)
        if len(level.attn) > 0:
            blocks.append(level.attn[i])
    return blocks


def _check(net: torch.nn.Module, kind: type) -> None:
    if not isinstance(net, kind) or getattr(net, "give_pre_end", False) or getattr(net, "tanh_out", False):
        raise ExactVAEError(
            f"the exact VAE path knows the SD/FLUX-style 2D {kind.__name__}, not {type(net).__name__}; "
            "use ComfyUI's VAE Decode / VAE Encode for this VAE"
        )


def decode_latent(decoder: Decoder, z: torch.Tensor, band_elements: int = split_ops.DEFAULT_BAND_ELEMENTS,
                  direct_elements: int = DIRECT_ELEMENTS, offload: str = "auto",
                  progress: bool = True) -> torch.Tensor:  # fmt: skip
    """``decoder(z)`` for z (B, C, h, w) on the compute device, split into bands where large."""
    _check(decoder, Decoder)
    levels = list(reversed(range(decoder.num_resolutions)))
    steps = 5 + sum(len(_blocks(decoder.up[i])) + (i != 0) for i in levels)  # conv_in, middle (3), levels, out
    placement = vae_memory.placement(z.device, offload, largest_decoder_activation(decoder, z.shape), z.dtype)
    run = _Runner(decoder, vae_memory.band_budget(z.device, band_elements), direct_elements, steps, z.device, placement,
                  progress)  # fmt: skip
    with torch.inference_mode():
        h, sums = run.conv_in(z)
        h, sums = run.stage([decoder.mid.block_1, decoder.mid.attn_1, decoder.mid.block_2], h, sums)
        for i in levels:
            h, sums = run.stage(_blocks(decoder.up[i]), h, sums)
            if i != 0:
                h, sums = run.upsample(decoder.up[i].upsample, h, consumer=decoder.up[i - 1].block[0])
        return run.out(h, sums)


def encode_pixels(encoder: Encoder, x: torch.Tensor, band_elements: int = split_ops.DEFAULT_BAND_ELEMENTS,
                  direct_elements: int = DIRECT_ELEMENTS, offload: str = "auto",
                  progress: bool = True) -> torch.Tensor:  # fmt: skip
    """``encoder(x)`` for x (B, 3, H, W) in [-1, 1] on the compute device, split into bands where large."""
    _check(encoder, Encoder)
    last = encoder.num_resolutions - 1
    steps = 5 + sum(len(_blocks(encoder.down[i])) + (i != last) for i in range(last + 1))  # conv_in, mid (3), out
    placement = vae_memory.placement(x.device, offload, largest_encoder_activation(encoder, x.shape), x.dtype)
    run = _Runner(encoder, vae_memory.band_budget(x.device, band_elements), direct_elements, steps, x.device, placement,
                  progress)  # fmt: skip
    with torch.inference_mode():
        h, sums = run.conv_in(x)
        for i in range(encoder.num_resolutions):
            h, sums = run.stage(_blocks(encoder.down[i]), h, sums)
            if i != last:
                h, sums = run.downsample(encoder.down[i].downsample, h)
        h, sums = run.stage([encoder.mid.block_1, encoder.mid.attn_1, encoder.mid.block_2], h, sums)
        return run.out(h, sums).to(x.device)


def _autoencoder(vae):
    model = vae.first_stage_model
    if not (hasattr(model, "decoder") and hasattr(model, "encoder")) or vae.latent_dim != 2:
        raise ExactVAEError(
            f"the exact VAE path handles image autoencoders with an encoder and decoder, not {type(model).__name__}; "
            "use ComfyUI's VAE Decode / VAE Encode for this VAE"
        )
    return model


def _from_normalised_latent(model, z: torch.Tensor) -> torch.Tensor:
    """FLUX.2's VAE: its latent is batch-normed over 2x2-unshuffled channels; undo both (at 1/16 of the pixels,
    cheap) exactly as ComfyUI's ``AutoencodingEngine.decode`` does, before the decoder proper."""
    bn = getattr(model, "bn", None)
    if bn is None:
        return z
    s = torch.sqrt(bn.running_var.view(1, -1, 1, 1).to(z) + model.bn_eps)
    z = z * s + bn.running_mean.view(1, -1, 1, 1).to(z)
    return rearrange(z, "... (c pi pj) i j -> ... c (i pi) (j pj)", pi=model.ps[0], pj=model.ps[1])


def _to_normalised_latent(model, z: torch.Tensor) -> torch.Tensor:
    """The encoder's side of :func:`_from_normalised_latent` (ComfyUI's ``AutoencodingEngine.encode``)."""
    bn = getattr(model, "bn", None)
    if bn is None:
        return z
    z = rearrange(z, "... c (i pi) (j pj) -> ... (c pi pj) i j", pi=model.ps[0], pj=model.ps[1])
    return torch.nn.functional.batch_norm(z, bn.running_mean.to(z), bn.running_var.to(z), momentum=model.bn_momentum,
                                          eps=model.bn_eps)  # fmt: skip


def with_host_memory_fallback(run: Callable[[str], torch.Tensor], offload: str, what: str) -> torch.Tensor:
    """``run(offload)``; where it runs out of GPU memory with full activations allowed on the GPU (``auto``), once
    more with all of them in host memory (``always``: only bands on the GPU) — the same decode, slower — instead of
    failing the node and, in a Recursive Upscale, the sampling before it (ComfyUI's own decode falls back to tiles
    the same way). A decode placed by a free-memory reading that was too high (measured on an emulated card, where the
    reading was wrong; a real card's reading can be too high when other programs take memory) still finishes."""
    if offload != "auto":
        return run(offload)
    try:
        return run(offload)
    except torch.OutOfMemoryError:
        pass  # retried below, outside the handler: the failed pass's tensors are freed with its traceback
    log.warning("UltraGen: the exact VAE %s ran out of GPU memory with its activations on the GPU; running it again "
                "with them in system memory (the same result, slower)", what)  # fmt: skip
    comfy.model_management.soft_empty_cache()
    return run("always")


def exact_decode(vae, samples: torch.Tensor, band_elements: int = split_ops.DEFAULT_BAND_ELEMENTS,
                 direct_elements: int = DIRECT_ELEMENTS, offload: str = "auto",
                 progress: bool = True) -> torch.Tensor:  # fmt: skip
    """What ``vae.decode(samples)`` gives, (B, H, W, 3) in [0, 1], without its memory peak or tiles.

    ``progress``: show a progress bar of its own (off when a caller's bar covers the decode).
    """
    model = _autoencoder(vae)
    h, w = samples.shape[-2:]
    if getattr(model, "bn", None) is not None:  # FLUX.2: the decoder sees the 2x2-unshuffled latent
        h, w = h * model.ps[0], w * model.ps[1]
    load_vae(
        vae,
        vae.memory_used_decode(samples[:1].shape, vae.vae_dtype),
        largest_decoder_activation(model.decoder, (1, 0, h, w)),
        band_elements,
    )
    images = []
    for i in range(samples.shape[0]):  # one image at a time: statistics are per image anyway
        # inference mode as in ComfyUI's executor: VAE.process_output works in place (ComfyUI 0.29)
        with torch.inference_mode():
            z = _from_normalised_latent(model, samples[i : i + 1].to(vae.device, vae.vae_dtype))
            if getattr(model, "post_quant_conv", None) is not None:
                z = model.post_quant_conv(z)
            decode = functools.partial(decode_latent, model.decoder, z, band_elements, direct_elements,
                                       progress=progress)  # fmt: skip
            out = with_host_memory_fallback(decode, offload, "decode")
            images.append(vae.process_output(out.to(vae.output_device).float()))
    return torch.cat(images).movedim(1, -1)


def exact_encode(vae, pixels: torch.Tensor, band_elements: int = split_ops.DEFAULT_BAND_ELEMENTS,
                 direct_elements: int = DIRECT_ELEMENTS, offload: str = "auto",
                 progress: bool = True) -> torch.Tensor:  # fmt: skip
    """What ``vae.encode(pixels)`` gives for (B, H, W, C) images, without its memory peak or tiles.

    ``progress``: show a progress bar of its own (off when a caller's bar covers the encode).
    """
    model = _autoencoder(vae)
    pixels = vae.vae_encode_crop_pixels(pixels[..., :3]).movedim(-1, 1)
    load_vae(
        vae,
        vae.memory_used_encode(pixels[:1].shape, vae.vae_dtype),
        largest_encoder_activation(model.encoder, pixels[:1].shape),
        band_elements,
    )
    latents = []
    for i in range(pixels.shape[0]):
        x = vae.process_input(pixels[i : i + 1]).to(vae.device, vae.vae_dtype)
        with torch.inference_mode():
            encode = functools.partial(encode_pixels, model.encoder, x, band_elements, direct_elements,
                                       progress=progress)  # fmt: skip
            h = with_host_memory_fallback(encode, offload, "encode")
            if getattr(model, "quant_conv", None) is not None:
                h = model.quant_conv(h)
            z, _ = model.regularization(h)
            z = _to_normalised_latent(model, z)
        latents.append(z.to(vae.output_device).float())
    return torch.cat(latents)
