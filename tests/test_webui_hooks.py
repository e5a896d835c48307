"""webui/hooks_cfg.py: the pure parts against the hosts' documented layouts (host-notes a1111.md §2,
forge.md §1), then the hook driven as A1111 1.10.1 and Forge / Forge Neo drive it in a DDIM run, and the
first-call guard, against hand computations."""

from __future__ import annotations

import math
import types

import pytest
import torch

from lib_deltasampling.runtime.denoiser import DiscreteSchedule
from lib_deltasampling.webui.hooks_cfg import (
    HostMismatch, InitialLatent, PassHook, batch_rows, check_noise_scale, eps_to_x0, hands_timesteps, noise_scale,
    step_index, unexpanded, vp_to_ve, x0_to_eps,
)


def test_unexpanded_rows_with_and_prompts():
    """B=2, image 0 prompt `a AND b` (2 cond rows), image 1 one prompt: x_in = [x0, x0, x1 | x0, x1]."""
    x0, x1 = torch.full((1, 4, 2, 2), 0.0), torch.full((1, 4, 2, 2), 1.0)
    x_in = torch.cat([x0, x0, x1, x0, x1])
    sigma_in = torch.tensor([5.0, 5.0, 6.0, 5.0, 6.0])
    x, sigma = unexpanded(x_in, sigma_in, batch=2)
    assert torch.equal(x, torch.cat([x0, x1])) and torch.equal(sigma, torch.tensor([5.0, 6.0]))


def test_batch_rows_of_tensor_and_sdxl_dict_conds():
    assert batch_rows(torch.zeros(3, 77, 768)) == 3
    assert batch_rows({"crossattn": torch.zeros(2, 77, 2048), "vector": torch.zeros(2, 2816)}) == 2


def test_step_index_first_and_second_order():
    assert [step_index(c, 5, 5) for c in range(5)] == [0, 1, 2, 3, 4]
    # A1111 counts 2 calls per step for second-order samplers (total_steps = 2 * steps); Heun makes
    # 2 calls per step and 1 on the last: calls 0..8 of 5 steps
    assert [step_index(c, 10, 5) for c in range(9)] == [0, 0, 1, 1, 2, 2, 3, 3, 4]


