"""The safetensors header, checked by the format's own rules before any offset is used.

A file is 8 bytes (little-endian u64 N), N bytes of UTF-8 JSON, then the data section. The
rules are those of the reference reader (huggingface/safetensors `SafeTensors::read_metadata`
and `Metadata::validate`, parsed by serde_json), so a header passes here exactly when
`safe_open` accepts it:

- N <= 100,000,000 and 8 + N <= file size; the JSON is strict RFC 8259 (no NaN/Infinity,
  no unpaired surrogate escapes, numbers within f64, nesting at most 127 levels);
- the top level is an object; `__metadata__` (once at most) is null or an object of strings;
  every other key is a tensor: an object with `dtype` (a format dtype name), `shape` (array
  of u64) and `data_offsets` (array of two u64), each once, other fields ignored; a tensor
  key given twice keeps its last entry;
- sorted by offsets, tensors tile the data section from byte 0 with no gap and no overlap,
  each exactly as long as shape x dtype bits (computed without u64 overflow, whole bytes),
  and the last one ends at the end of the file.

Two forms serde happens to accept and no writer produces are refused: a tensor entry
written as a JSON array, and a dtype written as an object. What PyTorch cannot hold here
(some format dtypes, dimensions of 2**63 or more) is refused afterwards by `checkpoint`.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

MAX_HEADER_BYTES = 100_000_000  # the reference reader's MAX_HEADER_SIZE
MAX_JSON_DEPTH = 127  # serde_json's recursion limit as the reference reader meets it
U64_MAX = 2**64 - 1
I64_MIN = -(2**63)

# Every dtype name of the format, with its width in bits.
FORMAT_DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
    "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}

CORRUPT = "The file is corrupt or not a safetensors file; download it again"
TRUNCATED = "The file is truncated; download it again"


class HeaderError(ValueError):
    """The header breaks a rule of the format: `problem` says which, `fix` what to do."""

    def __init__(self, problem: str, fix: str = CORRUPT) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}. {fix}")


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offsets within the data section
    end: int


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int  # 8 + N: where the data section begins in the file


def header_length(prefix: bytes, file_size: int) -> int:
    """N from the file's first 8 bytes, checked against the limit and the file size."""
    if file_size == 0:
        raise HeaderError("the file is empty", "Download it again")
    if file_size < 8:
        raise HeaderError(f"only {file_size} bytes, too short for a safetensors header", TRUNCATED)
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_BYTES:
        raise HeaderError(f"header length {n} is over the format's limit of {MAX_HEADER_BYTES} bytes")
    if 8 + n > file_size:
        raise HeaderError(f"header length {n} does not fit a file of {file_size} bytes",
                          "The file is truncated or not a safetensors file; download it again")
    return n


def parse_header(raw: bytes, file_size: int) -> Header:
    """Check the JSON header `raw` (the N bytes after the length) of a file of `file_size` bytes."""
    pairs = _parse_json(raw)
    if not isinstance(pairs, _Object):
        raise HeaderError(f"the header is a JSON {_json_type(pairs)}, not an object")
    metadata: dict[str, str] = {}
    tensors: dict[str, TensorEntry] = {}
    seen_metadata = False
    for key, value in pairs:
        if key == "__metadata__":
            if seen_metadata:
                raise HeaderError("the header has '__metadata__' twice")
            seen_metadata = True
            metadata = _metadata(value)
        else:
            tensors[key] = _tensor_entry(key, value)  # a repeated key keeps its last entry, as in the reference
    data_end = _check_layout(tensors)
    data_start = 8 + len(raw)
    if data_start + data_end != file_size:
        have = file_size - data_start
        if have < data_end:
            raise HeaderError(f"the tensors need {data_end} data bytes but the file holds only {have}", TRUNCATED)
        raise HeaderError(f"the file has {_bytes(have - data_end)} after the last tensor; the format allows none")
    return Header(tensors, metadata, data_start)


# ------------------------------------------------------------------ JSON as serde_json reads it

class _Object(list):
    """A JSON object as its (key, value) pairs, in order, duplicates kept."""


def _parse_json(raw: bytes) -> object:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HeaderError(f"the header is not UTF-8 (byte {e.start})") from None
    try:
        value = json.loads(text, object_pairs_hook=_Object, parse_constant=_no_constant,
                           parse_int=_json_int, parse_float=_json_float)
    except RecursionError:
        raise HeaderError(f"the header nests deeper than {MAX_JSON_DEPTH} levels") from None
    except json.JSONDecodeError as e:
        raise HeaderError(f"the header is not valid JSON ({e.msg} at character {e.pos})") from None
    except ValueError as e:  # from the hooks below, or int() of a number with thousands of digits
        raise HeaderError(f"the header is not valid JSON ({e})") from None
    _check_depth_and_strings(value)
    return value


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _json_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _json_int(text: str) -> int | float:
    if text == "-0":
        return -0.0  # serde_json reads -0 as a float
    value = int(text)
    if I64_MIN <= value <= U64_MAX:
        return value
    return _json_float(text)  # beyond 64 bits serde_json reads a float, so never a u64


