"""Tiny ControlNets in the real key layouts, for tests.

    config = CONTROLNET_CONFIGS["sd1"]                    # encoder-only UNetConfig of the family
    sd = random_controlnet_state_dict(config, seed=0)     # LDM names, no prefix
    ckpt = {"control_model." + k: v for k, v in sd.items()}

Each config is the family's tiny test UNet (factory_unet) with the family's real
cross-attention width (768 / 1024 / 2048), because detection reads the family from it,
and with the family's real head split (SD1 8 heads, SD2/SDXL 64 channels per head).
`ORIGINAL_CONTROL_PARAMS` are the same nets written as the `control_stage_config.params`
of cldm's yaml files (cldm_v15.yaml, cldm_v21.yaml, an SDXL one), for diffusers' own
config and checkpoint conversion.
"""

from __future__ import annotations

import torch

from factory_unet import SDXL_TIME_EMBED_DIM, random_tensors, sd1_config, sd2_config, sdxl_config
from lib_deltasampling.runtime.controlnet import ControlNet
from lib_deltasampling.runtime.unet_config import UNetConfig

CONTROL_PREFIX = "control_model."
SDXL_POOLED = 32

CONTROLNET_CONFIGS: dict[str, UNetConfig] = {
    "sd1": sd1_config(context_dim=768).encoder(),
    "sd2": sd2_config(model_channels=64, num_head_channels=64, context_dim=1024).encoder(),
    "sdxl": sdxl_config(pooled_dim=SDXL_POOLED, context_dim=2048, num_res_blocks=(1, 1, 1),
                        transformer_depth=(0, 1, 2)).encoder(),
}

ORIGINAL_CONTROL_PARAMS = {
    "sd1": dict(in_channels=4, hint_channels=3, model_channels=32, attention_resolutions=[1, 2], num_res_blocks=2,
                channel_mult=[1, 2, 2], num_heads=8, transformer_depth=1, context_dim=768,
                use_linear_in_transformer=False),
    "sd2": dict(in_channels=4, hint_channels=3, model_channels=64, attention_resolutions=[1, 2], num_res_blocks=1,
                channel_mult=[1, 2, 2], num_head_channels=64, transformer_depth=1, context_dim=1024,
                use_linear_in_transformer=True),
    "sdxl": dict(in_channels=4, hint_channels=3, model_channels=64, attention_resolutions=[2, 4], num_res_blocks=1,
                 channel_mult=[1, 2, 2], num_head_channels=64, transformer_depth=[0, 1, 2], context_dim=2048,
                 use_linear_in_transformer=True, num_classes="sequential",
                 adm_in_channels=SDXL_POOLED + 6 * SDXL_TIME_EMBED_DIM),
}


def controlnet_shapes(config: UNetConfig, hint_channels: int = 3) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in ControlNet(config, hint_channels).state_dict().items()}


def random_controlnet_state_dict(config: UNetConfig, hint_channels: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """float32 weights for every key of the ControlNet (LDM names, no prefix); no zero-initialised
    layer, so every residual carries signal."""
    return random_tensors(controlnet_shapes(config, hint_channels), seed)


def ldm_controlnet_file(config: UNetConfig, hint_channels: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """`random_controlnet_state_dict` under `control_model.`, as lllyasviel/A1111 files hold it."""
    return {CONTROL_PREFIX + k: v for k, v in random_controlnet_state_dict(config, hint_channels, seed).items()}


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Overwrite every parameter with `random_tensors` values (diffusers zero-initialises the
    zero convs and the hint encoder's last conv, which would make every residual 0)."""
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    module.load_state_dict(random_tensors(shapes, seed), strict=True)
    return module
