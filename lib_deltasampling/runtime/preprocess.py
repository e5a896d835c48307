"""Control-image preprocessors: the host's when it has them, else a small built-in set.

Where the host has a preprocessor registry (Forge's built-in ControlNet, sd-webui-controlnet in
A1111), its preprocessors are offered and run through its public API (`webui/preprocessors.py`
adapts each to `HostPreprocessors`); a host preprocessor shadows a built-in one of the same name.
The built-in set needs no new dependency: none, invert, and canny through OpenCV, which every
WebUI installs; without it (the standalone runner on a bare Python) canny is refused with what to
do instead.

Thresholds and resolution follow sd-webui-controlnet's API: -1 means the preprocessor's own
default. The built-in ones work at the image's own size (resolution is a host preprocessor's).
"""

from __future__ import annotations

from typing import Any, Protocol

from ..errors import SettingError

PREPROCESSORS = ("none", "invert", "canny")   # built in
CANNY_LOW, CANNY_HIGH = 100, 200              # sd-webui-controlnet's canny sliders' defaults
DEFAULT = -1                                  # a threshold or resolution left to the preprocessor
SUBJECT = 'Delta Sampling "Control preprocessor" (control_preprocessor)'


class HostPreprocessors(Protocol):
    """The host's preprocessors (webui/preprocessors.py)."""

    source: str   # where they come from, for messages: "Forge's ControlNet", "sd-webui-controlnet"

    def names(self) -> list[str]:
        """The names that make a control image, in the host's order."""

    def run(self, pixels: Any, name: str, resolution: int, threshold_a: float, threshold_b: float) -> Any:
        """[H, W, 3] uint8 RGB -> the preprocessor's image (any size, 1, 3 or 4 channels)."""


def canonical(name: str) -> str:
    """A built-in name in its listed spelling ("None", "Canny" -> "none", "canny"); others unchanged."""
    word = name.strip()
    return word.lower() if word.lower() in PREPROCESSORS else word


def available(host: HostPreprocessors | None) -> list[str]:
    """What can be chosen: none first, then the host's, then the built-in ones it lacks."""
    names = ["none"] + [n for n in (host.names() if host else []) if canonical(n) != "none"]
    return names + [n for n in PREPROCESSORS if n not in names]


def preprocess(pixels: Any, name: str, *, resolution: int = DEFAULT, threshold_a: float = DEFAULT,
               threshold_b: float = DEFAULT, host: HostPreprocessors | None = None) -> Any:
    """[H, W, 3] uint8 numpy array -> the ControlNet's hint image, [h, w, 3] uint8. (numpy is imported
    here, not with the module: the settings module reads PREPROCESSORS at WebUI start-up.)"""
    import numpy as np

    name = canonical(name)
    if name == "none":
        return pixels
    if host is not None and name in host.names():
        try:
            out = host.run(pixels, name, resolution, threshold_a, threshold_b)
        except SettingError:
            raise
        except Exception as exc:   # a host preprocessor's own failure (a model it cannot download offline...)
            raise SettingError(SUBJECT, f"{host.source}'s preprocessor {name!r} failed: {type(exc).__name__}: "
                               f"{str(exc)[:300]}", "Choose another preprocessor, or upload a map made elsewhere "
                               "with the preprocessor set to none") from exc
        return hint_pixels(out, name)
    if name == "invert":              # sd-webui-controlnet "invert (from white bg & black line)"
        return 255 - pixels
    if name == "canny":
        try:
            import cv2
        except ImportError:
            raise SettingError(SUBJECT, "canny needs OpenCV, which is not installed here",
                               "pip install opencv-python-headless, or upload an edge map made elsewhere "
                               "with the preprocessor set to none") from None
        low = CANNY_LOW if threshold_a == DEFAULT else int(threshold_a)
        high = CANNY_HIGH if threshold_b == DEFAULT else int(threshold_b)
        edges = cv2.Canny(np.ascontiguousarray(pixels), low, high)   # on the RGB image, as there
        return np.repeat(edges[:, :, None], 3, axis=2)
    names = available(host)
    shown = ", ".join(names[:12]) + (f" ... ({len(names)} in all)" if len(names) > 12 else "")
    raise SettingError(SUBJECT, f"unknown preprocessor {name!r}" + (f" (not in {host.source})" if host else ""),
                       f"Use one of: {shown}")


def hint_pixels(image: Any, name: str) -> Any:
    """A host preprocessor's output as [H, W, 3] uint8; a clear error for one that makes no image
    (IP-Adapter, reference and inpaint preprocessors return embeddings or act while sampling)."""
    import numpy as np

    if not isinstance(image, np.ndarray) or image.ndim not in (2, 3) or image.size == 0 or \
            (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
        what = type(image).__name__ if not isinstance(image, np.ndarray) else f"an array of shape {list(image.shape)}"
        raise SettingError(SUBJECT, f"the preprocessor {name!r} gives {what}, not a control image (it serves "
                           "IP-Adapter, reference or inpainting in the host's ControlNet)",
                           "Choose a preprocessor that makes a map (canny, depth, lineart, openpose...)")
    if image.dtype != np.uint8:
        scale = 255.0 if image.dtype.kind == "f" and float(image.max(initial=0)) <= 1.0 else 1.0
        image = np.clip(np.rint(image.astype(np.float64) * scale), 0, 255).astype(np.uint8)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[2] == 4:         # over white, as the ControlNet extensions' HWC3 does
        alpha = image[:, :, 3:4].astype(np.float32) / 255
        image = np.clip(np.rint(image[:, :, :3] * alpha + 255 * (1 - alpha)), 0, 255).astype(np.uint8)
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image)
