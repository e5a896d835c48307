"""Read model files without trusting them.

`.safetensors`: the header is checked by the format's own rules (`safetensors_header`)
before any offset is used; tensors are read lazily
through a memory map. `.ckpt`/`.pt`/`.pth`/`.bin`: only `torch.load(weights_only=True)`,
which refuses pickled code instead of running it. Nothing else is unpickled, ever.

A `TensorStore` is the one view every loader works on: key names, shapes without
reading data, tensors on demand, and prefix views (`store.sub("model.diffusion_model.")`).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import pickle
import re
import struct
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from ..errors import ModelFileError
from .safetensors_header import CORRUPT, Header, HeaderError, header_length, parse_header

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

TORCH_DIM_MAX = 2**63 - 1  # torch sizes are int64


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

    def renamed(self, names: Mapping[str, str]) -> "TensorStore":
        """A view whose keys are renamed: `names` maps each new key to a key of this store.
        Keys not named are left out; no tensor is read or copied (the file is read on demand as before)."""
        full = {new: self.prefix + old for new, old in names.items()}
        shapes = {new: self._shapes[key] for new, key in full.items()}
        dtypes = {new: self._dtypes[key] for new, key in full.items()}
        reader = self._reader
        return TensorStore(self.path, shapes, dtypes, lambda key: reader(full[key]), metadata=self.metadata)

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
        if path.is_dir():
            raise ModelFileError(path, "is a folder, not a model file", "Choose the model file inside it")
        raise ModelFileError(path, "file not found", "Check the name and that the file is in the model folder")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return _open_safetensors(path)
    if suffix in PICKLE_SUFFIXES:
        return _open_pickle(path)
    raise ModelFileError(
        path, f"unsupported file type '{suffix or '(none)'}'",
        "Use a .safetensors file (or .ckpt/.pt, which are read with weights_only=True)")


def read_safetensors_header(path: Path) -> Header:
    """The file's header, checked by the format's rules (`safetensors_header`) and against
    what PyTorch can hold, before any offset is used."""
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            n = header_length(f.read(8), size)
            header = parse_header(f.read(n), size)
    except HeaderError as e:
        raise ModelFileError(path, e.problem, e.fix) from None
    for key, entry in header.tensors.items():
        if entry.dtype not in SAFETENSORS_DTYPES:
            raise ModelFileError(path, f"tensor '{key}' has dtype {entry.dtype}, which this extension cannot load",
                                 f"Supported: {', '.join(SAFETENSORS_DTYPES)}")
        if any(dim > TORCH_DIM_MAX for dim in entry.shape):
            raise ModelFileError(path, f"tensor '{key}' has shape {list(entry.shape)}, a dimension PyTorch cannot hold",
                                 CORRUPT)
    return header


def open_safetensors_header(path: Path) -> TensorStore:
    """Names, shapes, dtypes and metadata of a .safetensors file; reading tensor data is refused."""
    header = read_safetensors_header(path)

    def no_data(key: str) -> torch.Tensor:
        raise RuntimeError(f"{path}: only the header was opened (reading {key!r} is not allowed here)")

    return _header_store(path, header, no_data)


def _open_safetensors(path: Path) -> TensorStore:
    header = read_safetensors_header(path)
    from safetensors import SafetensorError, safe_open  # lazy: keep import time small

    try:  # the reference reader checks the same rules again; a disagreement is still a named error
        handle = safe_open(str(path), framework="pt", device="cpu")  # mmap; closed with the store
    except SafetensorError as e:
        raise ModelFileError(path, f"safetensors refused it ({str(e)[:200]})", CORRUPT) from None
    return _header_store(path, header, handle.get_tensor)


def _header_store(path: Path, header: Header, reader) -> TensorStore:
    shapes = {k: e.shape for k, e in header.tensors.items()}
    dtypes = {k: SAFETENSORS_DTYPES[e.dtype][0] for k, e in header.tensors.items()}
    return TensorStore(path, shapes, dtypes, reader, metadata=header.metadata)


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
