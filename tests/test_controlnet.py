"""ControlNet loading and forward (runtime/controlnet.py) against diffusers' ControlNetModel.

The reference is independent of our names and wiring: an LDM-layout file (random weights,
real `control_model.*` names) goes through diffusers' own single-file conversion
(`convert_controlnet_checkpoint`, diffusers config from `create_unet_diffusers_config_from_ldm`
on cldm-style yaml params), and a diffusers-layout file is a random diffusers
`ControlNetModel`'s own state dict. Every model is written to a real file and read back
through `load_controlnet`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from factory_controlnet import (CONTROL_PREFIX, CONTROLNET_CONFIGS, ORIGINAL_CONTROL_PARAMS, SDXL_POOLED,
                                controlnet_shapes, ldm_controlnet_file, random_controlnet_state_dict, randomize_)
from factory_unet import SDXL_TIME_EMBED_DIM, UNET_PREFIX, heads_kwargs, random_unet_state_dict, sd2_config
from lib_deltasampling.errors import ModelFileError
from lib_deltasampling.runtime.checkpoint import TensorStore, open_safetensors_header
from lib_deltasampling.runtime.controlnet import ControlNet, detect_controlnet, load_controlnet
from lib_deltasampling.runtime.detect import Family
from lib_deltasampling.runtime.unet_config import unet_config_from_store

diffusers = pytest.importorskip("diffusers")
from diffusers import ControlNetModel  # noqa: E402
from diffusers.loaders.single_file_utils import (convert_controlnet_checkpoint,  # noqa: E402
                                                 create_unet_diffusers_config_from_ldm)
from diffusers.models.embeddings import get_timestep_embedding  # noqa: E402

ATOL = 1e-4
FAMILIES = ["sd1", "sd2", "sdxl"]


def _diffusers_config(family: str) -> dict:
    """diffusers' ControlNetModel config from the cldm yaml params, derived by diffusers itself.

    (`create_controlnet_diffusers_config_from_ldm` in diffusers 0.42.1 calls the UNet helper without
    its `checkpoint` argument, so its field selection is done here on the UNet helper's result.)
    """
    params = dict(ORIGINAL_CONTROL_PARAMS[family], out_channels=4)
    original = {"model": {"params": {"unet_config": {"params": params},
                                     "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}
    unet = create_unet_diffusers_config_from_ldm(original, {})
    fields = ("in_channels", "down_block_types", "block_out_channels", "layers_per_block", "cross_attention_dim",
              "attention_head_dim", "use_linear_projection", "class_embed_type", "addition_embed_type",
              "addition_time_embed_dim", "projection_class_embeddings_input_dim", "transformer_layers_per_block")
    config = {k: unet[k] for k in fields}
    config["conditioning_channels"] = params["hint_channels"]
    return config


def _reference_from_ldm(family: str, ckpt: dict[str, torch.Tensor]) -> tuple[ControlNetModel, dict[str, torch.Tensor]]:
    config = _diffusers_config(family)
    converted = convert_controlnet_checkpoint(ckpt, config)
    if family == "sdxl":
        # diffusers' single-file ControlNet map has no SDXL add_embedding (label_emb) entries.
        for ldm, ours in (("label_emb.0.0", "add_embedding.linear_1"), ("label_emb.0.2", "add_embedding.linear_2")):
            for p in ("weight", "bias"):
                converted[f"{ours}.{p}"] = ckpt[f"{CONTROL_PREFIX}{ldm}.{p}"]
    model = ControlNetModel(**config)
    model.load_state_dict(converted, strict=True)
    return model.eval(), converted


def _inputs(family: str, height: int, width: int, seed: int = 2) -> dict:
    """x, hint at pixel size, fractional timesteps, context and (SDXL) y + diffusers' added_cond_kwargs."""
    config = CONTROLNET_CONFIGS[family]
    gen = torch.Generator().manual_seed(seed)
    inputs = dict(x=torch.randn(2, 4, height, width, generator=gen),
                  hint=torch.rand(2, 3, 8 * height, 8 * width, generator=gen),
                  t=torch.tensor([999.0, 321.75]),
                  context=torch.randn(2, 7, config.context_dim, generator=gen), y=None, added={})
    if family == "sdxl":
        pooled = torch.randn(2, SDXL_POOLED, generator=gen)
        time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [832, 1216, 16.5, 8, 1024, 1024]])
        inputs["added"] = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
        # sgm's vector conditioning, built with diffusers' own sinusoid: pooled, then each id embedded.
        ids = get_timestep_embedding(time_ids.flatten(), SDXL_TIME_EMBED_DIM, flip_sin_to_cos=True,
                                     downscale_freq_shift=0).reshape(2, -1)
        inputs["y"] = torch.cat([pooled, ids], dim=-1)
    return inputs


