"""Mirrors modules/sd_samplers_kdiffusion.py (1.10.1) for a subset of samplers: "DPM++ 2M"
(first, so the default, with Karras), "Euler a", "Euler", "Heun" (second order: two model calls
per step, `total_steps` doubled).

- `CFGDenoiserKDiffusion.inner_model`: `CompVisDenoiser` / `CompVisVDenoiser` (mirrors of
  k_diffusion.external at ab527a9: `sigmas` ascending training sigmas, `log_sigmas`,
  `sigma_to_t` (log-sigma interpolation, or nearest with quantize), `t_to_sigma`,
  `get_sigmas(n)`, `forward(x, sigma, cond=...)` = x0 from `sd_model.apply_model(x * c_in, t, cond)`).
- `KDiffusionSampler.get_sigmas(p, steps)` (scheduler / hr_scheduler / "Automatic" = the
  sampler's default, discard penultimate sigma, "Schedule type" / "Hires schedule type"
  infotext), `sample` (x * sigmas[0], or sqrt(1 + sigma0^2) with sgm_noise_multiplier) and
  `sample_img2img` (sigmas[steps - t_enc - 1:], xi = x + noise * sigma_sched[0], launch with
  t_enc + 1).
- Sampler functions have k-diffusion's signatures (`model(x, sigma, **extra_args)`,
  `callback({'x','i','sigma','sigma_hat','denoised'})` after each model call of a step);
  Euler / Euler a / DPM++ 2M are the project's `runner.sampling` implementations behind that
  signature, Heun is written here. Ancestral noise comes from `p.rng.next()` (A1111's TorchHijack).
  Sigma churn, custom sigma_min/sigma_max/rho settings are not modelled.
"""

from __future__ import annotations

import inspect

import torch

import modules.shared as shared
from lib_deltasampling.runner import sampling as _rs
from modules import sd_samplers_cfg_denoiser, sd_samplers_common, sd_schedulers
from modules.script_callbacks import ExtraNoiseParams, extra_noise_callback
from modules.shared import opts


def _append_dims(v, ndim):
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


class CompVisDenoiser(torch.nn.Module):
    """k_diffusion.external.CompVisDenoiser: eps model -> x0 = x - sigma * eps."""

    def __init__(self, model, quantize=False):
        super().__init__()
        self.inner_model = model
        sigmas = ((1 - model.alphas_cumprod) / model.alphas_cumprod) ** 0.5
        self.register_buffer('sigmas', sigmas)
        self.register_buffer('log_sigmas', sigmas.log())
        self.quantize = quantize
        self.sigma_data = 1.

    @property
    def sigma_min(self):
        return self.sigmas[0]

    @property
    def sigma_max(self):
        return self.sigmas[-1]

    def get_sigmas(self, n=None):
        if n is None:
            return _rs.append_zero(self.sigmas.flip(0))
        t = torch.linspace(len(self.sigmas) - 1, 0, n, device=self.sigmas.device)
        return _rs.append_zero(self.t_to_sigma(t))

    def sigma_to_t(self, sigma, quantize=None):
        quantize = self.quantize if quantize is None else quantize
        log_sigma = sigma.log()
        dists = log_sigma - self.log_sigmas[:, None]
        if quantize:
            return dists.abs().argmin(dim=0).view(sigma.shape)
        low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = self.log_sigmas[low_idx], self.log_sigmas[high_idx]
        w = ((low - log_sigma) / (low - high)).clamp(0, 1)
        return ((1 - w) * low_idx + w * high_idx).view(sigma.shape)

    def t_to_sigma(self, t):
        t = t.float()
        low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low_idx] + w * self.log_sigmas[high_idx]).exp()

    def get_scalings(self, sigma):
        return -sigma, 1 / (sigma ** 2 + self.sigma_data ** 2) ** 0.5

    def get_eps(self, *args, **kwargs):
        return self.inner_model.apply_model(*args, **kwargs)

    def forward(self, input, sigma, **kwargs):
        c_out, c_in = [_append_dims(x, input.ndim) for x in self.get_scalings(sigma)]
        eps = self.get_eps(input * c_in, self.sigma_to_t(sigma), **kwargs)
        return input + eps * c_out


