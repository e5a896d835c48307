"""The bad-input table: each row is something a new user may type or own, run through the command line
as a user runs it. Every row must end with exit code 2 and one line "error: ..." of a few hundred
characters at most, naming the setting or file and holding the expected words; no traceback, no
code from a file ever run, and no output file written. (docs/BAD-INPUT.md lists the guarantees.)
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lib_deltasampling.__main__ import main
from test_runner import files, hash_cache  # noqa: F401 - fixtures: tiny SDXL target, SD1 source, a LoRA folder
from vocab import clip_vocab_path

MAX_MESSAGE = 500  # characters; long paths of the test's temporary folder included


class RunsCode:
    """A pickle that would create MARKER if it were ever unpickled with code allowed."""

    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = Path("/tmp/ds-bad-input-code-ran")


def _bad_files(folder: Path, good: Path) -> dict[str, Path]:
    """Broken model files, made fresh in `folder`."""
    made: dict[str, Path] = {}

    def raw(name: str, header: bytes, data: bytes = b"") -> None:
        made[name] = folder / f"{name}.safetensors"
        made[name].write_bytes(struct.pack("<Q", len(header)) + header + data)

    (folder / "empty.safetensors").write_bytes(b"")
    made["empty"] = folder / "empty.safetensors"
    made["truncated"] = folder / "truncated.safetensors"
    made["truncated"].write_bytes(good.read_bytes()[:-1000])
    raw("repeated-key", b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
                        b'"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}', b"xy")
    raw("bool-shape", b'{"a":{"dtype":"U8","shape":[true],"data_offsets":[0,1]}}', b"x")
    raw("huge-dim", b'{"a":{"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,0]}}')
    raw("metadata-number", b'{"__metadata__":{"k":1},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"x")
    raw("not-json", b"\x00garbage")
    made["code.ckpt"] = folder / "code.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": RunsCode()}, made["code.ckpt"])
    made["code-legacy.pt"] = folder / "code-legacy.pt"  # torch's pre-1.6 format: a bare pickle stream
    torch.save({"w": torch.zeros(1), "x": RunsCode()}, made["code-legacy.pt"], _use_new_zipfile_serialization=False)
    made["plain-pickle.bin"] = folder / "plain-pickle.bin"
    made["plain-pickle.bin"].write_bytes(pickle.dumps(RunsCode()))
    made["no-unet"] = folder / "no-unet.safetensors"
    save_file({"lora_unet_down.lora_down.weight": torch.zeros(4, 4)}, str(made["no-unet"]))
    made["image.gguf"] = folder / "image.gguf"
    made["image.gguf"].write_bytes(b"GGUF")
    return made


# (row id, command-line words to add or replace, words of the error line); "{bad:NAME}" is a broken file
# made above, "{tmp}" the test's folder; --target/--source default to working tiny models.
ROWS = [
    # bounds (the WebUI's own limits), checked before loading
    ("steps 0", ["--steps", "0"], "--steps: 0 is outside 1 to 150"),
    ("steps 1e6", ["--steps", "1000000"], "--steps: 1000000 is outside 1 to 150"),
    ("batch 10000", ["--batch", "10000"], "--batch: 10000 is outside 1 to 8"),
    ("width 100000", ["--width", "100000"], "--width: 100000 is not a multiple of 8 from 64 to 2048"),
    ("height 65", ["--height", "65"], "--height: 65"),
    ("negative CFG", ["--cfg", "-5"], "--cfg: -5.0 is not a CFG scale from 0 to 30"),
    ("CFG nan", ["--cfg", "nan"], "--cfg: nan"),
    ("seed beyond 64 bits", ["--seed", str(2 ** 70)], "is outside"),
    ("prompt of 50,000 characters", ["--prompt", "a" * 50_000], "50,000 characters long; the limit is 40,000"),
    ("10,000 nested brackets", ["--prompt", "(" * 10_000 + "fox"], "brackets nest 10000 levels deep"),
    ("prompt of 40 chunks", ["--prompt", " BREAK ".join(["fox"] * 40)], "more than 32 chunks"),
    ("prompt not Unicode", ["--prompt", "a fox \udce9"], "prompt: holds characters that are not valid Unicode"),
    ("prompt edit step beyond float", ["--prompt", "[cat:dog:1e400]"], "'1e400' of a [from:to:step] edit"),
    ("emphasis beyond float", ["--prompt", "a (fox:" + "9" * 400 + ")"], "not a finite number"),
    ("emphasis product inf", ["--source-prompt", "(" * 99 + "fox:" + "9" * 308 + ")" * 100], "multiplies to inf"),
    # Delta Sampling settings (the one settings definition)
    ("scale nan", ["--scale", "nan"], '"Delta scale" (scale)'),
    ("scale 1e400", ["--scale", "1e400"], "not a finite number"),
    ("scale out of range", ["--scale", "11"], "from -10 to 10"),
    ("reuse 2.5", ["--reuse", "2.5"], "not a whole number"),
    ("unknown schedule", ["--schedule", "wavy"], "constant, linear, cosine"),
    ("start after end", ["--start", "0.8", "--end", "0.2"], "start"),
    ("unknown sampler", ["--sampler", "Heun++"], "Sampler: 'Heun++' is not available"),
    ("adapter weight", ["--adapters", "<lora:moxin:heavy>"], "weight 'heavy' is not a number"),
    # names are never paths or globs
    ("LoRA glob", ["--adapters", "<lora:*:1>"], "no file *{"),
    ("LoRA traversal", ["--adapters", "<lora:../lora/moxin:1>"], "contains '..'; a name is not a path"),
    ("LoRA absolute path", ["--adapters", "<lora:/etc/passwd:1>"], "is an absolute path"),
    ("LoRA missing", ["--adapters", "<lora:ghost:1>"], "no file ghost{"),
    ("LoRA for another family", ["--adapters", "<lora:xl_style:1>"], "SDXL adapter"),
    # outputs
    ("out empty", ["--out", ""], "--out: is empty"),
    ("latent out empty", ["--latent-out", ""], "not a .safetensors file name"),
    ("out not png", ["--out", "{tmp}/fox.jpg"], "neither a .png file nor a folder"),
    ("out exists", ["--out", "{tmp}/exists.png"], "already exists. Pass --overwrite"),
    ("out under a file", ["--out", "{tmp}/exists.png/x.png"], "is a file"),
    ("latent out not safetensors", ["--latent-out", "{tmp}/lat.pt"], "not a .safetensors file name"),
    ("out is the target", ["--out", "{target}", "--overwrite"], "neither a .png file"),
    ("latent out is the source", ["--latent-out", "{source}", "--overwrite"], "is one of the input files"),
    # files
    ("target missing", ["--target", "{tmp}/missing.safetensors"], "missing.safetensors: file not found"),
    ("target is a folder", ["--target", "{tmp}"], "is a folder, not a model file"),
    ("LoRA folder missing", ["--lora-dir", "{tmp}/no-loras"], "--lora-dir: "),
    ("embeddings folder missing", ["--embeddings-dir", "{tmp}/no-embeddings"], "is not a folder"),
    ("target empty", ["--target", "{bad:empty}"], "the file is empty"),
    ("target truncated", ["--target", "{bad:truncated}"], "truncated"),
    ("header key repeated", ["--target", "{bad:repeated-key}"], "gap of 1 byte"),
    ("header shape true", ["--target", "{bad:bool-shape}"], "shape [true]"),
    ("header huge dimension", ["--source", "{bad:huge-dim}"], "too many bytes"),
    ("header metadata number", ["--source", "{bad:metadata-number}"], "only strings"),
    ("header not JSON", ["--source", "{bad:not-json}"], "not valid JSON"),
    ("pickle with code", ["--target", "{bad:code.ckpt}"], "could run code"),
    ("legacy pickle with code", ["--source", "{bad:code-legacy.pt}"], "could run code"),
    ("bare pickle with code", ["--adapted", "{bad:plain-pickle.bin}"], "could run code"),
    ("a LoRA as checkpoint", ["--source", "{bad:no-unet}"], "no-unet.safetensors"),
    ("unknown file type", ["--target", "{bad:image.gguf}"], "unsupported file type '.gguf'"),
    ("vocabulary missing", ["--vocab", "{tmp}/no-vocab"], "(configured path) does not exist"),
]


@pytest.fixture(scope="module")
def bad(files, tmp_path_factory):  # noqa: F811
    return _bad_files(tmp_path_factory.mktemp("bad"), files["source"])


@pytest.mark.parametrize("row, change, words", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_gets_one_named_line(files, bad, tmp_path, capsys, row, change, words):  # noqa: F811
    (tmp_path / "exists.png").write_bytes(b"mine")
    MARKER.unlink(missing_ok=True)
    args = {"--target": str(files["target"]), "--source": str(files["source"]), "--out": str(tmp_path / "x.png"),
            "--vocab": str(clip_vocab_path())}
    extra: list[str] = []
    subst = {"{tmp}": str(tmp_path), "{target}": str(files["target"]), "{source}": str(files["source"])}
    i = 0
    while i < len(change):
        key = change[i]
        value = change[i + 1] if i + 1 < len(change) and not change[i + 1].startswith("--") else None
        if value is not None:
            for k, v in subst.items():
                value = value.replace(k, v)
            if value.startswith("{bad:"):
                value = str(bad[value[5:-1]])
        if key in args and value is not None:
            args[key] = value
        else:
            extra += [key] + ([value] if value is not None else [])
        i += 2 if value is not None else 1
    argv = ["generate", "--lora-dir", str(files["dir"] / "lora"), "--device", "cpu", "--steps", "2",
            "--width", "64", "--height", "64", "--quiet"]
    for key, value in args.items():
        argv += [key, value]
    code = main(argv + extra)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], lines
    assert len(lines[0]) <= MAX_MESSAGE, len(lines[0])
    assert not MARKER.exists(), "a pickle's code ran"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.png"]  # nothing written


def test_the_table_covers_every_class_of_the_issue():
    text = json.dumps(ROWS)
    for words in ("--steps", "--batch", "--width", "characters long", "nest", "--seed", "1e400", "nan",
                  "glob", "traversal", "absolute", "already exists", "latent", "truncated", "repeated", "code"):
        assert words in text, words
