"""A (B, C, H, W) activation kept in host memory row-major, (H, B, C, W): a band of rows is one block.

Why: an 8192^2 VAE decode holds activations of 17 GB (128 channels at full size), more than a 24 GB card
can keep beside another; they live in host memory and stream through the GPU a band of rows at a time.
Kept as (B, C, H, W), a band is B x C separate strided pieces (one per channel), which PyTorch gathers
through a CPU copy before every transfer; kept row-major, a band is one contiguous block that moves to
the GPU (from pinned memory: asynchronously, at full bus speed) and is permuted there. Only
``read_rows`` / ``write_rows`` know the layout; ``core.split_ops`` works on either kind of storage.
"""

from __future__ import annotations

import logging
import weakref

import torch


def _unregister(pointer: int) -> None:
    for device in range(torch.cuda.device_count()):  # no copy into or out of the memory may still be in flight
        torch.cuda.synchronize(device)
    torch.cuda.cudart().cudaHostUnregister(pointer)


def _clear_cuda_error() -> None:
    """A failed ``cudaHostRegister`` stays CUDA's "last error" (PyTorch's binding hands the code back without
    clearing it), and PyTorch's next kernel launch check would raise it against some unrelated operation. A
    throwaway launch reads and clears it here instead."""
    try:
        torch.ones(1, device="cuda").add_(1)
    except RuntimeError:
        pass


_warned: set[str] = set()


def pinned_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Page-locked host memory of exactly this size, unpinned and released with the tensor; pageable memory where
    CUDA is missing or will not pin it (then copies are synchronous and slower, but still right).

    Why not ``torch.empty(pin_memory=True)``: PyTorch's caching host allocator rounds each block up to a power of
    two and keeps freed blocks for reuse until the process ends: an 8192^2 decode left ~90 GiB of host memory
    pinned inside ComfyUI. Here ordinary memory is registered with CUDA (``cudaHostRegister``) for its lifetime.
    """
    t = torch.empty(shape, dtype=dtype)
    nbytes = t.numel() * t.element_size()
    if nbytes == 0 or not torch.cuda.is_available():
        return t
    t.zero_()  # the pages faulted in by all of PyTorch's threads: registering then only locks them (as PyTorch's own
    # pinned_use_cuda_host_register does)
    if int(torch.cuda.cudart().cudaHostRegister(t.data_ptr(), nbytes, 1)) != 0:  # 1: portable, every GPU
        _clear_cuda_error()
        if "pin" not in _warned:
            _warned.add("pin")
            logging.warning("UltraGen: the system would not pin %.1f GiB of host memory for the exact VAE; it goes on "
                            "with ordinary memory (slower copies)", nbytes / 2**30)  # fmt: skip
        return t
    weakref.finalize(t, _unregister, t.data_ptr()).atexit = False  # at exit the process's memory goes anyway
    return t


class RowMajor:
    """Storage for a (B, C, H, W) activation as (H, B, C, W) on ``device`` (pinned when that is the CPU and CUDA
    is available)."""

    def __init__(self, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device | str = "cpu"):
        b, c, h, w = shape
        device = torch.device(device)
        if device.type == "cpu":
            self.data = pinned_empty((h, b, c, w), dtype)
        else:
            self.data = torch.empty(h, b, c, w, dtype=dtype, device=device)

    @property
    def shape(self) -> torch.Size:
        h, b, c, w = self.data.shape
        return torch.Size((b, c, h, w))

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    def numel(self) -> int:
        return self.data.numel()

    @classmethod
    def of(cls, x: torch.Tensor, device: torch.device | str = "cpu") -> RowMajor:
        """``x`` (B, C, H, W) copied into row-major storage."""
        out = cls(tuple(x.shape), x.dtype, device)
        out.data.copy_(x.permute(2, 0, 1, 3))
        return out

    def tensor(self) -> torch.Tensor:
        """The whole activation as a (B, C, H, W) tensor on its device (a copy)."""
        return self.data.permute(1, 2, 0, 3).contiguous()


def read_rows(x: torch.Tensor | RowMajor, lo: int, hi: int, device: torch.device) -> torch.Tensor:
    """Rows [lo, hi) of ``x`` as a (B, C, hi - lo, W) tensor on ``device``. ``x`` may also be an activation that
    is never stored (it has ``compute_rows``, e.g. ``split_ops.Upsampled``): then they are made on its device."""
    if hasattr(x, "compute_rows"):
        return x.compute_rows(lo, hi).to(device)
    if isinstance(x, RowMajor):
        return x.data[lo:hi].to(device, non_blocking=True).permute(1, 2, 0, 3)
    return x[:, :, lo:hi].to(device, non_blocking=True)


def write_rows(out: torch.Tensor | RowMajor, r0: int, band: torch.Tensor) -> None:
    """``band`` (B, C, rows, W) into rows [r0, r0 + rows) of ``out``."""
    rows = band.shape[2]
    if isinstance(out, RowMajor):
        out.data[r0 : r0 + rows].copy_(band.permute(2, 0, 1, 3), non_blocking=True)
    else:
        out[:, :, r0 : r0 + rows] = band.to(out.device)


def empty_like_rows(x: torch.Tensor | RowMajor, *shape: int) -> torch.Tensor | RowMajor:
    """A full activation of ``shape`` kept where and how ``x`` is kept."""
    if isinstance(x, RowMajor):
        return RowMajor(tuple(shape), x.dtype, x.device)
    if x.device.type == "cpu":
        return pinned_empty(shape, x.dtype)
    return torch.empty(*shape, dtype=x.dtype, device=x.device)


def prefetched(reads: list[list[tuple]], device: torch.device):
    """The bands of ``reads`` (per band: a list of (storage, lo, hi)) read onto ``device``, one band ahead.

    Where storage is host memory (pinned) and ``device`` a GPU, band i + 1 is copied on a side stream while the
    caller computes band i; the caller's stream waits for each copy, and the side stream first waits for
    everything the caller's stream did before (the previous layer's writes into host memory). Elsewhere (and
    where rows are computed, not stored) the reads happen in order, as ``read_rows`` does them.
    """
    storages = [s for band in reads for s, _, _ in band]
    computed = any(hasattr(s, "compute_rows") for s in storages)  # made on the caller's stream, never the side one
    if device.type != "cuda" or computed or not any(isinstance(s, RowMajor) for s in storages):
        for band in reads:
            yield [read_rows(s, lo, hi, device) for s, lo, hi in band]
        return
    compute = torch.cuda.current_stream(device)
    copy = torch.cuda.Stream(device)
    copy.wait_stream(compute)

    def fetch(band):
        with torch.cuda.stream(copy):
            tensors = [read_rows(s, lo, hi, device) for s, lo, hi in band]
            done = torch.cuda.Event()
            done.record(copy)
        return tensors, done

    ahead = fetch(reads[0]) if reads else None
    for i in range(len(reads)):
        tensors, done = ahead
        compute.wait_event(done)
        for t in tensors:
            t.record_stream(compute)  # allocated on the side stream, used (and freed) on the caller's
        if i + 1 < len(reads):
            ahead = fetch(reads[i + 1])
        yield tensors
