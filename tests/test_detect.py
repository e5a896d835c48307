"""Family detection and refusals, from key layouts as the hosts' own detection reads them.

Reference for the family rules: A1111 v1.10.1 `modules/sd_models_config.py`
`guess_model_config_from_state_dict` (SDXL = conditioner.embedders.1.model.ln_final, refiner =
conditioner.embedders.0.model.ln_final, SD2 = cond_stage_model.model.transformer, 9/8 input
channels = inpainting / instruct-pix2pix) and `find_checkpoint_config_near_filename` (a .yaml
beside the checkpoint).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lib_deltasampling.errors import ModelFileError, SettingError
from lib_deltasampling.runtime.checkpoint import TensorStore, open_store
from lib_deltasampling.runtime.detect import Family, detect_model

TEXT_MARKERS = {
    "sd1": {"cond_stage_model.transformer.text_model.final_layer_norm.weight": (8,)},
    "sd2": {"cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": (24, 8),
            "cond_stage_model.model.ln_final.weight": (8,)},
    "sdxl": {"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (8,),
             "conditioner.embedders.1.model.ln_final.weight": (8,)},
    "refiner": {"conditioner.embedders.0.model.ln_final.weight": (8,)},
}


def skeleton(text: str, in_channels: int = 4, extra: dict | None = None) -> dict[str, tuple[int, ...]]:
    """The fewest UNet keys that describe one level with one res block (32 channels)."""
    u = "model.diffusion_model."
    shapes = {
        u + "input_blocks.0.0.weight": (32, in_channels, 3, 3),
        u + "input_blocks.1.0.in_layers.0.weight": (32,),
        u + "input_blocks.1.0.out_layers.3.weight": (32, 32, 3, 3),
        u + "output_blocks.0.0.in_layers.0.weight": (64,),
        u + "output_blocks.1.0.in_layers.0.weight": (64,),
        u + "out.2.weight": (4, 32, 3, 3),
    }
    shapes.update(TEXT_MARKERS.get(text, {}))
    shapes.update(extra or {})
    return shapes


def store_of(shapes: dict[str, tuple[int, ...]], path: Path | None = None) -> TensorStore:
    return TensorStore.from_dict({k: torch.zeros(s) for k, s in shapes.items()}, path=path)


def write(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    save_file({k: torch.zeros(s) for k, s in shapes.items()}, str(path))
    return path


@pytest.mark.parametrize("text, family", [("sd1", Family.SD1), ("sd2", Family.SD2), ("sdxl", Family.SDXL)])
def test_family_from_text_encoder_layout(text, family):
    info = detect_model(store_of(skeleton(text)))
    assert info.family is family
    assert info.unet.model_channels == 32 and info.unet.channel_mult == (1,) and info.unet.num_res_blocks == (1,)


def test_heads_rule_per_family():
    assert detect_model(store_of(skeleton("sd1"))).unet.num_heads == 8
    for text in ("sd2", "sdxl"):
        cfg = detect_model(store_of(skeleton(text))).unet
        assert cfg.num_head_channels == 64 and cfg.num_heads is None


@pytest.mark.parametrize("shapes, words", [
    (skeleton("refiner"), "SDXL refiner"),
    (skeleton("sd1", in_channels=9), "SD1.x inpainting"),
    (skeleton("sdxl", in_channels=9), "SDXL inpainting"),
    (skeleton("sd2", in_channels=9), "SD2.x inpainting"),
    (skeleton("sd1", in_channels=8), "instruct-pix2pix"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 32),
      "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": (32, 4)}, "LoRA"),
    ({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": (4, 32)}, "LoRA"),
    ({"lora_te1_text_model_encoder_layers_0_mlp_fc1.hada_w1_a": (4, 4)}, "LoRA/LyCORIS"),
    ({"encoder.conv_in.weight": (8, 3, 3, 3), "decoder.conv_out.weight": (3, 8, 3, 3)}, "VAE file"),
    ({"first_stage_model.encoder.conv_in.weight": (8, 3, 3, 3)}, "VAE file"),
    ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (8, 8),
      "model.diffusion_model.x_embedder.proj.weight": (8, 16, 2, 2)}, "Stable Diffusion 3"),
    ({"double_blocks.0.img_attn.qkv.weight": (8, 8)}, "Flux"),
    ({"conv_in.weight": (32, 4, 3, 3), "down_blocks.0.resnets.0.conv1.weight": (32, 32, 3, 3)}, "diffusers-format"),
    ({"string_to_param.*": (2, 768)}, "textual-inversion embedding"),
    ({"clip_l": (2, 768), "clip_g": (2, 1280)}, "textual-inversion embedding"),
    (skeleton("none"), "no text encoder"),
    ({"cond_stage_model.transformer.text_model.final_layer_norm.weight": (8,)}, "only a text encoder"),
    ({"something.else": (1,)}, "no Stable Diffusion UNet"),
])
def test_files_that_are_not_source_checkpoints_are_named(tmp_path: Path, shapes, words):
    path = write(tmp_path / "odd.safetensors", shapes)
    with pytest.raises(ModelFileError) as e:
        detect_model(open_store(path))
    assert words in str(e.value) and str(path) in str(e.value)


def test_prediction_precedence_yaml_then_override_then_marker(tmp_path: Path):
    path = write(tmp_path / "model.safetensors", skeleton("sd2"))
    # SD2 without any hint: decided by A1111's probe once the UNet is loaded
    info = detect_model(open_store(path))
    assert (info.prediction, info.prediction_source) == (None, "probe")
    assert detect_model(open_store(path), prediction="eps").prediction == "eps"
    (tmp_path / "model.yaml").write_text('model:\n  params:\n    parameterization: "v"\n    linear_start: 0.00085\n')
    info = detect_model(open_store(path), prediction="eps")
    assert (info.prediction, info.prediction_source) == ("v", "yaml")  # the yaml wins, as in the hosts
    (tmp_path / "model.yaml").write_text("model:\n  params:\n    linear_start: 0.00085\n")
    assert detect_model(open_store(path)).prediction == "eps"  # a yaml without the key means eps


def test_v_pred_marker_and_defaults():
    assert detect_model(store_of(skeleton("sdxl", extra={"v_pred": (0,)}))).prediction == "v"
    info = detect_model(store_of(skeleton("sdxl")))
    assert (info.prediction, info.prediction_source) == ("eps", "default")
    assert detect_model(store_of(skeleton("sd1"))).prediction == "eps"


def test_bad_prediction_override_names_the_setting():
    with pytest.raises(SettingError, match="prediction type.*'x0'.*'auto', 'eps' or 'v'"):
        detect_model(store_of(skeleton("sd1")), prediction="x0")