def _check_depth_and_strings(value: object) -> None:
    """Nesting within serde_json's limit; no unpaired surrogate (Python's json lets them through)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            _check_text(item)
        elif isinstance(item, list):  # arrays and _Object
            if depth > MAX_JSON_DEPTH:
                raise HeaderError(f"the header nests deeper than {MAX_JSON_DEPTH} levels")
            for child in item:
                if isinstance(item, _Object):
                    _check_text(child[0])
                    child = child[1]
                stack.append((child, depth + 1))


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise HeaderError(f"the header has an unpaired surrogate escape in {text[:40]!r}") from None


def _json_type(value: object) -> str:
    if isinstance(value, _Object):
        return "object"
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


# ------------------------------------------------------------------ entries

def _metadata(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, _Object):
        raise HeaderError(f"'__metadata__' is a JSON {_json_type(value)}, not an object of strings")
    bad = next(((k, v) for k, v in value if not isinstance(v, str)), None)
    if bad is not None:
        raise HeaderError(f"'__metadata__' value of '{bad[0]}' is a JSON {_json_type(bad[1])}; "
                          "the format allows only strings")
    return dict(value)


def _tensor_entry(key: str, value: object) -> TensorEntry:
    where = f"tensor '{key}'"
    if not isinstance(value, _Object):
        raise HeaderError(f"{where} is a JSON {_json_type(value)}, not an object with dtype, shape and data_offsets")
    fields: dict[str, object] = {}
    for name, field in value:
        if name in ("dtype", "shape", "data_offsets"):
            if name in fields:
                raise HeaderError(f"{where} has '{name}' twice")
            fields[name] = field
    missing = [name for name in ("dtype", "shape", "data_offsets") if name not in fields]
    if missing:
        raise HeaderError(f"{where} has no {' and no '.join(missing)}")
    dtype, shape, offsets = fields["dtype"], fields["shape"], fields["data_offsets"]
    if not (isinstance(dtype, str) and dtype in FORMAT_DTYPE_BITS):
        raise HeaderError(f"{where} has dtype {_shown(dtype)}, which is not a safetensors dtype "
                          f"({', '.join(FORMAT_DTYPE_BITS)})")
    if not (isinstance(shape, list) and not isinstance(shape, _Object) and all(map(_is_u64, shape))):
        raise HeaderError(f"{where} has shape {_shown(shape)}; a shape is an array of whole numbers >= 0")
    if not (isinstance(offsets, list) and not isinstance(offsets, _Object) and len(offsets) == 2
            and all(map(_is_u64, offsets))):
        raise HeaderError(f"{where} has data_offsets {_shown(offsets)}; they are two whole numbers >= 0")
    return TensorEntry(dtype, tuple(shape), offsets[0], offsets[1])


def _is_u64(value: object) -> bool:
    return type(value) is int and 0 <= value <= U64_MAX  # bool is an int subclass; JSON true is not a number


def _bytes(count: int) -> str:
    return f"{count} byte" + ("" if count == 1 else "s")


def _shown(value: object) -> str:
    text = json.dumps(dict(value) if isinstance(value, _Object) else value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_layout(tensors: dict[str, TensorEntry]) -> int:
    """Tensors, sorted by offsets, tile the data section from 0; returns where the last one ends."""
    end_so_far, previous = 0, None
    for key, entry in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        where = f"tensor '{key}'"
        if entry.end < entry.begin:
            raise HeaderError(f"{where} has data_offsets [{entry.begin}, {entry.end}], which end before they begin")
        if entry.begin > end_so_far:
            raise HeaderError(f"{where} starts at data byte {entry.begin}, leaving a gap of "
                              f"{_bytes(entry.begin - end_so_far)}; the format allows none")
        if entry.begin < end_so_far:
            raise HeaderError(f"{where} overlaps tensor '{previous}' in the file")
        elements = 1
        for dim in entry.shape:
            elements *= dim
            if elements > U64_MAX:
                raise HeaderError(f"{where} has shape {list(entry.shape)}, too many elements to address")
        bits = elements * FORMAT_DTYPE_BITS[entry.dtype]
        if bits > U64_MAX:
            raise HeaderError(f"{where} has shape {list(entry.shape)}, too many bytes to address")
        if bits % 8:
            raise HeaderError(f"{where}: {elements} elements of {entry.dtype} do not fill whole bytes")
        if entry.end - entry.begin != bits // 8:
            raise HeaderError(f"{where} offsets [{entry.begin}, {entry.end}] do not match its shape "
                              f"{list(entry.shape)} and dtype {entry.dtype} ({bits // 8} bytes)")
        end_so_far, previous = entry.end, key
    return end_so_far

