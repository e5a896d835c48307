"""Samplers, sigma schedules and seeded noise of the standalone runner, as A1111 v1.10.1 runs them.

Conventions are k-diffusion's (A1111 pins crowsonkb/k-diffusion at ab527a9a): `x = x0 + sigma * n`,
sigmas descending with a final 0, float32 on the CPU (A1111's `KDiffusionSampler.get_sigmas` returns
`sigmas.cpu()`, so the per-step comparisons below never wait for a GPU). A sampler calls

    denoised = model(x, sigma_batch, step)        # sigma_batch: [B]; step: 0 .. len(sigmas) - 2

The step index is passed so that Delta Sampling schedules by step; a second-order sampler would
pass the same step for both of its calls.

Schedules are A1111's (`modules/sd_schedulers.py`, and k-diffusion's `get_sigmas_*`), built from the
model's discrete training table (`runtime.denoiser.DiscreteSchedule`): sigma_min/sigma_max are the
table's ends (~0.0292 / ~14.6146), as A1111 takes `model_wrap.sigmas[0]` and `[-1]`.

Noise is A1111's with "Random number generator source: CPU" (`modules/rng.py` `ImageRNG`): one
`torch.Generator("cpu")` per image seeded with that image's seed; its first draw is the initial
latent noise, its later draws are the ancestral noises (k-diffusion's `torch.randn_like` is replaced
by `ImageRNG.next` through `sd_samplers_common.TorchHijack`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import SettingError
from ..runtime.denoiser import DiscreteSchedule, sd_alphas_cumprod

Model = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
Callback = Callable[[int, torch.Tensor, torch.Tensor], None]
NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# A1111 `modules/processing.py`: opt_C latent channels, opt_f VAE downscale factor.
LATENT_CHANNELS = 4
LATENT_FACTOR = 8


# ------------------------------------------------------------------------------------ schedules

def append_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.new_zeros([1])])


def a1111_schedule_table() -> DiscreteSchedule:
    """The training table as A1111 samples with it: alphas_cumprod computed in float64 and stored in
    float32 (ldm `register_schedule` `to_torch`; SDXL `torch.asarray(LegacyDDPMDiscretization().
    alphas_cumprod, dtype=float32)`), sigmas taken from those. Within 1.2e-7 (relative) of A1111's
    own float32 sigmas; `DiscreteSchedule()` (float64 alphas_cumprod) is up to 1.3e-5 away."""
    return DiscreteSchedule(sd_alphas_cumprod().float())


def _sigma_range(table: DiscreteSchedule) -> tuple[float, float]:
    """(sigma_min, sigma_max): Python floats of the float32 table ends (A1111: `.item()` of both)."""
    return table.sigma_min, table.sigma_max


def _t(table: DiscreteSchedule, sigma: float) -> float:
    """A1111 `inner_model.sigma_to_t(torch.tensor(sigma))` (interpolated, quantization off)."""
    return float(table.sigma_to_t(torch.tensor(sigma), "interpolate"))


def sigmas_uniform(n: int, table: DiscreteSchedule, **_: object) -> torch.Tensor:
    """k-diffusion `DiscreteSchedule.get_sigmas(n)`: t = linspace(999, 0, n), log sigma interpolated."""
    t = torch.linspace(table.num_steps - 1, 0, n)
    return append_zero(table.t_to_sigma(t))


def sigmas_karras(n: int, table: DiscreteSchedule, rho: float = 7.0, **_: object) -> torch.Tensor:
    """Karras et al. (2022): uniform in sigma^(1/rho) from sigma_max to sigma_min."""
    sigma_min, sigma_max = _sigma_range(table)
    ramp = torch.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def sigmas_exponential(n: int, table: DiscreteSchedule, **_: object) -> torch.Tensor:
    """Uniform in log sigma from sigma_max to sigma_min."""
    sigma_min, sigma_max = _sigma_range(table)
    return append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp())


def sigmas_polyexponential(n: int, table: DiscreteSchedule, rho: float = 1.0, **_: object) -> torch.Tensor:
    """log sigma a polynomial (degree rho) in the ramp; rho = 1 is the exponential schedule."""
    sigma_min, sigma_max = _sigma_range(table)
    ramp = torch.linspace(1, 0, n) ** rho
    return append_zero(torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)))


def sigmas_normal(n: int, table: DiscreteSchedule, sgm: bool = False, **_: object) -> torch.Tensor:
    """A1111 `normal_scheduler`: t uniform from t(sigma_max) to t(sigma_min), n points (sgm: n of n+1)."""
    sigma_min, sigma_max = _sigma_range(table)
    start, end = _t(table, sigma_max), _t(table, sigma_min)
    t = torch.linspace(start, end, n + 1)[:-1] if sgm else torch.linspace(start, end, n)
    return append_zero(table.t_to_sigma(t))


def sigmas_sgm_uniform(n: int, table: DiscreteSchedule, **_: object) -> torch.Tensor:
    """A1111 `sgm_uniform` (SGM's discretization): t = linspace(t_max, t_min, n + 1) without its end."""
    return sigmas_normal(n, table, sgm=True)


def sigmas_simple(n: int, table: DiscreteSchedule, **_: object) -> torch.Tensor:
    """A1111 `simple_scheduler`: every (1000/n)-th training sigma from the top, floor-indexed."""
    stride = table.num_steps / n
    picked = [float(table.sigmas[-(1 + int(x * stride))]) for x in range(n)]
    return torch.tensor(picked + [0.0], dtype=torch.float32)


def sigmas_ddim(n: int, table: DiscreteSchedule, **_: object) -> torch.Tensor:
    """A1111 `ddim_scheduler`: training sigmas at t = 1, 1 + s, 1 + 2s, ... (s = 1000 // n), reversed.

    As A1111, the length is not always n + 1 (n = 30: s = 33 gives 31 sigmas before the 0)."""
    stride = max(table.num_steps // n, 1)
    picked = [float(table.sigmas[t]) for t in range(1, table.num_steps, stride)]
    return torch.tensor(picked[::-1] + [0.0], dtype=torch.float32)


def sigmas_kl_optimal(n: int, table: DiscreteSchedule, **_: object) -> torch.Tensor:
    """A1111 `kl_optimal`: uniform in arctan(sigma). As A1111, it ends at sigma_min, not at 0."""
    sigma_min, sigma_max = _sigma_range(table)
    alpha_min = torch.arctan(torch.tensor(sigma_min))
    alpha_max = torch.arctan(torch.tensor(sigma_max))
    step = torch.arange(n + 1)
    return torch.tan(step / n * alpha_min + (1.0 - step / n) * alpha_max)


# A1111 `get_align_your_steps_sigmas`: NVIDIA's 10-step tables for SD1.5 and SDXL.
AYS_SD15 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)
AYS_SDXL = (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029)


def sigmas_align_your_steps(n: int, table: DiscreteSchedule, sdxl: bool = False, **_: object) -> torch.Tensor:
    """Align Your Steps: the fixed table, log-linearly resampled to n points when n != 11."""
    knots = list(AYS_SDXL if sdxl else AYS_SD15)
    if n == len(knots):
        return torch.tensor(knots + [0.0], dtype=torch.float32)
    # loglinear_interp: interpolate log sigma (ascending) over [0, 1], then back to descending.
    xs = np.linspace(0, 1, len(knots))
    ys = np.log(knots[::-1])
    resampled = np.exp(np.interp(np.linspace(0, 1, n), xs, ys))[::-1]
    return torch.tensor(np.append(resampled, [0.0]), dtype=torch.float32)


ScheduleFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Schedule:
    """One entry of A1111's `sd_schedulers.schedulers`: `name` (API), `label` (UI and infotext)."""
    name: str
    label: str
    function: ScheduleFn | None            # None: "Automatic", the sampler's own default
    aliases: tuple[str, ...] = ()

    def names(self) -> tuple[str, ...]:
        return (self.label, self.name, *self.aliases)


AUTOMATIC = Schedule("automatic", "Automatic", None)

SCHEDULES: dict[str, Schedule] = {s.label: s for s in (
    AUTOMATIC,
    Schedule("uniform", "Uniform", sigmas_uniform),
    Schedule("karras", "Karras", sigmas_karras),
    Schedule("exponential", "Exponential", sigmas_exponential),
    Schedule("polyexponential", "Polyexponential", sigmas_polyexponential),
    Schedule("sgm_uniform", "SGM Uniform", sigmas_sgm_uniform, aliases=("SGMUniform",)),
    Schedule("kl_optimal", "KL Optimal", sigmas_kl_optimal),
    Schedule("align_your_steps", "Align Your Steps", sigmas_align_your_steps),
    Schedule("simple", "Simple", sigmas_simple),
    Schedule("normal", "Normal", sigmas_normal),
    Schedule("ddim", "DDIM", sigmas_ddim),
)}

# In A1111's list but not offered here (it needs scipy's beta quantile function).
UNSUPPORTED_SCHEDULES = {"beta": "Beta"}


def find_schedule(name: str) -> Schedule:
    """The schedule called `name` (label, API name or alias, any case)."""
    key = name.strip().lower()
    for schedule in SCHEDULES.values():
        if key in (n.lower() for n in schedule.names()):
            return schedule
    if key in UNSUPPORTED_SCHEDULES:
        raise SettingError("Schedule type", f"'{UNSUPPORTED_SCHEDULES[key]}' is not available in the standalone runner",
                           f"Use one of: {', '.join(SCHEDULES)}")
    raise SettingError("Schedule type", f"'{name}' is not a known schedule", f"Use one of: {', '.join(SCHEDULES)}")


# ------------------------------------------------------------------------------------ samplers

def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE's derivative dx/dsigma = (x - x0) / sigma (sigma: one value)."""
    return (x - denoised) / sigma


def ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor,
                   eta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | float]:
    """(sigma_down, sigma_up): step deterministically down to sigma_down, then add sigma_up of fresh
    noise, so that sigma_down^2 + sigma_up^2 = sigma_to^2 (eta = 1: DDPM's ancestral step)."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
    return sigma_down, sigma_up


@torch.no_grad()
def sample_euler(model: Model, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback | None = None,
                 noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """Euler steps on the ODE (Karras et al. 2022, Algorithm 2, with A1111's default s_churn = 0).

    `noise_sampler` is accepted for a common signature and not used (with s_churn = 0 Euler adds
    no noise; A1111 still draws one discarded `randn_like` per step)."""
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, i)
        if callback is not None:
            callback(i, x, denoised)
        d = to_d(x, sigma, denoised)
        x = x + d * (sigma_next - sigma)
    return x


@torch.no_grad()
def sample_euler_ancestral(model: Model, x: torch.Tensor, sigmas: torch.Tensor, *,
                           callback: Callback | None = None, noise_sampler: NoiseSampler | None = None,
                           eta: float = 1.0, s_noise: float = 1.0) -> torch.Tensor:
    """Euler down to sigma_down, then fresh noise up to sigma_next (none after the last step).

    Without `noise_sampler`, noise comes from torch's global generator (k-diffusion's default);
    the runner passes `ImageNoise.noise_sampler()` for A1111's per-image seeded noise."""
    if noise_sampler is None:
        noise_sampler = lambda sigma, sigma_next: torch.randn_like(x)  # noqa: E731
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, i)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta=eta)
        if callback is not None:
            callback(i, x, denoised)
        d = to_d(x, sigma, denoised)
        x = x + d * (sigma_down - sigma)
        if sigma_next > 0:
            x = x + noise_sampler(sigma, sigma_next) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_dpmpp_2m(model: Model, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback | None = None,
                    noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022) in k-diffusion's form, in t = -log sigma:

        x_next = (sigma_next / sigma) x - expm1(-h) D,     h = t_next - t
        D = denoised on the first step and the step to sigma = 0, else the multistep correction
        D = (1 + 1/(2r)) denoised - 1/(2r) denoised_prev,  r = h_prev / h.
    `noise_sampler` is accepted for a common signature and not used."""
    s_in = x.new_ones([x.shape[0]])
    sigma_fn = lambda t: t.neg().exp()  # noqa: E731
    t_fn = lambda sigma: sigma.log().neg()  # noqa: E731
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, i)
        if callback is not None:
            callback(i, x, denoised)
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised
        else:
            h_last = t - t_fn(sigmas[i - 1])
            r = h_last / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


SamplerFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Sampler:
    """One entry of A1111's `samplers_k_diffusion`: `name` as the UI and infotext ("Sampler:") write it."""
    name: str
    function: SamplerFn
    aliases: tuple[str, ...] = ()
    default_schedule: str | None = None    # what "Automatic" means (A1111 `options['scheduler']`)
    uses_ensd: bool = False                # draws noise after the first: eta noise seed delta applies
    discard_penultimate: bool = False      # A1111 `discard_next_to_last_sigma`

    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    def __call__(self, model: Model, x: torch.Tensor, sigmas: torch.Tensor, **kwargs: object) -> torch.Tensor:
        return self.function(model, x, sigmas, **kwargs)


