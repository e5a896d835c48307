"""The adapters to the hosts' preprocessor registries (webui/preprocessors.py), against the
interfaces as the hosts define them:

- Forge's `modules_forge.shared.supported_preprocessors`: name -> Preprocessor, called as
  `p(input_image=, resolution=, slider_1=, slider_2=)`, sliders described by
  `slider_N.gradio_update_kwargs` (modules_forge/supported_preprocessor.py);
- sd-webui-controlnet's `external_code.get_modules()` / `get_modules_detail()` and its documented
  HTTP API `POST /controlnet/detect` (controlnet_module, controlnet_input_images as base64,
  controlnet_processor_res, controlnet_threshold_a/b; answers {"images": [base64 PNG]}).

Registries written to those interfaces stand in here; the real ones run in tests/hosts
(Forge and Forge Neo always, sd-webui-controlnet when DS_CONTROLNET_EXTENSION names a checkout).
"""

from __future__ import annotations

import base64
import importlib
import io
from types import SimpleNamespace

import numpy as np
import pytest

from lib_deltasampling.errors import SettingError
from lib_deltasampling.runtime.preprocess import preprocess

PIXELS_SEED = 5


class _Fresh:
    """The webui modules as loaded now (other tests' fixtures purge and re-import them)."""

    def __getattr__(self, name):
        return getattr(importlib.import_module("lib_deltasampling.webui.preprocessors"), name)


pre = _Fresh()


def host_app() -> dict:
    return importlib.import_module("lib_deltasampling.webui.state").HOST_APP

PIXELS = np.random.default_rng(PIXELS_SEED).integers(0, 256, (5, 7, 3), dtype=np.uint8)


def slider(label: str, value: float, visible: bool = True) -> SimpleNamespace:
    return SimpleNamespace(gradio_update_kwargs=dict(minimum=0, maximum=255, step=1, label=label, value=value,
                                                     visible=visible))


class ForgePreprocessor:
    """Forge's Preprocessor interface: name, tags, sorting_priority, sliders, __call__."""

    def __init__(self, name, tags=(), priority=0, s1=None, s2=None, resolution=True):
        self.name, self.tags, self.sorting_priority = name, list(tags), priority
        self.slider_resolution = slider("Resolution", 512, visible=resolution)
        self.slider_1 = s1 or slider("Parameter 1", 0.5, visible=False)
        self.slider_2 = s2 or slider("Parameter 2", 0.5, visible=False)
        self.calls = []

    def __call__(self, input_image, resolution, slider_1=None, slider_2=None, slider_3=None, **kwargs):
        self.calls.append((resolution, slider_1, slider_2))
        return 255 - input_image


def forge_registry() -> dict:
    items = [ForgePreprocessor("None", priority=10, resolution=False),
             ForgePreprocessor("canny", ["Canny"], 100, slider("Low Threshold", 100), slider("High Threshold", 200)),
             ForgePreprocessor("depth_midas", ["Depth"]),
             ForgePreprocessor("CLIP-ViT-H (IPAdapter)", ["IP-Adapter"], resolution=False),
             ForgePreprocessor("reference_only", ["Reference"]),
             ForgePreprocessor("inpaint_only", ["Inpaint"]),
             ForgePreprocessor("InsightFace (InstantID)", ["Instant-ID"])]
    return {p.name: p for p in items}


def test_forge_registry_is_found_and_lists_only_map_makers_in_its_order():
    registry = forge_registry()
    host = pre.host_preprocessors({"modules_forge.shared": SimpleNamespace(supported_preprocessors=registry)})
    assert isinstance(host, pre.ForgePreprocessors)
    assert host.names() == ["canny", "None", "depth_midas"]      # sorting_priority high first, then by name
    assert pre.host_preprocessors({}) is None
    assert pre.host_preprocessors({"modules_forge.shared": SimpleNamespace(supported_preprocessors={})}) is None


def test_forge_call_takes_slider_defaults_for_minus_one():
    registry = forge_registry()
    host = pre.ForgePreprocessors(registry)
    out = preprocess(PIXELS, "canny", host=host)                   # every parameter -1
    assert np.array_equal(out, 255 - PIXELS)
    assert registry["canny"].calls == [(512, 100, 200)]
    preprocess(PIXELS, "canny", resolution=256, threshold_a=7.0, threshold_b=-1, host=host)
    assert registry["canny"].calls[-1] == (256, 7.0, 200)
    assert host.labels("canny") == ("Resolution", "Low Threshold", "High Threshold")
    assert host.labels("depth_midas") == ("Resolution", None, None)