def test_timestep_sampler_conversions_by_hand():
    """VP: x_t = sqrt(a) x0 + sqrt(1 - a) n with a = 1 / (1 + sigma^2)."""
    g = torch.Generator().manual_seed(0)
    x0, n = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    sigma = torch.tensor([0.5, 7.0])
    a = (1 / (1 + sigma ** 2)).reshape(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * n
    x_ve = vp_to_ve(x_t, sigma)
    assert torch.allclose(x_ve, x0 + sigma.reshape(-1, 1, 1, 1) * n, atol=1e-5)
    assert torch.allclose(eps_to_x0(x_ve, n, sigma), x0, atol=1e-4)
    assert torch.allclose(x0_to_eps(x_ve, x0, sigma), n, atol=1e-4)


# ====================================================================== the hook in each host's CFG denoiser
#
# The fakes below re-enact, with the hosts' own attribute names and call order, what happens around the
# callbacks in one DDIM run (cited per function). The source model is a known x0 function; the sampler is a
# stand-in that records what it is handed and adds a known delta. Every expectation is computed by hand from
# the schedule (sigma = sqrt((1 - a) / a)), independently of hooks_cfg.

SCHEDULE = DiscreteSchedule()
ACD64 = SCHEDULE.alphas_cumprod.double()  # float32 table of the schedule, widened for the hand computation


class CFGDenoiserParams:
    """modules/script_callbacks.py CFGDenoiserParams.__init__ (A1111, Forge, Neo: same fields)."""

    def __init__(self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond,
                 denoiser=None):
        self.x, self.image_cond, self.sigma = x, image_cond, sigma
        self.sampling_step, self.total_sampling_steps = sampling_step, total_sampling_steps
        self.text_cond, self.text_uncond, self.denoiser = text_cond, text_uncond, denoiser


class AfterCFGCallbackParams:
    """modules/script_callbacks.py AfterCFGCallbackParams.__init__."""

    def __init__(self, x, sampling_step, total_sampling_steps):
        self.x, self.sampling_step, self.total_sampling_steps = x, sampling_step, total_sampling_steps


def model_x0(x_ve: torch.Tensor, sigma: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The fake network's x0 prediction for VE latent rows, sigma rows and scalar conditioning rows c."""
    s = sigma.reshape(-1, 1, 1, 1)
    c = c.reshape(-1, 1, 1, 1)
    return c * x_ve / (1 + s ** 2).sqrt() + 0.1 * c - 0.05


# image 0 has the prompt `a AND b` (two cond rows, weights 0.5 each), image 1 one prompt
CONDS_LIST = [[(0, 0.5), (1, 0.5)], [(2, 1.0)]]
COND = torch.tensor([0.9, 0.7, 0.8])   # one scalar per cond row
UNCOND = torch.tensor([0.3, 0.2])      # one per image
CFG = 5.0


def cfg_x0_by_hand(x_ve: torch.Tensor, sigma: torch.Tensor, cond_scale: float, uncond=UNCOND) -> torch.Tensor:
    """uncond + sum_k w_k (cond_k - uncond) * scale per image, in x0 (equal to the same combine in eps: affine)."""
    rows = []
    for i, conds in enumerate(CONDS_LIST):
        xi, si = x_ve[i:i + 1], sigma[i:i + 1]
        base = model_x0(xi, si, COND[conds[0][0]]) if uncond is None else model_x0(xi, si, uncond[i])
        d = base.clone()
        for k, w in conds:
            d = d + (model_x0(xi, si, COND[k]) - base) * (w * cond_scale)
        rows.append(d)
    return torch.cat(rows)


class Callbacks:
    """modules/script_callbacks.py cfg_denoiser_callback / cfg_after_cfg_callback: call each registered one."""

    def __init__(self, hook: PassHook) -> None:
        self.denoiser, self.after_cfg = [hook.on_cfg_denoiser], [hook.on_cfg_after_cfg]

    def cfg_denoiser_callback(self, params):
        for c in self.denoiser:
            c(params)

    def cfg_after_cfg_callback(self, params):
        for c in self.after_cfg:
            c(params)


# ---------------------------------------------------------------- A1111 1.10.1

class A1111LatentDiffusion:
    """ldm LatentDiffusion as A1111's DDIM uses it: `alphas_cumprod`, apply_model(x, t, cond) -> eps for an
    eps-prediction model (x is the VP latent sqrt(a) x0 + sqrt(1 - a) n, t an integer timestep)."""

    def __init__(self):
        self.alphas_cumprod = SCHEDULE.alphas_cumprod.clone()
        self.parameterization = "eps"

    def apply_model(self, x, t, cond):
        a = self.alphas_cumprod[t.long()].reshape(-1, 1, 1, 1)
        x_ve = x / a.sqrt()
        sigma = ((1 - a) / a).sqrt().reshape(-1)
        x0 = model_x0(x_ve, sigma, cond["c_crossattn"][0])
        return (x - a.sqrt() * x0) / (1 - a).sqrt()


class A1111CompVisTimestepsDenoiser(torch.nn.Module):
    """A1111 modules/sd_samplers_timesteps.py CompVisTimestepsDenoiser: inner_model = sd_model; no `sigmas`."""

    def __init__(self, model):
        super().__init__()
        self.inner_model = model

    def forward(self, input, timesteps, **kwargs):
        return self.inner_model.apply_model(input, timesteps, **kwargs)


class A1111CFGDenoiserTimesteps:
    """A1111 modules/sd_samplers_cfg_denoiser.py CFGDenoiser.forward (+ sd_samplers_timesteps.py
    CFGDenoiserTimesteps: mask_before_denoising), no mask, batch_cond_uncond: the callback gets the expanded
    x_in/sigma_in (cond rows, then the B uncond rows = x, sigma) with timesteps as sigma; after-CFG gets
    the combined eps (combine_denoised); forward returns it."""

    def __init__(self, callbacks: Callbacks, steps: int):
        self.inner_model = A1111CompVisTimestepsDenoiser(A1111LatentDiffusion())
        self.mask = self.nmask = self.init_latent = None
        self.mask_before_denoising = True
        self.callbacks = callbacks
        # sd_samplers_common.Sampler.launch_sampling / initialize
        self.steps, self.total_steps, self.step = steps, steps, 0

    def combine_denoised(self, x_out, conds_list, uncond, cond_scale):
        denoised_uncond = x_out[-uncond.shape[0]:]
        denoised = torch.clone(denoised_uncond)
        for i, conds in enumerate(conds_list):
            for cond_index, weight in conds:
                denoised[i] += (x_out[cond_index] - denoised_uncond[i]) * (weight * cond_scale)
        return denoised

    def __call__(self, x, sigma, uncond, cond, cond_scale):
        if self.mask_before_denoising and self.mask is not None:
            x = x * self.nmask + self.init_latent * self.mask  # apply_blend (before)
        repeats = [len(c) for c in CONDS_LIST]
        x_in = torch.cat([torch.stack([x[i] for _ in range(n)]) for i, n in enumerate(repeats)] + [x])
        sigma_in = torch.cat([torch.stack([sigma[i] for _ in range(n)]) for i, n in enumerate(repeats)] + [sigma])
        params = CFGDenoiserParams(x_in, None, sigma_in, 0, self.steps, cond, uncond, self)
        self.callbacks.cfg_denoiser_callback(params)
        x_in, sigma_in, tensor, uncond = params.x, params.sigma, params.text_cond, params.text_uncond
        cond_in = torch.cat([tensor, uncond])
        x_out = self.inner_model(x_in, sigma_in, cond={"c_crossattn": [cond_in]})
        denoised = self.combine_denoised(x_out, CONDS_LIST, uncond, cond_scale)
        after = AfterCFGCallbackParams(denoised, 0, self.steps)
        self.callbacks.cfg_after_cfg_callback(after)
        self.step += 1
        return after.x


# ---------------------------------------------------------------- Forge 2 / Forge Neo

class ForgePredictor:
    """backend/modules/k_prediction.py Prediction: `sigmas` buffer of the discrete schedule."""

    def __init__(self):
        self.sigmas = SCHEDULE.sigmas.clone()


class ForgeEngine:
    """backend/diffusion_engine: sd_model.forge_objects.unet.model.predictor."""

    def __init__(self):
        self.forge_objects = types.SimpleNamespace(unet=types.SimpleNamespace(
            model=types.SimpleNamespace(predictor=ForgePredictor())))


class ForgeCompVisTimestepsDenoiser(torch.nn.Module):
    """Forge/Neo modules/sd_samplers_timesteps.py CompVisTimestepsDenoiser.__init__:
    inner_model.alphas_cumprod = 1 / (predictor.sigmas ** 2 + 1); no `sigmas` of its own."""

    def __init__(self, model):
        super().__init__()
        self.inner_model = model
        predictor = self.inner_model.forge_objects.unet.model.predictor
        self.inner_model.alphas_cumprod = 1.0 / (predictor.sigmas ** 2.0 + 1.0)


class ForgeCFGDenoiserTimesteps:
    """Forge modules/sd_samplers_cfg_denoiser.py CFGDenoiser.forward (Neo's is the same here) with
    sd_samplers_timesteps.py CFGDenoiserTimesteps (classic_ddim_eps_estimation = True): the timestep becomes
    the real sigma and x the k-diffusion x before the callback (x not expanded, uncond None at CFG 1);
    sampling_function reads params.x/params.sigma and returns the CFG'd x0, after-CFG gets x0, and forward
    returns eps = (x - denoised) / sigma."""

    def __init__(self, callbacks: Callbacks, steps: int):
        self.inner_model = ForgeCompVisTimestepsDenoiser(ForgeEngine())
        self.mask = self.nmask = self.init_latent = None
        self.classic_ddim_eps_estimation = True
        self.callbacks = callbacks
        self.steps, self.total_steps, self.step = steps, steps, 0

    def sampling_function(self, denoiser_params, cond_scale):
        """backend/sampling/sampling_function.py sampling_function -> sampling_function_inner (x0 CFG; the
        cfg1 optimisation skips the uncond)."""
        x, sigma = denoiser_params.x, denoiser_params.sigma
        uncond = None if math.isclose(cond_scale, 1.0) else denoiser_params.text_uncond
        return cfg_x0_by_hand(x, sigma, cond_scale, uncond)

    def __call__(self, x, sigma, uncond, cond, cond_scale):
        if self.classic_ddim_eps_estimation:
            acd = self.inner_model.inner_model.alphas_cumprod
            fake_sigmas = ((1 - acd) / acd) ** 0.5
            real_sigma = fake_sigmas[sigma.round().long().clip(0, int(fake_sigmas.shape[0]))]
            real_sigma_data = 1.0
            x = x * (((real_sigma ** 2.0 + real_sigma_data ** 2.0) ** 0.5)[:, None, None, None])
            sigma = real_sigma
        params = CFGDenoiserParams(x, None, sigma, 0, self.steps, cond, uncond, self)
        self.callbacks.cfg_denoiser_callback(params)
        denoised = self.sampling_function(params, cond_scale)
        after = AfterCFGCallbackParams(denoised, 0, self.steps)
        self.callbacks.cfg_after_cfg_callback(after)
        denoised = after.x
        self.step += 1
        if self.classic_ddim_eps_estimation:
            return (x - denoised) / sigma[:, None, None, None]
        return denoised


def ddim(model, x, timesteps, extra_args):
    """modules/sd_samplers_timesteps_impl.py ddim (identical in A1111, Forge, Neo), eta = 0."""
    alphas_cumprod = model.inner_model.inner_model.alphas_cumprod
    alphas = alphas_cumprod[timesteps]
    alphas_prev = alphas_cumprod[torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))].to(torch.float64)
    sqrt_one_minus_alphas = torch.sqrt(1 - alphas)
    s_in = x.new_ones((x.shape[0]))
    s_x = x.new_ones((x.shape[0], 1, 1, 1))
    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        e_t = model(x, timesteps[index].item() * s_in, **extra_args)
        a_t = alphas[index].item() * s_x
        a_prev = alphas_prev[index].item() * s_x
        sqrt_one_minus_at = sqrt_one_minus_alphas[index].item() * s_x
        pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
        dir_xt = (1. - a_prev).sqrt() * e_t
        x = a_prev.sqrt() * pred_x0 + dir_xt
    return x


