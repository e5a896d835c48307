"""Script arguments (webui/args.py), X/Y/Z axes (webui/xyz.py), the HTTP route (webui/api.py) and the
settings page (webui/options.py), driven through the A1111 1.10.1 stand-in (tests/a1111): the API's
own argument padding (`Api.init_script_args`), the X/Y/Z script's own cell loop (`copy(p)` per
cell), the recorded FastAPI app and `shared.opts`.
"""

from __future__ import annotations

import importlib
import json
import logging
import random
import struct
import threading
from copy import copy
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from lib_deltasampling.engine.schedule import SHAPES
from lib_deltasampling.engine.settings import FIELD_BY_NAME, FIELDS, PART_OF, XYZ_FIELDS, DeltaSettings
from lib_deltasampling.errors import SettingError

TITLE = "Delta Sampling"
CHECKPOINTS = ("target.safetensors", "sd15.safetensors")
ROUTE = "/delta-sampling/v1/models"


def webui(name: str):
    return importlib.import_module(f"lib_deltasampling.webui.{name}")


@pytest.fixture
def host(a1111):  # noqa: F811
    for seed, name in enumerate(CHECKPOINTS):
        a1111.add_checkpoint(name, "sd1", seed=seed)
    a1111.load_scripts(a1111.repo / "scripts" / "delta_sampling.py")
    a1111.create_ui()
    return a1111


def ds_slice(handle, args: list, tab: str = "txt2img") -> list:
    runner = handle.scripts.scripts_img2img if tab == "img2img" else handle.scripts.scripts_txt2img
    script = next(s for s in runner.alwayson_scripts if s.title() == TITLE)
    return list(args[script.args_from:script.args_to])


def random_settings(rng: random.Random) -> DeltaSettings:
    values = {}
    for spec in FIELDS:
        if spec.kind == "bool":
            values[spec.name] = rng.random() < 0.5
        elif spec.kind == "float":
            values[spec.name] = rng.uniform(spec.minimum, spec.maximum)
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
            values[spec.name] = rng.choice(["", "<lora:a:1>, word", "x\ny"])
    values["start"], values["end"] = sorted(rng.sample([0.0, 0.2, 0.5, 0.9, 1.0], 2))
    values["control_start"], values["control_end"] = sorted(rng.sample([0.0, 0.2, 0.5, 1.0], 2))
    for name, head in PART_OF.items():   # without its model a part's settings are not in infotext: the defaults
        if not values[head]:
            values[name] = FIELD_BY_NAME[name].default
    return DeltaSettings(**values)


# ---------------------------------------------------------------------------- arguments

def test_positional_args_round_trip_and_short_lists_take_defaults():
    from lib_deltasampling.webui import args
    rng = random.Random(1)
    for _ in range(25):
        s = random_settings(rng)
        positional = [args.ui_value(f, getattr(s, f.name)) for f in FIELDS]
        assert args.settings_from_script_args(positional, source="UI") == s
    assert args.settings_from_script_args([True, "sd15.safetensors"], source="API") == \
        DeltaSettings(enabled=True, source_checkpoint="sd15.safetensors")
    assert args.settings_from_script_args([], source="API") == DeltaSettings()
    none_everywhere = [None] * len(FIELDS)            # None is "the default" in every position
    assert args.settings_from_script_args(none_everywhere, source="API") == DeltaSettings()
    # Sliders send 2.0 for an int; the dropdown's "None" is no checkpoint.
    reuse = [f.name for f in FIELDS].index("reuse")
    positional = args.ui_defaults()
    positional[reuse] = 2.0
    assert args.settings_from_script_args(positional, source="UI") == DeltaSettings(reuse=2)


