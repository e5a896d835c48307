"""The WebUI's conversion job (webui/convert.py) apart from the host: names, one job at a time,
progress, cancel, failures kept in the status. The whole flow (host files, LoRA folder, the host
loading the result) runs in the real hosts (tests/hosts: check_convert_for_the_current_checkpoint)."""

from __future__ import annotations

import importlib
import threading
from pathlib import Path

import pytest

from lib_deltasampling.errors import SettingError, UserError


def convert_module():
    return importlib.import_module("lib_deltasampling.webui.convert")


def test_output_names():
    c = convert_module()
    assert c.output_name("style", Path("/m/ponyV6.safetensors"), "") == "style-for-ponyV6.safetensors"
    assert c.output_name("sub/style", Path("/m/x.ckpt"), "") == "style-for-x.safetensors"
    assert c.output_name("style", Path("x"), "mine.safetensors") == "mine.safetensors"
    for bad in ("../up", "a/b", "", "\0"):
        if bad:
            with pytest.raises(SettingError, match="not a plain file name"):
                c.output_name("style", Path("x"), bad)


@pytest.fixture
def fake_conversion(a1111, monkeypatch, tmp_path):  # the A1111 stand-in provides `modules`
    """plan() without a host, and a conversion that reports progress and waits to be released."""
    c = convert_module()
    state = importlib.import_module("lib_deltasampling.webui.state")
    monkeypatch.setitem(state.CONVERT_JOB, "job", None)
    release, calls = threading.Event(), []
    monkeypatch.setattr(c, "plan", lambda request: (tmp_path / "s", tmp_path / "t", tmp_path / "l",
                                                    tmp_path / "out.safetensors"))
    import lib_deltasampling.bake.convert as bake

    def fake_convert(source, target, lora, out, *, progress, should_stop, **kw):
        calls.append(kw)
        for i in range(3):
            progress(i, 3, f"layer{i}")
            if i == 1:
                while not (release.is_set() or should_stop()):
                    release.wait(0.01)
            if should_stop():
                raise UserError(str(out), "the conversion was interrupted", "Nothing was written")
        raise RuntimeError("boom")

    monkeypatch.setattr(bake, "convert_lora", fake_convert)
    return c, release, calls


def test_one_job_at_a_time_progress_and_cancel(fake_conversion):
    c, release, calls = fake_conversion
    request = c.ConvertRequest(lora="style", source_checkpoint="sd15")
    job = c.start(request)
    with pytest.raises(UserError, match="already running"):
        c.start(request)
    for _ in range(500):
        if job.done == 1:
            break
        threading.Event().wait(0.01)
    assert c.status_text().startswith("running (1/3 layers)")
    c.cancel()
    job.thread.join(5)
    assert job.state == "cancelled" and "interrupted" in job.message and job.file is None


def test_an_internal_failure_is_kept_in_the_status(fake_conversion):
    c, release, calls = fake_conversion
    release.set()
    job = c.start(c.ConvertRequest(lora="style", source_checkpoint="sd15", rank=16, threshold=0.5))
    job.thread.join(5)
    assert job.state == "failed" and "RuntimeError: boom" in job.message
    assert calls[0]["rank"] == 16 and calls[0]["threshold"] == 0.5
    c.start(c.ConvertRequest(lora="style", source_checkpoint="sd15")).thread.join(5)   # a new one may start
    assert len(calls) == 2


def test_route_body_is_checked_by_name_and_type():
    c = convert_module()
    assert c.request_from_json({"lora": "a", "source_checkpoint": "b", "rank": 8, "threshold": 1}) == \
        c.ConvertRequest(lora="a", source_checkpoint="b", rank=8, threshold=1)
    for body, words in (([], "JSON object"), ({"lora": "a"}, '"source_checkpoint": is missing'),
                        ({"lora": "a", "source_checkpoint": "b", "rnak": 1}, "unknown keys ['rnak']"),
                        ({"lora": "a", "source_checkpoint": "b", "rank": "8"}, '"rank": \'8\' has the wrong type'),
                        ({"lora": "a", "source_checkpoint": "b", "rank": True}, "wrong type")):
        with pytest.raises(SettingError, match=words.replace("[", r"\[").replace("]", r"\]")):
            c.request_from_json(body)
