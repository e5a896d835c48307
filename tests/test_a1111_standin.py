"""Tests OF the A1111 1.10.1 stand-in (tests/a1111): that it behaves as the real host does.

Expectations come from A1111 v1.10.1's source (modules/sd_samplers_cfg_denoiser.py,
processing.py, scripts.py, script_callbacks.py, infotext_utils.py, api/api.py) as summarised
in /work/shared/host-notes/a1111.md, and from hand computations (CFG combine, row layout),
and from the runtime model itself (the inner model's x0 must be the runtime denoiser's).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# The toy scripts here put a tooltip on InputAccordion on purpose (gradio 3.41 warns about it, and so
# does the stand-in; test_ui_ids_tooltips_and_paste covers that), so the warning is not news here.
pytestmark = pytest.mark.filterwarnings("ignore:You have unused kwarg parameters in Accordion")

RECORDER = '''
import gradio as gr
from modules import scripts
from modules.ui_components import InputAccordion

CALLS = []


class Recorder(scripts.Script):
    def title(self):
        return "Delta Recorder"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        with InputAccordion(False, label="Recorder", elem_id=self.elem_id("enable"), tooltip="tip") as enable:
            strength = gr.Slider(minimum=0.0, maximum=2.0, value=0.5, step=0.1, label="Strength",
                                 elem_id=self.elem_id("strength"), tooltip="how strong")
        self.infotext_fields = [(enable, lambda d: "Recorder strength" in d), (strength, "Recorder strength")]
        return [enable, strength]

    def _rec(self, name, p, args, **kw):
        CALLS.append((name, args, kw, p))

    def setup(self, p, *args):
        self._rec("setup", p, args)

    def before_process(self, p, *args):
        self._rec("before_process", p, args)

    def process(self, p, *args):
        self._rec("process", p, args, sampler=p.sampler)
        if args[0]:
            p.extra_generation_params["Recorder strength"] = args[1]

    def before_process_batch(self, p, *args, **kw):
        self._rec("before_process_batch", p, args, prompts=list(kw["prompts"]))

    def after_extra_networks_activate(self, p, *args, **kw):
        self._rec("after_extra_networks_activate", p, args, hr=p.is_hr_pass)

    def process_batch(self, p, *args, **kw):
        self._rec("process_batch", p, args, prompts=list(p.prompts), all_prompts=list(p.all_prompts),
                  batch_number=kw["batch_number"], c=p.c)

    def process_before_every_sampling(self, p, *args, **kw):
        self._rec("process_before_every_sampling", p, args, x=kw["x"].shape, hr=p.is_hr_pass,
                  noise=kw["noise"], c=kw["c"], uc=kw["uc"], sampler=p.sampler)

    def before_hr(self, p, *args):
        self._rec("before_hr", p, args)

    def post_sample(self, p, ps, *args):
        self._rec("post_sample", p, args)

    def postprocess_batch(self, p, *args, **kw):
        self._rec("postprocess_batch", p, args, images=kw["images"].shape)

    def postprocess_batch_list(self, p, pp, *args, **kw):
        self._rec("postprocess_batch_list", p, args)

    def postprocess_image(self, p, pp, *args):
        self._rec("postprocess_image", p, args)

    def postprocess(self, p, processed, *args):
        self._rec("postprocess", p, args)


class Broken(scripts.Script):
    def title(self):
        return "Broken"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        return [gr.Checkbox(True, label="Broken on")]

    def process(self, p, *args):
        raise ValueError("boom in process")
'''


def load_recorder(a1111, tmp_path: Path):
    ext = tmp_path / "ext-recorder"
    (ext / "scripts").mkdir(parents=True)
    path = ext / "scripts" / "recorder.py"
    path.write_text(RECORDER)
    scripts = a1111.load_scripts(path, extension_dir=ext, extension_name="ext-recorder")
    a1111.create_ui()
    module = next(x.module for x in scripts.scripts_data if x.script_class.__name__ == "Recorder")
    return module.CALLS


def capture(a1111):
    """Register the three CFG callbacks; return the list they append to."""
    cb = a1111.script_callbacks
    seen = []
    cb.on_cfg_denoiser(lambda prm: seen.append(("denoiser", prm, prm.x.clone(), prm.sigma.clone(), prm.denoiser.step,
                                                prm.denoiser.total_steps, prm.sampling_step)))
    cb.on_cfg_denoised(lambda prm: seen.append(("denoised", prm, prm.x.clone())))
    cb.on_cfg_after_cfg(lambda prm: seen.append(("after", prm, prm.x.clone())))
    return seen


def by_kind(seen, kind):
    return [s for s in seen if s[0] == kind]


# ---------------------------------------------------------------------------- CFG denoiser


def test_cfg_row_layout_with_and_prompts_and_combine(a1111):
    """§2.3: cond rows (one per AND sub-prompt, grouped per image) then B uncond rows; the
    callback sees text_cond with sum(repeats) rows and text_uncond with B rows; combine is
    u + sum_k w_k * scale * (c_k - u); the inner model is the runtime denoiser."""
    a1111.add_checkpoint("target.safetensors", "sd1")
    seen = capture(a1111)
    gen = a1111.txt2img(prompt=["a fox AND a dog:0.5", "a cat"], negative_prompt=["blurry", "dark"], batch_size=2,
                        cfg_scale=4.0, steps=3)
    assert a1111.reports == []
    den, dnd, aft = by_kind(seen, "denoiser"), by_kind(seen, "denoised"), by_kind(seen, "after")
    assert len(den) == len(dnd) == len(aft) == 3
    source = a1111.shared.sd_model.source
    for (_, prm, x_in, sigma_in, step, total, sampling_step), (_, _, x_out), (_, _, after) in zip(den, dnd, aft):
        assert x_in.shape[0] == 5 and prm.text_cond.shape[0] == 3 and prm.text_uncond.shape[0] == 2
        # rows [x0, x0, x1 | x0, x1]
        assert torch.equal(x_in[0], x_in[1]) and torch.equal(x_in[0], x_in[3]) and torch.equal(x_in[2], x_in[4])
        assert not torch.equal(x_in[0], x_in[2])
        assert torch.equal(sigma_in, sigma_in[:1].expand(5))
        assert prm.denoiser.p is gen.p and total == 3
        # text rows: sub-prompts in image order, then the negatives
        expect_c = source.encode(["a fox", "a dog", "a cat"], width=64, height=64)["context"]
        expect_u = source.encode(["blurry", "dark"], width=64, height=64, negative=True)["context"]
        assert torch.allclose(prm.text_cond, expect_c) and torch.allclose(prm.text_uncond, expect_u)
        # inner model = runtime denoiser on the same rows
        ref = source.denoise(x_in, sigma_in, {"context": torch.cat([prm.text_cond, prm.text_uncond])})
        assert torch.allclose(x_out, ref, atol=1e-5)
        u = x_out[3:]
        expect = torch.stack([u[0] + 4.0 * ((x_out[0] - u[0]) * 1.0 + (x_out[1] - u[0]) * 0.5),
                              u[1] + 4.0 * (x_out[2] - u[1])])
        assert torch.allclose(after, expect, atol=1e-5)
    assert [d[4] for d in den] == [0, 1, 2]          # denoiser.step: model-call counter
    assert [d[6] for d in den] == [0, 0, 1]          # state.sampling_step lags by one (§2.5)


def test_callback_replacements_and_denoised_reassignment(a1111):
    """§2.2 steps 7, 12, 17: x_in/sigma/conds re-read after on_cfg_denoiser; reassigning
    CFGDenoisedParams.x is ignored (in-place edits count); AfterCFG x reassignment is used."""
    a1111.add_checkpoint("target.safetensors", "sd1")
    cb = a1111.script_callbacks
    outs = []

    def swap_uncond(prm):
        prm.text_uncond = prm.text_cond.clone()      # uncond := cond -> CFG has no effect

    cb.on_cfg_denoiser(swap_uncond)
    cb.on_cfg_denoised(lambda prm: setattr(prm, "x", prm.x * 0 + 123.0))   # ignored
    cb.on_cfg_after_cfg(lambda prm: outs.append(prm.x.clone()))
    a1111.txt2img(prompt="a fox", steps=2, cfg_scale=9.0)
    first = outs[0]
    outs.clear()
    cb.clear_callbacks()
    cb.on_cfg_after_cfg(lambda prm: outs.append(prm.x.clone()))
    a1111.txt2img(prompt="a fox", steps=2, cfg_scale=1.0)      # scale 1 = the cond prediction alone
    assert torch.allclose(first, outs[0], atol=1e-5) and not torch.any(first == 123.0)

    cb.clear_callbacks()
    cb.on_cfg_after_cfg(lambda prm: setattr(prm, "x", torch.zeros_like(prm.x)))
    gen = a1111.txt2img(prompt="a fox", steps=2)
    # Euler with denoised = 0 at every step: x_{i+1} = x_i * sigma_{i+1} / sigma_i -> 0 at the end
    assert torch.allclose(gen.processed.images[0], torch.zeros(4, 8, 8), atol=1e-6)


def test_ngms_skips_uncond_after_the_callback(a1111):
    """§2.2 step 8/11: NGMS (s_min_uncond, odd steps) drops the uncond rows after the callback
    and appends the first cond row of each image as a fake uncond; scale 1.0; infotext "NGMS"."""
    a1111.add_checkpoint("target.safetensors", "sd1")
    seen = capture(a1111)
    gen = a1111.txt2img(prompt="a fox", batch_size=2, steps=4, s_min_uncond=100.0)
    for (_, _, x_in, *_), (_, _, x_out), (_, _, after) in zip(by_kind(seen, "denoiser"), by_kind(seen, "denoised"),
                                                              by_kind(seen, "after")):
        assert x_in.shape[0] == 4                                   # the callback saw every row
    skipped = [i for i, (_, _, x_out) in enumerate(by_kind(seen, "denoised")) if torch.equal(x_out[2:], x_out[:2])]
    assert skipped == [1, 3]
    assert torch.equal(by_kind(seen, "after")[1][2], by_kind(seen, "denoised")[1][2][:2])
    assert "NGMS: 100.0" in gen.processed.infotexts[0]


def test_long_prompt_runs_cond_and_uncond_apart(a1111):
    """Token lengths 154 vs 77 and no padding option: the callback sees both lengths; the
    output is still the full layout."""
    a1111.add_checkpoint("target.safetensors", "sd1")
    seen = capture(a1111)
    a1111.txt2img(prompt=", ".join(["a red fox"] * 20), steps=1)
    _, prm, x_in, *_ = by_kind(seen, "denoiser")[0]
    assert prm.text_cond.shape[1] == 154 and prm.text_uncond.shape[1] == 77
    assert by_kind(seen, "denoised")[0][2].shape[0] == 2


def test_callback_exception_is_reported_and_swallowed(a1111):
    a1111.add_checkpoint("target.safetensors", "sd1")
    cb = a1111.script_callbacks
    calls = []

    def bad(prm):
        raise RuntimeError("bad callback")

    cb.on_cfg_denoiser(bad)
    cb.on_cfg_denoiser(lambda prm: calls.append(prm.denoiser.step))
    gen = a1111.txt2img(steps=3)
    assert calls == [0, 1, 2] and len(gen.processed.images) == 1
    assert len(a1111.reports) == 3
    assert a1111.reports[0].message.startswith("Error executing callback cfg_denoiser_callback for ")
    assert isinstance(a1111.reports[0].exception, RuntimeError)


def test_interrupted_exception_returns_last_latent(a1111):
    """InterruptedException (a BaseException) from a callback is not swallowed: sampling stops
    and the sampler returns last_latent = the x0 of each image's first cond row (§2.2 step 16)."""
    a1111.add_checkpoint("target.safetensors", "sd1")
    cb = a1111.script_callbacks
    common = a1111.sd_samplers_common
    x_outs = []

    def stop(prm):
        if prm.denoiser.step == 1:
            raise common.InterruptedException

    cb.on_cfg_denoised(lambda prm: x_outs.append(prm.x.clone()))
    cb.on_cfg_denoiser(stop)
    gen = a1111.txt2img(prompt="a fox", steps=4)
    assert len(x_outs) == 1 and a1111.reports == []
    assert torch.equal(gen.processed.images[0], x_outs[0][0])

    x_outs.clear()
    cb.clear_callbacks()
    cb.on_cfg_denoised(lambda prm: x_outs.append(prm.x.clone()))
    cb.on_cfg_after_cfg(lambda prm: a1111.shared.state.interrupt())
    gen = a1111.txt2img(prompt="a fox", steps=4, n_iter=2)
    assert len(x_outs) == 1 and len(gen.processed.images) == 1      # the second batch never starts


