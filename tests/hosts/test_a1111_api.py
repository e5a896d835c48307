"""The extension inside a real AUTOMATIC1111 1.10.1 (CPU, full-size random SD1.5), driven over its HTTP API.

Pixel comparisons: the same seed and settings give the same image in one process (CPU, deterministic
kernels), so "equal" is exact and "changed" means a visible difference (mean |diff| over one level).
"""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from generations import (BAD_ARGUMENTS, SCALE_KEY, changed, check_bad_arguments, check_batch_with_and_prompts,
                         check_controlnet_on_the_source, check_convert_for_the_current_checkpoint,
                         check_host_preprocessors, check_img2img_on_off_and_scale_zero,
                         check_ip_adapter_on_the_source, check_png_info_round_trip, check_sampler, check_xyz_over_delta_scale, delta_keys, ds)
from models import LORA, SOURCE, TARGET

# ------------------------------------------------------------------ txt2img: on, off, scale 0

def test_txt2img_delta_changes_the_image_and_scale_zero_is_off(real_a1111):
    off = real_a1111.txt2img(prompt="a fox in the snow")
    on = real_a1111.txt2img(ds(), prompt="a fox in the snow")
    zero = real_a1111.txt2img(ds(scale=0.0), prompt="a fox in the snow")
    again = real_a1111.txt2img(ds(), prompt="a fox in the snow")

    assert changed(on.image(), off.image())
    assert np.array_equal(on.image(), again.image())           # deterministic: the comparison means something
    assert np.array_equal(zero.image(), off.image())            # scale 0 = off, pixel for pixel
    assert not delta_keys(off.params) and not delta_keys(zero.params)  # nothing claims a delta it did not get
    params = on.params
    assert params[SCALE_KEY] == "2.0" and params["Delta source"] == SOURCE
    assert params["Delta adapters"] == f"<lora:{LORA}:1>"
    assert re.fullmatch(r"[0-9a-f]{10}", params["Delta source hash"])
    assert re.fullmatch(rf"{LORA}: [0-9a-f]{{12}}", params["Delta adapter hashes"])
    assert "Delta scale: 2.0" in on.infotexts[0]


def test_scale_zero_loads_nothing_and_runs_no_source(hosts):
    """A fresh host: a scale-0 generation must not load the source pair or run it."""
    host = hosts.get("sd15", TARGET, fresh=True)
    off = host.txt2img(prompt="a cat")
    zero = host.txt2img(ds(scale=0.0), prompt="a cat")
    assert np.array_equal(zero.image(), off.image())
    assert "loading source model" not in host.console_text()
    on = host.txt2img(ds(), prompt="a cat")
    assert "loading source model" in host.console_text()
    assert changed(on.image(), off.image())


def test_controlnet_on_the_source(real_a1111):
    check_controlnet_on_the_source(real_a1111)


def test_builtin_preprocessors_without_a_controlnet_extension(real_a1111):
    # A1111 with no ControlNet extension: the built-in set; "invert" is ours
    check_host_preprocessors(real_a1111, "invert")


# sd-webui-controlnet's tree is not in ../shared/hosts (nor on a package index): this runs when
# DS_CONTROLNET_EXTENSION names a checkout (Mikubill/sd-webui-controlnet) whose Python needs are met
CONTROLNET_EXTENSION = os.environ.get("DS_CONTROLNET_EXTENSION")


@pytest.mark.skipif(not CONTROLNET_EXTENSION, reason="set DS_CONTROLNET_EXTENSION to a sd-webui-controlnet checkout")
def test_sd_webui_controlnet_preprocessors(hosts):
    host = hosts.get("sd15-controlnet-extension", TARGET,
                     extensions=(("sd-webui-controlnet", Path(CONTROLNET_EXTENSION)),))
    try:
        check_host_preprocessors(host, "invert")   # its invert, run through its /controlnet/detect
    finally:
        hosts.stop()


def test_convert_for_the_current_checkpoint(real_a1111):
    check_convert_for_the_current_checkpoint(real_a1111, real_a1111.lora_dir)


def test_ip_adapter_on_the_source(real_a1111):
    check_ip_adapter_on_the_source(real_a1111)


def test_one_console_line_per_generation(real_a1111):
    before = real_a1111.console_text()
    real_a1111.txt2img(ds(), prompt="a fox")
    new = real_a1111.console_text()[len(before):]
    lines = [line for line in new.splitlines() if "Delta Sampling" in line and SOURCE in line]
    assert len(lines) == 1, new
    assert "scale 2" in lines[0] and LORA in lines[0]
    assert re.search(r"\d+(\.\d+)? ?s", lines[0])            # time spent in the source


def test_zero_adapter_weight_gives_exactly_the_plain_image(real_a1111):
    """A LoRA at weight 0: the adapted branch equals the base, so the delta is 0 at any scale and the
    hooked generation must give back the plain image (rows, step, CFG, bridge all line up). Not bit for
    bit: base and adapted rows sit at different places of one batched CPU forward, whose GEMM blocking
    may round them differently (~1e-7 relative, times scale 4); a wrong row or sigma would move the
    image by tens of levels, as the weight-1 comparison shows."""
    common = dict(prompt="a red house", sampler_name="DPM++ 2M", steps=3)
    off = real_a1111.txt2img(**common)
    null = real_a1111.txt2img(ds(adapters=f"<lora:{LORA}:0>", scale=4.0), **common)
    real = real_a1111.txt2img(ds(scale=4.0), **common)
    diff = np.abs(null.image() - off.image())
    assert diff.max() <= 2 and diff.mean() < 0.05, (diff.max(), diff.mean())
    assert np.abs(real.image() - off.image()).mean() > 20 * max(diff.mean(), 0.05)
    assert null.params[SCALE_KEY] == "4.0"                      # it did run


