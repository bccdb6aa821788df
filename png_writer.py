"""PNG files written on every CPU core: the pixels and text chunks ComfyUI's Save Image writes, in a fraction of
its time.

Why: ComfyUI's Save Image converts an image to 8 bits and hands it to Pillow, whose PNG encoder filters and
deflates on one core: 12-14 s for one 8192² image on the machine the benchmarks run on, as long as two 8K
sampling steps. Deflate streams can be cut at byte-aligned sync points and joined (what ``pigz`` does), and PNG
row filters read only the unfiltered rows, so the image splits into row bands that are converted, filtered and
compressed in parallel threads (numpy and zlib release the GIL), then joined into one zlib stream in order. The
file is an ordinary PNG: same pixels (the same float-to-8-bit conversion, element by element), Pillow's filter
choice per row, same compression level, the same text chunks; the bands cost a little compression at each cut.
The file does not depend on the number of threads.

Numpy and zlib only (no torch, no ComfyUI): images arrive as ``(H, W, C)`` arrays, ``C`` in 1 / 3 / 4.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"
COLOR_TYPE = {1: 0, 3: 2, 4: 6}  # channels -> PNG colour type (grey, RGB, RGBA), 8 bits each
BAND_BYTES = 1 << 20  # raw bytes per band: small enough for many threads, large enough to deflate well
ADLER_BASE = 65521


def to_uint8(image: np.ndarray) -> np.ndarray:
    """ComfyUI's conversion of a float image in [0, 1] to 8 bits, verbatim (scale by 255, clip, truncate)."""
    return np.clip(255.0 * image, 0, 255).astype(np.uint8)


def adler32_combine(adler1: int, adler2: int, length2: int) -> int:
    """The Adler-32 of two byte strings joined, from each one's Adler-32 and the second one's length (zlib's
    ``adler32_combine``, which Python's zlib does not expose)."""
    rem = length2 % ADLER_BASE
    sum1 = adler1 & 0xFFFF
    sum2 = (rem * sum1) % ADLER_BASE
    sum1 = (sum1 + (adler2 & 0xFFFF) + ADLER_BASE - 1) % ADLER_BASE
    sum2 = (sum2 + (adler1 >> 16) + (adler2 >> 16) + ADLER_BASE - rem) % ADLER_BASE
    return sum1 | (sum2 << 16)


def filter_rows(rows: np.ndarray, above: np.ndarray, bpp: int) -> np.ndarray:
    """PNG-filtered scanlines of ``rows`` ``(R, N)`` uint8, each prefixed by its filter type, chosen per row as
    Pillow chooses: of None, Up, Sub and Paeth (tried in that order; Average only in Pillow's ``optimize`` mode),
    the first whose output is nearest zero in sum (bytes read as signed). ``above``: the row before the first
    (zeros for an image's first row); ``bpp``: bytes per pixel."""
    x = rows.astype(np.int16)
    b = np.concatenate([above[None].astype(np.int16), x[:-1]])  # the row above each row
    a = np.zeros_like(x)
    a[:, bpp:] = x[:, :-bpp]  # the pixel to the left
    c = np.zeros_like(x)
    c[:, bpp:] = b[:, :-bpp]  # the pixel above-left
    pa, pb, pc = np.abs(b - c), np.abs(a - c), np.abs(a + b - 2 * c)
    paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
    kinds = np.array([0, 2, 1, 4], np.uint8)  # None, Up, Sub, Paeth: Pillow's order of trial
    filtered = [f.astype(np.uint8) for f in (x, x - b, x - a, x - paeth)]  # modulo 256
    cost = np.stack([np.minimum(f, 0 - f).sum(axis=1, dtype=np.int64) for f in filtered])  # |signed byte|
    best = cost.argmin(axis=0)  # the first minimum: a later filter must be strictly better, as in Pillow
    out = np.empty((rows.shape[0], rows.shape[1] + 1), np.uint8)
    out[:, 0] = kinds[best]
    out[:, 1:] = np.choose(best[:, None], filtered)
    return out


def _band(pixels: np.ndarray, start: int, stop: int, bpp: int, level: int, last: bool) -> tuple[bytes, int, int]:
    """Rows ``start:stop`` converted to 8 bits if needed, filtered and deflated up to a byte-aligned sync point
    (or to the end of the stream for the last band): (deflate bytes, Adler-32 of the filtered bytes, their length)."""
    lo = max(start - 1, 0)
    band = pixels[lo:stop]
    if band.dtype != np.uint8:
        band = to_uint8(band)
    band = band.reshape(band.shape[0], -1)
    above, rows = (band[0], band[1:]) if start > 0 else (np.zeros_like(band[0]), band)
    raw = filter_rows(rows, above, bpp).tobytes()
    deflate = zlib.compressobj(level, zlib.DEFLATED, -15, 9, zlib.Z_FILTERED)  # Pillow's memory level and strategy
    data = deflate.compress(raw) + deflate.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)
    return data, zlib.adler32(raw), len(raw)


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def text_chunk(key: str, value: str) -> bytes:
    """A tEXt chunk, or iTXt when the text is not Latin-1 (Pillow's ``PngInfo.add_text`` rule)."""
    try:
        return _chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1"))
    except UnicodeError:
        return _chunk(b"iTXt", key.encode("latin-1") + b"\0\0\0\0\0" + value.encode("utf-8"))


def _zlib_header(level: int) -> bytes:
    cmf, flg = 0x78, (0 if level < 2 else 1 if level < 6 else 2 if level == 6 else 3) << 6
    return bytes([cmf, flg + 31 - ((cmf << 8) + flg) % 31])


def _bands(height: int, row_bytes: int) -> Iterator[tuple[int, int]]:
    rows = max(1, BAND_BYTES // max(row_bytes, 1))
    for start in range(0, height, rows):
        yield start, min(start + rows, height)


def write_png(
    file: BinaryIO,
    pixels: np.ndarray,
    text: Mapping[str, str] | None = None,
    level: int = 4,
    threads: int | None = None,
) -> None:
    """Write ``pixels`` — ``(H, W, C)`` uint8, or float in [0, 1] converted as ComfyUI converts — as an 8-bit
    PNG with ``text`` chunks (before the image data, as Pillow writes them), deflated at ``level`` on ``threads``
    threads (default: every core this process may use)."""
    if pixels.ndim != 3 or pixels.shape[2] not in COLOR_TYPE or 0 in pixels.shape:
        raise ValueError(f"write_png takes (H, W, C) pixels with C in 1, 3, 4; got shape {tuple(pixels.shape)}")
    height, width, channels = pixels.shape
    threads = threads or usable_cores()
    file.write(SIGNATURE)
    file.write(_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, COLOR_TYPE[channels], 0, 0, 0)))
    for key, value in (text or {}).items():
        file.write(text_chunk(key, value))
    bands = list(_bands(height, width * channels))
    adler = 1  # Adler-32 of nothing
    with ThreadPoolExecutor(max_workers=threads) as pool:
        jobs = [pool.submit(_band, pixels, start, stop, channels, level, i == len(bands) - 1)
                for i, (start, stop) in enumerate(bands)]  # fmt: skip
        for i, job in enumerate(jobs):
            data, band_adler, length = job.result()
            adler = adler32_combine(adler, band_adler, length)
            head = _zlib_header(level) if i == 0 else b""
            tail = struct.pack(">I", adler) if i == len(jobs) - 1 else b""
            file.write(_chunk(b"IDAT", head + data + tail))
    file.write(_chunk(b"IEND", b""))
