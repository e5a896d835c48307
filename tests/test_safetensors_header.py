"""The safetensors header checks against the reference reader (the `safetensors` package).

Each rule of the format has a case: the reference must accept or refuse it as the table says
(that keeps the table honest), and our reader must agree, refusing with a `ModelFileError` that
names the file and the problem. The fuzz test mutates valid files at random and demands, for
every mutant, either a named error or a load equal to the reference's, never another exception.
"""

from __future__ import annotations

import json
import random
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lib_deltasampling.errors import ModelFileError
from lib_deltasampling.runtime.checkpoint import SAFETENSORS_DTYPES, open_store
from lib_deltasampling.runtime.safetensors_header import MAX_HEADER_BYTES, MAX_JSON_DEPTH

U8 = '"dtype":"U8","shape":[2],"data_offsets":[0,2]'


def _file(path: Path, header: str | bytes, data: bytes = b"", length: int | None = None) -> Path:
    raw = header.encode() if isinstance(header, str) else header
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def _reference(path: Path) -> dict[str, torch.Tensor] | None:
    """The reference reader's tensors, or None when it refuses the file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, TypeError, ValueError, RuntimeError):  # TypeError: torch refusing a 2**64 dim
        return None


def _format_accepts(path: Path) -> bool:
    """The reference reader's header checks alone (`safe_open` reads no tensor)."""
    try:
        with safe_open(str(path), framework="pt"):
            return True
    except SafetensorError:
        return False


def _ours(path: Path) -> dict[str, torch.Tensor]:
    store = open_store(path)
    return {k: store.tensor(k) for k in store.keys()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    def raw(t: torch.Tensor) -> bytes:
        return t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and raw(a[k]) == raw(b[k]) for k in a)


