"""The LDM UNet of SD1.x, SD2.x and SDXL, named like the single-file checkpoints.

Every submodule has the name its weights carry under `model.diffusion_model.` in an
A1111/ldm/sgm checkpoint (`input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight`),
so a state dict loads without any key conversion. The layout comes from a `UNetConfig`
that `unet_config_from_store` derives from tensor shapes.

Numerics (the choices that differ from a literal reading of ldm):
- GroupNorm and LayerNorm run in the compute dtype. ldm's GroupNorm32 upcasts the whole
  activation to float32 and back; PyTorch's half-precision norm kernels already keep
  mean/variance in float32, so the upcast only costs a float32 copy of every activation
  (diffusers and ComfyUI make the same choice).
- Attention is SDPA (see `attention.py`), whose fused kernels keep the softmax in float32.
- The sinusoidal timestep embedding is computed in float32, then cast (as ldm does).
- Elementwise residual adds are done in place into fresh intermediates only, never into
  a tensor the caller or a skip connection still holds.
- Upsampling interpolates to the size of the matching skip, so latents whose sides are
  not multiples of 2^(levels-1) work (ldm would fail on the concat; diffusers and
  ComfyUI do the same).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelFileError
from .attention import attention
from .checkpoint import TensorStore
from .loading import load_strict
from .unet_config import UNetConfig

GROUPS = 32             # ldm `normalization()`: GroupNorm(32, ch), eps 1e-5
TRANSFORMER_NORM_EPS = 1e-6  # ldm `Normalize()` in SpatialTransformer
FF_MULT = 4             # FeedForward inner width = 4 x dim (GEGLU)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [N] -> [N, dim] in float32, cos half first (ldm/sgm order).

    freq_i = exp(-ln(max_period) * i / (dim/2)); timesteps may be fractional.
    SDXL's size/crop conditioning uses the same embedding with dim 256.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


@dataclass(frozen=True)
class ControlResiduals:
    """What a ControlNet adds to one UNet forward: `residuals[i]` to the output of input block i
    (its skip connection), the last to the middle block's output; only rows `rows` of the batch."""

    rows: slice
    residuals: Sequence[torch.Tensor]


# ---------------------------------------------------------------------------- layers

def _group_norm(channels: int, eps: float = 1e-5, *, dtype=None, device=None) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPS, channels, eps=eps, dtype=dtype, device=device)


class ResBlock(nn.Module):
    """h = conv(silu(norm(x))) + emb; h = conv(silu(norm(h))); return skip(x) + h."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, *, dtype=None, device=None) -> None:
        super().__init__()
        f = dict(dtype=dtype, device=device)
        self.in_layers = nn.Sequential(
            _group_norm(channels, **f), nn.SiLU(inplace=True),
            nn.Conv2d(channels, out_channels, 3, padding=1, **f))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels, **f))
        self.out_layers = nn.Sequential(
            _group_norm(out_channels, **f), nn.SiLU(inplace=True),
            nn.Identity(),  # dropout in training; keeps the conv at index 3 like ldm
            nn.Conv2d(out_channels, out_channels, 3, padding=1, **f))
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv2d(channels, out_channels, 1, **f))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h += self.emb_layers(emb)[:, :, None, None]  # h is fresh: in place is safe
        h = self.out_layers(h)
        return h.add_(self.skip_connection(x))        # never writes into x (a skip)


class Downsample(nn.Module):
    def __init__(self, channels: int, *, dtype=None, device=None) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int, *, dtype=None, device=None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


class CrossAttention(nn.Module):
    """Self-attention when `context` is None, else attention to `context` tokens."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int, *, dtype=None, device=None) -> None:
        super().__init__()
        f = dict(dtype=dtype, device=device)
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False, **f)
        self.to_k = nn.Linear(context_dim, inner, bias=False, **f)
        self.to_v = nn.Linear(context_dim, inner, bias=False, **f)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim, **f))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        ctx = x if context is None else context
        out = attention(self.to_q(x), self.to_k(ctx), self.to_v(ctx), self.heads)
        return self.to_out[0](out)


class GEGLU(nn.Module):
    """a, gate = proj(x) split in two; a * gelu(gate) (exact gelu, as ldm)."""

    def __init__(self, dim: int, inner: int, *, dtype=None, device=None) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return F.gelu(gate).mul_(a)  # one [.., inner] buffer instead of two


