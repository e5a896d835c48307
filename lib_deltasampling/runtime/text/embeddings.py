"""Textual-inversion embedding files for the source model, read as A1111 1.10.1 reads them.

Source followed: `modules/textual_inversion/textual_inversion.py` (`EmbeddingDatabase.load_from_file`,
`load_from_dir`, `create_embedding_from_data`, `Embedding.set_hash`), `image_embedding.py`
(`embedding_from_b64`) and `sd_hijack_clip.py` (the "TI hashes" infotext entry).

- Name: the file name without its extension ("a.b.pt" -> "a.b"); subfolders are not part of it.
  Image files carry their name in the embedded data.
- Layouts (first match wins, as A1111): a dict with `string_to_param` holding ONE tensor
  (A1111/.pt, rinongal's ParameterDict), a dict with `clip_l` and `clip_g` (SDXL), a dict with
  a single tensor (`emb_params` of kohya .safetensors, diffusers `{"<token>": vec}` learned_embeds.bin).
- `.pt/.bin` are read only with `torch.load(weights_only=True)`; `.safetensors` through
  `open_store`; `.png` through its `sd-ti-embedding` text chunk (base64 JSON, no pickle).
  Embeddings hidden in image pixels (A1111's fallback, and the only form in .webp/.jxl/.avif)
  are refused.
- A1111 skips embeddings whose width does not fit the loaded model; `load_embedding` refuses them
  naming both families. `EmbeddingLibrary.for_prompt` can do either (`strict`).
- Duplicate names: A1111 keeps the one it loads last (`register_embedding_by_name` replaces);
  folders are walked top-down like its `os.walk`, files in sorted order.
- Hash: sha256 of the whole file; the short hash is its first 12 hex digits (`Embedding.set_hash`).
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import torch

from ...errors import ModelFileError, UserError
from ..checkpoint import SAFETENSORS_SUFFIXES, file_sha256, load_pickle_tree, open_store
from ..pngtext import read_png_text
from .prompt import CHUNK_TOKENS, extract_extra_networks, parse_prompt_attention, tokenize_prompt
from .tokenizer import ClipTokenizer, pre_tokenize, whitespace_clean

EmbeddingVectors = Union[torch.Tensor, dict[str, torch.Tensor]]

TENSOR_SUFFIXES = (".pt", ".bin", ".safetensors")       # what A1111 loads as tensor files
IMAGE_SUFFIXES = (".png", ".webp", ".jxl", ".avif")     # what it opens as images
PNG_TEXT_KEY = "sd-ti-embedding"
SHORTHASH_LEN = 12                  # A1111 `Embedding.set_hash`: hash[0:12]
FAMILY_LABELS = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}
KNOWN_WIDTHS = {768: "SD1.x", 1024: "SD2.x"}            # single-tensor embeddings of real models
SDXL_WIDTHS = (768, 1280)                               # clip_l, clip_g

_TRY_OTHER = "Check that the file is a textual-inversion embedding and download it again if it is"


@dataclass
class Embedding:
    """One loaded embedding, already checked against the source model's text encoders.

    `vectors`: float32 CPU rows [n, width], or {"clip_l": [n, wl], "clip_g": [n, wg]} (SDXL).
    `family`: the source family it was checked for ("sd1" | "sd2" | "sdxl").
    `format`: "string_to_param", "clip_l/clip_g", "emb_params", "diffusers" (one named tensor)
    or "png text" (A1111 embedding image).
    `meta`: plain values stored beside the vectors (A1111: step, sd_checkpoint, sd_checkpoint_name).
    """

    name: str
    vectors: EmbeddingVectors
    path: Path
    family: str
    n_vectors: int
    format: str
    meta: dict[str, object] = field(default_factory=dict)

    @functools.cached_property
    def sha256(self) -> str:
        return file_sha256(self.path)

    @property
    def shorthash(self) -> str:
        return self.sha256[:SHORTHASH_LEN]

    @property
    def widths(self) -> dict[str, int]:
        if isinstance(self.vectors, Mapping):
            return {k: v.shape[1] for k, v in self.vectors.items()}
        return {"clip_l": self.vectors.shape[1]}

    def describe(self) -> dict[str, object]:
        """What `inspect` and the infotext report about this embedding."""
        return {"name": self.name, "file": str(self.path), "format": self.format,
                "family": FAMILY_LABELS.get(self.family, self.family), "vectors": self.n_vectors,
                "widths": self.widths, "hash": self.shorthash, **self.meta}


def ti_hashes(embeddings: Iterable[Embedding]) -> str:
    """A1111's infotext value "TI hashes": `name: shorthash, ...` with ':' and ',' removed from names."""
    return ", ".join(f"{e.name.replace(':', '').replace(',', '')}: {e.shorthash}" for e in embeddings)


