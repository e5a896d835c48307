"""Names are never paths: `..`, absolute paths, globs, links out of the model folders and NUL bytes
are refused in every entry point (runner, settings/API, pasted infotext, X/Y/Z, the WebUI)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from safetensors.torch import save_file

import factories
from lib_deltasampling.__main__ import main
from lib_deltasampling.engine.infotext import settings_from_infotext
from lib_deltasampling.engine.settings import DeltaSettings, field
from lib_deltasampling.errors import SettingError, UserError
from lib_deltasampling.runtime.names import find_named_file, path_problem
from test_adapters import build_adapter
from test_webui_a1111 import _asgi_post, ds, our_callbacks, setup_host

SUFFIXES = (".safetensors", ".pt")

# (name, words of the refusal): a path, a glob, a control character
BAD_ADAPTER_NAMES = [
    ("../outside/secret", "contains '..'"),
    ("/etc/passwd", "absolute path"),
    ("C:\\models\\x", "absolute path"),
    ("\\\\server\\share\\x", "absolute path"),
    ("sub/deep", "folder separator"),
    ("a\0b", "control character"),
    ("*", "no file *"),
    ("mox*", "no file mox*"),
    ("?oxin", "no file ?oxin"),
    ("[m]oxin", "no file [m]oxin"),
]


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    lora, outside = tmp_path / "lora", tmp_path / "outside"
    (lora / "sub").mkdir(parents=True)
    outside.mkdir()
    for path in (lora / "moxin.safetensors", lora / "style [v2].safetensors", lora / "sub" / "deep.pt",
                 outside / "secret.safetensors"):
        path.write_bytes(b"x")
    os.symlink(outside / "secret.safetensors", lora / "link.safetensors")
    os.symlink(outside, lora / "linked_folder")
    return {"lora": lora, "outside": outside}


@pytest.mark.parametrize("name, problem", [
    ("moxin", None), ("style [v2]", None), ("a..b", None), (".hidden", None),
    ("..", "contains '..'"), ("a/../b", "contains '..'"), ("a\\..\\b", "contains '..'"),
    ("/x", "is an absolute path"), ("\\x", "is an absolute path"), ("d:x", "is an absolute path"),
    ("a/b", "contains a folder separator"), ("tab\there", "contains a control character"),
])
def test_path_problem(name, problem):
    assert path_problem(name) == problem


def test_checkpoint_titles_may_have_a_subfolder_but_not_leave_the_folder():
    assert path_problem("sub/model.safetensors [abc123]", subfolders=True) is None
    assert path_problem("sub/../../model.safetensors", subfolders=True) == "contains '..'"


def test_exact_names_found_in_subfolders(folders):
    lora = folders["lora"]
    find = lambda name: find_named_file(name, [lora], SUFFIXES, "adapter", "fix")  # noqa: E731
    assert find("moxin") == lora / "moxin.safetensors"
    assert find("style [v2]") == lora / "style [v2].safetensors"  # glob characters are plain characters
    assert find("deep") == lora / "sub" / "deep.pt"


@pytest.mark.parametrize("name, words", BAD_ADAPTER_NAMES)
def test_bad_names_are_refused_by_the_folder_search(folders, name, words):
    with pytest.raises(UserError, match=words.replace("*", r"\*").replace("?", r"\?").replace("[", r"\[")):
        find_named_file(name, [folders["lora"]], SUFFIXES, "adapter", "fix")


def test_links_out_of_the_folder_are_refused(folders):
    with pytest.raises(UserError, match="links to .*outside the model folders"):
        find_named_file("link", [folders["lora"]], SUFFIXES, "adapter", "fix")
    with pytest.raises(UserError, match="no file secret"):  # a linked folder is not searched
        find_named_file("secret", [folders["lora"]], SUFFIXES, "adapter", "fix")
    # the same file is fine when its real folder is one of the model folders
    assert find_named_file("link", [folders["lora"], folders["outside"]], SUFFIXES, "adapter", "fix")


# ------------------------------------------------------------------ the runner

# (a drive letter's ':' splits a tag, and argv cannot hold NUL)
@pytest.mark.parametrize("name, words", [(n, w) for n, w in BAD_ADAPTER_NAMES if ":" not in n and "\0" not in n])
def test_runner_refuses_before_loading_anything(folders, tmp_path, capsys, name, words):
    empty = tmp_path / "empty.safetensors"  # loading it would fail with "the file is empty"
    empty.write_bytes(b"")
    code = main(["generate", "--target", str(empty), "--source", str(empty), "--lora-dir", str(folders["lora"]),
                 "--adapters", f"<lora:{name}:1>", "--out", str(tmp_path / "x.png"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and words in err and "empty" not in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


def test_runner_refuses_a_link_out_of_the_lora_folder(folders, tmp_path, capsys):
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    code = main(["generate", "--target", str(empty), "--source", str(empty), "--lora-dir", str(folders["lora"]),
                 "--adapters", "<lora:link:1>", "--quiet", "--out", str(tmp_path / "x.png")])
    assert code == 2 and "outside the model folders" in capsys.readouterr().err


# ------------------------------------------------------------------ settings: API, infotext, X/Y/Z

BAD_CHECKPOINTS = ["../source.safetensors", "/abs/source.safetensors", "C:\\source.safetensors",
                   "sub/../../x.safetensors", "a\0b.safetensors"]


@pytest.mark.parametrize("name", BAD_CHECKPOINTS)
def test_checkpoint_settings_are_names(name):
    for setting in ("source_checkpoint", "adapted_checkpoint"):
        with pytest.raises(SettingError, match=setting):
            DeltaSettings.from_dict({"enabled": True, setting: name}, source="API")
        settings, warnings = settings_from_infotext({"Delta scale": "2", field(setting).infotext: name})
        assert getattr(settings, setting) == "" and any(setting in w or "Delta" in w for w in warnings)


@pytest.mark.parametrize("name", BAD_CHECKPOINTS)
def test_xyz_checkpoint_axis_refuses_paths(name):
    from lib_deltasampling.webui.xyz import axis_value
    with pytest.raises(SettingError, match="X/Y/Z axis"):
        axis_value(field("source_checkpoint"), name)


# ------------------------------------------------------------------ the WebUI (A1111 stand-in)

def _outside_lora(a1111) -> Path:
    outside = a1111.root / "elsewhere"
    outside.mkdir(exist_ok=True)
    adapter, _ = build_adapter("sd1", "kohya", "lora", factories.checkpoint_tensors("sd1", seed=5))
    save_file(adapter, str(outside / "secret.safetensors"))
    os.symlink(outside / "secret.safetensors", a1111.lora_dir / "linked.safetensors")
    return outside


WEBUI_BAD = [("<lora:../elsewhere/secret:1>", "contains '..'"),
             (f"<lora:{'/' + 'tmp/secret'}:1>", "absolute path"),
             ("<lora:*:1>", "no file *"),
             ("<lora:linked:1>", "outside the model folders"),
             ("<lora:a\0b:1>", "control character")]


def test_webui_generation_refuses_bad_names_and_leaves_no_hook(a1111):
    setup_host(a1111)
    _outside_lora(a1111)
    for adapters, words in WEBUI_BAD:
        gen = a1111.txt2img(ds(adapters=adapters))
        assert gen.processed.images == [] and a1111.shared.state.interrupted, adapters
        assert any(words in c for c in gen.p.comments), (adapters, gen.p.comments)
        assert our_callbacks(a1111) == 0
    for name in BAD_CHECKPOINTS:
        gen = a1111.txt2img(ds(source_checkpoint=name))
        assert gen.processed.images == [] and any("source_checkpoint" in c for c in gen.p.comments), name


def test_webui_api_refuses_bad_names_with_422(a1111):
    from lib_deltasampling.webui.api import RequestCheck

    setup_host(a1111)
    _outside_lora(a1111)
    seen = []

    async def inner(scope, receive, send):
        seen.append(await receive())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    app = RequestCheck(inner)
    cases = [({"adapters": adapters}, words) for adapters, words in WEBUI_BAD]
    cases += [({"source_checkpoint": name}, "source_checkpoint") for name in BAD_CHECKPOINTS]
    for args, words in cases:
        payload = {"alwayson_scripts": {"Delta Sampling": {"args": [{"source_checkpoint": "source.safetensors",
                                                                      **args}]}}}
        status, body, _ = _asgi_post(app, "/sdapi/v1/txt2img", payload)
        assert status == 422 and words in json.loads(body)["detail"] and seen == [], (args, body)


def test_pasted_infotext_with_a_path_leaves_the_control_unchanged(a1111):
    from lib_deltasampling.webui.paste import PasteReader, _restore

    setup_host(a1111)
    restore = _restore(field("source_checkpoint"), PasteReader())
    for name in BAD_CHECKPOINTS:
        assert restore({"Delta scale": "2", "Delta source": name}) in (None, "")
