"""Read model files without trusting them.

`.safetensors`: the header is validated (size, JSON, dtypes, shapes, offsets inside
the file and not overlapping) before any offset is used; tensors are read lazily
through a memory map. `.ckpt`/`.pt`/`.pth`/`.bin`: only `torch.load(weights_only=True)`,
which refuses pickled code instead of running it. Nothing else is unpickled, ever.

A `TensorStore` is the one view every loader works on: key names, shapes without
reading data, tensors on demand, and prefix views (`store.sub("model.diffusion_model.")`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import pickle
import re
import struct
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from ..errors import ModelFileError

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

# safetensors dtype name -> (torch dtype, bytes per element)
SAFETENSORS_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}

# A real header is a few hundred KB; anything far larger is a corrupt length field.
MAX_HEADER_BYTES = 100 * 1024 * 1024


class TensorStore:
    """Named tensors of one file (or a prefix of it), read on demand.

    `keys()` and `shape()` never read tensor data. `tensor()` returns a CPU tensor in
    the stored dtype. `sub(prefix)` is a view whose keys have `prefix` removed.
    """

    def __init__(self, path: Path | None, shapes: dict[str, tuple[int, ...]],
                 dtypes: dict[str, torch.dtype], reader, prefix: str = "",
                 metadata: Mapping[str, str] | None = None) -> None:
        self.path = path
        self._shapes = shapes          # full keys
        self._dtypes = dtypes          # full keys
        self._reader = reader          # full key -> tensor
        self.prefix = prefix
        self.metadata: Mapping[str, str] = metadata or {}

    @classmethod
    def from_dict(cls, tensors: Mapping[str, torch.Tensor], path: Path | None = None) -> "TensorStore":
        """A store over tensors already in memory (tests, converted files)."""
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        dtypes = {k: v.dtype for k, v in tensors.items()}
        return cls(path, shapes, dtypes, tensors.__getitem__)

    def sub(self, prefix: str) -> "TensorStore":
        return TensorStore(self.path, self._shapes, self._dtypes, self._reader,
                           self.prefix + prefix, self.metadata)

    def keys(self) -> list[str]:
        n = len(self.prefix)
        return [k[n:] for k in self._shapes if k.startswith(self.prefix)]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return sum(1 for k in self._shapes if k.startswith(self.prefix))

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and (self.prefix + key) in self._shapes

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[self.prefix + key]

    def dtype(self, key: str) -> torch.dtype:
        return self._dtypes[self.prefix + key]

    def tensor(self, key: str) -> torch.Tensor:
        return self._reader(self.prefix + key)

    def has_prefix(self, prefix: str) -> bool:
        full = self.prefix + prefix
        return any(k.startswith(full) for k in self._shapes)

    def stored_dtypes(self) -> dict[torch.dtype, int]:
        """How many tensors of each stored dtype (for `inspect` and precision reports)."""
        counts: dict[torch.dtype, int] = {}
        for k, dt in self._dtypes.items():
            if k.startswith(self.prefix):
                counts[dt] = counts.get(dt, 0) + 1
        return counts

    def nbytes(self) -> int:
        total = 0
        for k, shape in self._shapes.items():
            if k.startswith(self.prefix):
                total += math.prod(shape) * torch.empty((), dtype=self._dtypes[k]).element_size()
        return total


def file_sha256(path: str | Path, *, skip: int = 0) -> str:
    """sha256 of a file (A1111 `hashes.calculate_sha256`), optionally of its bytes after `skip`."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(skip)
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def addnet_hash(path: str | Path) -> str:
    """A1111's LoRA hash ("Lora hashes" infotext, `hashes.addnet_hash_safetensors`): sha256 of a
    .safetensors file's tensor data (after its header); other files hash whole."""
    path = Path(path)
    skip = 0
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        with path.open("rb") as f:
            skip = 8 + struct.unpack("<Q", f.read(8))[0]
    return file_sha256(path, skip=skip)


