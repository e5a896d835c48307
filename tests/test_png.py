"""runner/png.py against PIL (the reader A1111's PNG Info uses), and A1111's infotext reader
reproduced here as the reference for engine/infotext.py."""

from __future__ import annotations

import json
import random
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from lib_deltasampling.engine.infotext import format_parameters, settings_from_infotext, settings_to_infotext
from lib_deltasampling.engine.settings import DeltaSettings
from lib_deltasampling.errors import UserError
from lib_deltasampling.runner.png import png_bytes, write_png
from lib_deltasampling.runtime.pngtext import read_png_text

# ---------------------------------------------------------------- reference: A1111 v1.10.1
# Transcribed from modules/infotext_utils.py (quote, unquote, re_param, parse_generation_parameters:
# the prompt / negative prompt / key-value part, without styles and its added defaults) and
# modules/processing.py create_infotext (its final text assembly).

A1111_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
A1111_RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")


def a1111_quote(text):
    if ',' not in str(text) and '\n' not in str(text) and ':' not in str(text):
        return text
    return json.dumps(text, ensure_ascii=False)


def a1111_unquote(text):
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:
        return text


def a1111_create_infotext(prompt_text: str, negative_prompt: str, generation_params: dict) -> str:
    generation_params_text = ", ".join([k if k == v else f'{k}: {a1111_quote(v)}'
                                        for k, v in generation_params.items() if v is not None])
    negative_prompt_text = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt_text}{negative_prompt_text}\n{generation_params_text}".strip()


def a1111_parse_generation_parameters(x: str) -> dict:
    res = {}
    prompt = ""
    negative_prompt = ""
    done_with_prompt = False
    *lines, lastline = x.strip().split("\n")
    if len(A1111_RE_PARAM.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ''
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative_prompt += ("" if negative_prompt == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    for k, v in A1111_RE_PARAM.findall(lastline):
        try:
            if v[0] == '"' and v[-1] == '"':
                v = a1111_unquote(v)
            m = A1111_RE_IMAGESIZE.match(v)
            if m is not None:
                res[f"{k}-1"] = m.group(1)
                res[f"{k}-2"] = m.group(2)
            else:
                res[k] = v
        except Exception:
            pass  # A1111 prints "Error parsing ..." and goes on
    res["Prompt"] = prompt
    res["Negative prompt"] = negative_prompt
    if "Clip skip" not in res:   # two of the defaults A1111 adds, so a paste sees foreign keys too
        res["Clip skip"] = "1"
    if "Hires resize-1" not in res:
        res["Hires resize-1"] = 0
        res["Hires resize-2"] = 0
    return res


# ---------------------------------------------------------------- helpers

def chunk_kinds(data: bytes) -> list[bytes]:
    kinds, pos = [], 8
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        kinds.append(kind)
        pos += 12 + length
    return kinds


def filter_types(data: bytes, width: int) -> set[int]:
    """The row filter bytes of an RGB PNG's (single) IDAT."""
    pos, idat = 8, b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + length]
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = 1 + 3 * width
    return {raw[i] for i in range(0, len(raw), stride)}


def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    h, w = 300, 37     # more rows than one filter block (256)
    yy, xx = np.mgrid[0:h, 0:w]
    gradient = np.stack([(xx * 7) % 256, (yy * 3) % 256, (xx + yy) % 256], axis=-1).astype(np.uint8)
    smooth = (128 + 100 * np.sin(np.stack([xx / 9.0, yy / 13.0, (xx + yy) / 17.0], -1))).astype(np.uint8)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8), gradient, smooth,
            np.zeros((1, 1, 3), np.uint8), rng.integers(0, 256, (1, 7, 3), dtype=np.uint8),
            rng.integers(0, 256, (5, 1, 3), dtype=np.uint8), np.full((4, 4, 3), 255, np.uint8)]


LATIN1 = ('a (red:1.2) fox, "quoted", café\nNegative prompt: ugly, naïve\n'
          'Steps: 20, Sampler: Euler a, CFG scale: 7, Delta adapters: "<lora:x:0.5> \\\\ back"')
UNICODE = 'ein Fuchs im Schnee 雪の狐 🦊\nNegative prompt: ぼやけ\nSteps: 20, Sampler: DPM++ 2M, Seed: 1, Delta source prompt: "雪, 狐"'


# ---------------------------------------------------------------- PNG files

@pytest.mark.parametrize("index", range(len(images())))
def test_pixels_read_back_by_pil(tmp_path: Path, index: int):
    image = images()[index]
    path = write_png(tmp_path / "x.png", image, "Steps: 1, Sampler: Euler, Seed: 2")
    with Image.open(path) as im:
        assert im.mode == "RGB" and im.size == (image.shape[1], image.shape[0])
        np.testing.assert_array_equal(np.asarray(im), image)


def test_all_five_row_filters_occur_and_decode():
    """The test images above exercise every filter PIL has to undo (so each was encoded right)."""
    used = set()
    for image in images():
        used |= filter_types(png_bytes(image), image.shape[1])
    assert used == {0, 1, 2, 3, 4}


