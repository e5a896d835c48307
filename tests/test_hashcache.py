"""The standalone runner's persistent hash cache (lib_deltasampling/runner/hashcache.py)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lib_deltasampling.runner import hashcache
from lib_deltasampling.runtime import checkpoint


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "cache" / "hashes.json"
    monkeypatch.setenv(hashcache.ENV_VAR, str(path))
    return path


@pytest.fixture
def counted(monkeypatch) -> list:
    calls = []
    sha, addnet = checkpoint.file_sha256, checkpoint.addnet_hash
    monkeypatch.setattr(hashcache, "file_sha256", lambda p: (calls.append(("sha256", Path(p).name)), sha(p))[1])
    monkeypatch.setattr(hashcache, "addnet_hash", lambda p: (calls.append(("addnet", Path(p).name)), addnet(p))[1])
    return calls


def _file(tmp_path, name="m.safetensors", seed=0) -> Path:
    path = tmp_path / name
    save_file({"w": torch.randn(64, generator=torch.Generator().manual_seed(seed))}, str(path))
    return path


def _addnet_reference(path: Path) -> str:
    data = path.read_bytes()
    (header,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + header:]).hexdigest()


def test_values_are_sha256_and_addnet_and_computed_once(tmp_path, cache, counted):
    f = _file(tmp_path)
    assert hashcache.sha256(f) == hashlib.sha256(f.read_bytes()).hexdigest()
    assert hashcache.addnet(f) == _addnet_reference(f)
    assert hashcache.sha256(f) == hashlib.sha256(f.read_bytes()).hexdigest()
    assert hashcache.addnet(tmp_path / "." / f.name) == _addnet_reference(f)     # same file, other spelling
    assert counted == [("sha256", f.name), ("addnet", f.name)]
    assert json.loads(cache.read_text())["version"] == hashcache.VERSION
    assert [p.name for p in cache.parent.iterdir()] == ["hashes.json"]          # no temporary file left


def test_a_changed_file_is_hashed_again(tmp_path, cache, counted):
    f = _file(tmp_path)
    first = hashcache.sha256(f)
    _file(tmp_path, seed=1)                                                     # same size, new bytes
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert hashcache.sha256(f) != first and len(counted) == 2


@pytest.mark.parametrize("content", ["{not json", '{"version": 1, "files": []}', "[1, 2]", '{"version": 99}'])
def test_a_corrupt_cache_is_ignored_and_rewritten(tmp_path, cache, counted, content):
    f = _file(tmp_path)
    cache.parent.mkdir(parents=True)
    cache.write_text(content)
    assert hashcache.sha256(f) == hashlib.sha256(f.read_bytes()).hexdigest()
    assert hashcache.sha256(f) and len(counted) == 1
    assert json.loads(cache.read_text())["files"]


def test_default_location_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv(hashcache.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert hashcache.cache_path() == tmp_path / "sd-webui-delta-sampling" / "hashes.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert hashcache.cache_path() == Path.home() / ".cache" / "sd-webui-delta-sampling" / "hashes.json"


def test_an_unwritable_cache_only_costs_the_hashing(tmp_path, monkeypatch, counted):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv(hashcache.ENV_VAR, str(blocker / "hashes.json"))           # its folder is a file
    f = _file(tmp_path)
    assert hashcache.sha256(f) == hashcache.sha256(f) and len(counted) == 2


def test_the_runner_hashes_each_file_once_across_runs(tmp_path, cache, counted):
    import test_runner
    import factories
    from test_adapters import build_adapter

    d = tmp_path / "files"
    (d / "lora").mkdir(parents=True)
    adapter, _ = build_adapter("sd1", "kohya", "lora", factories.checkpoint_tensors("sd1", seed=5))
    save_file(adapter, str(d / "lora" / "moxin.safetensors"))
    files = {"dir": d, "target": factories.write_checkpoint(d / "target.safetensors", "sd1", seed=1, vae=True),
             "source": factories.write_checkpoint(d / "source.safetensors", "sd1", seed=5)}
    for i in range(2):
        assert test_runner.generate(files, tmp_path / f"out{i}.png", "--adapters", "<lora:moxin:1>") == 0
    assert sorted(counted) == [("addnet", "moxin.safetensors"), ("sha256", "source.safetensors"),
                               ("sha256", "target.safetensors")]