# (case, header, data, accepted by the format, words of our error)
RULES = [
    ("valid", f'{{"a":{{{U8}}}}}', b"xy", True, ""),
    ("no tensors", "{}", b"", True, ""),
    ("whitespace around the JSON", f' \n{{"a":{{{U8}}}}}\t  ', b"xy", True, ""),
    ("unknown fields are ignored", f'{{"a":{{{U8},"note":[1,{{"x":null}}]}}}}', b"xy", True, ""),
    ("metadata of strings", f'{{"__metadata__":{{"k":"v","":""}},"a":{{{U8}}}}}', b"xy", True, ""),
    ("metadata null", f'{{"__metadata__":null,"a":{{{U8}}}}}', b"xy", True, ""),
    ("a repeated tensor key keeps the last entry", f'{{"a":{{{U8}}},"a":{{{U8}}}}}', b"xy", True, ""),
    ("zero-size tensors anywhere", '{"z":{"dtype":"F32","shape":[0,7],"data_offsets":[2,2]},'
     f'"a":{{{U8}}}}}', b"xy", True, ""),
    ("scalar", '{"a":{"dtype":"U8","shape":[],"data_offsets":[0,1]}}', b"x", True, ""),
    ("escaped NUL in a key, paired surrogates", f'{{"a\\u0000\\ud83d\\ude00":{{{U8}}}}}', b"xy", True, ""),
    ("nesting of 127 levels", f'{{"a":{{{U8},"x":{"[" * 125}{"]" * 125}}}}}', b"xy", True, ""),
    # refused by the format
    ("nesting of 128 levels", f'{{"a":{{{U8},"x":{"[" * 126}{"]" * 126}}}}}', b"xy", False, "nests deeper"),
    ("not UTF-8", b'{"a\xff":{' + U8.encode() + b"}}", b"xy", False, "not UTF-8"),
    ("byte-order mark", f'\ufeff{{"a":{{{U8}}}}}', b"xy", False, "not valid JSON"),
    ("NaN", f'{{"a":{{{U8},"x":NaN}}}}', b"xy", False, "NaN is not JSON"),
    ("number beyond f64", f'{{"a":{{{U8},"x":1e999}}}}', b"xy", False, "out of range"),
    ("unpaired surrogate", f'{{"a":{{{U8},"x":"\\udc00"}}}}', b"xy", False, "unpaired surrogate"),
    ("trailing characters", f'{{"a":{{{U8}}}}}\x00', b"xy", False, "not valid JSON"),
    ("top level array", "[]", b"", False, "JSON array, not an object"),
    ("metadata twice", f'{{"__metadata__":{{}},"__metadata__":{{}},"a":{{{U8}}}}}', b"xy", False, "'__metadata__' twice"),
    ("metadata value not a string", f'{{"__metadata__":{{"k":1}},"a":{{{U8}}}}}', b"xy", False, "only strings"),
    ("metadata not an object", f'{{"__metadata__":"x","a":{{{U8}}}}}', b"xy", False, "not an object of strings"),
    ("field twice", f'{{"a":{{"dtype":"U8",{U8}}}}}', b"xy", False, "'dtype' twice"),
    ("field missing", '{"a":{"dtype":"U8","shape":[2]}}', b"xy", False, "no data_offsets"),
    ("unknown dtype", '{"a":{"dtype":"u8","shape":[2],"data_offsets":[0,2]}}', b"xy", False, "not a safetensors dtype"),
    ("bool in shape", '{"a":{"dtype":"U8","shape":[true],"data_offsets":[0,1]}}', b"x", False, "shape [true]"),
    ("float in shape", '{"a":{"dtype":"U8","shape":[2.0],"data_offsets":[0,2]}}', b"xy", False, "shape [2.0]"),
    ("-0 in shape", '{"a":{"dtype":"U8","shape":[-0],"data_offsets":[0,0]}}', b"", False, "whole numbers"),
    ("negative dimension", '{"a":{"dtype":"U8","shape":[-1],"data_offsets":[0,0]}}', b"", False, "whole numbers"),
    ("dimension of 2**64", '{"a":{"dtype":"U8","shape":[18446744073709551616,0],"data_offsets":[0,0]}}',
     b"", False, "whole numbers"),
    ("three offsets", '{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2,2]}}', b"xy", False, "two whole numbers"),
    ("float offset", '{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2.0]}}', b"xy", False, "two whole numbers"),
    ("elements overflow u64 before a zero",
     '{"a":{"dtype":"U8","shape":[9223372036854775808,4,0],"data_offsets":[0,0]}}', b"", False, "too many elements"),
    ("bytes overflow u64", '{"a":{"dtype":"F64","shape":[4611686018427387904],"data_offsets":[0,0]}}',
     b"", False, "too many bytes"),
    ("sub-byte dtype ending mid-byte", '{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}', b"xy", False,
     "whole bytes"),
    ("size does not match shape", '{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,12]}}', b"\0" * 12, False,
     "do not match its shape [4] and dtype F32 (16 bytes)"),
    ("offsets reversed", '{"a":{"dtype":"U8","shape":[0],"data_offsets":[2,0]}}', b"xy", False, "end before"),
    ("gap before the first tensor", '{"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}', b"xy", False,
     "gap of 1 byte"),
    ("gap between tensors", '{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
     '"b":{"dtype":"U8","shape":[1],"data_offsets":[2,3]}}', b"xyz", False, "gap of 1 byte"),
    ("repeated key leaves a gap", '{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
     '"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}', b"xy", False, "gap"),
    ("overlap", '{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},'
     '"b":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}', b"xy", False, "overlaps tensor 'a'"),
    ("bytes after the last tensor", f'{{"a":{{{U8}}}}}', b"xyz", False, "1 byte after the last tensor"),
    ("data cut short", '{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}', b"\0" * 8, False, "truncated"),
]