class CompVisVDenoiser(CompVisDenoiser):
    """k_diffusion.external.CompVisVDenoiser: v model -> x0 = v * c_out + x * c_skip."""

    def get_scalings(self, sigma):
        c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
        c_out = -sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2) ** 0.5
        c_in = 1 / (sigma ** 2 + self.sigma_data ** 2) ** 0.5
        return c_skip, c_out, c_in

    def get_v(self, *args, **kwargs):
        return self.inner_model.apply_model(*args, **kwargs)

    def forward(self, input, sigma, **kwargs):
        c_skip, c_out, c_in = [_append_dims(x, input.ndim) for x in self.get_scalings(sigma)]
        return self.get_v(input * c_in, self.sigma_to_t(sigma), **kwargs) * c_out + input * c_skip


def _callback(callback, sigmas):
    if callback is None:
        return None
    return lambda i, x, denoised: callback({'x': x, 'i': i, 'sigma': sigmas[i], 'sigma_hat': sigmas[i], 'denoised': denoised})


def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                 s_tmax=float('inf'), s_noise=1.):
    assert s_churn == 0, "the stand-in's Euler has no churn"
    extra_args = extra_args or {}
    return _rs.sample_euler(lambda x_, s, i: model(x_, s, **extra_args), x, sigmas, callback=_callback(callback, sigmas))


def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                           noise_sampler=None):
    extra_args = extra_args or {}
    return _rs.sample_euler_ancestral(lambda x_, s, i: model(x_, s, **extra_args), x, sigmas,
                                      callback=_callback(callback, sigmas), noise_sampler=noise_sampler,
                                      eta=eta, s_noise=s_noise)


def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None):
    extra_args = extra_args or {}
    return _rs.sample_dpmpp_2m(lambda x_, s, i: model(x_, s, **extra_args), x, sigmas, callback=_callback(callback, sigmas))


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                s_tmax=float('inf'), s_noise=1.):
    """Heun's method (Karras et al. 2022 Algorithm 2) without churn: an Euler step, then the
    average of both slopes; the step to sigma = 0 is plain Euler (one model call)."""
    assert s_churn == 0, "the stand-in's Heun has no churn"
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        d = (x - denoised) / sigma
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': sigma, 'sigma_hat': sigma, 'denoised': denoised})
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = model(x_2, sigma_next * s_in, **extra_args)
            d_2 = (x_2 - denoised_2) / sigma_next
            x = x + (d + d_2) / 2 * dt
    return x


samplers_k_diffusion = [
    ('DPM++ 2M', sample_dpmpp_2m, ['k_dpmpp_2m'], {'scheduler': 'karras'}),
    ('Euler a', sample_euler_ancestral, ['k_euler_a', 'k_euler_ancestral'], {"uses_ensd": True}),
    ('Euler', sample_euler, ['k_euler'], {}),
    ('Heun', sample_heun, ['k_heun'], {"second_order": True}),
]

samplers_data_k_diffusion = [
    sd_samplers_common.SamplerData(label, lambda model, funcname=funcname: KDiffusionSampler(funcname, model), aliases, options)
    for label, funcname, aliases, options in samplers_k_diffusion
]

sampler_extra_params = {
    sample_euler: ['s_churn', 's_tmin', 's_tmax', 's_noise'],
    sample_heun: ['s_churn', 's_tmin', 's_tmax', 's_noise'],
}

k_diffusion_samplers_map = {x.name: x for x in samplers_data_k_diffusion}


class CFGDenoiserKDiffusion(sd_samplers_cfg_denoiser.CFGDenoiser):
    @property
    def inner_model(self):
        if self.model_wrap is None:
            denoiser_constructor = getattr(shared.sd_model, 'create_denoiser', None)
            if denoiser_constructor is not None:
                self.model_wrap = denoiser_constructor()
            else:
                denoiser = CompVisVDenoiser if shared.sd_model.parameterization == "v" else CompVisDenoiser
                self.model_wrap = denoiser(shared.sd_model, quantize=shared.opts.enable_quantization)
        return self.model_wrap


