"""What the real-host tests of every WebUI share: the Delta Sampling args, image comparisons, an
init image, the X/Y/Z script's args."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np

from models import CLIP_VISION, CONTROLNET, IPADAPTER, LORA, SOURCE, TARGET

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
    """The X/Y/Z plot's script args: one axis, the cells returned with the grid. Built from the host's
    own argument list (/sdapi/v1/script-info), whose length differs: A1111 and Forge 18 (x, y, z
    type/values/dropdown, draw_legend, include_lone_images, ..., margin_size, csv_mode), Neo 2.26 adds
    row_count, reForge draw_individual_labels, skip_grid and items_per_grid."""
    info = host.get("/sdapi/v1/script-info").json()
    xyz = next(s for s in info if s["name"] == "x/y/z plot" and s["is_img2img"] == (mode == "img2img"))
    choices = xyz["args"][0]["choices"]
    none = choices.index("Nothing")
    args = [a.get("value") for a in xyz["args"]]
    args[0:9] = [choices.index(axis), values, [], none, "", [], none, "", []]
    for i, a in enumerate(xyz["args"]):
        if a.get("label") in ("Draw legend", "Include Sub Images"):
            args[i] = True
    return xyz["name"], args


# ------------------------------------------------------------------ checks every WebUI must pass (one body, many hosts)

def check_png_info_round_trip(host) -> None:
    on = host.txt2img(ds(start=0.0, end=0.5, schedule="linear", guidance="cond", reuse=2), prompt="a fox")
    result = host.post("/sdapi/v1/png-info", {"image": "data:image/png;base64," + on.png_b64()})
    assert result.status == 200
    info = result.json()
    assert "Delta scale: 2.0" in info["info"]
    params = info["parameters"]
    assert params["Delta scale"] in (2.0, "2.0") and params["Delta schedule"] == "linear"
    assert params["Delta guidance"] == "cond" and str(params["Delta reuse"]) == "2"
    assert params["Delta source"] == SOURCE


def check_img2img_on_off_and_scale_zero(host) -> None:
    common = dict(prompt="a fox", init_images=[init_image()], denoising_strength=0.75, steps=4)
    off = host.img2img(**common)
    on = host.img2img(ds(), **common)
    zero = host.img2img(ds(scale=0.0), **common)
    assert changed(on.image(), off.image())
    assert np.array_equal(zero.image(), off.image())
    assert on.params[SCALE_KEY] == "2.0" and not delta_keys(zero.params)


def check_batch_with_and_prompts(host) -> None:
    common = dict(prompt="a fox AND a cat :0.7", batch_size=2, seed=5)
    off = host.txt2img(**common)
    on = host.txt2img(ds(), **common)
    assert len(on.images()) == 2
    for a, b in zip(on.images(), off.images()):
        assert changed(a, b)
    alone = host.txt2img(ds(), prompt="a fox AND a cat :0.7", seed=6)
    # the second image of the batch is seed 6: equal to seed 6 alone (batch rows are independent)
    assert np.abs(alone.image() - on.image(1)).max() <= 2


def check_sampler(host, sampler: str, min_change: float = 1.0) -> None:
    common = dict(prompt="a fox", sampler_name=sampler, steps=3)
    off = host.txt2img(**common)
    on = host.txt2img(ds(), **common)
    zero = host.txt2img(ds(scale=0.0), **common)
    assert np.abs(on.image() - off.image()).mean() > min_change
    assert np.array_equal(zero.image(), off.image())
    assert on.info["sampler_name"] == sampler


def check_xyz_over_delta_scale(host) -> None:
    name, args = xyz_args(host, "txt2img", "Delta scale", "0, 1, 2")
    grid = host.generate("txt2img", ds(), prompt="a fox", script_name=name, script_args=args)
    images = grid.images()
    assert len(images) == 4                                    # the grid, then the three cells
    assert "Delta scale" not in grid.infotexts[1]              # the scale-0 cell: no delta, no claim
    assert "Delta scale: 1.0" in grid.infotexts[2] and "Delta scale: 2.0" in grid.infotexts[3]
    off = host.txt2img(prompt="a fox")
    assert np.array_equal(images[1], off.image())
    assert changed(images[2], images[1]) and changed(images[3], images[2])


def control_image(inverted: bool = False) -> str:
    """A hint-like image: white rings on black (black on white: `inverted`), 96x80 (cropped and
    resized to the source's size)."""
    y, x = np.mgrid[0:80, 0:96]
    rings = ((np.hypot(x - 48, y - 40) // 6) % 2 * 255).astype(np.uint8)
    return png_of(np.stack([255 - rings if inverted else rings] * 3, axis=-1))


BAD_ARGUMENTS = [
    (ds(source_checkpoint="nope.safetensors"), ["nope.safetensors", "checkpoint"]),
    (ds(adapters="<lora:missing:1>"), ["missing"]),
    (ds(scale="lots"), ["scale", "number"]),
    (ds(scale=1e9), ["scale"]),
    (ds(schedul="linear"), ["schedul"]),
    (ds(source_checkpoint="../../etc/passwd"), ["passwd", "contains '..'"]),
    # names are never paths or globs (tests/test_names.py has every entry point on the stand-in)
    (ds(adapters="<lora:../Lora/x:1>"), ["contains '..'", "not a path"]),
    (ds(adapters="<lora:/etc/passwd:1>"), ["absolute path"]),
    (ds(adapters="<lora:*:1>"), ["<lora:*>"]),
    (ds(adapters="<lora:a\0b:1>"), ["control character"]),
    (ds(control_model=CONTROLNET), ["control_image", "no control image"]),
    (ds(control_model=CONTROLNET, control_image="not an image"), ["control_image", "base64"]),
    (ds(control_model="no-such-controlnet", control_image=control_image()), ["no-such-controlnet", "ControlNet"]),
    (ds(ip_adapter=IPADAPTER, ip_image=control_image()), ["ip_encoder", "CLIP vision"]),
]


def check_controlnet_on_the_source(host) -> None:
    """A ControlNet on the adapted source changes the image; its settings and hashes are in the
    infotext (the image's, never the image); weight 0 gives exactly the image without it."""
    from lib_deltasampling.engine.settings import ControlImage

    image = control_image()
    plain = host.txt2img(ds(), prompt="a house")
    on = host.txt2img(ds(control_model=CONTROLNET, control_image=image, control_weight=1.5), prompt="a house")
    zero = host.txt2img(ds(control_model=CONTROLNET, control_image=image, control_weight=0.0), prompt="a house")
    assert changed(on.image(), plain.image())
    assert np.array_equal(zero.image(), plain.image())
    params = on.params
    assert params["Delta control"] == CONTROLNET and params["Delta control weight"] == "1.5"
    assert params["Delta control image hash"] == ControlImage.of(image, "test").short_hash
    assert re.fullmatch(r"[0-9a-f]{10}", params["Delta control hash"])
    assert "Delta control" not in plain.infotexts[0]
    assert image[:40] not in on.infotexts[0]
    # canny, with the host's own OpenCV: edges of the rings, not the rings
    canny = host.txt2img(ds(control_model=CONTROLNET, control_image=image, control_weight=1.5,
                            control_preprocessor="canny"), prompt="a house")
    assert canny.params["Delta control preprocessor"] == "canny"
    assert changed(canny.image(), plain.image()) and not np.array_equal(canny.image(), on.image())


def check_host_preprocessors(host, invert_name: str) -> None:
    """The host ControlNet's preprocessors run from the accordion, through its own interface: its
    invert (255 - x at the image's size; `invert_name` in its list) on the rings gives exactly the
    image of the inverted rings given as they are; the thresholds reach its canny; a name it lacks
    is refused before anything runs."""
    common = dict(control_model=CONTROLNET, control_image=control_image(), control_weight=1.5)
    theirs = host.txt2img(ds(**common, control_preprocessor=invert_name), prompt="a house")
    by_hand = host.txt2img(ds(**{**common, "control_image": control_image(inverted=True)}), prompt="a house")
    as_is = host.txt2img(ds(**common), prompt="a house")
    # (a random ControlNet tells the rings from the inverted rings only slightly: not equal, not "changed")
    assert np.array_equal(theirs.image(), by_hand.image()) and not np.array_equal(theirs.image(), as_is.image())
    assert theirs.params["Delta control preprocessor"] == invert_name
    edges = host.txt2img(ds(**common, control_preprocessor="canny"), prompt="a house")
    # thresholds above any 3x3 Sobel magnitude of 8-bit pixels (<= 4 * 255 per axis): no edge at all
    few_edges = host.txt2img(ds(**common, control_preprocessor="canny", control_threshold_a=2100,
                                control_threshold_b=2200, control_resolution=64), prompt="a house")
    assert not np.array_equal(edges.image(), as_is.image()) and not np.array_equal(few_edges.image(), edges.image())
    assert few_edges.params["Delta control threshold A"] == "2100.0"
    assert few_edges.params["Delta control resolution"] == "64"
    check_bad_arguments(host, ds(**common, control_preprocessor="no_such_map"),
                        ["control_preprocessor", "no_such_map", "not a preprocessor of this WebUI", "use one of: none, "])


def check_convert_for_the_current_checkpoint(host, lora_dir) -> None:
    """The WebUI's conversion job (POST /delta-sampling/v1/convert): a LoRA made for the source is
    converted for the current checkpoint in the background, written into the LoRA folder, listed by
    the host, and applied by the host's own LoRA loader; a second run without overwrite is refused."""
    import time

    import models
    lora = models.write_lora(lora_dir / "dsconvert-small.safetensors", seed=11, every=11, strength=3.0)
    converted = lora_dir / f"dsconvert-small-for-{Path(TARGET).stem}.safetensors"   # its name; folder: the host's
    try:
        started = host.post("/delta-sampling/v1/convert", {"lora": "dsconvert-small", "source_checkpoint": SOURCE})
        assert started.status == 202, started.body[:500]
        deadline = time.monotonic() + 600
        while (state := host.get("/delta-sampling/v1/convert").json())["state"] == "running":
            assert time.monotonic() < deadline, state
            time.sleep(1)
        assert state["state"] == "done" and Path(state["file"]).name == converted.name, state
        converted = Path(state["file"])      # the WebUI's first LoRA folder (Neo: its own models/Lora)
        assert "Use it as <lora:dsconvert-small-for-" in state["message"]
        again = host.post("/delta-sampling/v1/convert", {"lora": "dsconvert-small", "source_checkpoint": SOURCE})
        assert again.status == 422 and "exists" in again.body.decode()
        missing = host.post("/delta-sampling/v1/convert", {"lora": "no-such-lora", "source_checkpoint": SOURCE})
        assert missing.status == 422 and "no-such-lora" in missing.body.decode()
        host.post("/sdapi/v1/refresh-loras", {})
        assert converted.stem in {entry["name"] for entry in host.get("/sdapi/v1/loras").json()}
        plain = host.txt2img(prompt="a house")
        with_lora = host.txt2img(prompt=f"a house <lora:{converted.stem}:1>")
        assert not np.array_equal(plain.image(), with_lora.image())
    finally:
        for path in (lora, converted):
            path.unlink(missing_ok=True)


def check_ip_adapter_on_the_source(host) -> None:
    """An IP-Adapter on the adapted source changes the image; weight 0 gives exactly the image without it."""
    from lib_deltasampling.engine.settings import ControlImage

    image = init_image()
    ip = dict(ip_adapter=IPADAPTER, ip_encoder=CLIP_VISION, ip_image=image)
    plain = host.txt2img(ds(), prompt="a house")
    on = host.txt2img(ds(**ip, ip_weight=1.5), prompt="a house")
    zero = host.txt2img(ds(**ip, ip_weight=0.0), prompt="a house")
    assert changed(on.image(), plain.image())
    assert np.array_equal(zero.image(), plain.image())
    params = on.params
    assert params["Delta IP-Adapter"] == IPADAPTER and params["Delta IP-Adapter encoder"] == CLIP_VISION
    assert params["Delta IP-Adapter image hash"] == ControlImage.of(image, "test").short_hash
    assert re.fullmatch(r"[0-9a-f]{10}", params["Delta IP-Adapter hash"])
    assert "Delta IP-Adapter" not in plain.infotexts[0]


def check_bad_arguments(host, args: dict, words: list[str]) -> None:
    """HTTP 422 naming the setting, and the host keeps working."""
    result = host.post("/sdapi/v1/txt2img", {"prompt": "x", "steps": 1, "width": 64, "height": 64,
                                             "alwayson_scripts": {"Delta Sampling": {"args": [args]}}})
    assert result.status == 422, result.body[:500]
    text = result.body.decode().lower()
    for word in words:
        assert word.lower() in text, text
    assert host.txt2img(prompt="x", steps=1).images()
