"""Reading model files: lazy reads, truncated and garbage files, refusal of pickled code.
(Each safetensors header rule is tested against the reference reader in test_safetensors_header.)"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lib_deltasampling.errors import ModelFileError
from lib_deltasampling.runtime.checkpoint import open_store

STORED_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2]


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for i, dt in enumerate(STORED_DTYPES):
        out[f"block.{i}.weight"] = (torch.randn(3, 5, generator=g) * 2).to(dt)
    out["int.buffer"] = torch.arange(7, dtype=torch.int64)
    return out


def test_safetensors_all_stored_dtypes_read_back_exactly(tmp_path: Path):
    tensors = _tensors()
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata={"modelspec.title": "tiny"})  # the reference writer
    store = open_store(path)
    assert sorted(store.keys()) == sorted(tensors)
    assert store.metadata["modelspec.title"] == "tiny"
    for key, ref in tensors.items():
        assert store.shape(key) == tuple(ref.shape)
        assert store.dtype(key) == ref.dtype
        got = store.tensor(key)
        assert got.dtype == ref.dtype
        assert torch.equal(got.view(torch.uint8), ref.view(torch.uint8)), key  # bit-exact, fp8 included


def test_prefix_view_strips_prefix_and_filters(tmp_path: Path):
    path = tmp_path / "m.safetensors"
    save_file({"model.diffusion_model.a": torch.ones(2), "model.diffusion_model.b.c": torch.zeros(1),
               "cond_stage_model.x": torch.ones(3)}, str(path))
    unet = open_store(path).sub("model.diffusion_model.")
    assert sorted(unet.keys()) == ["a", "b.c"]
    assert "a" in unet and "cond_stage_model.x" not in unet
    assert torch.equal(unet.tensor("a"), torch.ones(2))
    assert unet.sub("b.").keys() == ["c"]


def test_truncated_safetensors(tmp_path: Path):
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(good))
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(ModelFileError, match="truncated") as e:
        open_store(bad)
    assert "cut.safetensors" in str(e.value)


@pytest.mark.parametrize("content, words", [
    (b"", "empty"),
    (b"\x01\x02", "too short"),
    (struct.pack("<Q", 1 << 40) + b"{}", "header length"),
    (struct.pack("<Q", 5) + b"nope!", "not valid JSON"),
    (struct.pack("<Q", 2) + b"[]", "not an object"),
])
def test_garbage_files(tmp_path: Path, content, words):
    path = tmp_path / "x.safetensors"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match=words):
        open_store(path)


def test_missing_file_and_unknown_suffix(tmp_path: Path):
    with pytest.raises(ModelFileError, match="not found"):
        open_store(tmp_path / "nothing.safetensors")
    odd = tmp_path / "model.gguf"
    odd.write_bytes(b"GGUF")
    with pytest.raises(ModelFileError, match="unsupported file type '.gguf'"):
        open_store(odd)


def test_ckpt_plain_and_nested_state_dict(tmp_path: Path):
    w = torch.randn(2, 3)
    flat, nested = tmp_path / "flat.ckpt", tmp_path / "nested.ckpt"
    torch.save({"a.weight": w, "step": 5}, flat)
    torch.save({"state_dict": {"a.weight": w}, "global_step": 10, "epoch": 1}, nested)
    for p in (flat, nested):
        store = open_store(p)
        assert store.keys() == ["a.weight"]
        assert torch.equal(store.tensor("a.weight"), w)


class _RunsCode:
    """Unpickling this calls exec(), which would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_ckpt_with_code_is_refused_without_running_it(tmp_path: Path, writer):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.ckpt"
    payload = {"state_dict": {"w": torch.ones(1)}, "payload": _RunsCode(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with path.open("wb") as f:
            pickle.dump(payload, f)
    # control: a plain unpickle of this file really does run the code
    if writer == "pickle":
        control = tmp_path / "control.ckpt"
        with control.open("wb") as f:
            pickle.dump(_RunsCode(tmp_path / "control_marker.txt"), f)
        with control.open("rb") as f:
            pickle.load(f)
        assert (tmp_path / "control_marker.txt").exists()
    with pytest.raises(ModelFileError, match="refused|cannot be read") as e:
        open_store(path)
    assert "evil.ckpt" in str(e.value)
    assert not marker.exists(), "the pickle's code ran"


def test_ckpt_truncated(tmp_path: Path):
    good = tmp_path / "good.ckpt"
    torch.save({"w": torch.randn(256, 256)}, good)
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ModelFileError) as e:
        open_store(bad)
    assert "bad.ckpt" in str(e.value)
