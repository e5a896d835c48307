"""Which runtime module each layer of a LoRA/LyCORIS file adapts.

A file names its layers in one of several styles, all of which must land on the runtime's
own module names (checkpoint/LDM names for the UNet, HF or OpenCLIP names for text encoders):

- kohya / A1111 / LyCORIS-kohya: `lora_unet_<path, '.' -> '_'>` with the *diffusers* UNet path
  (SD1/SD2 trainers) or the *LDM* path (sd-scripts' SDXL UNet: `lora_unet_input_blocks_4_1_...`);
  `lora_te_<HF path>` (SD1/SD2), SDXL `lora_te1_` (CLIP-L) and `lora_te2_` (bigG).
- diffusers / PEFT: `unet.<diffusers path>`, `text_encoder.<HF path>`, `text_encoder_2.<HF path>`,
  sometimes with `base_model.model.` inside or no `unet.` at all; old attention-processor files
  (`...attn1.processor.to_q_lora.down.weight`).
- LyCORIS' own wrapper (SimpleTuner): `lycoris_<diffusers UNet path, '.' -> '_'>`
  (`LycorisNetwork.LORA_PREFIX = "lycoris"`, names built as `f"{prefix}_{name}".replace(".", "_")`).
- ComfyUI's generic names: `diffusion_model.<LDM path>`, `text_encoders.clip_l.transformer.<HF path>`.

Underscore-joined names cannot be parsed back (`attn1_to_q` vs `down_blocks_0`), so, as A1111's
`network_layer_mapping` does, every candidate name is generated from the real module tree and
looked up whole. Text-encoder layers are always named HF-style in files; for OpenCLIP encoders
(SD2, SDXL bigG) q/k/v become row slices of the packed `attn.in_proj_weight` (q, k, v in that
order, as open_clip's `nn.MultiheadAttention` and diffusers' `convert_open_clip_checkpoint` split it).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import nn

CANONICAL_SUFFIXES = (
    "lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "dora_scale",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
    "diff", "diff_b", "w_norm", "b_norm",
)

# Other spellings of the same tensors (key ending -> canonical suffix). PEFT's `lora_A` is the
# down projection, `lora_B` the up one; `.default` is PEFT's adapter name in raw model state dicts.
# `lora_magnitude_vector` is PEFT's DoRA magnitude: it is NOT laid out like LyCORIS' `dora_scale`
# (see `dora_scale_on_output`).
_ALIASES = {
    ".lora_A.weight": "lora_down.weight", ".lora_B.weight": "lora_up.weight",
    ".lora_A.default.weight": "lora_down.weight", ".lora_B.default.weight": "lora_up.weight",
    ".lora_A": "lora_down.weight", ".lora_B": "lora_up.weight",
    ".lora.down.weight": "lora_down.weight", ".lora.up.weight": "lora_up.weight",
    ".lora_linear_layer.down.weight": "lora_down.weight", ".lora_linear_layer.up.weight": "lora_up.weight",
    ".lora_magnitude_vector": "dora_scale", ".lora_magnitude_vector.weight": "dora_scale",
    ".lora_magnitude_vector.default.weight": "dora_scale",
}
# diffusers' old attention-processor files: the suffix is glued to the projection's name
# (`attn1.processor.to_q_lora.down.weight`, `self_attn.to_out_lora.up.weight`).
_PROCESSOR_ALIASES = {"_lora.down.weight": "lora_down.weight", "_lora.up.weight": "lora_up.weight"}
# ...and the projection names those files use, per side (UNet attention vs CLIP self-attention).
_PROCESSOR_UNET = {"to_out": "to_out.0"}
_PROCESSOR_TEXT = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}

_SPELLINGS: tuple[tuple[str, str], ...] = tuple(sorted(
    [("." + s, s) for s in CANONICAL_SUFFIXES] + list(_ALIASES.items()) + list(_PROCESSOR_ALIASES.items()),
    key=lambda e: -len(e[0])))  # longest first: ".lora_A.default.weight" before ".lora_A"


def _normalise_layer(layer: str) -> str:
    """Drop diffusers' `.processor` level and name projections as the modules do: old diffusers
    files say `to_q`..`to_out` for both sides (UNet `to_out.0`, CLIP `q_proj`..`out_proj`)."""
    layer = layer.replace(".processor.", ".")
    head, dot, proj = layer.rpartition(".")
    table = _PROCESSOR_TEXT if head.endswith("self_attn") else _PROCESSOR_UNET
    if dot and proj in table:
        layer = f"{head}.{table[proj]}"
    return layer


def split_key(key: str) -> tuple[str, str] | None:
    """(layer name, canonical suffix) of one file key, or None if no known suffix ends it."""
    for ending, canonical in _SPELLINGS:
        if key.endswith(ending) and len(key) > len(ending):
            return _normalise_layer(key[: -len(ending)]), canonical
    return None


def group_layers(keys: Iterable[str]) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Group a file's keys by layer: {layer name: {canonical suffix: key in file}}.

    Also returns the keys that fit no known suffix, or that repeat a (layer, suffix) already
    taken by another spelling, for the caller to report.
    """
    layers: dict[str, dict[str, str]] = {}
    unknown: list[str] = []
    for key in keys:
        split = split_key(key)
        if split is None:
            unknown.append(key)
            continue
        layer, suffix = split
        parts = layers.setdefault(layer, {})
        if suffix in parts:
            unknown.append(key)
        else:
            parts[suffix] = key
    return layers, unknown


