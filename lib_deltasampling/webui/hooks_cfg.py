"""The per-step hook in the host's CFG denoiser (`modules/sd_samplers_cfg_denoiser.py`), the same
public callbacks in A1111 1.10, Forge, Forge Neo and reForge.

`on_cfg_denoiser` runs before the model calls: A1111 hands the expanded batch (all cond rows, one
per `AND` sub-prompt and image, then B uncond rows that are the un-expanded `x` and `sigma`); the
Forge family hands `x` and `sigma` of the B images only. The last B rows are the images in both.
They are stashed, and `on_cfg_after_cfg` (after CFG and the inpainting blend) replaces the denoised
prediction with the corrected one.

What the callbacks carry for DDIM, PLMS and UniPC differs (host-notes forge.md §1.1):
- A1111: the VP latent, an integer timestep as `sigma`, and eps to after-CFG. Converted here:
  sigma = sigma(t), x_ve = x sqrt(1 + sigma^2), x0 = x_ve - sigma eps, and back.
- Forge family: the denoiser (`classic_ddim_eps_estimation`) has already converted latent and
  timestep to the k-diffusion x and sigma and hands x0 to after-CFG, as for every other sampler.
Every other sampler hands x = x0 + sigma n, sigma and x0 in every host.

Guard: on the first call of a pass the latent's noise scale (its projection on the pass's initial
noise) must agree with the sigma the hook derived. A host that hands something else (a timestep read
as a sigma, a sigma converted twice) differs by a factor of 10 or more and stops the generation with
a clear message, instead of an image whose infotext claims a delta it did not get.

The step index comes from the denoiser's call counter mapped through its expected number of calls,
so the two calls of a second-order step share their step; no host syncs but one per pass (the guard).

Callbacks are registered per sampling pass of a generation with Delta Sampling on, by function, and
removed by function (`remove_callbacks_for_function`) at the end, on error and on interrupt.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..engine.sampler import DeltaSampler
from ..runtime.denoiser import DiscreteSchedule


# ------------------------------------------------------------------ pure pieces (tested without a host)

def batch_rows(text_uncond, x: torch.Tensor | None = None) -> int:
    """B: the uncond conditioning has one row per image (a tensor, or SDXL's dict of tensors). The
    Forge family hands no uncond at CFG 1, and then `x` holds the image rows only."""
    if text_uncond is None:
        return x.shape[0]
    if isinstance(text_uncond, dict):
        return next(iter(text_uncond.values())).shape[0]
    return text_uncond.shape[0]


def unexpanded(x_in: torch.Tensor, sigma_in: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The image rows of an expanded CFG batch: its last B rows are `x` and `sigma` themselves."""
    return x_in[-batch:], sigma_in[-batch:]


def hands_timesteps(denoiser) -> bool:
    """Whether the host hands this denoiser's callbacks a VP latent and a timestep (A1111's DDIM, PLMS,
    UniPC). The Forge family's denoisers carry `classic_ddim_eps_estimation` and convert to x and
    sigma themselves; A1111's own test for a timestep denoiser is its missing `sigmas` table."""
    if hasattr(denoiser, "classic_ddim_eps_estimation"):
        return False
    return not hasattr(denoiser.inner_model, "sigmas")


@dataclass(frozen=True)
class InitialLatent:
    """What the host starts a pass from (`process_before_every_sampling`'s kwargs): txt2img starts
    from `noise` scaled by sigma (or sqrt(1 + sigma^2)), img2img and hires from `base + sigma noise`
    (+ `extra` noise: A1111's img2img_extra_noise)."""
    noise: torch.Tensor
    base: torch.Tensor | None = None
    extra: float = 0.0


class HostMismatch(RuntimeError):
    """The sigma the hook derived does not match the latent the host handed over."""


def noise_scale(x: torch.Tensor, start: InitialLatent, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Least-squares k in x - base ~ k noise over the weighted (not inpainting-preserved) area."""
    rest = x if start.base is None else x - start.base.to(x)
    noise = start.noise.to(x) if weight is None else start.noise.to(x) * weight.to(x)
    return (rest * noise).sum() / (noise * noise).sum().clamp_min(1e-12)


def check_noise_scale(k: float, sigma: float, start: InitialLatent, tolerance: float = 3.0) -> None:
    """k must lie within a factor `tolerance` of [sigma, sqrt(1 + sigma^2) + extra]: A1111 and Forge
    scale txt2img noise by sigma, or sqrt(1 + sigma^2) with the SGM noise multiplier; img2img adds
    sigma noise and the extra noise. A timestep read as sigma or a sigma converted twice is off by 10x+."""
    low, high = sigma / tolerance, tolerance * ((1 + sigma ** 2) ** 0.5 + start.extra)
    if not low <= k <= high:
        raise HostMismatch(
            f"the sampler's first step has sigma {sigma:.4g} by the host's callbacks, but the latent carries "
            f"noise of scale {k:.4g}: this host hands the CFG callbacks something this version of the "
            f"extension does not expect, so the delta would be wrong. Please report the WebUI, its version "
            f"and the sampler; other samplers are unaffected")


def step_index(call: int, total_calls: int, steps: int) -> int:
    """Sampler step of model call `call` when `total_calls` calls make `steps` steps (first-order:
    call = step; second-order: calls 2i and 2i+1 are step i)."""
    if total_calls <= 0 or steps <= 0:
        return call
    return min(steps - 1, call * steps // total_calls)


def vp_to_ve(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A VP latent sqrt(a) (x0 + sigma n) as the VE latent x0 + sigma n (a = 1 / (1 + sigma^2))."""
    return x * (1 + sigma ** 2).sqrt().reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


def eps_to_x0(x_ve: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return x_ve - sigma.reshape(-1, *([1] * (x_ve.ndim - 1))).to(x_ve.dtype) * eps


def x0_to_eps(x_ve: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return (x_ve - x0) / sigma.reshape(-1, *([1] * (x_ve.ndim - 1))).to(x_ve.dtype)


# ------------------------------------------------------------------ the hook object of one sampling pass

@dataclass
class _Pending:
    x: torch.Tensor            # VE latent rows [B, ...]
    sigma: torch.Tensor        # sigma rows [B]
    step: int
    steps: int
    timesteps: bool


class PassHook:
    """The CFG callbacks of one sampling pass: registered by `install`, removed by `remove`.

    `on_error(exc)` is called (once) when the delta fails inside a step: A1111 would swallow the
    exception and go on without the delta, so the owner stops the generation instead.
    """

    def __init__(self, sampler: DeltaSampler, schedule: DiscreteSchedule,
                 on_error: Callable[[BaseException], None], start: InitialLatent | None = None) -> None:
        self.sampler = sampler
        self.schedule = schedule
        self.on_error = on_error
        self.start = start  # checked against the first call (`check_noise_scale`), then dropped
        self.pending: _Pending | None = None
        self.failed = False
        self._context = None

    # callbacks -----------------------------------------------------------------------------
    def on_cfg_denoiser(self, params) -> None:
        if self.failed:
            return
        try:
            batch = batch_rows(params.text_uncond, params.x)
            x, sigma = unexpanded(params.x, params.sigma, batch)
            denoiser = params.denoiser
            timesteps = hands_timesteps(denoiser)
            if timesteps:
                sigma = self.schedule.t_to_sigma(sigma.float())
                x = vp_to_ve(x, sigma)
            if self.start is not None:
                start, self.start = self.start, None
                self._check_start(x, sigma, start, denoiser)
            steps = denoiser.steps  # the sampler steps of this pass (launch_sampling: steps or t_enc + 1)
            step = step_index(denoiser.step, denoiser.total_steps, steps)
            self.pending = _Pending(x, sigma.float(), step, steps, timesteps)
            # a replayed source step starts now, alongside the host's own forward
            self.sampler.prefetch(self.pending.x, self.pending.sigma, step, steps)
        except BaseException as exc:  # noqa: BLE001 - reported by the owner, never swallowed
            self._fail(exc)

    def on_cfg_after_cfg(self, params) -> None:
        pending, self.pending = self.pending, None
        if self.failed or pending is None:
            return
        try:
            if pending.timesteps:
                d_t = eps_to_x0(pending.x, params.x, pending.sigma)
                d = self.sampler(pending.x, pending.sigma, pending.step, pending.steps, d_t)
                if d is not d_t:
                    params.x = x0_to_eps(pending.x, d, pending.sigma).to(params.x.dtype)
            else:
                d = self.sampler(pending.x, pending.sigma, pending.step, pending.steps, params.x)
                if d is not params.x:
                    params.x = d.to(params.x.dtype)
        except BaseException as exc:  # noqa: BLE001
            self._fail(exc)

    @staticmethod
    def _check_start(x: torch.Tensor, sigma: torch.Tensor, start: InitialLatent, denoiser) -> None:
        if start.noise.shape != x.shape or (start.base is not None and start.base.shape != x.shape):
            return  # another script changed the latent's size: nothing to compare against
        mask = getattr(denoiser, "mask", None)
        weight = getattr(denoiser, "nmask", None) if mask is not None else None
        k = noise_scale(x, start, weight)
        check_noise_scale(float(k), float(sigma.float().mean()), start)  # one host sync per pass

    def _fail(self, exc: BaseException) -> None:
        self.failed = True
        self.on_error(exc)

    # registration --------------------------------------------------------------------------
    def install(self) -> None:
        from modules import script_callbacks

        self.remove()  # idempotent: never two registrations of one pass
        self._context = self.sampler.running()
        self._context.__enter__()  # adapter hooks on the source model for this pass
        script_callbacks.on_cfg_denoiser(self.on_cfg_denoiser)
        script_callbacks.on_cfg_after_cfg(self.on_cfg_after_cfg)

    def remove(self) -> None:
        from modules import script_callbacks

        for fn in (self.on_cfg_denoiser, self.on_cfg_after_cfg):
            script_callbacks.remove_callbacks_for_function(fn)
        if self._context is not None:
            context, self._context = self._context, None
            context.__exit__(None, None, None)
        self.pending = None
