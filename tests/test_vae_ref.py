"""The runtime VAE decoder against diffusers' AutoencoderKL on the same LDM weights.

The reference is independent of our module: the tiny VAE (real `first_stage_model.*` key layout,
written by tests/factories.py from ldm's Encoder/Decoder definition) goes through diffusers' own
`convert_ldm_vae_checkpoint` into an `AutoencoderKL` built from a diffusers config for the same
shapes, loaded strictly (encoder included, so the factory's layout is checked too). If our names
or wiring differed from what the checkpoints mean, the outputs would differ.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import factories as f
from lib_deltasampling.errors import ModelFileError, SettingError
from lib_deltasampling.runtime.checkpoint import TensorStore, open_store
from lib_deltasampling.runtime.detect import detect_model
from lib_deltasampling.runtime.loading import meta_init
from lib_deltasampling.runtime.vae import (VaeConfig, VaeDecoder, load_vae_decoder, open_vae, to_uint8_images,
                                           vae_config_from_store)

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL  # noqa: E402
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint  # noqa: E402

ATOL = 1e-4
SD_LATENT_SCALE, SDXL_LATENT_SCALE = 0.18215, 0.13025


def diffusers_config(ch: int = 32, ch_mult=(1, 2, 2), num_res_blocks: int = 1) -> dict:
    levels = len(ch_mult)
    return dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
                up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=tuple(ch * m for m in ch_mult),
                layers_per_block=num_res_blocks, act_fn="silu", latent_channels=4, norm_num_groups=32,
                sample_size=32)


def reference_vae(ldm_state: dict[str, torch.Tensor]) -> AutoencoderKL:
    """diffusers' AutoencoderKL from LDM keys (with or without `first_stage_model.`), strictly loaded."""
    config = diffusers_config(**{k: f.VAE_TINY[k] for k in ("ch", "ch_mult", "num_res_blocks")})
    state = {k: v.float() for k, v in ldm_state.items()}
    converted = convert_ldm_vae_checkpoint(state, config)
    model = AutoencoderKL(**config).eval()
    model.load_state_dict(converted, strict=True)
    return model


def latents(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def reference_decode(ref: AutoencoderKL, z: torch.Tensor) -> torch.Tensor:
    return ref.decode(z).sample


# ---------------------------------------------------------------------------- parity

@pytest.mark.parametrize("linear_attention", [False, True], ids=["conv-attn", "linear-attn"])
@pytest.mark.parametrize("source", ["checkpoint", "vae-file", "vae-file-prefixed", "vae-ckpt"])
def test_decoder_matches_diffusers(tmp_path: Path, source: str, linear_attention: bool) -> None:
    if source == "checkpoint":
        overrides = {f.VAE_PREFIX + k: v for k, v in f.vae_tensors(5, linear_attention=linear_attention).items()}
        path = f.write_checkpoint(tmp_path / "model.safetensors", "sd1", vae=True, overrides=overrides)
        store = open_store(path)
    else:
        name = {"vae-file": "vae.safetensors", "vae-file-prefixed": "vae.safetensors", "vae-ckpt": "vae.ckpt"}[source]
        extra = {"loss.logvar": torch.zeros(()), "model_ema.decay": torch.tensor(0.999)} if source == "vae-ckpt" else None
        prefix = f.VAE_PREFIX if source == "vae-file-prefixed" else ""
        path = f.write_vae_file(tmp_path / name, seed=5, linear_attention=linear_attention, prefix=prefix, extra=extra)
        store = open_vae(path)
    ref = reference_vae(f.vae_tensors(5, linear_attention=linear_attention))
    vae = load_vae_decoder(store)
    assert vae.config == VaeConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4, embed_dim=4, out_ch=3)

    z = latents(3, 4, 8, 6)                       # non-square: H and W must not be swapped
    want = reference_decode(ref, z)
    got = vae.decode(z)
    assert got.shape == (3, 3, 32, 24)     # 3 levels: x4 and got.dtype == torch.float32
    assert want.abs().max() > 1.0                  # the tiny VAE reaches beyond [-1, 1]: nothing is clamped
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(vae.decode(z, rows_per_call=2), got, atol=ATOL, rtol=0)   # kernels differ by batch size