def encoder_widths(stack) -> dict[str, int]:
    """{ti_key: width} of a `TextStack`'s encoders (SD1/SD2: {"clip_l": w}; SDXL: clip_l and clip_g)."""
    return {enc.ti_key: enc.width for enc in stack.encoders}


# ---------------------------------------------------------------- reading files

def embedding_name(path: Path) -> str:
    """A1111's name for a tensor file: the file name without its last extension."""
    return os.path.splitext(path.name)[0]


def load_embedding(path: str | Path, family: str, encoder_widths: Mapping[str, int]) -> Embedding:
    """Read one embedding file and check it fits the source model.

    `family`: the source model's family ("sd1" | "sd2" | "sdxl", or a `Family`);
    `encoder_widths`: {ti_key: width} of its text encoders (see `encoder_widths`).
    Raises `ModelFileError` naming the file for unreadable files, unknown layouts, NaN/inf,
    zero or more than 75 vectors, and vectors made for another model family.
    """
    path = Path(path)
    family = getattr(family, "value", family)
    name, data, vectors, fmt = _read_embedding(path)
    _check_fits(vectors, path, family, encoder_widths)
    n = next(iter(vectors.values())).shape[0] if isinstance(vectors, dict) else vectors.shape[0]
    meta = {k: data[k] for k in ("step", "sd_checkpoint", "sd_checkpoint_name")
            if isinstance(data, Mapping) and isinstance(data.get(k), (str, int, float)) and not isinstance(data.get(k), bool)}
    return Embedding(name, vectors, path, family, n, fmt, meta)


def describe_embedding_file(path: str | Path) -> dict[str, object]:
    """What an embedding file holds, without a model (for `inspect`): name, layout, vectors, family."""
    path = Path(path)
    name, _, vectors, fmt = _read_embedding(path)
    n = next(iter(vectors.values())).shape[0] if isinstance(vectors, dict) else vectors.shape[0]
    return {"name": name, "file": str(path), "format": fmt, "vectors": n, "made for": describe_widths(vectors),
            "hash": file_sha256(path)[:SHORTHASH_LEN]}


def _read_embedding(path: Path) -> tuple[str, object, EmbeddingVectors, str]:
    """(name, raw data, vectors, format) of an embedding file, not yet checked against a model."""
    if not path.is_file():
        raise ModelFileError(path, "file not found", "Check the embedding's name and folder")
    if path.stat().st_size == 0:
        raise ModelFileError(path, "the file is empty", "Download it again")
    name, data, fmt = _read_data(path)
    vectors, layout = _vectors_from_data(data, path)
    return name, data, vectors, fmt or layout


def _read_data(path: Path) -> tuple[str, object, str | None]:
    """(name, loaded object, format override) of an embedding file of any supported type."""
    suffix = path.suffix.lower()
    if suffix in (".pt", ".bin"):
        return embedding_name(path), _read_pickle(path), None
    if suffix in SAFETENSORS_SUFFIXES:
        return embedding_name(path), _read_safetensors(path), None
    if suffix == ".png":
        data = png_embedding_data(path)
        if data is None:
            raise ModelFileError(path, f"this image has no '{PNG_TEXT_KEY}' text chunk, so it holds no embedding this "
                                 "extension can read (embeddings hidden in image pixels are not supported)",
                                 "Use the embedding's .pt or .safetensors file instead")
        return _image_name(data, path), data, "png text"
    if suffix in IMAGE_SUFFIXES:
        raise ModelFileError(path, f"embeddings stored in {suffix} images (hidden in the pixels) are not supported",
                             "Use the embedding's .pt or .safetensors file instead")
    raise ModelFileError(path, f"'{suffix or '(none)'}' is not an embedding file type",
                         "Embeddings are .pt, .bin, .safetensors or A1111 .png files")


