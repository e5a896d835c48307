"""Mirrors modules/hashes.py: `calculate_sha256(filename)`, `sha256_from_cache(filename, title,
use_addnet_hash=False)` (None unless cached with an mtime not older than the file),
`sha256(filename, title, use_addnet_hash=False)` (computes and caches unless --no-hashing),
`addnet_hash_safetensors(b)` (sha256 of the bytes after the safetensors header). The cache is
the in-memory stand-in of cache.json's "hashes" / "hashes-addnet" sections (per test)."""

import hashlib
import os

import _standin_support as _support
from modules import shared

caches = {"hashes": {}, "hashes-addnet": {}}


def cache(subsection):
    return caches.setdefault(subsection, {})


def calculate_sha256(filename):
    return _support.sha256(filename)


def sha256_from_cache(filename, title, use_addnet_hash=False):
    hashes = cache("hashes-addnet") if use_addnet_hash else cache("hashes")
    try:
        ondisk_mtime = os.path.getmtime(filename)
    except FileNotFoundError:
        return None
    if title not in hashes:
        return None
    cached_sha256 = hashes[title].get("sha256", None)
    if ondisk_mtime > hashes[title].get("mtime", 0) or cached_sha256 is None:
        return None
    return cached_sha256


def sha256(filename, title, use_addnet_hash=False):
    hashes = cache("hashes-addnet") if use_addnet_hash else cache("hashes")
    value = sha256_from_cache(filename, title, use_addnet_hash)
    if value is not None:
        return value
    if shared.cmd_opts.no_hashing:
        return None
    if use_addnet_hash:
        with open(filename, "rb") as file:
            value = addnet_hash_safetensors(file)
    else:
        value = calculate_sha256(filename)
    hashes[title] = {"mtime": os.path.getmtime(filename), "sha256": value}
    return value


def addnet_hash_safetensors(b):
    h = hashlib.sha256()
    b.seek(0)
    n = int.from_bytes(b.read(8), "little")
    b.seek(n + 8)
    for chunk in iter(lambda: b.read(1024 * 1024), b""):
        h.update(chunk)
    return h.hexdigest()
