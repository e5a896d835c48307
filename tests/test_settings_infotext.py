"""engine/settings.py (the one definition of every setting) and engine/infotext.py (its A1111 text form)."""

from __future__ import annotations

import dataclasses
import math
import random
import re
import typing

import pytest

from lib_deltasampling.engine import settings as settings_module
from lib_deltasampling.engine.infotext import (EXTRA_KEYS, format_hashes, format_parameters, parse_hashes,
                                               parse_parameters, settings_from_infotext, settings_to_infotext)
from lib_deltasampling.engine.settings import (FIELD_BY_NAME, FIELDS, KINDS, NAME_KINDS, PART_OF, XYZ_FIELDS,
                                              DeltaSettings, FieldSpec, field)
from lib_deltasampling.runtime.names import path_problem
from lib_deltasampling.errors import SettingError
from test_png import A1111_RE_PARAM, a1111_create_infotext, a1111_parse_generation_parameters

PYTHON_TYPE = {"bool": bool, "float": float, "int": int, "choice": str, "text": str, "checkpoint": str,
               "controlnet": str, "ipadapter": str, "clipvision": str, "image": typing.Any,
               "preprocessor": str}


# ---------------------------------------------------------------- one definition

def disagreements(cls: type, specs: tuple[FieldSpec, ...]) -> list[str]:
    """Where a settings dataclass and the field specs differ (name/order, default, type)."""
    hints = typing.get_type_hints(cls)
    ours = [(f.name, f.default, hints[f.name]) for f in dataclasses.fields(cls)]
    theirs = [(s.name, s.default, PYTHON_TYPE[s.kind]) for s in specs]
    out = [f"{a} != {b}" for a, b in zip(ours, theirs) if a != b or type(a[1]) is not type(b[1])]
    if len(ours) != len(theirs):
        out.append(f"{len(ours)} dataclass fields, {len(theirs)} specs")
    return out


def test_dataclass_and_fields_agree():
    assert disagreements(DeltaSettings, FIELDS) == []


def test_the_agreement_check_can_fail():
    @dataclasses.dataclass(frozen=True)
    class Drifted:
        enabled: bool = False
        source_checkpoint: str = ""

    specs = FIELDS[:2]
    assert disagreements(Drifted, specs) == []
    assert disagreements(Drifted, FIELDS[:3])                                      # a field missing
    assert disagreements(Drifted, (dataclasses.replace(specs[0], default=True), specs[1]))   # default drifted
    assert disagreements(Drifted, (specs[0], dataclasses.replace(specs[1], kind="int", default=0)))


def test_field_specs_are_complete_and_consistent():
    assert len({f.name for f in FIELDS}) == len({f.infotext for f in FIELDS}) == len({f.label for f in FIELDS}) \
        == len(FIELDS)
    for f in FIELDS:
        assert f.kind in KINDS and re.fullmatch(r"[a-z_]+", f.name)
        # A1111 reads keys with \w[\w \-/]+ up to ':'; all ours share the "Delta " prefix.
        assert re.fullmatch(r"\w[\w \-/]+", f.infotext) and f.infotext.startswith("Delta ")
        assert f.tooltip.endswith(".") and 20 < len(f.tooltip) < 140, f.name
        assert f.check(f.default) == f.default
        if f.kind in ("float", "int"):
            assert f.minimum <= f.ui_minimum <= f.default <= f.ui_maximum <= f.maximum and f.step > 0
        else:
            assert f.minimum is f.maximum is f.ui_minimum is f.ui_maximum is f.step is None
        assert bool(f.choices) == (f.kind == "choice")
    xyz = [f.xyz for f in FIELDS if f.xyz]
    assert len(set(xyz)) == len(xyz) == len(XYZ_FIELDS)
    assert XYZ_FIELDS[0].name == "scale" and XYZ_FIELDS[1:] == tuple(f for f in FIELDS if f.xyz and f.name != "scale")


def test_every_offered_choice_is_one_the_engine_runs():
    """The UI can offer only what the engine accepts: each choice maps through to_params() and
    passes the engine's own check (DeltaParams.check refuses anything else)."""
    from lib_deltasampling.engine.sampler import DeltaParams
    for name in ("schedule", "guidance", "resolution"):
        for choice in field(name).choices:
            DeltaSettings(**{name: choice}).to_params().check()
    from lib_deltasampling.errors import SettingError as Refused
    with pytest.raises(Refused):
        DeltaParams(shape="square").check()


