"""The per-generation Delta Sampling object: (x, sigma, step, total_steps, D_T) -> corrected D.

    sampler = DeltaSampler.prepare(pair, DeltaParams(scale=1.5), prompts=[...], negative_prompts=[...],
                                   adapted_prompts=[...], adapted_negative_prompts=[...], steps=20,
                                   cfg_scale=7.0, target_scale=0.13025, noise=n, noise_multiplier=14.6,
                                   sigma0=14.6, width=1024, height=1024)
    with sampler.running():                   # adapter hooks live for this generation only
        for each model call of the host's sampler:
            denoised = sampler(x, sigma, step, total_steps, denoised)

Everything that can be decided once is decided in `prepare`: the lambda table, which steps run
the source (reuse interval), the conditioning of every prompt-editing segment, the source's
latent size. A call outside the window returns D_T untouched without running any source model.
The step index comes from the caller (a second-order sampler passes the same step for both of its
calls), so the schedule follows the steps, not the number of calls. No host syncs on this path.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..errors import DeltaSamplingError, SettingError
from ..runtime.control import SourceControl
from ..runtime.graphs import GraphedCall
from ..runtime.pair import PairConditioning, SourcePair
from ..runtime.text.encode import EmbeddingVectors
from ..runtime.text.prompt import prompt_schedules
from .bridge import NATIVE_PIXELS, bridge_factor, native_latent_size, resize_latent, source_input
from .delta import apply_delta, source_delta
from .schedule import SHAPES, compute_steps, step_weights
from .settings import GUIDANCE_MODES, RESOLUTIONS


class GenerationInterrupted(DeltaSamplingError):
    """The host asked to stop (interrupt/skip); raised from the step so the sampler loop ends."""


@dataclass(frozen=True)
class DeltaParams:
    """What the engine needs of the user's settings (engine/settings.py maps onto this)."""

    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    shape: str = "constant"
    guidance: str = "full"            # "full": 4 source evaluations (the paper); "cond": 2 (approximation)
    reuse: int = 1                    # run the source every `reuse`-th step of the window
    source_cfg: float | None = None   # None: the host's CFG scale
    resolution: str = "target"        # "native": the source runs at its family's native pixel area

    def check(self) -> None:
        if self.shape not in SHAPES:
            raise SettingError("Delta schedule", f"unknown shape {self.shape!r}", f"Use one of {', '.join(SHAPES)}")
        if self.guidance not in GUIDANCE_MODES:
            raise SettingError("Delta guidance", f"unknown mode {self.guidance!r}", "Use 'full' or 'cond'")
        if self.resolution not in RESOLUTIONS:
            raise SettingError("Delta source resolution", f"unknown value {self.resolution!r}", "Use 'target' or 'native'")
        if not (0.0 <= self.start < self.end <= 1.0):
            raise SettingError("Delta start/end", f"the window [{self.start}, {self.end}) is empty or outside 0..1",
                               "Use 0 <= start < end <= 1")
        if self.reuse < 1:
            raise SettingError("Delta reuse interval", f"{self.reuse} is below 1", "Use 1 (every step) or more")


@dataclass(frozen=True)
class Segment:
    """Conditioning valid up to and including `end_step` (A1111 `prompt_parser.reconstruct_cond_batch`
    takes the first schedule entry with `step <= end_at_step`)."""

    end_step: int
    conds: PairConditioning


def _schedule_ends(prompts: Sequence[str], steps: int) -> list[int]:
    ends = {steps}
    for prompt in prompts:
        ends.update(end for end, _ in prompt_schedules(prompt, steps))
    return sorted(e for e in ends if 0 < e <= steps)


def _prompt_at(prompt: str, steps: int, step: int) -> str:
    """The text A1111's schedule uses at `step`: the first entry with step <= its end."""
    schedule = prompt_schedules(prompt, steps)
    return next((text for end, text in schedule if step <= end), schedule[-1][1])


