"""lambda(step): the delta's weight at each sampling step, computed once per generation.

scale x window [start, end) over the step fractions i / steps x shape within the window:
constant 1; linear 1 - p; cosine (1 + cos(pi p)) / 2; sigmoid a logistic S-curve from 1 to 0,
centred at p = 1/2 with steepness 10 and rescaled to reach exactly 1 at p = 0 and 0 at p = 1,
with p = (i/steps - start) / (end - start) in [0, 1). Outside the window the weight is exactly 0
and no source model runs.

`sigmoid` follows the paper's workflow files, which were saved with a 'sigmoid' lambda schedule the
released node lacks (their start/end values were 1 and 1, or 1 and 0.5). What those values meant
is not published; here sigmoid is, like linear and cosine, a fall-off to 0 over the window: it
holds near full strength for the first part, then drops faster than cosine.
"""

from __future__ import annotations

import math

SHAPES = ("constant", "linear", "cosine", "sigmoid")
SIGMOID_STEEPNESS = 10.0


def window_position(step: int, steps: int, start: float, end: float) -> float | None:
    """Where step i lies in the window, as p in [0, 1), or None outside it."""
    fraction = step / steps
    if not (start <= fraction < end):
        return None
    return (fraction - start) / (end - start)


def shape_weight(shape: str, p: float) -> float:
    if shape == "constant":
        return 1.0
    if shape == "linear":
        return 1.0 - p
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * p))
    if shape == "sigmoid":
        return _logistic_falloff(p)
    raise ValueError(f"unknown schedule shape {shape!r}; expected one of {SHAPES}")


def _logistic_falloff(p: float, k: float = SIGMOID_STEEPNESS) -> float:
    def logistic(z: float) -> float:
        return 1.0 / (1.0 + math.exp(-z))
    top, bottom = logistic(k / 2), logistic(-k / 2)
    return (logistic(k * (0.5 - p)) - bottom) / (top - bottom)


def step_weights(steps: int, scale: float, start: float, end: float, shape: str) -> list[float]:
    """lambda for steps 0 .. steps-1 (plain Python floats: no device tensors on the step path)."""
    weights = []
    for i in range(steps):
        p = window_position(i, steps, start, end)
        weights.append(0.0 if p is None else scale * shape_weight(shape, p))
    return weights


def compute_steps(steps: int, start: float, end: float, reuse: int) -> list[bool]:
    """Which steps run the source models: every `reuse`-th step of the window, counted from its
    first step; the steps in between reuse the last delta."""
    inside = [window_position(i, steps, start, end) is not None for i in range(steps)]
    first = next((i for i, v in enumerate(inside) if v), None)
    return [v and (i - first) % reuse == 0 for i, v in enumerate(inside)] if first is not None else inside


def never_applies(step_counts, scale: float, start: float, end: float, shape: str) -> bool:
    """True when lambda is 0 at every step of every pass (`step_counts`: the steps of each pass that
    will run): scale 0, or a window that holds no step. Then Delta Sampling is off for the generation."""
    return all(w == 0.0 for steps in step_counts for w in step_weights(steps, scale, start, end, shape))