def get_timesteps(steps: int) -> torch.Tensor:
    """modules/sd_samplers_timesteps.py CompVisSampler.get_timesteps (no discard)."""
    return torch.clip(torch.asarray(list(range(0, 1000, 1000 // steps))) + 1, 0, 999)


class RecordingSampler:
    """A DeltaSampler stand-in (same call signature): records what it is handed, adds delta * (step + 1)."""

    def __init__(self, delta: torch.Tensor):
        self.delta, self.calls, self.prefetched = delta, [], []

    def prefetch(self, x, sigma, step, total_steps):
        self.prefetched.append((x, sigma, step, total_steps))

    def __call__(self, x, sigma, step, total_steps, target_denoised):
        # the hook announces each call before the host's forward, with the very tensors it passes here
        announced = self.prefetched[-1]
        assert announced[0] is x and announced[1] is sigma and announced[2:] == (step, total_steps)
        self.calls.append((x.clone(), sigma.clone(), step, total_steps))
        return target_denoised + self.delta * (step + 1)


STEPS = 5
B = 2


def _noise_and_delta():
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, 4, 3, 3, generator=g), 0.05 * torch.randn(B, 4, 3, 3, generator=g)


def run_ddim(denoiser_cls, cond_scale=CFG, uncond=UNCOND, start=True):
    noise, delta = _noise_and_delta()
    sampler, errors = RecordingSampler(delta), []
    hook = PassHook(sampler, SCHEDULE, on_error=errors.append, start=InitialLatent(noise) if start else None)
    denoiser = denoiser_cls(Callbacks(hook), STEPS)
    out = ddim(denoiser, noise.clone(), get_timesteps(STEPS),
               {"uncond": uncond, "cond": COND, "cond_scale": cond_scale})
    return out, sampler, errors, hook


def ddim_by_hand(cond_scale=CFG, uncond=UNCOND, with_delta=True):
    """The corrected DDIM trajectory in float64, from the schedule alone: at timestep t, sigma = sqrt((1-a)/a),
    x_ve = x / sqrt(a), x0 = CFG'd x0 + delta (step + 1), eps = (x_ve - x0) / sigma,
    x <- sqrt(a') x0 + sqrt(1 - a') eps."""
    noise, delta = _noise_and_delta()
    x = noise.double()
    ts = get_timesteps(STEPS)
    seen = []
    for i in range(len(ts) - 1):
        index = len(ts) - 1 - i
        a = ACD64[ts[index]]
        a_prev = ACD64[torch.nn.functional.pad(ts[:-1], pad=(1, 0))][index]  # as ddim's alphas_prev
        sigma = ((1 - a) / a).sqrt()
        x_ve = x / a.sqrt()
        seen.append((x_ve, sigma))
        x0 = cfg_x0_by_hand(x_ve, sigma.expand(B), cond_scale, uncond) + (delta.double() * (i + 1) if with_delta else 0)
        eps = (x_ve - x0) / sigma
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x, seen


@pytest.mark.parametrize("denoiser_cls", [A1111CFGDenoiserTimesteps, ForgeCFGDenoiserTimesteps])
def test_ddim_gets_the_delta_in_each_host_form(denoiser_cls):
    """A1111 (VP x, timestep as sigma, eps through after-CFG) and Forge/Neo (x and sigma already converted
    by classic_ddim_eps_estimation, x0 through after-CFG): the sampler sees the same VE x and real sigma, and
    the run is the hand-computed corrected DDIM run."""
    out, sampler, errors, _ = run_ddim(denoiser_cls)
    expected, seen = ddim_by_hand()
    assert errors == []
    assert [c[2:] for c in sampler.calls] == [(0, STEPS), (1, STEPS), (2, STEPS), (3, STEPS)]
    for (x, sigma, _, _), (x_ref, sigma_ref) in zip(sampler.calls, seen):
        assert x.shape == (B, 4, 3, 3) and sigma.shape == (B,)
        assert torch.allclose(sigma.double(), sigma_ref.expand(B), rtol=1e-5)
        assert torch.allclose(x.double(), x_ref, rtol=1e-4, atol=1e-5)
    assert torch.allclose(out.double(), expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out.double(), ddim_by_hand(with_delta=False)[0], atol=1e-3)  # the delta mattered


def test_a1111_ddim_inpainting_passes_the_guard_over_the_regenerated_area_only():
    """A1111 img2img DDIM (sd_samplers_timesteps.py CompVisSampler.sample_img2img: xi = sqrt(a) x + sqrt(1-a) n
    at timesteps[t_enc], first call at timesteps[t_enc - 1]) with a mask: CFGDenoiserTimesteps blends the VP
    latent with the clean init_latent before the callback (mask_before_denoising), so 7/8 of the latent
    carries no noise. Weighted by nmask the guard passes; unweighted it would see k ~ sigma / 8."""
    g = torch.Generator().manual_seed(3)
    init, noise = torch.randn(B, 4, 8, 8, generator=g), torch.randn(B, 4, 8, 8, generator=g)
    delta = torch.zeros(B, 4, 8, 8)
    nmask = torch.zeros(1, 1, 8, 8)
    nmask[..., 3] = 1.0  # the regenerated column
    steps, t_enc = 5, int(0.6 * 5)  # setup_img2img_steps, denoising strength 0.6
    timesteps = get_timesteps(steps)
    acd = SCHEDULE.alphas_cumprod
    xi = init * acd[timesteps[t_enc]].sqrt() + noise * (1 - acd[timesteps[t_enc]]).sqrt()
    sampler, errors = RecordingSampler(delta), []
    hook = PassHook(sampler, SCHEDULE, on_error=errors.append, start=InitialLatent(noise, init))
    denoiser = A1111CFGDenoiserTimesteps(Callbacks(hook), t_enc + 1)  # launch_sampling(t_enc + 1)
    denoiser.init_latent, denoiser.mask, denoiser.nmask = init, 1 - nmask, nmask
    ddim(denoiser, xi, timesteps[:t_enc], {"uncond": UNCOND, "cond": COND, "cond_scale": CFG})
    assert errors == [] and len(sampler.calls) == t_enc - 1
    sigma = ((1 - ACD64[timesteps[t_enc - 1]]) / ACD64[timesteps[t_enc - 1]]).sqrt()
    assert torch.allclose(sampler.calls[0][1].double(), sigma.expand(B), rtol=1e-5)
    blended_ve = (xi * nmask + init * (1 - nmask)) * (1 + sigma.float() ** 2).sqrt()
    assert torch.allclose(sampler.calls[0][0], blended_ve, rtol=1e-4, atol=1e-5)
    k_everywhere = float(noise_scale(blended_ve, InitialLatent(noise, init)))
    with pytest.raises(HostMismatch):
        check_noise_scale(k_everywhere, float(sigma), InitialLatent(noise, init))


def test_both_host_forms_hand_the_sampler_identical_values():
    _, a1111, _, _ = run_ddim(A1111CFGDenoiserTimesteps)
    _, forge, _, _ = run_ddim(ForgeCFGDenoiserTimesteps)
    for (xa, sa, ka, _), (xf, sf, kf, _) in zip(a1111.calls, forge.calls, strict=True):
        assert ka == kf and torch.allclose(sa, sf, rtol=1e-5) and torch.allclose(xa, xf, rtol=1e-4, atol=1e-5)


def test_forge_form_sigma_is_not_converted_a_second_time():
    """Regression: Forge's DDIM denoiser hands a real sigma; reading it as a timestep (t_to_sigma) gave
    sigma(5.13) ~ 0.05 instead of 5.13."""
    _, sampler, _, _ = run_ddim(ForgeCFGDenoiserTimesteps)
    first_sigma = sampler.calls[0][1]
    real = ((1 - ACD64[801]) / ACD64[801]).sqrt()
    assert torch.allclose(first_sigma.double(), real.expand(B), rtol=1e-5)
    assert not torch.allclose(first_sigma, SCHEDULE.t_to_sigma(first_sigma), rtol=0.5)


def test_forge_at_cfg_1_hands_no_uncond():
    """Forge/Neo processing.py sets uc = None at CFG 1 (text_uncond None): the B rows are x's rows."""
    out, sampler, errors, _ = run_ddim(ForgeCFGDenoiserTimesteps, cond_scale=1.0, uncond=None)
    expected, _ = ddim_by_hand(cond_scale=1.0, uncond=None)
    assert errors == [] and len(sampler.calls) == 4
    assert torch.allclose(out.double(), expected, rtol=1e-4, atol=1e-5)


def test_hands_timesteps_reads_the_denoiser_as_each_host_builds_it():
    callbacks = types.SimpleNamespace()
    assert hands_timesteps(A1111CFGDenoiserTimesteps(callbacks, 1))      # A1111 DDIM/PLMS/UniPC
    assert not hands_timesteps(ForgeCFGDenoiserTimesteps(callbacks, 1))  # Forge/Neo/reForge DDIM...
    # k-diffusion samplers: A1111's CompVisDenoiser has `sigmas`; Forge's CFGDenoiser sets
    # classic_ddim_eps_estimation = False and its ForgeScheduleLinker has `sigmas` too
    assert not hands_timesteps(types.SimpleNamespace(inner_model=types.SimpleNamespace(sigmas=SCHEDULE.sigmas)))
    assert not hands_timesteps(types.SimpleNamespace(classic_ddim_eps_estimation=False,
                                                     inner_model=types.SimpleNamespace(sigmas=SCHEDULE.sigmas)))


def test_the_guard_catches_the_old_double_conversion_on_forge(monkeypatch):
    """With the pre-fix rule (timesteps whenever inner_model has no `sigmas`), Forge's converted values are
    converted again: the first call stops with HostMismatch and no step is corrected."""
    # patch the module PassHook runs in (the A1111 stand-in re-imports lib_deltasampling, so the name
    # `lib_deltasampling.webui.hooks_cfg` may by now be another module object than the one imported above)
    monkeypatch.setitem(PassHook.on_cfg_denoiser.__globals__, "hands_timesteps",
                        lambda d: not hasattr(d.inner_model, "sigmas"))
    out, sampler, errors, hook = run_ddim(ForgeCFGDenoiserTimesteps)
    assert len(errors) == 1 and isinstance(errors[0], HostMismatch) and hook.failed
    assert sampler.calls == []
    assert torch.allclose(out.double(), ddim_by_hand(with_delta=False)[0], rtol=1e-4, atol=1e-5)  # the plain run


# ---------------------------------------------------------------- the guard by hand

def test_noise_scale_is_the_projection_on_the_initial_noise():
    g = torch.Generator().manual_seed(2)
    noise, base = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    assert float(noise_scale(7.5 * noise, InitialLatent(noise))) == pytest.approx(7.5, rel=1e-5)
    # img2img inpainting: the preserved half holds garbage (A1111 DDIM blends before the callback);
    # nmask (1 where the image is regenerated) keeps it out
    nmask = torch.zeros(1, 1, 8, 8)
    nmask[..., :4] = 1.0
    x = (base + 3.25 * noise) * nmask + 100 * torch.randn(1, 4, 8, 8, generator=g) * (1 - nmask)
    assert float(noise_scale(x, InitialLatent(noise, base), nmask)) == pytest.approx(3.25, rel=1e-5)
    # by hand over the kept area
    keep = nmask.expand_as(x).bool()
    by_hand = ((x - base)[keep] * noise[keep]).sum() / (noise[keep] ** 2).sum()
    assert float(by_hand) == pytest.approx(3.25, rel=1e-5)


@pytest.mark.parametrize("sigma,k,extra", [
    (14.6146, 14.6146, 0.0),                      # txt2img: noise * sigma
    (14.6146, math.sqrt(1 + 14.6146 ** 2), 0.0),  # txt2img with the SGM noise multiplier / DDIM's VP start
    (0.03, 1.0, 0.0),                             # near the end: sqrt(1 + sigma^2) ~ 1
    (2.0, 2.5, 0.5),                              # img2img with img2img_extra_noise 0.5: sigma + extra
    (3.0, 1.0, 0.0),                              # the low edge: sigma / 3
    (3.0, 3 * math.sqrt(10), 0.0),                # the high edge: 3 sqrt(1 + sigma^2)
])
def test_check_noise_scale_accepts_what_hosts_start_from(sigma, k, extra):
    check_noise_scale(k, sigma, InitialLatent(torch.zeros(1), extra=extra))


@pytest.mark.parametrize("sigma,k", [
    (float(SCHEDULE.t_to_sigma(torch.tensor(14.6146))), 14.6146 * 1.007),  # a sigma converted twice (~0.118)
    (999.0, 14.6),                                                        # a timestep read as a sigma
    (3.0, 0.99),                                                          # just below sigma / 3
    (3.0, 3 * math.sqrt(10) * 1.01),                                      # just above 3 sqrt(1 + sigma^2)
])
def test_check_noise_scale_refuses_a_mismatch(sigma, k):
    with pytest.raises(HostMismatch, match="report the WebUI"):
        check_noise_scale(k, sigma, InitialLatent(torch.zeros(1)))


def test_a_mismatching_first_call_reports_and_leaves_the_prediction_alone():
    """A k-diffusion denoiser (inner_model has sigmas) handed sigma 999 while the latent carries noise of
    scale 14.6: on_error gets HostMismatch, the sampler is never called, after-CFG leaves params.x as it is,
    and later calls are ignored."""
    noise, delta = _noise_and_delta()
    sampler, errors = RecordingSampler(delta), []
    hook = PassHook(sampler, SCHEDULE, on_error=errors.append, start=InitialLatent(noise))
    denoiser = types.SimpleNamespace(inner_model=types.SimpleNamespace(sigmas=SCHEDULE.sigmas),
                                     classic_ddim_eps_estimation=False, mask=None, nmask=None,
                                     steps=STEPS, total_steps=STEPS, step=0)
    x = 14.6 * noise
    for _ in range(2):
        hook.on_cfg_denoiser(CFGDenoiserParams(x, None, torch.full((B,), 999.0), 0, STEPS, COND, None, denoiser))
        denoised = torch.randn(B, 4, 3, 3)
        after = AfterCFGCallbackParams(denoised, 0, STEPS)
        hook.on_cfg_after_cfg(after)
        assert after.x is denoised
    assert len(errors) == 1 and isinstance(errors[0], HostMismatch) and sampler.calls == []


def test_a_matching_first_call_checks_once_then_drops_the_start():
    noise, delta = _noise_and_delta()
    sampler, errors = RecordingSampler(delta), []
    hook = PassHook(sampler, SCHEDULE, on_error=errors.append, start=InitialLatent(noise))
    denoiser = types.SimpleNamespace(inner_model=types.SimpleNamespace(sigmas=SCHEDULE.sigmas),
                                     classic_ddim_eps_estimation=False, mask=None, nmask=None,
                                     steps=STEPS, total_steps=STEPS, step=0)
    sigma = torch.full((B,), 14.6146)
    hook.on_cfg_denoiser(CFGDenoiserParams(sigma[0] * noise, None, sigma, 0, STEPS, COND, None, denoiser))
    assert hook.start is None
    denoised = torch.zeros(B, 4, 3, 3)
    after = AfterCFGCallbackParams(denoised, 0, STEPS)
    hook.on_cfg_after_cfg(after)
    assert errors == [] and torch.equal(after.x, delta) and sampler.calls[0][2:] == (0, STEPS)


def test_batch_rows_without_uncond_is_the_latent_batch():
    assert batch_rows(None, torch.zeros(3, 4, 8, 8)) == 3
