"""Whole tiny checkpoints in the real single-file layout: UNet + text encoders of one family.

Built from the per-part factories (`factory_unet`, `factory_text`), sized so the parts fit
each other the way real ones do (UNet context = text width; SDXL: CLIP-L + bigG widths,
ADM = bigG projection + 6 x 256) and so detection's head rule (SD1: 8 heads, SD2/SDXL: 64
channels per head) gives back the factory's config.
"""

from __future__ import annotations

import math
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


def checkpoint_tensors(family: str, seed: int = 0, *, vae: bool = False) -> dict[str, torch.Tensor]:
    """UNet + text encoders; with `vae=True` also a tiny VAE under `first_stage_model.`."""
    text = {"sd1": ft.sd1_text_checkpoint, "sd2": ft.sd2_text_checkpoint, "sdxl": ft.sdxl_text_checkpoint}[family]
    tensors = {**fu.ldm_checkpoint(unet_config(family), seed=seed), **text(seed=seed + 1)}
    if vae:
        tensors.update({VAE_PREFIX + k: v for k, v in vae_tensors(seed=seed + 2).items()})
    return tensors


def write_checkpoint(path: Path, family: str, *, seed: int = 0, dtype: torch.dtype | None = None,
                     overrides: dict[str, torch.Tensor] | None = None, vae: bool = False) -> Path:
    """Write a tiny `family` checkpoint; `dtype` stores floating tensors in that precision.
    `vae=True` includes a tiny VAE (`first_stage_model.*`), as real checkpoints do; the default has none."""
    tensors = checkpoint_tensors(family, seed, vae=vae)
    tensors.update(overrides or {})
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


# ---------------------------------------------------------------------------- VAE
# The ldm AutoencoderKL (`ldm/modules/diffusionmodules/model.py` Encoder/Decoder, `ddconfig` of the
# v1/v2/sd_xl yaml files: ch 128, ch_mult (1, 2, 4, 4), num_res_blocks 2, z_channels 4, embed_dim 4,
# attn_resolutions []), shrunk; key names written out here from that definition, independently of
# the runtime's module. GroupNorm has 32 groups, so every width is a multiple of 32.

VAE_PREFIX = "first_stage_model."
VAE_TINY = dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4, embed_dim=4, in_ch=3, out_ch=3)
_VAE_ATTN = ("q", "k", "v", "proj_out")


def _resnet_shapes(name: str, cin: int, cout: int) -> dict[str, tuple[int, ...]]:
    s = {f"{name}.norm1.weight": (cin,), f"{name}.norm1.bias": (cin,),
         f"{name}.conv1.weight": (cout, cin, 3, 3), f"{name}.conv1.bias": (cout,),
         f"{name}.norm2.weight": (cout,), f"{name}.norm2.bias": (cout,),
         f"{name}.conv2.weight": (cout, cout, 3, 3), f"{name}.conv2.bias": (cout,)}
    if cin != cout:
        s.update({f"{name}.nin_shortcut.weight": (cout, cin, 1, 1), f"{name}.nin_shortcut.bias": (cout,)})
    return s


def _mid_shapes(name: str, c: int, linear_attention: bool) -> dict[str, tuple[int, ...]]:
    s = {**_resnet_shapes(f"{name}.block_1", c, c), **_resnet_shapes(f"{name}.block_2", c, c),
         f"{name}.attn_1.norm.weight": (c,), f"{name}.attn_1.norm.bias": (c,)}
    for p in _VAE_ATTN:
        s[f"{name}.attn_1.{p}.weight"] = (c, c) if linear_attention else (c, c, 1, 1)
        s[f"{name}.attn_1.{p}.bias"] = (c,)
    return s


