"""The extension inside real Forge (main dfdcbab) and Forge Neo (2.26): CPU, full-size random SD1.5,
driven over HTTP and in headless Chromium. Every test runs in Forge, then in Neo (`forge_family`).

Besides pixel comparisons (as the A1111 suite), the probe extension (probe/) records, per model call,
the x and sigma the CFG callbacks got, the host's own CFG result and the value after every callback;
`test_delta_is_what_the_engine_computes` recomputes each call's corrected prediction with the engine,
outside the host, from the same files, and compares.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from browser import check_page_and_settings, paste_and_generate
from generations import (BAD_ARGUMENTS, SCALE_KEY, changed, check_bad_arguments, check_batch_with_and_prompts,
                         check_controlnet_on_the_source, check_convert_for_the_current_checkpoint,
                         check_host_preprocessors, check_img2img_on_off_and_scale_zero,
                         check_ip_adapter_on_the_source, check_png_info_round_trip, check_sampler, check_xyz_over_delta_scale, delta_keys, ds,
                         init_image)
from models import LORA, SOURCE

SAMPLERS = ["Euler", "DDIM", "PLMS", "UniPC", "DPM++ 2M"]


def engine_tokenizer(host):
    from lib_deltasampling.runtime.text.tokenizer import ClipTokenizer
    return ClipTokenizer.find((), webui_root=host.root)  # what the extension finds in that host


@pytest.fixture
def source_pair(forge_family, sd15_models):
    """The source pair as the extension builds it in Forge (CPU fp32, nearest timesteps), in this process.
    Freed after each test: its ~4 GB must not sit in this process while a host loads a refiner (the
    machine has 24 GB and Forge Neo alone takes up to 16 GB on CPU)."""
    from lib_deltasampling.runtime.adapters.apply import AdapterSet
    from lib_deltasampling.runtime.model import load_model
    from lib_deltasampling.runtime.pair import SourcePair
    from lib_deltasampling.runtime.placement import Placement

    cpu = Placement(torch.device("cpu"), torch.float32)
    source = load_model(sd15_models["source"], placement=cpu, tokenizer=engine_tokenizer(forge_family),
                        timestep_mode="nearest")
    adapters = AdapterSet(source.components(), source.family)
    adapters.add(sd15_models["lora"])
    yield SourcePair(source, adapters)
    source.release()


def engine_outputs(pair, recorded: dict, settings: dict) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(the engine's result, the host's result, the host's own CFG prediction) for every recorded model
    call of the first pass."""
    from lib_deltasampling.engine.sampler import DeltaSampler
    from lib_deltasampling.webui.args import settings_from_script_args
    from lib_deltasampling.webui.hooks_cfg import step_index

    params = settings_from_script_args([settings], source="API").to_params()
    first = recorded["passes"][0]
    engine = DeltaSampler.prepare(pair, params, prompts=recorded["prompts"],
                                  negative_prompts=recorded["negative_prompts"], adapted_prompts=recorded["prompts"],
                                  adapted_negative_prompts=recorded["negative_prompts"], steps=recorded["steps"],
                                  cfg_scale=recorded["cfg_scale"], target_scale=0.18215, noise=first["noise"],
                                  noise_multiplier=1.0, sigma0=1.0)
    out = []
    with engine.running():
        for call in recorded["calls"]:
            if call["pass"] != 0:
                continue
            step = step_index(call["step"], call["total_steps"], call["steps"])
            want = engine(call["x"], call["sigma"], step, call["steps"], call["before"])
            out.append((want, call["after"], call["before"]))
    return out


# ------------------------------------------------------------------ the page and its settings

def test_page_and_settings_load_without_errors(forge_host, chrome, artifacts):
    check_page_and_settings(chrome, forge_host, artifacts / f"{forge_host.flavour}-settings.png")


def test_accordion_paste_and_generate(forge_host, chrome, artifacts):
    paste_and_generate(chrome, forge_host, artifacts / f"{forge_host.flavour}-accordion.png")