SAMPLERS: dict[str, Sampler] = {s.name: s for s in (
    Sampler("Euler", sample_euler, ("k_euler",)),
    Sampler("Euler a", sample_euler_ancestral, ("k_euler_a", "k_euler_ancestral"), uses_ensd=True),
    Sampler("DPM++ 2M", sample_dpmpp_2m, ("k_dpmpp_2m",), default_schedule="karras"),
)}


def find_sampler(name: str) -> Sampler:
    """The sampler called `name` (A1111 name or alias, any case)."""
    key = name.strip().lower()
    for sampler in SAMPLERS.values():
        if key in (n.lower() for n in sampler.names()):
            return sampler
    raise SettingError("Sampler", f"'{name}' is not available in the standalone runner",
                       f"Use one of: {', '.join(SAMPLERS)}")


def parse_sampler(sampler_name: str, schedule_name: str | None = None) -> tuple[Sampler, Schedule]:
    """Sampler and schedule from infotext-style names, as A1111 `get_sampler_and_scheduler`
    (convert_automatic off): an old combined name such as "DPM++ 2M Karras" carries the schedule."""
    schedule = find_schedule(schedule_name) if schedule_name else AUTOMATIC
    name = sampler_name.strip()
    for candidate in SCHEDULES.values():
        for option in candidate.names():
            if name.lower().endswith(" " + option.lower()):
                return find_sampler(name[: -(len(option) + 1)]), candidate
    return find_sampler(name), schedule