def _compare(ours: ControlNet, ref: ControlNetModel, family: str, sizes=((16, 16), (10, 14))) -> None:
    for height, width in sizes:  # 10x14: sides not multiples of 4
        i = _inputs(family, height, width)
        with torch.no_grad():
            got = ours(i["x"], i["hint"], i["t"], i["context"], i["y"])
            down, mid = ref(i["x"], i["t"], i["context"], i["hint"], conditioning_scale=1.0, guess_mode=False,
                            return_dict=False, **i["added"])
        want = [*down, mid]
        assert len(got) == len(want) == len(ours.input_blocks) + 1
        for n, (g, w) in enumerate(zip(got, want)):
            assert g.shape == w.shape and g.dtype == torch.float32
            assert w.abs().mean() > 0.05, f"residual {n} carries no signal"
            diff = (g - w).abs().max().item()
            assert diff <= ATOL, f"{family} {height}x{width} residual {n}: max abs diff {diff}"


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    else:
        torch.save(tensors, path)
    return path


# ---------------------------------------------------------------------------- against diffusers

@pytest.mark.parametrize("family, suffix", [("sd1", ".pth"), ("sd2", ".safetensors"), ("sdxl", ".safetensors")])
def test_ldm_layout_matches_diffusers(family: str, suffix: str, tmp_path: Path):
    config = CONTROLNET_CONFIGS[family]
    ckpt = ldm_controlnet_file(config, seed=1)
    loaded = load_controlnet(_save(tmp_path / f"control_{family}{suffix}", ckpt))
    info = loaded.info
    assert (info.family, info.layout, info.unet, info.hint_channels) == (Family(family), "ldm", config, 3)
    ref, converted = _reference_from_ldm(family, ckpt)
    _compare(loaded.model, ref, family)

    # The same weights as diffusers names them load to the very same tensors (the name map, both ways).
    again = load_controlnet(_save(tmp_path / "diffusion_pytorch_model.safetensors", converted))
    assert again.info.layout == "diffusers" and again.info.unet == config
    theirs = again.model.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in loaded.model.state_dict().items())


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_layout_matches_diffusers(family: str, tmp_path: Path):
    torch.manual_seed(0)
    ref = randomize_(ControlNetModel(**_diffusers_config(family)), seed=3).eval()
    loaded = load_controlnet(_save(tmp_path / "diffusion_pytorch_model.safetensors", ref.state_dict()))
    info = loaded.info
    assert (info.family, info.layout, info.unet, info.hint_channels) == (
        Family(family), "diffusers", CONTROLNET_CONFIGS[family], 3)
    _compare(loaded.model, ref, family, sizes=((16, 16),))


def test_diffusers_keys_are_renamed_not_copied(tmp_path: Path):
    ref = ControlNetModel(**_diffusers_config("sd2"))
    sd = dict(ref.state_dict())
    path = _save(tmp_path / "diffusion_pytorch_model.safetensors", sd)
    # detection reads the header only
    assert detect_controlnet(open_safetensors_header(path)).layout == "diffusers"
    # an fp32 CPU load from memory keeps the very tensors: the view renames, it does not copy
    loaded = load_controlnet(TensorStore.from_dict(sd))
    ours = loaded.model.state_dict()
    assert ours["zero_convs.2.0.weight"].data_ptr() == sd["controlnet_down_blocks.2.weight"].data_ptr()
    assert ours["input_blocks.1.0.in_layers.0.weight"].data_ptr() == sd["down_blocks.0.resnets.0.norm1.weight"].data_ptr()


# ---------------------------------------------------------------------------- layouts and detection

@pytest.fixture(scope="module")
def sd1_weights() -> dict[str, torch.Tensor]:
    return random_controlnet_state_dict(CONTROLNET_CONFIGS["sd1"], seed=5)


def _run(model: ControlNet, hint: torch.Tensor, batch: int = 2) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(batch, 4, 8, 8, generator=gen)
    ctx = torch.randn(batch, 3, model.config.context_dim, generator=gen)
    with torch.no_grad():
        return model(x, hint, torch.tensor([500.0]), ctx)