def test_defaults():
    s = DeltaSettings()
    assert s.to_dict() == {
        "enabled": False, "source_checkpoint": "", "adapted_checkpoint": "", "adapters": "", "source_prompt": "",
        "source_negative": "", "scale": 1.0, "start": 0.0, "end": 1.0, "schedule": "constant", "source_cfg": 0.0,
        "guidance": "full", "reuse": 1, "hires": True, "resolution": "target", "control_model": "",
        "control_image": "", "control_weight": 1.0, "control_start": 0.0, "control_end": 1.0,
        "control_mode": "balanced", "control_preprocessor": "none", "ip_adapter": "", "ip_encoder": "",
        "ip_image": "", "ip_weight": 1.0, "control_resolution": -1, "control_threshold_a": -1.0,
        "control_threshold_b": -1.0}
    assert DeltaSettings.from_dict({}) == s and list(s.to_dict()) == [f.name for f in FIELDS]


def test_values_are_canonical_and_api_dict_round_trips():
    s = DeltaSettings.from_dict({"enabled": True, "scale": 2, "reuse": 3.0, "schedule": "Cosine", "end": 0.5})
    assert (type(s.scale), s.scale, type(s.reuse), s.reuse, s.schedule) == (float, 2.0, int, 3, "cosine")
    assert DeltaSettings.from_dict(s.to_dict()) == s
    assert s.replace(scale=-10).scale == -10.0 and s.replace(scale=-10).schedule == "cosine"
    params = s.to_params()
    assert (params.scale, params.shape, params.reuse, params.end, params.source_cfg) == (2.0, "cosine", 3, 0.5, None)
    assert s.replace(source_cfg=4).to_params().source_cfg == 4.0
    assert s.validate() is s


# ---------------------------------------------------------------- validation messages

@pytest.mark.parametrize("changes, words", [
    ({"scale": 12.0}, ['"Delta scale" (scale)', "12.0", "from -10 to 10"]),
    ({"scale": float("nan")}, ["(scale)", "nan", "not a finite number"]),
    ({"scale": float("-inf")}, ["(scale)", "-inf", "not a finite number"]),
    ({"scale": "1.5"}, ["(scale)", "'1.5'", "is a str, not a number", "from -10 to 10"]),
    ({"scale": True}, ["(scale)", "True", "not a number"]),
    ({"start": -0.1}, ['"Start (fraction of steps)" (start)', "-0.1", "from 0 to 1"]),
    ({"source_cfg": 31}, ["(source_cfg)", "31", "from 0 to 30"]),
    ({"reuse": 2.5}, ["(reuse)", "2.5", "not a whole number", "whole number from 1 to 10"]),
    ({"reuse": 0}, ["(reuse)", "0", "outside 1 to 10"]),
    ({"scale": 10 ** 400}, ["(scale)", "'100000000000...'", "not a finite number"]),   # float() overflows
    ({"reuse": 10 ** 400}, ["(reuse)", "not a finite number"]),
    ({"schedule": "wavy"}, ["(schedule)", "'wavy'", "constant, linear, cosine"]),
    ({"guidance": 1}, ["(guidance)", "not text", "full, cond"]),
    ({"resolution": "big"}, ["(resolution)", "target, native"]),
    ({"enabled": "yes"}, ['"Enable Delta Sampling" (enabled)', "'yes'", "true or false"]),
    ({"hires": 1}, ["(hires)", "not true or false"]),
    ({"adapters": None}, ["(adapters)", "None", "not text"]),
    ({"source_prompt": "a\0b"}, ["(source_prompt)", "control character"]),
    ({"source_checkpoint": "a\nb.safetensors"}, ["(source_checkpoint)", "control character", "name as the WebUI lists"]),
    ({"adapted_checkpoint": "../x.safetensors"}, ["(adapted_checkpoint)", "contains '..'", "name as the WebUI lists"]),
    ({"adapters": "lora \udce9"}, ["(adapters)", "not valid Unicode"]),
    ({"start": 0.5, "end": 0.5}, ["(start)", "(end)", "0.5", "start smaller than end"]),
    ({"start": 0.8, "end": 0.2}, ["(start)", "(end)", "0.8", "0.2", "no step"]),
    ({"sacle": 1.0}, ["unknown setting 'sacle'", "did you mean 'scale'", "Known settings: enabled,", "resolution"]),
])
def test_bad_values_name_setting_value_and_range(changes: dict, words: list[str]):
    with pytest.raises(SettingError) as caught:
        DeltaSettings.from_dict(changes)
    message = str(caught.value)
    assert message.startswith("Delta Sampling API")
    for word in words:
        assert word in message, (word, message)


