"""Denoiser and discrete schedule against diffusers' EulerDiscreteScheduler and hand computations."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from lib_deltasampling.errors import SettingError
from lib_deltasampling.runtime.denoiser import (LATENT_SCALE, Denoiser, DiscreteSchedule, Prediction,
                                                 latent_scale_factor, sd_alphas_cumprod)

diffusers = pytest.importorskip("diffusers")
EulerDiscreteScheduler = diffusers.EulerDiscreteScheduler

SD_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


@pytest.fixture(scope="module")
def schedule() -> DiscreteSchedule:
    return DiscreteSchedule()


def _euler(**kw) -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(**SD_SCHEDULER, **kw)


# ---------------------------------------------------------------- schedule tables

def test_alphas_cumprod_and_sigmas_match_diffusers(schedule):
    ref = _euler()
    # diffusers computes the betas in float32, we in float64 (as ldm and Forge): ~1e-6 apart.
    torch.testing.assert_close(schedule.alphas_cumprod, ref.alphas_cumprod.float(), rtol=2e-5, atol=0)
    ref_sigmas = ref.sigmas[:-1].flip(0).float()  # diffusers: descending with a trailing 0
    torch.testing.assert_close(schedule.sigmas, ref_sigmas, rtol=2e-5, atol=0)
    assert schedule.sigma_min == pytest.approx(float(ref_sigmas[0]), rel=2e-5)
    assert schedule.sigma_max == pytest.approx(float(ref_sigmas[-1]), rel=2e-5)


def test_schedule_is_ldm_linear_in_sqrt_beta_float64(schedule):
    # ldm make_beta_schedule("linear", 1000, 0.00085, 0.012), written out in numpy float64.
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    ac = np.cumprod(1.0 - betas)
    np.testing.assert_allclose(sd_alphas_cumprod().numpy(), ac, rtol=1e-12)
    np.testing.assert_allclose(schedule.sigmas.numpy(), np.sqrt((1 - ac) / ac).astype(np.float32), rtol=1e-6)
    np.testing.assert_allclose(schedule.log_sigmas.numpy(), np.log(np.sqrt((1 - ac) / ac)), rtol=1e-6)
    assert schedule.sigmas.dtype == schedule.log_sigmas.dtype == torch.float32
    assert bool((schedule.sigmas[1:] > schedule.sigmas[:-1]).all())  # ascending: index = timestep


def test_custom_alphas_cumprod_gives_the_same_tables(schedule):
    other = DiscreteSchedule(sd_alphas_cumprod())
    assert torch.equal(other.sigmas, schedule.sigmas)


def test_tables_are_cached_per_device_on_the_object(schedule):
    a = schedule.tables("cpu")
    assert schedule.tables(torch.device("cpu"))[0] is a[0]
    assert DiscreteSchedule().tables("cpu")[0] is not a[0]  # no shared global state


# ---------------------------------------------------------------- sigma <-> t

def test_sigma_to_t_interpolate_matches_diffusers_log_sigma_interpolation(schedule):
    gen = torch.Generator().manual_seed(0)
    log_min, log_max = np.log(schedule.sigma_min), np.log(schedule.sigma_max)
    # inside the table, exactly on it, and outside at both ends (clamped to 0 / 999)
    sig = torch.cat([torch.empty(200).uniform_(log_min, log_max, generator=gen).exp(),
                     schedule.sigmas[[0, 1, 500, 998, 999]], torch.tensor([1e-3, 0.01, 20.0, 100.0])])
    ref = EulerDiscreteScheduler._sigma_to_t(None, sig.double().numpy(), schedule.log_sigmas.double().numpy())
    ours = schedule.sigma_to_t(sig)
    assert ours.dtype == torch.float32 and ours.shape == sig.shape
    np.testing.assert_allclose(ours.numpy(), ref, atol=5e-4, rtol=0)


def test_sigma_to_t_matches_diffusers_karras_timesteps(schedule):
    ref = _euler(use_karras_sigmas=True)
    ref.set_timesteps(20)
    ours = schedule.sigma_to_t(ref.sigmas[:-1].float())
    # diffusers tables are float32-built, ours float64-built: t differs by a few 1e-4
    np.testing.assert_allclose(ours.numpy(), ref.timesteps.numpy(), atol=2e-3, rtol=0)


def test_t_to_sigma_interpolates_log_sigma_and_hits_the_table(schedule):
    t = torch.arange(1000)
    torch.testing.assert_close(schedule.t_to_sigma(t), schedule.sigmas, rtol=1e-6, atol=0)
    ls = schedule.log_sigmas.double()
    want = torch.exp(0.75 * ls[10] + 0.25 * ls[11])
    assert float(schedule.t_to_sigma(torch.tensor(10.25))) == pytest.approx(float(want), rel=1e-6)
    # out-of-range t is clamped to the table's ends
    torch.testing.assert_close(schedule.t_to_sigma(torch.tensor([-5.0, 1200.0])), schedule.sigmas[[0, -1]])


def test_round_trip_fractional_t(schedule):
    t = torch.rand(500, generator=torch.Generator().manual_seed(1)) * 999
    t = torch.cat([t, torch.tensor([0.0, 0.5, 998.5, 999.0])])
    torch.testing.assert_close(schedule.sigma_to_t(schedule.t_to_sigma(t)), t, atol=5e-4, rtol=0)


def test_nearest_mode_returns_int_argmin_of_log_sigma(schedule):
    gen = torch.Generator().manual_seed(2)
    sig = torch.empty(300).uniform_(np.log(0.02), np.log(20.0), generator=gen).exp()
    t = schedule.sigma_to_t(sig, "nearest")
    assert t.dtype == torch.int64 and t.shape == sig.shape
    ref = np.abs(np.log(sig.double().numpy())[:, None] - schedule.log_sigmas.double().numpy()[None]).argmin(1)
    np.testing.assert_array_equal(t.numpy(), ref)
    on_grid = torch.tensor([0, 1, 321, 999])
    assert torch.equal(schedule.sigma_to_t(schedule.sigmas[on_grid], "nearest"), on_grid)
    # the interpolated t rounds to the nearest one wherever it is not half-way
    interp = schedule.sigma_to_t(sig)
    away_from_half = (interp.frac() - 0.5).abs() > 0.05
    assert torch.equal(interp.round().long()[away_from_half], t[away_from_half])


def test_sigma_to_t_keeps_shape_for_scalars_and_2d(schedule):
    assert schedule.sigma_to_t(torch.tensor(1.0)).shape == ()
    s = schedule.sigmas[torch.tensor([[3, 40], [500, 999]])]
    torch.testing.assert_close(schedule.sigma_to_t(s), torch.tensor([[3.0, 40.0], [500.0, 999.0]]), atol=1e-3, rtol=0)
    assert torch.equal(schedule.sigma_to_t(s, "nearest"), torch.tensor([[3, 40], [500, 999]]))


def test_unknown_timestep_mode_is_a_setting_error(schedule):
    with pytest.raises(SettingError, match="timestep mode.*'round'.*interpolate, nearest"):
        schedule.sigma_to_t(torch.tensor([1.0]), "round")
    with pytest.raises(SettingError):
        Denoiser(lambda x, t: x, "eps", timestep_mode="round")


# ---------------------------------------------------------------- denoise

class RecordingNet:
    """Stub network: records what it is given and returns a fixed tensor."""

    def __init__(self, out: torch.Tensor) -> None:
        self.out = out
        self.calls: list[tuple[torch.Tensor, torch.Tensor, dict]] = []

    def __call__(self, x_in, t, **cond):
        self.calls.append((x_in, t, cond))
        return self.out.to(x_in.dtype)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("prediction, diffusers_type", [("eps", "epsilon"), ("v", "v_prediction")])
def test_denoise_matches_diffusers_euler_step_pred_original_sample(prediction, diffusers_type):
    ref = _euler(prediction_type=diffusers_type)
    ref.set_timesteps(8)
    sample, out = _randn(1, 4, 8, 8, seed=3), _randn(1, 4, 8, 8, seed=4)
    net = RecordingNet(out)
    den = Denoiser(net, prediction)
    for i, t in enumerate(ref.timesteps):
        sigma = ref.sigmas[i].reshape(1)
        x0 = den(sample, sigma, context="c")
        ref_in = ref.scale_model_input(sample, t)  # before step(), as diffusers' pipelines call it
        want = ref.step(out, t, sample).pred_original_sample
        torch.testing.assert_close(x0, want, rtol=1e-5, atol=1e-5)
        x_in, t_in, cond = net.calls[-1]
        torch.testing.assert_close(x_in, ref_in, rtol=1e-6, atol=1e-6)
        assert cond == {"context": "c"}
        assert t_in.dtype == torch.float32 and t_in.shape == (1,)


def test_eps_denoise_recovers_x0_by_hand():
    x0, eps = _randn(3, 4, 6, 6, seed=5), _randn(3, 4, 6, 6, seed=6)
    sigma = torch.tensor([0.05, 1.3, 14.0])
    x = x0 + sigma[:, None, None, None] * eps
    net = RecordingNet(eps)
    den = Denoiser(net, Prediction.EPS)
    torch.testing.assert_close(den.denoise(x, sigma), x0, rtol=1e-5, atol=2e-5)
    x_in, t_in, _ = net.calls[0]
    torch.testing.assert_close(x_in, x / (sigma ** 2 + 1).sqrt()[:, None, None, None])
    torch.testing.assert_close(t_in, den.schedule.sigma_to_t(sigma))


def test_v_denoise_recovers_x0_from_the_true_v():
    x0, eps = _randn(3, 4, 6, 6, seed=7), _randn(3, 4, 6, 6, seed=8)
    sigma = torch.tensor([0.03, 2.0, 14.6])
    s = sigma[:, None, None, None]
    x = x0 + s * eps                                   # k-diffusion (VE) form
    alpha, sigma_vp = 1 / (1 + s ** 2).sqrt(), s / (1 + s ** 2).sqrt()
    v = alpha * eps - sigma_vp * x0                    # v in the VP form the network was trained on

    def net(x_in, t):
        # the network must see the VP latent alpha*x0 + sigma_vp*eps
        torch.testing.assert_close(x_in, alpha * x0 + sigma_vp * eps, rtol=1e-5, atol=1e-5)
        return v

    torch.testing.assert_close(Denoiser(net, "v").denoise(x, sigma), x0, rtol=1e-5, atol=1e-4)


def test_batched_sigmas_equal_row_by_row_calls():
    x, out = _randn(4, 4, 5, 5, seed=9), _randn(4, 4, 5, 5, seed=10)
    sigma = torch.tensor([0.1, 0.7, 3.0, 9.0])
    for pred in ("eps", "v"):
        batched = Denoiser(RecordingNet(out), pred).denoise(x, sigma)
        rows = [Denoiser(RecordingNet(out[i:i + 1]), pred).denoise(x[i:i + 1], sigma[i:i + 1]) for i in range(4)]
        torch.testing.assert_close(batched, torch.cat(rows))


def test_scalar_sigma_broadcasts_and_wrong_shape_is_refused():
    x, out = _randn(2, 4, 4, 4, seed=11), _randn(2, 4, 4, 4, seed=12)
    den = Denoiser(RecordingNet(out), "eps")
    torch.testing.assert_close(den(x, 2.5), den(x, torch.tensor([2.5, 2.5])))
    assert den.net.calls[0][1].shape == (2,)
    with pytest.raises(ValueError, match="sigma has shape"):
        den(x, torch.tensor([1.0, 2.0, 3.0]))


def test_nearest_mode_feeds_integer_valued_float_t():
    x, out = _randn(2, 4, 4, 4, seed=13), _randn(2, 4, 4, 4, seed=14)
    net = RecordingNet(out)
    sigma = torch.tensor([0.5, 5.0])
    Denoiser(net, "eps", timestep_mode="nearest")(x, sigma)
    t = net.calls[0][1]
    assert t.dtype == torch.float32 and torch.equal(t, t.round())
    assert torch.equal(t.long(), DiscreteSchedule().sigma_to_t(sigma, "nearest"))


def test_float16_input_keeps_dtype_with_float32_arithmetic():
    x32, out32 = _randn(2, 4, 4, 4, seed=15), _randn(2, 4, 4, 4, seed=16)
    sigma = torch.tensor([0.2, 8.0])
    for pred in ("eps", "v"):
        want = Denoiser(RecordingNet(out32.half().float()), pred)(x32.half().float(), sigma)
        net = RecordingNet(out32)
        got = Denoiser(net, pred)(x32.half(), sigma.half())
        assert got.dtype == torch.float16 and net.calls[0][0].dtype == torch.float16
        torch.testing.assert_close(got.float(), want, rtol=2e-3, atol=2e-2)


def test_net_dtype_casts_only_the_network_input():
    x, out = _randn(2, 4, 4, 4, seed=17), _randn(2, 4, 4, 4, seed=18)
    net = RecordingNet(out)
    got = Denoiser(net, "eps", net_dtype=torch.float16)(x, torch.tensor([1.0, 3.0]))
    assert net.calls[0][0].dtype == torch.float16 and got.dtype == torch.float32


def test_scalings_are_the_k_diffusion_formulas():
    sigma = torch.tensor([0.0, 0.5, 4.0])
    c_skip, c_out, c_in = Denoiser(lambda x, t: x, "v").scalings(sigma)
    torch.testing.assert_close(c_in, 1 / (sigma ** 2 + 1) ** 0.5)
    torch.testing.assert_close(c_skip, 1 / (sigma ** 2 + 1))
    torch.testing.assert_close(c_out, -sigma / (sigma ** 2 + 1) ** 0.5)
    c_skip, c_out, _ = Denoiser(lambda x, t: x, "eps").scalings(sigma)
    torch.testing.assert_close(c_skip, torch.ones(3))
    torch.testing.assert_close(c_out, -sigma)


# ---------------------------------------------------------------- latent scale

def test_latent_scale_factors():
    default = inspect.signature(diffusers.AutoencoderKL.__init__).parameters["scaling_factor"].default
    assert latent_scale_factor("sd1") == latent_scale_factor("sd2") == default  # diffusers' SD1/SD2 VAE default
    assert latent_scale_factor("sdxl") == 0.13025  # sgm sd_xl_base.yaml / SDXL vae/config.json
    assert set(LATENT_SCALE) == {"sd1", "sd2", "sdxl"}
    with pytest.raises(SettingError, match="model family.*'sd3'.*sd1, sd2, sdxl"):
        latent_scale_factor("sd3")
