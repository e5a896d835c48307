"""The miniature models: small SD1-layout and SDXL-layout checkpoints in the real single-file key
layouts, built from the runtime's own modules so they load through the same path as real ones.

    sd1    SD1 layout: CLIP-L-layout text encoder (width 64), UNet 64 ch x (1, 2), conv proj_in, 8 heads
    sd1b   a second SD1-layout model (text width 128, UNet 32 ch x (1, 2, 4), other seeds), same VAE as sd1:
           the same-latent pair, as SD1.5 -> SD2.1 share theirs
    sdxl   SDXL layout: CLIP-L + OpenCLIP-bigG-layout encoders (64 + 128, pooled projection 64),
           UNet 64 ch x (1, 2, 2), linear proj_in, 64-channel heads, label_emb over pooled + size
           embeddings, attention on every level (real SDXL has none on its first level, at 128 x 128
           latents; a first try without it, at 8 x 8, drew blurred layouts); its own VAE (another width, trained apart), so
           the latent spaces differ as SD1's and SDXL's do, with each family's latent scale factor.

All images are 64 px (8 x 8 latents): the VAE downscales by 8 as every SD VAE does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime.text.clip import ClipTextConfig, build_clip_text
from ..runtime.unet import UNetModel
from ..runtime.unet_config import UNetConfig
from ..runtime.vae import AttnBlock, ResnetBlock, VaeConfig, VaeDecoder, _conv, _norm

IMAGE_SIZE = 64
VOCAB = 49408
SCALE = {"sd1": 0.18215, "sdxl": 0.13025}   # the families' latent scale factors (runtime.detect)


@dataclass(frozen=True)
class MiniSpec:
    name: str
    family: str                          # "sd1" | "sdxl"
    unet: UNetConfig
    text: tuple[tuple[str, ClipTextConfig], ...]   # (checkpoint prefix, config) per encoder
    vae: VaeConfig
    vae_name: str                        # models with the same vae_name share one VAE
    seed: int


def _clip(layout: str, width: int, layers: int, projection: int | None = None) -> ClipTextConfig:
    return ClipTextConfig(layout=layout, width=width, layers=layers, heads=width // 64, mlp_width=4 * width,
                          vocab=VOCAB, context=77, projection_dim=projection,
                          act="quick_gelu" if layout == "hf" else "gelu")


def _sd1_unet(mc: int, context: int, mult: tuple[int, ...] = (1, 2)) -> UNetConfig:
    n = len(mult)
    return UNetConfig(in_channels=4, out_channels=4, model_channels=mc, channel_mult=mult, num_res_blocks=(1,) * n,
                      transformer_depth=(1,) * n, transformer_depth_output=(1,) * (2 * n), transformer_depth_middle=1,
                      context_dim=context, num_heads=8)


SD1_VAE = VaeConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, z_channels=4, embed_dim=4, out_ch=3)
SDXL_VAE = VaeConfig(ch=32, ch_mult=(1, 1, 2, 4), num_res_blocks=1, z_channels=4, embed_dim=4, out_ch=3)
SDXL_POOLED = 64

SPECS = {
    "sd1": MiniSpec("sd1", "sd1", _sd1_unet(64, 64),
                    (("cond_stage_model.transformer.", _clip("hf", 64, 2)),), SD1_VAE, "vae-sd1", seed=1),
    "sdxl": MiniSpec("sdxl", "sdxl",
                     UNetConfig(in_channels=4, out_channels=4, model_channels=64, channel_mult=(1, 2, 2),
                                num_res_blocks=(1, 1, 1), transformer_depth=(1, 1, 1),
                                transformer_depth_output=(1, 1, 1, 1, 1, 1), transformer_depth_middle=1,
                                context_dim=64 + 128, num_head_channels=64, use_linear_in_transformer=True,
                                adm_in_channels=SDXL_POOLED + 6 * 256),
                     (("conditioner.embedders.0.transformer.", _clip("hf", 64, 2)),
                      ("conditioner.embedders.1.model.", _clip("openclip", 128, 2, SDXL_POOLED))),
                     SDXL_VAE, "vae-sdxl", seed=3),
    "sd1b": MiniSpec("sd1b", "sd1", _sd1_unet(32, 128, (1, 2, 4)),
                     (("cond_stage_model.transformer.", _clip("hf", 128, 2)),), SD1_VAE, "vae-sd1", seed=2),
}


def pixels(images, device=None) -> torch.Tensor:
    """uint8 images [B, H, W, 3] (numpy or torch) -> float [B, 3, H, W] in [-1, 1], the VAE's input range."""
    images = torch.from_numpy(images) if not isinstance(images, torch.Tensor) else images
    return images.to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ---------------------------------------------------------------------------- VAE encoder

