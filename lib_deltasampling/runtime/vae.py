"""The VAE decoder (LDM `AutoencoderKL`) of SD1.x, SD2.x and SDXL: latents -> images.

    vae = load_vae_decoder(open_store("sd15.safetensors"))      # the checkpoint's own VAE
    vae = load_vae_decoder(open_vae("models/VAE/sdxl_vae.safetensors"), device="cuda")
    image = vae.decode(latents, scale=model.latent_scale)      # [B, 3, 8h, 8w] float32, about [-1, 1]
    pixels = to_uint8_images(image)                             # numpy uint8 [B, 8h, 8w, 3], as A1111

Module names are the checkpoint names under `first_stage_model.` (`decoder.up.3.block.0.conv1.weight`,
`post_quant_conv.weight`), so `load_strict` loads them without conversion. Only the decoder is
built; the encoder, `quant_conv` and training leftovers (`loss.*`, `model_ema.*`) are not read.
The layout (channels per level, res blocks, latent channels) comes from tensor shapes.

Choices:
- `decode(latents, scale=...)` takes latents in the sampler's (scaled) space and multiplies by
  `1 / scale` first, as ldm's `decode_first_stage` does; `scale=1.0` (the default) means the
  latents are already raw VAE latents.
- Precision: float32 by default. SDXL's VAE overflows in float16 (inf -> NaN in its mid block),
  so float16 is only a request: when a float16 decode gives non-finite values, the decoder
  converts itself to float32 and decodes again (A1111's "Automatically revert VAE to 32-bit
  floats"). bfloat16 has float32's range and is used as asked. Latents are cast to the decoder's
  dtype on the way in; the image comes back in float32.
- Memory: `decode` runs `rows_per_call` images at a time (default 1, as A1111 decodes), because
  activations at full resolution dominate (128 channels x 1024 x 1024 x 4 bytes = 512 MiB each
  in float32). The mid attention (one head over all C channels, 16384 tokens at 1024 x 1024)
  goes through SDPA, whose fused kernels never build the tokens x tokens matrix.
- GroupNorm runs in the compute dtype, like the UNet (see unet.py).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from functools import reduce

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelFileError, SettingError
from .attention import attention
from .checkpoint import TensorStore, open_store
from .loading import load_strict

log = logging.getLogger("delta-sampling")

CHECKPOINT_VAE_PREFIX = "first_stage_model."
GROUPS = 32          # ldm `Normalize()`: GroupNorm(32, C, eps=1e-6)
NORM_EPS = 1e-6
LATENT_CHANNELS = 4  # SD1.x / SD2.x / SDXL; SD3 and Flux VAEs have 16
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# The mid attention's matrices: 1x1 convs [C, C, 1, 1] in ldm files, [C, C] (Linear) in files
# written by some converters; both are read as convs.
_ATTN_MATRICES = tuple(f"decoder.mid.attn_1.{n}.weight" for n in ("q", "k", "v", "proj_out"))
_NEEDED = ("decoder.", "post_quant_conv.")
_VAE_FIX = ("Choose a single-file VAE (a .safetensors from models/VAE, e.g. sdxl_vae.safetensors or "
            "vae-ft-mse-840000-ema-pruned.safetensors) or a checkpoint that includes its VAE")


# ---------------------------------------------------------------------------- config

@dataclass(frozen=True)
class VaeConfig:
    """ldm `ddconfig` of the decoder: level l has `ch * ch_mult[l]` channels, level 0 is full size."""
    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int   # decoder levels hold num_res_blocks + 1 blocks
    z_channels: int
    embed_dim: int        # latent channels (post_quant_conv input)
    out_ch: int

    @property
    def level_channels(self) -> tuple[int, ...]:
        return tuple(self.ch * m for m in self.ch_mult)

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


def _shape(store: TensorStore, key: str, ndim: int) -> tuple[int, ...]:
    path = store.path or "(in memory)"
    if key not in store:
        raise ModelFileError(path, f"VAE weight '{store.prefix}{key}' is missing", "The VAE is incomplete or damaged; download it again")
    shape = store.shape(key)
    if len(shape) != ndim:
        raise ModelFileError(path, f"VAE weight '{store.prefix}{key}' has shape {list(shape)}, expected {ndim} dimensions",
                             "The file is damaged or not a Stable Diffusion VAE")
    return shape


def vae_config_from_store(store: TensorStore) -> VaeConfig:
    """The decoder layout from shapes; `store` holds `decoder.*` and `post_quant_conv.*` (see `find_vae`)."""
    path = store.path or "(in memory)"
    levels = sorted({int(m.group(1)) for k in store.keys() if (m := re.match(r"decoder\.up\.(\d+)\.", k))})
    if not levels or levels != list(range(len(levels))):
        raise ModelFileError(path, f"the VAE decoder's levels are {levels or 'missing'} (decoder.up.N.*)",
                             "The file is damaged or not a Stable Diffusion VAE")
    blocks = {int(m.group(1)) for k in store.keys() if (m := re.match(r"decoder\.up\.0\.block\.(\d+)\.", k))}
    if not blocks:
        raise ModelFileError(path, "the VAE decoder has no res blocks (decoder.up.0.block.M.*)",
                             "The file is damaged or not a Stable Diffusion VAE")
    channels = [_shape(store, f"decoder.up.{level}.block.0.conv1.weight", 4)[0] for level in levels]
    if any(c % GROUPS for c in channels):
        raise ModelFileError(path, f"VAE decoder channels {channels} are not multiples of {GROUPS} (its GroupNorm groups)",
                             "The file is not a Stable Diffusion VAE")
    ch = reduce(math.gcd, channels)
    return VaeConfig(ch=ch, ch_mult=tuple(c // ch for c in channels), num_res_blocks=max(blocks),
                     z_channels=_shape(store, "decoder.conv_in.weight", 4)[1],
                     embed_dim=_shape(store, "post_quant_conv.weight", 4)[1],
                     out_ch=_shape(store, "decoder.conv_out.weight", 4)[0])


# ---------------------------------------------------------------------------- layers

def _norm(channels: int, **f) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPS, channels, eps=NORM_EPS, **f)


def _conv(cin: int, cout: int, k: int, **f) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, padding=k // 2, **f)


class ResnetBlock(nn.Module):
    """h = conv1(silu(norm1(x))); h = conv2(silu(norm2(h))); return skip(x) + h (no time embedding)."""

    def __init__(self, cin: int, cout: int, **f) -> None:
        super().__init__()
        self.norm1 = _norm(cin, **f)
        self.conv1 = _conv(cin, cout, 3, **f)
        self.norm2 = _norm(cout, **f)
        self.conv2 = _conv(cout, cout, 3, **f)
        # ldm: a 1x1 `nin_shortcut` when the width changes (its 3x3 `conv_shortcut` is never used by SD VAEs)
        self.nin_shortcut = _conv(cin, cout, 1, **f) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x), inplace=True))   # in place into fresh norm outputs only
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        return h.add_(x if self.nin_shortcut is None else self.nin_shortcut(x))


class AttnBlock(nn.Module):
    """x + proj_out(softmax(q k^T / sqrt(C)) v): one head over all C channels, tokens = pixels."""

    def __init__(self, channels: int, **f) -> None:
        super().__init__()
        self.norm = _norm(channels, **f)
        self.q = _conv(channels, channels, 1, **f)
        self.k = _conv(channels, channels, 1, **f)
        self.v = _conv(channels, channels, 1, **f)
        self.proj_out = _conv(channels, channels, 1, **f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        h = self.norm(x)
        # [B, C, H, W] -> [B, HW, C] as strided views; SDPA reads them directly
        q, k, v = (proj(h).flatten(2).transpose(1, 2) for proj in (self.q, self.k, self.v))
        h = attention(q, k, v, heads=1)
        h = h.transpose(1, 2).reshape(b, c, height, width)
        return self.proj_out(h).add_(x)


class Upsample(nn.Module):
    """Nearest x2, then a 3x3 conv."""

    def __init__(self, channels: int, **f) -> None:
        super().__init__()
        self.conv = _conv(channels, channels, 3, **f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Decoder(nn.Module):
    """ldm `Decoder` without up-block attention (SD VAEs have `attn_resolutions=[]`)."""

    def __init__(self, config: VaeConfig, **f) -> None:
        super().__init__()
        chans = config.level_channels
        top = chans[-1]
        self.conv_in = _conv(config.z_channels, top, 3, **f)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(top, top, **f)
        self.mid.attn_1 = AttnBlock(top, **f)
        self.mid.block_2 = ResnetBlock(top, top, **f)
        self.up = nn.ModuleList()
        cin = top
        levels = []
        for level in reversed(range(len(chans))):       # built coarse to fine; stored as up.<level>
            up = nn.Module()
            up.block = nn.ModuleList()
            for _ in range(config.num_res_blocks + 1):
                up.block.append(ResnetBlock(cin, chans[level], **f))
                cin = chans[level]
            if level != 0:
                up.upsample = Upsample(cin, **f)
            levels.insert(0, up)
        self.up.extend(levels)
        self.norm_out = _norm(cin, **f)
        self.conv_out = _conv(cin, config.out_ch, 3, **f)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(range(len(self.up))):
            up = self.up[level]
            for block in up.block:
                h = block(h)
            if level != 0:
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))


class VaeDecoder(nn.Module):
    """`post_quant_conv` + `decoder` of an AutoencoderKL; `forward(raw latents) -> image`, unclamped."""

    def __init__(self, config: VaeConfig, **f) -> None:
        super().__init__()
        self.config = config
        self.post_quant_conv = _conv(config.embed_dim, config.z_channels, 1, **f)
        self.decoder = Decoder(config, **f)

    @property
    def dtype(self) -> torch.dtype:
        return self.post_quant_conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.post_quant_conv.weight.device

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, *, scale: float = 1.0, rows_per_call: int = 1) -> torch.Tensor:
        """Images [B, out_ch, 8h, 8w] in float32 on this device, about [-1, 1] (not clamped).

        `latents` [B, 4, h, w] are in the sampler's space scaled by `scale` (pass the model's
        `latent_scale`: 0.18215 SD1/SD2, 0.13025 SDXL); they are cast to the decoder's dtype and
        multiplied by 1/scale first, as A1111 / ldm's `decode_first_stage`. With the default `scale=1.0` they must already be raw VAE
        latents. Decodes `rows_per_call` images at a time (memory; see the module docstring).
        """
        latents = latents.to(self.device)
        return torch.cat([self._decode_rows(rows, scale) for rows in latents.split(max(1, rows_per_call))])

    def _decode_rows(self, latents: torch.Tensor, scale: float) -> torch.Tensor:
        # cast, then scale in the decoder's dtype, as A1111 (`x.to(dtype_vae)`, then `1 / scale_factor * z`)
        out = self(latents.to(self.dtype) * (1.0 / scale)).float()
        if self.dtype == torch.float16 and not torch.isfinite(out).all():   # one sync per call, at the end
            log.warning("The VAE produced NaN/inf in float16 (SDXL's VAE overflows there); "
                        "converting it to float32 and decoding again")
            self.float()
            out = self(latents.float() * (1.0 / scale))
        return out


# ---------------------------------------------------------------------------- files

def _refuse_diffusers(store: TensorStore, path) -> None:
    for prefix in ("", CHECKPOINT_VAE_PREFIX, "vae."):
        if store.has_prefix(prefix + "decoder.up_blocks.") or store.has_prefix(prefix + "decoder.mid_block."):
            raise ModelFileError(path, "this is a diffusers-format VAE (decoder.up_blocks.*), not the single-file (LDM) layout",
                                 "Use the single-file VAE .safetensors that the model's repository also provides "
                                 "(e.g. sdxl_vae.safetensors), or a checkpoint that includes its VAE")


def find_vae(store: TensorStore) -> TensorStore:
    """The VAE part of `store` (a checkpoint, a VAE file, or a view of either) with keys `decoder.*`.

    Refuses, naming the file: a checkpoint without a VAE, a diffusers-format VAE, a VAE with
    only an encoder, anything else without `decoder.conv_in.weight`.
    """
    path = store.path or "(in memory)"
    _refuse_diffusers(store, path)
    for view in (store, store.sub(CHECKPOINT_VAE_PREFIX)):
        if "decoder.conv_in.weight" in view:
            return view
    if store.has_prefix("model.diffusion_model.") or store.has_prefix("conditioner.") or store.has_prefix("cond_stage_model."):
        raise ModelFileError(path, "this checkpoint has no VAE (no first_stage_model.decoder.* weights)",
                             "Choose a separate VAE file (models/VAE) to decode its images")
    if store.has_prefix("encoder.") or store.has_prefix(CHECKPOINT_VAE_PREFIX + "encoder."):
        raise ModelFileError(path, "this VAE file holds only the encoder (no decoder.* weights)", _VAE_FIX)
    if store.prefix and len(store) == 0:
        raise ModelFileError(path, f"holds no weights under '{store.prefix}' (a checkpoint without a VAE?)", _VAE_FIX)
    raise ModelFileError(path, "no VAE decoder found (no decoder.conv_in.weight)", _VAE_FIX)


def open_vae(path) -> TensorStore:
    """A standalone VAE file (keys `decoder.*`, `post_quant_conv.*`, possibly under `first_stage_model.`)
    as a store for `load_vae_decoder`. A whole checkpoint also works (its VAE is used)."""
    return find_vae(open_store(path))


def _decoder_view(store: TensorStore) -> TensorStore:
    """Only the tensors the decoder uses, with Linear-shaped attention matrices read as 1x1 convs."""
    pre = store.prefix
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, torch.dtype] = {}
    for key in store.keys():
        if not key.startswith(_NEEDED):
            continue      # encoder.*, quant_conv.*, loss.*, model_ema.*
        shape = tuple(store.shape(key))
        if key in _ATTN_MATRICES and 2 <= len(shape) <= 4 and all(d == 1 for d in shape[2:]):
            shape = (shape[0], shape[1], 1, 1)
        shapes[pre + key] = shape
        dtypes[pre + key] = store.dtype(key)

    def read(full: str) -> torch.Tensor:
        return store.tensor(full[len(pre):]).reshape(shapes[full])

    return TensorStore(store.path, shapes, dtypes, read, prefix=pre, metadata=store.metadata)


def load_vae_decoder(store: TensorStore, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> VaeDecoder:
    """Build the decoder of the VAE in `store` (checkpoint, VAE file, or `ckpt.sub("first_stage_model.")`).

    `dtype`: float32 (default), bfloat16, or float16 (falls back to float32 when it overflows).
    """
    if dtype not in DTYPES:
        raise SettingError("VAE precision", f"{dtype} is not supported", "Use float32, bfloat16 or float16")
    store = _decoder_view(find_vae(store))
    config = vae_config_from_store(store)
    if config.embed_dim != LATENT_CHANNELS:
        raise ModelFileError(store.path or "(in memory)",
                             f"this VAE decodes {config.embed_dim}-channel latents (an SD3/Flux-style VAE?); "
                             f"SD1.x, SD2.x and SDXL latents have {LATENT_CHANNELS}",
                             "Choose an SD1.x/SD2.x or SDXL VAE")
    return load_strict(lambda: VaeDecoder(config), store, what="VAE decoder", device=device, dtype=dtype)


def to_uint8_images(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> numpy uint8 [B, H, W, 3], exactly as A1111 1.10 (`processing.py`):

    x = clamp((x.float() + 1) / 2, 0, 1); uint8(255. * x) in float32, truncating (not rounding).
    NaN (which A1111 would have refused earlier) becomes 0.
    """
    x = torch.clamp((images.float() + 1.0) / 2.0, min=0.0, max=1.0)
    x = torch.nan_to_num(x, nan=0.0)
    # float32 times 255 truncated toward zero: the same as numpy's 255. * x then astype(uint8)
    return (x * 255.0).to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()
