"""The parallel PNG writer against Pillow (its decoder for pixels and text, its encoder for size), zlib (the
stream and its checksum), and Pillow's filter rule worked row by row in plain Python."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from ultragen import png_writer


def smooth_image(h: int, w: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """Float pixels like a decoded photo: smooth gradients, fine noise, and a little over- and undershoot."""
    g = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    waves = [np.sin(2 * np.pi * (3 * x + c / 3)) * np.cos(2 * np.pi * (2 * y - c / 5)) for c in range(channels)]
    base = np.stack(waves, axis=-1) * 0.55 + 0.5
    return (base + 0.02 * g.standard_normal((h, w, channels))).astype(np.float32)


def comfyui_uint8(image: np.ndarray) -> np.ndarray:
    """Save Image's conversion as written in ComfyUI's nodes.py."""
    return np.clip(255.0 * image, 0, 255).astype(np.uint8)


def written(pixels, **kwargs) -> bytes:
    out = io.BytesIO()
    png_writer.write_png(out, pixels, **kwargs)
    return out.getvalue()


def chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, data) of every chunk, each one's CRC checked with zlib's crc32."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, found = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        found.append((kind, body))
        pos += 12 + length
    return found


@pytest.mark.parametrize("channels,mode", [(3, "RGB"), (4, "RGBA"), (1, "L")])
def test_pixels_are_save_images_pixels(monkeypatch, channels, mode):
    monkeypatch.setattr(png_writer, "BAND_BYTES", 1000)  # many bands, one row of 333 px each for RGB
    image = smooth_image(37, 333, channels)
    data = written(image, threads=3)
    with Image.open(io.BytesIO(data)) as decoded:
        assert decoded.mode == mode and decoded.size == (333, 37)
        got = np.asarray(decoded).reshape(37, 333, channels)
    expected = comfyui_uint8(image)
    assert image.min() < 0 and image.max() > 1  # the clip is exercised
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(written(expected)))).reshape(expected.shape),
                                  expected)  # uint8 input as is  # fmt: skip


def test_one_zlib_stream_whose_checksum_zlib_accepts(monkeypatch):
    monkeypatch.setattr(png_writer, "BAND_BYTES", 5000)
    pixels = comfyui_uint8(smooth_image(64, 100))
    stream = b"".join(body for kind, body in chunks(written(pixels)) if kind == b"IDAT")
    raw = zlib.decompress(stream)  # raises on a bad Adler-32 or a broken stream
    rows = np.frombuffer(raw, np.uint8).reshape(64, 301)
    assert set(rows[:, 0]) <= {0, 1, 2, 4}  # each row's filter type


def test_adler32_combine_is_zlibs():
    g = np.random.default_rng(1)
    a, b = g.bytes(70_001), g.bytes(131_071)
    assert png_writer.adler32_combine(zlib.adler32(a), zlib.adler32(b), len(b)) == zlib.adler32(a + b)
    assert png_writer.adler32_combine(1, zlib.adler32(b), len(b)) == zlib.adler32(b)
    assert png_writer.adler32_combine(zlib.adler32(a), 1, 0) == zlib.adler32(a)


def pillow_filter_rule(rows: np.ndarray, above: np.ndarray, bpp: int) -> np.ndarray:
    """Pillow's ZipEncode.c, one row and one byte at a time: None, then Up, Sub, Paeth, each taken only when its
    sum of |signed byte| is strictly smaller."""

    def cost(v):
        return sum(int(x) if x < 128 else 256 - int(x) for x in v)

    out, prev = [], [int(v) for v in above]
    for row in rows:
        cur = [int(v) for v in row]
        left = [cur[i - bpp] if i >= bpp else 0 for i in range(len(cur))]
        upleft = [prev[i - bpp] if i >= bpp else 0 for i in range(len(cur))]

        def paeth(a, b, c):
            pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
            return a if pa <= pb and pa <= pc else b if pb <= pc else c

        options = [
            (0, [x % 256 for x in cur]),
            (2, [(x - b) % 256 for x, b in zip(cur, prev, strict=True)]),
            (1, [(x - a) % 256 for x, a in zip(cur, left, strict=True)]),
            (4, [(x - paeth(a, b, c)) % 256 for x, a, b, c in zip(cur, left, prev, upleft, strict=True)]),
        ]
        best = options[0]
        for option in options[1:]:
            if cost(option[1]) < cost(best[1]):
                best = option
        out.append([best[0], *best[1]])
        prev = cur
    return np.array(out, np.uint8)


def test_filter_choice_is_pillows():
    g = np.random.default_rng(2)
    smooth = comfyui_uint8(smooth_image(12, 40)).reshape(12, -1)
    flat_then_noise = np.concatenate([np.full((3, 120), 7, np.uint8), g.integers(0, 256, (3, 120), np.uint8)])
    repeated = np.repeat(g.integers(0, 256, (1, 120), np.uint8), 3, axis=0)  # Up wins (zero) from the second row
    for rows in (smooth, flat_then_noise, repeated):
        above = g.integers(0, 256, rows.shape[1], np.uint8)
        np.testing.assert_array_equal(png_writer.filter_rows(rows, above, 3), pillow_filter_rule(rows, above, 3))
    # By hand, one byte per pixel: None costs 4; Up, Sub and Paeth cost 1 each; Pillow keeps Up, tried first.
    tie = png_writer.filter_rows(np.array([[1, 1, 1, 1]], np.uint8), np.array([1, 1, 1, 0], np.uint8), 1)
    np.testing.assert_array_equal(tie, [[2, 0, 0, 0, 1]])


def test_size_is_pillows_at_the_same_level_and_the_file_does_not_depend_on_threads():
    pixels = comfyui_uint8(smooth_image(512, 512))
    ours = written(pixels, threads=4)
    pillow = io.BytesIO()
    Image.fromarray(pixels).save(pillow, format="png", compress_level=4)
    assert abs(len(ours) / len(pillow.getvalue()) - 1) < 0.01, (len(ours), len(pillow.getvalue()))
    assert written(pixels, threads=1) == ours


def test_text_chunks_as_pillow_reads_them():
    text = {"prompt": '{"3": {"class_type": "KSampler"}}', "workflow": '{"nodes": []}', "note": "caf\u00e9 \u732b"}
    data = written(comfyui_uint8(smooth_image(8, 8)), text=text)
    kinds = [kind for kind, _ in chunks(data)]
    assert kinds[:4] == [b"IHDR", b"tEXt", b"tEXt", b"iTXt"] and kinds[-1] == b"IEND"  # text before the pixels
    with Image.open(io.BytesIO(data)) as decoded:
        assert decoded.text == text


def test_bad_shapes_are_refused():
    for shape in ((8, 8), (8, 8, 2), (0, 8, 3)):
        with pytest.raises(ValueError, match="C in 1, 3, 4"):
            written(np.zeros(shape, np.uint8))