def test_checkpoint_extra_keys_and_unprefixed_keys(sd1_weights, tmp_path: Path):
    """Old full files hold a whole SD checkpoint beside control_model.*; pruned ones drop the prefix."""
    full = {CONTROL_PREFIX + k: v for k, v in sd1_weights.items()}
    full.update({UNET_PREFIX + "input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3),
                 UNET_PREFIX + "out.2.weight": torch.zeros(4, 32, 3, 3),
                 "first_stage_model.decoder.conv_out.weight": torch.zeros(3, 8, 3, 3),
                 "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(8)})
    a = load_controlnet(_save(tmp_path / "control_sd15_full.pth", full))
    b = load_controlnet(_save(tmp_path / "pruned.safetensors", sd1_weights))
    assert a.info.unet == b.info.unet == CONTROLNET_CONFIGS["sd1"] and a.info.layout == b.info.layout == "ldm"
    hint = torch.rand(2, 3, 64, 64)
    for x, y in zip(_run(a.model, hint), _run(b.model, hint)):
        assert torch.equal(x, y)


def test_hint_batch_broadcast_and_four_channel_hint(tmp_path: Path):
    config = CONTROLNET_CONFIGS["sd1"]
    loaded = load_controlnet(_save(tmp_path / "inpaint.safetensors", ldm_controlnet_file(config, hint_channels=4)))
    assert loaded.info.hint_channels == 4  # inpainting ControlNets: RGB + mask
    one = torch.rand(1, 4, 64, 64)
    full = _run(loaded.model, one.repeat(2, 1, 1, 1))
    for hint in (one, one.expand(2, -1, -1, -1)):  # a 1-row hint, and one expanded over the batch
        for got, want in zip(_run(loaded.model, hint), full):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="8x"):
        _run(loaded.model, torch.rand(2, 4, 32, 32))
    with pytest.raises(ValueError, match="hint must be"):
        _run(loaded.model, torch.rand(2, 3, 64, 64))
    with pytest.raises(ValueError, match="context"):
        loaded.model(torch.randn(1, 4, 8, 8), one, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="y "):
        loaded.model(torch.randn(1, 4, 8, 8), one, torch.tensor([1.0]), torch.randn(1, 3, 768), torch.randn(1, 8))


def test_bfloat16_weights_compute_in_bfloat16(sd1_weights):
    store = TensorStore.from_dict({CONTROL_PREFIX + k: v for k, v in sd1_weights.items()})
    full, half = load_controlnet(store), load_controlnet(store, dtype=torch.bfloat16)
    hint = torch.rand(2, 3, 64, 64)
    for a, b in zip(_run(full.model, hint), _run(half.model, hint)):
        assert b.dtype == torch.bfloat16
        assert (a - b.float()).abs().max() < 0.1 * a.abs().max()
    assert half.nbytes() * 2 == full.nbytes() > 0
    half.release()
    assert half.released and half.nbytes() == 0


def test_encoder_only_config_of_a_unet():
    """unet_config_from_store(encoder_only=True) reads a UNet's encoder as it reads a ControlNet's."""
    config = sd2_config()
    store = TensorStore.from_dict(random_unet_state_dict(config, seed=1))
    assert unet_config_from_store(store, encoder_only=True, **heads_kwargs(config)) == config.encoder()
    assert unet_config_from_store(store, **heads_kwargs(config)) == config  # the full derivation is unchanged


def test_state_dict_names_are_cldm_names():
    names = set(controlnet_shapes(CONTROLNET_CONFIGS["sdxl"]))
    # 1 res block per level: input blocks conv_in, res, down, res, down, res (0-5)
    assert {"input_hint_block.0.weight", "input_hint_block.14.bias", "zero_convs.0.0.weight", "zero_convs.5.0.bias",
            "middle_block_out.0.weight", "label_emb.0.2.weight", "input_blocks.2.0.op.weight",
            "input_blocks.5.1.transformer_blocks.1.attn2.to_k.weight", "middle_block.2.out_layers.3.weight"} <= names
    assert not any(k.startswith(("zero_convs.6", "input_blocks.6", "output_blocks", "out.")) for k in names)


# ---------------------------------------------------------------------------- refusals

def _t(*shape: int) -> torch.Tensor:
    return torch.zeros(shape or (1,))


def _controlnet_keys() -> dict[str, torch.Tensor]:
    return {"input_hint_block.0.weight": _t(16, 3, 3, 3), "zero_convs.0.0.weight": _t(32, 32, 1, 1),
            "input_blocks.0.0.weight": _t(32, 4, 3, 3)}


REFUSED = {
    "lora": ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": _t(4, 32),
              "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": _t(32, 4),
              "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": _t()}, "LoRA/LyCORIS"),
    "lycoris": ({"lycoris_down_blocks_0_attentions_0_proj_in.hada_w1_a": _t(4, 4)}, "LoRA/LyCORIS"),
    "control_lora": ({**_controlnet_keys(), "lora_controlnet": _t()}, "Control-LoRA"),
    "control_lora_pairs": ({**_controlnet_keys(), "input_blocks.1.0.in_layers.2.up": _t(32, 8),
                            "input_blocks.1.0.in_layers.2.down": _t(8, 288)}, "Control-LoRA"),
    "t2i_diffusers": ({"adapter.conv_in.weight": _t(8, 192, 3, 3),
                       "adapter.body.0.resnets.0.block1.weight": _t(8, 8, 3, 3)}, "T2I-Adapter"),
    "t2i_tencent": ({"conv_in.weight": _t(8, 192, 3, 3), "body.0.block1.weight": _t(8, 8, 3, 3)}, "T2I-Adapter"),
    "t2i_light": ({"body.0.in_conv.weight": _t(8, 192, 1, 1)}, "T2I-Adapter"),
    "t2i_style": ({"style_embedding": _t(1, 8, 16), "transformer_layes.0.attn.in_proj_weight": _t(48, 16)},
                  "T2I-Adapter style"),
    "lllite": ({"lllite_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.conditioning1.0.weight": _t(4, 3, 4, 4)},
               "ControlNet-LLLite"),
    "ip_adapter": ({"image_proj.proj.weight": _t(16, 8), "ip_adapter.1.to_k_ip.weight": _t(8, 16)}, "IP-Adapter"),
    "union": ({"controlnet_cond_embedding.conv_in.weight": _t(16, 3, 3, 3), "controlnet_down_blocks.0.weight": _t(8, 8, 1, 1),
               "task_embedding": _t(8, 32), "control_add_embedding.linear_1.weight": _t(32, 16)}, "ControlNet-Union"),
    "promax_ldm": ({**{CONTROL_PREFIX + k: v for k, v in _controlnet_keys().items()},
                    CONTROL_PREFIX + "transformer_layes.0.attn.in_proj_weight": _t(48, 16)}, "ControlNet-Union"),
    "checkpoint": ({UNET_PREFIX + "input_blocks.0.0.weight": _t(32, 4, 3, 3), UNET_PREFIX + "out.2.weight": _t(4, 32, 3, 3),
                    "cond_stage_model.transformer.text_model.final_layer_norm.weight": _t(8)}, "Stable Diffusion checkpoint"),
    "vae": ({"encoder.conv_in.weight": _t(8, 3, 3, 3), "decoder.conv_out.weight": _t(3, 8, 3, 3)}, "VAE"),
    "diffusers_unet": ({"conv_in.weight": _t(32, 4, 3, 3), "down_blocks.0.resnets.0.conv1.weight": _t(32, 32, 3, 3),
                        "up_blocks.0.resnets.0.conv1.weight": _t(32, 64, 3, 3)}, "diffusers-format UNet"),
    "other": ({"foo.weight": _t(3)}, "no ControlNet weights found"),
}


