"""CLIP's byte-level BPE tokenizer over the real vocabulary, found offline.

Behaves like the two tokenizers A1111 1.10 uses:
- CLIP-L (SD1, SDXL's first encoder): transformers' Python `CLIPTokenizer`
  (`html_unescape=False`): ftfy.fix_text, whitespace runs -> " ", lowercase; the exact
  strings `<|startoftext|>`/`<|endoftext|>` in the raw text are split out first.
- OpenCLIP (SD2, SDXL's second encoder): open_clip's `SimpleTokenizer`
  (`html_unescape=True`): the same plus `html.unescape` twice; its special tokens are
  spelled `<start_of_text>`/`<end_of_text>`.

Text is then cut by CLIP's pattern (written for the `regex` package)
    specials | 's|'t|'re|'ve|'m|'ll|'d | [\\p{L}]+ | [\\p{N}] | [^\\s\\p{L}\\p{N}]+   (IGNORECASE)
which `pre_tokenize` scans by Unicode category instead, and every piece is BPE-merged.

The vocabulary is the same 49408 tokens wherever it comes from: open_clip's
`bpe_simple_vocab_16e6.txt.gz` (merges only; the vocabulary is rebuilt from them) or a
Hugging Face tokenizer folder (`vocab.json` + `merges.txt`). `find_vocab` looks for one
on disk and never downloads.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import json
import os
import unicodedata
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Literal

from ...errors import ModelFileError, UserError

VOCAB_ENV = "DELTA_SAMPLING_CLIP_VOCAB"
MERGES_GZ_NAME = "bpe_simple_vocab_16e6.txt.gz"

# CLIP keeps the first 49152 - 256 - 2 merges so that 256 bytes + 256 '</w>' bytes
# + merges + 2 specials = 49408 tokens.
N_MERGES = 49152 - 256 - 2
VOCAB_SIZE = 49408
BOS_ID = 49406
EOS_ID = 49407
HF_SPECIALS = ("<|startoftext|>", "<|endoftext|>")
OPEN_CLIP_SPECIALS = ("<start_of_text>", "<end_of_text>")

# `\s` of the `regex` package: the Unicode White_Space property. Unlike str.isspace()
# it leaves out U+001C..U+001F.
_WHITE_SPACE = frozenset(
    [chr(c) for c in range(0x09, 0x0E)]
    + [" ", "\x85", "\xa0", "\u1680", "\u2028", "\u2029", "\u202f", "\u205f", "\u3000"]
    + [chr(c) for c in range(0x2000, 0x200B)]
)
# Under IGNORECASE `regex` compares case-folded forms: U+0345 (a combining mark that
# folds to the letter iota) is then excluded from [^\s\p{L}\p{N}] yet not matched by
# [\p{L}] either, so no alternative matches it and it is dropped like whitespace.
_UNMATCHED = frozenset("\u0345")
# Case-folding partners of the ASCII letters in the literal alternatives, beyond the
# ASCII upper case (text is lowercased first, but 'ſ' stays 'ſ' and folds to 's').
_FOLD_PARTNERS = {"s": "\u017f", "k": "\u212a"}


@dataclass(frozen=True)
class VocabSource:
    """Where the vocabulary was found: `kind` "merges_gz" (open_clip's file) or
    "hf_folder" (a folder with vocab.json + merges.txt); `found_in` says which place."""

    kind: Literal["merges_gz", "hf_folder"]
    path: Path
    found_in: str = "given path"


@dataclass(frozen=True)
class _Vocab:
    encoder: Mapping[str, int]            # every regular token (not the specials)
    decoder: tuple[str, ...]              # id -> token, specials as "" (spelled per style)
    ranks: Mapping[tuple[str, str], int]  # merge pair -> priority (lower merges first)


# ---------------------------------------------------------------------------------------
# Byte <-> unicode mapping and the pre-tokenizer


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """Byte -> printable character, as GPT-2/CLIP: printable Latin-1 bytes map to
    themselves, the other 68 to U+0100 onwards (in byte order). The dict order is the
    order of the 256 single-byte tokens in the vocabulary."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    extra = (b for b in range(256) if b not in table)
    for n, b in enumerate(extra):
        table[b] = chr(256 + n)
    return table


@functools.lru_cache(maxsize=1)
def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def _kind(c: str) -> str:
    """'L' letter, 'N' number, 'S' whitespace, 'X' matched by nothing, 'O' other."""
    if c in _WHITE_SPACE:
        return "S"
    if c in _UNMATCHED:
        return "X"
    cat = unicodedata.category(c)[0]
    return cat if cat in ("L", "N") else "O"


def _same_letter(t: str, p: str) -> bool:
    """IGNORECASE comparison of text char `t` with pattern char `p` (ASCII)."""
    if t == p:
        return True
    if not ("a" <= p <= "z"):
        return False
    return t == p.upper() or t == _FOLD_PARTNERS.get(p)


def _literal_at(text: str, i: int, literal: str) -> bool:
    if i + len(literal) > len(text):
        return False
    return all(_same_letter(text[i + k], ch) for k, ch in enumerate(literal))


_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


def pre_tokenize(text: str, specials: Sequence[str] = HF_SPECIALS) -> list[str]:
    """The pieces CLIP's regex (`specials|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|
    [^\\s\\p{L}\\p{N}]+`, IGNORECASE) finds in `text`, in order; whitespace is skipped."""
    pieces: list[str] = []
    starts = {"'", *(s[0] for s in specials)}  # literal alternatives begin with one of these
    i, n = 0, len(text)
    while i < n:
        # Alternatives are tried in pattern order at each start position.
        literal = None
        if text[i] in starts:
            literal = next((s for s in (*specials, *_CONTRACTIONS) if _literal_at(text, i, s)), None)
        if literal is not None:
            pieces.append(text[i:i + len(literal)])
            i += len(literal)
            continue
        kind = _kind(text[i])
        if kind in ("S", "X"):
            i += 1
            continue
        j = i + 1
        if kind != "N":  # letters and "other" are greedy runs; a number is one character
            while j < n and _kind(text[j]) == kind:
                j += 1
        pieces.append(text[i:j])
        i = j
    return pieces


def whitespace_clean(text: str) -> str:
    """`re.sub(r"\\s+", " ", text).strip()` with the `regex` package's `\\s`; the
    final strip() is Python's (it also strips U+001C..U+001F)."""
    out: list[str] = []
    in_space = False
    for c in text:
        if c in _WHITE_SPACE:
            if not in_space:
                out.append(" ")
            in_space = True
        else:
            out.append(c)
            in_space = False
    return "".join(out).strip()


def _fix_text(text: str) -> str:
    # ftfy is optional. Without it: NFC, which is the part of ftfy.fix_text that changes
    # ordinary prompts most (decomposed accents); mojibake/quote fixing is then skipped.
    try:
        import ftfy
    except ImportError:
        return unicodedata.normalize("NFC", text)
    return ftfy.fix_text(text)


# ---------------------------------------------------------------------------------------
# Loading the vocabulary


def _file_stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_mtime_ns, st.st_size


def _merge_pairs(lines: Iterable[str], path: Path) -> list[tuple[str, str]]:
    pairs = [tuple(line.split()) for line in lines]
    bad = next((k for k, p in enumerate(pairs) if len(p) != 2), None)
    if len(pairs) != N_MERGES or bad is not None:
        where = f"line {bad + 2} is not two symbols" if bad is not None else f"has {len(pairs)} merges"
        raise ModelFileError(path, f"is not CLIP's BPE merges list ({where}; expected {N_MERGES} merges after the header)",
                             "Use open_clip's bpe_simple_vocab_16e6.txt.gz or a CLIP tokenizer folder")
    return pairs  # type: ignore[return-value]


def _vocab_from_merges(pairs: list[tuple[str, str]]) -> list[str]:
    """open_clip/OpenAI CLIP's construction: the 256 byte characters, the same with
    '</w>', then one token per merge (its two symbols joined)."""
    byte_chars = list(bytes_to_unicode().values())
    return byte_chars + [c + "</w>" for c in byte_chars] + ["".join(p) for p in pairs]


@functools.lru_cache(maxsize=8)
def _load_merges_gz(path_str: str, _stamp: tuple[int, int]) -> _Vocab:
    path = Path(path_str)
    try:
        text = gzip.decompress(path.read_bytes()).decode("utf-8")
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise ModelFileError(path, f"cannot be read as a gzip text file ({e})",
                             "Replace it with open_clip's bpe_simple_vocab_16e6.txt.gz") from e
    # First line is a header; CLIP keeps the next N_MERGES lines.
    pairs = _merge_pairs(text.split("\n")[1:N_MERGES + 1], path)
    tokens = _vocab_from_merges(pairs)
    return _make_vocab(tokens, pairs)


@functools.lru_cache(maxsize=8)
def _load_hf_folder(path_str: str, _stamp: tuple[int, int]) -> _Vocab:
    folder = Path(path_str)
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    try:
        encoder = json.loads(vocab_file.read_text(encoding="utf-8"))
        merges_text = merges_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(folder, f"vocab.json/merges.txt cannot be read ({e})",
                             "Point to a CLIP tokenizer folder or to bpe_simple_vocab_16e6.txt.gz") from e
    # transformers' reading: strip, split lines, skip the "#version" header.
    pairs = _merge_pairs(merges_text.strip().split("\n")[1:N_MERGES + 1], merges_file)
    ok = (isinstance(encoder, dict) and len(encoder) == VOCAB_SIZE
          and encoder.get(HF_SPECIALS[0]) == BOS_ID and encoder.get(HF_SPECIALS[1]) == EOS_ID)
    if ok:
        tokens = [""] * VOCAB_SIZE
        for tok, idx in encoder.items():
            if isinstance(idx, int) and 0 <= idx < VOCAB_SIZE:
                tokens[idx] = tok
        ok = all(tokens[:BOS_ID]) and all("".join(p) in encoder for p in pairs)
    if not ok:
        raise ModelFileError(vocab_file, f"is not CLIP's vocabulary ({VOCAB_SIZE} tokens with "
                                         f"{HF_SPECIALS[0]}={BOS_ID}, {HF_SPECIALS[1]}={EOS_ID}, every merge a token)",
                             "Use the tokenizer folder of a CLIP / Stable Diffusion model or bpe_simple_vocab_16e6.txt.gz")
    return _make_vocab(tokens[:BOS_ID], pairs)


def _make_vocab(regular: list[str], pairs: list[tuple[str, str]]) -> _Vocab:
    tokens = regular[:BOS_ID]
    encoder = {t: i for i, t in enumerate(tokens)}
    return _Vocab(encoder=MappingProxyType(encoder),
                  decoder=tuple(tokens) + ("", ""),
                  ranks=MappingProxyType({p: r for r, p in enumerate(pairs)}))


def load_vocab(source: VocabSource) -> _Vocab:
    """Parsed vocabulary of `source`, cached per path and file version (it is immutable)."""
    if source.kind == "merges_gz":
        return _load_merges_gz(str(source.path), _file_stamp(source.path))
    return _load_hf_folder(str(source.path), _file_stamp(source.path / "vocab.json"))


# ---------------------------------------------------------------------------------------
# Finding the vocabulary on disk

# Hugging Face hub repositories that hold CLIP's vocabulary, and the sub-folder.
HF_HUB_REPOS = (
    ("models--openai--clip-vit-large-patch14", ""),
    ("models--runwayml--stable-diffusion-v1-5", "tokenizer"),
    ("models--stable-diffusion-v1-5--stable-diffusion-v1-5", "tokenizer"),
    ("models--stabilityai--stable-diffusion-2-1", "tokenizer"),
    ("models--stabilityai--stable-diffusion-xl-base-1.0", "tokenizer"),
    ("models--stabilityai--stable-diffusion-xl-base-1.0", "tokenizer_2"),
    ("models--laion--CLIP-ViT-H-14-laion2B-s32B-b79K", ""),
    ("models--laion--CLIP-ViT-bigG-14-laion2B-39B-b160k", ""),
    ("models--openai--clip-vit-base-patch32", ""),
)
# Folders inside a WebUI install (Forge 2024+, old Forge / reForge, Forge's bundled
# annotators), relative to its root.
WEBUI_FOLDERS = (
    "backend/huggingface/runwayml/stable-diffusion-v1-5/tokenizer",
    "backend/huggingface/stabilityai/stable-diffusion-2-1/tokenizer",
    "backend/huggingface/stabilityai/stable-diffusion-xl-base-1.0/tokenizer",
    "backend/huggingface/stabilityai/stable-diffusion-xl-base-1.0/tokenizer_2",
    "ldm_patched/modules/sd1_tokenizer",
    "extensions-builtin/forge_legacy_preprocessors/annotator/oneformer/oneformer/data",
)
# Installed packages that ship bpe_simple_vocab_16e6.txt.gz (located, never imported).
PACKAGES = ("open_clip", "clip")


def _source_in(path: Path, found_in: str) -> VocabSource | None:
    """The vocabulary at `path` (a .gz file, vocab.json/merges.txt, or a folder holding
    either, or a `tokenizer/` sub-folder), or None."""
    if path.is_file():
        if path.name.endswith(".gz"):
            return VocabSource("merges_gz", path, found_in)
        if path.name in ("vocab.json", "merges.txt"):
            path = path.parent
    if not path.is_dir():
        return None
    for folder in (path, path / "tokenizer"):
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            return VocabSource("hf_folder", folder, found_in)
    if (path / MERGES_GZ_NAME).is_file():
        return VocabSource("merges_gz", path / MERGES_GZ_NAME, found_in)
    return None


def _unusable(path: Path) -> str:
    if not path.exists():
        return "does not exist"
    return f"is neither {MERGES_GZ_NAME} nor a folder with vocab.json and merges.txt"


def hf_hub_dirs(env: Mapping[str, str]) -> list[Path]:
    """Hugging Face hub cache folders, as huggingface_hub resolves them (most specific first)."""
    home = env.get("HOME") or env.get("USERPROFILE")
    home_path = Path(home) if home else Path.home()
    dirs = [Path(env[k]) for k in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE") if env.get(k)]
    if env.get("HF_HOME"):
        dirs.append(Path(env["HF_HOME"]) / "hub")
    if env.get("XDG_CACHE_HOME"):
        dirs.append(Path(env["XDG_CACHE_HOME"]) / "huggingface" / "hub")
    dirs.append(home_path / ".cache" / "huggingface" / "hub")
    return list(dict.fromkeys(dirs))


def _listdir(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError:
        return []


def _package_dir(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)  # locates the package without running it
    except (ImportError, ValueError):
        return None
    locations = list(spec.submodule_search_locations or []) if spec else []
    return Path(locations[0]) if locations else None


SETTINGS_PLACE = "the CLIP vocabulary path in Delta Sampling's settings"


def find_vocab(extra_paths: Sequence[Path | str] = (), env: Mapping[str, str] = os.environ, *,
               webui_root: Path | str | None = None, configure: str = SETTINGS_PLACE) -> VocabSource:
    """Find CLIP's vocabulary on disk. Looks, in order, at: `extra_paths` (settings),
    $DELTA_SAMPLING_CLIP_VOCAB, the Hugging Face hub cache, Forge/reForge folders under
    `webui_root`, installed open_clip / OpenAI clip packages. A configured path that is
    unusable is an error (not skipped); nothing found is an error naming the kinds of places (the
    full list in its `looked`). `configure`: where the user sets the path (a setting, a flag)."""
    fix = (f"Point {configure} (or ${VOCAB_ENV}) at open_clip's {MERGES_GZ_NAME} or at a CLIP tokenizer "
           "folder (vocab.json + merges.txt)")
    configured = [(Path(str(p).strip()).expanduser(), "configured path") for p in extra_paths if str(p).strip()]
    if env.get(VOCAB_ENV, "").strip():
        configured.append((Path(env[VOCAB_ENV].strip()).expanduser(), f"${VOCAB_ENV}"))
    for path, what in configured:
        found = _source_in(path, what)
        if found is not None:
            return found
    if configured:
        # An explicit choice that does not work is reported, not silently replaced.
        path, what = configured[0]
        raise ModelFileError(path, f"({what}) {_unusable(path)}", fix)

    looked: list[str] = []
    for hub in hf_hub_dirs(env):
        for repo, sub in HF_HUB_REPOS:
            snapshots = hub / repo / "snapshots"
            looked.append(str(snapshots / "*" / sub) if sub else str(snapshots / "*"))
            if snapshots.is_dir():
                for snap in _listdir(snapshots):
                    folder = snap / sub if sub else snap
                    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
                        return VocabSource("hf_folder", folder, "Hugging Face cache")
    if webui_root is not None:
        for rel in WEBUI_FOLDERS:
            folder = Path(webui_root) / rel
            looked.append(str(folder))
            found = _source_in(folder, "WebUI folder")
            if found is not None:
                return found
    for name in PACKAGES:
        pkg = _package_dir(name)
        looked.append(f"installed package '{name}'" + (f" ({pkg})" if pkg else " (not installed)"))
        if pkg is not None and (pkg / MERGES_GZ_NAME).is_file():
            return VocabSource("merges_gz", pkg / MERGES_GZ_NAME, f"package {name}")
    hubs = str(hf_hub_dirs(env)[0])  # the most specific; all of them are in `looked`
    webui = f", the WebUI's model folders under {webui_root}" if webui_root is not None else ""
    error = UserError("CLIP tokenizer vocabulary",
                      f"not found in the Hugging Face cache ({hubs}){webui} or the open_clip and clip packages",
                      fix + "; or pip install open_clip_torch, which ships it")
    error.looked = looked  # every place, for a log
    raise error


# ---------------------------------------------------------------------------------------
# The tokenizer


class ClipTokenizer:
    """CLIP BPE tokenizer. `html_unescape=False`: as transformers' CLIPTokenizer
    (A1111's CLIP-L); True: as open_clip's SimpleTokenizer (A1111's OpenCLIP-H/bigG).

    `encode(text)` gives token ids without BOS/EOS. The parsed vocabulary is shared
    between instances; each instance keeps a bounded cache of BPE results.
    """

    vocab_size = VOCAB_SIZE
    bos_id = BOS_ID
    eos_id = EOS_ID

    def __init__(self, source: VocabSource | Path | str, *, html_unescape: bool = False,
                 cache_size: int = 20000) -> None:
        if not isinstance(source, VocabSource):
            found = _source_in(Path(source), "given path")
            if found is None:
                raise ModelFileError(source, f"is neither {MERGES_GZ_NAME} nor a folder with vocab.json and merges.txt",
                                     "Pass one of those")
            source = found
        self.source = source
        self.html_unescape = html_unescape
        self._vocab = load_vocab(source)
        self.specials = OPEN_CLIP_SPECIALS if html_unescape else HF_SPECIALS
        self._special_ids = {self.specials[0]: BOS_ID, self.specials[1]: EOS_ID}
        self._cache: dict[str, tuple[int, ...]] = {}
        self._cache_size = cache_size
        self.comma_id = self._vocab.encoder[",</w>"]

    @classmethod
    def find(cls, extra_paths: Sequence[Path | str] = (), env: Mapping[str, str] = os.environ, *,
             webui_root: Path | str | None = None, html_unescape: bool = False,
             configure: str = SETTINGS_PLACE) -> "ClipTokenizer":
        return cls(find_vocab(extra_paths, env, webui_root=webui_root, configure=configure),
                   html_unescape=html_unescape)

    def token_id(self, token: str) -> int:
        """Id of one vocabulary entry, e.g. ',</w>'."""
        return self._special_ids.get(token, None) or self._vocab.encoder[token]

    # -- text -> ids

    def clean(self, text: str) -> str:
        """Text normalisation before the pattern: ftfy, (html unescape), whitespace, lower."""
        text = _fix_text(text)
        if self.html_unescape:
            text = html.unescape(html.unescape(text)).strip()
        return whitespace_clean(text).lower()

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for segment, special in self._split_specials(text):
            if special is not None:
                ids.append(special)
                continue
            for piece in pre_tokenize(self.clean(segment), self.specials):
                ids.extend(self._piece_ids(piece))
        return ids

    def _split_specials(self, text: str) -> list[tuple[str, int | None]]:
        # transformers splits the raw text on the exact special strings before anything
        # else (its added-tokens trie); open_clip only has them in its pattern.
        if self.html_unescape:
            return [(text, None)]
        out: list[tuple[str, int | None]] = []
        rest = text
        while rest:
            hits = [(rest.find(s), s) for s in self.specials if s in rest]
            if not hits:
                out.append((rest, None))
                break
            at, s = min(hits)
            out += [(rest[:at], None), (s, self._special_ids[s])]
            rest = rest[at + len(s):]
        return out

    def _piece_ids(self, piece: str) -> tuple[int, ...]:
        cached = self._cache.get(piece)
        if cached is not None:
            return cached
        byte_chars = "".join(bytes_to_unicode()[b] for b in piece.encode("utf-8"))
        if byte_chars in self._special_ids:  # only the exact spelling is special
            ids: tuple[int, ...] = (self._special_ids[byte_chars],)
        else:
            ids = tuple(self._vocab.encoder[s] for s in self._bpe(byte_chars))
        if len(self._cache) >= self._cache_size:
            self._cache.clear()  # bounded; rebuilding is cheap and needs no bookkeeping
        self._cache[piece] = ids
        return ids

    def _bpe(self, word: str) -> list[str]:
        """Merge the lowest-ranked adjacent pair everywhere (left to right, without
        overlap) until no adjacent pair is a known merge. The last symbol ends a word."""
        ranks = self._vocab.ranks
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            ranked = [(ranks[p], p) for p in zip(parts, parts[1:]) if p in ranks]
            if not ranked:
                break
            first, second = min(ranked)[1]
            merged: list[str] = []
            k = 0
            while k < len(parts):
                if k + 1 < len(parts) and parts[k] == first and parts[k + 1] == second:
                    merged.append(first + second)
                    k += 2
                else:
                    merged.append(parts[k])
                    k += 1
            parts = merged
        return parts

    # -- ids -> text

    def decode(self, ids: Iterable[int]) -> str:
        """Approximate inverse of `encode` (lowercased, one space between words)."""
        names = {BOS_ID: self.specials[0], EOS_ID: self.specials[1]}
        text = "".join(names.get(i) or self._vocab.decoder[i] for i in ids)
        # Special-token spellings are printable ASCII, which map to themselves.
        raw = bytearray(_unicode_to_bytes()[c] for c in text)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ").strip()
