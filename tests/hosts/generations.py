"""What the real-host tests of every WebUI share: the Delta Sampling args, image comparisons, an
init image, the X/Y/Z script's args."""

from __future__ import annotations

import base64
import io
import re

import numpy as np

from models import LORA, SOURCE

SCALE_KEY = "Delta scale"


def ds(**kw) -> dict:
    return {"source_checkpoint": SOURCE, "adapters": f"<lora:{LORA}:1>", "scale": 2.0, **kw}


def changed(a: np.ndarray, b: np.ndarray) -> bool:
    return float(np.abs(a - b).mean()) > 1.0


def delta_keys(text_or_params) -> set[str]:
    keys = text_or_params.keys() if isinstance(text_or_params, dict) else re.findall(r"(Delta [\w -]+?):", text_or_params)
    return {k for k in keys if k.startswith("Delta")}


def png_of(rgb: np.ndarray) -> str:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def init_image() -> str:
    y, x = np.mgrid[0:64, 0:64]
    return png_of(np.stack([x * 4, y * 4, (x + y) * 2], axis=-1) % 256)


def xyz_args(host, mode: str, axis: str, values: str) -> tuple[str, list]:
    info = host.get("/sdapi/v1/script-info").json()
    xyz = next(s for s in info if s["name"] == "x/y/z plot" and s["is_img2img"] == (mode == "img2img"))
    choices = xyz["args"][0]["choices"]
    none = choices.index("Nothing")
    # xyz_grid.py (1.10) run(): x_type, x_values, x_values_dropdown, y..., z..., draw_legend,
    # include_lone_images, include_sub_grids, no_fixed_seeds, vary_seeds_x/y/z, [row_count: Neo 2.26,]
    # margin_size, csv_mode
    row_count = [0] if any(a.get("label") == "Row Count" for a in xyz["args"]) else []
    return xyz["name"], [choices.index(axis), values, [], none, "", [], none, "", [],
                         True, True, False, False, False, False, False, *row_count, 0, False]
