"""Control images: bytes, base64 text, arrays or PIL images -> 8-bit RGB pixels [H, W, 3].

Decoding uses Pillow when it is installed (every WebUI has it: PNG, JPEG, WebP...). Without it (the
standalone runner on a bare Python) a small PNG reader here covers 8-bit non-interlaced PNGs, the
format preprocessors save. Size is checked from the header before any pixel is decoded, so a
small file cannot expand to gigabytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
import zlib
from typing import Any

import numpy as np

from ..errors import SettingError
from .pngtext import PNG_SIGNATURE

MAX_PIXELS = 8192 * 8192
MAX_SIDE = 16384


class ImageError(SettingError):
    """A control image that cannot be used (a setting's value, or the file given for it)."""
    pass


def _too_big(width: int, height: int, what: str) -> ImageError | None:
    if width < 1 or height < 1 or width > MAX_SIDE or height > MAX_SIDE or width * height > MAX_PIXELS:
        return ImageError(what, f"is {width}x{height} pixels", f"Use an image of at most {MAX_SIDE} pixels a side "
                          f"and {MAX_PIXELS // 1_000_000} megapixels")
    return None


def rgb_pixels(value: Any, what: str) -> np.ndarray:
    """[H, W, 3] uint8 from a numpy array (gradio's gr.Image: [H, W], [H, W, 3] or [H, W, 4]), a PIL
    image, or encoded bytes. Alpha is dropped (composited on black, as sd-webui-controlnet's HWC3)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return decode_image(bytes(value), what)
    if hasattr(value, "convert") and hasattr(value, "size"):    # a PIL image
        if (err := _too_big(*value.size, what)) is not None:
            raise err
        return np.asarray(value.convert("RGB"), dtype=np.uint8).copy()
    array = np.asarray(value)
    if array.dtype == object or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise ImageError(what, f"is not an image (an array of shape {array.shape})", "Give an RGB image")
    if (err := _too_big(array.shape[1], array.shape[0], what)) is not None:
        raise err
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.floating) and array.size and np.nanmax(array) <= 1.0:
            array = np.nan_to_num(array) * 255.0   # a 0..1 float image
        array = np.clip(np.nan_to_num(array.astype(np.float64)), 0, 255).round().astype(np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.shape[2] == 1:
        return np.repeat(array, 3, axis=2)
    if array.shape[2] == 4:
        alpha = array[:, :, 3:4].astype(np.uint16)
        return (array[:, :, :3].astype(np.uint16) * alpha // 255).astype(np.uint8)
    return np.ascontiguousarray(array)


def decode_base64(text: str, what: str) -> np.ndarray:
    """Pixels from base64 text, with or without a `data:image/...;base64,` prefix (what browsers
    and the sd-webui-controlnet API send)."""
    body = text.split(",", 1)[1] if text.startswith("data:") and "," in text else text
    try:
        data = base64.b64decode("".join(body.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(what, "is not base64-encoded image data", "Send the image file's bytes in base64 "
                         "(optionally as a data: URL), or an empty string for no image") from None
    return decode_image(data, what)


def decode_image(data: bytes, what: str) -> np.ndarray:
    if data.startswith(PNG_SIGNATURE) and data[12:16] == b"IHDR" and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])   # before Pillow's own (warning-only) bomb check
        if (err := _too_big(width, height, what)) is not None:
            raise err
    try:
        from PIL import Image
    except ImportError:
        Image = None
    if Image is None:
        return read_png(data, what)
    import io
    try:
        with Image.open(io.BytesIO(data)) as image:
            if (err := _too_big(*image.size, what)) is not None:
                raise err
            return rgb_pixels(image, what)
    except ImageError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad file
        raise ImageError(what, f"cannot be read as an image ({exc.__class__.__name__}: {exc})",
                         "Use a PNG, JPEG or WebP image") from None


# ---------------------------------------------------------------- PNG without Pillow

_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}   # colour type -> samples per pixel


def read_png(data: bytes, what: str) -> np.ndarray:
    """8-bit, non-interlaced PNG (grey, RGB, palette, grey+alpha, RGBA) -> [H, W, 3] uint8."""
    bad = ImageError(what, "is not a PNG this reader handles (Pillow is not installed to read other formats)",
                     "Install Pillow (pip install Pillow), or save the image as an 8-bit PNG")
    if not data.startswith(PNG_SIGNATURE):
        raise bad
    pos, header, palette, alpha, idat = len(PNG_SIGNATURE), None, None, None, []
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if len(body) != length:
            raise ImageError(what, "is a truncated PNG file", "Save the image again")
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body[:13])
            if (err := _too_big(header[0], header[1], what)) is not None:
                raise err
        elif kind == b"PLTE":
            palette = np.frombuffer(body, dtype=np.uint8).reshape(-1, 3)
        elif kind == b"tRNS":
            alpha = np.frombuffer(body, dtype=np.uint8)   # palette images: one alpha per entry
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + length
    if header is None or not idat:
        raise bad
    width, height, depth, colour, _, _, interlace = header
    if depth != 8 or interlace or colour not in _CHANNELS or (colour == 3 and palette is None):
        raise bad
    channels = _CHANNELS[colour]
    stride = width * channels
    decompressor = zlib.decompressobj()
    try:
        raw = decompressor.decompress(b"".join(idat), height * (stride + 1))
    except zlib.error:
        raise ImageError(what, "has damaged PNG image data", "Save the image again") from None
    if len(raw) != height * (stride + 1):
        raise ImageError(what, "has too little PNG image data for its size", "Save the image again")
    pixels = _unfilter(np.frombuffer(raw, dtype=np.uint8).reshape(height, stride + 1), channels, what)
    pixels = pixels.reshape(height, width, channels)
    if colour == 3:
        if pixels.max(initial=0) >= len(palette):
            raise ImageError(what, "has palette indices beyond its palette", "Save the image again")
        if alpha is not None:          # palette transparency: RGBA entries, composited like any alpha
            full = np.full(len(palette), 255, dtype=np.uint8)
            full[:min(len(alpha), len(palette))] = alpha[:len(palette)]
            return rgb_pixels(np.concatenate([palette, full[:, None]], axis=1)[pixels[:, :, 0]], what)
        return palette[pixels[:, :, 0]]
    if colour == 4:                       # grey + alpha -> RGBA layout for rgb_pixels
        pixels = np.concatenate([np.repeat(pixels[:, :, :1], 3, axis=2), pixels[:, :, 1:]], axis=2)
    return rgb_pixels(pixels, what)


def _unfilter(rows: np.ndarray, bpp: int, what: str) -> np.ndarray:
    """Undo the PNG row filters (None, Sub, Up, Average, Paeth); rows [H, 1 + stride]."""
    height, stride = rows.shape[0], rows.shape[1] - 1
    out = np.zeros((height, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.int32)
    for y in range(height):
        kind, line = rows[y, 0], rows[y, 1:].astype(np.int32)
        if kind == 0:
            cur = line
        elif kind == 2:
            cur = (line + prev) & 0xFF
        elif kind in (1, 3, 4):           # depend on the pixel to the left: per pixel, vectorised over its bytes
            cur = np.zeros(stride, dtype=np.int32)
            for x in range(0, stride, bpp):
                a = cur[x - bpp:x] if x else np.zeros(bpp, dtype=np.int32)
                b = prev[x:x + bpp]
                if kind == 1:
                    pred = a
                elif kind == 3:
                    pred = (a + b) // 2
                else:
                    c = prev[x - bpp:x] if x else np.zeros(bpp, dtype=np.int32)
                    p = a + b - c
                    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
                    pred = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
                cur[x:x + bpp] = (line[x:x + bpp] + pred) & 0xFF
        else:
            raise ImageError(what, f"uses an unknown PNG row filter ({kind})", "Save the image again")
        out[y] = cur
        prev = cur
    return out


def pixels_sha256(pixels: np.ndarray) -> str:
    """Hash of the decoded pixels and their shape (the same image hashes the same in any file format)."""
    h = hashlib.sha256(struct.pack(">III", *pixels.shape))
    h.update(np.ascontiguousarray(pixels).tobytes())
    return h.hexdigest()