# ------------------------------------------------------------------ txt2img: the delta, as the engine computes it

@pytest.mark.parametrize("sampler", ["Euler", "DDIM"])
def test_delta_is_what_the_engine_computes(forge_host, source_pair, sampler):
    """Every model call's corrected prediction equals the engine's, computed outside the host from the
    same x, sigma, step and host prediction: the hook saw the right rows, sigma and step. DDIM in the
    Forge family hands x and sigma already converted; a sigma converted twice (the bug this guards)
    would give the engine's value at another sigma."""
    settings = ds(scale=2.0)
    forge_host.txt2img(settings, prompt="a fox in the snow", negative_prompt="blurry", sampler_name=sampler,
                       steps=3, cfg_scale=6)
    recorded = forge_host.recorded()
    pairs = engine_outputs(source_pair, recorded, settings)
    assert len(pairs) == 3
    moves = []
    for want, got, before in pairs:
        moves.append((want - before).abs().max().item())
        error = (got - want).abs().max().item()
        # two processes, torch 2.14.1 in the host and 2.13 here: float32 rounding of the same math
        assert error <= 1e-3 * max(moves[-1], 1.0), (error, moves[-1])
    assert max(moves) > 0.5, moves                                 # the delta is not nothing
    sigmas = [c["sigma"][0].item() for c in recorded["calls"]]
    assert sigmas == sorted(sigmas, reverse=True) and 0.02 < sigmas[-1] and sigmas[0] < 14.7  # real sigmas


def test_txt2img_off_zero_and_on(forge_host):
    off = forge_host.txt2img(prompt="a fox in the snow")
    on = forge_host.txt2img(ds(), prompt="a fox in the snow")
    zero = forge_host.txt2img(ds(scale=0.0), prompt="a fox in the snow")
    again = forge_host.txt2img(ds(), prompt="a fox in the snow")
    assert changed(on.image(), off.image())
    assert np.array_equal(on.image(), again.image())
    assert np.array_equal(zero.image(), off.image())
    assert not delta_keys(off.params) and not delta_keys(zero.params)
    assert on.params[SCALE_KEY] == "2.0" and on.params["Delta source"] == SOURCE
    assert "Delta scale: 2.0" in on.infotexts[0]


def test_controlnet_on_the_source(forge_host):
    check_controlnet_on_the_source(forge_host)


def test_host_preprocessors(forge_host):
    # Forge's built-in ControlNet (modules_forge.shared.supported_preprocessors): its legacy invert
    check_host_preprocessors(forge_host, "invert (from white bg & black line)")


def test_convert_for_the_current_checkpoint(forge_host):
    check_convert_for_the_current_checkpoint(forge_host, forge_host.lora_dir)


def test_ip_adapter_on_the_source(forge_host):
    check_ip_adapter_on_the_source(forge_host)


@pytest.mark.parametrize("sampler", SAMPLERS[1:])
def test_samplers(forge_host, sampler):
    """DDIM, PLMS and UniPC once got almost no delta here (mean change ~1.6) while the infotext claimed one."""
    check_sampler(forge_host, sampler, min_change=10)


def test_png_info_round_trip(forge_host):
    check_png_info_round_trip(forge_host)


def test_img2img_on_off_and_scale_zero(forge_host):
    check_img2img_on_off_and_scale_zero(forge_host)