def test_api_forms_through_the_hosts_argument_padding(host):
    """`alwayson_scripts` as A1111 builds script_args: UI defaults, then min(n, len(args)) copied."""
    args = webui("args")
    s = DeltaSettings(enabled=True, source_checkpoint="sd15.safetensors", scale=1.5, schedule="cosine", reuse=3)
    positional = [args.ui_value(f, getattr(s, f.name)) for f in FIELDS]
    for tab in ("txt2img", "img2img"):
        got = ds_slice(host, host.script_args(tab, {TITLE: positional}), tab)
        assert args.settings_from_script_args(got, source="API") == s
        short = ds_slice(host, host.script_args(tab, {TITLE: [True, "sd15.safetensors"]}), tab)
        assert args.settings_from_script_args(short, source="API") == DeltaSettings(enabled=True,
                                                                                      source_checkpoint="sd15.safetensors")
        named = {"source_checkpoint": "sd15.safetensors", "scale": 1.5, "schedule": "Cosine", "reuse": 3}
        got = ds_slice(host, host.script_args(tab, {"delta sampling": [named]}), tab)   # title matched case-insensitively
        assert args.settings_from_script_args(got, source="API") == s                   # a dict implies enabled
        off = ds_slice(host, host.script_args(tab, {TITLE: [{"enabled": False, "scale": 2}]}), tab)
        assert args.settings_from_script_args(off, source="API") == DeltaSettings(scale=2.0)


@pytest.mark.parametrize("given, words", [
    ([{"scal": 1.5}], ["unknown setting 'scal'", "did you mean 'scale'"]),
    ([{"scale": "lots"}], ['"Delta scale" (scale)', "'lots'", "not a number", "-10 to 10"]),
    ([{"scale": 11}], ['"Delta scale" (scale)', "outside -10 to 10"]),
    ([{"schedule": "wobbly"}], ['"Schedule" (schedule)', "'wobbly'", "constant"]),
    ([{"reuse": 2.5}], ['"Reuse the delta for k steps" (reuse)', "not a whole number"]),
    ([{"start": 0.8, "end": 0.2}], ["(start)", "(end)", "not before end"]),
    ([{3: 1}], ["unknown setting 3"]),
    ([{"scale": 1.0}, "sd15.safetensors"], ["followed by more values", "source_checkpoint"]),
    (["yes"], ['"Enable Delta Sampling" (enabled)', "'yes'", "true or false"]),
    ([True, 5], ['"Source base checkpoint" (source_checkpoint)', "not text"]),
    ([True] + [""] * 40, ["41 values given", f"only {len(FIELDS)} settings"]),
])
def test_bad_api_args_name_the_setting(given, words):
    from lib_deltasampling.webui import args
    with pytest.raises(SettingError) as err:
        args.settings_from_script_args(given, source="API")
    message = str(err.value)
    assert "Delta Sampling API" in message
    for word in words:
        assert word in message, (word, message)


def test_overrides_from_p_and_applying_them():
    from lib_deltasampling.webui import args
    p = SimpleNamespace()
    assert args.overrides_from_p(p) == {}
    p.delta_sampling_overrides = {"scale": 2, "adapted_checkpoint": "None", "schedule": "LINEAR"}
    assert args.overrides_from_p(p) == {"scale": 2.0, "adapted_checkpoint": "", "schedule": "linear"}
    base = DeltaSettings(source_checkpoint="sd15.safetensors")
    on = args.apply_overrides(base, args.overrides_from_p(p))
    assert on == base.replace(enabled=True, scale=2.0, schedule="linear")     # an axis turns DS on
    assert args.apply_overrides(base, {"enabled": False, "scale": 3.0}) == base.replace(scale=3.0)
    assert args.apply_overrides(base, {}) is base
    for bad, word in (({"scael": 1}, "unknown setting 'scael'"), ("scale=2", "not a dict"), ({"scale": 99}, "outside")):
        p.delta_sampling_overrides = bad
        with pytest.raises(SettingError, match=word):
            args.overrides_from_p(p)


# ---------------------------------------------------------------------------- X/Y/Z

def ds_axes(xyz) -> list:
    labels = {f.xyz for f in XYZ_FIELDS}
    return [o for o in xyz.axis_options if o.label in labels]