def open_store(path: str | Path) -> TensorStore:
    """Open a model file as a `TensorStore`, refusing anything that is not plain tensors."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(path, "file not found", "Check the name and that the file is in the model folder")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return _open_safetensors(path)
    if suffix in PICKLE_SUFFIXES:
        return _open_pickle(path)
    raise ModelFileError(
        path, f"unsupported file type '{suffix or '(none)'}'",
        "Use a .safetensors file (or .ckpt/.pt, which are read with weights_only=True)")


def read_safetensors_header(path: Path) -> tuple[dict[str, dict], dict[str, str], int]:
    """Return (tensor entries, metadata, data start) after checking every field."""
    size = path.stat().st_size
    if size == 0:
        raise ModelFileError(path, "the file is empty", "Download it again")
    if size < 8:
        raise ModelFileError(path, f"only {size} bytes, too short for a safetensors header",
                             "The file is truncated; download it again")
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len == 0 or header_len > MAX_HEADER_BYTES or header_len > size - 8:
            raise ModelFileError(
                path, f"header length {header_len} does not fit a file of {size} bytes",
                "The file is truncated or not a safetensors file; download it again")
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(path, f"the safetensors header is not valid JSON ({e.__class__.__name__})",
                             "The file is corrupt; download it again") from None
    if not isinstance(header, dict):
        raise ModelFileError(path, "the safetensors header is not a JSON object", "The file is corrupt; download it again")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        metadata = {}
    data_start = 8 + header_len
    data_size = size - data_start
    spans: list[tuple[int, int, str]] = []
    for key, entry in header.items():
        where = f"tensor '{key}'"
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise ModelFileError(path, f"{where} has a malformed header entry", "The file is corrupt; download it again")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in SAFETENSORS_DTYPES:
            raise ModelFileError(path, f"{where} has unsupported dtype {dtype!r}",
                                 f"Supported: {', '.join(SAFETENSORS_DTYPES)}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise ModelFileError(path, f"{where} has an invalid shape {shape!r}", "The file is corrupt; download it again")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise ModelFileError(path, f"{where} has invalid data offsets {offsets!r}", "The file is corrupt; download it again")
        begin, end = offsets
        expected = math.prod(shape) * SAFETENSORS_DTYPES[dtype][1]
        if not (0 <= begin <= end) or end - begin != expected:
            raise ModelFileError(path, f"{where} offsets {offsets} do not match its shape {shape} and dtype {dtype}",
                                 "The file is corrupt; download it again")
        if end > data_size:
            raise ModelFileError(path, f"{where} ends at byte {end} but the file holds only {data_size} data bytes",
                                 "The file is truncated; download it again")
        spans.append((begin, end, key))
    spans.sort()
    for (b0, e0, k0), (b1, e1, k1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise ModelFileError(path, f"tensors '{k0}' and '{k1}' overlap in the file", "The file is corrupt; download it again")
    return header, {str(k): str(v) for k, v in metadata.items()}, data_start


def _open_safetensors(path: Path) -> TensorStore:
    header, metadata, _ = read_safetensors_header(path)
    from safetensors import safe_open  # lazy: keep import time small

    handle = safe_open(str(path), framework="pt", device="cpu")  # mmap; closed with the store
    shapes = {k: tuple(e["shape"]) for k, e in header.items()}
    dtypes = {k: SAFETENSORS_DTYPES[e["dtype"]][0] for k, e in header.items()}
    return TensorStore(path, shapes, dtypes, handle.get_tensor, metadata=metadata)


def _open_pickle(path: Path) -> TensorStore:
    tensors = _flatten_checkpoint(load_pickle_tree(path))
    if not tensors:
        raise ModelFileError(path, "holds no tensors", "Check that this is a model file")
    return TensorStore.from_dict(tensors, path=path)


def load_pickle_tree(path: str | Path, *, allow: tuple[type, ...] = ()) -> object:
    """The object in a `.ckpt/.pt/.pth/.bin` file, read with `torch.load(weights_only=True)`:
    dicts, lists, numbers, strings and tensors, never pickled code.

    `allow`: extra classes the file may hold (e.g. `torch.nn.ParameterDict` of old
    textual-inversion files); the weights-only unpickler rebuilds them from plain state
    without running their code. Needs torch >= 2.5 (`torch.serialization.safe_globals`);
    on older torch such files are refused like any other class.
    """
    path = Path(path)
    if path.stat().st_size == 0:
        raise ModelFileError(path, "the file is empty", "Download it again")
    allowed = getattr(torch.serialization, "safe_globals", None)
    try:
        with warnings.catch_warnings(), (allowed(list(allow)) if allow and allowed else contextlib.nullcontext()):
            warnings.simplefilter("ignore")  # pickle-protocol chatter; refusals surface as errors below
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        # torch's text suggests weights_only=False; we never do that, so only the culprit is quoted.
        culprit = re.search(r"(GLOBAL [\w.]+|Unsupported operand \d+)", str(e))
        detail = f" ({culprit.group(1)})" if culprit else ""
        raise ModelFileError(
            path, f"refused: the file holds Python objects other than tensors, which could run code{detail}",
            "Use a .safetensors version of this model") from None
    except (EOFError, RuntimeError, ValueError, OSError) as e:
        raise ModelFileError(path, f"cannot be read as a PyTorch checkpoint ({e.__class__.__name__}: {str(e)[:200]})",
                             "The file is truncated or corrupt; download it again") from None


def _flatten_checkpoint(obj: object) -> dict[str, torch.Tensor]:
    """Training checkpoints nest weights under 'state_dict'; other entries (step counts) are not weights."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        return {}
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
