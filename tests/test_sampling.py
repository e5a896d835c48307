"""Runner samplers, sigma schedules and seeded noise against diffusers' schedulers and hand
computations of A1111 v1.10.1's definitions (`modules/sd_schedulers.py`, `sd_samplers_kdiffusion.py`,
`rng.py`) and k-diffusion's (ab527a9a `k_diffusion/sampling.py`, `external.py`)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lib_deltasampling.errors import SettingError
from lib_deltasampling.runner.sampling import (SAMPLERS, SCHEDULES, ImageNoise, a1111_schedule_table, find_sampler,
                                               find_schedule, fixed_seed, get_sigmas, image_seeds,
                                               infotext_schedule, initial_noise_multiplier, latent_shape,
                                               parse_sampler, resolve_schedule, sample_dpmpp_2m, sample_euler,
                                               sample_euler_ancestral)
from lib_deltasampling.runtime.denoiser import DiscreteSchedule, sd_alphas_cumprod

diffusers = pytest.importorskip("diffusers")
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

SD = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


@pytest.fixture(scope="module")
def table() -> DiscreteSchedule:
    return DiscreteSchedule()


def _table_of(scheduler) -> DiscreteSchedule:
    """Our schedule table built on diffusers' own alphas_cumprod, so schedule *formulas* compare tightly."""
    return DiscreteSchedule(scheduler.alphas_cumprod)


def _np_sigmas(table: DiscreteSchedule) -> np.ndarray:
    return table.sigmas.double().numpy()


def _np_t_to_sigma(table: DiscreteSchedule, t: np.ndarray) -> np.ndarray:
    """k-diffusion t_to_sigma by hand: log sigma linear between the neighbouring integer steps."""
    log_s = np.log(_np_sigmas(table))
    lo, hi = np.floor(t).astype(int), np.ceil(t).astype(int)
    w = t - lo
    return np.exp((1 - w) * log_s[lo] + w * log_s[hi])


def _close(ours: torch.Tensor, expected, rtol: float = 2e-6) -> None:
    np.testing.assert_allclose(ours.double().numpy(), np.asarray(expected, dtype=np.float64), rtol=rtol, atol=0)


# ------------------------------------------------------------------------------------ schedules

@pytest.mark.parametrize("steps", [4, 10, 28, 38])
def test_uniform_matches_diffusers_linspace_where_t_is_integral(steps):
    # 999 / (steps - 1) is whole here, so diffusers' linear-in-sigma interpolation hits table values.
    ref = diffusers.EulerDiscreteScheduler(**SD, timestep_spacing="linspace")
    ref.set_timesteps(steps)
    for name in ("Uniform", "Normal", "Automatic"):
        _close(get_sigmas(name, steps, _table_of(ref), sampler="Euler"), ref.sigmas.double().numpy())


@pytest.mark.parametrize("steps", [1, 7, 20, 33])
def test_uniform_is_kdiffusion_get_sigmas_by_hand(table, steps):
    # DiscreteSchedule.get_sigmas(n): t = linspace(999, 0, n), log sigma interpolated, then a 0.
    t = np.linspace(999, 0, steps)
    expected = np.append(_np_t_to_sigma(table, t), 0.0)
    ours = get_sigmas("uniform", steps, table)
    assert ours.shape == (steps + 1,) and ours.dtype == torch.float32 and ours.device.type == "cpu"
    _close(ours, expected)


def test_normal_runs_from_t_of_sigma_max_to_t_of_sigma_min(table):
    # normal_scheduler: start = sigma_to_t(sigma_max) = 999, end = sigma_to_t(sigma_min) = 0 exactly,
    # so "Normal" (sgm=False) is the same schedule as "Uniform".
    assert float(table.sigma_to_t(torch.tensor(table.sigma_max))) == 999.0
    assert float(table.sigma_to_t(torch.tensor(table.sigma_min))) == 0.0
    for steps in (5, 20, 31):
        assert torch.equal(get_sigmas("Normal", steps, table), get_sigmas("Uniform", steps, table))


@pytest.mark.parametrize("steps", [3, 20, 41])
def test_sgm_uniform_by_hand(table, steps):
    t = np.linspace(999, 0, steps + 1)[:-1]
    expected = np.append(_np_t_to_sigma(table, t), 0.0)
    _close(get_sigmas("SGM Uniform", steps, table), expected)
    assert torch.equal(get_sigmas("sgmuniform", steps, table), get_sigmas("sgm_uniform", steps, table))


