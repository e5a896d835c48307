"""Mirrors modules/rng.py `ImageRNG(shape, seeds, subseeds, subseed_strength, seed_resize_from_h,
seed_resize_from_w)` with "Random number generator source: CPU": one generator per image seed;
`first()` draws the initial noise (then re-seeds with seed + ENSD when eta_noise_seed_delta is
set), `next()` returns `first()` the first time and later draws from the same generators.
Built on the project's `runner.sampling.ImageNoise` (tested against A1111's CPU RNG).
Variation seeds and seed resize are not modelled."""

import torch

from lib_deltasampling.runner.sampling import ImageNoise
from modules import shared


class ImageRNG:
    def __init__(self, shape, seeds, subseeds=None, subseed_strength=0.0, seed_resize_from_h=0, seed_resize_from_w=0):
        self.shape = tuple(map(int, shape))
        self.seeds = seeds
        self.subseeds = subseeds
        self.subseed_strength = subseed_strength
        self._noise = ImageNoise(seeds, self.shape, eta_noise_seed_delta=shared.opts.eta_noise_seed_delta or 0)
        self.is_first = True

    def first(self):
        self.is_first = False
        return self._noise.first()

    def next(self):
        if self.is_first:
            return self.first()
        return self._noise.next()


def randn(seed, shape, generator=None):
    g = generator or torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn(shape, generator=g)