# Accepted by the reference, refused here on purpose: what PyTorch cannot hold, and entry forms
# that serde's derive happens to allow but no writer produces.
DEVIATIONS = [
    ("unsigned 16-bit", '{"a":{"dtype":"U16","shape":[1],"data_offsets":[0,2]}}', b"xy", "cannot load"),
    ("complex", '{"a":{"dtype":"C64","shape":[1],"data_offsets":[0,8]}}', b"\0" * 8, "cannot load"),
    ("dimension of 2**64-1", '{"a":{"dtype":"U8","shape":[18446744073709551615,0],"data_offsets":[0,0]}}', b"",
     "PyTorch cannot hold"),
    ("entry as an array", '{"a":["U8",[2],[0,2]]}', b"xy", "is a JSON array"),
]


@pytest.mark.parametrize("case, header, data, accepted, words", RULES, ids=[r[0] for r in RULES])
def test_each_rule_of_the_format(tmp_path: Path, case, header, data, accepted, words):
    path = _file(tmp_path / "model.safetensors", header, data)
    reference = _reference(path)
    assert (reference is not None) == accepted, f"the reference reader disagrees with the table on {case!r}"
    if accepted:
        assert _same(_ours(path), reference)
    else:
        with pytest.raises(ModelFileError) as e:
            open_store(path)
        assert str(path) in str(e.value) and words in str(e.value)


@pytest.mark.parametrize("case, header, data, words", DEVIATIONS, ids=[d[0] for d in DEVIATIONS])
def test_refused_on_purpose_though_the_reference_reads_it(tmp_path: Path, case, header, data, words):
    path = _file(tmp_path / "model.safetensors", header, data)
    assert _format_accepts(path)
    with pytest.raises(ModelFileError, match=words):
        open_store(path)


@pytest.mark.parametrize("length, size, words", [
    (0, 8, "not valid JSON"),
    (MAX_HEADER_BYTES + 1, MAX_HEADER_BYTES + 9, "over the format's limit"),
    (1000, 10, "does not fit a file of 10 bytes"),
])
def test_header_length_field(tmp_path: Path, length, size, words):
    path = _file(tmp_path / "model.safetensors", b"", b"{", length=length)
    with path.open("r+b") as f:
        f.truncate(size)  # sparse: the 100 MB case writes nothing
    assert _reference(path) is None
    with pytest.raises(ModelFileError, match=words):
        open_store(path)


# ------------------------------------------------------------------ fuzzing

