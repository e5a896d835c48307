"""Infotext hashes of the files a generation used, from the host's own hash cache.

Hashing a 2-7 GB checkpoint at every generation costs seconds; A1111 keeps every sha256 it
computes in its cache keyed by title and mtime (modules/hashes.py `sha256`; 1.10 stores it with
diskcache under `<data dir>/cache/`, cache.json is only migrated from), so:
- checkpoints: `CheckpointInfo.calculate_shorthash()` (modules/sd_models.py): the cached sha256, or
  computed once and cached; like A1111 it also retitles the checkpoint "name [shorthash]".
- LoRAs: the Lora extension's `NetworkOnDisk` (extensions-builtin/Lora/network.py): `read_hash()`
  then its 12-char `shorthash`, the value A1111's own "Lora hashes" infotext writes (the addnet hash
  of a .safetensors file's tensor data, or the file's metadata `sshs_model_hash`).
- a file the host lists do not have (e.g. the Lora extension not loaded): `hashes.sha256(filename,
  title, use_addnet_hash=...)` under the title the host would use, still cached.
With --no-hashing these return the cached value or None: then no hash key is written.
"""

from __future__ import annotations

from pathlib import Path

from .files import host_network

CHECKPOINT_SHORT = 10   # A1111 checkpoint shorthash
ADAPTER_SHORT = 12      # A1111 "Lora hashes" / addnet shorthash


def _same(a, b: Path) -> bool:
    try:
        return Path(a).resolve() == b.resolve()
    except (OSError, TypeError):
        return False


def checkpoint_hash(name: str, path: Path) -> str | None:
    """The checkpoint's 10-char shorthash (None under --no-hashing when not cached)."""
    from modules import hashes, sd_models

    info = sd_models.get_closet_checkpoint_match(name) if name else None
    if info is not None and _same(info.filename, path):
        short = info.calculate_shorthash()
        return short[:CHECKPOINT_SHORT] if short else None
    value = hashes.sha256(str(path), f"checkpoint/{path.name}")  # A1111's key: the name with its extension
    return value[:CHECKPOINT_SHORT] if value else None


def adapter_hash(name: str, path: Path) -> str | None:
    """The adapter's 12-char addnet shorthash (None under --no-hashing when not cached)."""
    entry = host_network(name)
    if entry is not None and _same(entry.filename, path) and hasattr(entry, "read_hash"):
        entry.read_hash()
        return entry.shorthash[:ADAPTER_SHORT] if entry.shorthash else None
    from modules import hashes

    value = hashes.sha256(str(path), f"lora/{path.stem}", use_addnet_hash=path.suffix.lower() == ".safetensors")
    return value[:ADAPTER_SHORT] if value else None


def extra_hash(kind: str, path: Path) -> str | None:
    """A ControlNet's or IP-Adapter's 10-char sha256 (None under --no-hashing when not cached), kept in
    the host's cache under "KIND/NAME" (sd-webui-controlnet's title for its models: "controlnet/NAME")."""
    from modules import hashes

    value = hashes.sha256(str(path), f"{kind}/{path.stem}")
    return value[:CHECKPOINT_SHORT] if value else None


def checkpoint_sha256(path: Path) -> str:
    """A checkpoint's full sha256 from the host's cache (computed and cached once), or read here
    when the host will not hash (--no-hashing and not cached)."""
    from modules import hashes

    value = hashes.sha256(str(path), f"checkpoint/{path.name}")
    if value:
        return value
    from ..runtime.checkpoint import file_sha256
    return file_sha256(path)
