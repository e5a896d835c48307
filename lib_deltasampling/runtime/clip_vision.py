"""CLIP vision encoders (image towers) in the HF `CLIPVisionModelWithProjection` layout.

This is the format of the `models/clip_vision/*.safetensors` files ComfyUI and the WebUIs use
for IP-Adapter (ViT-H/14 for the SD1.5 and `*_vit-h` SDXL adapters, ViT-bigG/14 for the
original SDXL ones), of `image_encoder/model.safetensors` in h94/IP-Adapter, and (as a pickle,
read weights-only) of its `pytorch_model.bin`, which sd-webui-controlnet keeps as
`annotator/downloads/clip_vision/clip_h.pth`:

    vision_model.embeddings.patch_embedding.weight      [width, 3, patch, patch]   (no bias)
    vision_model.embeddings.class_embedding             [width]
    vision_model.embeddings.position_embedding.weight   [(image/patch)^2 + 1, width]
    vision_model.embeddings.position_ids                [1, positions] (older files; unused)
    vision_model.pre_layrnorm.{weight,bias}             (HF's spelling)
    vision_model.encoder.layers.N.self_attn.{q,k,v,out}_proj.{weight,bias}
    vision_model.encoder.layers.N.layer_norm{1,2}.{weight,bias}
    vision_model.encoder.layers.N.mlp.fc1 [mlp, width] / fc2 [width, mlp]
    vision_model.post_layernorm.{weight,bias}
    visual_projection.weight                            [projection, width]        (no bias)

A whole HF `CLIPModel` file (both towers) is accepted too: its `text_model.*`,
`text_projection.weight` and `logit_scale` are ignored. open_clip's own layout (`visual.conv1`,
`visual.transformer.resblocks.N...`) is refused with what to use instead.

The config comes from shapes, except two things the file does not say (the HF config.json is
not in it):
- heads: 12 for width 768 (ViT-B), 16 for 1024 (ViT-L), 1280 (ViT-H), 1408 (ViT-g) and
  1664 (ViT-bigG); other widths width // 64. `heads=` overrides.
- activation: OpenAI's own CLIP models were trained with quick_gelu, open_clip's (LAION) with
  exact gelu. The OpenAI vision towers are ViT-B/32, ViT-B/16 (width 768) and ViT-L/14
  (width 1024, patch 14, 224 or 336 pixels), so those shapes mean quick_gelu and all others
  gelu. A LAION ViT-L/14 has the same shapes as OpenAI's and needs `act="gelu"`.

The forward is HF's: patches + class token + position embedding, `pre_layrnorm`, the pre-norm
encoder (the text encoder's layers, non-causal), then `image_embeds = visual_projection(
post_layernorm(class token))`. `encode` also returns the hidden states after the
second-to-last layer (HF `hidden_states[-2]`, no norm), which IP-Adapter-plus resamples.

`preprocess` is CLIPImageProcessor's: shortest side resized to the model's image size
(bicubic), centre crop, CLIP mean/std normalisation.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelFileError
from .checkpoint import TensorStore, open_store
from .detect import LORA_KEY_PATTERN, UNET_PREFIX
from .loading import load_strict
from .placement import LoadedPart
from .text.clip import HFEncoder

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_PREFIX = "vision_model."
_HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 16, 1408: 16, 1664: 16}
_NAMES_BY_WIDTH = {768: "ViT-B", 1024: "ViT-L", 1280: "ViT-H", 1408: "ViT-g", 1664: "ViT-bigG"}
# Keys of a whole CLIPModel that are not the vision tower, and the unused position_ids buffer.
_IGNORED = ("text_projection.weight", "logit_scale", _PREFIX + "embeddings.position_ids")

_HINT = ("Choose a CLIP vision model in the HF layout (e.g. ComfyUI's models/clip_vision/"
         "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors or h94/IP-Adapter's image_encoder/model.safetensors)")

Act = Literal["gelu", "quick_gelu"]


@dataclass(frozen=True)
class ClipVisionConfig:
    width: int
    layers: int
    heads: int
    mlp_width: int
    patch: int
    image_size: int
    projection_dim: int
    act: str              # "gelu" | "quick_gelu"

    @property
    def grid(self) -> int:
        return self.image_size // self.patch

    @property
    def tokens(self) -> int:
        """Class token + one per patch."""
        return self.grid ** 2 + 1

    @property
    def name(self) -> str:
        known = _NAMES_BY_WIDTH.get(self.width)
        return f"{known}/{self.patch}" if known else f"ViT/{self.patch} of width {self.width}"


def _refuse_other_kinds(store: TensorStore, path: Path | str) -> None:
    """Name what a file is when it is a common model that is not a CLIP vision tower."""
    def has(*prefixes: str) -> bool:
        return any(store.has_prefix(p) for p in prefixes)

    if has("image_proj.", "ip_adapter."):
        raise ModelFileError(path, "this is an IP-Adapter, not a CLIP vision model", _HINT)
    if any(re.search(LORA_KEY_PATTERN, k) for k in store.keys()):
        raise ModelFileError(path, "this is a LoRA/LyCORIS adapter, not a CLIP vision model", _HINT)
    if has(UNET_PREFIX, "control_model.", "input_blocks.", "down_blocks.", "controlnet_"):
        raise ModelFileError(path, "this is a Stable Diffusion checkpoint, UNet or ControlNet, not a CLIP vision "
                             "model", _HINT)
    if has("visual.conv1.", "visual.transformer.") or "visual.proj" in store:
        raise ModelFileError(path, "this is an open_clip-layout CLIP model (visual.transformer.resblocks...), "
                             "which is not supported", _HINT)
    if has("text_model.", "cond_stage_model.", "conditioner.", "transformer.resblocks.", "token_embedding."):
        raise ModelFileError(path, "this is a CLIP text encoder (no vision_model.* weights), not a CLIP vision model",
                             _HINT)
    if has("encoder.", "decoder.", "first_stage_model."):
        raise ModelFileError(path, "this is a VAE, not a CLIP vision model", _HINT)


def _count_layers(store: TensorStore) -> int:
    n = 0
    while f"{_PREFIX}encoder.layers.{n}.layer_norm1.weight" in store:
        n += 1
    return n


def clip_vision_config(store: TensorStore, *, heads: int | None = None, act: Act | None = None) -> ClipVisionConfig:
    """The config from the file's shapes (see the module docstring for heads and activation)."""
    path = store.path or "(in memory)"
    # Other kinds are judged only without vision keys: a whole CLIPModel also holds a text tower.
    if not store.has_prefix(_PREFIX + "embeddings."):
        _refuse_other_kinds(store, path)
        raise ModelFileError(path, "no CLIP vision weights found (no vision_model.embeddings.* keys)", _HINT)
    needed = [_PREFIX + "embeddings.patch_embedding.weight", _PREFIX + "embeddings.position_embedding.weight",
              _PREFIX + "encoder.layers.0.mlp.fc1.weight"]
    if missing := [k for k in needed if k not in store]:
        raise ModelFileError(path, f"incomplete CLIP vision model ({missing[0]} missing)",
                             "The file is damaged or incomplete; download it again")
    if "visual_projection.weight" not in store:
        raise ModelFileError(path, "CLIP vision model without visual_projection (a CLIPVisionModel, not "
                             "CLIPVisionModelWithProjection): it gives no image embeddings", _HINT)
    conv = store.shape(_PREFIX + "embeddings.patch_embedding.weight")
    width, channels, patch, patch_w = conv if len(conv) == 4 else (0, 0, 0, -1)
    positions = store.shape(_PREFIX + "embeddings.position_embedding.weight")[0]
    grid = math.isqrt(max(positions - 1, 0))
    if channels != 3 or patch != patch_w or grid * grid + 1 != positions or grid == 0:
        raise ModelFileError(path, f"CLIP vision embeddings of unexpected shape (patch conv {channels}->{width}, "
                             f"{patch}x{patch_w}; {positions} positions, not a square grid + class token)",
                             "The file is damaged or not a CLIP ViT")
    layers = _count_layers(store)
    if layers < 2:  # encode returns the penultimate layer's output
        raise ModelFileError(path, f"CLIP vision model with {layers} encoder layers",
                             "The file is damaged or incomplete")
    heads = heads or _HEADS_BY_WIDTH.get(width) or max(width // 64, 1)
    if width % heads:
        raise ModelFileError(path, f"CLIP vision width {width} does not split into {heads} heads",
                             "Give a head count that divides the width")
    image_size = grid * patch
    if act is None:
        openai = (width == 768 and patch in (16, 32)) or (width == 1024 and patch == 14)
        act = "quick_gelu" if openai else "gelu"
    if act not in ("gelu", "quick_gelu"):
        raise ValueError(f"act must be 'gelu' or 'quick_gelu', got {act!r}")
    return ClipVisionConfig(width=width, layers=layers, heads=heads,
                            mlp_width=store.shape(_PREFIX + "encoder.layers.0.mlp.fc1.weight")[0], patch=patch,
                            image_size=image_size, projection_dim=store.shape("visual_projection.weight")[0], act=act)


# ---------------------------------------------------------------------------- the model

class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: ClipVisionConfig) -> None:
        super().__init__()
        self.patch = cfg.patch
        self.class_embedding = nn.Parameter(torch.empty(cfg.width))
        self.patch_embedding = nn.Conv2d(3, cfg.width, cfg.patch, stride=cfg.patch, bias=False)
        self.position_embedding = nn.Embedding(cfg.tokens, cfg.width)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)     # [N, grid^2, width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ClipVisionConfig) -> None:
        super().__init__()
        self.embeddings = VisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.width)
        self.encoder = HFEncoder(cfg, causal=False)
        self.post_layernorm = nn.LayerNorm(cfg.width)


