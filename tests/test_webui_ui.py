"""The accordion (webui/ui.py), infotext paste (webui/paste.py), javascript/ and install.py, built in
the A1111 1.10.1 stand-in (tests/a1111) through the real `scripts/delta_sampling.py`.

References are A1111's own code paths in the stand-in (`ScriptRunner` arg slicing, `Api.init_*`,
`infotext_utils` paste and `Api.apply_infotext`) and the settings definition (FIELDS); no expected
value is written out by hand except where the host's rule says so.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import random
import sys
from types import SimpleNamespace

import pytest

from lib_deltasampling.engine.infotext import SOURCE_HASH, format_parameters, settings_to_infotext
from lib_deltasampling.engine.settings import FIELD_BY_NAME, FIELDS, PART_OF, DeltaSettings

TITLE = "Delta Sampling"
TABS = ("txt2img", "img2img")
CHECKPOINTS = ("target.safetensors", "sd15.safetensors", "sub/tuned.safetensors")
BASE_PARAMS = {"Steps": 20, "Sampler": "Euler", "CFG scale": 7, "Seed": 1, "Size": "64x64"}
TEXTS = ("", "plain words", "a, b: c", 'say "hi"', "  padded  ", "two\nlines", "12x34", "ünïcødé ☃",
         "<lora:moxin:0.8> moxin style, ink", "Delta scale", '"quoted"')


def webui(name: str):
    """A webui module as loaded in this test (the fixture purges them between tests)."""
    return importlib.import_module(f"lib_deltasampling.webui.{name}")


@pytest.fixture
def host(a1111):  # noqa: F811
    for seed, name in enumerate(CHECKPOINTS):
        a1111.add_checkpoint(name, "sd1", seed=seed)
    a1111.load_scripts(a1111.repo / "scripts" / "delta_sampling.py")
    a1111.create_ui()
    return a1111


def ds_script(handle, tab: str):
    runner = handle.scripts.scripts_img2img if tab == "img2img" else handle.scripts.scripts_txt2img
    return next(s for s in runner.alwayson_scripts if s.title() == TITLE)


def ds_blocks(script) -> list:
    """The enable control and every block inside the accordion."""
    accordion = script.controls[0]
    return [accordion, accordion.accordion, *accordion.accordion.walk()]


def by_elem_id(script, name: str):
    return next(b for b in ds_blocks(script) if getattr(b, "elem_id", None) == script.elem_id(name))


def random_settings(rng: random.Random) -> DeltaSettings:
    values = {}
    for spec in FIELDS:
        if spec.kind == "bool":
            values[spec.name] = rng.random() < 0.5
        elif spec.kind == "float":
            lo, hi = spec.minimum, spec.maximum
            values[spec.name] = rng.choice([lo, hi, round(rng.uniform(lo, hi), rng.randint(0, 3)), rng.uniform(lo, hi)])
        elif spec.kind == "int":
            values[spec.name] = rng.randint(int(spec.minimum), int(spec.maximum))
        elif spec.kind == "choice":
            values[spec.name] = rng.choice(spec.choices)
        elif spec.kind in ("controlnet", "ipadapter", "clipvision"):
            values[spec.name] = rng.choice(["", f"{spec.kind}-model"])
        elif spec.kind == "image":
            values[spec.name] = ""      # never in infotext or a paste
        elif spec.kind == "checkpoint":
            values[spec.name] = rng.choice(["", *CHECKPOINTS])
        else:
            values[spec.name] = rng.choice(TEXTS)
    values["start"], values["end"] = sorted(rng.sample([0.0, 0.05, 0.25, 1 / 3, 0.5, 0.77, 1.0], 2))
    values["enabled"] = True
    values["control_start"], values["control_end"] = sorted(rng.sample([0.0, 0.2, 0.5, 1.0], 2))
    for name, head in PART_OF.items():   # without its model a part's settings are not in infotext: the defaults
        if not values[head]:
            values[name] = FIELD_BY_NAME[name].default
    return DeltaSettings(**values)


def image_controls(script) -> list:
    return [c for f, c in zip(FIELDS, script.controls) if f.kind == "image"]


def infotext_for(s: DeltaSettings, extra: dict | None = None) -> str:
    return format_parameters("a fox", "ugly", {**BASE_PARAMS, **settings_to_infotext(s, extra)})


def expected_control_values(handle, s: DeltaSettings) -> list:
    args, sd_models = webui("args"), handle.sd_models
    out = []
    for spec in FIELDS:
        value = args.ui_value(spec, getattr(s, spec.name))
        if spec.kind == "checkpoint" and getattr(s, spec.name):
            value = sd_models.get_closet_checkpoint_match(value).title
        out.append(value)
    return out


# ---------------------------------------------------------------------------- the accordion

@pytest.mark.parametrize("tab", TABS)
def test_controls_are_generated_from_fields_in_their_order(host, tab):
    import gradio as gr
    script = ds_script(host, tab)
    controls = script.controls
    assert script.args_to - script.args_from == len(FIELDS) == len(controls)
    args = webui("args")
    for spec, control in zip(FIELDS, controls):
        if spec.name == "enabled":
            assert isinstance(control, host.ui_components.InputAccordion)
            assert control.accordion_id == script.elem_id("enable") == f"script_{tab}_delta_sampling_enable"
            continue
        assert control.elem_id == script.elem_id(spec.name)
        assert control.label == spec.label
        if spec.kind in ("float", "int"):
            assert isinstance(control, gr.Slider)
            assert (control.minimum, control.maximum, control.step) == (spec.ui_minimum, spec.ui_maximum, spec.step)
        elif spec.kind == "choice":
            assert isinstance(control, gr.Radio) and [v for _, v in control.choices] == list(spec.choices)
        elif spec.kind == "bool":
            assert isinstance(control, gr.Checkbox)
        elif spec.kind in ("checkpoint", "controlnet", "ipadapter", "clipvision"):
            assert isinstance(control, gr.Dropdown)
        elif spec.kind == "image":
            assert isinstance(control, gr.Image) and control.type == "numpy" and control.value is None
        elif spec.kind == "preprocessor":   # no ControlNet extension in the stand-in: the built-in set
            assert isinstance(control, gr.Dropdown) and control.choices == ["none", "invert", "canny"]
        else:
            assert isinstance(control, gr.Textbox)
    assert [c.value for c in controls] == args.ui_defaults()
    # What the UI sends unchanged, and what the API fills in for a request without our args.
    assert args.settings_from_script_args([c.value for c in controls], source="UI") == DeltaSettings()
    api_args = host.script_args(tab)[script.args_from:script.args_to]
    assert api_args == args.ui_defaults()
    assert args.settings_from_script_args(api_args, source="API") == DeltaSettings()


def test_elem_ids_unique_tooltips_everywhere_no_unused_kwargs(host):
    import gradio as gr
    seen = []
    for tab in TABS:
        script = ds_script(host, tab)
        blocks = ds_blocks(script)
        seen += [b.elem_id for b in blocks if b.elem_id]
        for block in blocks:
            assert not block.unused_kwargs, (block.elem_id, block.unused_kwargs)   # gradio would warn
            if isinstance(block, gr.components.IOComponent):
                assert block.elem_id and block.elem_id.startswith(f"script_{tab}_delta_sampling_"), block
                if block.visible is not False or block is script.controls[0]:
                    assert getattr(block, "webui_tooltip", None), block.elem_id
        accordion = script.controls[0].accordion
        assert accordion.elem_id == script.elem_id("enable") and accordion.webui_tooltip == FIELDS[0].tooltip
        for spec, control in zip(FIELDS[1:], script.controls[1:]):
            assert control.webui_tooltip == spec.tooltip
    assert len(seen) == len(set(seen)), sorted(x for x in seen if seen.count(x) > 1)
    all_ids = [b.elem_id for b in host.demo.walk() if getattr(b, "elem_id", None)]
    assert all(all_ids.count(i) == 1 for i in seen)


def test_hires_control_hidden_in_img2img_only(host):
    index = [f.name for f in FIELDS].index("hires")
    assert ds_script(host, "txt2img").controls[index].visible is True
    assert ds_script(host, "img2img").controls[index].visible is False


def test_checkpoint_dropdowns_list_the_host_titles_and_refresh(host):
    script = ds_script(host, "txt2img")
    names = [f.name for f in FIELDS]
    source = script.controls[names.index("source_checkpoint")]
    adapted = script.controls[names.index("adapted_checkpoint")]
    titles = host.sd_models.checkpoint_tiles()
    assert source.choices == titles and adapted.choices == ["None", *titles]
    assert len(titles) == len(CHECKPOINTS)

    # A new file, not yet listed: the refresh button re-scans the folder (sd_models.list_models).
    (host.ckpt_dir / "new.safetensors").symlink_to((host.ckpt_dir / "sd15.safetensors").resolve())
    for control, name in ((source, "source_checkpoint"), (adapted, "adapted_checkpoint")):
        button = by_elem_id(script, f"{name}_refresh")
        (click,) = [e for e in button.events if e["event"] == "click"]
        update = click["fn"]()
        assert "new.safetensors" in update["choices"] and control in click["outputs"]
    assert "new.safetensors" in adapted.choices and adapted.choices[0] == "None"


def test_lora_picker_appends_a_tag_and_resets(host):
    import gradio as gr
    ui = webui("ui")
    script = host.scripts.Script()
    script.title = lambda: TITLE
    script.show = lambda is_img2img: host.scripts.AlwaysVisible
    script.is_img2img = False
    loras = [("moxin", "moxin (SD1.x)"), ("ink", "ink")]
    with gr.Blocks():
        controls = ui.build_ui(script, False, ui.UiChoices(checkpoints=lambda: [], loras=lambda: loras))
    adapters = controls[[f.name for f in FIELDS].index("adapters")]
    picker = by_elem_id(SimpleNamespace(controls=controls, elem_id=script.elem_id), "lora_picker")
    assert picker.choices == ["moxin (SD1.x)", "ink"] and picker.webui_tooltip
    (change,) = [e for e in picker.events if e["event"] == "change"]
    assert change["inputs"] == [picker, adapters] and change["outputs"] == [adapters, picker]
    text, reset = change["fn"]("moxin (SD1.x)", "ink style")
    assert text["value"] == "ink style <lora:moxin:1>" and reset["value"] is None
    assert change["fn"]("ink", "")[0]["value"] == "<lora:ink:1>"
    assert change["fn"](None, "kept") == (gr.update(), gr.update())   # the reset itself changes nothing
    assert ui.append_lora_tag("a  \n", "b", 0.5) == "a <lora:b:0.5>"


def test_preprocessor_list_and_its_parameters_follow_the_host(host):
    """The dropdown lists the host's preprocessors; choosing one shows only the parameters it uses,
    under its own names (the host's slider labels), and never touches their values."""
    import gradio as gr
    ui = webui("ui")
    script = host.scripts.Script()
    script.title = lambda: TITLE
    script.show = lambda is_img2img: host.scripts.AlwaysVisible
    script.is_img2img = False
    host_labels = {"depth_midas": ("Resolution", None, None), "mlsd": ("Resolution", "Value", "Distance")}
    with gr.Blocks():
        controls = ui.build_ui(script, False, ui.UiChoices(
            checkpoints=lambda: [], loras=lambda: [], preprocessors=lambda: ["none", "depth_midas", "mlsd"],
            preprocessor_labels=lambda name: host_labels.get(name, (None, None, None))))
    by_name = dict(zip([f.name for f in FIELDS], controls))
    dropdown = by_name["control_preprocessor"]
    params = [by_name[n] for n in ("control_resolution", "control_threshold_a", "control_threshold_b")]
    assert dropdown.choices == ["none", "depth_midas", "mlsd"] and dropdown.value == "none"
    assert [p.visible for p in params] == [False, False, False]          # none uses no parameter
    (change,) = [e for e in dropdown.events if e["event"] == "change"]
    assert change["inputs"] == [dropdown] and change["outputs"] == params
    updates = change["fn"]("mlsd")
    assert [u["visible"] for u in updates] == [True, True, True]
    assert [u["label"] for u in updates] == ["Resolution (-1: its default)", "Value (-1: its default)",
                                             "Distance (-1: its default)"]
    assert all("value" not in u for u in updates)                        # a pasted value stays
    assert [u["visible"] for u in change["fn"]("depth_midas")] == [True, False, False]
    assert [u["label"] for u in change["fn"](None)] == ["Preprocessor resolution", "Preprocessor threshold A",
                                                        "Preprocessor threshold B"]


def test_building_the_ui_loads_no_model(host):
    host.start_app()          # the API builds every ui() twice more (Api.init_default_script_args)
    assert host.shared.sd_model is None
    assert webui("state").CACHE.loaded == []
    assert not host.reports


# ---------------------------------------------------------------------------- paste

@pytest.mark.parametrize("tab", TABS)
def test_paste_restores_every_control_exactly(host, tab):
    """settings -> infotext -> the tab's paste button -> control values -> script args -> settings."""
    script = ds_script(host, tab)
    args = webui("args")
    rng = random.Random(5 if tab == "txt2img" else 6)
    for _ in range(30):
        s = random_settings(rng)
        updates = host.paste(infotext_for(s), tab)
        assert all(c not in updates for c in image_controls(script))   # a paste leaves the image
        pasted = [updates[c]["value"] if c in updates else c.value for c in script.controls]
        assert pasted == expected_control_values(host, s)
        assert pasted[0] is True
        assert args.settings_from_script_args(pasted, source="UI") == s
    assert not host.reports


def test_api_infotext_field_gives_typed_args(host):
    """`Api.apply_infotext` converts with type(component.value)(v) and no error handling: our
    callables must return exactly typed values (a "False" string would become True)."""
    script = ds_script(host, "txt2img")
    runner = host.scripts.scripts_txt2img
    args = webui("args")
    api = host.import_("modules.api.api").Api(None, host.call_queue.queue_lock)
    rng = random.Random(7)
    for _ in range(15):
        s = random_settings(rng).replace(hires=False)
        mentioned = {}
        request = SimpleNamespace(infotext=infotext_for(s))
        api.apply_infotext(request, "txt2img", script_runner=runner, mentioned_script_args=mentioned)
        values = [mentioned.get(i, control.value) for i, control in zip(range(script.args_from, script.args_to),
                                                                         script.controls)]
        assert all(i not in mentioned for i, f in enumerate(FIELDS, script.args_from) if f.kind == "image")
        for value, control in zip(values, script.controls):
            assert type(value) is type(control.value), (value, control.elem_id)
        assert args.settings_from_script_args(values, source="API") == s


def test_paste_field_names_let_send_to_copy_every_control(host):
    runner = host.scripts.scripts_txt2img
    names = webui("paste").paste_field_names()
    pasted = [f for f in FIELDS if f.kind != "image"]   # the control image is not in infotext
    assert names == [f.infotext for f in pasted] and set(names) <= set(runner.paste_field_names)
    fields = host.infotext_utils.paste_fields["txt2img"]["fields"]
    # connect_paste_params_buttons: `[field for field, name in fields if name in paste_field_names]`
    script = ds_script(host, "txt2img")
    assert [f for f, name in fields if name in names] == [c for c in script.controls
                                                          if c not in image_controls(script)]


def test_paste_maps_checkpoint_names_to_host_titles(host, caplog):
    script = ds_script(host, "txt2img")
    info = host.sd_models.get_closet_checkpoint_match("sd15.safetensors")
    short = info.calculate_shorthash()
    assert info.title == f"sd15.safetensors [{short}]"
    source = script.controls[1]

    s = DeltaSettings(enabled=True, source_checkpoint="sd15.safetensors", scale=2.0)
    assert host.paste(infotext_for(s))[source]["value"] == info.title

    # Renamed on this machine: found by the hash written beside the name.
    s = s.replace(source_checkpoint="renamed.safetensors")
    assert host.paste(infotext_for(s, {SOURCE_HASH: short}))[source]["value"] == info.title

    # Not present at all: the dropdown cannot show it; left unchanged with a warning, the rest restored.
    with caplog.at_level(logging.WARNING, logger="delta-sampling"):
        updates = host.paste(infotext_for(s.replace(guidance="cond")))
    assert "value" not in updates[source]
    assert updates[script.controls[[f.name for f in FIELDS].index("guidance")]]["value"] == "cond"
    assert any("renamed.safetensors" in r.getMessage() for r in caplog.records)
    assert not host.reports


def test_malformed_infotext_warns_and_restores_the_rest(host, caplog):
    script = ds_script(host, "txt2img")
    names = [f.name for f in FIELDS]
    text = ("a fox\nSteps: 20, Sampler: Euler, Delta sampling: True, Delta scale: lots, Delta schedule: wobbly, "
            "Delta reuse: 2.5, Delta start: 0.9, Delta end: 0.1, Delta guidance: cond, Delta source CFG: 4.5, "
            "Delta hires: maybe, Delta frobnicate: 3, Delta adapters: \"<lora:x:1\", Delta source: \"bad\\u0001\"")
    with caplog.at_level(logging.WARNING, logger="delta-sampling"):
        updates = host.paste(text)
    got = {name: updates[c].get("value") for name, c in zip(names, script.controls) if c in updates}
    default = DeltaSettings()
    assert got["enabled"] is True and got["guidance"] == "cond" and got["source_cfg"] == 4.5
    assert got["adapters"] == "<lora:x:1"
    for name in ("scale", "schedule", "reuse", "start", "end", "hires", "source_checkpoint"):
        assert got[name] == getattr(default, name), name
    messages = " | ".join(r.getMessage() for r in caplog.records)
    for word in ("lots", "wobbly", "2.5", "maybe", "frobnicate", "start is not before end"):
        assert word in messages, word
    assert not host.reports


def test_infotext_without_delta_keys_turns_off_and_leaves_the_rest(host):
    script = ds_script(host, "txt2img")
    updates = host.paste("a fox\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 3")
    assert updates[script.controls[0]] == {"value": False, "__type__": "generic_update"}
    assert all("value" not in updates.get(c, {}) for c in script.controls[1:])


def test_settings_are_read_once_per_paste(host, monkeypatch):
    paste = webui("paste")
    calls = []
    original = paste.settings_from_infotext
    monkeypatch.setattr(paste, "settings_from_infotext", lambda params: calls.append(1) or original(params))
    host.paste(infotext_for(DeltaSettings(enabled=True, scale=3.0)))
    host.paste(infotext_for(DeltaSettings(enabled=True, scale=2.0)))
    assert len(calls) == 2


def test_on_infotext_pasted_points_adapter_tags_at_renamed_files(monkeypatch):
    from lib_deltasampling.webui import paste
    entry = SimpleNamespace(get_alias=lambda: "moxin_v2")
    monkeypatch.setitem(sys.modules, "networks", SimpleNamespace(available_network_hash_lookup={"abc123": entry}))
    params = {"Delta adapters": "<lora:moxin:0.8> <lyco:other:1> words", "Delta adapter hashes": "moxin: abc123, other: zzz"}
    paste.on_infotext_pasted("", params)
    assert params["Delta adapters"] == "<lora:moxin_v2:0.8> <lyco:other:1> words"
    params = {"Delta adapters": "<lora:moxin:1>"}         # no hashes: nothing to do
    paste.on_infotext_pasted("", params)
    assert params == {"Delta adapters": "<lora:moxin:1>"}


# ---------------------------------------------------------------------------- javascript, install.py

def test_javascript_targets_the_ids_the_ui_generates(host):
    js = (host.repo / "javascript" / "delta_sampling.js").read_text(encoding="utf-8")
    for tab in TABS:
        assert ds_script(host, tab).elem_id("adapters") == f"script_{tab}_delta_sampling_adapters"
    assert "`script_${tab}_delta_sampling_adapters`" in js and "`${tab}_lora_pane`" in js
    assert js.count("(") == js.count(")") and js.count("{") == js.count("}")


def _install_module():
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "install.py"
    spec = importlib.util.spec_from_file_location("delta_sampling_install", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_install_checks_and_installs_nothing(capsys, monkeypatch):
    install = _install_module()
    assert install.main() == 0 and capsys.readouterr().out == ""
    monkeypatch.setattr(install, "REQUIRED", ("torch", "surely_no_such_package_x"))
    assert install.main() == 1
    out = capsys.readouterr().out
    assert "surely_no_such_package_x" in out and "torch," not in out and "[Delta Sampling]" in out
    source = (install.__file__ and open(install.__file__, encoding="utf-8").read())
    assert "pip" not in source.replace("a pip run", "") and "launch.run" not in source


def test_extra_model_lists_come_from_the_hosts_folders(a1111, tmp_path):  # noqa: F811
    """ControlNets in models/ControlNet (and sd-webui-controlnet's folder), IP-Adapters there and in
    models/ipadapter, CLIP vision encoders in models/clip_vision; names resolve to those files only."""
    files = webui("files")
    root = a1111.models_path
    made = {"controlnet": root / "ControlNet" / "canny" / "control_sd15_canny.pth",
            "ipadapter": root / "ipadapter" / "ip-adapter_sd15.safetensors",
            "clipvision": root / "clip_vision" / "vit-h.safetensors"}
    for path in made.values():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(b"x")
    (root / "ControlNet" / "linked.safetensors").symlink_to(outside)
    assert "control_sd15_canny" in files.model_names("controlnet")
    assert "control_sd15_canny" in files.model_names("ipadapter")   # sd-webui-controlnet keeps both there
    assert files.model_names("clipvision") == ["vit-h"]
    for kind, path in made.items():
        assert files.model_file(kind, path.stem) == path
    with pytest.raises(Exception, match="outside the model folders"):
        files.model_file("controlnet", "linked")
    with pytest.raises(Exception, match='ControlNet "nope"'):
        files.model_file("controlnet", "nope")