@pytest.mark.parametrize("steps", [2, 10, 20, 30])  # diffusers' 1-step linspace starts at t=0
def test_karras_matches_diffusers(steps):
    ref = diffusers.EulerDiscreteScheduler(**SD, use_karras_sigmas=True)
    ref.set_timesteps(steps)
    _close(get_sigmas("Karras", steps, _table_of(ref)), ref.sigmas.double().numpy())


def test_karras_by_hand_with_the_tables_ends(table):
    # k-diffusion get_sigmas_karras(n, sigma_min=model.sigmas[0], sigma_max=model.sigmas[-1], rho=7).
    s_min, s_max = float(table.sigmas[0]), float(table.sigmas[-1])
    assert s_min == pytest.approx(0.0292, abs=1e-4) and s_max == pytest.approx(14.6146, abs=1e-4)
    ramp = np.linspace(0, 1, 20)
    expected = (s_max ** (1 / 7) + ramp * (s_min ** (1 / 7) - s_max ** (1 / 7))) ** 7
    _close(get_sigmas("karras", 20, table), np.append(expected, 0.0))


@pytest.mark.parametrize("steps", [10, 20, 25, 40, 50])
def test_simple_matches_diffusers_trailing_when_steps_divide_1000(steps):
    ref = diffusers.EulerDiscreteScheduler(**SD, timestep_spacing="trailing")
    ref.set_timesteps(steps)
    _close(get_sigmas("Simple", steps, _table_of(ref)), ref.sigmas.double().numpy())


@pytest.mark.parametrize("steps", [1, 7, 30, 33])
def test_simple_by_hand(table, steps):
    # simple_scheduler: sigmas[-(1 + int(x * 1000 / n))] for x < n, then 0 (floor, not round).
    idx = [999 - int(x * (1000 / steps)) for x in range(steps)]
    _close(get_sigmas("SIMPLE", steps, table), np.append(_np_sigmas(table)[idx], 0.0), rtol=0)


def test_exponential_and_polyexponential(table):
    ref = diffusers.EulerDiscreteScheduler(**SD, use_exponential_sigmas=True)
    ref.set_timesteps(20)
    _close(get_sigmas("Exponential", 20, _table_of(ref)), ref.sigmas.double().numpy())
    # polyexponential with A1111's default rho = 1 is the exponential schedule.
    _close(get_sigmas("Polyexponential", 20, table), get_sigmas("Exponential", 20, table).double().numpy())


def test_kl_optimal_by_hand_ends_at_sigma_min(table):
    s_min, s_max = table.sigma_min, table.sigma_max
    i = np.arange(21) / 20
    expected = np.tan(i * np.arctan(s_min) + (1 - i) * np.arctan(s_max))
    ours = get_sigmas("KL Optimal", 20, table)
    _close(ours, expected, rtol=3e-6)
    assert float(ours[-1]) == pytest.approx(s_min, rel=1e-6)  # A1111 appends no 0 here


