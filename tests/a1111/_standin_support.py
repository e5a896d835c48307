"""Process-wide helpers of the A1111 stand-in that must survive the per-test purge of `modules*`.

Not part of A1111. The fixture sets `config` before importing any stand-in module; the
stand-in reads it where A1111 reads its command line (`paths_internal`, `cmd_args`).
Loaded tiny models and file hashes are cached here so that each test does not pay
for them again (A1111 has its own caches: `checkpoints_loaded`, cache.json).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Config:
    data_path: str = ""
    models_path: str = ""
    cmd_overrides: dict[str, Any] = field(default_factory=dict)   # --api-auth etc. for this test


config = Config()

_models: dict[tuple[str, float, int], Any] = {}
_sha256: dict[tuple[str, float, int], str] = {}
_tokenizer: list[Any] = []


def _file_key(path: str) -> tuple[str, float, int]:
    real = os.path.realpath(path)
    st = os.stat(real)
    return real, st.st_mtime, st.st_size


def tokenizer():
    """The real CLIP vocabulary from open_clip_torch's bundled file (tests/vocab.py)."""
    if not _tokenizer:
        from lib_deltasampling.runtime.text.tokenizer import ClipTokenizer
        from vocab import clip_vocab_path
        _tokenizer.append(ClipTokenizer(clip_vocab_path()))
    return _tokenizer[0]


def source_model(path: str):
    """A loaded runtime `SourceModel` for a checkpoint file (CPU, fp32), cached per file version."""
    key = _file_key(path)
    if key not in _models:
        from lib_deltasampling.runtime.model import load_model
        from lib_deltasampling.runtime.placement import choose_placement
        _models[key] = load_model(path, tokenizer=tokenizer(), placement=choose_placement("cpu", "fp32"))
    return _models[key]


def sha256(path: str) -> str:
    key = _file_key(path)
    if key not in _sha256:
        h = hashlib.sha256()
        with open(key[0], "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _sha256[key] = h.hexdigest()
    return _sha256[key]


_files: dict[tuple[str, int], Path] = {}
_files_dir: list[Path] = []


def checkpoint_file(family: str, seed: int) -> Path:
    """A tiny checkpoint written once per process by tests/factories.py (removed at exit)."""
    if not _files_dir:
        import atexit
        import shutil
        import tempfile
        d = Path(tempfile.mkdtemp(prefix="a1111-standin-"))
        atexit.register(shutil.rmtree, d, True)
        _files_dir.append(d)
    key = (family, seed)
    if key not in _files:
        import factories
        _files[key] = factories.write_checkpoint(_files_dir[0] / f"{family}-{seed}.safetensors", family, seed=seed)
    return _files[key]