FUZZ_DTYPES = ["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "U16", "F4", "C64"]
STRANGE_VALUES = [True, False, None, -0.0, 2.5, -1, 2**63, 2**64 - 1, 2**64, [], {}, "U8", "", [2, 2], 1e300]


def _valid_layout(rng: random.Random) -> tuple[dict, bytes]:
    header: dict = {}
    if rng.random() < 0.5:
        header["__metadata__"] = {"format": "pt", rng.choice(["k", "", "ü"]): "v"}
    data, offset = bytearray(), 0
    for i in range(rng.randint(0, 4)):
        dtype = rng.choice(FUZZ_DTYPES)
        bits = {"F4": 4, "U8": 8, "BOOL": 8, "F8_E4M3": 8, "F16": 16, "BF16": 16, "U16": 16}.get(dtype, 32)
        bits = 64 if dtype in ("I64", "C64") else bits
        shape = [rng.randint(0, 3) for _ in range(rng.randint(0, 3))]
        count = 1
        for d in shape:
            count *= d
        if count * bits % 8:
            shape.append(2)
            count *= 2
        size = count * bits // 8
        data += bytes(rng.randrange(256) for _ in range(size))
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    return header, bytes(data)


def _mutate_structure(rng: random.Random, header: dict, data: bytes) -> tuple[str, bytes]:
    tensors = [k for k in header if k != "__metadata__"]
    kind = rng.randrange(9)
    if tensors and kind < 4:
        entry = header[rng.choice(tensors)]
        field = rng.choice(["dtype", "shape", "data_offsets"])
        if kind == 0:
            del entry[field]
        elif kind == 1 and entry[field]:
            value = entry[field]
            if isinstance(value, list):
                value[rng.randrange(len(value))] = rng.choice(STRANGE_VALUES + [rng.randint(0, 40)])
            else:
                entry[field] = rng.choice(STRANGE_VALUES + ["F64", "I8", "F6_E2M3"])
        elif kind == 2:
            entry[field] = rng.choice(STRANGE_VALUES)
        else:
            entry["extra"] = rng.choice(STRANGE_VALUES)
    elif kind == 4:
        header["__metadata__"] = rng.choice(STRANGE_VALUES + [{"k": rng.choice(STRANGE_VALUES)}])
    elif kind == 5:
        data = data + b"\0" * rng.randint(1, 3) if rng.random() < 0.5 else data[: max(0, len(data) - 1)]
    text = json.dumps(header, separators=(",", ":"))
    if kind == 6 and tensors:  # a key given twice
        key = rng.choice(tensors)
        text = text[:-1] + "," + json.dumps(key) + ":" + json.dumps(header[key]) + "}"
    elif kind == 7:
        text = rng.choice([" ", "\n", "\x00", "\ufeff"]) + text + rng.choice(["", " ", "\x0c"])
    elif kind == 8 and tensors:
        depth = rng.randint(120, 130)
        text = text[:-1] + ',"deep":' + "[" * depth + "]" * depth + "}"
    return text, data


def _mutate_bytes(rng: random.Random, raw: bytes) -> bytes:
    raw = bytearray(raw)
    for _ in range(rng.randint(1, 3)):
        if not raw:
            break
        i = rng.randrange(len(raw))
        choice = rng.randrange(3)
        if choice == 0:
            raw[i] = rng.choice(b'{}[],:"\\-0123456789eE.tfn \xff\x00')
        elif choice == 1:
            del raw[i]
        else:
            raw.insert(i, rng.randrange(256))
    return bytes(raw)


def test_fuzzed_headers_load_as_the_reference_or_fail_by_name(tmp_path: Path):
    rng = random.Random(20261206)
    path = tmp_path / "fuzz.safetensors"
    counts = {"both read": 0, "both refused": 0, "refused here only": 0}
    deadline = time.monotonic() + 20
    cases = 0
    while cases < 20000 and time.monotonic() < deadline:
        cases += 1
        header, data = _valid_layout(rng)
        text, data = _mutate_structure(rng, header, data) if rng.random() < 0.6 else (
            json.dumps(header), data)
        raw = text.encode("utf-8")
        if rng.random() < 0.4:
            raw = _mutate_bytes(rng, raw)
        length = len(raw) if rng.random() < 0.95 else rng.choice([0, len(raw) + 1, len(raw) - 1, 2**63])
        _file(path, raw, data, length=max(0, length))
        reference = _reference(path)
        try:
            ours = _ours(path)
        except ModelFileError as e:
            assert str(path) in str(e)
            if reference is None:
                counts["both refused"] += 1
            else:  # only what PyTorch cannot hold, or the array form of an entry
                assert any(w in e.problem for w in ("cannot load", "PyTorch cannot hold", "is a JSON array")), (
                    raw, e.problem)
                counts["refused here only"] += 1
            continue
        assert reference is not None, f"read here, refused by the reference: {raw!r}"
        assert _same(ours, reference), raw
        counts["both read"] += 1
    assert cases >= 1000 and counts["both read"] >= 100 and counts["both refused"] >= 300, counts


def test_every_dtype_we_read_is_one_of_the_format(tmp_path: Path):
    path = tmp_path / "all.safetensors"
    tensors = {name: torch.zeros(2, dtype=dtype) for name, (dtype, _) in SAFETENSORS_DTYPES.items()}
    save_file(tensors, str(path))
    assert _same(_ours(path), tensors)
    assert MAX_JSON_DEPTH == 127