def _read_pickle(path: Path) -> object:
    try:
        # rinongal/ldm textual inversion saved `string_to_param` as a torch.nn.ParameterDict (A1111 allows it)
        return load_pickle_tree(path, allow=(torch.nn.ParameterDict,))
    except ModelFileError as e:
        if "ParameterDict" in e.problem:  # torch < 2.5 cannot allow it safely
            raise ModelFileError(path, "stores its vectors in a torch ParameterDict (old textual-inversion format), "
                                 "which this PyTorch version cannot read without running pickled code",
                                 "Convert it to .safetensors, or update PyTorch to 2.5 or newer") from None
        raise


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    store = open_store(path)
    keys = store.keys()
    # Look before reading: a LoRA or checkpoint in the embeddings folder has hundreds of keys.
    if not keys or not ({"clip_l", "clip_g"} <= set(keys) or len(keys) == 1):
        shown = ", ".join(sorted(keys)[:5]) + (", ..." if len(keys) > 5 else "")
        raise ModelFileError(path, f"is not a textual-inversion embedding ({len(keys)} tensors: {shown or 'none'})",
                             "An embedding holds one tensor (e.g. 'emb_params'), or 'clip_l' and 'clip_g' for SDXL")
    return {k: store.tensor(k) for k in keys}


def _image_name(data: object, path: Path) -> str:
    name = data.get("name") if isinstance(data, Mapping) else None
    return name if isinstance(name, str) and name else os.path.splitext(path.name)[0]


def _vectors_from_data(data: object, path: Path) -> tuple[EmbeddingVectors, str]:
    """A1111 `create_embedding_from_data`: which layout, and its vectors as float32 [n, width]."""
    if not isinstance(data, Mapping):
        raise ModelFileError(path, f"holds a {type(data).__name__}, not an embedding dictionary", _TRY_OTHER)
    if "string_to_param" in data:
        params = data["string_to_param"]
        if isinstance(params, torch.Tensor):   # flattened by a converter: the vectors themselves
            return _rows(params, path, "string_to_param"), "string_to_param"
        if isinstance(params, torch.nn.Module):
            # fix for files saved by torch 1.11 (A1111 reads `_parameters`); never call methods of the object
            params = vars(params).get("_parameters", {})
        if not isinstance(params, Mapping) or len(params) != 1:
            count = len(params) if isinstance(params, Mapping) else "no"
            raise ModelFileError(path, f"'string_to_param' holds {count} terms; an embedding file holds exactly one",
                                 _TRY_OTHER)
        return _rows(next(iter(params.values())), path, "string_to_param"), "string_to_param"
    if "clip_l" in data and "clip_g" in data:
        return {k: _rows(data[k], path, k) for k in ("clip_l", "clip_g")}, "clip_l/clip_g"
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if len(tensors) == 1:
        ((key, value),) = tensors.items()
        return _rows(value, path, str(key)), "emb_params" if key == "emb_params" else "diffusers"
    keys = ", ".join(map(str, list(data)[:5]))
    raise ModelFileError(path, f"is not a textual-inversion embedding (it holds {len(tensors)} tensors; keys: {keys})",
                         "A1111 embeddings hold 'string_to_param', 'emb_params', one named tensor, "
                         "or 'clip_l' and 'clip_g' (SDXL)")