@pytest.mark.parametrize("text, chunk", [(LATIN1, b"tEXt"), (UNICODE, b"iTXt")])
def test_parameters_chunk_is_what_pil_and_a1111_read(tmp_path: Path, text: str, chunk: bytes):
    path = write_png(tmp_path / "x.png", images()[1], text)
    data = path.read_bytes()
    kinds = chunk_kinds(data)
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND"
    assert kinds.index(chunk) < kinds.index(b"IDAT")       # found by Image.open without decoding
    assert (b"iTXt" in kinds) == (chunk == b"iTXt")
    with Image.open(path) as im:
        assert im.info["parameters"] == text
    # The same chunk PIL writes for A1111 (images.save_image_with_geninfo: PngInfo.add_text).
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    assert info.chunks[0][0] == chunk
    assert info.chunks[0][1] in data
    assert read_png_text(path) == {"parameters": text}


def test_reads_text_chunks_pil_writes(tmp_path: Path):
    info = PngImagePlugin.PngInfo()
    info.add_text("plain", "café, 1:2")
    info.add_text("zipped", "x" * 5000 + "é", zip=True)
    info.add_itxt("intl", "雪の狐 🦊", lang="ja", tkey="狐")
    info.add_itxt("intl-zipped", "雪" * 3000, zip=True)
    Image.fromarray(images()[2]).save(tmp_path / "p.png", pnginfo=info)
    assert read_png_text(tmp_path / "p.png") == {"plain": "café, 1:2", "zipped": "x" * 5000 + "é",
                                                 "intl": "雪の狐 🦊", "intl-zipped": "雪" * 3000}


def test_more_text_chunks_and_errors(tmp_path: Path):
    path = write_png(tmp_path / "x.png", images()[3], "p", text={"Software": "Delta Sampling"})
    with Image.open(path) as im:
        assert im.info["parameters"] == "p" and im.info["Software"] == "Delta Sampling"
    with pytest.raises(ValueError, match="uint8 RGB"):
        write_png(tmp_path / "y.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="uint8 RGB"):
        write_png(tmp_path / "y.png", np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="keyword"):
        write_png(tmp_path / "y.png", images()[3], text={"": "x"})
    with pytest.raises(UserError, match="not valid Unicode"):
        write_png(tmp_path / "y.png", images()[3], "prompt \udce9")      # surrogateescape'd argv byte
    with pytest.raises(UserError, match="cannot be written"):
        write_png(tmp_path / "x.png" / "y.png", images()[3], "p")            # a file where a folder must be
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]                 # no partial files left
    assert write_png(tmp_path / "new" / "sub" / "y.png", images()[3], "p").is_file()  # folders are made
    (tmp_path / "new" / "sub" / "y.png").unlink()
    (tmp_path / "new" / "sub").rmdir()
    (tmp_path / "new").rmdir()
    (tmp_path / "not.png").write_bytes(b"GIF89a")
    with pytest.raises(UserError, match="not a PNG"):
        read_png_text(tmp_path / "not.png")


# ---------------------------------------------------------------- our writer/parser vs A1111's

def random_params(rng: random.Random) -> dict:
    words = ["a", "b c", ",", ":", '"', '"q"', "\n", "\\", "é", "🦊", " ", "512x768", "", "True", "Steps"]
    params = {"Steps": rng.randint(1, 150), "Sampler": rng.choice(["Euler a", "DPM++ 2M"]),
              "CFG scale": rng.choice([7, 7.5, 3.0]), "Seed": rng.randint(0, 2**32), "Size": "512x768"}
    for i in range(rng.randint(0, 6)):
        params[rng.choice(["Lora hashes", "Hires prompt", "Extra", f"Key {i}", "Steps"])] = \
            rng.choice([None, rng.random(), "".join(rng.choice(words) for _ in range(rng.randint(0, 5)))])
    return params


def test_format_parameters_writes_what_a1111_writes():
    from lib_deltasampling.engine.infotext import parse_parameters
    rng = random.Random(1)
    prompts = ["", "a fox", "a fox,\n  in snow  ", "<lora:x:0.5> fox", "Negative prompt: odd"]
    for _ in range(400):
        prompt, negative, params = rng.choice(prompts), rng.choice(prompts), random_params(rng)
        text = format_parameters(prompt, negative, params)
        assert text == a1111_create_infotext(prompt, negative, params)
        ours_prompt, ours_negative, ours = parse_parameters(text)
        ref = a1111_parse_generation_parameters(text)
        assert (ours_prompt, ours_negative) == (ref.pop("Prompt"), ref.pop("Negative prompt"))
        for key in ("Clip skip", "Hires resize-1", "Hires resize-2"):
            if key not in ours:
                ref.pop(key)
        assert ours == ref


def test_settings_survive_png_and_a1111_paste(tmp_path: Path):
    s = DeltaSettings(enabled=True, source_checkpoint="sd15/v1-5-pruned-emaonly.safetensors [6ce0161689]",
                      adapters='<lora:moxin:0.8> shuimobysim, "ink"\nwash 雪', source_prompt=" lead, \\trail ",
                      scale=2.5, start=0.1, end=0.75, schedule="cosine", source_cfg=3.0, guidance="cond", reuse=3,
                      hires=False, resolution="native")
    params = {"Steps": 20, "Sampler": "Euler", "CFG scale": 6, "Seed": 7, "Size": "768x768",
              **settings_to_infotext(s, {"Delta source hash": "6ce0161689"})}
    text = a1111_create_infotext("a 雪 fox", "blurry", params)
    path = write_png(tmp_path / "x.png", images()[2], text)
    with Image.open(path) as im:
        pasted = a1111_parse_generation_parameters(im.info["parameters"])
    back, warnings = settings_from_infotext(pasted)
    assert (back, warnings) == (s, [])
    assert pasted["Delta source hash"] == "6ce0161689" and pasted["Size-1"] == "768"
