"""A persistent cache of the standalone runner's file hashes (infotext "Model hash", "Delta source
hash", "Delta adapter hashes"), so a multi-GB checkpoint is hashed once, not at every run.

Entries are keyed by (resolved path, size, mtime_ns): a changed file is hashed again. The cache is a
JSON file, `$XDG_CACHE_HOME/sd-webui-delta-sampling/hashes.json` (default `~/.cache/...`), or the
file named by $DELTA_SAMPLING_HASH_CACHE. It is written atomically (a temporary file in the same
folder, then `os.replace`); an unreadable or corrupt file is ignored and rewritten; a cache that
cannot be written only costs the hashing next time.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from ..runtime.cachedir import user_cache_path
from ..runtime.checkpoint import addnet_hash, file_sha256

log = logging.getLogger("delta-sampling")
ENV_VAR = "DELTA_SAMPLING_HASH_CACHE"
VERSION = 1


def cache_path() -> Path:
    return user_cache_path(ENV_VAR, "hashes.json")


def _load(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.debug("hash cache %s unreadable (%s); starting a new one", path, exc)
        return {}
    if not isinstance(data, dict) or data.get("version") != VERSION or not isinstance(data.get("files"), dict):
        return {}
    return data["files"]


def _save(path: Path, entries: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".hashes-", suffix=".json", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"version": VERSION, "files": entries}, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        log.debug("hash cache %s not written (%s)", path, exc)


def _cached(kind: str, file: str | Path, compute) -> str:
    resolved = Path(file).resolve()
    stat = resolved.stat()
    key = f"{kind}:{resolved}"
    path = cache_path()
    entries = _load(path)
    entry = entries.get(key)
    if isinstance(entry, dict) and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns \
            and isinstance(entry.get("hash"), str):
        return entry["hash"]
    value = compute(resolved)
    entries[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "hash": value}
    _save(path, entries)
    return value


def sha256(file: str | Path) -> str:
    """The file's sha256 (A1111's checkpoint hash), cached."""
    return _cached("sha256", file, file_sha256)


def addnet(file: str | Path) -> str:
    """The addnet hash of a LoRA (A1111's "Lora hashes"), cached."""
    return _cached("addnet", file, addnet_hash)