def test_every_way_in_is_validated():
    with pytest.raises(SettingError, match=r"\(scale\).*not a finite"):
        DeltaSettings(scale=math.nan)
    with pytest.raises(SettingError, match=r"\(start\).*\(end\)"):
        DeltaSettings(start=1.0)
    with pytest.raises(SettingError, match=r"\(reuse\)"):
        DeltaSettings().replace(reuse=11)
    with pytest.raises(SettingError, match="unknown setting 'bogus'"):
        DeltaSettings().replace(bogus=1)
    with pytest.raises(SettingError, match="mapping"):
        DeltaSettings.from_dict([("scale", 1.0)])
    with pytest.raises(SettingError, match=r"^Delta Sampling command line setting"):
        DeltaSettings.from_dict({"scale": 99}, source="command line")
    with pytest.raises(dataclasses.FrozenInstanceError):
        DeltaSettings().scale = 2.0


def test_text_forms_for_xyz_and_infotext():
    assert field("enabled").parse("false") is False and field("hires").parse(" True ") is True
    assert field("reuse").parse("2") == 2 and field("reuse").parse("2.0") == 2
    assert field("scale").parse("1e-3") == 0.001 and field("schedule").parse("Linear") == "linear"
    for bad_spec, text in [("scale", "abc"), ("scale", "inf"), ("reuse", "2.5"), ("hires", "maybe")]:
        with pytest.raises(SettingError, match="infotext"):
            field(bad_spec).parse(text)
    for f in FIELDS:
        assert f.parse(f.format(f.default)) == f.default


# ---------------------------------------------------------------- infotext round trips

HOST = {"Steps": 20, "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": 7, "Seed": 1234567890,
        "Size": "512x768", "Model hash": "6ce0161689", "Model": "v1-5-pruned-emaonly"}
FRAGMENTS = [",", ":", '"', "\n", "\\", "<lora:x:0.5>", "é", "日本語", "🦊", " ", "\t", "\r", "a", "word", "12x34",
             "Delta scale", "Negative prompt:", "\u2028", "{", "}", "(", ")", "[", "]", "'", "\\n", '\\"', "Steps: 20",
             "\x7f", "\x01", "ß", "0", "x", "\u00a0", "/", "-"]
SPECIAL = ["", " ", '"', '""', '"a"', '"a, b"', "12x34", " 12x34", "Delta source", "Delta adapters", "True", "x",
           "a\n", "\n", "1x", "x1", "١٢x٣٤", "\\", "\\\\", 'a"b', '"ab"c', "<lora:moxin:0.8>, shuimobysim"]
A1111_LOSS = re.compile(r"\d+x\d+\n")   # module doc of infotext.py: the trailing newline is lost


def random_text(rng: random.Random, checkpoint: bool) -> str:
    while True:
        if rng.random() < 0.25:
            text = rng.choice(SPECIAL)
        else:
            text = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 8)))
        if checkpoint and path_problem(text, subfolders=True):  # a checkpoint setting is a name, not a path
            continue
        if not A1111_LOSS.fullmatch(text):
            return text