def vae_shapes(*, linear_attention: bool = False, ch: int = 32, ch_mult: tuple[int, ...] = (1, 2, 2),
               num_res_blocks: int = 1, z_channels: int = 4, embed_dim: int = 4, in_ch: int = 3,
               out_ch: int = 3) -> dict[str, tuple[int, ...]]:
    """Every key of an ldm AutoencoderKL (encoder, decoder, quant convs), no prefix -> shape."""
    chans = [ch * m for m in ch_mult]
    s: dict[str, tuple[int, ...]] = {}
    # Encoder: conv_in, down levels (num_res_blocks each, stride-2 conv between), mid, out to 2*z (mean, logvar)
    s.update({"encoder.conv_in.weight": (ch, in_ch, 3, 3), "encoder.conv_in.bias": (ch,)})
    cin = ch
    for level, cout in enumerate(chans):
        for i in range(num_res_blocks):
            s.update(_resnet_shapes(f"encoder.down.{level}.block.{i}", cin, cout))
            cin = cout
        if level != len(chans) - 1:
            s.update({f"encoder.down.{level}.downsample.conv.weight": (cin, cin, 3, 3),
                      f"encoder.down.{level}.downsample.conv.bias": (cin,)})
    s.update(_mid_shapes("encoder.mid", cin, linear_attention))
    s.update({"encoder.norm_out.weight": (cin,), "encoder.norm_out.bias": (cin,),
              "encoder.conv_out.weight": (2 * z_channels, cin, 3, 3), "encoder.conv_out.bias": (2 * z_channels,),
              "quant_conv.weight": (2 * embed_dim, 2 * z_channels, 1, 1), "quant_conv.bias": (2 * embed_dim,),
              "post_quant_conv.weight": (z_channels, embed_dim, 1, 1), "post_quant_conv.bias": (z_channels,)})
    # Decoder: conv_in to the last level's width, mid, up levels coarse to fine (num_res_blocks + 1 each,
    # nearest x2 + conv between), stored as decoder.up.<level> with level 0 at full resolution.
    cin = chans[-1]
    s.update({"decoder.conv_in.weight": (cin, z_channels, 3, 3), "decoder.conv_in.bias": (cin,)})
    s.update(_mid_shapes("decoder.mid", cin, linear_attention))
    for level in reversed(range(len(chans))):
        for i in range(num_res_blocks + 1):
            s.update(_resnet_shapes(f"decoder.up.{level}.block.{i}", cin, chans[level]))
            cin = chans[level]
        if level != 0:
            s.update({f"decoder.up.{level}.upsample.conv.weight": (cin, cin, 3, 3),
                      f"decoder.up.{level}.upsample.conv.bias": (cin,)})
    s.update({"decoder.norm_out.weight": (cin,), "decoder.norm_out.bias": (cin,),
              "decoder.conv_out.weight": (out_ch, cin, 3, 3), "decoder.conv_out.bias": (out_ch,)})
    return s


def vae_tensors(seed: int = 0, *, linear_attention: bool = False, **config) -> dict[str, torch.Tensor]:
    """Random float32 weights for `vae_shapes` (keys without `first_stage_model.`), scaled like the
    UNet factory's (fan-in weights, biases ~0.1, norm scales ~1) so activations stay O(1)."""
    shapes = vae_shapes(linear_attention=linear_attention, **{**VAE_TINY, **config})
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key in sorted(shapes):
        shape = shapes[key]
        noise = torch.randn(shape, generator=gen)
        if len(shape) >= 2:
            out[key] = noise / math.sqrt(math.prod(shape[1:]))
        elif key.endswith(".weight"):
            out[key] = 1.0 + 0.1 * noise
        else:
            out[key] = 0.1 * noise
    return out


def write_vae_file(path: Path, *, seed: int = 0, dtype: torch.dtype | None = None, linear_attention: bool = False,
                   prefix: str = "", extra: dict[str, torch.Tensor] | None = None) -> Path:
    """A standalone VAE file as in models/VAE: keys `encoder.*`, `decoder.*`, `quant_conv.*`,
    `post_quant_conv.*` (with `prefix`, e.g. "first_stage_model.", as some files have them).
    `.safetensors` by default; a `.ckpt`/`.pt` path gets torch.save({"state_dict": ...}) like old VAE files."""
    tensors = {prefix + k: v for k, v in vae_tensors(seed, linear_attention=linear_attention).items()}
    tensors.update(extra or {})
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    if Path(path).suffix in (".ckpt", ".pt", ".pth"):
        torch.save({"state_dict": tensors}, str(path))
    else:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path