def dora_scale_on_output(key: str, scale_shape: Iterable[int], weight_shape: Iterable[int]) -> bool:
    """Whether a DoRA magnitude holds one value per output feature (else per input feature).

    PEFT's `lora_magnitude_vector` is always per output: [out] for Linear, [1, out, 1, 1] for Conv2d
    (shaped to broadcast over activations). LyCORIS' `dora_scale` is [out, 1, ...] since its
    `wd_on_out=True` default (2025), [1, in, ...] before; as ComfyUI does, a leading dimension equal
    to the output count means per output.
    """
    scale_shape, weight_shape = tuple(scale_shape), tuple(weight_shape)
    if "lora_magnitude_vector" in key:
        return True
    return len(scale_shape) == 1 or scale_shape[0] == weight_shape[0] != 1


@dataclass(frozen=True)
class Target:
    """A runtime weight an adapter layer changes."""

    component: str                       # "unet" | "te1" | "te2"
    module: str                          # module name inside that component's model
    param: str = "weight"                # "weight", or "in_proj_weight" (OpenCLIP packed q/k/v)
    rows: tuple[int, int] | None = None  # output rows of `param` (q, k or v of a packed in_proj)


# ------------------------------------------------------------------ UNet: LDM <-> diffusers names

# Inside a ResBlock (LDM) / ResnetBlock2D (diffusers).
_RESNET_PARTS = {"in_layers.0": "norm1", "in_layers.2": "conv1", "out_layers.0": "norm2",
                 "out_layers.3": "conv2", "emb_layers.1": "time_emb_proj", "skip_connection": "conv_shortcut"}

# Encoder side (the part a ControlNet copies), then the output head.
_ENCODER_FIXED = {
    "input_blocks.0.0": "conv_in",
    "time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",  # SDXL text_time
    "middle_block.0": "mid_block.resnets.0", "middle_block.1": "mid_block.attentions.0",
    "middle_block.2": "mid_block.resnets.1",
}
_UNET_FIXED = {**_ENCODER_FIXED, "out.0": "conv_norm_out", "out.2": "conv_out"}

# ControlNet-only layers (cldm -> diffusers ControlNetModel): the hint encoder's convs sit at
# even indices of `input_hint_block` (SiLU between), one zero conv per input block, one after the middle.
_CONTROLNET_FIXED = {
    "input_hint_block.0": "controlnet_cond_embedding.conv_in",
    **{f"input_hint_block.{2 * (i + 1)}": f"controlnet_cond_embedding.blocks.{i}" for i in range(6)},
    "input_hint_block.14": "controlnet_cond_embedding.conv_out",
    "middle_block_out.0": "controlnet_mid_block",
}