def test_scale_divides_first_as_ldm(tmp_path: Path) -> None:
    state = f.vae_tensors(7)
    ref, vae = reference_vae(state), load_vae_decoder(TensorStore.from_dict(state))
    x = latents(1, 4, 8, 8) * SDXL_LATENT_SCALE            # sampler-space latents
    want = reference_decode(ref, (1.0 / SDXL_LATENT_SCALE) * x)  # ldm decode_first_stage: 1/scale_factor * z
    torch.testing.assert_close(vae.decode(x, scale=SDXL_LATENT_SCALE), want, atol=ATOL, rtol=0)
    torch.testing.assert_close(vae.decode(x.half(), scale=SDXL_LATENT_SCALE), reference_decode(ref, (1.0 / SDXL_LATENT_SCALE) * x.half().float()),
                               atol=ATOL, rtol=0)   # half latents are accepted and upcast


def test_small_activations_see_the_norm_eps() -> None:
    """Near-zero latents and no conv_in bias: the first GroupNorm's variance (~1e-6) is the size of
    its eps, so a wrong eps (ldm's Normalize uses 1e-6, not torch's default 1e-5) shows."""
    state = f.vae_tensors(8)
    state["decoder.conv_in.bias"] = torch.zeros_like(state["decoder.conv_in.bias"])
    z = latents(1, 4, 8, 8) * 1e-3
    want = reference_decode(reference_vae(state), z)
    torch.testing.assert_close(load_vae_decoder(TensorStore.from_dict(state)).decode(z), want, atol=ATOL, rtol=0)


def test_full_size_layout_and_config_from_shapes() -> None:
    """The real SD/SDXL ddconfig (ch 128, ch_mult 1,2,4,4, 2 res blocks): config from shapes, and our
    decoder's state dict is exactly the file's decoder + post_quant_conv keys with their shapes."""
    shapes = f.vae_shapes(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2)
    store = TensorStore(None, {f.VAE_PREFIX + k: s for k, s in shapes.items()},
                        {f.VAE_PREFIX + k: torch.float16 for k in shapes}, lambda k: None).sub(f.VAE_PREFIX)
    config = vae_config_from_store(store)
    assert config == VaeConfig(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=4, embed_dim=4, out_ch=3)
    with meta_init():
        ours = {k: tuple(v.shape) for k, v in VaeDecoder(config).state_dict().items()}
    assert ours == {k: s for k, s in shapes.items() if k.startswith(("decoder.", "post_quant_conv."))}
    assert len(ours) == 140   # 2 conv_in + 26 mid + 12 blocks x 8 + 2 nin_shortcut x 2 + 3 upsample x 2 + 4 out + 2 post_quant


# ---------------------------------------------------------------------------- precision

def test_float16_overflow_falls_back_to_float32(caplog: pytest.LogCaptureFixture) -> None:
    state = f.vae_tensors(3)
    state["decoder.conv_in.weight"] = state["decoder.conv_in.weight"] * 3e4    # activations beyond float16's 65504
    half_weights = {k: v.half() for k, v in state.items()}
    vae = load_vae_decoder(TensorStore.from_dict(half_weights), dtype=torch.float16)
    z = latents(1, 4, 8, 8)
    with torch.no_grad():
        assert not torch.isfinite(vae(z.half())).all()          # the overflow is real
    got = vae.decode(z)
    assert vae.dtype == torch.float32 and "float32" in caplog.text
    want = reference_decode(reference_vae(half_weights), z)     # same (half-rounded) weights in float32
    torch.testing.assert_close(got, want, atol=ATOL * 10, rtol=1e-5)


def test_bfloat16_is_used_as_asked() -> None:
    state = f.vae_tensors(4)
    vae = load_vae_decoder(TensorStore.from_dict(state), dtype=torch.bfloat16)
    z = latents(1, 4, 8, 8)
    got = vae.decode(z)
    assert vae.dtype == torch.bfloat16 and got.dtype == torch.float32
    want = reference_decode(reference_vae(state), z)
    assert (got - want).abs().max() < 0.1 * want.abs().max()   # bf16 keeps ~3 digits
    assert not torch.equal(got, load_vae_decoder(TensorStore.from_dict(state)).decode(z))


def test_unsupported_dtype_is_a_setting_error() -> None:
    with pytest.raises(SettingError, match="VAE precision"):
        load_vae_decoder(TensorStore.from_dict(f.vae_tensors(0)), dtype=torch.float64)


# ---------------------------------------------------------------------------- files that are refused