def random_settings(rng: random.Random) -> DeltaSettings:
    def number(lo: float, hi: float) -> float:
        return rng.choice([lo, hi, 0.0 if lo <= 0 <= hi else lo, 1 / 3, 1e-7 if lo <= 1e-7 else lo,
                           round(rng.uniform(lo, hi), 2), rng.uniform(lo, hi)])

    start, end = sorted(rng.sample([0.0, 1.0, 0.5, 0.25, rng.random(), rng.random()], 2))
    values = {"enabled": True, "scale": number(-10.0, 10.0), "start": start, "end": end,
              "source_cfg": number(0.0, 30.0), "reuse": rng.randint(1, 10), "hires": rng.random() < 0.5}
    for f in FIELDS:
        if f.kind == "choice":
            values[f.name] = rng.choice(f.choices)
        elif f.kind in ("text", *NAME_KINDS):
            values[f.name] = random_text(rng, f.kind != "text") if rng.random() < 0.8 else ""
    values["control_weight"], values["ip_weight"] = number(0.0, 2.0), number(0.0, 2.0)
    values["control_start"], values["control_end"] = sorted(rng.sample([0.0, 1.0, 0.5, rng.random()], 2))
    for name, head in PART_OF.items():   # without its model a part's settings are not written: the defaults
        if not values[head]:
            values[name] = FIELD_BY_NAME[name].default
    return DeltaSettings.from_dict(values)


def test_random_settings_round_trip_through_infotext_text():
    rng = random.Random(2024)
    seen_texts = set()
    for _ in range(400):
        s = random_settings(rng)
        seen_texts.add(s.adapters)
        params = {**HOST, **settings_to_infotext(s)}
        text = format_parameters("a fox, <lora:moxin:0.8>", "blurry", params)
        prompt, negative, parsed = parse_parameters(text)
        assert (prompt, negative) == ("a fox, <lora:moxin:0.8>", "blurry")
        assert settings_from_infotext(parsed) == (s, []), text
        # The same text pasted in A1111 (its parser adds foreign keys: ignored).
        assert settings_from_infotext(a1111_parse_generation_parameters(text)) == (s, [])
    assert len(seen_texts) > 200


@pytest.mark.parametrize("value", SPECIAL + FRAGMENTS)
def test_each_adversarial_text_round_trips_in_every_text_field(value: str):
    for f in FIELDS:
        if f.kind not in ("text", "checkpoint") or (f.kind == "checkpoint" and path_problem(value, subfolders=True)):
            continue
        s = DeltaSettings.from_dict({"enabled": True, f.name: value})
        text = a1111_create_infotext("p", "", settings_to_infotext(s))       # the host writes our dict
        assert settings_from_infotext(parse_parameters(text)[2]) == (s, []), (f.name, text)


def test_known_a1111_loss_of_a_size_like_text_with_newline():
    s = DeltaSettings.from_dict({"enabled": True, "source_prompt": "12x34\n"})
    text = format_parameters("p", "", settings_to_infotext(s))
    assert parse_parameters(text)[2]["Delta source prompt-1"] == "12x34\n".split("x")[0]
    back, warnings = settings_from_infotext(parse_parameters(text)[2])
    assert back == s.replace(source_prompt="12x34") and warnings == []


def test_infotext_entries_when_on_and_off():
    assert settings_to_infotext(DeltaSettings()) == {}
    assert settings_to_infotext(DeltaSettings(source_checkpoint="sd15.safetensors")) == {}
    s = DeltaSettings(enabled=True, source_checkpoint="sd15.safetensors", adapters="<lora:moxin:0.8> shuimobysim")
    entries = settings_to_infotext(s, {"Delta source hash": "6ce0161689",
                                       "Delta adapter hashes": format_hashes({"moxin": "7f2a1c3e9b01"})})
    assert entries == {
        "Delta sampling": "True", "Delta source": "sd15.safetensors", "Delta adapters": "<lora:moxin:0.8> shuimobysim",
        "Delta scale": "1.0", "Delta start": "0.0", "Delta end": "1.0", "Delta schedule": "constant",
        "Delta source CFG": "0.0", "Delta guidance": "full", "Delta reuse": "1", "Delta hires": "True",
        "Delta source resolution": "target", "Delta source hash": "6ce0161689",
        "Delta adapter hashes": "moxin: 7f2a1c3e9b01"}
    assert set(EXTRA_KEYS) >= {"Delta source hash", "Delta adapter hashes"}
    for bad in ["Delta scale", "Bad: key", ""]:
        with pytest.raises(ValueError):
            settings_to_infotext(s, {bad: "x"})
    assert parse_hashes(format_hashes({"a:b,c": "12", "d": "34"})) == {"abc": "12", "d": "34"}


# ---------------------------------------------------------------- real A1111 infotext, written by hand