def test_remove_callbacks_for_function_and_order(a1111):
    cb = a1111.script_callbacks
    order = []

    def f(*a):
        order.append("f")

    cb.on_before_ui(lambda: order.append("first"))
    cb.on_before_ui(f)
    cb.on_script_unloaded(lambda: order.append("u1"))
    cb.on_script_unloaded(lambda: order.append("u2"))
    cb.on_cfg_denoiser(f)
    cb.before_ui_callback()
    cb.script_unloaded_callback()
    assert order == ["f", "first", "u2", "u1"]                     # both run in reverse order
    assert cb.ordered_callbacks("before_ui")[0].name == "base/test_a1111_standin.py/before_ui"
    cb.remove_callbacks_for_function(f)
    assert [c.callback for c in cb.callback_map["callbacks_before_ui"]] != [f]
    assert cb.callback_map["callbacks_cfg_denoiser"] == [] and len(cb.ordered_callbacks("before_ui")) == 1
    order.clear()
    cb.before_ui_callback()
    assert order == ["first"]


# ---------------------------------------------------------------------------- scripts


def test_script_hooks_order_args_and_hires(a1111, tmp_path):
    """§1.4/§1.5: hook order per job, batch and pass; args sliced from script_args; extra network
    tags stripped from p.prompts only; p.sampler None in process(); hires: second
    process_before_every_sampling at the hires size with is_hr_pass; a failing hook is reported
    and generation continues."""
    a1111.add_checkpoint("target.safetensors", "sd1")
    calls = load_recorder(a1111, tmp_path)
    runner = a1111.scripts.scripts_txt2img
    rec = runner.script("Delta Recorder")
    assert rec.args_from == 1 and rec.args_to == 3 and rec.elem_id("x") == "script_txt2img_delta_recorder_x"
    assert a1111.scripts.scripts_img2img.script("delta recorder") is not rec
    gen = a1111.txt2img({"Delta Recorder": [True, 1.5]}, prompt="a fox <lora:ink:0.5>", n_iter=2, steps=2,
                        enable_hr=True, hr_scale=2.0, hr_second_pass_steps=2, hr_upscaler="Latent")
    names = [c[0] for c in calls]
    per_batch = ["before_process_batch", "after_extra_networks_activate", "process_batch", "process_before_every_sampling",
                 "after_extra_networks_activate", "before_hr", "process_before_every_sampling", "post_sample",
                 "postprocess_batch", "postprocess_batch_list", "postprocess_image"]
    assert names == ["setup", "before_process", "process", *per_batch, *per_batch, "postprocess"]
    assert all(c[1] == (True, 1.5) for c in calls)
    assert calls[2][2]["sampler"] is None                                           # txt2img: no sampler yet
    pb = [c for c in calls if c[0] == "process_batch"]
    assert pb[0][2]["prompts"] == ["a fox "] and pb[0][2]["all_prompts"] == ["a fox <lora:ink:0.5>"] * 2
    assert pb[0][2]["c"] is None and [c[2]["batch_number"] for c in pb] == [0, 1]
    pbes = [c[2] for c in calls if c[0] == "process_before_every_sampling"]
    assert [(k["x"], k["hr"]) for k in pbes[:2]] == [((1, 4, 8, 8), False), ((1, 4, 16, 16), True)]
    assert pbes[0]["sampler"] is not None and pbes[1]["sampler"] is not pbes[0]["sampler"]
    assert pbes[1]["noise"].shape == (1, 4, 16, 16)
    assert gen.processed.images[0].shape == (4, 16, 16)
    info = gen.processed.infotexts[0]
    assert "Recorder strength: 1.5" in info and "Hires upscale: 2.0" in info and "Denoising strength: 0.75" in info
    assert len(a1111.reports) == 1 and a1111.reports[0].message.startswith("Error running process: ")