def test_inpainting_leaves_the_preserved_area_alone(forge_host):
    """Inpainting (left half kept): the host blends the kept area back before the after-CFG callback;
    the delta must be masked there too, and act in the repainted half."""
    from generations import png_of
    mask = np.zeros((64, 64, 3), np.uint8)
    mask[:, 32:] = 255                                           # white = repaint the right half
    common = dict(prompt="a fox", init_images=[init_image()], mask=png_of(mask), denoising_strength=0.75, steps=4,
                  inpainting_fill=1, inpaint_full_res=False)
    off = forge_host.img2img(**common)
    on = forge_host.img2img(ds(), **common)
    recorded = forge_host.recorded()
    assert on.params[SCALE_KEY] == "2.0" and changed(on.image()[:, 40:], off.image()[:, 40:])
    calls = [c for c in recorded["calls"] if c["mask"] is not None]
    assert len(calls) == 4
    for c in calls:
        kept = c["mask"].expand_as(c["after"])                   # the host's mask: 1 = keep
        assert (c["after"] - c["before"])[kept > 0.5].abs().max().item() == 0.0
        assert (c["after"] - c["before"])[kept < 0.5].abs().max().item() > 0.01


def test_refiner_switch_mid_sampling(forge_host):
    """A refiner (here the source checkpoint itself) takes over at half the steps: the host reloads its
    model mid-sampling; the delta goes on, and scale 0 stays off."""
    common = dict(prompt="a fox", steps=4, refiner_checkpoint=SOURCE, refiner_switch_at=0.5)
    off = forge_host.txt2img(**common)
    on = forge_host.txt2img(ds(), **common)
    recorded = forge_host.recorded()
    zero = forge_host.txt2img(ds(scale=0.0), **common)
    assert changed(on.image(), off.image()) and np.array_equal(zero.image(), off.image())
    assert "Refiner" in on.infotexts[0]
    calls = recorded["calls"]
    assert len(calls) == 4 and all(not torch.equal(c["after"], c["before"]) for c in calls)  # before and after the switch


def test_hires_pass_gets_the_delta_once(forge_host):
    """Forge calls process_before_every_sampling twice for the hires pass: one hook, one delta."""
    # Forge's API needs hr_additional_modules (processing.py sample: `'Use same choices' not in None`)
    # and takes hr_cfg 1 unless told (then the hires pass runs without uncond); Neo has no latent
    # upscalers (shared.latent_upscale_modes is empty) and, without model files, only "None"
    hires = dict(prompt="a fox", enable_hr=True, hr_scale=2, hr_upscaler="None", hr_second_pass_steps=4,
                 denoising_strength=0.7, hr_additional_modules=["Use same choices"], hr_cfg=5)
    off = forge_host.txt2img(**hires)
    both = forge_host.txt2img(ds(hires=True), **hires)
    recorded = forge_host.recorded()
    first_only = forge_host.txt2img(ds(hires=False), **hires)
    assert off.image().shape == (128, 128, 3)
    assert changed(both.image(), off.image()) and changed(first_only.image(), off.image())
    assert changed(both.image(), first_only.image())
    hires_calls = [c for c in recorded["calls"] if recorded["passes"][c["pass"]]["hires"]]
    assert hires_calls and all(not torch.equal(c["after"], c["before"]) for c in hires_calls)


def test_batch_with_and_prompts(forge_host):
    check_batch_with_and_prompts(forge_host)


def test_cfg_one_has_no_uncond_and_still_works(forge_host):
    """At CFG 1 the Forge family skips the uncond pass and hands the callbacks no uncond at all."""
    off = forge_host.txt2img(prompt="a fox", cfg_scale=1)
    on = forge_host.txt2img(ds(), prompt="a fox", cfg_scale=1)
    assert changed(on.image(), off.image()) and on.params[SCALE_KEY] == "2.0"


def test_xyz_plot_over_delta_scale(forge_host):
    check_xyz_over_delta_scale(forge_host)


def test_models_route(forge_host):
    body = forge_host.get("/delta-sampling/v1/models").json()
    names = {c["name"]: c["family"] for c in body["checkpoints"]}
    assert names[SOURCE] == "SD1.x"
    adapters = {a["name"]: a for a in body["adapters"]}
    assert adapters[LORA]["family"] == "SD1.x"


@pytest.mark.parametrize("args, words", BAD_ARGUMENTS)
def test_bad_arguments_get_422_and_the_host_keeps_working(forge_host, args, words):
    check_bad_arguments(forge_host, args, words)