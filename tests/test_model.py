"""The loaded source model as a whole: file -> detection -> UNet + text -> denoised latent.

End-to-end reference for SD1: transformers' CLIPTextModel for the text, diffusers'
UNet2DConditionModel (converted by diffusers from the same file) for the network, and
diffusers' EulerDiscreteScheduler for sigma -> timestep and the input scaling.
"""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest
import torch

import factories
from references import hf_clip_l
from lib_deltasampling.errors import ModelFileError
from lib_deltasampling.runtime.checkpoint import open_store
from lib_deltasampling.runtime.detect import Family
from lib_deltasampling.runtime.model import load_model
from lib_deltasampling.runtime.placement import Placement

CPU32 = Placement(torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ckpt")
    return {f: factories.write_checkpoint(d / f"{f}.safetensors", f, seed=3) for f in factories.FAMILIES}


@pytest.mark.parametrize("family", factories.FAMILIES)
def test_each_family_loads_and_predicts(files, tokenizer, family):
    model = load_model(files[family], placement=CPU32, tokenizer=tokenizer, prediction="eps")
    assert model.family is Family(family)
    assert model.info.unet == factories.unet_config(family)
    assert model.latent_scale == (0.13025 if family == "sdxl" else 0.18215)
    cond = model.encode(["a (red:1.2) cat", "a dog"], width=64, height=48)
    assert cond["context"].shape[:2] == (2, 77)
    if family == "sdxl":
        assert cond["y"].shape == (2, model.info.unet.adm_in_channels)
    x = torch.randn(2, 4, 6, 8)
    x0 = model.denoise(x, torch.tensor([14.6, 0.5]), cond)
    assert x0.shape == x.shape and torch.isfinite(x0).all()


def test_sd1_end_to_end_matches_transformers_and_diffusers(files, tokenizer):
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    model = load_model(files["sd1"], placement=CPU32, tokenizer=tokenizer, prediction="eps")
    tensors = factories.checkpoint_tensors("sd1", seed=3)
    cfg = factories.unet_config("sd1")

    # text: HF CLIPTextModel on the same weights; ids built by hand the A1111 way (BOS, tokens, EOS, EOS-padding)
    text_ref = hf_clip_l(tensors, "cond_stage_model.transformer.")
    prompt = "a photo of a cat"
    ids = [tokenizer.bos_id] + tokenizer.encode(prompt) + [tokenizer.eos_id]
    ids += [tokenizer.eos_id] * (77 - len(ids))

    # UNet: diffusers' own conversion of the same file
    original = {"model": {"params": {
        "unet_config": {"params": dict(in_channels=4, out_channels=4, model_channels=cfg.model_channels,
                                       attention_resolutions=[1, 2], num_res_blocks=2, channel_mult=list(cfg.channel_mult),
                                       num_heads=8, transformer_depth=1, context_dim=cfg.context_dim,
                                       use_linear_in_transformer=False)},
        "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}
    unet_tensors = {k: v for k, v in tensors.items() if k.startswith("model.diffusion_model.")}
    unet_ref = UNet2DConditionModel(**create_unet_diffusers_config_from_ldm(original, unet_tensors)).eval()
    unet_ref.load_state_dict(convert_ldm_unet_checkpoint(unet_tensors, unet_ref.config), strict=True)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    sched.set_timesteps(7)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    cond = model.encode([prompt], width=64, height=64)
    with torch.no_grad():
        context = text_ref(torch.tensor([ids])).last_hidden_state
        assert (cond["context"] - context).abs().max() <= 1e-4
        for i in (0, 3, 6):
            sigma = sched.sigmas[i]
            sched._step_index = i  # so scale_model_input uses this sigma
            eps = unet_ref(sched.scale_model_input(x, sched.timesteps[i]), sched.timesteps[i],
                           encoder_hidden_states=context).sample
            want = x - sigma * eps
            got = model.denoise(x, sigma.reshape(1), cond)
            assert want.abs().mean() > 0.1
            assert (got - want).abs().max() <= 1e-4, f"step {i}"


def _constant_output_overrides(family: str, value: float) -> dict[str, torch.Tensor]:
    """Make the UNet output `value` everywhere: zero final conv weights, constant bias."""
    out_w = factories.checkpoint_tensors(family)["model.diffusion_model.out.2.weight"]
    return {"model.diffusion_model.out.2.weight": torch.zeros_like(out_w),
            "model.diffusion_model.out.2.bias": torch.full((out_w.shape[0],), value)}


@pytest.mark.parametrize("bias, expected", [(-3.0, "v"), (0.2, "eps")])
def test_sd2_probe_decides_v_as_a1111_does(tmp_path, tokenizer, bias, expected):
    # A1111: v if mean(unet(0.5, t=999) - 0.5) < -1. Output -3 -> -3.5 (v); 0.2 -> -0.3 (eps).
    path = factories.write_checkpoint(tmp_path / "sd2.safetensors", "sd2", overrides=_constant_output_overrides("sd2", bias))
    model = load_model(path, placement=CPU32, tokenizer=tokenizer)
    assert (model.prediction, model.info.prediction_source) == (expected, "probe")
    # and the yaml beside the file wins over the probe, as in the hosts
    (tmp_path / "sd2.yaml").write_text("model:\n  params:\n    parameterization: \"v\"\n")
    assert load_model(path, placement=CPU32, tokenizer=tokenizer).prediction == "v"


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16, torch.float8_e4m3fn])
def test_low_precision_files_load_into_the_compute_dtype(tmp_path, tokenizer, stored):
    path = factories.write_checkpoint(tmp_path / "m.safetensors", "sd1", dtype=stored)
    model = load_model(path, placement=CPU32, tokenizer=tokenizer)
    assert {p.dtype for p in model.unet.parameters()} == {torch.float32}
    store = open_store(path)
    key = "input_blocks.1.0.in_layers.2.weight"
    want = store.tensor("model.diffusion_model." + key).float()  # the stored value, exactly upcast
    assert torch.equal(model.unet.state_dict()[key], want)


def test_release_frees_every_weight(files, tokenizer):
    model = load_model(files["sdxl"], placement=CPU32, tokenizer=tokenizer)
    assert model.nbytes() > 1_000_000
    probe = weakref.ref(next(model.unet.parameters()))
    held = model.text.encoders[1].model.ln_final.weight  # a stray reference elsewhere
    model.release()
    gc.collect()
    assert probe() is None
    assert model.nbytes() == 0 and held.untyped_storage().nbytes() == 0
    model.release()  # twice is harmless


def test_to_moves_and_casts(files, tokenizer):
    model = load_model(files["sd1"], placement=CPU32, tokenizer=tokenizer)
    model.to(Placement(torch.device("cpu"), torch.bfloat16))
    assert {p.dtype for m in model.modules() for p in m.parameters()} == {torch.bfloat16}
    cond = model.encode(["x"], width=64, height=64)
    assert cond["context"].dtype == torch.bfloat16
    x0 = model.denoise(torch.randn(1, 4, 8, 8), torch.tensor([1.0]), cond)
    assert x0.dtype == torch.float32  # x0 keeps the caller's dtype


def test_wrong_files_fail_before_anything_loads(tmp_path, tokenizer):
    lora = tmp_path / "style.safetensors"
    from safetensors.torch import save_file
    save_file({"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)}, str(lora))
    with pytest.raises(ModelFileError, match="style.safetensors: this is a LoRA"):
        load_model(lora, placement=CPU32, tokenizer=tokenizer)
    broken = tmp_path / "broken.safetensors"
    tensors = factories.checkpoint_tensors("sd1")
    del tensors["model.diffusion_model.middle_block.1.proj_in.weight"]
    from safetensors.torch import save_file as save
    save(tensors, str(broken))
    with pytest.raises(ModelFileError, match=r"broken.safetensors: 1 missing UNet weights \(middle_block.1.proj_in.weight\)"):
        load_model(broken, placement=CPU32, tokenizer=tokenizer)