def test_ui_ids_tooltips_and_paste(a1111, tmp_path):
    """§3: InputAccordion = hidden checkbox '<id>-checkbox' + accordion '<id>' (the accordion
    gets tooltip as an unused kwarg); tooltip on IOComponents -> webui_tooltip; paste rules §4.3."""
    load_recorder(a1111, tmp_path)
    rec = a1111.scripts.scripts_txt2img.script("Delta Recorder")
    enable, strength = rec.controls
    assert enable.elem_id == "script_txt2img_delta_recorder_enable-checkbox" and enable.visible is False
    assert enable.accordion.elem_id == "script_txt2img_delta_recorder_enable"
    assert enable.accordion.unused_kwargs == {"tooltip": "tip"} and enable.webui_tooltip == "tip"
    assert strength.webui_tooltip == "how strong" and strength.value == 0.5
    assert [i is None for i in a1111.scripts.scripts_txt2img.inputs[:1]] == [False]   # [0] = Script dropdown

    pasted = a1111.paste("a fox\nSteps: 3, Sampler: Euler, Recorder strength: 1.25")
    assert pasted[enable] == {"value": True, "__type__": "generic_update"}
    assert pasted[strength] == {"value": 1.25, "__type__": "generic_update"}
    pasted = a1111.paste("a fox\nSteps: 3, Sampler: Euler, Seed: 1")
    assert pasted[enable] == {"value": False, "__type__": "generic_update"}
    assert pasted[strength] == {"__type__": "generic_update"}                    # missing key: unchanged