SAMPLE_PLAIN = """masterpiece, 1girl, <lora:moxin:0.8> shuimobysim, (detailed:1.2)
BREAK ink wash
Negative prompt: lowres, bad anatomy, (worst quality:1.4)
Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 3141592653, Size: 512x768, \
Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.55, Hires upscale: 2, \
Hires upscaler: Latent, Hires prompt: "masterpiece, 1girl\\nsharp", Lora hashes: "moxin: 7f2a1c3e9b01", \
TI hashes: "shuimobysim: 1a2b3c4d5e6f", Version: v1.10.1"""

SAMPLE_DELTA = """a fox in the snow, <lora:moxin:0.8>
Steps: 40, Sampler: Euler, Schedule type: Automatic, CFG scale: 3, Seed: 42, Size: 1024x1024, \
Model hash: 31e35c80fc, Model: sd_xl_base_1.0, Delta sampling: True, Delta source: v1-5-pruned-emaonly.safetensors, \
Delta adapters: "<lora:moxin:0.8> shuimobysim, ink", Delta source prompt: "a fox in the snow, \\"winter\\"", \
Delta scale: 3.5, Delta start: 0.0, Delta end: 0.8, Delta schedule: cosine, Delta source CFG: 6.0, \
Delta guidance: full, Delta reuse: 2, Delta hires: False, Delta source resolution: native, \
Delta source hash: 6ce0161689, Delta adapter hashes: "moxin: 7f2a1c3e9b01", Version: v1.10.1"""


def test_parse_a_real_a1111_infotext():
    prompt, negative, params = parse_parameters(SAMPLE_PLAIN)
    assert prompt == "masterpiece, 1girl, <lora:moxin:0.8> shuimobysim, (detailed:1.2)\nBREAK ink wash"
    assert negative == "lowres, bad anatomy, (worst quality:1.4)"
    assert params == {
        "Steps": "28", "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": "7", "Seed": "3141592653",
        "Size-1": "512", "Size-2": "768", "Model hash": "6ce0161689", "Model": "v1-5-pruned-emaonly",
        "Denoising strength": "0.55", "Hires upscale": "2", "Hires upscaler": "Latent",
        "Hires prompt": "masterpiece, 1girl\nsharp", "Lora hashes": "moxin: 7f2a1c3e9b01",
        "TI hashes": "shuimobysim: 1a2b3c4d5e6f", "Version": "v1.10.1"}
    assert settings_from_infotext(params) == (DeltaSettings(), [])
    assert parse_hashes(params["Lora hashes"]) == {"moxin": "7f2a1c3e9b01"}


def test_parse_a_delta_sampling_infotext():
    prompt, negative, params = parse_parameters(SAMPLE_DELTA)
    assert (prompt, negative) == ("a fox in the snow, <lora:moxin:0.8>", "")
    assert params["Delta source hash"] == "6ce0161689" and params["Size-1"] == params["Size-2"] == "1024"
    expected = DeltaSettings(enabled=True, source_checkpoint="v1-5-pruned-emaonly.safetensors",
                             adapters="<lora:moxin:0.8> shuimobysim, ink", source_prompt='a fox in the snow, "winter"',
                             scale=3.5, end=0.8, schedule="cosine", source_cfg=6.0, reuse=2, hires=False,
                             resolution="native")
    assert settings_from_infotext(params) == (expected, [])
    assert settings_from_infotext(a1111_parse_generation_parameters(SAMPLE_DELTA)) == (expected, [])
    # Key order does not matter.
    shuffled = dict(sorted(params.items(), key=lambda kv: random.Random(kv[0]).random()))
    assert settings_from_infotext(shuffled) == (expected, [])
    # What we write for these settings is the sample, byte for byte.
    host = {"Steps": 40, "Sampler": "Euler", "Schedule type": "Automatic", "CFG scale": 3, "Seed": 42,
            "Size": "1024x1024", "Model hash": "31e35c80fc", "Model": "sd_xl_base_1.0"}
    extra = {"Delta source hash": "6ce0161689", "Delta adapter hashes": format_hashes({"moxin": "7f2a1c3e9b01"})}
    params = {**host, **settings_to_infotext(expected, extra), "Version": "v1.10.1"}
    assert format_parameters(prompt, "", params) == SAMPLE_DELTA == a1111_create_infotext(prompt, "", params)


