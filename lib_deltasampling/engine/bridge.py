"""Between the target's latent space and the source's.

Denoised latents are added in unscaled VAE-latent space, as the official node does: each model's
latent is divided by its own scale factor, so a source delta enters the target as
`delta * s_T / s_S` (identity when the factors match: SD1 <-> SD2, SDXL <-> its fine-tunes).

The source sees the target's trajectory with only its signal part rescaled (DESIGN.md §2):
`x_s = c_i n + (s_S / s_T)(x - c_i n)` with n the initial unit noise and c_i = c_0 sigma_i / sigma_0.
For deterministic samplers this equals the official node's second latent exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Native pixel area per family (and SD2's 768 px v-prediction models), for `resolution = native`.
NATIVE_PIXELS = {"sd1": 512, "sd2": 512, "sd2-v": 768, "sdxl": 1024}


def bridge_factor(target_scale: float, source_scale: float) -> float:
    """Multiplier taking a source-space delta into the target's latent space."""
    return target_scale / source_scale


def source_input(x: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, noise_per_sigma: float,
                 target_scale: float, source_scale: float) -> torch.Tensor:
    """x_s = c n + (s_S / s_T)(x - c n), c = noise_per_sigma * sigma (= c_0 / sigma_0 * sigma_i)."""
    if source_scale == target_scale:
        return x
    c = (sigma.to(x.dtype) * noise_per_sigma).reshape(-1, *([1] * (x.ndim - 1)))
    noise_part = c * noise
    return noise_part + (source_scale / target_scale) * (x - noise_part)


def native_latent_size(height: int, width: int, native_pixels: int) -> tuple[int, int]:
    """The latent size with the family's native pixel area and (about) the target's aspect ratio."""
    side = native_pixels // 8
    factor = math.sqrt(side * side / (height * width))
    return max(1, round(height * factor)), max(1, round(width * factor))


def resize_latent(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Area-averaging when shrinking, bilinear when enlarging; identity when the size matches."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrinking = size[0] * size[1] < x.shape[-2] * x.shape[-1]
    if shrinking:
        return F.interpolate(x, size=size, mode="area")
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