def test_paste_conversion_rules(a1111):
    import gradio as gr
    iu = a1111.infotext_utils
    cb = a1111.script_callbacks
    box, num, drop, txt = gr.Checkbox(True), gr.Number(3, precision=0), gr.Dropdown(["a", "b"]), gr.Textbox("x")

    def broken(d):
        raise KeyError("x")

    fields = [(box, "Bo"), (num, "Nu"), (drop, "Dr"), (txt, broken), (txt, lambda d: gr.update(visible=False))]
    cb.on_infotext_pasted(lambda text, params: params.update({"Nu": "7"}))
    params, res = iu.paste_infotext("p\nBo: False, Nu: 2, Dr: b, Seed: 1", fields)
    assert params["Nu"] == "7" and params["Prompt"] == "p"
    assert "X" not in iu.parse_generation_parameters("p\nX: 1, Steps: 2, Seed: 3, CFG scale: 4")   # keys need 2+ chars
    assert res[0]["value"] is False and res[1]["value"] == 7.0 and isinstance(res[1]["value"], float)
    assert res[2] == {"__type__": "generic_update"}                    # value None -> conversion fails
    assert res[3] == {"__type__": "generic_update"} and len(a1111.reports) == 1
    assert res[4] == {"visible": False, "__type__": "generic_update"}
    assert iu.paste({"Bo": "0"}, [(box, "Bo")])[0]["value"] is True    # only "False" is False