def test_a_short_last_line_is_prompt_text():
    """A1111 takes the last line as parameters only when it has 3 or more entries."""
    prompt, negative, params = parse_parameters("a fox\nNegative prompt: blur\nDelta scale: 2, Delta reuse: 2")
    assert (prompt, negative, params) == ("a fox", "blur\nDelta scale: 2, Delta reuse: 2", {})
    assert len(A1111_RE_PARAM.findall("Delta scale: 2, Delta reuse: 2")) == 2


# ---------------------------------------------------------------- malformed infotext: warnings, never errors

@pytest.mark.parametrize("key, value, name", [
    ("Delta scale", "abc", "scale"), ("Delta scale", "nan", "scale"), ("Delta scale", "1e999", "scale"),
    ("Delta scale", "11", "scale"), ("Delta reuse", "2.5", "reuse"), ("Delta reuse", "0", "reuse"),
    ("Delta schedule", "wavy", "schedule"), ("Delta hires", "maybe", "hires"), ("Delta guidance", "", "guidance"),
    ("Delta source CFG", "-1", "source_cfg"), ("Delta start", "1.5", "start"),
    ("Delta source", "bad\x01name", "source_checkpoint"),
])
def test_a_malformed_value_falls_back_with_a_warning(key: str, value: str, name: str):
    params = {"Delta sampling": "True", "Delta scale": "2.0", "Delta reuse": "3", "Delta source": "sd15.safetensors",
              key: value}
    s, warnings = settings_from_infotext(params)
    assert getattr(s, name) == field(name).default and s.enabled
    assert len(warnings) == 1 and f'"{key}: {value}"' in warnings[0] and "default" in warnings[0]
    others = {"scale": 2.0, "reuse": 3, "source_checkpoint": "sd15.safetensors"}
    assert all(getattr(s, k) == v for k, v in others.items() if k != name)


def test_other_malformed_infotext():
    s, warnings = settings_from_infotext({"Delta start": "0.9", "Delta end": "0.2", "Delta scale": "2"})
    assert (s.enabled, s.start, s.end, s.scale) == (True, 0.0, 1.0, 2.0)
    assert len(warnings) == 1 and "Delta start: 0.9" in warnings[0] and "Delta end: 0.2" in warnings[0]
    s, warnings = settings_from_infotext({"Delta start": "1.0"})       # with the default end: empty window
    assert (s.start, s.end) == (0.0, 1.0) and len(warnings) == 1
    s, warnings = settings_from_infotext({"Delta sampling": "perhaps", "Delta scale": "2"})
    assert not s.enabled and s.scale == 2.0 and "Delta sampling: perhaps" in warnings[0]
    s, warnings = settings_from_infotext({"Delta scale": "2", "Delta wobble": "3", "Delta source hash": "ab"})
    assert s.enabled and warnings == ['Delta Sampling infotext "Delta wobble": not a Delta Sampling key of this '
                                      'version; ignored']
    assert settings_from_infotext({"Steps": "20", "Delta wobble": "1"}) == (DeltaSettings(), [])
    assert settings_from_infotext({}) == (DeltaSettings(), [])
    s, warnings = settings_from_infotext({"Delta sampling": True, "Delta reuse": 4, "CFG scale": 7})  # non-str values
    assert (s.enabled, s.reuse, warnings) == (True, 4, [])


def test_settings_module_imports_nothing_heavy():
    import subprocess
    import sys
    code = ("import sys, lib_deltasampling.engine.settings, lib_deltasampling.engine.infotext; "
            "print([m for m in ('torch', 'numpy', 'safetensors', 'gradio') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=settings_module.__file__.rsplit("/lib_deltasampling/", 1)[0])
    assert out.stdout.strip() == "[]"


def test_a_value_opening_a_quote_does_not_swallow_the_next_key():
    # '"x' written raw would open a quoted value that the next value's closing '"' ends
    s = DeltaSettings.from_dict({"enabled": True, "source_checkpoint": '"x', "adapted_checkpoint": 'y"'})
    for text in (format_parameters("p", "", settings_to_infotext(s)), a1111_create_infotext("p", "", settings_to_infotext(s))):
        assert settings_from_infotext(parse_parameters(text)[2]) == (s, []), text