def test_builtin_labels_without_a_host(monkeypatch):
    module = importlib.import_module("lib_deltasampling.webui.preprocessors")
    monkeypatch.setattr(module, "host_preprocessors", lambda modules=None: None)
    assert pre.preprocessor_choices() == ["none", "invert", "canny"]
    assert pre.preprocessor_labels("canny") == (None, "Canny low threshold", "Canny high threshold")
    assert pre.preprocessor_labels("invert") == (None, None, None)
    assert pre.preprocessor_problem("canny") is None
    problem = pre.preprocessor_problem("depth_midas")
    assert "control_preprocessor" in problem and "'depth_midas'" in problem and "none, invert, canny" in problem


class ExternalCode:
    """sd-webui-controlnet's external_code: get_modules, get_modules_detail (sliders as api_json)."""

    @staticmethod
    def get_modules(alias_names: bool = False):
        return ["none", "invert", "binary", "ip-adapter_clip_sd15", "inpaint_only", "reference_only"]

    @staticmethod
    def get_modules_detail(alias_names: bool = False):
        return {"binary": {"model_free": True, "sliders": [
            {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8},
            {"name": "Binary threshold", "value": 0, "min": 0, "max": 255, "step": 1}]},
            "invert": {"model_free": True, "sliders": []}}


def detect_app(calls: list, answer=None):
    """A FastAPI-like app whose router holds sd-webui-controlnet's detect route (async, the API's
    parameter names); it inverts the image as the extension's invert does."""
    from PIL import Image

    async def detect(controlnet_module="none", controlnet_input_images=(), controlnet_processor_res=-1,
                     controlnet_threshold_a=-1, controlnet_threshold_b=-1, controlnet_masks=(), low_vram=False):
        calls.append((controlnet_module, controlnet_processor_res, controlnet_threshold_a, controlnet_threshold_b))
        if answer is not None:
            return answer
        pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(controlnet_input_images[0]))).convert("RGB"))
        out = io.BytesIO()
        Image.fromarray(255 - pixels).save(out, format="PNG")
        # bytes, as A1111's encode_pil_to_base64 returns them to the route (FastAPI makes them text)
        return {"images": [base64.b64encode(out.getvalue())], "info": "Success"}

    routes = [SimpleNamespace(path="/sdapi/v1/txt2img", methods={"POST"}, endpoint=None),
              SimpleNamespace(path=pre.DETECT_ROUTE, methods={"POST"}, endpoint=detect)]
    return SimpleNamespace(router=SimpleNamespace(routes=routes))


def test_sd_webui_controlnet_lists_by_external_code_and_runs_through_detect(monkeypatch):
    pytest.importorskip("PIL")
    host = pre.host_preprocessors({"internal_controlnet.external_code": ExternalCode})
    assert isinstance(host, pre.ControlNetExtensionPreprocessors)
    assert host.names() == ["none", "invert", "binary"]
    assert host.labels("binary") == ("Resolution", "Binary threshold", None)
    calls: list = []
    monkeypatch.setitem(host_app(), "app", detect_app(calls))
    out = preprocess(PIXELS, "binary", resolution=-1, threshold_a=12.0, host=host)
    assert np.array_equal(out, 255 - PIXELS) and calls == [("binary", -1, 12.0, -1.0)]


def test_sd_webui_controlnet_problems_are_named(monkeypatch):
    host = pre.ControlNetExtensionPreprocessors(ExternalCode)
    monkeypatch.setitem(host_app(), "app", SimpleNamespace(router=SimpleNamespace(routes=[])))
    with pytest.raises(SettingError, match=r"sd-webui-controlnet's preprocessor 'binary' failed: RuntimeError: its "
                                           r"/controlnet/detect route is not on the WebUI's app"):
        preprocess(PIXELS, "binary", host=host)
    monkeypatch.setitem(host_app(), "app", detect_app([], answer={"tensor": "AAAA", "info": "Success"}))
    with pytest.raises(SettingError, match="gives str, not a control image"):
        preprocess(PIXELS, "binary", host=host)