class KDiffusionSampler(sd_samplers_common.Sampler):
    def __init__(self, funcname, sd_model, options=None):
        super().__init__(funcname)
        self.extra_params = sampler_extra_params.get(funcname, [])
        self.options = options or {}
        self.func = funcname
        self.model_wrap_cfg = CFGDenoiserKDiffusion(self)
        self.model_wrap = self.model_wrap_cfg.inner_model

    def initialize(self, p) -> dict:
        kwargs = super().initialize(p)
        if 'noise_sampler' in inspect.signature(self.func).parameters:
            # k-diffusion's default noise sampler is torch.randn_like, which A1111 routes to p.rng.next()
            kwargs['noise_sampler'] = lambda sigma, sigma_next: p.rng.next()
        return kwargs

    def get_sigmas(self, p, steps):
        discard_next_to_last_sigma = self.config is not None and self.config.options.get('discard_next_to_last_sigma', False)
        if opts.always_discard_next_to_last_sigma and not discard_next_to_last_sigma:
            discard_next_to_last_sigma = True
            p.extra_generation_params["Discard penultimate sigma"] = True

        steps += 1 if discard_next_to_last_sigma else 0

        scheduler_name = (p.hr_scheduler if p.is_hr_pass else p.scheduler) or 'Automatic'
        if scheduler_name == 'Automatic':
            scheduler_name = self.config.options.get('scheduler', None)
        scheduler = sd_schedulers.schedulers_map.get(scheduler_name)

        if p.sampler_noise_scheduler_override:
            sigmas = p.sampler_noise_scheduler_override(steps)
        elif scheduler is None or scheduler.function is None:
            sigmas = self.model_wrap.get_sigmas(steps)
        else:
            if scheduler.label != 'Automatic' and not p.is_hr_pass:
                p.extra_generation_params["Schedule type"] = scheduler.label
            elif scheduler.label != p.extra_generation_params.get("Schedule type"):
                p.extra_generation_params["Hires schedule type"] = scheduler.label
            sigmas = scheduler.function(steps, _rs.a1111_schedule_table(), sdxl=shared.sd_model.is_sdxl)

        if discard_next_to_last_sigma:
            sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
        return sigmas.cpu()

    def sample_img2img(self, p, x, noise, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps, t_enc = sd_samplers_common.setup_img2img_steps(p, steps)
        sigmas = self.get_sigmas(p, steps)
        sigma_sched = sigmas[steps - t_enc - 1:]

        xi = x + noise * sigma_sched[0]
        if opts.img2img_extra_noise > 0:
            p.extra_generation_params["Extra noise"] = opts.img2img_extra_noise
            extra_noise_params = ExtraNoiseParams(noise, x, xi)
            extra_noise_callback(extra_noise_params)
            noise = extra_noise_params.noise
            xi += noise * opts.img2img_extra_noise

        extra_params_kwargs = self.initialize(p)
        if 'sigmas' in inspect.signature(self.func).parameters:
            extra_params_kwargs['sigmas'] = sigma_sched

        self.model_wrap_cfg.init_latent = x
        self.last_latent = x
        self.sampler_extra_args = {'cond': conditioning, 'image_cond': image_conditioning, 'uncond': unconditional_conditioning,
                                   'cond_scale': p.cfg_scale, 's_min_uncond': self.s_min_uncond}
        samples = self.launch_sampling(t_enc + 1, lambda: self.func(self.model_wrap_cfg, xi, extra_args=self.sampler_extra_args,
                                                                    disable=False, callback=self.callback_state, **extra_params_kwargs))
        self.add_infotext(p)
        return samples

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps = steps or p.steps
        sigmas = self.get_sigmas(p, steps)

        if opts.sgm_noise_multiplier:
            p.extra_generation_params["SGM noise multiplier"] = True
            x = x * torch.sqrt(1.0 + sigmas[0] ** 2.0)
        else:
            x = x * sigmas[0]

        extra_params_kwargs = self.initialize(p)
        if 'sigmas' in inspect.signature(self.func).parameters:
            extra_params_kwargs['sigmas'] = sigmas

        self.last_latent = x
        self.sampler_extra_args = {'cond': conditioning, 'image_cond': image_conditioning, 'uncond': unconditional_conditioning,
                                   'cond_scale': p.cfg_scale, 's_min_uncond': self.s_min_uncond}
        samples = self.launch_sampling(steps, lambda: self.func(self.model_wrap_cfg, x, extra_args=self.sampler_extra_args,
                                                                disable=False, callback=self.callback_state, **extra_params_kwargs))
        self.add_infotext(p)
        return samples