def encoder_block_names(num_res_blocks: Sequence[int]) -> dict[str, str]:
    """LDM block prefix -> diffusers prefix for the encoder side (embeddings, input blocks, middle
    block) of a UNet with `num_res_blocks[i]` res blocks at level i.

    After conv_in, level i has `num_res_blocks[i]` blocks [ResBlock (+ transformer)] then (but
    the last level) a Downsample block.
    """
    names = dict(_ENCODER_FIXED)
    levels = len(num_res_blocks)
    k = 1
    for i, n in enumerate(num_res_blocks):
        for j in range(n):
            names[f"input_blocks.{k}.0"] = f"down_blocks.{i}.resnets.{j}"
            names[f"input_blocks.{k}.1"] = f"down_blocks.{i}.attentions.{j}"
            k += 1
        if i != levels - 1:
            names[f"input_blocks.{k}.0.op"] = f"down_blocks.{i}.downsamplers.0.conv"
            k += 1
    return names


def unet_block_names(config) -> dict[str, str]:
    """LDM block prefix -> diffusers prefix, from the block layout of a `UNetConfig`.

    Input side: `encoder_block_names`. Output side: levels deepest first, each with
    `num_res_blocks + 1` blocks, the last of each level but level 0 ending with an Upsample at
    index 1, or 2 when the block has a transformer.
    """
    names = {**encoder_block_names(config.num_res_blocks), **_UNET_FIXED}
    levels = len(config.channel_mult)
    k = 0
    for i, level in enumerate(reversed(range(levels))):
        n = config.num_res_blocks[level]
        for j in range(n + 1):
            names[f"output_blocks.{k}.0"] = f"up_blocks.{i}.resnets.{j}"
            has_transformer = bool(config.transformer_depth_output[k])
            if has_transformer:
                names[f"output_blocks.{k}.1"] = f"up_blocks.{i}.attentions.{j}"
            if level and j == n:
                names[f"output_blocks.{k}.{2 if has_transformer else 1}.conv"] = f"up_blocks.{i}.upsamplers.0.conv"
            k += 1
    return names


def controlnet_block_names(num_res_blocks: Sequence[int]) -> dict[str, str]:
    """LDM (cldm `ControlNet`) block prefix -> diffusers `ControlNetModel` prefix: the encoder's
    names plus the hint encoder, a zero conv per input block and the middle block's output conv."""
    names = {**encoder_block_names(num_res_blocks), **_CONTROLNET_FIXED}
    n_input = 1 + sum(num_res_blocks) + len(num_res_blocks) - 1
    names.update({f"zero_convs.{k}.0": f"controlnet_down_blocks.{k}" for k in range(n_input)})
    return names


_RESNET_PARTS_INVERSE = {v: k for k, v in _RESNET_PARTS.items()}


def _rename(name: str, blocks: dict[str, str], parts: dict[str, str]) -> str | None:
    """`name` with its longest block prefix replaced by `blocks[prefix]`, and inside a resnet
    block its leading layer name by `parts[layer]`; None if no block prefix matches."""
    pieces = name.split(".")
    for cut in range(len(pieces), 0, -1):  # longest block prefix first
        head = ".".join(pieces[:cut])
        if head in blocks:
            rest = pieces[cut:]
            if ".resnets." in head or ".resnets." in blocks[head]:
                for n in range(len(rest), 0, -1):
                    layer = ".".join(rest[:n])
                    if layer in parts:
                        rest = [parts[layer], *rest[n:]]
                        break
            return ".".join([blocks[head], *rest])
    return None


def _diffusers_name(ldm_name: str, blocks: dict[str, str]) -> str | None:
    return _rename(ldm_name, blocks, _RESNET_PARTS)


