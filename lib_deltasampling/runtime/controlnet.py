"""ControlNet files for SD1.x, SD2.x and SDXL: recognise, load and run them.

A ControlNet (lllyasviel's cldm `ControlNet`) is a trainable copy of the UNet's encoder side
(`time_embed`, SDXL's `label_emb`, `input_blocks`, `middle_block`, all shaped and named like the
UNet's) plus three things of its own:
- `input_hint_block`: eight 3x3 convs with SiLU between (indices 0, 2, ..., 14), taking the
  control image [B, hint_channels, 8H, 8W] (values 0..1) down to the latent size:
  hint -> 16, 16 -> 16, 16 -> 32 /2, 32 -> 32, 32 -> 96 /2, 96 -> 96, 96 -> 256 /2, 256 -> model_channels.
  Its output is added to the output of input block 0 (conv_in) only.
- `zero_convs.N.0`: a 1x1 conv on the output of every input block N, and `middle_block_out.0`
  one on the middle block's: their outputs are the residuals the UNet adds to its skip
  connections and its middle block's output (ldm's ControlledUnetModel).
Most files take an RGB hint (3 channels); inpainting ControlNets take 4.

Files come in two key layouts, both loaded into the one `ControlNet` module:
- LDM (lllyasviel/A1111 releases, .pth and .safetensors): `control_model.<name>`. The old full
  v1.0 files also hold a whole SD checkpoint (`model.diffusion_model.*`, `first_stage_model.*`,
  `cond_stage_model.*`), which is ignored. Some pruned files drop the `control_model.` prefix.
- diffusers (`ControlNetModel` state dict, `diffusion_pytorch_model.safetensors`): UNet-style
  `conv_in`, `time_embedding`, `add_embedding`, `down_blocks`, `mid_block`, plus
  `controlnet_cond_embedding.{conv_in, blocks.0-5, conv_out}` (the hint convs),
  `controlnet_down_blocks.N` (zero convs) and `controlnet_mid_block`. Keys are renamed to LDM
  names through a store view (adapters/keys.py holds the one LDM <-> diffusers name map); no
  tensor is copied.

The configuration comes from tensor shapes (`unet_config_from_store(..., encoder_only=True)`);
the family from the cross-attention width: 768 SD1 (8 heads), 1024 SD2 (64 channels per head),
2048 with `label_emb` SDXL (64 channels per head). Files that are something else and often sit
in a ControlNet folder (LoRA, Control-LoRA, T2I-Adapter, ControlNet-LLLite, IP-Adapter,
ControlNet-Union, checkpoints, VAEs) are refused with a message saying what they are.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NoReturn

import torch
from torch import nn

from ..errors import ModelFileError
from .adapters.keys import controlnet_block_names, ldm_names_from_diffusers
from .checkpoint import TensorStore, open_store
from .detect import LORA_KEY_PATTERN, UNET_PREFIX, Family
from .loading import load_strict
from .placement import LoadedPart
from .unet import (check_unet_config, make_input_blocks, make_label_emb, make_middle_block, make_time_embed,
                   timestep_embedding)
from .unet_config import UNetConfig, unet_config_from_store

CONTROL_PREFIX = "control_model."

# input_hint_block: (out channels, stride) of the convs before the last (which gives model_channels).
HINT_CONVS = ((16, 1), (16, 1), (32, 2), (32, 1), (96, 2), (96, 1), (256, 2))
HINT_DOWNSCALE = 8  # three stride-2 convs: the hint is at pixel size, 8x the latent

# Cross-attention width -> family (and the head split shapes cannot tell).
_FAMILY_BY_CONTEXT = {768: Family.SD1, 1024: Family.SD2, 2048: Family.SDXL}
_HEADS = {Family.SD1: {"num_heads": 8}, Family.SD2: {"num_head_channels": 64},
          Family.SDXL: {"num_head_channels": 64}}

_CONTROLNET_HINT = ("Choose an SD1.x, SD2.x or SDXL ControlNet file (an lllyasviel/A1111 .pth/.safetensors "
                    "or a diffusers diffusion_pytorch_model.safetensors)")


# ---------------------------------------------------------------------------- the model

class ControlNet(nn.Module):
    """cldm `ControlNet`, inference only, built from the UNet encoder's config.

    forward(x [B, in, H, W], hint [B or 1, hint_channels, 8H, 8W], timesteps [B] or [1],
    context [B, T, context_dim], y [B, adm] (SDXL)) -> len(input_blocks) + 1 residuals in the
    compute dtype (the weights'), input-block order, then the middle block's.
    """

    def __init__(self, config: UNetConfig, hint_channels: int = 3, *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        check_unet_config(config, encoder_only=True)  # a full UNet's config works too: its output side is unused
        if hint_channels < 1:
            raise ValueError(f"hint_channels {hint_channels} must be positive")
        self.config = config
        self.hint_channels = hint_channels
        self.needs_context = bool(any(config.transformer_depth) or config.transformer_depth_middle)
        f = dict(dtype=dtype, device=device)
        mc = config.model_channels

        # Registered in cldm's order, so the state dict lists keys as the files do.
        self.time_embed = make_time_embed(config, **f)
        self.label_emb = make_label_emb(config, **f)
        hint: list[nn.Module] = []
        ch = hint_channels
        for out, stride in HINT_CONVS:
            hint += [nn.Conv2d(ch, out, 3, stride=stride, padding=1, **f), nn.SiLU(inplace=True)]
            ch = out
        hint.append(nn.Conv2d(ch, mc, 3, padding=1, **f))
        self.input_hint_block = nn.Sequential(*hint)
        self.input_blocks, chans = make_input_blocks(config, **f)
        self.zero_convs = nn.ModuleList(nn.Sequential(nn.Conv2d(c, c, 1, **f)) for c in chans)
        self.middle_block = make_middle_block(config, **f)
        self.middle_block_out = nn.Sequential(nn.Conv2d(chans[-1], chans[-1], 1, **f))

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: a norm's (Linear/Conv2d weights may be stored in fp8, fp8.py)."""
        return self.middle_block[0].in_layers[0].weight.dtype

    def forward(self, x: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor,
                context: torch.Tensor | None = None, y: torch.Tensor | None = None) -> list[torch.Tensor]:
        if (y is None) != (self.label_emb is None):
            raise ValueError("y (SDXL pooled + size conditioning) must be given exactly when the ControlNet has "
                             f"label_emb (adm_in_channels={self.config.adm_in_channels})")
        if context is None and self.needs_context:
            raise ValueError("context (text encoder hidden states) is required: the ControlNet has cross-attention")
        b = x.shape[0]
        if hint.dim() != 4 or hint.shape[1] != self.hint_channels or hint.shape[0] not in (1, b):
            raise ValueError(f"hint must be [1 or {b}, {self.hint_channels}, H, W], got {list(hint.shape)}")
        want = tuple(-(-s // HINT_DOWNSCALE) for s in hint.shape[-2:])  # ceil: each stride-2 conv rounds up
        if want != tuple(x.shape[-2:]):
            raise ValueError(f"hint is {hint.shape[-2]}x{hint.shape[-1]} pixels; a {x.shape[-2]}x{x.shape[-1]} latent "
                             f"needs {HINT_DOWNSCALE}x that ({HINT_DOWNSCALE * x.shape[-2]}x{HINT_DOWNSCALE * x.shape[-1]})")
        if hint.shape[0] > 1 and hint.stride(0) == 0:
            hint = hint[:1]  # one image expanded over the batch: encode it once, broadcast the sum

        dtype = self.dtype
        t = timesteps.reshape(-1).expand(b)  # a single timestep applies to the whole batch
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(dtype))
        if self.label_emb is not None:
            emb = emb + self.label_emb(y.to(dtype))
        if context is not None:
            context = context.to(dtype)

        guided = self.input_hint_block(hint.to(dtype))
        h = x.to(dtype)
        outs: list[torch.Tensor] = []
        for i, (block, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context)
            if i == 0:
                h.add_(guided)  # h is conv_in's fresh output; guided broadcasts over a 1-row hint
            outs.append(zero_conv[0](h))
        h = self.middle_block(h, emb, context)
        outs.append(self.middle_block_out[0](h))
        return outs


# ---------------------------------------------------------------------------- detection

@dataclass(frozen=True)
class ControlNetInfo:
    path: Path | None
    family: Family
    layout: Literal["ldm", "diffusers"]  # the file's key layout
    unet: UNetConfig      # the encoder it copies (encoder-only: out_channels 0, no output depths)
    hint_channels: int

    @property
    def description(self) -> str:
        return f"{self.family.label} ControlNet ({self.layout} layout, {self.hint_channels}-channel hint)"


def _keys_match(store: TensorStore, pattern: str) -> bool:
    rx = re.compile(pattern)
    return any(rx.search(k) for k in store.keys())


def _refuse_other_kinds(store: TensorStore, path: Path | str) -> None:
    """Refuse files that are not plain ControlNets, saying what they are. Checked before looking
    for ControlNet keys: Control-LoRA and Union files carry those keys as well."""
    controlnet_keys = _keys_match(store, r"(^|\.)(input_hint_block|zero_convs)\.")
    if "lora_controlnet" in store or (controlnet_keys and _keys_match(store, r"\.(up|down)$")):
        raise ModelFileError(path, "this is a Stability Control-LoRA (a low-rank ControlNet difference), "
                             "which is not supported", "Use a full ControlNet model of the same control type")
    if _keys_match(store, r"(^|\.)style_embedding$"):
        raise ModelFileError(path, "this is a T2I-Adapter style model, not a ControlNet", _CONTROLNET_HINT)
    if _keys_match(store, r"(^|\.)(task_embedding|control_add_embedding|transformer_layes)\b"):
        raise ModelFileError(path, "this is a ControlNet-Union/ProMax model (several control types in one), "
                             "which is not supported", "Use a single-type ControlNet model")
    if _keys_match(store, r"lllite"):
        raise ModelFileError(path, "this is a ControlNet-LLLite model (kohya), which is not supported", _CONTROLNET_HINT)
    if store.has_prefix("image_proj.") or store.has_prefix("ip_adapter."):
        raise ModelFileError(path, "this is an IP-Adapter, not a ControlNet", _CONTROLNET_HINT)
    if not store.has_prefix("down_blocks.") and (
            store.has_prefix("adapter.body.") or store.has_prefix("adapter.conv_in.")
            or _keys_match(store, r"^body\.\d+\.resnets\.") or "body.0.in_conv.weight" in store
            or ("conv_in.weight" in store and store.has_prefix("body."))):
        raise ModelFileError(path, "this is a T2I-Adapter, not a ControlNet", _CONTROLNET_HINT)
    if _keys_match(store, LORA_KEY_PATTERN) or _keys_match(store, r"^lora_"):
        raise ModelFileError(path, "this is a LoRA/LyCORIS adapter, not a ControlNet",
                             "Use it as an adapter (<lora:NAME:1>) and choose a ControlNet model file here")


def _refuse_unknown(store: TensorStore, path: Path | str) -> NoReturn:
    """No ControlNet keys: name what the file is, if it is something common."""
    if store.has_prefix(UNET_PREFIX) or (store.has_prefix("input_blocks.") and store.has_prefix("output_blocks.")):
        raise ModelFileError(path, "this is a Stable Diffusion checkpoint (a UNet without control_model.* weights), "
                             "not a ControlNet", _CONTROLNET_HINT)
    if any(store.has_prefix(p) for p in ("encoder.", "decoder.", "first_stage_model.", "quant_conv.")):
        raise ModelFileError(path, "this is a VAE, not a ControlNet", _CONTROLNET_HINT)
    if store.has_prefix("down_blocks.") and store.has_prefix("up_blocks."):
        raise ModelFileError(path, "this is a diffusers-format UNet (no controlnet_* layers), not a ControlNet",
                             _CONTROLNET_HINT)
    raise ModelFileError(path, "no ControlNet weights found (no control_model.*, input_hint_block.* or "
                         "controlnet_cond_embedding.* keys)", _CONTROLNET_HINT)


def _diffusers_view(store: TensorStore, path: Path | str) -> TensorStore:
    """The diffusers file's tensors under LDM names (a renaming view: nothing is read)."""
    resnets: dict[int, set[int]] = {}
    downsamplers: set[int] = set()
    for key in store.keys():
        if m := re.match(r"down_blocks\.(\d+)\.(resnets|downsamplers)\.(\d+)\.", key):
            level, kind, index = int(m.group(1)), m.group(2), int(m.group(3))
            if kind == "resnets":
                resnets.setdefault(level, set()).add(index)
            else:
                downsamplers.add(level)
    levels = len(resnets)
    layout_ok = (levels > 0 and set(resnets) == set(range(levels))
                 and all(r == set(range(len(r))) for r in resnets.values())
                 and downsamplers == set(range(levels - 1)))  # every level but the deepest downsamples
    if not layout_ok:
        raise ModelFileError(path, "diffusers ControlNet with an unsupported block layout "
                             f"(resnets per level {dict(sorted((k, len(v)) for k, v in resnets.items()))}, "
                             f"downsamplers at levels {sorted(downsamplers)})", _CONTROLNET_HINT)
    names = ldm_names_from_diffusers(store.keys(), controlnet_block_names([len(resnets[i]) for i in range(levels)]))
    # Keys with no LDM name keep theirs: loading then reports them as unexpected, by name.
    renamed = {ldm or key: key for key, ldm in names.items()}
    if len(renamed) != len(names):
        raise ModelFileError(path, "diffusers ControlNet keys collide after renaming to LDM names", _CONTROLNET_HINT)
    return store.renamed(renamed)


def _locate(store: TensorStore, path: Path | str) -> tuple[Literal["ldm", "diffusers"], TensorStore]:
    """(layout, the ControlNet's tensors under LDM names without prefix), or refuse."""
    _refuse_other_kinds(store, path)
    if store.has_prefix(CONTROL_PREFIX):  # may sit beside a whole checkpoint: only this part is used
        return "ldm", store.sub(CONTROL_PREFIX)
    if "input_hint_block.0.weight" in store and "zero_convs.0.0.weight" in store:
        return "ldm", store
    if "controlnet_cond_embedding.conv_in.weight" in store and "controlnet_down_blocks.0.weight" in store:
        return "diffusers", _diffusers_view(store, path)
    _refuse_unknown(store, path)


def _family(config: UNetConfig, path: Path | str, for_family: Family | None) -> Family:
    family = _FAMILY_BY_CONTEXT.get(config.context_dim)
    sdxl_like = config.adm_in_channels is not None
    if family is None and for_family is not None:
        family = for_family   # an unusual width: taken for the source's family; SourceControl.check decides
    if family is None:
        raise ModelFileError(path, f"ControlNet cross-attention width {config.context_dim} matches no supported family "
                             "(SD1.x 768, SD2.x 1024, SDXL 2048)", _CONTROLNET_HINT)
    if (family is Family.SDXL) != sdxl_like:
        what = "has label_emb (SDXL's size conditioning)" if sdxl_like else "has no label_emb"
        raise ModelFileError(path, f"ControlNet with cross-attention width {config.context_dim} {what}, "
                             "a combination of no supported family", _CONTROLNET_HINT)
    return family


def _inspect(store: TensorStore, for_family: Family | None = None) -> tuple[ControlNetInfo, TensorStore]:
    path = store.path or "(in memory)"
    layout, net = _locate(store, path)
    if "input_hint_block.0.weight" not in net:
        raise ModelFileError(path, "ControlNet without its hint encoder (input_hint_block.0 missing)",
                             "The file is damaged or incomplete; download it again")
    config = unet_config_from_store(net, encoder_only=True)
    family = _family(config, path, for_family)
    config = dataclasses.replace(config, **_HEADS[family])
    try:
        check_unet_config(config, encoder_only=True)
    except ValueError as e:
        raise ModelFileError(path, f"unsupported ControlNet layout: {e}", _CONTROLNET_HINT) from None
    hint_channels = net.shape("input_hint_block.0.weight")[1]
    return ControlNetInfo(store.path, family, layout, config, hint_channels), net


def detect_controlnet(store: TensorStore, *, for_family: Family | None = None) -> ControlNetInfo:
    """What ControlNet a file holds (family, layout, config, hint channels), from keys and shapes
    only; a file that is not a usable ControlNet raises ModelFileError saying what it is.
    `for_family`: the family of the source it will run with, assumed when the cross-attention width
    is none of the known ones (768, 1024, 2048), e.g. a small test model."""
    return _inspect(store, for_family)[0]


# ---------------------------------------------------------------------------- loading

@dataclass
class LoadedControlNet(LoadedPart):
    info: ControlNetInfo
    model: ControlNet
    released: bool = field(default=False, init=False)
    # nbytes(), release(): LoadedPart


def load_controlnet(source: str | Path | TensorStore, *, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32, for_family: Family | None = None) -> LoadedControlNet:
    """Load a ControlNet file (LDM or diffusers layout) strictly: every stored tensor of the
    ControlNet is used and every weight filled, cast to `dtype` on `device`. `for_family`: see
    `detect_controlnet`."""
    store = source if isinstance(source, TensorStore) else open_store(source)
    info, net = _inspect(store, for_family)
    model = load_strict(lambda: ControlNet(info.unet, info.hint_channels), net, what="ControlNet",
                        device=device, dtype=dtype)
    return LoadedControlNet(info, model)
