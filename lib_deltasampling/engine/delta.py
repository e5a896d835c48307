"""The Delta Sampling formula as pure tensor functions (DESIGN.md §2).

    D_S = D_S(u) + w (D_S(c) - D_S(u))          source base, CFG in x0 space
    D_A = D_A(u) + w (D_A(c) - D_A(u))          adapted source, same w
    D   = D_T + lambda * bridge * (D_A - D_S)   on the area being generated only
"""

from __future__ import annotations

import torch


def cfg_combine(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    return uncond + scale * (cond - uncond)


def source_delta(base_uncond: torch.Tensor | None, base_cond: torch.Tensor, adapted_uncond: torch.Tensor | None,
                 adapted_cond: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """D_A - D_S with per-branch CFG; without unconds (guidance "cond") the cond predictions alone."""
    if base_uncond is None or adapted_uncond is None:
        return adapted_cond - base_cond
    return cfg_combine(adapted_uncond, adapted_cond, cfg_scale) - cfg_combine(base_uncond, base_cond, cfg_scale)


def apply_delta(target_denoised: torch.Tensor, delta: torch.Tensor, weight: float,
                generate_mask: torch.Tensor | None = None) -> torch.Tensor:
    """D_T + weight * delta, restricted to `generate_mask` (1 where the image is generated, 0 where
    inpainting preserves it) so the preserved area never changes."""
    if generate_mask is not None:
        delta = delta * generate_mask
    return target_denoised + weight * delta