def ldm_names_from_diffusers(keys: Iterable[str], blocks: dict[str, str]) -> dict[str, str | None]:
    """{diffusers key: LDM key, or None where no block of `blocks` (LDM -> diffusers prefixes,
    as `unet_block_names` / `controlnet_block_names` give them) names it}.

    Works on parameter keys (`down_blocks.0.resnets.1.norm1.weight` -> `input_blocks.2.0.in_layers.0.weight`):
    only block prefixes and resnet layer names differ between the two layouts; attention
    internals (`transformer_blocks.0.attn1.to_q`, `proj_in`, `norm`) are named alike.
    """
    inverse = {v: k for k, v in blocks.items()}
    return {key: _rename(key, inverse, _RESNET_PARTS_INVERSE) for key in keys}


def _holds_weight(module: nn.Module) -> bool:
    """Layers an adapter can change: Linear, Conv2d and affine norms."""
    kinds = (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm)
    return isinstance(module, kinds) and getattr(module, "weight", None) is not None


def _unet_names(unet: nn.Module) -> dict[str, Target]:
    """Every dotted name (LDM and diffusers) of each adaptable UNet layer."""
    blocks = unet_block_names(unet.config)
    names: dict[str, Target] = {}
    for name, module in unet.named_modules():
        if not _holds_weight(module):
            continue
        target = Target("unet", name)
        for alias in (name, _diffusers_name(name, blocks)):
            if alias:
                names[alias] = target
                if alias.endswith(".to_out.0"):  # diffusers spells the attention output `to_out` in places
                    names[alias[:-2]] = target
    return names


# ------------------------------------------------------------------ text encoders

# OpenCLIP block part -> HF layer part.
_OPENCLIP_PARTS = {"attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                   "ln_1": "layer_norm1", "ln_2": "layer_norm2"}
_RESBLOCK = "transformer.resblocks."


def _openclip_names(component: str, model: nn.Module) -> dict[str, Target]:
    names: dict[str, Target] = {}
    for name, module in model.named_modules():
        packed = getattr(module, "in_proj_weight", None)
        if not (_holds_weight(module) or isinstance(packed, nn.Parameter)):
            continue
        if isinstance(packed, nn.Parameter):
            names[name] = Target(component, name, "in_proj_weight")  # the whole packed q/k/v
        else:
            names[name] = Target(component, name)
        if name == "ln_final":
            names["text_model.final_layer_norm"] = names[name]
            continue
        if not name.startswith(_RESBLOCK):
            continue
        n, _, part = name[len(_RESBLOCK):].partition(".")
        hf = f"text_model.encoder.layers.{n}."
        if isinstance(packed, nn.Parameter):
            width = packed.shape[1]
            for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):  # packed in this order
                rows = (i * width, (i + 1) * width)
                names[hf + "self_attn." + proj] = Target(component, name, "in_proj_weight", rows)
        elif part in _OPENCLIP_PARTS:
            names[hf + _OPENCLIP_PARTS[part]] = names[name]
    return names


def _hf_names(component: str, model: nn.Module) -> dict[str, Target]:
    return {name: Target(component, name) for name, module in model.named_modules() if _holds_weight(module)}


def _text_names(component: str, model: nn.Module) -> dict[str, Target]:
    packed = any(isinstance(getattr(m, "in_proj_weight", None), nn.Parameter) for m in model.modules())
    names = _openclip_names(component, model) if packed else _hf_names(component, model)
    # transformers 5 drops the `text_model.` level from CLIPTextModel names; accept both.
    names.update({k[len("text_model."):]: v for k, v in list(names.items()) if k.startswith("text_model.")})
    return names


# ------------------------------------------------------------------ the map

def _flat(names: dict[str, Target]) -> dict[str, Target | None]:
    """'.' -> '_' spellings; None marks a flat name two different layers share (never resolved)."""
    flat: dict[str, Target | None] = {}
    for name, target in names.items():
        key = name.replace(".", "_")
        flat[key] = target if flat.get(key, target) == target else None
    return flat


