"""A ControlNet on the adapted source (runtime/control.py, the UNet's residual injection, the pair,
the sampler's window, the runner), on small random models in the real file layouts.

References: diffusers' UNet2DConditionModel with `down_block_additional_residuals` (how ControlNet
residuals enter a UNet), sd-webui-controlnet's scale formula written out by hand, and the official
ComfyUI node's pattern (the ControlNet attached to the adapted conditioning: every source branch
its own forward) recomputed here with plain per-branch forwards.
"""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import factories
from factory_controlnet import random_controlnet_state_dict
from factory_unet import CONFIGS, ldm_checkpoint
from lib_deltasampling.engine.sampler import DeltaParams, DeltaSampler
from lib_deltasampling.engine.settings import ControlImage, DeltaSettings
from lib_deltasampling.errors import ModelFileError, SettingError, UserError
from lib_deltasampling.runtime.control import SourceControl, crop_and_resize, residual_scales
from lib_deltasampling.runtime.controlnet import load_controlnet
from lib_deltasampling.runtime.detect import Family
from lib_deltasampling.runtime.images import ImageError, decode_base64, read_png
from lib_deltasampling.runtime.model import load_model
from lib_deltasampling.runtime.pair import SourcePair
from lib_deltasampling.runtime.placement import Placement
from lib_deltasampling.runtime.unet import ControlResiduals
from test_unet_ref import _diffusers_unet
from vocab import clip_vocab_path

CPU = Placement(torch.device("cpu"), torch.float32)


# ---------------------------------------------------------------- residual injection

def test_residuals_enter_the_unet_as_in_diffusers():
    """Residuals on every row: our UNet equals diffusers' with down_block/mid_block additional residuals."""
    from lib_deltasampling.runtime.unet import UNetModel

    config = CONFIGS["sd1"]()
    ckpt = ldm_checkpoint(config, seed=3)
    ours = UNetModel(config)
    ours.load_state_dict({k.removeprefix("model.diffusion_model."): v for k, v in ckpt.items()})
    ref = _diffusers_unet("sd1", ckpt)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([700.0, 20.5])
    ctx = torch.randn(2, 5, config.context_dim, generator=g)
    with torch.no_grad():
        shapes = [s.shape for s in _skips(ours, x, t, ctx)]
        residuals = [torch.randn(s, generator=g) for s in [*shapes, shapes[-1]]]
        got = ours(x, t, ctx, control=lambda *a: ControlResiduals(slice(None), [r.clone() for r in residuals]))
        want = ref(x, t, encoder_hidden_states=ctx, down_block_additional_residuals=tuple(residuals[:-1]),
                   mid_block_additional_residual=residuals[-1]).sample
        plain = ours(x, t, ctx)
    assert (got - plain).abs().max() > 0.1          # the residuals do something
    assert (got - want).abs().max() <= 1e-4


def test_rows_outside_the_controlled_block_stay_bit_for_bit():
    from lib_deltasampling.runtime.unet import UNetModel

    config = CONFIGS["sd1"]()
    torch.manual_seed(1)
    unet = UNetModel(config)
    x, t, ctx = torch.randn(4, 4, 8, 8), torch.tensor([500.0]), torch.randn(4, 3, config.context_dim)
    with torch.no_grad():
        plain = unet(x, t, ctx)
        shapes = [s.shape for s in _skips(unet, x, t, ctx)]
        residuals = [torch.randn(2, *s[1:]) for s in [*shapes, shapes[-1]]]
        got = unet(x, t, ctx, control=lambda *a: ControlResiduals(slice(2, 4), residuals))
    assert torch.equal(got[:2], plain[:2])
    assert (got[2:] - plain[2:]).abs().max() > 0.1


def _skips(unet, x, t, ctx) -> list[torch.Tensor]:
    captured = []
    hooks = [b.register_forward_hook(lambda m, i, o: captured.append(o)) for b in unet.input_blocks]
    try:
        unet(x, t, ctx)
    finally:
        for h in hooks:
            h.remove()
    return captured


# ---------------------------------------------------------------- scales, images

