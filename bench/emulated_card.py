"""An emulated N-GiB card on a bigger GPU, for the benchmarks that ask what runs on the cards artists own
(``vram_cards.py``, ``vae.py --cards``, ``pipeline.py --card``).

How an N-GiB card is emulated on a bigger GPU, between cells of one process:

- PyTorch's allocator is capped at N - 0.5 GiB (``set_per_process_memory_fraction``; the 0.5 GiB
  stand for the CUDA context a real card also holds), so any allocation past the card fails;
- ComfyUI's ``get_free_memory`` reports what that card would (its size less what the process occupies on the
  GPU, PyTorch's reusable cached blocks not counted: :func:`emulated_free`), and ``total_vram`` is N: every
  loading heuristic (also ``MIN_WEIGHT_MEMORY_RATIO``, which ``--reserve-vram`` alone does not scale) sees an
  N-GiB card;
- with ``--dynamic-vram`` (ComfyUI 0.29's DynamicVRAM, switched on the way its main.py does),
  comfy-aimdo's VRAM headroom is set to total - N as ``--reserve-vram`` would.

PyTorch's allocator: ComfyUI's main.py switches PyTorch to ``backend:cudaMallocAsync`` on most NVIDIA setups
(its cuda_malloc.py; ``--disable-cuda-malloc`` keeps the native caching allocator), before torch is imported.
``vram_cards.py --allocator cudaMallocAsync`` (its default) does the same (``native``: PyTorch's native caching
allocator, ComfyUI's with ``--disable-cuda-malloc``; ``native-expandable``: the native one with
``expandable_segments``, which maps memory into one growing segment instead of many fixed ones); the JSON records
which ran (``allocator``): they fragment memory differently (measured: a second 8192² step on an emulated 12 GB card
with DynamicVRAM ran out of memory with the native allocator and ran with cudaMallocAsync). Either way the first
emulated card checks that an allocation past its cap fails.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from collections.abc import Iterator

import torch

from ultragen.gpu_start import dynamic_vram_on

CONTEXT_GIB = 0.5  # a real card's CUDA context, outside PyTorch's allocator
# --allocator choices: the PYTORCH_CUDA_ALLOC_CONF setting each needs, and the backend PyTorch then reports
ALLOCATORS = {
    "native": (None, "native"),
    "native-expandable": ("expandable_segments:True", "native"),
    "cudaMallocAsync": ("backend:cudaMallocAsync", "cudaMallocAsync"),
}


RERUN_MARK = "ULTRAGEN_ALLOCATOR_RERUN"  # set in the process that use_allocator() started again


@contextlib.contextmanager
def use_allocator(name: str) -> Iterator[None]:
    """PyTorch's CUDA allocator ``name`` (:data:`ALLOCATORS`) for the CUDA start-up inside the block; exits after it
    unless PyTorch runs that one.

    PyTorch fixes its allocator *backend* when it loads: a ``backend:`` setting made after ``import torch`` fails an
    internal assert once CUDA starts (measured: "Allocator backend parsed at runtime != allocator backend parsed at
    load time"). ComfyUI's main.py therefore sets it before importing torch; a benchmark that has already imported
    torch runs itself again, once, with the setting in its environment (the command line, ``sys.argv``: for a
    benchmark's own ``main()`` run as a script). Other settings (``expandable_segments``) are read when CUDA
    starts and need no second start."""
    setting, backend = ALLOCATORS[name]
    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or ""
    if setting and setting not in conf:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = setting + (f",{conf}" if conf else "")
    if torch.cuda.get_allocator_backend() != backend and not os.environ.get(RERUN_MARK):
        os.environ[RERUN_MARK] = "1"
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, *sys.argv])
    yield
    if torch.cuda.get_allocator_backend() != backend:
        sys.exit(f"asked for the {name} allocator, PyTorch runs {torch.cuda.get_allocator_backend()} "
                 "(PYTORCH_CUDA_ALLOC_CONF set elsewhere, or a PyTorch without CUDA)")  # fmt: skip


class Card:
    """The emulated card (None: the whole GPU)."""

    def __init__(self, dynamic: bool, queue: bool = False, segments_on_oom: bool = False):
        import comfy.model_management as mm

        self.mm = mm
        self.dynamic = dynamic
        self.queue = queue  # keep the model loaded while the card and the weights stay the same
        self.total = torch.cuda.get_device_properties(0).total_memory
        self.original_free = mm.get_free_memory
        self.original_total_vram = mm.total_vram
        self.cap = self.total
        self.card_bytes = self.total  # the emulated card's size
        self.current: tuple | None = None  # (GiB, weights) of the card as last set, None after a failed cell
        self.cap_checked = False
        # Record PyTorch's allocations (native allocator only) for segment_summary() at an out-of-memory error.
        self.segments_on_oom = segments_on_oom and torch.cuda.get_allocator_backend() == "native"
        if self.segments_on_oom:
            torch.cuda.memory._record_memory_history(enabled="state", context="state", stacks="python")

    def set(self, gib: float | None, weights: str | None = None) -> None:
        """Emulate a ``gib`` card (None: the whole GPU), every model unloaded first (a fresh start) — except with
        ``queue`` for the card and weights already set: then ComfyUI keeps what it loaded for the previous cell
        and frees what the next estimate needs, as in an artist's queue."""
        if self.queue and self.current == (gib, weights):
            return
        self.current = (gib, weights)
        self.mm.unload_all_models()
        gc.collect()
        self.mm.soft_empty_cache()
        torch.cuda.empty_cache()
        self.card_bytes = self.total if gib is None else int(gib * 2**30)
        if gib is None:
            self.cap = self.total
            torch.cuda.set_per_process_memory_fraction(1.0)
            self.mm.get_free_memory = self.original_free
            self.mm.total_vram = self.original_total_vram
            headroom = 0
        else:
            self.cap = int((gib - CONTEXT_GIB) * 2**30)
            torch.cuda.set_per_process_memory_fraction(self.cap / self.total)
            self.check_cap()
            self.mm.get_free_memory = self.free
            self.mm.total_vram = gib * 1024
            headroom = self.total - int(gib * 2**30)
        if self.dynamic:
            import comfy_aimdo.control

            comfy_aimdo.control.init(simple_vram_headroom=headroom)

    def check_cap(self) -> None:
        """Exit unless an allocation past the emulated card fails (once: the allocator backend cannot change)."""
        if self.cap_checked:
            return
        try:
            torch.empty(self.cap + 2**26, dtype=torch.uint8, device="cuda")
        except torch.OutOfMemoryError:
            self.cap_checked = True
            return
        sys.exit(f"set_per_process_memory_fraction does not cap PyTorch's {torch.cuda.get_allocator_backend()} "
                 "allocator here: a card cannot be emulated")  # fmt: skip

    def free(self, dev=None, torch_free_too=False):
        """What ComfyUI's ``get_free_memory`` would say on the card: its size less what is occupied on the GPU
        (see :func:`emulated_free`), at most what PyTorch's cap still allows."""
        total_free, torch_free = self.original_free(dev, torch_free_too=True)
        if dev is not None and getattr(dev, "type", "cuda") != "cuda":
            return (total_free, torch_free) if torch_free_too else total_free
        cuda_free, cuda_total = torch.cuda.mem_get_info(dev)
        emulated = emulated_free(self.card_bytes, cuda_total - cuda_free, torch_free, self.cap,
                                 torch.cuda.memory_allocated(dev))  # fmt: skip
        emulated = min(total_free, emulated)
        return (emulated, torch_free) if torch_free_too else emulated


def emulated_free(card_bytes: int, gpu_used: int, pool_slack: int, cap: int, allocated: int) -> int:
    """Free memory of a ``card_bytes`` card, from the big GPU's figures: everything this process holds on it
    (``gpu_used``: the CUDA context, comfy-aimdo's weights, PyTorch's pool) less the pool's reusable slack
    (``pool_slack``: reserved, not in use) is occupied; the rest of the card is free, as ComfyUI's reading
    (CUDA's free memory plus the slack) gives on the real card — and no more than PyTorch's ``cap`` leaves above
    what it has ``allocated``.

    Why not the cap less PyTorch's reserved memory: with cudaMallocAsync the pool keeps what it once reserved,
    and on the big GPU nothing forces it back within the card (a real card's pool cannot reserve more than the card
    holds; at its limit PyTorch trims it), so that reading counted slack beyond the card as free: an 8192² exact decode
    on an emulated 24 GB card with DynamicVRAM placed a second 16 GiB activation on the GPU beside 16.07 GiB in use
    and ran out of memory at the cap, while CUDA said the process held 63.3 GiB (H200, 2026-12-02)."""
    occupied = gpu_used - pool_slack
    return max(0, min(card_bytes - occupied, cap - allocated))


def aimdo_vram_gib() -> float | None:
    """GPU memory DynamicVRAM (comfy-aimdo) holds outside PyTorch's allocator, its weights; None without it."""
    if not dynamic_vram_on():
        return None
    import comfy_aimdo.control

    return comfy_aimdo.control.get_total_vram_usage() / 2**30


def host_weights_gib(module: torch.nn.Module) -> tuple[float, float]:
    """(GiB of ``module``'s parameters in host memory, GiB of those page-locked): what a partially loaded model
    streams each step, and how much of it CUDA can copy without the host waiting (ComfyUI 0.29's legacy loader pins
    what it streams with ``cudaHostRegister``, which ``Tensor.is_pinned`` sees; 0.3.64 pins nothing)."""
    on_host = [p for p in module.parameters() if p.device.type == "cpu"]
    pinned = [p for p in on_host if p.is_pinned()] if torch.cuda.is_available() else []
    return sum(p.nbytes for p in on_host) / 2**30, sum(p.nbytes for p in pinned) / 2**30


def segment_summary(min_segment: int = 256 * 2**20, min_block: int = 16 * 2**20) -> list[dict]:
    """PyTorch's segments of at least ``min_segment`` bytes now: size, what is allocated, and each allocated block of
    at least ``min_block`` with the innermost frame of the pack or ComfyUI that allocated it (why a large request
    finds no room although enough is reserved)."""
    out = []
    for seg in torch.cuda.memory._snapshot()["segments"]:
        if seg["total_size"] < min_segment:
            continue
        blocks = []
        for block in seg["blocks"]:
            if block["state"] != "active_allocated" or block["size"] < min_block:
                continue
            frames = [f for f in block.get("frames", []) if "ultragen" in f["filename"] or "comfy" in f["filename"]]
            where = f"{frames[0]['filename'].split('/')[-1]}:{frames[0]['line']}" if frames else "?"
            blocks.append({"mib": round(block["size"] / 2**20), "at": where})
        gib = round(seg["total_size"] / 2**30, 3)
        out.append({"gib": gib, "allocated_gib": round(seg["allocated_size"] / 2**30, 3), "blocks": blocks})
    return out
