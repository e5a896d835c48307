"""UNet configuration, derived from tensor shapes of `model.diffusion_model.*`.

Everything structural is read from the state dict, so a tiny test model with the
real key layout goes through the same path as a 2.6 B-parameter SDXL checkpoint.
The one thing shapes cannot tell is how attention splits into heads; the family
decides it (SD1: 8 heads; SD2 and SDXL: 64 channels per head), passed in by the caller.

A ControlNet is a copy of the UNet's encoder (input blocks and middle block); its config is
derived with `encoder_only=True` and has no output side (`out_channels` 0,
`transformer_depth_output` empty).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from ..errors import ModelFileError
from .checkpoint import TensorStore


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int
    out_channels: int                          # 0 in an encoder-only config (ControlNet)
    model_channels: int
    channel_mult: tuple[int, ...]              # per level
    num_res_blocks: tuple[int, ...]            # per level
    transformer_depth: tuple[int, ...]         # per input res block, in order; 0 = no transformer
    transformer_depth_output: tuple[int, ...]  # per output res block, in order; 0 = no transformer; () encoder-only
    transformer_depth_middle: int              # 0 = middle block has no transformer
    context_dim: int
    num_heads: int | None = None               # fixed head count (SD1)...
    num_head_channels: int | None = None       # ...or fixed channels per head (SD2, SDXL)
    use_linear_in_transformer: bool = False    # proj_in/proj_out are Linear (SD2, SDXL) or 1x1 conv (SD1)
    adm_in_channels: int | None = None         # SDXL: pooled text + size/crop embeddings (2816)

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4

    def encoder(self) -> "UNetConfig":
        """This config without its output side: what an encoder-only config of the same UNet
        (a ControlNet made from it) compares equal to."""
        return dataclasses.replace(self, out_channels=0, transformer_depth_output=())

    def heads_for(self, channels: int) -> tuple[int, int]:
        """(heads, channels per head) of a transformer with `channels` channels."""
        if self.num_head_channels:
            return channels // self.num_head_channels, self.num_head_channels
        assert self.num_heads
        return self.num_heads, channels // self.num_heads


def _count_transformer_blocks(store: TensorStore, block: str) -> int:
    pattern = re.compile(re.escape(block) + r"\.transformer_blocks\.(\d+)\.")
    found = {int(m.group(1)) for k in store.keys() if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def unet_config_from_store(store: TensorStore, *, num_heads: int | None = None,
                           num_head_channels: int | None = None, encoder_only: bool = False) -> UNetConfig:
    """Derive a `UNetConfig` from a store holding the UNet keys without their prefix.

    `encoder_only`: read only the input blocks and the middle block (a ControlNet, which has
    no output side); the result has `out_channels` 0 and no `transformer_depth_output`.
    """
    path = store.path or "(in memory)"
    if encoder_only:
        if "input_blocks.0.0.weight" not in store:
            raise ModelFileError(path, "no LDM UNet encoder found (input_blocks.0.0 missing)",
                                 "The file is damaged or not a supported model")
    elif "input_blocks.0.0.weight" not in store or "out.2.weight" not in store:
        raise ModelFileError(path, "no LDM UNet found (input_blocks.0.0 / out.2 missing)",
                             "Use a single-file SD1.x, SD2.x or SDXL checkpoint")
    model_channels, in_channels = store.shape("input_blocks.0.0.weight")[:2]
    out_channels = 0 if encoder_only else store.shape("out.2.weight")[0]

    channel_mult: list[int] = []
    num_res_blocks: list[int] = []
    transformer_depth: list[int] = []
    level_blocks = 0
    i = 1
    while f"input_blocks.{i}.0.op.weight" in store or f"input_blocks.{i}.0.in_layers.0.weight" in store:
        if f"input_blocks.{i}.0.op.weight" in store:  # downsample closes a level
            num_res_blocks.append(level_blocks)
            level_blocks = 0
        else:
            out_ch = store.shape(f"input_blocks.{i}.0.out_layers.3.weight")[0]
            if level_blocks == 0:
                channel_mult.append(out_ch // model_channels)
            level_blocks += 1
            transformer_depth.append(_count_transformer_blocks(store, f"input_blocks.{i}.1"))
        i += 1
    num_res_blocks.append(level_blocks)
    if len(num_res_blocks) != len(channel_mult):
        raise ModelFileError(path, "UNet input blocks do not form complete levels", "The checkpoint is damaged or unsupported")

    transformer_depth_output: list[int] = []
    j = 0
    while not encoder_only and f"output_blocks.{j}.0.in_layers.0.weight" in store:
        transformer_depth_output.append(_count_transformer_blocks(store, f"output_blocks.{j}.1"))
        j += 1
    if not encoder_only and j != sum(num_res_blocks) + len(num_res_blocks):
        raise ModelFileError(path, f"UNet has {j} output blocks, expected {sum(num_res_blocks) + len(num_res_blocks)}",
                             "The checkpoint is damaged or unsupported")

    context_dim = 0
    linear = False
    for k in store.keys():
        if k.endswith("attn2.to_k.weight"):
            context_dim = store.shape(k)[1]
        if k.endswith(".proj_in.weight"):
            linear = len(store.shape(k)) == 2
    adm = store.shape("label_emb.0.0.weight")[1] if "label_emb.0.0.weight" in store else None

    return UNetConfig(
        in_channels=in_channels,
        out_channels=out_channels,
        model_channels=model_channels,
        channel_mult=tuple(channel_mult),
        num_res_blocks=tuple(num_res_blocks),
        transformer_depth=tuple(transformer_depth),
        transformer_depth_output=tuple(transformer_depth_output),
        transformer_depth_middle=_count_transformer_blocks(store, "middle_block.1"),
        context_dim=context_dim,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        use_linear_in_transformer=linear,
        adm_in_channels=adm,
    )