def test_scales_follow_sd_webui_controlnet():
    # hook.py: balanced [w] * n; soft injection w * 0.825 ** (12 - i) for i in range(13), SDXL the first 10
    assert residual_scales("balanced", 0.7, 13) == [0.7] * 13
    soft = residual_scales("prompt", 1.5, 13)
    assert soft[-1] == 1.5 and math.isclose(soft[0], 1.5 * 0.825 ** 12) and soft == residual_scales("control", 1.5, 13)
    assert residual_scales("prompt", 1.0, 10) == [0.825 ** (12 - i) for i in range(10)]


def test_crop_and_resize_keeps_the_aspect_and_cuts_the_centre():
    image = torch.zeros(1, 3, 40, 80)
    image[..., :, 20:60] = 1.0            # a bright band in the middle half of a 2:1 image
    out = crop_and_resize(image, 16, 16)  # cover 16x16: scale to 16x32, keep the centre 16 columns
    assert out.shape == (1, 3, 16, 16)
    assert out[..., :, 1:-1].min() > 0.99   # the whole kept window is inside the band
    same = torch.rand(1, 3, 24, 32)
    assert crop_and_resize(same, 24, 32) is same


def _png_bytes(pixels: np.ndarray) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P"])
def test_png_reader_matches_pillow(mode):
    from PIL import Image
    rng = np.random.default_rng(4)
    smooth = np.cumsum(rng.integers(0, 3, (23, 37, 4)), axis=1).astype(np.uint8)  # varied filters per row
    image = Image.fromarray(smooth, "RGBA").convert(mode)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    data = buf.getvalue()
    want = np.asarray(Image.open(io.BytesIO(data)).convert("RGBA"))
    alpha = want[:, :, 3:4].astype(np.uint16)
    want = (want[:, :, :3].astype(np.uint16) * alpha // 255).astype(np.uint8)
    assert np.array_equal(read_png(data, "test"), want)


def test_control_image_from_base64_and_data_url_hashes_pixels():
    pixels = np.random.default_rng(5).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    text = base64.b64encode(_png_bytes(pixels)).decode()
    a = ControlImage.of(text, "image")
    b = ControlImage.of("data:image/png;base64," + text, "image")
    c = ControlImage.of(pixels, "image")
    assert a == b == c and np.array_equal(a.pixels, pixels) and a.short_hash == a.sha256[:10]
    assert torch.equal(a.tensor()[0, :, 3, 5], torch.tensor(pixels[3, 5], dtype=torch.float32) / 255)
    assert ControlImage.of("", "image") == "" and ControlImage.of(None, "image") == ""


@pytest.mark.parametrize("value, words", [
    ("not base64!", "not base64-encoded"),
    (base64.b64encode(b"GIF89a....").decode(), "cannot be read as an image"),
    (np.zeros((4, 4, 2), dtype=np.uint8), "not an image"),
])
def test_bad_control_images_name_the_setting(value, words):
    with pytest.raises(SettingError) as e:
        DeltaSettings.from_dict({"control_image": value})
    assert words in str(e.value) and "control_image" in str(e.value)


def test_huge_png_is_refused_from_its_header():
    import struct
    import zlib
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    data = (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + header
            + struct.pack(">I", zlib.crc32(b"IHDR" + header)))
    with pytest.raises(ImageError, match="100000x100000"):
        read_png(data, "big.png")
    with pytest.raises(ImageError, match="100000x100000"):
        decode_base64(base64.b64encode(data).decode(), "big.png")


def test_controlnet_without_image_is_refused_when_the_generation_starts():
    s = DeltaSettings.from_dict({"control_model": "canny"})     # a paste: the model, never the image
    problem = s.control_problem()
    assert isinstance(problem, UserError) and "no control image" in str(problem)
    with pytest.raises(SettingError, match="after end"):
        DeltaSettings.from_dict({"control_start": 0.8, "control_end": 0.2})


# ---------------------------------------------------------------- on the source pair

@pytest.fixture(scope="module")
def sd1_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("control")
    source = factories.write_checkpoint(d / "sd1.safetensors", "sd1", seed=2)
    finetune = factories.write_checkpoint(d / "sd1-ft.safetensors", "sd1", seed=8)
    net = d / "control_sd1.safetensors"
    config = factories.unet_config("sd1").encoder()
    save_file({"control_model." + k: v * 0.2 for k, v in random_controlnet_state_dict(config, seed=6).items()},
              str(net))
    return source, finetune, net


@pytest.fixture(scope="module")
def sd1_pair(sd1_files, tokenizer):
    source, _, net_path = sd1_files
    model = load_model(source, placement=CPU, tokenizer=tokenizer)
    net = load_controlnet(net_path, for_family=model.family)
    return model, net


def _conds(pair, tokenizer=None):
    return pair.encode(["a house"], [""], ["a house, ink"], [""], width=64, height=64)


def _image(seed=0, size=(3, 48, 40)):
    return torch.rand(1, *size, generator=torch.Generator().manual_seed(seed))


def test_control_reaches_the_adapted_rows_only(sd1_pair):
    model, net = sd1_pair
    pair = SourcePair(model)
    conds = _conds(pair)
    x, sigma = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([3.0])
    control = SourceControl(net, _image())
    control.check(model)
    prepared = control.prepare((8, 8), torch.device("cpu"), torch.float32)
    with torch.no_grad(), pair.running():
        plain = pair.denoise(x, sigma, conds)
        got = pair.denoise(x, sigma, conds, prepared)
        cond_only = pair.denoise(x, sigma, conds, SourceControl(net, _image(), mode="control").prepare(
            (8, 8), torch.device("cpu"), torch.float32))
    assert torch.equal(got[0], plain[0]) and torch.equal(got[1], plain[1])      # base rows untouched
    assert all((got[i] - plain[i]).abs().max() > 1e-3 for i in (2, 3))
    assert torch.equal(cond_only[2], plain[2]) and (cond_only[3] - plain[3]).abs().max() > 1e-3


def test_official_node_pattern_one_forward_per_branch(sd1_pair):
    """The ComfyUI node runs each branch on its own, the ControlNet attached to the adapted
    conditionings (positive and negative): the fused batch gives the same four predictions."""
    model, net = sd1_pair
    pair = SourcePair(model)
    conds = _conds(pair)
    g = torch.Generator().manual_seed(2)
    x, sigma = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([5.0])
    image = _image(1)
    prepared = SourceControl(net, image, weight=0.8).prepare((8, 8), torch.device("cpu"), torch.float32)
    with torch.no_grad(), pair.running():
        fused = pair.denoise(x, sigma, conds, prepared)
        hint = crop_and_resize(image, 64, 64)
        for i in range(4):
            cond = {k: v[i:i + 1] for k, v in conds.joint.items()}

            def control(x_in, t, ctx, y, adapted=i >= 2):
                if not adapted:
                    return None
                res = net.model(x_in, hint, t.reshape(-1), ctx, y)
                return ControlResiduals(slice(None), [r * 0.8 for r in res])

            alone = model.denoiser(x, sigma, **cond, control=control)
            assert (alone - fused[i]).abs().max() <= 1e-4, i


def test_finetune_pair_controls_the_adapted_model(sd1_files, sd1_pair, tokenizer):
    source_model, net = sd1_pair
    finetune = load_model(sd1_files[1], placement=CPU, tokenizer=tokenizer)
    pair = SourcePair(source_model, None, finetune)
    conds = _conds(pair)
    x, sigma = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([2.0])
    prepared = SourceControl(net, _image()).prepare((8, 8), torch.device("cpu"), torch.float32)
    with torch.no_grad():
        plain, got = pair.denoise(x, sigma, conds), pair.denoise(x, sigma, conds, prepared)
    assert torch.equal(got[0], plain[0]) and torch.equal(got[1], plain[1])
    assert (got[3] - plain[3]).abs().max() > 1e-3


def _sampler(pair, control, steps=6):
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    return DeltaSampler.prepare(pair, DeltaParams(scale=2.0), prompts=["a"], negative_prompts=[""],
                                adapted_prompts=["a, ink"], adapted_negative_prompts=[""], steps=steps,
                                cfg_scale=6.0, target_scale=0.18215, noise=noise, noise_multiplier=1.0,
                                sigma0=1.0, control=control)


def test_weight_zero_and_the_window(sd1_pair):
    model, net = sd1_pair
    pair = SourcePair(model)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    d = torch.zeros_like(x)
    runs = {}
    for name, control in (("none", None), ("zero", SourceControl(net, _image(), weight=0.0)),
                          ("late", SourceControl(net, _image(), start=0.5, end=1.0)),
                          ("all", SourceControl(net, _image()))):
        s = _sampler(pair, control)
        with s.running():
            runs[name] = [s(x, torch.tensor([4.0 - i * 0.5]), i, 6, d).clone() for i in range(6)]
    for i in range(6):
        assert torch.equal(runs["zero"][i], runs["none"][i])
        # sd-webui-controlnet: active while start <= step / steps <= end
        assert torch.equal(runs["late"][i], runs["none" if i / 6 < 0.5 else "all"][i]), i
        assert (runs["all"][i] - runs["none"][i]).abs().max() > 1e-4


def test_wrong_family_or_architecture_is_named(sd1_pair, tmp_path, tokenizer):
    model, _ = sd1_pair
    sdxl_net = tmp_path / "control_xl.safetensors"
    xl = factories.unet_config("sdxl").encoder()
    save_file({"control_model." + k: v for k, v in random_controlnet_state_dict(xl, seed=1).items()}, str(sdxl_net))
    net = load_controlnet(sdxl_net, for_family=Family.SDXL)
    with pytest.raises(ModelFileError, match="SDXL ControlNet but the source base"):
        SourceControl(net, _image()).check(model)
    with pytest.raises(ModelFileError, match="LoRA"):
        lora = tmp_path / "style.safetensors"
        save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)}, str(lora))
        load_controlnet(lora)
    # a 4-channel image for a 3-channel ControlNet
    with pytest.raises(ModelFileError, match="3-channel control image"):
        SourceControl(sd1_pair[1], torch.rand(1, 4, 8, 8)).check(model)