def test_checkpoint_without_vae_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = f.write_checkpoint(tmp_path / "novae.safetensors", "sd1")            # the default: no VAE
    assert not detect_model(open_store(path)).has_vae
    for call in (lambda: load_vae_decoder(open_store(path)), lambda: open_vae(path)):
        with pytest.raises(ModelFileError, match="no VAE") as err:
            call()
        assert str(path) in str(err.value) and "separate VAE file" in str(err.value)
    with pytest.raises(ModelFileError, match="first_stage_model") as err:
        load_vae_decoder(open_store(path).sub("first_stage_model."))
    assert str(path) in str(err.value)


def test_checkpoint_with_vae_is_still_a_checkpoint(tmp_path: Path) -> None:
    path = f.write_checkpoint(tmp_path / "withvae.safetensors", "sdxl", vae=True)
    info = detect_model(open_store(path))
    assert info.has_vae and info.family.value == "sdxl"
    with pytest.raises(ModelFileError, match="VAE file, not a checkpoint"):
        detect_model(open_store(f.write_vae_file(tmp_path / "vae.safetensors")))


def test_diffusers_format_vae_is_refused(tmp_path: Path) -> None:
    converted = convert_ldm_vae_checkpoint(f.vae_tensors(0), diffusers_config())
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in converted.items()}, str(path))
    with pytest.raises(ModelFileError, match="diffusers-format VAE") as err:
        open_vae(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("damage", ["truncated", "empty", "missing-key", "unexpected-key", "bad-shape",
                                    "16-channels", "encoder-only", "not-a-vae"])
def test_damaged_or_odd_files(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "vae.safetensors"
    tensors = f.vae_tensors(0)
    expect = {"missing-key": "decoder.up.1.block.0.conv2.bias", "unexpected-key": "decoder.up.0.attn.0.q.weight",
              "bad-shape": "decoder.mid.attn_1.k.weight", "16-channels": "16-channel",
              "encoder-only": "only the encoder", "not-a-vae": "no VAE decoder found",
              "truncated": "truncated", "empty": "empty"}[damage]
    if damage == "missing-key":
        del tensors[expect]
    elif damage == "unexpected-key":
        tensors[expect] = torch.zeros(64, 64, 1, 1)
    elif damage == "bad-shape":
        tensors[expect] = torch.zeros(64, 32, 1, 1)
    elif damage == "16-channels":
        tensors = f.vae_tensors(0, z_channels=16, embed_dim=16)
    elif damage == "encoder-only":
        tensors = {k: v for k, v in tensors.items() if k.startswith("encoder.")}
    elif damage == "not-a-vae":
        tensors = {"lora_unet_down.lora_down.weight": torch.zeros(4, 4)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:-1000])
    elif damage == "empty":
        path.write_bytes(b"")
    with pytest.raises(ModelFileError, match=expect) as err:
        load_vae_decoder(open_vae(path))
    assert str(path) in str(err.value)


# ---------------------------------------------------------------------------- uint8 images

def test_uint8_conversion_by_hand() -> None:
    """A1111 1.10 (`processing.py`): clamp((x + 1) / 2, 0, 1) in float32, then 255. * x and
    astype(uint8), which truncates: 0 -> 127.5 -> 127, not 128."""
    values = [-1.0, 1.0, 0.0, 2.0, -5.0, 2 * 200.9 / 255 - 1, 2 * 3.999 / 255 - 1, 0.5]
    x = torch.tensor(values, dtype=torch.float32)
    image = torch.stack([x, -x, x * 0.5]).reshape(1, 3, 2, 4)          # channel c, row y, column x

    def by_hand(v: float) -> int:
        f32 = np.float32
        t = min(max((f32(v) + f32(1.0)) / f32(2.0), f32(0.0)), f32(1.0))
        return math.floor(float(f32(255.0) * t))

    got = to_uint8_images(image)
    assert got.dtype == np.uint8 and got.shape == (1, 2, 4, 3)
    for c in range(3):
        for y in range(2):
            for xi in range(4):
                assert got[0, y, xi, c] == by_hand(float(image[0, c, y, xi])), (c, y, xi)
    assert list(got[0, :, :, 0].reshape(-1)[:5]) == [0, 255, 127, 255, 0]
    assert got[0, 1, 1, 0] == 200 and got[0, 1, 2, 0] == 3              # truncated, not rounded
    assert to_uint8_images(torch.full((1, 3, 1, 1), float("nan")))[0, 0, 0, 0] == 0
