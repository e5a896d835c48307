"""k-diffusion-style denoiser for the discrete VP schedule of SD1.x, SD2.x and SDXL.

Conventions (the hosts' own, see host-notes): the sampler works in variance-exploding form
`x = x0 + sigma * eps` in *scaled* latent space. The network sees `x * c_in` with
`c_in = 1 / sqrt(sigma^2 + 1)` (the DDPM latent) and a timestep `t` found from sigma on the
1000-step training schedule; the wrapper turns its output (eps or v) into `x0`.

Schedule, as ldm `make_beta_schedule("linear")` with SD's linear_start/end and Forge
`k_prediction.Prediction.register_schedule`: betas = linspace(sqrt(0.00085), sqrt(0.012), 1000)^2,
computed in float64 like both; alphas_cumprod and sigmas are kept in float32.
(A1111 stores alphas_cumprod in float32 first and takes sigmas in float32: relative
difference <= 1.3e-5 at sigma_min, identical sigma_max.)

sigma -> t, two conventions:
- "interpolate" (A1111 = k-diffusion `DiscreteSchedule.sigma_to_t`, quantize off): fractional t,
  piecewise linear in log sigma between the two neighbouring training steps, clamped to [0, 999].
- "nearest" (Forge `Prediction.timestep`, reForge/ComfyUI `ModelSamplingDiscrete.timestep`, A1111
  with "enable_quantization"): the training step whose log sigma is nearest, an integer.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import Any

import torch

from ..errors import SettingError

# VAE latent scale factors (ldm `scale_factor`; sgm `sd_xl_base.yaml`).
LATENT_SCALE = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}

TIMESTEP_MODES = ("interpolate", "nearest")


def latent_scale_factor(family: str) -> float:
    """Scale factor between the VAE's raw latent and the latent the UNet works on."""
    try:
        return LATENT_SCALE[family]
    except KeyError:
        raise SettingError("model family", f"'{family}' is not a known model family",
                           f"Use one of: {', '.join(LATENT_SCALE)}") from None


