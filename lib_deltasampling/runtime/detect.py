"""What a model file is: family, prediction type and UNet configuration, from its keys and shapes.

Supported as source models: SD1.x, SD2.x (eps and v) and SDXL base (and its fine-tunes: Pony,
Illustrious, ...). Everything else that people commonly drop into a model folder is recognised
and refused with a message saying what the file is: SDXL refiner, inpainting and
instruct-pix2pix UNets, SD3/Flux/other transformer models, LoRA/LyCORIS files, VAE-only files,
textual-inversion embeddings and diffusers-format folders.

Prediction type (eps or v), in order of precedence, as the hosts decide it:
1. a `<checkpoint name>.yaml` beside the file containing `parameterization: "v"` (A1111
   `sd_models_config.find_checkpoint_config_near_filename`);
2. an explicit override (setting / API / command line);
3. a `v_pred` marker key in the state dict (the convention of SDXL v-prediction fine-tunes);
4. SD2 only: A1111's probe (`sd_models_config.is_using_v_parameterization_for_sd2`): one UNet
   forward on a constant 0.5 latent at t=999 with a constant 0.5 context; a v model's output
   minus its input averages below -1, an eps model's does not. The probe needs the loaded UNet,
   so `loader.load_model` runs it; `detect_model` reports `prediction=None` in that case.
5. otherwise eps.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from ..errors import ModelFileError, SettingError
from .checkpoint import TensorStore
from .unet_config import UNetConfig, unet_config_from_store

UNET_PREFIX = "model.diffusion_model."


class Family(str, Enum):
    SD1 = "sd1"
    SD2 = "sd2"
    SDXL = "sdxl"

    @property
    def label(self) -> str:
        return {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}[self.value]


PREDICTIONS = ("eps", "v")


@dataclass(frozen=True)
class ModelInfo:
    path: Path | None
    family: Family
    prediction: str | None      # "eps" | "v"; None = decide by the SD2 probe after loading
    prediction_source: str      # "yaml", "override", "v_pred key", "probe", "default"
    unet: UNetConfig
    has_vae: bool

    @property
    def description(self) -> str:
        pred = self.prediction or "eps/v undecided"
        return f"{self.family.label} ({pred}-prediction, from {self.prediction_source})"


# Recognisers for files that are not usable source checkpoints: (test, what the file is, what to do).
def _has(store: TensorStore, *prefixes: str) -> bool:
    return any(store.has_prefix(p) for p in prefixes)


def _any_key(store: TensorStore, pattern: str) -> bool:
    rx = re.compile(pattern)
    return any(rx.search(k) for k in store.keys())


_CHECKPOINT_HINT = "Choose a single-file SD1.x, SD2.x or SDXL checkpoint as the source"


# Keys only LoRA/LyCORIS adapter files have (kohya/LyCORIS prefixes, PEFT/kohya/LyCORIS suffixes).
LORA_KEY_PATTERN = (r"(^lora_(unet|te\d?)_|^lycoris_|\.lora_(down|up)\.weight$|\.lora_[AB]\.weight$"
                    r"|\.hada_w1_a$|\.lokr_w[12](_[ab])?$|\.oft_blocks$)")


def _refuse_non_checkpoints(store: TensorStore, path: Path | str) -> None:
    if _any_key(store, LORA_KEY_PATTERN):
        raise ModelFileError(path, "this is a LoRA/LyCORIS adapter, not a checkpoint",
                             "Put it in the adapter field as <lora:NAME:1> and pick its base model as the source checkpoint")
    if _has(store, "string_to_param", "emb_params", "clip_l", "clip_g") and len(store) <= 4:
        raise ModelFileError(path, "this is a textual-inversion embedding, not a checkpoint",
                             "Use its name in the adapted prompt and pick its base model as the source checkpoint")
    if _has(store, "model.diffusion_model.joint_blocks.", "joint_blocks.", "model.diffusion_model.x_embedder."):
        raise ModelFileError(path, "this is a Stable Diffusion 3 model, which is not supported as a source", _CHECKPOINT_HINT)
    if _has(store, "double_blocks.", "model.diffusion_model.double_blocks.", "transformer_blocks.0.attn.to_added_qkv"):
        raise ModelFileError(path, "this is a Flux (or other MMDiT) model, which is not supported as a source", _CHECKPOINT_HINT)
    if _has(store, "down_blocks.", "mid_block.", "conv_in.") and not store.has_prefix(UNET_PREFIX):
        raise ModelFileError(path, "this is a diffusers-format UNet (or a VAE), not a single-file checkpoint", _CHECKPOINT_HINT)
    if not store.has_prefix(UNET_PREFIX):
        if _has(store, "encoder.", "decoder.", "first_stage_model.", "quant_conv."):
            raise ModelFileError(path, "this is a VAE file, not a checkpoint (it has no UNet)", _CHECKPOINT_HINT)
        if _has(store, "cond_stage_model.", "conditioner.", "text_model.", "transformer.resblocks."):
            raise ModelFileError(path, "this holds only a text encoder, not a checkpoint (it has no UNet)", _CHECKPOINT_HINT)
        raise ModelFileError(path, "no Stable Diffusion UNet found (no model.diffusion_model.* weights)", _CHECKPOINT_HINT)


def detect_family(store: TensorStore) -> Family:
    """Family from the text-encoder layout; refuse UNet variants we cannot use as a source."""
    path = store.path or "(in memory)"
    _refuse_non_checkpoints(store, path)
    unet_in = store.shape(UNET_PREFIX + "input_blocks.0.0.weight")[1] if UNET_PREFIX + "input_blocks.0.0.weight" in store else 4

    if "conditioner.embedders.1.model.ln_final.weight" in store:
        family = Family.SDXL
    elif "conditioner.embedders.0.model.ln_final.weight" in store:
        raise ModelFileError(path, "this is an SDXL refiner, which is not supported as a source (it only refines the last steps)",
                             "Use an SDXL base model or fine-tune")
    elif store.has_prefix("cond_stage_model.model.transformer."):
        family = Family.SD2
    elif store.has_prefix("cond_stage_model.transformer."):
        family = Family.SD1
    elif store.has_prefix("cond_stage_model.roberta."):
        raise ModelFileError(path, "this is an AltDiffusion model (XLM-R text encoder), which is not supported", _CHECKPOINT_HINT)
    else:
        raise ModelFileError(path, "has a UNet but no text encoder this runtime knows (no cond_stage_model.* or conditioner.*)",
                             "Use a complete single-file checkpoint that includes its text encoder")

    if unet_in == 9:
        raise ModelFileError(path, f"this is a {family.label} inpainting model (9 input channels), which is not supported as a source",
                             f"Use the plain {family.label} base model it was made from")
    if unet_in == 8:
        raise ModelFileError(path, f"this is a {family.label} instruct-pix2pix model (8 input channels), which is not supported as a source",
                             f"Use a plain {family.label} model")
    if unet_in != 4:
        raise ModelFileError(path, f"the UNet takes {unet_in} input channels; only 4-channel latent models are supported", _CHECKPOINT_HINT)
    return family


def yaml_parameterization(checkpoint: Path) -> str | None:
    """'v' or 'eps' from `<checkpoint>.yaml` beside the file, as A1111/Forge read it; None if no such file."""
    yaml_path = checkpoint.with_suffix(".yaml")
    if not yaml_path.is_file():
        return None
    text = yaml_path.read_text(encoding="utf-8", errors="replace")
    # A plain scan keeps PyYAML out of the runtime; the key appears once in LDM configs.
    m = re.search(r"^\s*parameterization\s*:\s*[\"']?(\w+)[\"']?", text, flags=re.MULTILINE)
    if not m:
        return "eps"
    value = m.group(1).lower()
    return "v" if value == "v" else "eps"


def _check_prediction(value: str | None) -> str | None:
    if value in (None, "", "auto"):
        return None
    value = value.lower()
    if value not in PREDICTIONS:
        raise SettingError("prediction type", f"unknown value {value!r}", "Use 'auto', 'eps' or 'v'")
    return value


def detect_model(store: TensorStore, *, prediction: str | None = None) -> ModelInfo:
    """Inspect a checkpoint store without loading its weights."""
    family = detect_family(store)
    unet_store = store.sub(UNET_PREFIX)
    heads = {"num_heads": 8} if family is Family.SD1 else {"num_head_channels": 64}
    unet = unet_config_from_store(unet_store, **heads)

    override = _check_prediction(prediction)
    from_yaml = yaml_parameterization(store.path) if store.path else None
    if from_yaml is not None:
        pred, source = from_yaml, "yaml"
    elif override is not None:
        pred, source = override, "override"
    elif "v_pred" in store:
        pred, source = "v", "v_pred key"
    elif family is Family.SD2:
        pred, source = None, "probe"
    else:
        pred, source = "eps", "default"
    has_vae = store.has_prefix("first_stage_model.decoder.")
    return ModelInfo(store.path, family, pred, source, unet, has_vae)