@pytest.mark.parametrize("steps,length", [(20, 21), (30, 32), (1, 2)])
def test_ddim_by_hand_and_its_length(table, steps, length):
    stride = max(1000 // steps, 1)
    expected = np.append(_np_sigmas(table)[np.arange(1, 1000, stride)][::-1], 0.0)
    ours = get_sigmas("ddim", steps, table)
    assert ours.shape == (length,)
    _close(ours, expected, rtol=0)


@pytest.mark.parametrize("sdxl", [False, True])
def test_align_your_steps(table, sdxl):
    knots = ([14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029] if sdxl else
             [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029])
    _close(get_sigmas("Align Your Steps", 10, table, sdxl=sdxl), _ays_by_hand(knots, 10), rtol=1e-6)
    _close(get_sigmas("align_your_steps", 11, table, sdxl=sdxl), knots + [0.0], rtol=1e-7)


def _ays_by_hand(knots: list[float], n: int) -> list[float]:
    # log sigma linear in a uniform [0, 1] parameter over the 11 knots, resampled to n points.
    out = []
    for j in range(n):
        u = j / (n - 1) * 10
        k = min(int(u), 9)
        w = u - k
        out.append(math.exp((1 - w) * math.log(knots[k]) + w * math.log(knots[k + 1])))
    return out + [0.0]


def test_discard_penultimate_builds_one_more_and_drops_the_next_to_last(table):
    full = get_sigmas("Karras", 21, table)
    ours = get_sigmas("Karras", 20, table, discard_penultimate=True)
    assert ours.shape == (21,)
    assert torch.equal(ours, torch.cat([full[:-2], full[-1:]]))


def test_automatic_is_the_samplers_default():
    # A1111 samplers_k_diffusion options: DPM++ 2M -> scheduler 'karras'; Euler, Euler a -> none, i.e.
    # model_wrap.get_sigmas(steps), which is the "Uniform" schedule.
    assert resolve_schedule("Automatic", "DPM++ 2M").label == "Karras"
    assert resolve_schedule("Automatic", "Euler").label == "Uniform"
    assert resolve_schedule("automatic", "Euler a").label == "Uniform"
    assert resolve_schedule("Simple", "DPM++ 2M").label == "Simple"
    table = DiscreteSchedule()
    assert torch.equal(get_sigmas("Automatic", 12, table, sampler="DPM++ 2M"), get_sigmas("Karras", 12, table))
    # Infotext: A1111 writes the resolved label for a sampler with a default, else what was chosen.
    assert infotext_schedule("Automatic", "DPM++ 2M") == "Karras"
    assert infotext_schedule("Automatic", "Euler") == "Automatic"
    assert infotext_schedule("karras", "Euler a") == "Karras"


def test_names_as_a1111_shows_them():
    assert list(SAMPLERS) == ["Euler", "Euler a", "DPM++ 2M"]
    assert {"Automatic", "Uniform", "Karras", "Simple", "Normal", "SGM Uniform"} <= set(SCHEDULES)
    assert find_sampler("k_euler_a").name == find_sampler("EULER A").name == "Euler a"
    assert find_schedule("sgm uniform").label == "SGM Uniform"
    sampler, schedule = parse_sampler("DPM++ 2M Karras")       # pre-1.9 infotext
    assert (sampler.name, schedule.label) == ("DPM++ 2M", "Karras")
    sampler, schedule = parse_sampler("Euler a", "Automatic")
    assert (sampler.name, schedule.label) == ("Euler a", "Automatic")


@pytest.mark.parametrize("call", [lambda t: get_sigmas("Karras", 0, t), lambda t: get_sigmas("Karras", 2.5, t),
                                  lambda t: get_sigmas("Foo", 10, t), lambda t: get_sigmas("Beta", 10, t),
                                  lambda t: get_sigmas("Automatic", 10, t, sampler="DDIM CFG++")])
def test_bad_names_and_steps_are_setting_errors(table, call):
    with pytest.raises(SettingError):
        call(table)


def test_a1111_table_is_float32_alphas_cumprod():
    # A1111 keeps alphas_cumprod in float32 and takes sigmas in float32 from it.
    ac32 = sd_alphas_cumprod().float()
    a1111 = ((1 - ac32) / ac32) ** 0.5
    torch.testing.assert_close(a1111_schedule_table().sigmas, a1111, rtol=2e-7, atol=0)


def test_initial_noise_multiplier():
    sigmas = get_sigmas("Karras", 10, DiscreteSchedule())
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    plain, sgm = initial_noise_multiplier(sigmas, False), initial_noise_multiplier(sigmas, True)
    assert isinstance(plain, float) and isinstance(sgm, float)
    assert torch.equal(x * plain, x * sigmas[0])                                  # A1111: x * sigmas[0]
    assert torch.equal(x * sgm, x * torch.sqrt(1.0 + sigmas[0] ** 2.0))           # sgm_noise_multiplier
    assert sgm == pytest.approx(math.sqrt(1 + plain ** 2), rel=1e-7)


# ------------------------------------------------------------------------------------ samplers

def _stub(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A smooth, nonlinear, per-row 'denoiser' (denoised latent from x and sigma [B])."""
    s = sigma.reshape(-1, 1, 1, 1)
    return torch.tanh(x / (1 + s)) * 0.8 + 0.05 * torch.sin(3 * x) - 0.01 * s


def _run_diffusers(scheduler, x_ve: torch.Tensor, *, vp: bool, eps: bool, generator=None) -> torch.Tensor:
    """diffusers' own loop; VP schedulers (DPM-Solver) keep x / sqrt(1 + sigma^2), VE ones x itself."""
    sigmas = scheduler.sigmas
    x = x_ve / (1 + sigmas[0] ** 2) ** 0.5 if vp else x_ve
    for i, t in enumerate(scheduler.timesteps):
        sigma = sigmas[i]
        x_in = x * (1 + sigma ** 2) ** 0.5 if vp else x
        denoised = _stub(x_in, sigma.expand(x.shape[0]))
        out = (x_in - denoised) / sigma if eps else denoised
        x = scheduler.step(out, t, x, generator=generator).prev_sample
    return x


def _ours_model(calls: list | None = None):
    def model(x, sigma, step):
        if calls is not None:
            calls.append((step, sigma.clone()))
        return _stub(x, sigma)
    return model


@pytest.mark.parametrize("steps", [6, 20])
def test_euler_matches_diffusers(steps):
    ref = diffusers.EulerDiscreteScheduler(**SD, prediction_type="sample")
    ref.set_timesteps(steps)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * ref.sigmas[0]
    expected = _run_diffusers(ref, x, vp=False, eps=False)
    calls = []
    ours = sample_euler(_ours_model(calls), x, ref.sigmas.clone())
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert [c[0] for c in calls] == list(range(steps))
    assert all(torch.equal(s, ref.sigmas[i].expand(2)) for i, s in calls)


@pytest.mark.parametrize("steps,karras", [(8, False), (20, True)])
def test_euler_ancestral_with_image_noise_matches_diffusers(steps, karras):
    # diffusers draws each row's noise from its own generator (randn_tensor with a generator list):
    # the first draw is the initial latent, the later ones the ancestral noise, as A1111's ImageRNG.
    seeds = image_seeds(1234, 2)
    ref = diffusers.EulerAncestralDiscreteScheduler(**SD)
    ref.set_timesteps(steps)
    sigmas = get_sigmas("Karras", steps, DiscreteSchedule()) if karras else ref.sigmas.clone()
    ref.sigmas = sigmas.clone()
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    x_ref = randn_tensor((2, 4, 8, 8), generator=gens) * sigmas[0]
    expected = _run_diffusers(ref, x_ref, vp=False, eps=True, generator=gens)

    noise = ImageNoise(seeds, latent_shape(64, 64))
    x = noise.first() * initial_noise_multiplier(sigmas)
    assert torch.equal(x, x_ref)
    ours = sample_euler_ancestral(_ours_model(), x, sigmas, noise_sampler=noise.noise_sampler())
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_euler_ancestral_with_eta_0_is_euler():
    sigmas = get_sigmas("Uniform", 10, DiscreteSchedule())
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3)) * sigmas[0]
    a = sample_euler_ancestral(_ours_model(), x, sigmas, eta=0.0, noise_sampler=lambda s, sn: torch.zeros_like(x))
    assert torch.equal(a, sample_euler(_ours_model(), x, sigmas))


