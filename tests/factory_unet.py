"""Tiny UNets in the real LDM key layout, for tests and test checkpoints.

    config = sd1_config()                         # or sd2_config(), sdxl_config(pooled_dim=32)
    sd = random_unet_state_dict(config, seed=0)   # keys WITHOUT "model.diffusion_model."
    ckpt = {"model.diffusion_model." + k: v for k, v in sd.items()}

Each config keeps the family's structure (SD1: 1x1-conv projections and a fixed 8
heads; SD2: Linear projections and fixed channels per head; SDXL: no attention at
level 0, deeper transformers further down, the `label_emb` ADM input), shrunk so a
forward pass at 16x16 takes milliseconds on a CPU. Overrides go through keyword
arguments (`sd1_config(context_dim=768)`), e.g. to match a tiny text encoder.
`heads_kwargs(config)` gives what `unet_config_from_store` needs to derive it back.

Weights are random but scaled by fan-in, with non-zero biases and norm weights
around 1, so activations stay O(1) through the whole net and a mistake in any layer
changes the output visibly.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from lib_deltasampling.runtime.unet import UNetModel
from lib_deltasampling.runtime.unet_config import UNetConfig

UNET_PREFIX = "model.diffusion_model."
SDXL_TIME_IDS = 6        # original size (h, w), crop (top, left), target size (h, w)
SDXL_TIME_EMBED_DIM = 256  # each time id becomes a 256-wide sinusoidal embedding


def sd1_config(**overrides) -> UNetConfig:
    """SD1-like: 3 levels, 2 res blocks, transformers at all levels but the last, conv proj_in, 8 heads."""
    config = UNetConfig(
        in_channels=4, out_channels=4, model_channels=32,
        channel_mult=(1, 2, 2), num_res_blocks=(2, 2, 2),
        transformer_depth=(1, 1, 1, 1, 0, 0),
        transformer_depth_output=(0, 0, 0, 1, 1, 1, 1, 1, 1),
        transformer_depth_middle=1,
        context_dim=40, num_heads=8, use_linear_in_transformer=False)
    return dataclasses.replace(config, **overrides)


def sd2_config(**overrides) -> UNetConfig:
    """SD2-like: Linear proj_in/proj_out, 16 channels per head (32 -> 2 heads, 64 -> 4)."""
    config = UNetConfig(
        in_channels=4, out_channels=4, model_channels=32,
        channel_mult=(1, 2, 2), num_res_blocks=(1, 1, 1),
        transformer_depth=(1, 1, 0),
        transformer_depth_output=(0, 0, 1, 1, 1, 1),
        transformer_depth_middle=1,
        context_dim=48, num_head_channels=16, use_linear_in_transformer=True)
    return dataclasses.replace(config, **overrides)


def sdxl_config(*, pooled_dim: int = 32, **overrides) -> UNetConfig:
    """SDXL-like: level 0 without attention, depths 1 and 2 below, middle 2, 64 channels per head,
    ADM input = pooled text embedding + 6 x 256 size/crop embeddings (like 1280 + 1536 = 2816)."""
    config = UNetConfig(
        in_channels=4, out_channels=4, model_channels=64,
        channel_mult=(1, 2, 2), num_res_blocks=(2, 2, 2),
        transformer_depth=(0, 0, 1, 1, 2, 2),
        transformer_depth_output=(2, 2, 2, 1, 1, 1, 0, 0, 0),
        transformer_depth_middle=2,
        context_dim=48, num_head_channels=64, use_linear_in_transformer=True,
        adm_in_channels=pooled_dim + SDXL_TIME_IDS * SDXL_TIME_EMBED_DIM)
    return dataclasses.replace(config, **overrides)


CONFIGS = {"sd1": sd1_config, "sd2": sd2_config, "sdxl": sdxl_config}


def heads_kwargs(config: UNetConfig) -> dict[str, int | None]:
    """The head split shapes cannot tell, as `unet_config_from_store(store, **heads_kwargs(c))` takes it."""
    return {"num_heads": config.num_heads, "num_head_channels": config.num_head_channels}


def random_unet_state_dict(config: UNetConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """float32 CPU weights for every key of `config`'s UNet, without the `model.diffusion_model.` prefix.

    Deterministic in (config, seed). Weights ~ N(0, 1/fan_in) (so each layer roughly
    keeps unit scale), biases ~ N(0, 0.1^2), norm weights ~ 1 + N(0, 0.1^2).
    """
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in UNetModel(config).state_dict().items()}
    return random_tensors(shapes, seed)


def random_tensors(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """float32 tensors of the given shapes, initialised as `random_unet_state_dict` describes."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key in sorted(shapes):
        shape = shapes[key]
        noise = torch.randn(shape, generator=gen)
        if len(shape) >= 2:                      # Linear / Conv weight
            fan_in = math.prod(shape[1:])
            out[key] = noise / math.sqrt(fan_in)
        elif key.endswith(".weight"):            # 1-D weights are GroupNorm/LayerNorm scales
            out[key] = 1.0 + 0.1 * noise
        else:                                    # biases, norm biases
            out[key] = 0.1 * noise
    return out


def ldm_checkpoint(config: UNetConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """`random_unet_state_dict` with the single-file prefix, ready for `safetensors.torch.save_file`."""
    return {UNET_PREFIX + k: v for k, v in random_unet_state_dict(config, seed).items()}