def test_infotext_create_quote_and_parse(a1111):
    a1111.add_checkpoint("target.safetensors", "sd1")
    iu = a1111.infotext_utils
    gen = a1111.txt2img(prompt="a fox", batch_size=2, extra_generation_params={
        "Delta adapters": "<lora:a:1>, b", "Delta flag": True, "Delta none": None,
        "Delta per image": ["x", "y"], "Delta call": lambda p, index, **kw: f"#{index}", "Same": "Same"})
    second = gen.processed.infotexts[1]
    assert 'Delta adapters: "<lora:a:1>, b", Delta flag: True, Delta per image: y, Delta call: #1, Same, Version: v1.10.1' in second
    assert "Delta none" not in second
    params = iu.parse_generation_parameters(second)
    assert params["Delta adapters"] == "<lora:a:1>, b" and params["Delta flag"] == "True"
    assert params["Size-1"] == "64" and params["Size-2"] == "64" and params["Clip skip"] == "1"
    assert params["Prompt"] == "a fox" and params["Schedule type"] == "Automatic"
    assert iu.quote("a:b") == '"a:b"' and iu.quote(3) == 3 and iu.unquote('"x, y"') == "x, y"

    # In the generation loop a list value is indexed by the position IN THE BATCH (create_infotext
    # gets index=i with the batch's prompts/seeds), so a job-long list repeats its first entries.
    gen = a1111.txt2img(n_iter=2, extra_generation_params={"Delta per image": ["x", "y"]})
    assert ["Delta per image: x" in t for t in gen.processed.infotexts] == [True, True]


