"""Text chunks of PNG files (tEXt, zTXt, iTXt): A1111's `parameters` infotext and its PNG embeddings.

Read by streaming over the chunks (image data is skipped, not loaded); stdlib only.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

from ..errors import ModelFileError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_TEXT_BYTES = 1 << 24   # refuse absurd text chunks (PIL's own limit is 1 MiB)
TEXT_KINDS = (b"tEXt", b"zTXt", b"iTXt")


def read_png_text(path: str | Path) -> dict[str, str]:
    """Every text chunk of a PNG as {keyword: text}; a later chunk wins, as in PIL."""
    path = Path(path)
    out: dict[str, str] = {}
    with open(path, "rb") as f:
        if f.read(8) != PNG_SIGNATURE:
            raise ModelFileError(path, "is not a PNG image", "Give a .png file")
        while True:
            head = f.read(8)
            if len(head) < 8:
                return out
            length, kind = struct.unpack(">I4s", head)
            if kind == b"IEND":
                return out
            if kind not in TEXT_KINDS or length > MAX_TEXT_BYTES:
                f.seek(length + 4, os.SEEK_CUR)   # data + CRC
                continue
            body = f.read(length)
            f.seek(4, os.SEEK_CUR)
            keyword, _, rest = body.partition(b"\0")
            try:
                out[keyword.decode("latin-1")] = chunk_text(kind, rest)
            except (zlib.error, UnicodeDecodeError, ValueError) as e:
                raise ModelFileError(path, f"its {kind.decode()} chunk {keyword.decode('latin-1')!r} cannot be "
                                           f"decoded ({e.__class__.__name__})", "Write the image again") from None


def chunk_text(kind: bytes, rest: bytes) -> str:
    """The text of one chunk's data after its keyword."""
    if kind == b"tEXt":
        return rest.decode("latin-1")
    if kind == b"zTXt":                     # compression method byte, zlib stream; latin-1 text
        return _inflate(rest[1:]).decode("latin-1")
    compressed = rest[:1] == b"\x01"        # iTXt: flag, method, language\0, translated keyword\0, text
    _language, _, rest = rest[2:].partition(b"\0")
    _translated, _, text = rest.partition(b"\0")
    return (_inflate(text) if compressed else text).decode("utf-8")


def _inflate(data: bytes) -> bytes:
    inflater = zlib.decompressobj()
    out = inflater.decompress(data, MAX_TEXT_BYTES)
    if inflater.unconsumed_tail:
        raise ValueError("text larger than 16 MiB")
    return out