@dataclass
class SourceStats:
    """How often the source pair ran and the time it took, over one generation (all its passes).

    `forwards` counts the runs of the source pair (one batched forward of all its rows when the
    adaptation is LoRA-like; base then adapted with an adapted checkpoint). No host syncs on the
    step path: on CUDA each run is bracketed by a pair of timing events recorded on the source
    device's current stream, and `seconds()` waits for the last one and sums them once, at the end
    of the generation. Elsewhere `time.perf_counter`: exact on the CPU; on MPS (asynchronous) it is
    the time to queue the work, a lower bound."""

    forwards: int = 0
    _wall: float = 0.0
    _events: list = field(default_factory=list)

    @contextmanager
    def measure(self, device: torch.device) -> Iterator[None]:
        self.forwards += 1
        if device.type == "cuda":
            stream = torch.cuda.current_stream(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            try:
                yield
            finally:
                end.record(stream)
                self._events.append((start, end))
        else:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self._wall += time.perf_counter() - t0

    def cuda_events(self) -> tuple:
        """A (start, end) pair of timing events for a run recorded elsewhere (a replay on a side stream)."""
        self.forwards += 1
        pair = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        self._events.append(pair)
        return pair

    def seconds(self) -> float:
        """Total time in the source forwards (waits for the last CUDA event: call it once, at the end)."""
        if self._events:
            self._events[-1][1].synchronize()
            self._wall += sum(a.elapsed_time(b) for a, b in self._events) / 1000.0
            self._events.clear()
        return self._wall


class DeltaSampler:
    def __init__(self, pair: SourcePair, segments: Sequence[Segment], params: DeltaParams, *, steps: int,
                 cfg_scale: float, target_scale: float, noise: torch.Tensor, noise_multiplier: float,
                 sigma0: float, source_size: tuple[int, int] | None = None,
                 generate_mask: torch.Tensor | None = None, should_stop: Callable[[], bool] | None = None,
                 stats: SourceStats | None = None, cuda_graphs: bool = True,
                 control: SourceControl | None = None) -> None:
        params.check()
        self.pair = pair
        self.segments = list(segments)
        self.params = params
        self.cfg = cfg_scale if params.source_cfg in (None, 0) else params.source_cfg
        self.target_scale = target_scale
        self.source_scale = pair.base.latent_scale
        self.bridge = bridge_factor(target_scale, self.source_scale)
        self.noise = noise
        self.noise_per_sigma = noise_multiplier / sigma0   # c_i = c_0 * sigma_i / sigma_0
        self.target_size = tuple(noise.shape[-2:])
        self.source_size = source_size or self.target_size
        self.generate_mask = generate_mask
        self.should_stop = should_stop
        self.stats = stats if stats is not None else SourceStats()  # shared by the passes of a generation
        placement = getattr(pair.base, "placement", None)
        self.source_device = placement.device if placement is not None else None
        self.control = control
        # the hint at this pass's source size, made once (a hires pass builds its own sampler)
        self._control = (control.prepare(self.source_size, placement.device, placement.dtype)
                         if control is not None else None)
        self._plan(steps)
        self._delta: torch.Tensor | None = None
        # The whole per-step source computation as one CUDA graph (eager elsewhere): launch-bound
        # source forwards (SD1.5 at 64x64) cost several times their arithmetic when run eagerly.
        self._source_delta = GraphedCall(self._source_delta_eager, name="Delta Sampling source step",
                                         enabled=cuda_graphs)
        self._prefetched: tuple | None = None  # (step, x, Launched) started by `prefetch`

    def _plan(self, steps: int) -> None:
        p = self.params
        self.steps = steps
        self.weights = step_weights(steps, p.scale, p.start, p.end, p.shape)
        self.compute = compute_steps(steps, p.start, p.end, p.reuse)

    @classmethod
    def prepare(cls, pair: SourcePair, params: DeltaParams, *, prompts: Sequence[str],
                negative_prompts: Sequence[str], adapted_prompts: Sequence[str],
                adapted_negative_prompts: Sequence[str], steps: int, cfg_scale: float, target_scale: float,
                noise: torch.Tensor, noise_multiplier: float, sigma0: float,
                embeddings: Mapping[str, EmbeddingVectors] = {},
                adapted_embeddings: Mapping[str, EmbeddingVectors] | None = None,
                generate_mask: torch.Tensor | None = None,
                should_stop: Callable[[], bool] | None = None,
                stats: SourceStats | None = None, cuda_graphs: bool = True,
                control: SourceControl | None = None) -> "DeltaSampler":
        """Encode every prompt-editing segment of both branches once, then build the sampler.
        `noise` is the initial unit noise [B, C, h, w] at the target's latent size."""
        params.check()
        height, width = noise.shape[-2:]
        source_size = (height, width)
        if params.resolution == "native":
            key = "sd2-v" if pair.base.family.value == "sd2" and pair.base.prediction == "v" else pair.base.family.value
            source_size = native_latent_size(height, width, NATIVE_PIXELS[key])
        full = params.guidance == "full"
        every = [*prompts, *adapted_prompts, *(negative_prompts if full else []), *(adapted_negative_prompts if full else [])]
        segments, start = [], 0
        for end in _schedule_ends(every, steps):
            at = [[_prompt_at(p, steps, start) for p in group] for group in
                  (prompts, negative_prompts, adapted_prompts, adapted_negative_prompts)]
            conds = pair.encode(at[0], at[1] if full else None, at[2], at[3] if full else None,
                                width=source_size[1] * 8, height=source_size[0] * 8,
                                embeddings=embeddings, adapted_embeddings=adapted_embeddings)
            segments.append(Segment(end, conds))
            start = end + 1
        return cls(pair, segments, params, steps=steps, cfg_scale=cfg_scale, target_scale=target_scale, noise=noise,
                   noise_multiplier=noise_multiplier, sigma0=sigma0, source_size=source_size,
                   generate_mask=generate_mask, should_stop=should_stop, stats=stats, cuda_graphs=cuda_graphs,
                   control=control)

    @contextmanager
    def running(self) -> Iterator["DeltaSampler"]:
        with self.pair.running():
            yield self

    def weight(self, step: int) -> float:
        return self.weights[step] if 0 <= step < self.steps else 0.0

    def conds_at(self, step: int) -> PairConditioning:
        return next((s.conds for s in self.segments if step <= s.end_step), self.segments[-1].conds)

    @torch.no_grad()  # as `delta`: the same mode, so the same graph
    def prefetch(self, x: torch.Tensor, sigma: torch.Tensor, step: int, total_steps: int) -> None:
        """Start this step's source work before the host computes its own prediction for `x`: once
        the step is a captured CUDA graph it is replayed on a side stream and runs alongside the
        host's forward. The call for the same `x` and step then waits for it (no host sync)."""
        self._prefetched = None
        if total_steps != self.steps:
            self._plan(total_steps)
        if self.weight(step) == 0.0 or not (self._delta is None or self.compute[step]):
            return
        launched = self._source_delta.launch(x, self._sigma_rows(x, sigma), self.conds_at(step),
                                             self._control_on(step), timing=self.stats.cuda_events)
        if launched is not None:  # else eager, or not captured yet: the call computes it
            self._prefetched = (step, x, launched)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, step: int, total_steps: int,
                 target_denoised: torch.Tensor) -> torch.Tensor:
        if self.should_stop is not None and self.should_stop():
            raise GenerationInterrupted("generation interrupted")
        if total_steps != self.steps:
            self._plan(total_steps)
        weight = self.weight(step)
        prefetched, self._prefetched = self._prefetched, None
        if weight == 0.0:
            return target_denoised
        if self._delta is None or self.compute[step]:
            if prefetched is not None and prefetched[0] == step and prefetched[1] is x:
                self._delta = prefetched[2].result()
            else:
                self._delta = self.delta(x, sigma, step)
        return apply_delta(target_denoised, self._delta.to(target_denoised.dtype), weight, self.generate_mask)

    @staticmethod
    def _sigma_rows(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(sigma, device=x.device, dtype=torch.float32).reshape(-1).expand(x.shape[0])

    @torch.no_grad()
    def delta(self, x: torch.Tensor, sigma: torch.Tensor, step: int) -> torch.Tensor:
        """bridge * (D_A - D_S) at the target's latent size, for latent x at noise level sigma.
        On CUDA the result is a graph's output buffer: valid until the next call."""
        with self.stats.measure(self.source_device or x.device):
            return self._source_delta(x, self._sigma_rows(x, sigma), self.conds_at(step), self._control_on(step))

    def _control_on(self, step: int) -> bool:
        """Whether the ControlNet applies at `step` (a constant of the graph's signature)."""
        return self.control is not None and self.control.active(step, self.steps)

    def _source_delta_eager(self, x: torch.Tensor, sigma: torch.Tensor, conds: PairConditioning,
                            control_on: bool = False) -> torch.Tensor:
        x_s = source_input(x, self.noise, sigma, self.noise_per_sigma, self.target_scale, self.source_scale)
        x_s = resize_latent(x_s, self.source_size)
        # without a ControlNet the pair is called as before (any object with `denoise(x, sigma, conds)`)
        outs = (self.pair.denoise(x_s, sigma, conds, self._control) if control_on
                else self.pair.denoise(x_s, sigma, conds))
        if self.params.guidance == "full":
            delta = source_delta(*outs, self.cfg)
        else:
            delta = source_delta(None, outs[0], None, outs[1], self.cfg)
        return resize_latent(delta * self.bridge, self.target_size)
