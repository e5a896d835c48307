"""A test-only extension: records what the CFG-denoiser callbacks of each generation see, so the
real-host tests can recompute the delta with the engine outside the host and compare.

Active only when the host runs with DS_PROBE_FILE set (tests/hosts/host.py, `record=True`). Per
model call: the image rows of x and sigma and the denoiser's step counters (on_cfg_denoiser), the
host's own CFG result (`denoiser.sampler.last_latent`, set just before the after-CFG callbacks) and
the after-CFG params object, whose `x` holds the final value once every callback ran, whatever their
order. At postprocess everything goes to DS_PROBE_FILE (torch.save).
"""

import os

import torch

from modules import script_callbacks, scripts

PROBE_FILE = os.environ.get("DS_PROBE_FILE")


class Recording:
    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.passes: list[dict] = []
        self.denoiser = None

    def on_cfg_denoiser(self, params) -> None:
        b = params.x.shape[0] if params.text_uncond is None else (
            next(iter(params.text_uncond.values())).shape[0] if isinstance(params.text_uncond, dict)
            else params.text_uncond.shape[0])
        d = params.denoiser
        self.denoiser = d
        self.calls.append({"x": params.x[-b:].detach().clone().cpu(), "sigma": params.sigma[-b:].detach().clone().cpu(),
                           "step": int(d.step), "total_steps": int(d.total_steps), "steps": int(d.steps),
                           "pass": len(self.passes) - 1,
                           "mask": d.mask.detach().clone().cpu() if getattr(d, "mask", None) is not None else None})

    def on_cfg_after_cfg(self, params) -> None:
        call = self.calls[-1]
        call["before"] = self.denoiser.sampler.last_latent.detach().clone().cpu()
        call["params"] = params


RECORDING = Recording()
if PROBE_FILE:
    script_callbacks.on_cfg_denoiser(RECORDING.on_cfg_denoiser)
    script_callbacks.on_cfg_after_cfg(RECORDING.on_cfg_after_cfg)


class Probe(scripts.Script):
    def title(self):
        return "Delta Sampling test probe"

    def show(self, is_img2img):
        return scripts.AlwaysVisible if PROBE_FILE else False

    def process(self, p, *args):
        RECORDING.calls.clear()
        RECORDING.passes.clear()

    def process_before_every_sampling(self, p, *args, **kwargs):
        noise, x = kwargs.get("noise"), kwargs.get("x")
        RECORDING.passes.append({"noise": noise.detach().clone().cpu(), "hires": bool(getattr(p, "is_hr_pass", False)),
                                 "img2img": x is not None and x is not noise,
                                 "x": x.detach().clone().cpu() if x is not None else None})

    def postprocess(self, p, processed, *args):
        calls = []
        for call in RECORDING.calls:
            call = dict(call)
            params = call.pop("params", None)
            if params is not None:
                call["after"] = params.x.detach().clone().cpu()
            calls.append(call)
        torch.save({"calls": calls, "passes": list(RECORDING.passes), "prompts": list(p.prompts),
                    "negative_prompts": list(p.negative_prompts), "steps": p.steps, "cfg_scale": p.cfg_scale,
                    "seeds": list(p.seeds)}, PROBE_FILE)