def sd_alphas_cumprod(steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """alpha-bar of SD's "scaled linear" betas, float64 on the CPU (as ldm/Forge compute it)."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def _check_mode(mode: str) -> str:
    if mode not in TIMESTEP_MODES:
        raise SettingError("timestep mode", f"'{mode}' is not a timestep mode",
                           f"Use one of: {', '.join(TIMESTEP_MODES)}")
    return mode


class DiscreteSchedule:
    """sigma <-> t over the discrete training schedule (ascending sigmas, index = timestep).

    Tables live in float32; a copy per device is cached on this object (first use on a
    device copies 8 KB once, later calls are pure device ops with no host sync).
    """

    def __init__(self, alphas_cumprod: torch.Tensor | None = None) -> None:
        ac = sd_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod.detach().to("cpu", torch.float64)
        sigmas = ((1.0 - ac) / ac).sqrt()
        self.alphas_cumprod = ac.float()
        self.sigmas = sigmas.float()
        self.log_sigmas = sigmas.log().float()
        # Python floats, read once here from CPU tensors (no device sync later).
        self.sigma_min = float(self.sigmas[0])
        self.sigma_max = float(self.sigmas[-1])
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def num_steps(self) -> int:
        return self.sigmas.shape[0]

    def tables(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigmas, log_sigmas) as float32 on `device`."""
        device = torch.device(device)
        found = self._tables.get(device)
        if found is None:
            found = (self.sigmas.to(device), self.log_sigmas.to(device))
            self._tables[device] = found
        return found

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """sigma at (fractional) timestep t: log sigma interpolated linearly between steps."""
        _, log_sigmas = self.tables(t.device)
        t = t.float().clamp(0, self.num_steps - 1)
        low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t.frac()
        log_sigma = (1 - w) * log_sigmas[low_idx] + w * log_sigmas[high_idx]
        return log_sigma.exp()

    def sigma_to_t(self, sigma: torch.Tensor, mode: str = "interpolate") -> torch.Tensor:
        """Timestep for each sigma: float32 (interpolate) or int64 (nearest), same shape as sigma."""
        _check_mode(mode)
        _, log_sigmas = self.tables(sigma.device)
        log_sigma = sigma.float().log().unsqueeze(-1)            # [..., 1] against [N]
        if mode == "nearest":
            return (log_sigma - log_sigmas).abs().argmin(dim=-1)
        # Index of the last training sigma <= sigma (ascending table), kept inside [0, N-2]
        # so that [low, low+1] is a valid segment; outside the table w clamps to 0 or 1.
        low_idx = ((log_sigmas <= log_sigma).sum(dim=-1) - 1).clamp(0, self.num_steps - 2)
        high_idx = low_idx + 1
        low, high = log_sigmas[low_idx], log_sigmas[high_idx]
        w = ((low - log_sigma.squeeze(-1)) / (low - high)).clamp(0, 1)
        return (1 - w) * low_idx + w * high_idx


class Prediction(str, Enum):
    """What the network outputs."""
    EPS = "eps"
    V = "v"


def _append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


class Denoiser:
    """Turns a network `net(x_in, t, **cond) -> eps | v` into `denoise(x, sigma, **cond) -> x0`.

    Scalings (k-diffusion `CompVisDenoiser` / `CompVisVDenoiser`, sigma_data = 1):
      c_in   = 1 / sqrt(sigma^2 + 1)
      eps:  x0 = x - sigma * eps                      (c_skip = 1, c_out = -sigma)
      v:    x0 = x * c_skip + v * c_out,  c_skip = 1 / (sigma^2 + 1),  c_out = -sigma / sqrt(sigma^2 + 1)

    Dtypes: as Forge's KModel (and A1111, whose sampler x and sigmas are float32), the scalings and
    the x0 combination are computed in float32; the network gets `x * c_in` cast to `net_dtype`
    (default: x's dtype) and `t` as float32 [B]; x0 is returned in x's dtype. So float16 x gives
    float16 x0 (with float32 arithmetic inside), float32 x gives float32 x0 whatever the network runs in.
    """

    def __init__(self, net: Callable[..., torch.Tensor], prediction: Prediction | str,
                 schedule: DiscreteSchedule | None = None, *, timestep_mode: str = "interpolate",
                 net_dtype: torch.dtype | None = None) -> None:
        self.net = net
        self.prediction = Prediction(prediction)
        self.schedule = schedule if schedule is not None else DiscreteSchedule()
        self.timestep_mode = _check_mode(timestep_mode)
        self.net_dtype = net_dtype

    @property
    def sigma_min(self) -> float:
        return self.schedule.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.schedule.sigma_max

    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c_skip, c_out, c_in) in float32, shaped like sigma."""
        sigma = sigma.float()
        c_in = (sigma ** 2 + 1) ** -0.5
        if self.prediction is Prediction.V:
            return c_in ** 2, -sigma * c_in, c_in
        return torch.ones_like(sigma), -sigma, c_in

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The network's `t` for each sigma, float32 (integer-valued in "nearest" mode)."""
        return self.schedule.sigma_to_t(sigma, self.timestep_mode).float()

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond: Any) -> torch.Tensor:
        """x0 for noisy x [B, ...] at noise level sigma ([B], or a scalar for the whole batch)."""
        sigma = torch.as_tensor(sigma, device=x.device).float()
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        if sigma.shape != x.shape[:1]:
            raise ValueError(f"sigma has shape {list(sigma.shape)}, expected [{x.shape[0]}] for x of shape {list(x.shape)}")
        c_skip, c_out, c_in = (_append_dims(c, x.ndim) for c in self.scalings(sigma))
        xf = x.float()
        x_in = (xf * c_in).to(self.net_dtype or x.dtype)
        out = self.net(x_in, self.timestep(sigma), **cond)
        return (xf * c_skip + out.float() * c_out).to(x.dtype)

    __call__ = denoise