class ClipVision(nn.Module):
    """HF `CLIPVisionModelWithProjection`, inference only; module names are the file's keys."""

    def __init__(self, cfg: ClipVisionConfig) -> None:
        super().__init__()
        self.config = cfg
        self.vision_model = VisionTransformer(cfg)
        self.visual_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.visual_projection.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.visual_projection.weight.device

    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pixels [N, 3, S, S], already `preprocess`ed -> (image_embeds [N, projection_dim],
        penultimate [N, tokens, width]: HF `hidden_states[-2]`), in the model's dtype."""
        s = self.config.image_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, s, s):
            raise ValueError(f"pixels must be [N, 3, {s}, {s}] (use preprocess), got {list(pixels.shape)}")
        vm = self.vision_model
        x = vm.pre_layrnorm(vm.embeddings(pixels.to(self.device, self.dtype)))
        layers = vm.encoder.layers
        for layer in layers[:-1]:
            x = layer(x)
        penultimate = x
        x = layers[-1](x)
        embeds = self.visual_projection(vm.post_layernorm(x[:, 0]))
        return embeds, penultimate

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode(pixels)


def preprocess(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """CLIPImageProcessor on a batch: images [N, 3, H, W] with values 0..1 -> [N, 3, size, size]
    float32, normalised with the CLIP mean and std.

    The shortest side goes to `size` (the long one to int(size * long / short), as transformers
    computes it) with torch's antialiased bicubic, which is PIL's bicubic filter (a = -0.5), the
    processor's. Like PIL on 8-bit images it resizes the width, clamps to 0..1, then the height and
    clamps again (the clamp between the passes matters where the cubic overshoots). Then the
    centre `size` x `size` crop (offsets rounded down). What remains different: PIL rounds to 8
    bits after each pass (within ~1/255 before normalising).
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [N, 3, H, W], got {list(images.shape)}")
    x = images.float()
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        short, long = min(h, w), max(h, w)
        new_long = int(size * long / short)
        target = (new_long, size) if h > w else (size, new_long)
        for hw in ((h, target[1]), target):  # width pass, then height pass, as PIL
            if hw != tuple(x.shape[-2:]):
                x = F.interpolate(x, size=hw, mode="bicubic", align_corners=False, antialias=True).clamp_(0, 1)
        top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
        x = x[..., top:top + size, left:left + size]
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


# ---------------------------------------------------------------------------- detection and loading

@dataclass(frozen=True)
class ClipVisionInfo:
    path: Path | None
    config: ClipVisionConfig

    @property
    def description(self) -> str:
        c = self.config
        return (f"CLIP vision {c.name} ({c.layers} layers, {c.image_size}px, projection {c.projection_dim}, "
                f"{c.act})")


def detect_clip_vision(store: TensorStore, *, heads: int | None = None, act: Act | None = None) -> ClipVisionInfo:
    """What CLIP vision model a file holds, from keys and shapes only; a file that is not one
    raises ModelFileError saying what it is. `heads`, `act`: see the module docstring."""
    return ClipVisionInfo(store.path, clip_vision_config(store, heads=heads, act=act))


@dataclass
class LoadedClipVision(LoadedPart):
    info: ClipVisionInfo
    model: ClipVision
    released: bool = field(default=False, init=False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """`preprocess` at this model's image size, on its device (float32)."""
        return preprocess(images.to(self.model.device), self.info.config.image_size)

    def encode_images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [N, 3, H, W] in 0..1 -> `ClipVision.encode` of their preprocessed pixels."""
        return self.model.encode(self.preprocess(images))


def load_clip_vision(source: str | Path | TensorStore, *, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32, heads: int | None = None,
                     act: Act | None = None) -> LoadedClipVision:
    """Load a CLIP vision model strictly (every vision weight used and filled), cast to `dtype`
    on `device`. `heads`, `act`: override what the shapes imply (module docstring)."""
    store = source if isinstance(source, TensorStore) else open_store(source)
    info = detect_clip_vision(store, heads=heads, act=act)

    def ignored(key: str) -> bool:
        return key in _IGNORED or key.startswith("text_model.")

    model = load_strict(lambda: ClipVision(info.config), store, what="CLIP vision", device=device, dtype=dtype,
                        ignore=ignored)
    return LoadedClipVision(info, model)