def test_hashes_come_from_the_host_cache(real_a1111, sd15_models, artifacts):
    """The infotext hashes are A1111's own (its hash cache, keyed by title and mtime), computed once:
    a second generation hashes nothing. Wall-clock times per generation go to artifacts/a1111-timing.txt."""
    import hashlib

    first = real_a1111.txt2img(ds(), prompt="a fox")
    n = len(real_a1111.console_text())
    times = {"DS on": [], "DS off": []}
    for _ in range(2):
        times["DS on"].append(real_a1111.txt2img(ds(), prompt="a fox").seconds)
        times["DS off"].append(real_a1111.txt2img(prompt="a fox").seconds)
    assert "Calculating sha256" not in real_a1111.console_text()[n:]

    sha = hashlib.sha256(sd15_models["source"].read_bytes()).hexdigest()
    assert first.params["Delta source hash"] == sha[:10]
    with open(sd15_models["lora"], "rb") as f:               # kohya's addnet hash: sha256 after the header
        f.seek(8 + int.from_bytes(f.read(8), "little"))
        addnet = hashlib.sha256(f.read()).hexdigest()
    assert first.params["Delta adapter hashes"] == f"{LORA}: {addnet[:12]}"
    # the host's own checkpoint list now carries the hash (CheckpointInfo.calculate_shorthash ran)
    listed = {m["title"].split(" [")[0]: m for m in real_a1111.get("/sdapi/v1/sd-models").json()}
    assert listed[SOURCE]["sha256"] == sha and listed[SOURCE]["hash"] == sha[:10]
    (artifacts / "a1111-timing.txt").write_text(
        "A1111 1.10.1, CPU fp32, SD1.5 target 64x64, 2 steps Euler, SD1.5 source + LoRA (models cached, hashes cached)\n"
        + "".join(f"{k}: {', '.join(f'{t:.2f} s' for t in v)}\n" for k, v in times.items()))


# ------------------------------------------------------------------ infotext round trip (PNG Info)

def test_png_info_round_trip(real_a1111):
    check_png_info_round_trip(real_a1111)


# ------------------------------------------------------------------ img2img, hires, batch + AND

def test_img2img_on_off_and_scale_zero(real_a1111):
    check_img2img_on_off_and_scale_zero(real_a1111)


def test_hires_pass_gets_the_delta_when_asked(real_a1111):
    hires = dict(prompt="a fox", enable_hr=True, hr_scale=2, hr_upscaler="Latent", hr_second_pass_steps=4,
                 denoising_strength=0.7)  # 2 steps at 0.6 would be one hires step: too little to see
    off = real_a1111.txt2img(**hires)
    both = real_a1111.txt2img(ds(hires=True), **hires)
    first_only = real_a1111.txt2img(ds(hires=False), **hires)
    assert off.image().shape == (128, 128, 3)
    assert changed(both.image(), off.image()) and changed(first_only.image(), off.image())
    assert changed(both.image(), first_only.image())           # the second pass got its own delta
    assert both.params["Delta hires"] == "True" and first_only.params["Delta hires"] == "False"


def test_batch_with_and_prompts(real_a1111):
    check_batch_with_and_prompts(real_a1111)


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M", "DDIM"])
def test_samplers(real_a1111, sampler):
    check_sampler(real_a1111, sampler)


# ------------------------------------------------------------------ X/Y/Z plot over the Delta scale

def test_xyz_plot_over_delta_scale(real_a1111):
    before = real_a1111.console_text().count("loading source model")
    check_xyz_over_delta_scale(real_a1111)
    assert real_a1111.console_text().count("loading source model") - before <= 1   # one load for the grid


# ------------------------------------------------------------------ the extension's route and the API checks

def test_models_route(real_a1111):
    body = real_a1111.get("/delta-sampling/v1/models").json()
    names = {c["name"]: c["family"] for c in body["checkpoints"]}
    assert names[SOURCE] == "SD1.x" and names[TARGET] == "SD1.x"
    adapters = {a["name"]: a for a in body["adapters"]}
    assert adapters[LORA]["family"] == "SD1.x" and adapters[LORA]["tag"] == f"<lora:{LORA}:1>"


@pytest.mark.parametrize("args, words", BAD_ARGUMENTS)
def test_bad_arguments_get_422_and_the_host_keeps_working(real_a1111, args, words):
    check_bad_arguments(real_a1111, args, words)


def test_interrupt_keeps_the_host_usable_and_leaves_no_hook(real_a1111):
    off_before = real_a1111.txt2img(prompt="a fox")
    done = {}

    def run():
        done["g"] = real_a1111.txt2img(ds(), prompt="a fox", steps=40)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        state = real_a1111.get("/sdapi/v1/progress?skip_current_image=true").json()["state"]
        if state.get("sampling_step", 0) >= 1:
            break
        time.sleep(0.2)
    assert real_a1111.post("/sdapi/v1/interrupt", {}).status == 200
    thread.join(300)
    assert not thread.is_alive()
    interrupted = done["g"]
    assert interrupted.params.get(SCALE_KEY) == "2.0"    # the steps that ran did get the delta
    off_after = real_a1111.txt2img(prompt="a fox")
    assert np.array_equal(off_after.image(), off_before.image())   # no callback left behind
