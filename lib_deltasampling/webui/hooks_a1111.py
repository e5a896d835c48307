"""The per-step hook in A1111's CFG denoiser (`modules/sd_samplers_cfg_denoiser.py`, 1.10).

`on_cfg_denoiser` sees the expanded batch: all cond rows (one per `AND` sub-prompt and image)
then B uncond rows, which are the un-expanded `x` and `sigma`; skipping the uncond (NGMS) trims
them only after the callback, so the last B rows are always there. They are stashed, and
`on_cfg_after_cfg` (after CFG and, for k-diffusion, after the inpainting blend) replaces the
denoised prediction with the corrected one.

Two sampler families (host-notes a1111.md §2.4):
- k-diffusion (and LCM): x = x0 + sigma n, `sigma` is sigma, the output is x0. Used as is.
- timestep samplers (DDIM, PLMS, UniPC): x is the VP latent, `sigma` is a timestep, the output is eps.
  Converted: sigma = sigma(t), x_ve = x sqrt(1 + sigma^2), x0 = x_ve - sigma eps, and back.

The step index comes from the denoiser's call counter mapped through its expected number of calls,
so the two calls of a second-order step share their step; no host syncs.

Callbacks are registered per sampling pass of a generation with Delta Sampling on, by function, and
removed by function (`remove_callbacks_for_function`) at the end, on error and on interrupt.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..engine.sampler import DeltaSampler
from ..runtime.denoiser import DiscreteSchedule

log = logging.getLogger("delta-sampling")


# ------------------------------------------------------------------ pure pieces (tested without a host)

def batch_rows(text_uncond) -> int:
    """B: the uncond conditioning has one row per image (a tensor, or SDXL's dict of tensors)."""
    if isinstance(text_uncond, dict):
        return next(iter(text_uncond.values())).shape[0]
    return text_uncond.shape[0]


def unexpanded(x_in: torch.Tensor, sigma_in: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The image rows of an expanded CFG batch: its last B rows are `x` and `sigma` themselves."""
    return x_in[-batch:], sigma_in[-batch:]


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
                 on_error: Callable[[BaseException], None]) -> None:
        self.sampler = sampler
        self.schedule = schedule
        self.on_error = on_error
        self.pending: _Pending | None = None
        self.failed = False
        self._context = None

    # callbacks -----------------------------------------------------------------------------
    def on_cfg_denoiser(self, params) -> None:
        if self.failed:
            return
        try:
            batch = batch_rows(params.text_uncond)
            x, sigma = unexpanded(params.x, params.sigma, batch)
            denoiser = params.denoiser
            timesteps = not hasattr(denoiser.inner_model, "sigmas")  # A1111's own test (apply_refiner)
            if timesteps:
                sigma = self.schedule.t_to_sigma(sigma.float())
                x = vp_to_ve(x, sigma)
            steps = denoiser.steps  # the sampler steps of this pass (launch_sampling: steps or t_enc + 1)
            step = step_index(denoiser.step, denoiser.total_steps, steps)
            self.pending = _Pending(x, sigma.float(), step, steps, timesteps)
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