@pytest.mark.parametrize("steps", [10, 25])
def test_dpmpp_2m_matches_diffusers_dpmsolver_plus_plus_order_2(steps):
    # Same method: diffusers works in VP form with lambda = log(alpha/sigma_vp) = -log sigma; first order
    # on the first step and (final_sigmas_type="zero") on the step to 0, as k-diffusion.
    ref = diffusers.DPMSolverMultistepScheduler(**SD, algorithm_type="dpmsolver++", solver_order=2,
                                                 prediction_type="sample", use_karras_sigmas=True,
                                                 final_sigmas_type="zero", lower_order_final=False)
    ref.set_timesteps(steps)
    sigmas = ref.sigmas.clone().float()
    _close(get_sigmas("Karras", steps, _table_of(ref)), sigmas.double().numpy(), rtol=5e-6)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7)) * sigmas[0]
    expected = _run_diffusers(ref, x, vp=True, eps=False)
    calls = []
    ours = sample_dpmpp_2m(_ours_model(calls), x, sigmas)
    torch.testing.assert_close(ours, expected, rtol=2e-5, atol=2e-5)
    assert [c[0] for c in calls] == list(range(steps))


def test_dpmpp_2m_two_steps_by_hand():
    # Step 1 (first order): x1 = (s1/s0) x0 + (1 - s1/s0) D0. Step 2 to sigma 0: x2 = D1.
    sigmas = torch.tensor([10.0, 2.0, 0.0])
    x = torch.full((1, 1, 2, 2), 3.0)
    seen = []

    def model(x, sigma, step):
        seen.append(x.clone())
        return x * 0.5 + step

    out = sample_dpmpp_2m(model, x, sigmas)
    x1 = 0.2 * x + 0.8 * (x * 0.5)
    torch.testing.assert_close(seen[1], x1)
    torch.testing.assert_close(out, x1 * 0.5 + 1)