def test_axes_registered_once_with_types_and_choices(host):
    xyz = host.xyz_grid()
    axes = ds_axes(xyz)
    assert [a.label for a in axes] == [f.xyz for f in XYZ_FIELDS] and axes[0].label == "Delta scale"
    assert webui("xyz").register_axes() is True and webui("xyz").register_axes() is True
    assert [a.label for a in ds_axes(xyz)] == [a.label for a in axes]          # idempotent
    by_label = {a.label: a for a in axes}
    for spec in XYZ_FIELDS:
        axis = by_label[spec.xyz]
        assert axis.type is {"float": float, "int": int}.get(spec.kind, str)
        assert (axis.choices is None) == (spec.kind in ("float", "int", "text")), spec.name
    assert by_label["Delta schedule"].choices() == list(SHAPES)
    assert by_label["Delta guidance"].choices() == list(FIELD_BY_NAME["guidance"].choices)
    titles = sorted(host.sd_models.checkpoints_list, key=str.casefold)
    assert by_label["Delta source checkpoint"].choices() == titles
    assert by_label["Delta adapted checkpoint"].choices() == ["None", *titles]
    assert by_label["Delta enabled"].choices() == ["True", "False"]
    # The X/Y/Z UI snapshots its axes when built: ours are there, the hires axis only in txt2img.
    for runner, hires in ((host.scripts.scripts_txt2img, True), (host.scripts.scripts_img2img, False)):
        plot = next(s for s in runner.selectable_scripts if s.title() == "X/Y/Z plot")
        labels = [o.label for o in plot.current_axis_options]
        assert "Delta scale" in labels and ("Delta hires" in labels) == hires


def test_axis_values_go_into_a_fresh_dict_per_cell(host, monkeypatch):
    """The X/Y/Z script's own loop: `pc = copy(p)` per cell, x/y/z apply, process_images(pc)."""
    xyz = host.xyz_grid()
    args = webui("args")
    runner = host.scripts.scripts_txt2img
    plot = next(s for s in runner.selectable_scripts if s.title() == "X/Y/Z plot")
    labels = [o.label for o in plot.current_axis_options]
    seen = []

    def record(pc):
        seen.append((args.overrides_from_p(pc), pc.delta_sampling_overrides))
        return host.processing.Processed(pc, [], pc.seed, "")

    monkeypatch.setattr(xyz, "process_images", record)
    p = host.processing.StableDiffusionProcessingTxt2Img(prompt="a fox", steps=3, width=64, height=64, seed=1)
    shared = {"guidance": "cond"}
    p.delta_sampling_overrides = shared                       # e.g. left by a caller; must not be mutated
    plot.run(p, labels.index("Delta scale"), "0.5, 1.5", [], labels.index("Delta schedule"), "", ["constant", "cosine"],
             labels.index("Delta source checkpoint"), "", ["sd15.safetensors"],
             True, False, False, False, False, False, False, 0, False)
    got = sorted((o["scale"], o["schedule"]) for o, _ in seen)
    assert got == [(0.5, "constant"), (0.5, "cosine"), (1.5, "constant"), (1.5, "cosine")]
    assert all(o["guidance"] == "cond" and o["source_checkpoint"] == "sd15.safetensors" for o, _ in seen)
    dicts = [d for _, d in seen]
    assert len({id(d) for d in dicts}) == len(dicts) and all(d is not shared for d in dicts)
    assert p.delta_sampling_overrides == {"guidance": "cond"}

    # The same with plain copies of one p, the way cells share everything else.
    base = SimpleNamespace()
    scale = next(a for a in ds_axes(xyz) if a.label == "Delta scale")
    start = next(a for a in ds_axes(xyz) if a.label == "Delta start")
    cell1, cell2 = copy(base), copy(base)
    scale.apply(cell1, 1.5, [1.5, 2.0])
    start.apply(cell1, 0.2, [0.2])
    scale.apply(cell2, 2.0, [1.5, 2.0])
    assert cell1.delta_sampling_overrides == {"scale": 1.5, "start": 0.2}
    assert cell2.delta_sampling_overrides == {"scale": 2.0} and not hasattr(base, "delta_sampling_overrides")