def test_api_script_args_and_routes(a1111, tmp_path):
    from fastapi import HTTPException
    from fastapi.security import HTTPBasicCredentials

    load_recorder(a1111, tmp_path)
    runner = a1111.scripts.scripts_txt2img
    rec = runner.script("Delta Recorder")
    args = a1111.script_args("txt2img", {"delta recorder": [True]})      # title matched case-insensitively
    assert args[0] == 0 and args[rec.args_from:rec.args_to] == [True, 0.5]    # trailing default kept
    with pytest.raises(HTTPException) as e:
        a1111.script_args("txt2img", {"Nope": [1]})
    assert e.value.status_code == 422
    with pytest.raises(KeyError):
        a1111.script_args("txt2img", {"Delta Recorder": {"args": {"enabled": True}}})

    a1111.shared.cmd_opts.api_auth = "u:pw"
    a1111.script_callbacks.on_app_started(lambda demo, app: a1111.api.add_api_route("/x/v1/info", lambda: {"ok": 1}, methods=["GET"]))
    app = a1111.start_app()
    with pytest.raises(HTTPException) as e:
        a1111.call_route("GET", "/x/v1/info")
    assert e.value.status_code == 401
    assert a1111.call_route("GET", "/x/v1/info", credentials=HTTPBasicCredentials("u", "pw")) == {"ok": 1}
    assert app.find("GET", "/x/v1/info").dependencies

    # text2imgapi: is_api (setup runs with is_ui=False), infotext -> script args through the paste
    # fields (type(component.value)(value), no bool rule), explicit alwayson args win.
    a1111.add_checkpoint("target.safetensors", "sd1")
    calls = next(x.module for x in a1111.scripts.scripts_data if x.script_class.__name__ == "Recorder").CALLS
    calls.clear()
    a1111.api.txt2img({"prompt": "a fox", "steps": 1, "width": 64, "height": 64, "sampler_name": "Euler",
                       "infotext": "a fox\nSteps: 1, Seed: 3, Recorder strength: 1.25"})
    assert calls[0][0] == "setup" and calls[0][1] == (True, 1.25) and calls[0][3].is_api
    calls.clear()
    a1111.api.txt2img({"prompt": "a fox", "steps": 1, "width": 64, "height": 64, "sampler_name": "Euler",
                       "infotext": "a fox\nSteps: 1, Seed: 3, Recorder strength: 1.25",
                       "alwayson_scripts": {"Delta Recorder": {"args": [False]}}})
    assert calls[0][1] == (False, 1.25)


# ---------------------------------------------------------------------------- img2img, samplers, models


def test_img2img_inpaint_mask_kdiffusion(a1111):
    """Denoising strength 0.5 of 4 steps: t_enc = 2, 3 model calls over sigmas[1:]; the
    after_cfg x is already blended (mask = 1 keeps the original, §2.2 step 15)."""
    a1111.add_checkpoint("target.safetensors", "sd1")
    seen = capture(a1111)
    init = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(3))
    m = torch.zeros(8, 8)
    m[:, :4] = 1                                            # inpaint the left half
    gen = a1111.img2img(init, mask=m, steps=4, denoising_strength=0.5)
    den = by_kind(seen, "denoiser")
    assert len(den) == 3 and den[0][5] == 3
    kd = a1111.sd_samplers_kdiffusion
    sigmas = kd.CompVisDenoiser(a1111.shared.sd_model).get_sigmas(4)
    assert torch.allclose(den[0][3], sigmas[1].expand(2))
    assert torch.equal(gen.p.mask[0], 1 - m) and torch.equal(gen.p.nmask[0], m)
    for _, _, after in by_kind(seen, "after"):
        assert torch.equal(after[0][:, :, 4:], init[:, :, 4:])
    assert torch.equal(gen.processed.images[0][:, :, 4:], init[:, :, 4:])
    assert "Denoising strength: 0.5" in gen.processed.infotexts[0]


