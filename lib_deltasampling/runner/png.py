"""PNG files with an A1111 `parameters` text chunk, written with zlib + struct + numpy only.

Text chunks follow PIL's `PngInfo.add_text` (what A1111's `images.save_image_with_geninfo` calls):
tEXt when the value encodes as latin-1, otherwise an uncompressed iTXt (UTF-8, empty language and
translated keyword). They go before the image data, where `Image.open(...).info` finds them
without decoding the pixels. Rows are filtered per row with the filter (None, Sub, Up, Average,
Paeth) of smallest sum of absolute signed bytes, libpng's heuristic.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..runtime.pngtext import PNG_SIGNATURE
from .outputs import write_atomic

_ROWS_PER_BLOCK = 256            # filter this many rows at a time (bounded memory on large images)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def text_chunk(key: str, value: str) -> bytes:
    """One tEXt (latin-1) or iTXt (UTF-8) chunk, chosen as PIL's `add_text` chooses."""
    try:
        keyword = key.encode("latin-1")
    except UnicodeEncodeError:
        keyword = b""
    if not 1 <= len(keyword) <= 79 or b"\0" in keyword or keyword != keyword.strip():
        raise ValueError(f"PNG text keyword {key!r} must be 1-79 latin-1 characters without NUL or edge spaces")
    try:
        return _chunk(b"tEXt", keyword + b"\0" + value.encode("latin-1"))
    except UnicodeEncodeError:
        pass
    try:
        data = value.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f'PNG text "{key}"', "holds characters that are not valid Unicode text "
                        "(e.g. bytes from a terminal in another encoding)", "Retype the prompt or setting") from None
    return _chunk(b"iTXt", keyword + b"\0\0\0" + b"\0" + b"\0" + data)   # flag, method, lang\0, tkey\0


def _filter_rows(pixels: np.ndarray, channels: int) -> bytes:
    """Scanlines [H, 1 + W*C]: per row the filter type byte and the filtered bytes."""
    x = pixels.reshape(pixels.shape[0], -1).astype(np.int16)
    out = []
    for r0 in range(0, x.shape[0], _ROWS_PER_BLOCK):
        cur = x[r0:r0 + _ROWS_PER_BLOCK]
        up = x[r0 - 1:r0 - 1 + len(cur)] if r0 else np.concatenate([np.zeros_like(cur[:1]), cur[:-1]])
        left = np.zeros_like(cur)
        left[:, channels:] = cur[:, :-channels]
        up_left = np.zeros_like(cur)
        up_left[:, channels:] = up[:, :-channels]
        # Paeth predictor: the neighbour closest to left + up - up_left (ties: left, up, up_left).
        p = left + up - up_left
        pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - up_left)
        paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, up_left))
        candidates = (np.stack([cur, cur - left, cur - up, cur - ((left + up) >> 1), cur - paeth]) & 0xFF).astype(np.uint8)
        cost = np.abs(candidates.view(np.int8).astype(np.int32)).sum(axis=-1)      # [5, rows]
        best = cost.argmin(axis=0)
        rows = candidates[best, np.arange(len(cur))]
        out.append(np.concatenate([best[:, None].astype(np.uint8), rows], axis=1).tobytes())
    return b"".join(out)


def png_bytes(image: np.ndarray, text: Mapping[str, str] | None = None, compress_level: int = 6) -> bytes:
    """A PNG file's bytes: an RGB uint8 image [H, W, 3] and text chunks, in order."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape[:2]:
        raise ValueError(f"expected a uint8 RGB image [H, W, 3], got {image.dtype} {tuple(image.shape)}")
    height, width = image.shape[:2]
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)   # 8-bit RGB, deflate, no interlace
    parts = [PNG_SIGNATURE, _chunk(b"IHDR", header)]
    parts += [text_chunk(k, v) for k, v in (text or {}).items()]
    parts.append(_chunk(b"IDAT", zlib.compress(_filter_rows(np.ascontiguousarray(image), 3), compress_level)))
    parts.append(_chunk(b"IEND", b""))
    return b"".join(parts)


def write_png(path: str | Path, image: np.ndarray, parameters: str | None = None, *,
              text: Mapping[str, str] | None = None, compress_level: int = 6, overwrite: bool = True) -> Path:
    """Write `image` ([H, W, 3] uint8) with the A1111 `parameters` chunk (if given) and any other
    text chunks, whole or not at all (`outputs.write_atomic`)."""
    chunks = {"parameters": parameters} if parameters is not None else {}
    chunks.update(text or {})
    return write_atomic(Path(path), png_bytes(image, chunks, compress_level), overwrite=overwrite)