def _rows(value: object, path: Path, key: str) -> torch.Tensor:
    """One tensor of vectors as float32 [n, width] on the CPU (a copy: nothing stays memory-mapped)."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        kind = f"a {value.dtype} tensor" if isinstance(value, torch.Tensor) else f"a {type(value).__name__}"
        raise ModelFileError(path, f"'{key}' is {kind}, not floating-point vectors", _TRY_OTHER)
    rows = value.detach().to("cpu", torch.float32, copy=True)
    if rows.ndim == 1:                      # diffusers learned_embeds: one vector [width]
        rows = rows[None]
    if rows.ndim != 2:
        raise ModelFileError(path, f"'{key}' has shape {list(value.shape)}; embedding vectors are [n, width]", _TRY_OTHER)
    if rows.shape[0] == 0 or rows.shape[1] == 0:
        raise ModelFileError(path, f"'{key}' holds no vectors (shape {list(value.shape)})", _TRY_OTHER)
    if rows.shape[0] > CHUNK_TOKENS:
        raise ModelFileError(path, f"'{key}' has {rows.shape[0]} vectors; a prompt chunk holds at most {CHUNK_TOKENS}",
                             "Use an embedding with fewer vectors")
    if not torch.isfinite(rows).all():
        raise ModelFileError(path, f"'{key}' contains NaN or infinite values", "The embedding is broken; retrain or "
                             "download it again")
    return rows


def describe_widths(vectors: EmbeddingVectors) -> str:
    """The family an embedding was made for, from its widths (real models; tiny ones by width)."""
    if isinstance(vectors, Mapping):
        wl, wg = vectors["clip_l"].shape[1], vectors["clip_g"].shape[1]
        if (wl, wg) == SDXL_WIDTHS:
            return "an SDXL embedding"
        return f"an SDXL-style embedding (clip_l width {wl}, clip_g width {wg})"
    w = vectors.shape[1]
    return f"an {KNOWN_WIDTHS[w]} embedding (width {w})" if w in KNOWN_WIDTHS else f"an embedding of width {w}"


def _check_fits(vectors: EmbeddingVectors, path: Path, family: str, widths: Mapping[str, int]) -> None:
    """A1111 skips embeddings whose width differs from the model's; here that is an error naming both."""
    if isinstance(vectors, Mapping):
        n = {k: v.shape[0] for k, v in vectors.items()}
        if len(set(n.values())) != 1:
            raise ModelFileError(path, f"its clip_l and clip_g parts have different vector counts ({n['clip_l']} and "
                                 f"{n['clip_g']})", _TRY_OTHER)
        fits = set(vectors) == set(widths) and all(vectors[k].shape[1] == w for k, w in widths.items())
    else:
        fits = len(widths) == 1 and vectors.shape[1] == next(iter(widths.values()))
    if fits:
        return
    label = FAMILY_LABELS.get(family, family)
    need = (f"vectors of width {next(iter(widths.values()))}" if len(widths) == 1
            else " and ".join(f"{k} vectors of width {w}" for k, w in widths.items()))
    encoders = "text encoder takes" if len(widths) == 1 else "text encoders take"
    raise ModelFileError(path, f"this is {describe_widths(vectors)}, but the source model is {label}, whose "
                         f"{encoders} {need}",
                         f"Use an embedding trained for {label}, or choose a source checkpoint of the embedding's family")


# ---------------------------------------------------------------- A1111 embedding images (.png text chunk)

def png_embedding_data(path: Path) -> dict | None:
    """The decoded `sd-ti-embedding` text chunk of a PNG (A1111 `embedding_from_b64`), or None if
    it has none. JSON only: tensors are `{"TORCHTENSOR": nested lists}` objects."""
    text = _png_text(path, PNG_TEXT_KEY)
    if text is None:
        return None
    try:
        raw = base64.b64decode(text, validate=False)
        data = json.loads(raw, object_hook=_json_tensor)
    except (binascii.Error, ValueError, TypeError, RuntimeError, RecursionError) as e:
        raise ModelFileError(path, f"its '{PNG_TEXT_KEY}' text chunk is not valid embedding data ({e.__class__.__name__})",
                             "Use the embedding's .pt or .safetensors file instead") from None
    if not isinstance(data, dict):
        raise ModelFileError(path, f"its '{PNG_TEXT_KEY}' text chunk holds no embedding dictionary",
                             "Use the embedding's .pt or .safetensors file instead")
    return data