class Downsample(nn.Module):
    """ldm's encoder downsampling: pad right/bottom by one, then a stride-2 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Encoder(nn.Module):
    """ldm `Encoder` (no attention in the levels, as SD VAEs): images -> mean and log-variance, 2 z channels each."""

    def __init__(self, config: VaeConfig, in_ch: int = 3) -> None:
        super().__init__()
        chans = config.level_channels
        self.conv_in = _conv(in_ch, chans[0], 3)
        self.down = nn.ModuleList()
        cin = chans[0]
        for level, cout in enumerate(chans):
            down = nn.Module()
            down.block = nn.ModuleList()
            for _ in range(config.num_res_blocks):
                down.block.append(ResnetBlock(cin, cout))
                cin = cout
            if level != len(chans) - 1:
                down.downsample = Downsample(cin)
            self.down.append(down)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(cin, cin)
        self.mid.attn_1 = AttnBlock(cin)
        self.mid.block_2 = ResnetBlock(cin, cin)
        self.norm_out = _norm(cin)
        self.conv_out = _conv(cin, 2 * config.z_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level, down in enumerate(self.down):
            for block in down.block:
                h = block(h)
            if level != len(self.down) - 1:
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """encoder + quant_conv | post_quant_conv + decoder, named as `first_stage_model.*` in checkpoints.
    The decoder half is the runtime's own `VaeDecoder` (what generation uses)."""

    def __init__(self, config: VaeConfig) -> None:
        super().__init__()
        self.encoder = Encoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, 1)
        self.decoding = VaeDecoder(config)

    def moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance of images in [-1, 1]."""
        mean, logvar = self.quant_conv(self.encoder(images)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoding(latents)

    def state_dict_ldm(self) -> dict[str, torch.Tensor]:
        """Keys as in a checkpoint's `first_stage_model.` part."""
        out = {f"encoder.{k}": v for k, v in self.encoder.state_dict().items()}
        out.update({f"quant_conv.{k}": v for k, v in self.quant_conv.state_dict().items()})
        out.update(self.decoding.state_dict())          # post_quant_conv.*, decoder.*
        return out

    def load_ldm(self, tensors: dict[str, torch.Tensor]) -> None:
        self.encoder.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("encoder.")})
        self.quant_conv.load_state_dict({k[11:]: v for k, v in tensors.items() if k.startswith("quant_conv.")})
        self.decoding.load_state_dict({k: v for k, v in tensors.items()
                                       if k.startswith(("decoder.", "post_quant_conv."))})

    @torch.no_grad()
    def rescale_latents(self, factor: float) -> None:
        """Scale the latent space by `factor` without changing what the VAE computes: the mean's rows of
        quant_conv times factor (log-variance + 2 log factor), post_quant_conv's input columns / factor.
        Used once after training so that latent * family scale factor has unit standard deviation."""
        z = self.quant_conv.out_channels // 2
        self.quant_conv.weight[:z] *= factor
        self.quant_conv.bias[:z] *= factor
        self.quant_conv.bias[z:] += 2.0 * float(torch.log(torch.tensor(factor)))
        self.decoding.post_quant_conv.weight /= factor


# ---------------------------------------------------------------------------- whole checkpoints

def build_unet(spec: MiniSpec) -> UNetModel:
    torch.manual_seed(spec.seed)
    unet = UNetModel(spec.unet)
    with torch.no_grad():                     # zero output conv: the usual diffusion init
        unet.out[2].weight.zero_()
        unet.out[2].bias.zero_()
    return unet


def _init_text(key: str, like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A fresh value for one text-encoder tensor (the runtime's modules are built to be loaded, not
    initialised): unit-variance token embeddings so that words differ clearly, small positions,
    fan-in scaled matrices, identity norms, zero biases."""
    if not like.is_floating_point():
        return like.clone()                                   # position_ids
    if key.endswith("token_embedding.weight"):
        return torch.randn(like.shape, generator=gen)
    if "position" in key:
        return 0.1 * torch.randn(like.shape, generator=gen)
    if key.endswith("text_projection"):
        return torch.randn(like.shape, generator=gen) / like.shape[0] ** 0.5
    if like.ndim == 2:
        return torch.randn(like.shape, generator=gen) / like.shape[1] ** 0.5
    if key.endswith("weight") and ("norm" in key or ".ln_" in key or key.startswith("ln_")):
        return torch.ones(like.shape)
    if key.endswith(("final_layer_norm.bias", "ln_final.bias")):
        # A1111's emphasis rescales by the output's mean; a final norm with zero bias makes that mean
        # exactly 0 (0/0). Real CLIP's is far from 0: give these a clear offset.
        return 0.3 + 0.1 * torch.randn(like.shape, generator=gen)
    return torch.zeros(like.shape)                            # biases


def text_tensors(spec: MiniSpec, keep_tokens: set[int] | None = None) -> dict[str, torch.Tensor]:
    """Random (frozen) CLIP-layout text encoders under their checkpoint prefixes. Token-embedding rows
    outside `keep_tokens` are zeroed: words the world never uses carry nothing (and the file compresses)."""
    gen = torch.Generator().manual_seed(1000 + spec.seed)
    out: dict[str, torch.Tensor] = {}
    for prefix, cfg in spec.text:
        for key, like in build_clip_text(cfg).state_dict().items():
            value = _init_text(key, like, gen)
            if key.endswith("token_embedding.weight") and keep_tokens is not None:
                mask = torch.zeros(value.shape[0], dtype=torch.bool)
                mask[sorted(keep_tokens)] = True
                value = value * mask[:, None]
            out[prefix + key] = value
    return out


def checkpoint_tensors(spec: MiniSpec, unet: UNetModel, vae: AutoencoderKL,
                       text: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    out.update(text)
    out.update({f"first_stage_model.{k}": v for k, v in vae.state_dict_ldm().items()})
    return {k: v.detach().to(torch.float16 if v.is_floating_point() else v.dtype).contiguous() for k, v in out.items()}


def write_checkpoint(path: Path, spec: MiniSpec, unet: UNetModel, vae: AutoencoderKL,
                     text: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save

    from ..runtime.atomic import write_atomic
    data = save(checkpoint_tensors(spec, unet, vae, text), metadata={"ds_lab_model": spec.name, **(metadata or {})})
    return write_atomic(path, data, overwrite=True)