@pytest.mark.parametrize("label, values, words", [
    ("Delta scale", [1.0, 20.0], ['X/Y/Z axis "Delta scale"', "20.0", "outside -10 to 10"]),
    ("Delta schedule", ["linear", "wobbly"], ['X/Y/Z axis "Delta schedule"', "'wobbly'", "constant, linear"]),
    ("Delta reuse", [0], ['X/Y/Z axis "Delta reuse"', "outside 1 to 10"]),
    ("Delta enabled", ["maybe"], ['X/Y/Z axis "Delta enabled"', "'maybe'"]),
    ("Delta source checkpoint", ["sd15.safetensors", "nope.safetensors"],
     ['X/Y/Z axis "Delta source checkpoint"', "'nope.safetensors'", "checkpoint list"]),
])
def test_axis_confirm_names_the_axis_and_value(host, label, values, words):
    axis = next(a for a in ds_axes(host.xyz_grid()) if a.label == label)
    with pytest.raises(SettingError) as err:
        axis.confirm(SimpleNamespace(), values)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_axis_apply_stores_checked_values(host):
    axes = {a.label: a for a in ds_axes(host.xyz_grid())}
    p = SimpleNamespace()
    axes["Delta enabled"].apply(p, "False", [])
    axes["Delta adapted checkpoint"].apply(p, "None", [])
    axes["Delta source checkpoint"].apply(p, "sd15", [])      # closest match -> the host's title
    axes["Delta guidance"].apply(p, "COND", [])
    axes["Delta reuse"].apply(p, 3, [])
    axes["Delta adapters"].apply(p, "<lora:a:1>, word", [])
    for name in ("Delta adapted checkpoint", "Delta source checkpoint", "Delta guidance", "Delta enabled"):
        axes[name].confirm(p, ["None"] if "adapted" in name else ["sd15.safetensors"] if "source" in name
                           else ["cond", "full"] if "guidance" in name else ["True", "False"])
    assert p.delta_sampling_overrides == {"enabled": False, "adapted_checkpoint": "", "source_checkpoint": "sd15.safetensors",
                                          "guidance": "cond", "reuse": 3, "adapters": "<lora:a:1>, word"}


# ---------------------------------------------------------------------------- the route

def _write_lora(path, keys_and_shapes, metadata=None):
    save_file({k: torch.zeros(s, dtype=torch.float16) for k, s in keys_and_shapes.items()}, str(path), metadata=metadata)
    return path


ATTN2_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"