def _json_tensor(obj: dict) -> object:
    if "TORCHTENSOR" in obj:   # A1111 EmbeddingDecoder: np.array(list) -> tensor (float64; used as float32)
        return torch.tensor(obj["TORCHTENSOR"], dtype=torch.float64)
    return obj


def _png_text(path: Path, key: str) -> str | None:
    """The value of the text chunk named `key` (chunks after the image data included)."""
    try:
        return read_png_text(path).get(key)
    except ModelFileError as e:
        raise ModelFileError(path, e.problem, "Use the embedding's .pt or .safetensors file instead") from None


# ---------------------------------------------------------------- a folder of embeddings

@dataclass
class _Loaded:
    stamp: tuple[int, int]
    embedding: Embedding


class EmbeddingLibrary:
    """Embedding files of one or more folders (or single files), indexed by name, loaded on demand.

    Indexing reads no tensors (image files: only their text chunk, for the name inside).
    `for_prompt(text)` loads and returns the embeddings a prompt uses, ready for
    `TextStack.encode(prompts, embeddings=...)`. With `tokenizers` (the source model's), "uses"
    is A1111's rule exactly: the name's token ids occur in the prompt's tokens; without, the
    name's CLIP pre-tokens (words, digits, punctuation runs, lower-cased) occur in the prompt's.
    """

    def __init__(self, sources: Sequence[str | Path], family: str, encoder_widths: Mapping[str, int], *,
                 tokenizers: Sequence[ClipTokenizer] = ()) -> None:
        self.sources = [Path(s) for s in sources]
        self.family = getattr(family, "value", family)
        self.encoder_widths = dict(encoder_widths)
        self.tokenizers = list(tokenizers)
        self._files: dict[str, Path] = {}
        self._cache: dict[str, _Loaded] = {}
        self.collisions: list[str] = []       # one line per duplicate name
        self.ignored: dict[Path, str] = {}    # files looked at and not indexed, with the reason
        self.problems: dict[str, str] = {}    # names skipped by a non-strict for_prompt, with the error
        self.refresh()

    @classmethod
    def for_text_stack(cls, sources: Sequence[str | Path], stack) -> "EmbeddingLibrary":
        """A library checked against a `TextStack` (its family, encoder widths and tokenizers)."""
        return cls(sources, stack.family, encoder_widths(stack), tokenizers=[e.tokenizer for e in stack.encoders])

    # -- index

    def refresh(self) -> None:
        """Re-scan the sources; loaded embeddings stay cached while their file is unchanged."""
        self._files, self.collisions, self.ignored = {}, [], {}
        for source in self.sources:
            for path in _walk(source):
                self._index(path)
        self._cache = {n: c for n, c in self._cache.items() if self._files.get(n) == c.embedding.path}

    def _index(self, path: Path) -> None:
        suffix = path.suffix.lower()
        if suffix not in TENSOR_SUFFIXES + IMAGE_SUFFIXES:
            return
        if suffix in IMAGE_SUFFIXES and os.path.splitext(path.stem)[1].lower() == ".preview":
            return                            # A1111 skips NAME.preview.png without opening it
        try:
            if path.stat().st_size == 0:      # A1111 skips empty files
                self.ignored[path] = "empty file"
                return
            if suffix in TENSOR_SUFFIXES:
                name = embedding_name(path)
            elif suffix == ".png":
                data = png_embedding_data(path)
                if data is None:
                    self.ignored[path] = f"image without an '{PNG_TEXT_KEY}' text chunk (a preview image?)"
                    return
                name = _image_name(data, path)
            else:
                self.ignored[path] = f"{suffix} images can only hide an embedding in their pixels, which is not supported"
                return
        except (ModelFileError, OSError) as e:
            self.ignored[path] = str(e)
            return
        if name in self._files:
            # A1111 keeps the one registered last (`register_embedding_by_name` replaces the old entry).
            self.collisions.append(f"embedding '{name}': {self._files[name]} and {path}; using {path}")
            del self._files[name]
        self._files[name] = path

    def names(self) -> list[str]:
        return list(self._files)

    def __contains__(self, name: object) -> bool:
        return name in self._files

    def __len__(self) -> int:
        return len(self._files)

    def path(self, name: str) -> Path:
        if name not in self._files:
            raise UserError(f"embedding '{name}'", "no embedding file has this name",
                            f"Put '{name}.safetensors' (or .pt) in one of: {', '.join(map(str, self.sources))}")
        return self._files[name]

    # -- loading

    def get(self, name: str) -> Embedding:
        """The embedding called `name`, loaded once (again if its file changed)."""
        path = self.path(name)
        try:
            st = path.stat()
        except OSError:
            raise ModelFileError(path, "the file is gone since the embeddings were listed",
                                 "Refresh the embedding list") from None
        stamp = (st.st_mtime_ns, st.st_size)
        cached = self._cache.get(name)
        if cached is not None and cached.stamp == stamp and cached.embedding.path == path:
            return cached.embedding
        emb = load_embedding(path, self.family, self.encoder_widths)
        emb.name = name
        self._cache[name] = _Loaded(stamp, emb)
        return emb

    def used(self, text: str | Sequence[str], *, strict: bool = True) -> list[Embedding]:
        """Embeddings that the prompt(s) use, in index order.

        `strict`: an unusable one (wrong family, broken file) raises `ModelFileError`; otherwise it
        is skipped, as A1111 skips it (its name is then ordinary prompt text), and the error is
        kept in `problems`.
        """
        texts = [text] if isinstance(text, str) else list(text)
        names = set()
        for t in texts:
            names |= self._names_in(extract_extra_networks(t)[0])
        out = []
        for name in self._files:
            if name not in names:
                continue
            try:
                out.append(self.get(name))
                self.problems.pop(name, None)
            except ModelFileError as e:
                if strict:
                    raise
                self.problems[name] = str(e)
        return out

    def for_prompt(self, text: str | Sequence[str], *, strict: bool = True) -> dict[str, EmbeddingVectors]:
        """{name: vectors} of the embeddings the prompt(s) use, for `TextStack.encode(..., embeddings=)`."""
        return {e.name: e.vectors for e in self.used(text, strict=strict)}

    # -- matching

    def _names_in(self, text: str) -> set[str]:
        squeezed = "".join(text.split()).lower()
        # Cheap superset first: the name's letters must occur in the prompt (whitespace and case aside).
        candidates = [n for n in self._files if "".join(n.split()).lower() in squeezed]
        if not candidates:
            return set()
        if self.tokenizers:
            found: set[str] = set()
            for tok in self.tokenizers:
                t = tokenize_prompt(text, tok, pad_id=tok.eos_id, embeddings={n: 1 for n in candidates},
                                    comma_padding_backtrack=0)
                found |= {name for chunk in t.fixes for _, name in chunk}
            return found
        pieces = [_pretokens(p) for p, _ in parse_prompt_attention(text)]
        return {n for n in candidates if any(_contains(p, _pretokens(n)) for p in pieces)}


def _pretokens(text: str) -> list[str]:
    return pre_tokenize(whitespace_clean(text).lower())


def _contains(seq: list[str], part: list[str]) -> bool:
    k = len(part)
    return k > 0 and any(seq[i:i + k] == part for i in range(len(seq) - k + 1))


def _walk(source: Path) -> Iterable[Path]:
    """Files of `source` (a file, or a folder walked top-down like A1111's `os.walk(followlinks=True)`,
    each folder's files before its subfolders, names sorted so duplicates resolve the same everywhere)."""
    if source.is_file():
        yield source
        return
    if not source.is_dir():
        return
    seen: set[str] = set()
    for root, dirs, files in os.walk(source, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:                     # a symlink loop
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        for name in sorted(files):
            yield Path(root) / name