def resolve_schedule(schedule: str | Schedule, sampler: str | Sampler | None = None) -> Schedule:
    """The schedule to run: "Automatic" becomes the sampler's default (DPM++ 2M: Karras), else
    Uniform, which is exactly what A1111 runs then (`model_wrap.get_sigmas(steps)`)."""
    schedule = find_schedule(schedule) if isinstance(schedule, str) else schedule
    if schedule.function is not None:
        return schedule
    sampler = find_sampler(sampler) if isinstance(sampler, str) else sampler
    default = sampler.default_schedule if sampler is not None else None
    return find_schedule(default or "uniform")


def infotext_schedule(schedule: str | Schedule, sampler: str | Sampler) -> str:
    """The "Schedule type" A1111 1.10 writes: the chosen label, but with "Automatic" and a sampler
    that has a default, that default's label (`get_sigmas` stores it in extra_generation_params)."""
    schedule = find_schedule(schedule) if isinstance(schedule, str) else schedule
    sampler = find_sampler(sampler) if isinstance(sampler, str) else sampler
    if schedule.function is None and sampler.default_schedule:
        return find_schedule(sampler.default_schedule).label
    return schedule.label


def get_sigmas(schedule: str | Schedule, steps: int, schedule_table: DiscreteSchedule, *,
               sampler: str | Sampler | None = None, discard_penultimate: bool = False,
               sdxl: bool = False) -> torch.Tensor:
    """Sigmas for `steps` steps: float32 on the CPU, descending, steps + 1 values ending in 0 (as
    A1111: "DDIM" may have another length and "KL Optimal" ends at sigma_min; the sampler always
    runs len(sigmas) - 1 steps). A1111 `KDiffusionSampler.get_sigmas`: with the penultimate sigma
    discarded it builds steps + 1 and drops the next-to-last. `sdxl` picks Align Your Steps' table."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise SettingError("Sampling steps", f"{steps!r} is not a whole number of at least 1", "Use 1 or more steps")
    sampler = find_sampler(sampler) if isinstance(sampler, str) else sampler
    discard = discard_penultimate or (sampler is not None and sampler.discard_penultimate)
    chosen = resolve_schedule(schedule, sampler)
    sigmas = chosen.function(steps + 1 if discard else steps, schedule_table, sdxl=sdxl)
    if discard:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    return sigmas.to("cpu", torch.float32)


def initial_noise_multiplier(sigmas: torch.Tensor, sgm: bool = False) -> float:
    """What A1111's txt2img multiplies the first noise by: sigmas[0], or with the "SGM noise
    multiplier" option sqrt(1 + sigmas[0]^2). Computed in float32 as A1111 does, returned once as
    a Python float (x * float rounds exactly as x * 0-d float32 tensor)."""
    s0 = sigmas[0].detach().to("cpu", torch.float32)
    return float(torch.sqrt(1.0 + s0 ** 2.0)) if sgm else float(s0)


# ------------------------------------------------------------------------------------ seeded noise

def fixed_seed(seed: int) -> int:
    """A1111 `get_fixed_seed`: -1 means a random seed in [0, 4294967294)."""
    return random.Random().randrange(4294967294) if int(seed) == -1 else int(seed)


SEED_RANGE = (-2 ** 63, 2 ** 64 - 1)  # what torch.Generator.manual_seed takes


def image_seeds(seed: int, count: int) -> list[int]:
    """A1111 `all_seeds` (no variation seed): image i of a run gets seed + i, across batches."""
    seeds = [int(seed) + i for i in range(count)]
    low, high = SEED_RANGE
    if seeds and not (low <= seeds[0] and seeds[-1] <= high):
        raise SettingError("seed", f"{str(seed)[:24]} is outside {low} to {high} (for {count} images)",
                           "Use -1 for a random seed, or a smaller whole number")
    return seeds


def latent_shape(width: int, height: int, channels: int = LATENT_CHANNELS) -> tuple[int, int, int]:
    """One image's latent shape, (C, H/8, W/8) as A1111 `ImageRNG((opt_C, h // opt_f, w // opt_f))`."""
    return (channels, height // LATENT_FACTOR, width // LATENT_FACTOR)


def _cpu_generator(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(int(seed))


class ImageNoise:
    """A1111's `ImageRNG` with the CPU generator: one generator per image seed.

    `first()` is each generator's first draw of one image's latent shape, stacked ([B, C, h, w]);
    `next()` continues the same generators (ancestral noise). With an eta noise seed delta (ENSD)
    the generators are re-seeded with seed + ENSD after the first draw, as A1111 does. Draws are
    float32 on the CPU, then moved to `device`. Nothing touches torch's global generator."""

    def __init__(self, seeds: Sequence[int], shape: Sequence[int], device: torch.device | str = "cpu", *,
                 eta_noise_seed_delta: int = 0) -> None:
        self.seeds = [int(s) for s in seeds]
        shape = tuple(int(s) for s in shape)
        if len(shape) == 4:  # a batch shape is accepted when its batch matches the seeds
            if shape[0] != len(self.seeds):
                raise ValueError(f"shape {list(shape)} has batch {shape[0]} but {len(self.seeds)} seeds were given")
            shape = shape[1:]
        if len(shape) != 3 or not self.seeds:
            raise ValueError(f"need one image's latent shape (C, h, w) and at least one seed, got {list(shape)}")
        self.shape = shape
        self.device = torch.device(device)
        self.eta_noise_seed_delta = int(eta_noise_seed_delta)
        self._generators = [_cpu_generator(s) for s in self.seeds]
        self._first_drawn = False

    def _draw(self) -> torch.Tensor:
        # One draw per image from its own generator (not a forward pass: the per-row loop is the point,
        # it makes an image's noise independent of the batch it is in).
        rows = [torch.randn(self.shape, generator=g, dtype=torch.float32, device="cpu") for g in self._generators]
        return torch.stack(rows).to(self.device)

    def first(self) -> torch.Tensor:
        """The initial latent noise, [B, C, h, w] (unit variance; multiply by `initial_noise_multiplier`)."""
        if self._first_drawn:
            raise RuntimeError("ImageNoise.first() was already drawn; make a new ImageNoise for a new pass")
        noise = self._draw()
        self._first_drawn = True
        if self.eta_noise_seed_delta:
            self._generators = [_cpu_generator(s + self.eta_noise_seed_delta) for s in self.seeds]
        return noise

    def next(self) -> torch.Tensor:
        """The next draw of every image's generator (the first call gives `first()`, as A1111)."""
        if not self._first_drawn:
            return self.first()
        return self._draw()

    def noise_sampler(self) -> NoiseSampler:
        """`noise_sampler(sigma, sigma_next)` for ancestral samplers (draws on `device`, so make this
        object on x's device): A1111 feeds k-diffusion's `default_noise_sampler`
        (`torch.randn_like`) from `ImageRNG.next()` (TorchHijack)."""
        return lambda sigma, sigma_next: self.next()