def _files(handle):
    """An SD1 LoRA (attn2 to_k in 768), an SDXL one (te2 keys), one known only by kohya metadata,
    a file that is no adapter; a VAE-only file and a .ckpt among the checkpoints."""
    _write_lora(handle.lora_dir / "moxin.safetensors", {f"{ATTN2_K}.lora_down.weight": (4, 768),
                                                       f"{ATTN2_K}.lora_up.weight": (320, 4)})
    te2 = "lora_te2_text_model_encoder_layers_0_mlp_fc1"
    _write_lora(handle.lora_dir / "xl_style.safetensors", {f"{te2}.lora_down.weight": (4, 1280),
                                                          f"{te2}.lora_up.weight": (5120, 4)})
    attn1 = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"
    _write_lora(handle.lora_dir / "meta_xl.safetensors", {f"{attn1}.lora_down.weight": (4, 1280),
                                                         f"{attn1}.lora_up.weight": (1280, 4)},
                metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    _write_lora(handle.lora_dir / "notes.safetensors", {"some.other.tensor": (2, 2)})
    _write_lora(handle.ckpt_dir / "vae_only.safetensors", {"encoder.conv_in.weight": (4, 3, 3, 3)})
    torch.save({"state_dict": {}}, str(handle.ckpt_dir / "old.ckpt"))
    handle.sd_models.list_models()
    handle.networks().list_available_networks()


def test_route_lists_checkpoints_and_adapters_with_families(host):
    _files(host)
    host.start_app()
    route = host.app.find("GET", ROUTE)
    assert route.dependencies == []                        # no --api-auth
    got = host.call_route("GET", ROUTE)
    json.dumps(got)                                        # plain JSON
    families = {c["name"]: c["family"] for c in got["checkpoints"]}
    assert families == {"target.safetensors": "SD1.x", "sd15.safetensors": "SD1.x", "old.ckpt": None}
    adapters = {a["name"]: (a["family"], a["tag"]) for a in got["adapters"]}
    assert adapters == {"moxin": ("SD1.x", "<lora:moxin:1>"), "xl_style": ("SDXL", "<lora:xl_style:1>"),
                        "meta_xl": ("SDXL", "<lora:meta_xl:1>")}
    unusable = {(u["kind"], u["name"]): u["problem"] for u in got["unusable"]}
    assert set(unusable) == {("checkpoint", "vae_only.safetensors"), ("adapter", "notes")}
    assert "VAE" in unusable[("checkpoint", "vae_only.safetensors")]
    api = webui("api")
    assert ("moxin", "moxin (SD1.x)") in api.adapter_choices() and ("notes", "notes") in api.adapter_choices()
    assert host.shared.sd_model is None and not host.reports     # nothing was loaded


def test_route_families_are_cached_per_file_version(host):
    api = webui("api")
    path = _write_lora(host.lora_dir / "moxin.safetensors", {f"{ATTN2_K}.lora_down.weight": (4, 768)})
    api._adapter_family.cache_clear()
    assert api.adapter_family(path) == ("SD1.x", None)
    assert api.adapter_family(path) == ("SD1.x", None)
    assert api._adapter_family.cache_info().hits == 1
    _write_lora(path, {f"{ATTN2_K}.lora_down.weight": (4, 1024)})   # replaced: new size and mtime
    assert api.adapter_family(path) == ("SD2.x", None)
    # A damaged file is reported as unusable, not raised.
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    path.write_bytes(raw[:8 + n])                        # header kept, tensor data cut off
    family, problem = api.adapter_family(path)
    assert family is None and "the file holds only 0" in problem


def test_route_refresh_takes_the_queue_lock(host):
    host.start_app()
    (host.ckpt_dir / "new.safetensors").symlink_to((host.ckpt_dir / "sd15.safetensors").resolve())
    assert "new.safetensors" not in [c["name"] for c in host.call_route("GET", ROUTE)["checkpoints"]]
    result = {}
    lock = host.call_queue.queue_lock
    with lock:                                             # a generation is running
        worker = threading.Thread(target=lambda: result.update(host.call_route("GET", ROUTE, refresh=True)))
        worker.start()
        worker.join(0.3)
        assert worker.is_alive() and not result            # the refresh waits for it
    worker.join(10)
    assert "new.safetensors" in [c["name"] for c in result["checkpoints"]]


def test_route_respects_api_auth(host):
    from fastapi import HTTPException
    from fastapi.security import HTTPBasicCredentials
    host.shared.cmd_opts.api_auth = "alice:s3cret,bob:pw"
    host.start_app()
    assert len(host.app.find("GET", ROUTE).dependencies) == 1
    for credentials in (None, HTTPBasicCredentials("alice", "wrong"), HTTPBasicCredentials("eve", "pw")):
        with pytest.raises(HTTPException) as err:
            host.call_route("GET", ROUTE, credentials=credentials)
        assert err.value.status_code == 401
    for user, password in (("alice", "s3cret"), ("bob", "pw")):
        assert "checkpoints" in host.call_route("GET", ROUTE, credentials=HTTPBasicCredentials(user, password))


# ---------------------------------------------------------------------------- settings page

def test_options_defaults_registration_and_reading(a1111, caplog):  # noqa: F811
    options = webui("options")
    assert options.read_options() == options.WebuiOptions()      # before the section exists
    a1111.load_scripts(a1111.repo / "scripts" / "delta_sampling.py")
    a1111.create_ui()                                            # on_ui_settings
    opts = a1111.shared.opts
    defaults = options.WebuiOptions()
    for name in ("device", "dtype", "keep_loaded", "free_on_checkpoint_change", "vocab_path", "log_level",
                 "cuda_graphs"):
        info = opts.data_labels[options.option_key(name)]
        assert info.default == getattr(defaults, name) and info.section == options.SECTION
        assert info.category_id == "sd" and info.label
    assert defaults.keep_loaded is True and defaults.device == "auto" and defaults.dtype == "auto"
    assert options.read_options() == defaults

    opts.set(options.option_key("dtype"), "fp32")
    opts.set(options.option_key("device"), "cpu")
    opts.set(options.option_key("keep_loaded"), False)
    opts.set(options.option_key("vocab_path"), "  ~/vocab.txt.gz ")
    got = options.read_options()
    assert (got.dtype, got.device, got.keep_loaded) == ("fp32", "cpu", False)
    assert str(got.placement()) == "cpu fp32"
    assert got.vocab_paths()[0].name == "vocab.txt.gz" and "~" not in str(got.vocab_paths()[0])
    assert options.WebuiOptions().vocab_paths() == ()
    assert got.webui_root() is not None

    opts.data[options.option_key("dtype")] = "fp4"               # e.g. a hand-edited config.json
    with caplog.at_level(logging.WARNING, logger="delta-sampling"):
        assert options.read_options().dtype == "auto"
    assert "delta_sampling_dtype" in caplog.text and "fp4" in caplog.text
    opts.set(options.option_key("dtype"), "fp8")                 # the UNet's weights in 8 bits
    assert str(options.read_options().placement()) == "cpu fp32, fp8 UNet weights"
    opts.set(options.option_key("cuda_graphs"), False)
    assert options.read_options().cuda_graphs is False

    logger = logging.getLogger("delta-sampling")
    before = logger.level
    try:
        opts.set(options.option_key("log_level"), "DEBUG")       # the option's onchange
        assert logger.level == logging.DEBUG
    finally:
        logger.setLevel(before)


# Keyword arguments of `update()` in gradio 3.41.2 (gradio/components/{checkbox,dropdown,radio,
# textbox}.py), besides `value`. A1111's Settings page passes every option's component_args to it
# on each load (modules/ui_settings.py `get_value_for_setting`); gradio raises TypeError on others.
GRADIO_3_41_2_UPDATE_KEYS = {
    "Checkbox": {"label", "info", "show_label", "container", "scale", "min_width", "interactive", "visible"},
    "Dropdown": {"choices", "label", "info", "show_label", "container", "scale", "min_width", "interactive",
                 "placeholder", "visible"},
    "Radio": {"choices", "label", "info", "show_label", "container", "scale", "min_width", "interactive", "visible"},
    "Textbox": {"lines", "max_lines", "placeholder", "label", "info", "show_label", "container", "scale",
                "min_width", "visible", "interactive", "type", "text_align", "rtl", "show_copy_button", "autofocus"},
}


def test_settings_page_updates_only_with_keys_gradio_3_41_accepts(a1111, monkeypatch):  # noqa: F811
    options = webui("options")
    a1111.load_scripts(a1111.repo / "scripts" / "delta_sampling.py")
    a1111.create_ui()
    ui_settings = a1111.ui_settings
    opts = a1111.shared.opts
    keys = [options.option_key(f.name) for f in options.fields(options.WebuiOptions)]
    for key in keys:
        component = ui_settings.setting_component_class(key)
        update = ui_settings.get_value_for_setting(key)
        assert update["value"] == getattr(opts, key)
        extra = set(update) - {"value", "__type__"}
        assert extra <= GRADIO_3_41_2_UPDATE_KEYS[component.__name__], (key, extra)
        ui_settings.create_setting_component(key)                 # the constructor takes them too

    device = options.option_key("device")
    assert opts.data_labels[device].component.__name__ == "Dropdown"
    choices = ui_settings.get_value_for_setting(device)["choices"]
    assert choices[:2] == ["auto", "cpu"] and all(c in choices for c in ("auto", "cpu"))
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert ui_settings.get_value_for_setting(device)["choices"][:5] == ["auto", "cpu", "cuda", "cuda:0", "cuda:1"]
    opts.set(device, "cuda:3")                                   # saved on another machine
    assert options.read_options().device == "cuda:3"
    assert ui_settings.get_value_for_setting(device)["choices"][-1] == "cuda:3"
