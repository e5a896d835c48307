"""Whole tiny checkpoints in the real single-file layout: UNet + text encoders of one family.

Built from the per-part factories (`factory_unet`, `factory_text`), sized so the parts fit
each other the way real ones do (UNet context = text width; SDXL: CLIP-L + bigG widths,
ADM = bigG projection + 6 x 256) and so detection's head rule (SD1: 8 heads, SD2/SDXL: 64
channels per head) gives back the factory's config.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

import factory_text as ft
import factory_unet as fu
from lib_deltasampling.runtime.unet_config import UNetConfig

FAMILIES = ("sd1", "sd2", "sdxl")


def unet_config(family: str) -> UNetConfig:
    if family == "sd1":
        return fu.sd1_config(context_dim=ft.CLIP_L[0])
    if family == "sd2":
        return fu.sd2_config(model_channels=64, num_head_channels=64, context_dim=ft.CLIP_H[0])
    return fu.sdxl_config(pooled_dim=ft.CLIP_G_PROJ, context_dim=ft.CLIP_L[0] + ft.CLIP_G[0])


def checkpoint_tensors(family: str, seed: int = 0) -> dict[str, torch.Tensor]:
    text = {"sd1": ft.sd1_text_checkpoint, "sd2": ft.sd2_text_checkpoint, "sdxl": ft.sdxl_text_checkpoint}[family]
    return {**fu.ldm_checkpoint(unet_config(family), seed=seed), **text(seed=seed + 1)}


def write_checkpoint(path: Path, family: str, *, seed: int = 0, dtype: torch.dtype | None = None,
                     overrides: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a tiny `family` checkpoint; `dtype` stores floating tensors in that precision."""
    tensors = checkpoint_tensors(family, seed)
    tensors.update(overrides or {})
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path
