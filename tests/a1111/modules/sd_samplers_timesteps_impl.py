"""Mirrors modules/sd_samplers_timesteps_impl.py `ddim(model, x, timesteps, extra_args, callback,
disable, eta)`: timesteps ascending; len(timesteps) - 1 model calls from the highest timestep
down (index = len - 1 - i), the previous alpha of index k is that of timesteps[k - 1] (of
timestep 0 for k = 0); `pred_x0 = (x - sqrt(1 - a_t) e_t) / sqrt(a_t)`; noise from p.rng."""

import torch


@torch.no_grad()
def ddim(model, x, timesteps, extra_args=None, callback=None, disable=None, eta=0.0, noise_source=None):
    alphas_cumprod = model.inner_model.inner_model.alphas_cumprod
    alphas = alphas_cumprod[timesteps]
    alphas_prev = alphas_cumprod[torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))].to(torch.float64)
    sqrt_one_minus_alphas = torch.sqrt(1 - alphas)
    a, a_prev = alphas.cpu().double(), alphas_prev.cpu()
    sigmas = eta * torch.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))   # A1111 mixes numpy and torch here

    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones((x.shape[0]))
    s_x = x.new_ones((x.shape[0], 1, 1, 1))
    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        e_t = model(x, timesteps[index].item() * s_in, **extra_args)

        a_t = alphas[index].item() * s_x
        a_prev = alphas_prev[index].item() * s_x
        sigma_t = sigmas[index].item() * s_x
        sqrt_one_minus_at = sqrt_one_minus_alphas[index].item() * s_x

        pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
        dir_xt = (1. - a_prev - sigma_t ** 2).sqrt() * e_t
        noise = sigma_t * (noise_source() if noise_source is not None else torch.randn_like(x))
        x = a_prev.sqrt() * pred_x0 + dir_xt + noise

        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': 0, 'sigma_hat': 0, 'denoised': pred_x0})
    return x