@pytest.mark.parametrize("kind", list(REFUSED))
def test_other_files_are_refused_saying_what_they_are(kind: str, tmp_path: Path):
    tensors, words = REFUSED[kind]
    path = _save(tmp_path / f"{kind}.safetensors", tensors)
    with pytest.raises(ModelFileError) as e:
        load_controlnet(path)
    assert str(path) in str(e.value) and words in str(e.value)


@pytest.mark.parametrize("change, words", [
    (dict(context_dim=512), "cross-attention width 512"),
    (dict(context_dim=2048), "has no label_emb"),
])
def test_unknown_family_is_refused(change: dict, words: str):
    import dataclasses
    config = dataclasses.replace(CONTROLNET_CONFIGS["sd1"], **change)
    store = TensorStore.from_dict(random_controlnet_state_dict(config))
    with pytest.raises(ModelFileError, match=words):
        detect_controlnet(store)


def test_damaged_files_are_named(sd1_weights, tmp_path: Path):
    path = _save(tmp_path / "cut.safetensors", sd1_weights)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError) as e:
        load_controlnet(path)
    assert str(path) in str(e.value)

    pth = _save(tmp_path / "cut.pth", sd1_weights)
    pth.write_bytes(pth.read_bytes()[:4096])
    with pytest.raises(ModelFileError) as e:
        load_controlnet(pth)
    assert str(pth) in str(e.value)

    missing = {k: v for k, v in sd1_weights.items() if k != "zero_convs.3.0.bias"}
    with pytest.raises(ModelFileError, match="missing ControlNet weights") as e:
        load_controlnet(_save(tmp_path / "missing.safetensors", missing))
    assert "zero_convs.3.0.bias" in str(e.value)


def test_diffusers_layout_with_unknown_keys_is_refused_by_name(tmp_path: Path):
    ref = ControlNetModel(**_diffusers_config("sd2"))
    sd = dict(ref.state_dict())
    sd["class_embedding.linear_1.weight"] = _t(4, 4)
    with pytest.raises(ModelFileError, match="unexpected ControlNet weights") as e:
        load_controlnet(_save(tmp_path / "diffusion_pytorch_model.safetensors", sd))
    assert "class_embedding.linear_1.weight" in str(e.value)