def test_dpmpp_2m_second_order_step_by_hand():
    # k-diffusion's multistep step: r = h_prev / h, D = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1}.
    sigmas = torch.tensor([8.0, 4.0, 1.0, 0.0])
    x0 = torch.full((1, 1, 1, 1), 2.0)
    out_of = {0: 1.0, 1: -1.0, 2: 0.5}
    xs = []

    def model(x, sigma, step):
        xs.append(x.clone())
        return torch.full_like(x, out_of[step])

    sample_dpmpp_2m(model, x0, sigmas)
    h_prev, h = math.log(8 / 4), math.log(4 / 1)
    r = h_prev / h
    d = (1 + 1 / (2 * r)) * -1.0 - (1 / (2 * r)) * 1.0
    x1 = 0.5 * 2.0 + 0.5 * 1.0
    x2 = (1 / 4) * x1 + (1 - 1 / 4) * d
    assert float(xs[2]) == pytest.approx(x2, rel=1e-6)


def test_callback_sees_step_x_and_denoised():
    sigmas = get_sigmas("Karras", 5, DiscreteSchedule())
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(5)) * sigmas[0]
    for name, sampler in SAMPLERS.items():
        seen = []
        noise = ImageNoise([1], (4, 4, 4))
        noise.first()
        sampler(_ours_model(), x, sigmas, callback=lambda i, xi, d: seen.append((i, xi, d)),
                noise_sampler=noise.noise_sampler())
        assert [s[0] for s in seen] == list(range(5)), name
        assert torch.equal(seen[0][1], x) and torch.equal(seen[0][2], _stub(x, sigmas[0].expand(1))), name


# ------------------------------------------------------------------------------------ seeded noise

def test_first_noise_is_each_seeds_cpu_generator():
    shape = latent_shape(width=96, height=64)
    assert shape == (4, 8, 12)
    seeds = image_seeds(4242, 3)
    assert seeds == [4242, 4243, 4244]
    first = ImageNoise(seeds, shape).first()
    assert first.shape == (3, 4, 8, 12) and first.dtype == torch.float32
    for i, seed in enumerate(seeds):
        expected = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))
        assert torch.equal(first[i], expected)
    # diffusers' per-row generators give the same batch
    assert torch.equal(first, randn_tensor((3, *shape), generator=[torch.Generator().manual_seed(s) for s in seeds]))


def test_next_continues_each_generator_and_ignores_the_batch():
    shape = (4, 6, 6)
    g = torch.Generator().manual_seed(77)
    draws = [torch.randn(shape, generator=g) for _ in range(3)]
    noise = ImageNoise([76, 77], shape)
    assert torch.equal(noise.next()[1], draws[0])           # next() before first() is first()
    assert torch.equal(noise.next()[1], draws[1])
    assert torch.equal(noise.next()[1], draws[2])
    alone = ImageNoise([77], (1, *shape))
    assert torch.equal(alone.first()[0], draws[0]) and torch.equal(alone.next()[0], draws[1])
    with pytest.raises(RuntimeError):
        alone.first()


def test_eta_noise_seed_delta_reseeds_after_the_first_draw():
    shape = (4, 5, 5)
    noise = ImageNoise([10, 20], shape, eta_noise_seed_delta=31337)
    first = noise.first()
    assert torch.equal(first[0], torch.randn(shape, generator=torch.Generator().manual_seed(10)))
    after = noise.next()
    assert torch.equal(after[1], torch.randn(shape, generator=torch.Generator().manual_seed(20 + 31337)))


def test_global_rng_is_untouched():
    state = torch.get_rng_state()
    noise = ImageNoise([1, 2], (4, 4, 4))
    noise.first()
    noise.noise_sampler()(torch.tensor(1.0), torch.tensor(0.5))
    assert torch.equal(torch.get_rng_state(), state)


def test_shape_errors_and_seed_helpers():
    with pytest.raises(ValueError):
        ImageNoise([1, 2], (3, 4, 4, 4))
    with pytest.raises(ValueError):
        ImageNoise([1], (4, 4))
    assert fixed_seed(123) == 123
    assert 0 <= fixed_seed(-1) < 4294967294
    # torch.Generator.manual_seed takes [-2**63, 2**64 - 1]; beyond it A1111 would raise "Overflow"
    assert image_seeds(2 ** 64 - 2, 2) == [2 ** 64 - 2, 2 ** 64 - 1]
    torch.Generator().manual_seed(2 ** 64 - 1)
    for seed, count in ((2 ** 64 - 2, 3), (2 ** 64, 1), (10 ** 30, 1), (-2 ** 63 - 1, 1)):
        with pytest.raises(SettingError, match=r"^seed: .* is outside"):
            image_seeds(seed, count)
