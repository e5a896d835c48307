"""The runtime UNet against diffusers' UNet2DConditionModel on the same LDM checkpoint.

The reference is independent of our key layout and module structure: the single-file
checkpoint (random weights, real `model.diffusion_model.*` names) goes through
diffusers' own conversion (`convert_ldm_unet_checkpoint`), with the diffusers config
derived by diffusers (`create_unet_diffusers_config_from_ldm`) from an ldm/sgm-style
original-config dict written here like the families' yaml files. If our names or
wiring differed from what the checkpoints mean, the converted model would not load
strictly or its output would differ.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from factory_unet import (CONFIGS, SDXL_TIME_EMBED_DIM, UNET_PREFIX, heads_kwargs, ldm_checkpoint,
                          random_unet_state_dict, sd2_config, sdxl_config)
from lib_deltasampling.errors import ModelFileError
from lib_deltasampling.runtime.checkpoint import TensorStore, open_store
from lib_deltasampling.runtime.unet import UNetModel, check_unet_config, load_unet, timestep_embedding
from lib_deltasampling.runtime.unet_config import unet_config_from_store

diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint,  # noqa: E402
                                                 create_unet_diffusers_config_from_ldm)
from diffusers.models.embeddings import get_timestep_embedding  # noqa: E402

ATOL = 1e-4

# The `unet_config.params` / `network_config.params` of each family's yaml, shrunk like
# the factory configs (v1-inference.yaml, v2-inference-v.yaml, sd_xl_base.yaml).
ORIGINAL_UNET_PARAMS = {
    "sd1": dict(in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1, 2],
                num_res_blocks=2, channel_mult=[1, 2, 2], num_heads=8, transformer_depth=1,
                context_dim=40, use_linear_in_transformer=False),
    "sd2": dict(in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1, 2],
                num_res_blocks=1, channel_mult=[1, 2, 2], num_head_channels=16, transformer_depth=1,
                context_dim=48, use_linear_in_transformer=True),
    "sdxl": dict(in_channels=4, out_channels=4, model_channels=64, attention_resolutions=[2, 4],
                 num_res_blocks=2, channel_mult=[1, 2, 2], num_head_channels=64, transformer_depth=[0, 1, 2],
                 context_dim=48, use_linear_in_transformer=True, num_classes="sequential",
                 adm_in_channels=32 + 6 * 256),
}


def _diffusers_unet(family: str, ckpt: dict[str, torch.Tensor]) -> UNet2DConditionModel:
    original = {"model": {"params": {
        "unet_config": {"params": ORIGINAL_UNET_PARAMS[family]},
        "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}},
    }}}
    config = create_unet_diffusers_config_from_ldm(original, ckpt)
    if family == "sdxl":
        # diffusers recognises SDXL by context_dim 2048/1280; the tiny one has 48, so name
        # SDXL's "text_time" added conditioning explicitly.
        assert config["projection_class_embeddings_input_dim"] == 32 + 6 * 256
        config.update(class_embed_type=None, addition_embed_type="text_time",
                      addition_time_embed_dim=SDXL_TIME_EMBED_DIM)
    unet = UNet2DConditionModel(**config)
    converted = convert_ldm_unet_checkpoint(ckpt, unet.config)
    unet.load_state_dict(converted, strict=True)
    return unet.eval()


def _norms(model: torch.nn.Module) -> list[tuple]:
    """(kind, width, eps) of every GroupNorm/LayerNorm, sorted: the same multiset in both nets."""
    found = []
    for m in model.modules():
        if isinstance(m, torch.nn.GroupNorm):
            found.append(("group", m.num_groups, m.num_channels, m.eps, m.affine))
        elif isinstance(m, torch.nn.LayerNorm):
            found.append(("layer", 0, tuple(m.normalized_shape), m.eps, m.elementwise_affine))
    return sorted(found, key=repr)


def _write(tmp_path: Path, ckpt: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / "tiny.safetensors"
    save_file(ckpt, str(path))
    return path


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_unet_matches_diffusers(family: str, tmp_path: Path):
    config = CONFIGS[family]()
    ckpt = ldm_checkpoint(config, seed=1)
    store = open_store(_write(tmp_path, ckpt)).sub(UNET_PREFIX)

    derived = unet_config_from_store(store, **heads_kwargs(config))
    assert derived == config
    ours = load_unet(store, derived, device="cpu", dtype=torch.float32)
    ref = _diffusers_unet(family, ckpt)
    # eps differences (1e-5 vs 1e-6) hide in O(1) activations, so compare the norms directly
    assert _norms(ours) == _norms(ref)

    gen = torch.Generator().manual_seed(2)
    for height, width in [(16, 16), (10, 14)]:  # 10x14: sides not multiples of 4 (skip-size upsampling)
        x = torch.randn(2, 4, height, width, generator=gen)
        t = torch.tensor([999.0, 321.75])  # fractional timesteps are allowed
        ctx = torch.randn(2, 7, config.context_dim, generator=gen)
        kwargs, y = {}, None
        if family == "sdxl":
            pooled = torch.randn(2, 32, generator=gen)
            time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [832, 1216, 16.5, 8, 1024, 1024]])
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
            # sgm's vector conditioning, built with diffusers' own sinusoid: pooled, then each id embedded.
            ids = get_timestep_embedding(time_ids.flatten(), SDXL_TIME_EMBED_DIM, flip_sin_to_cos=True,
                                         downscale_freq_shift=0).reshape(2, -1)
            y = torch.cat([pooled, ids], dim=-1)
        with torch.no_grad():
            want = ref(x, t, encoder_hidden_states=ctx, **kwargs).sample
            got = ours(x, t, ctx, y)
        assert got.shape == want.shape == x.shape
        assert want.abs().mean() > 0.1  # a real signal, not a near-zero output that matches anything
        diff = (got - want).abs().max().item()
        assert diff <= ATOL, f"{family} {height}x{width}: max abs diff {diff}"


def test_timestep_embedding_matches_diffusers_and_formula():
    t = torch.tensor([0.0, 1.0, 17.25, 999.0, 1024.0])
    for dim in (256, 320, 7):
        ours = timestep_embedding(t, dim)
        ref = get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    # by hand, in float64: [cos(t f_i), sin(t f_i)], f_i = 10000^(-i/half)
    half = 160
    f = 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
    args = t.double()[:, None] * f[None]
    hand = torch.cat([args.cos(), args.sin()], dim=-1)
    torch.testing.assert_close(timestep_embedding(t, 320).double(), hand, rtol=0, atol=2e-4)


def test_bfloat16_forward_stays_close_to_float32():
    """Half-precision path (norms without upcast) runs and tracks float32 within bf16 precision."""
    config = sd2_config()
    sd = random_unet_state_dict(config, seed=3)
    store = TensorStore.from_dict(sd)
    full = load_unet(store, config, dtype=torch.float32)
    half = load_unet(store, config, dtype=torch.bfloat16)
    x, t, ctx = torch.randn(1, 4, 16, 16), torch.tensor([500.0]), torch.randn(1, 7, config.context_dim)
    with torch.no_grad():
        a, b = full(x, t, ctx), half(x, t, ctx)
    assert b.dtype == torch.float32  # returned in the input's dtype
    assert (a - b).abs().max() < 0.1 * a.abs().max()


def test_builds_on_meta_with_dtype_and_device():
    model = UNetModel(sdxl_config(), dtype=torch.float16, device="meta")
    assert all(p.is_meta and p.dtype == torch.float16 for p in model.parameters())
    names = set(model.state_dict())
    # a few names exactly as in an SDXL single-file checkpoint
    assert {"label_emb.0.0.weight", "input_blocks.4.1.transformer_blocks.0.ff.net.0.proj.weight",
            "middle_block.1.transformer_blocks.1.attn2.to_out.0.bias", "output_blocks.2.2.conv.weight", "output_blocks.5.2.conv.weight",
            "input_blocks.3.0.op.weight", "input_blocks.4.0.skip_connection.weight", "out.2.weight"} <= names
    assert not any(k.startswith("input_blocks.1.1") for k in names)  # no attention at level 0


# ---------------------------------------------------------------------------- refusals

def test_forward_refuses_missing_conditioning():
    model = load_unet(TensorStore.from_dict(random_unet_state_dict(sdxl_config(), seed=5)), sdxl_config())
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([1.0]), torch.randn(1, 3, 48)
    with pytest.raises(ValueError, match="y "):
        model(x, t, ctx)
    with pytest.raises(ValueError, match="context"):
        model(x, t, None, torch.randn(1, 32 + 6 * 256))

@pytest.fixture(scope="module")
def sd2_weights() -> dict[str, torch.Tensor]:
    return ldm_checkpoint(sd2_config(), seed=4)


def _load(ckpt: dict[str, torch.Tensor]):
    return load_unet(TensorStore.from_dict(ckpt).sub(UNET_PREFIX), sd2_config())


def test_missing_key_is_named(sd2_weights):
    key = UNET_PREFIX + "middle_block.1.transformer_blocks.0.attn2.to_k.weight"
    ckpt = {k: v for k, v in sd2_weights.items() if k != key}
    with pytest.raises(ModelFileError, match="missing") as e:
        _load(ckpt)
    assert "middle_block.1.transformer_blocks.0.attn2.to_k.weight" in str(e.value)


def test_unexpected_key_is_named(sd2_weights):
    ckpt = dict(sd2_weights)
    ckpt[UNET_PREFIX + "output_blocks.1.1.transformer_blocks.0.attn1.to_q.bias"] = torch.zeros(32)
    with pytest.raises(ModelFileError, match="unexpected") as e:
        _load(ckpt)
    assert "output_blocks.1.1.transformer_blocks.0.attn1.to_q.bias" in str(e.value)


def test_wrong_shape_is_named(sd2_weights):
    ckpt = dict(sd2_weights)
    ckpt[UNET_PREFIX + "input_blocks.1.0.emb_layers.1.weight"] = torch.zeros(32, 64)
    with pytest.raises(ModelFileError, match="shape") as e:
        _load(ckpt)
    assert UNET_PREFIX + "input_blocks.1.0.emb_layers.1.weight" in str(e.value)


@pytest.mark.parametrize("change, words", [
    (dict(model_channels=48), "GroupNorm"),
    (dict(num_head_channels=None, num_heads=None), "num_heads or num_head_channels"),
    (dict(num_head_channels=24), "divisible"),
    (dict(num_head_channels=-16), "positive"),
    (dict(transformer_depth=(1, 1)), "transformer_depth"),
    (dict(transformer_depth_output=(0, 0, 1)), "transformer_depth_output"),
    (dict(num_res_blocks=(1, 1)), "num_res_blocks"),
    (dict(context_dim=0), "context_dim"),
])
def test_impossible_configs_are_refused(change, words):
    config = dataclasses.replace(sd2_config(), **change)
    with pytest.raises(ValueError, match=words):
        check_unet_config(config)
    with pytest.raises(ModelFileError, match="unsupported UNet layout"):
        load_unet(TensorStore.from_dict({}), config)