# ---------------------------------------------------------------- the runner

def test_runner_control_flags(sd1_files, tmp_path):
    from lib_deltasampling.__main__ import main as cli

    source, _, net = sd1_files
    target = factories.write_checkpoint(tmp_path / "target.safetensors", "sd1", seed=1, vae=True)
    image = tmp_path / "edges.png"
    image.write_bytes(_png_bytes(np.random.default_rng(6).integers(0, 256, (40, 56, 3), dtype=np.uint8)))
    common = ["generate", "--target", str(target), "--source", str(source), "--vocab", str(clip_vocab_path()),
              "--device", "cpu", "--steps", "3", "--width", "64", "--height", "64", "--seed", "3", "--quiet",
              "--adapters", "ink", "--scale", "2"]
    latents = {}
    for name, extra in (("plain", []), ("control", ["--control", str(net), "--control-image", str(image),
                                                    "--control-weight", "1.5", "--control-mode", "prompt"])):
        out = tmp_path / f"{name}.png"
        assert cli([*common, *extra, "--out", str(out), "--latent-out", str(tmp_path / f"{name}.safetensors")]) == 0
        latents[name] = load_file(str(tmp_path / f"{name}.safetensors"))["latent"]
    assert (latents["control"] - latents["plain"]).abs().max() > 1e-3
    from PIL import Image
    text = Image.open(tmp_path / "control.png").info["parameters"]
    pixels = ControlImage.of(image.read_bytes(), "x")
    for entry in (f"Delta control: {net.stem}", "Delta control weight: 1.5", "Delta control mode: prompt",
                  f"Delta control image hash: {pixels.short_hash}", "Delta control hash: "):
        assert entry in text, entry
    assert "Delta control" not in Image.open(tmp_path / "plain.png").info["parameters"]
    assert cli([*common, "--control", str(net), "--out", str(tmp_path / "x.png")]) == 2


def test_builtin_preprocessors(monkeypatch):
    import sys
    pixels = np.random.default_rng(7).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    image = ControlImage.of(pixels, "image")
    torch.testing.assert_close(image.tensor("invert"), 1.0 - image.tensor(), rtol=0, atol=1e-6)  # 255 - x
    assert torch.equal(image.tensor("none"), torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255)
    monkeypatch.setitem(sys.modules, "cv2", None)                            # no OpenCV here
    with pytest.raises(SettingError, match="canny needs OpenCV"):
        image.tensor("canny")
    with pytest.raises(SettingError, match="control_preprocessor.*unknown preprocessor 'depth'.*none, invert, canny"):
        image.tensor("depth")          # any name passes the settings check; the host's list decides