# (prefix, component, flat?) -- first match wins, so longer prefixes come first.
_PREFIXES = (
    ("lora_unet_", "unet", True), ("lycoris_", "unet", True),
    ("lora_te1_", "te1", True), ("lora_te2_", "te2", True), ("lora_te_", "te1", True),
    ("unet.", "unet", False), ("model.diffusion_model.", "unet", False), ("diffusion_model.", "unet", False),
    ("text_encoder_2.", "te2", False), ("text_encoder.", "te1", False),
    ("text_encoders.clip_l.transformer.", "te1", False), ("text_encoders.clip_h.transformer.", "te1", False),
    ("text_encoders.clip_g.transformer.", "te2", False),
)


class KeyMap:
    """Layer names of adapter files -> `Target`s in one model's UNet and text encoders."""

    def __init__(self, family: str, dotted: dict[str, dict[str, Target]]) -> None:
        self.family = family
        self._dotted = dotted
        self._flat = {c: _flat(names) for c, names in dotted.items()}

    @classmethod
    def build(cls, family, unet: nn.Module, text_models: dict[str, nn.Module]) -> "KeyMap":
        """From the real module trees: `unet` (a `UNetModel`, for its `config` and names) and
        `text_models` {"te1": HFClipText | OpenClipText, "te2": OpenClipText (SDXL)}."""
        family = getattr(family, "value", family)
        dotted = {"unet": _unet_names(unet)}
        for component, model in text_models.items():
            dotted[component] = _text_names(component, model)
        return cls(family, dotted)

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(self._dotted)

    def kohya_name(self, target: Target) -> str | None:
        """The layer name kohya's sd-scripts (and every WebUI's LoRA loader) uses for `target`:
        `lora_unet_` + the diffusers path, `lora_te_`/`lora_te1_`/`lora_te2_` + the HF CLIP path,
        dots as underscores; None for a weight such files never name (a whole packed q/k/v)."""
        aliases = [name for name, t in self._dotted.get(target.component, {}).items() if t == target]
        if target.component == "unet":
            preferred = [a for a in aliases if a != target.module and not a.endswith(".to_out")] or aliases
            prefix = "lora_unet_"
        else:
            preferred = [a for a in aliases if a.startswith("text_model.")]
            prefix = {"te1": "lora_te1_" if "te2" in self._dotted else "lora_te_", "te2": "lora_te2_"}[target.component]
        return prefix + preferred[0].replace(".", "_") if preferred else None

    def targets(self, component: str) -> set[Target]:
        """Every adaptable weight of one component (for reports and tests)."""
        return set(self._dotted.get(component, {}).values())

    def resolve(self, layer_name: str) -> Target | None:
        """The runtime weight a file's layer name (as `group_layers` gives it) adapts, or None."""
        name = _strip_peft_wrapper(layer_name)
        for prefix, component, flat in _PREFIXES:
            if name.startswith(prefix):
                rest = _strip_peft_wrapper(name[len(prefix):])
                table = self._flat if flat else self._dotted
                return table.get(component, {}).get(rest)
        # No prefix: a UNet-only file in diffusers/LDM names, or a bare HF text-encoder path.
        for component in ("unet", "te1"):
            target = self._dotted.get(component, {}).get(name)
            if target is not None:
                return target
        return None


def component_of(layer_name: str) -> str | None:
    """"unet", "te1" or "te2" from a layer name's prefix alone (no model needed), or None if unprefixed."""
    name = _strip_peft_wrapper(layer_name)
    return next((component for prefix, component, _ in _PREFIXES if name.startswith(prefix)), None)


def _strip_peft_wrapper(name: str) -> str:
    """PEFT wraps the model it adapts: `base_model.model.<path>`."""
    wrapper = "base_model.model."
    return name[len(wrapper):] if name.startswith(wrapper) else name
