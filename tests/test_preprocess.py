"""Control-image preprocessors (runtime/preprocess.py): the built-in set, a host's registry behind
`HostPreprocessors`, the conversion of a host's output to a hint image, and the settings that carry
a preprocessor's name and parameters. The real hosts' registries (Forge's built-in ControlNet) are
exercised in tests/hosts; here a registry written to the protocol records what it is asked.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lib_deltasampling.engine.infotext import format_parameters, parse_parameters, settings_from_infotext, settings_to_infotext
from lib_deltasampling.engine.settings import FIELD_BY_NAME, ControlImage, DeltaSettings
from lib_deltasampling.errors import SettingError
from lib_deltasampling.runtime.preprocess import PREPROCESSORS, available, canonical, hint_pixels, preprocess

PIXELS = np.random.default_rng(3).integers(0, 256, (6, 8, 3), dtype=np.uint8)


class Registry:
    """A host registry as the protocol defines it; `outputs` maps a name to what it returns."""

    source = "Test ControlNet"

    def __init__(self, outputs: dict) -> None:
        self.outputs = outputs
        self.calls: list[tuple] = []

    def names(self) -> list[str]:
        return ["None", *self.outputs]

    def run(self, pixels, name, resolution, threshold_a, threshold_b):
        self.calls.append((name, resolution, threshold_a, threshold_b))
        out = self.outputs[name]
        if isinstance(out, Exception):
            raise out
        return out(pixels) if callable(out) else out


def test_names_are_canonical_for_builtins_only():
    assert canonical("None") == "none" and canonical(" Canny ") == "canny"
    assert canonical("depth_midas") == "depth_midas"
    spec = FIELD_BY_NAME["control_preprocessor"]
    assert spec.check("INVERT") == "invert"
    assert spec.check("invert (from white bg & black line)") == "invert (from white bg & black line)"
    assert spec.check("") == spec.check("  ") == "none"          # a cleared dropdown
    with pytest.raises(SettingError, match="control_preprocessor"):
        spec.check("a\0b")


def test_available_lists_none_then_host_then_missing_builtins():
    host = Registry({"canny": PIXELS, "depth_midas": PIXELS})
    assert available(None) == list(PREPROCESSORS)
    assert available(host) == ["none", "canny", "depth_midas", "invert"]


def test_host_preprocessor_shadows_builtin_and_gets_parameters():
    edges = np.full((4, 4, 3), 7, np.uint8)
    host = Registry({"canny": edges})
    out = preprocess(PIXELS, "Canny", resolution=256, threshold_a=10.0, threshold_b=20.0, host=host)
    assert np.array_equal(out, edges)
    assert host.calls == [("canny", 256, 10.0, 20.0)]
    # a built-in the host lacks still works; none never reaches the host
    assert np.array_equal(preprocess(PIXELS, "invert", host=host), 255 - PIXELS)
    assert preprocess(PIXELS, "none", host=host) is PIXELS and len(host.calls) == 1


def test_host_failures_are_named_errors():
    host = Registry({"depth_midas": OSError("cannot download dpt_hybrid-midas-501f0c75.pt"),
                     "CLIP-ViT-H (IPAdapter)": {"image_embeds": torch.zeros(1, 4)},
                     "flat": np.zeros((0, 3, 3), np.uint8)})
    with pytest.raises(SettingError, match=r"Test ControlNet's preprocessor 'depth_midas' failed: OSError: cannot "
                                           r"download.*Choose another preprocessor"):
        preprocess(PIXELS, "depth_midas", host=host)
    with pytest.raises(SettingError, match=r"gives dict, not a control image"):
        preprocess(PIXELS, "CLIP-ViT-H (IPAdapter)", host=host)
    with pytest.raises(SettingError, match=r"an array of shape \[0, 3, 3\]"):
        preprocess(PIXELS, "flat", host=host)
    with pytest.raises(SettingError, match=r"unknown preprocessor 'lineart' \(not in Test ControlNet\).*"
                                           r"none, depth_midas, CLIP-ViT-H \(IPAdapter\), flat, invert, canny"):
        preprocess(PIXELS, "lineart", host=host)


def test_hint_pixels_conversions_by_hand():
    gray = np.array([[0, 128], [255, 9]], np.uint8)
    assert np.array_equal(hint_pixels(gray, "g"), np.repeat(gray[:, :, None], 3, axis=2))
    floats = np.array([[[0.0, 0.5, 1.0]]], np.float32)
    assert hint_pixels(floats, "f").tolist() == [[[0, 128, 255]]]          # 0..1 floats scaled, rounded
    rgba = np.array([[[200, 100, 0, 255], [200, 100, 0, 0], [200, 100, 0, 51]]], np.uint8)
    # over white: c * a + 255 * (1 - a), a = 51/255 = 0.2 -> 200*.2+204 = 244, 100*.2+204 = 224, 0+204
    assert hint_pixels(rgba, "a").tolist() == [[[200, 100, 0], [255, 255, 255], [244, 224, 204]]]


def test_hint_is_made_once_per_preprocessor_and_parameters():
    host = Registry({"blur": lambda p: p // 2})
    image = ControlImage.of(PIXELS, "image")
    first = image.tensor("blur", host, resolution=512, threshold_a=-1.0, threshold_b=-1.0)
    again = image.tensor("blur", host, resolution=512, threshold_a=-1.0, threshold_b=-1.0)
    assert torch.equal(first, again) and len(host.calls) == 1
    torch.testing.assert_close(first, torch.from_numpy(PIXELS // 2).permute(2, 0, 1)[None].float() / 255)
    image.tensor("blur", host, resolution=512, threshold_a=3.0, threshold_b=-1.0)
    assert len(host.calls) == 2


def test_parameters_round_trip_through_infotext_and_reach_the_host():
    settings = DeltaSettings.from_dict({"enabled": True, "source_checkpoint": "sd15", "control_model": "cn",
                                        "control_preprocessor": "lineart (realistic), ok", "control_resolution": 768,
                                        "control_threshold_a": 0.25, "control_threshold_b": 64})
    text = format_parameters("a house", "", settings_to_infotext(settings))
    assert 'Delta control preprocessor: "lineart (realistic), ok"' in text and "Delta control resolution: 768" in text
    back, warnings = settings_from_infotext(parse_parameters(text)[2])
    assert warnings == []
    for name in ("control_preprocessor", "control_resolution", "control_threshold_a", "control_threshold_b"):
        assert getattr(back, name) == getattr(settings, name), name
    # without a ControlNet the preprocessor's settings are not written
    assert "Delta control resolution" not in settings_to_infotext(settings.replace(control_model=""))
    host = Registry({"lineart (realistic), ok": PIXELS})
    image = ControlImage.of(PIXELS, "image")
    settings.replace(control_image=image).control_image.tensor(
        settings.control_preprocessor, host, resolution=settings.control_resolution,
        threshold_a=settings.control_threshold_a, threshold_b=settings.control_threshold_b)
    assert host.calls == [("lineart (realistic), ok", 768, 0.25, 64.0)]
    with pytest.raises(SettingError, match="control_resolution"):
        DeltaSettings.from_dict({"control_resolution": 5000})
