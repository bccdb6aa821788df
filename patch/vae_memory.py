"""Where the exact VAE's activations live, how large its bands are, and how much memory it asks ComfyUI for.

Why: one decision taken from measured free memory decides the exact VAE's speed and whether it fits: every
full activation on the GPU while about three of the largest fit (fastest), else each there while it fits and
the rest in host memory (``spill``; ``core.row_major``), with bands sized to what is left. Before any of it,
ComfyUI is asked for that much room, so that the diffusion model that just sampled leaves the GPU as far as
needed, as it would for ComfyUI's own VAE nodes; and host memory the system cannot give is refused with a
message instead of the operating system ending ComfyUI.
"""

from __future__ import annotations

import math

import comfy.model_management
import psutil
import torch
from comfy.ldm.modules.diffusionmodules.model import Decoder, Encoder

from ..core.row_major import RowMajor
from ..errors import UltraGenError
from .free_memory import free_memory

OFFLOAD = ("auto", "never", "always")  # keep full activations in host memory, streaming bands to the GPU
BYTES_PER_BAND_ELEMENT = 64  # all of a band's temporaries (float32 norm, padding, output, float64 sums), generously
HOST_RESERVE_BYTES = 2 << 30  # system memory left to everything else when activations move to host memory


class ExactVAEError(UltraGenError, ValueError):
    """A VAE the exact path does not know, or an image too large for this machine's memory; the message says
    what to use instead."""


def all_on_compute_bytes(largest_elements: int, dtype: torch.dtype) -> int:
    """What keeping every full activation on the compute device takes: about three of the largest at once."""
    return 3 * largest_elements * dtype.itemsize


def placement(compute: torch.device, offload: str, largest_elements: int, dtype: torch.dtype) -> str:
    """Where full activations go: ``compute`` while :func:`all_on_compute_bytes` fits in 90% of its free memory,
    else ``spill`` (each on the compute device while it fits, the rest in host memory) for ``auto``; ``host``
    for ``always``, ``compute`` for ``never``. A CPU computes in place unless asked."""
    if offload not in OFFLOAD:
        raise ExactVAEError(f"offload must be one of {OFFLOAD}, got {offload!r}")
    if offload == "never":
        return "compute"
    if offload == "always":
        return "host"
    if compute.type == "cpu":
        return "compute"
    spill = all_on_compute_bytes(largest_elements, dtype) >= 0.9 * free_memory(compute)
    return "spill" if spill else "compute"


def band_budget(compute: torch.device, band_elements: int) -> int:
    """``band_elements``, lowered where the compute device's free memory could not hold a band's temporaries."""
    if compute.type == "cpu":
        return band_elements
    free = free_memory(compute)
    return max(1, min(band_elements, free // BYTES_PER_BAND_ELEMENT))


def check_host_room(need: int) -> None:
    """Refuse, naming the way out, an activation that system memory cannot hold (rather than have the operating
    system end ComfyUI)."""
    available = psutil.virtual_memory().available
    if need + HOST_RESERVE_BYTES > available:
        raise ExactVAEError(
            f"the exact VAE needs {need / 2**30:.1f} GiB more system memory (RAM) for an activation that does not "
            f"fit on the GPU, and {available / 2**30:.1f} GiB is available: close other programs, or use ComfyUI's "
            "VAE Decode (Tiled) / VAE Encode (Tiled) for this size"
        )


def activation_storage(shape: tuple, dtype: torch.dtype, where: str, compute: torch.device, band_elements: int):
    """A full activation (``where`` is ``spill`` or ``host``): on the compute device while it leaves room for a
    band's temporaries (spilling), else host rows."""
    need = math.prod(shape) * dtype.itemsize
    if where == "spill":
        headroom = band_elements * BYTES_PER_BAND_ELEMENT + (1 << 30)
        if need + headroom < free_memory(compute):
            return torch.empty(shape, dtype=dtype, device=compute)
    check_host_room(need)
    return RowMajor(shape, dtype)


def largest_decoder_activation(decoder: Decoder, shape: tuple) -> int:
    """Elements of the decoder's largest full activation for an input of ``shape`` (B, C, h, w)."""
    area, sizes = shape[0] * shape[-2] * shape[-1], []
    for i in reversed(range(decoder.num_resolutions)):  # walking the decoder
        sizes.append(decoder.up[i].block[0].in_channels * area)
        if i != 0:
            area *= 4
            sizes.append(decoder.up[i].block[-1].out_channels * area)  # the upsampled activation
    return max(sizes)


def largest_encoder_activation(encoder: Encoder, shape: tuple) -> int:
    """Elements of the encoder's largest full activation for pixels of ``shape`` (B, 3, H, W)."""
    area, sizes = shape[0] * shape[-2] * shape[-1], []
    for i in range(encoder.num_resolutions):  # walking the encoder
        sizes.append(max(encoder.down[i].block[0].in_channels, encoder.down[i].block[-1].out_channels) * area)
        area //= 4
    return max(sizes)


def load_vae(vae, comfy_estimate: int, largest_elements: int, band_elements: int) -> None:
    """The VAE onto its device, asking for the memory the pass can use: every activation on the GPU and a band's
    temporaries, at most what ComfyUI's own VAE Decode / Encode asks for one image. Other models (the diffusion
    model that just sampled) leave the GPU as far as that needs, as for ComfyUI's node; asking for the weights
    alone left an 8K decode on a 24 GB card beside a resident FLUX, with little room."""
    wanted = all_on_compute_bytes(largest_elements, vae.vae_dtype) + band_elements * BYTES_PER_BAND_ELEMENT
    comfy.model_management.load_models_gpu([vae.patcher], memory_required=min(comfy_estimate, wanted),
                                           force_full_load=getattr(vae, "disable_offload", False))  # fmt: skip