class FeedForward(nn.Module):
    def __init__(self, dim: int, *, dtype=None, device=None) -> None:
        super().__init__()
        inner = dim * FF_MULT
        self.net = nn.Sequential(
            GEGLU(dim, inner, dtype=dtype, device=device),
            nn.Identity(),  # dropout slot: the output Linear is net.2 in checkpoints
            nn.Linear(inner, dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    """x += attn1(norm1(x)); x += attn2(norm2(x), context); x += ff(norm3(x))."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, *, dtype=None, device=None) -> None:
        super().__init__()
        f = dict(dtype=dtype, device=device)
        self.attn1 = CrossAttention(dim, dim, heads, dim_head, **f)
        self.ff = FeedForward(dim, **f)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, **f)
        self.norm1 = nn.LayerNorm(dim, **f)
        self.norm2 = nn.LayerNorm(dim, **f)
        self.norm3 = nn.LayerNorm(dim, **f)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        # Each branch output is fresh, so adding x into it in place frees a buffer early.
        x = self.attn1(self.norm1(x)).add_(x)
        x = self.attn2(self.norm2(x), context).add_(x)
        return self.ff(self.norm3(x)).add_(x)


class SpatialTransformer(nn.Module):
    """[B, C, H, W] -> tokens [B, H*W, inner] -> transformer blocks -> back, plus x.

    SD1 projects with 1x1 convs before flattening; SD2/SDXL with Linear layers after.
    """

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int,
                 use_linear: bool, *, dtype=None, device=None) -> None:
        super().__init__()
        f = dict(dtype=dtype, device=device)
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = _group_norm(channels, eps=TRANSFORMER_NORM_EPS, **f)
        if use_linear:
            self.proj_in = nn.Linear(channels, inner, **f)
            self.proj_out = nn.Linear(inner, channels, **f)
        else:
            self.proj_in = nn.Conv2d(channels, inner, 1, **f)
            self.proj_out = nn.Conv2d(inner, channels, 1, **f)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, **f) for _ in range(depth))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        b, _, h, w = x.shape
        t = self.norm(x)
        if not self.use_linear:
            t = self.proj_in(t)
        t = t.permute(0, 2, 3, 1).reshape(b, h * w, -1)
        if self.use_linear:
            t = self.proj_in(t)
        for block in self.transformer_blocks:
            t = block(t, context)
        if self.use_linear:
            t = self.proj_out(t)
        t = t.reshape(b, h, w, -1).permute(0, 3, 1, 2)
        if not self.use_linear:
            t = self.proj_out(t.contiguous())  # keep convs in NCHW, like the rest of the net
        # x first: the sum takes x's (contiguous NCHW) layout, with no separate copy of t.
        return torch.add(x, t)


class UNetBlock(nn.ModuleList):
    """One `input_blocks.N` / `middle_block` / `output_blocks.N`: layers applied in order,
    each given what it needs (ldm's TimestepEmbedSequential)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None,
                size: tuple[int, int] | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


# ---------------------------------------------------------------------------- config checks

def _transformer_channels(c: UNetConfig, encoder_only: bool = False) -> list[int]:
    """Channel count of every transformer in the net (input, middle, and unless `encoder_only`, output)."""
    chans: list[int] = []
    levels = list(zip(c.channel_mult, c.num_res_blocks))
    depths_in = iter(c.transformer_depth)
    for mult, n in levels:
        chans += [c.model_channels * mult for _ in range(n) if next(depths_in)]
    if c.transformer_depth_middle:
        chans.append(c.model_channels * c.channel_mult[-1])
    if encoder_only:
        return chans
    depths_out = iter(c.transformer_depth_output)
    for mult, n in reversed(levels):
        chans += [c.model_channels * mult for _ in range(n + 1) if next(depths_out)]
    return chans


def check_unet_config(c: UNetConfig, *, encoder_only: bool = False) -> None:
    """Raise ValueError naming the field when `c` cannot describe a UNet (with `encoder_only`:
    its input and middle blocks, as a ControlNet has them; the output side is not looked at)."""
    levels = len(c.channel_mult)
    if c.in_channels < 1 or (c.out_channels < 1 and not encoder_only) or c.model_channels < 1:
        raise ValueError(f"in_channels {c.in_channels}, out_channels {c.out_channels} and "
                         f"model_channels {c.model_channels} must be positive")
    if levels == 0 or min(c.channel_mult) < 1:
        raise ValueError(f"channel_mult {c.channel_mult} needs at least one level, all multipliers >= 1")
    if len(c.num_res_blocks) != levels or min(c.num_res_blocks) < 1:
        raise ValueError(f"num_res_blocks {c.num_res_blocks} needs one count >= 1 per level of channel_mult {c.channel_mult}")
    n_in = sum(c.num_res_blocks)
    if len(c.transformer_depth) != n_in:
        raise ValueError(f"transformer_depth has {len(c.transformer_depth)} entries, expected one per input res block ({n_in})")
    if not encoder_only and len(c.transformer_depth_output) != n_in + levels:
        raise ValueError(f"transformer_depth_output has {len(c.transformer_depth_output)} entries, "
                         f"expected one per output res block ({n_in + levels})")
    if min(*c.transformer_depth, *c.transformer_depth_output, c.transformer_depth_middle) < 0:
        raise ValueError("transformer depths must be >= 0")
    for ch in sorted({c.model_channels * m for m in c.channel_mult}):
        if ch % GROUPS:
            raise ValueError(f"{ch} channels cannot be split into {GROUPS} GroupNorm groups "
                             f"(model_channels {c.model_channels} x channel_mult {c.channel_mult})")
    if c.adm_in_channels is not None and c.adm_in_channels < 1:
        raise ValueError(f"adm_in_channels {c.adm_in_channels} must be positive or None")
    chans = _transformer_channels(c, encoder_only)
    if not chans:
        return
    if c.context_dim < 1:
        raise ValueError(f"context_dim {c.context_dim} must be positive when the UNet has transformers")
    if (c.num_heads or 0) < 0 or (c.num_head_channels or 0) < 0:
        raise ValueError(f"num_heads {c.num_heads} / num_head_channels {c.num_head_channels} must be positive")
    if c.num_head_channels:
        bad = [ch for ch in chans if ch % c.num_head_channels]
        what = f"num_head_channels {c.num_head_channels}"
    elif c.num_heads:
        bad = [ch for ch in chans if ch % c.num_heads]
        what = f"num_heads {c.num_heads}"
    else:
        raise ValueError("set num_heads or num_head_channels: the UNet has attention layers")
    if bad:
        raise ValueError(f"transformer width {bad[0]} is not divisible by {what}")


# ---------------------------------------------------------------------------- building the encoder side
# Shared by UNetModel and the ControlNet (controlnet.py), which copies the UNet's encoder.

def make_time_embed(c: UNetConfig, *, dtype=None, device=None) -> nn.Sequential:
    """`time_embed`: Linear(model_channels -> 4x), SiLU, Linear."""
    f = dict(dtype=dtype, device=device)
    mc, ted = c.model_channels, c.time_embed_dim
    return nn.Sequential(nn.Linear(mc, ted, **f), nn.SiLU(), nn.Linear(ted, ted, **f))


def make_label_emb(c: UNetConfig, *, dtype=None, device=None) -> nn.Sequential | None:
    """SDXL's `label_emb` (ADM vector -> time embedding width), None for SD1/SD2.

    sgm num_classes="sequential": a Sequential inside a Sequential (keys `label_emb.0.0`, `label_emb.0.2`).
    """
    if c.adm_in_channels is None:
        return None
    f = dict(dtype=dtype, device=device)
    ted = c.time_embed_dim
    return nn.Sequential(nn.Sequential(nn.Linear(c.adm_in_channels, ted, **f), nn.SiLU(), nn.Linear(ted, ted, **f)))


def _make_transformer(c: UNetConfig, ch: int, depth: int, f: dict) -> SpatialTransformer:
    heads, dim_head = c.heads_for(ch)
    return SpatialTransformer(ch, heads, dim_head, depth, c.context_dim, c.use_linear_in_transformer, **f)


def make_input_blocks(c: UNetConfig, *, dtype=None, device=None) -> tuple[nn.ModuleList, list[int]]:
    """`input_blocks` and the channel count of each block's output (its skip).

    conv_in, then per level `num_res_blocks` x [ResBlock (+ transformer)], and a Downsample
    between levels.
    """
    f = dict(dtype=dtype, device=device)
    mc, ted = c.model_channels, c.time_embed_dim
    blocks = [UNetBlock([nn.Conv2d(c.in_channels, mc, 3, padding=1, **f)])]
    chans = [mc]
    ch = mc
    depths = iter(c.transformer_depth)
    last = len(c.channel_mult) - 1
    for level, (mult, n) in enumerate(zip(c.channel_mult, c.num_res_blocks)):
        for _ in range(n):
            layers: list[nn.Module] = [ResBlock(ch, ted, mc * mult, **f)]
            ch = mc * mult
            if depth := next(depths):
                layers.append(_make_transformer(c, ch, depth, f))
            blocks.append(UNetBlock(layers))
            chans.append(ch)
        if level != last:
            blocks.append(UNetBlock([Downsample(ch, **f)]))
            chans.append(ch)
    return nn.ModuleList(blocks), chans


def make_middle_block(c: UNetConfig, *, dtype=None, device=None) -> UNetBlock:
    """ResBlock, transformer, ResBlock at the deepest level's width.

    sgm's disable_middle_transformer keeps index 2 for the second ResBlock (Identity at 1).
    """
    f = dict(dtype=dtype, device=device)
    ch, ted = c.model_channels * c.channel_mult[-1], c.time_embed_dim
    middle = _make_transformer(c, ch, c.transformer_depth_middle, f) if c.transformer_depth_middle else nn.Identity()
    return UNetBlock([ResBlock(ch, ted, ch, **f), middle, ResBlock(ch, ted, ch, **f)])


# ---------------------------------------------------------------------------- the model

class UNetModel(nn.Module):
    """ldm/sgm `UNetModel` for SD1.x, SD2.x and SDXL, inference only.

    forward(x [B, in, H, W], timesteps [B] float, context [B, T, context_dim], y [B, adm])
    -> [B, out, H, W] in x's dtype; computation runs in the weights' dtype.
    """

    def __init__(self, config: UNetConfig, *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        check_unet_config(config)
        self.config = config
        self.needs_context = bool(_transformer_channels(config))
        c = config
        f = dict(dtype=dtype, device=device)
        mc, ted = c.model_channels, c.time_embed_dim

        self.time_embed = make_time_embed(c, **f)
        self.label_emb = make_label_emb(c, **f)
        # Input side: every block's output is a skip.
        self.input_blocks, skip_chans = make_input_blocks(c, **f)
        self.middle_block = make_middle_block(c, **f)
        ch = skip_chans[-1]

        # Output side: levels in reverse, `num_res_blocks + 1` blocks each, every one
        # eating one skip; the last block of each level but level 0 upsamples.
        blocks = []
        depths = iter(c.transformer_depth_output)
        for level, (mult, n) in reversed(list(enumerate(zip(c.channel_mult, c.num_res_blocks)))):
            for i in range(n + 1):
                layers = [ResBlock(ch + skip_chans.pop(), ted, mc * mult, **f)]
                ch = mc * mult
                if depth := next(depths):
                    layers.append(_make_transformer(c, ch, depth, f))
                if level and i == n:
                    layers.append(Upsample(ch, **f))
                blocks.append(UNetBlock(layers))
        self.output_blocks = nn.ModuleList(blocks)

        self.out = nn.Sequential(_group_norm(ch, **f), nn.SiLU(inplace=True),
                                 nn.Conv2d(ch, c.out_channels, 3, padding=1, **f))

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: the output norm's (Linear/Conv2d weights may be stored in fp8, fp8.py)."""
        return self.out[0].weight.dtype

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                y: torch.Tensor | None = None, control: Callable[..., ControlResiduals | None] | None = None
                ) -> torch.Tensor:
        """`control(x, timesteps, context, y)`: a ControlNet's residuals for some rows of the batch
        (controlnet.py), added to the skip connections and the middle block's output as ldm's
        ControlledUnetModel adds them; None leaves the net as it is."""
        if (y is None) != (self.label_emb is None):
            raise ValueError("y (SDXL pooled + size conditioning) must be given exactly when the UNet has label_emb "
                             f"(adm_in_channels={self.config.adm_in_channels})")
        if context is None and self.needs_context:
            raise ValueError("context (text encoder hidden states) is required: the UNet has cross-attention")
        dtype = self.dtype
        t = timesteps.reshape(-1).expand(x.shape[0])  # a single timestep applies to the whole batch
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(dtype))
        if self.label_emb is not None:
            emb = emb + self.label_emb(y.to(dtype))
        if context is not None:
            context = context.to(dtype)

        extra = control(x, timesteps, context, y) if control is not None else None
        h = x.to(dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        if extra is not None:
            # Every block output is a fresh tensor that only the skip list still holds, so the
            # residuals go in place into the controlled rows (the other rows stay bit for bit).
            if len(extra.residuals) != len(skips) + 1:
                raise ValueError(f"the ControlNet gives {len(extra.residuals)} residuals; this UNet takes "
                                 f"{len(skips) + 1} ({len(skips)} skips and the middle block)")
            for skip, residual in zip(skips, extra.residuals):
                skip[extra.rows].add_(residual)       # a view: no write-back copy
            h[extra.rows].add_(extra.residuals[-1])
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            # Upsample to the next skip's size (odd latent sides round down on the way in).
            h = block(h, emb, context, tuple(skips[-1].shape[-2:]) if skips else None)
        return self.out(h).to(x.dtype)


def load_unet(store: TensorStore, config: UNetConfig, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> UNetModel:
    """Build the UNet of `config` and fill it from `store` (keys without `model.diffusion_model.`)."""
    try:
        check_unet_config(config)
    except ValueError as e:
        raise ModelFileError(store.path or "(in memory)", f"unsupported UNet layout: {e}",
                             "Use a single-file SD1.x, SD2.x or SDXL checkpoint") from None
    return load_strict(lambda: UNetModel(config), store, what="UNet", device=device, dtype=dtype)
