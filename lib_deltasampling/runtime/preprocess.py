"""The built-in control-image preprocessors: none, invert, canny (sd-webui-controlnet's defaults).

Kept to what needs no new dependency: canny uses OpenCV, which every WebUI installs; without it
(the standalone runner on a bare Python) canny is refused with what to do instead. For any other
kind of map (depth, pose, lineart...) upload the map a preprocessor made.
"""

from __future__ import annotations

from typing import Any

from ..errors import SettingError

PREPROCESSORS = ("none", "invert", "canny")
CANNY_LOW, CANNY_HIGH = 100, 200   # sd-webui-controlnet's canny sliders' defaults


def preprocess(pixels: Any, name: str) -> Any:
    """[H, W, 3] uint8 numpy array -> the ControlNet's hint image, [H, W, 3] uint8. (numpy is imported
    here, not with the module: the settings module reads PREPROCESSORS at WebUI start-up.)"""
    import numpy as np

    if name == "none":
        return pixels
    if name == "invert":              # sd-webui-controlnet "invert (from white bg & black line)"
        return 255 - pixels
    if name == "canny":
        try:
            import cv2
        except ImportError:
            raise SettingError('Delta Sampling "Control preprocessor" (control_preprocessor)',
                               "canny needs OpenCV, which is not installed here",
                               "pip install opencv-python-headless, or upload an edge map made elsewhere "
                               "with the preprocessor set to none") from None
        edges = cv2.Canny(np.ascontiguousarray(pixels), CANNY_LOW, CANNY_HIGH)   # on the RGB image, as there
        return np.repeat(edges[:, :, None], 3, axis=2)
    raise SettingError('Delta Sampling "Control preprocessor" (control_preprocessor)', f"unknown preprocessor {name!r}",
                       f"Use one of: {', '.join(PREPROCESSORS)}")