def test_ddim_timestep_family(a1111):
    """Timestep samplers: sigma is the timestep, outputs are eps (apply_model), the mask is
    blended into x before the model (§2.4); DDIM makes steps - 1 model calls."""
    a1111.add_checkpoint("target.safetensors", "sd1")
    seen = capture(a1111)
    init = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(4))
    m = torch.zeros(8, 8)
    m[:4] = 1
    gen = a1111.img2img(init, mask=m, steps=10, denoising_strength=1.0, sampler_name="DDIM")
    den = by_kind(seen, "denoiser")
    assert isinstance(den[0][1].denoiser, a1111.sd_samplers_timesteps.CFGDenoiserTimesteps)
    assert [int(d[3][0]) for d in den] == [801, 701, 601, 501, 401, 301, 201, 101]
    assert not hasattr(den[0][1].denoiser.inner_model, "sigmas")
    for (_, prm, x_in, sigma_in, *_), (_, _, x_out) in zip(den, by_kind(seen, "denoised")):
        assert torch.equal(x_in[0][:, 4:], init[:, 4:])            # blended before the model
        eps = a1111.shared.sd_model.source.unet(x_in, sigma_in, torch.cat([prm.text_cond, prm.text_uncond]))
        assert torch.allclose(x_out, eps, atol=1e-5)
    assert gen.processed.images[0].shape == (4, 8, 8)


def test_heun_second_order_step_counts(a1111):
    a1111.add_checkpoint("target.safetensors", "sd1")
    seen = capture(a1111)
    a1111.txt2img(sampler_name="Heun", steps=3)
    den = by_kind(seen, "denoiser")
    assert [d[4] for d in den] == [0, 1, 2, 3, 4] and {d[5] for d in den} == {6}


def test_hires_checkpoint_swap_and_model_list(a1111):
    """§1.5: a hires checkpoint of another architecture is swapped in between the passes
    (on_model_loaded fires), conds of pass 2 come from it; the next job reloads the main model."""
    a1111.add_checkpoint("target.safetensors", "sd1")
    a1111.add_checkpoint("sub/xl.safetensors", "sdxl", seed=1)
    sd_models = a1111.sd_models
    assert sd_models.checkpoint_tiles() == ["target.safetensors", "sub/xl.safetensors"]   # folder by folder; no hash yet
    assert sd_models.get_closet_checkpoint_match("xl").name == "sub/xl.safetensors"
    loaded = []
    a1111.script_callbacks.on_model_loaded(lambda m: loaded.append(m.sd_checkpoint_info.name))
    seen = capture(a1111)
    gen = a1111.txt2img(enable_hr=True, hr_checkpoint_name="xl", hr_second_pass_steps=1, steps=1)
    assert loaded == ["target.safetensors", "sub/xl.safetensors"]
    first, second = [d[1] for d in by_kind(seen, "denoiser")]
    assert torch.is_tensor(first.text_cond) and set(second.text_cond) == {"crossattn", "vector"}
    assert a1111.shared.opts.sd_model_checkpoint.startswith("target.safetensors [")     # not written by the swap
    info = gen.processed.infotexts[0]
    assert "Hires checkpoint: xl," in info and "Model: target" in info    # short_title before it was hashed
    a1111.txt2img(steps=1)
    assert loaded[-1] == "target.safetensors" and a1111.shared.sd_model.is_sd1
    assert all(t.endswith("]") for t in sd_models.checkpoint_tiles())                      # hashed when loaded


def test_xyz_lookup_axes_and_cells(a1111, tmp_path):
    a1111.add_checkpoint("target.safetensors", "sd1")
    load_recorder(a1111, tmp_path)
    xyz = a1111.xyz_grid()
    assert xyz.__name__ == "xyz_grid.py" and "xyz_grid.py" not in sys.modules
    xyz.axis_options.append(xyz.AxisOption("Delta scale", float, xyz.apply_field("delta_scale")))
    a1111.create_ui()                                           # the XYZ ui() snapshots the axes now
    runner = a1111.scripts.scripts_txt2img
    plot = runner.selectable_scripts[0]
    labels = [o.label for o in plot.current_axis_options]
    assert labels[-1] == "Delta scale" and "Image CFG Scale" not in labels
    seen = []
    p = a1111.processing.StableDiffusionProcessingTxt2Img(prompt="a fox", width=64, height=64, steps=1, seed=5,
                                                          sampler_name="Euler")
    p.scripts = runner
    args = a1111.script_args("txt2img")
    args[0] = 1
    args[plot.args_from:plot.args_to] = [labels.index("Delta scale"), "0.5, 1.5", None, labels.index("Steps"), "1-2",
                                         None, 0, "", None, True, False, False, False, False, False, False, 0, False]
    p.script_args = tuple(args)
    orig_process = a1111.processing.process_images

    def spy(pc):
        seen.append((pc.delta_scale, pc.steps, pc.extra_generation_params is p.extra_generation_params))
        return orig_process(pc)

    xyz.process_images = spy
    result = runner.run(p, *p.script_args)
    assert seen == [(0.5, 1, True), (1.5, 1, True), (0.5, 2, True), (1.5, 2, True)]
    assert len(result.cells) == 4 and all(img is not None for img in result.images)


def test_lora_extension_lists_and_activates(a1111, tmp_path):
    """The built-in Lora extension: `networks` importable from sys.modules, files of models/Lora
    by stem, aliases from ss_output_name, and `<lora:...>` tags handed to its extra network."""
    from safetensors.torch import save_file

    a1111.add_checkpoint("target.safetensors", "sd1")
    save_file({"w": torch.zeros(1)}, str(a1111.lora_dir / "ink_v2.safetensors"), metadata={"ss_output_name": "ink"})
    load_recorder(a1111, tmp_path)
    networks = sys.modules["networks"]
    assert networks is a1111.networks() and list(networks.available_networks) == ["ink_v2"]
    entry = networks.available_network_aliases["ink"]
    assert entry.filename.endswith("ink_v2.safetensors") and entry.get_alias() == "ink" and entry.shorthash == ""
    entry.read_hash()
    assert networks.available_network_hash_lookup[entry.shorthash] is entry and len(entry.shorthash) == 12
    a1111.txt2img(prompt="a fox <lora:ink:0.7>", steps=1)
    assert [[x.items for x in call] for call in networks.activations] == [[["ink", "0.7"]]]


def test_options_semantics(a1111):
    shared = a1111.shared
    opts = shared.opts
    with pytest.raises(AttributeError):
        opts.delta_sampling_device
    assert getattr(opts, "delta_sampling_device", "auto") == "auto"
    opts.data["delta_sampling_device"] = "cpu"                         # from config.json
    changed = []
    opts.add_option("delta_sampling_device", shared.OptionInfo("auto", "Device", section=("delta_sampling", "Delta Sampling")))
    assert opts.delta_sampling_device == "cpu"                          # kept
    opts.onchange("delta_sampling_device", lambda: changed.append(opts.delta_sampling_device), call=False)
    assert opts.set("delta_sampling_device", "cuda") and changed == ["cuda"]
    assert not opts.set("delta_sampling_device", "cuda")
    assert opts.cast_value("s_min_uncond_all", "False") is False and opts.cast_value("eta_noise_seed_delta", "12") == 12
    assert opts.get_default("delta_sampling_device") == "auto"


def test_gradio_component_values(a1111):
    import gradio as gr
    assert gr.Slider(minimum=1, maximum=5).value == 1
    assert gr.Number(3).value == 3.0 and isinstance(gr.Number(3).value, float) and gr.Number(2.6, precision=0).value == 3
    assert gr.Dropdown([1, "b"], value="b").choices == ["1", "b"]
    assert gr.Radio(["a"]).choices == [("a", "a")]
    assert gr.update(value=1) == {"value": 1, "__type__": "generic_update"}
    assert gr.Dropdown.update(choices=["x"]) == {"choices": ["x"], "__type__": "update"}
    with gr.Blocks() as demo:
        with gr.Row():
            box = gr.Checkbox(label="on", elem_id="e1", info="help")
    assert box.parent.parent is demo and box.info == "help" and "gradio-checkbox" in box.elem_classes


def test_zz_nothing_leaks_between_tests():
    """Runs after the fixture-using tests of this module: the stand-in is gone."""
    assert not any(n == "modules" or n.startswith(("modules.", "gradio", "fastapi")) for n in sys.modules)
    assert "networks" not in sys.modules and "network" not in sys.modules
    assert not any(p.endswith(str(Path("tests") / "a1111")) for p in sys.path)
