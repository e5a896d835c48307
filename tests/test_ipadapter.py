"""CLIP vision (runtime/clip_vision.py) and IP-Adapter (runtime/ipadapter.py) against independent references.

- CLIP vision: transformers' `CLIPVisionModelWithProjection` loaded with the same random state dict
  (HF layout, written by hand in factory_ipadapter); `preprocess` against transformers'
  CLIPImageProcessor (PIL backend) on a uint8 image.
- IP-Adapter projections: diffusers' `ImageProjection` / `IPAdapterPlusImageProjection`, built and filled
  by diffusers' own `_convert_ip_adapter_image_proj_to_diffusers` from the original nested state dict;
  layer order against diffusers' `_convert_ip_adapter_attn_to_diffusers` on a tiny UNet.
Every model is written to a real file (.safetensors, or torch.save .bin) and read through the loaders.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import factory_ipadapter as fi
from lib_deltasampling.errors import ModelFileError
from lib_deltasampling.runtime.checkpoint import TensorStore
from lib_deltasampling.runtime.clip_vision import (CLIP_MEAN, CLIP_STD, detect_clip_vision, load_clip_vision,
                                                   preprocess)
from lib_deltasampling.runtime.detect import Family
from lib_deltasampling.runtime.ipadapter import (detect_ip_adapter, image_prompt_tokens, load_ip_adapter,
                                                 open_ip_adapter_store)

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.loaders.unet import UNet2DConditionLoadersMixin  # noqa: E402
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection  # noqa: E402

ATOL = 1e-5
WIDTH, LAYERS, PROJ = 64, 3, 48
CROSS = {"sd1": 768, "sdxl": 2048}


def _save(tmp_path: Path, name: str, sd: dict) -> Path:
    path = tmp_path / name
    if path.suffix == ".safetensors":
        save_file({k: v.clone().contiguous() for k, v in sd.items()}, str(path))  # clone: no shared storage
    else:
        torch.save(sd, path)
    return path


def _hf_vision(sd: dict, width: int, heads: int, act: str) -> CLIPVisionModelWithProjection:
    cfg = CLIPVisionConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=LAYERS,
                           num_attention_heads=heads, image_size=fi.IMAGE, patch_size=fi.PATCH, projection_dim=PROJ,
                           hidden_act=act, layer_norm_eps=1e-5)
    m = CLIPVisionModelWithProjection._from_config(cfg, attn_implementation="eager")
    m.load_state_dict({k: v for k, v in sd.items() if not k.endswith("position_ids")}, strict=True)
    return m.eval()


def _pixels(n: int = 2, seed: int = 5) -> torch.Tensor:
    return torch.randn(n, 3, fi.IMAGE, fi.IMAGE, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- CLIP vision

@pytest.mark.parametrize("width,heads,act,override", [
    (64, 4, "gelu", dict(heads=4)),                      # shapes say gelu (not an OpenAI ViT)
    (64, 4, "quick_gelu", dict(heads=4, act="quick_gelu")),
    (128, 2, "gelu", {}),                                # heads from width // 64
])
def test_clip_vision_matches_transformers(tmp_path, width, heads, act, override):
    sd = fi.clip_vision_state(width=width, layers=LAYERS, projection=PROJ, position_ids=True)
    loaded = load_clip_vision(_save(tmp_path, "clip.safetensors", sd), **override)
    cfg = loaded.info.config
    assert (cfg.width, cfg.layers, cfg.heads, cfg.patch, cfg.image_size, cfg.projection_dim, cfg.act) == \
        (width, LAYERS, heads, fi.PATCH, fi.IMAGE, PROJ, act)
    pixels = _pixels()
    with torch.no_grad():
        embeds, penultimate = loaded.model.encode(pixels)
        ref = _hf_vision(sd, width, heads, act)(pixel_values=pixels, output_hidden_states=True)
    assert embeds.shape == (2, PROJ) and penultimate.shape == (2, cfg.tokens, width)
    torch.testing.assert_close(embeds, ref.image_embeds, atol=ATOL, rtol=0)
    torch.testing.assert_close(penultimate, ref.hidden_states[-2], atol=ATOL, rtol=0)


def test_clip_vision_rules_and_whole_clip_model(tmp_path):
    """Activation/heads rules of real shapes (header only), and a whole CLIPModel file loads its vision tower."""
    def shapes(width: int, patch: int, image: int) -> TensorStore:
        grid = image // patch
        keys = {"vision_model.embeddings.patch_embedding.weight": (width, 3, patch, patch),
                "vision_model.embeddings.position_embedding.weight": (grid * grid + 1, width),
                "visual_projection.weight": (768, width)}
        for n in range(2):
            keys[f"vision_model.encoder.layers.{n}.layer_norm1.weight"] = (width,)
            keys[f"vision_model.encoder.layers.{n}.mlp.fc1.weight"] = (4 * width, width)
        return TensorStore(None, keys, {k: torch.float16 for k in keys}, reader=None)  # shapes only

    known = {(1024, 14, 224): (16, "quick_gelu"), (1024, 14, 336): (16, "quick_gelu"), (768, 32, 224): (12, "quick_gelu"),
             (1280, 14, 224): (16, "gelu"), (1664, 14, 224): (16, "gelu")}  # OpenAI L/14, L/14-336, B/32; H; bigG
    for (width, patch, image), (heads, act) in known.items():
        cfg = detect_clip_vision(shapes(width, patch, image)).config
        assert (cfg.heads, cfg.act, cfg.image_size) == (heads, act, image), (width, patch)

    sd = fi.clip_vision_state()
    sd.update({"text_model.embeddings.token_embedding.weight": torch.zeros(10, 32), "logit_scale": torch.tensor(2.0),
               "text_projection.weight": torch.zeros(PROJ, 32)})
    whole = load_clip_vision(_save(tmp_path, "clip_model.safetensors", sd), heads=4)
    assert whole.info.config.width == WIDTH and whole.nbytes() > 0
    whole.release()
    assert whole.released


@pytest.mark.parametrize("hw,size", [((61, 45), 32), ((37, 90), 32), ((300, 250), 224), ((100, 150), 224)])
def test_preprocess_matches_clip_image_processor(hw, size):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    img = np.random.default_rng(0).integers(0, 256, (*hw, 3), dtype=np.uint8)  # noise: the most overshoot
    proc = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = proc(images=img, return_tensors="pt")["pixel_values"]
    ours = preprocess(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255, size)
    assert ours.shape == ref.shape == (1, 3, size, size)
    # PIL rounds to 8 bits after each resize pass: about 1/255 before normalising by std ~0.26
    torch.testing.assert_close(ours, ref, atol=1.1 / 255 / min(CLIP_STD), rtol=0)
    assert (ours - ref).abs().mean() < 0.5 / 255 / min(CLIP_STD)


def test_preprocess_square_is_normalise_only():
    x = torch.rand(2, 3, 32, 32)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(preprocess(x, 32), (x - mean) / std)


# ---------------------------------------------------------------------------- IP-Adapter vs diffusers

def _nested(kind: str, cross: int, widths=(32, 64, 32)) -> dict:
    proj = fi.plain_image_proj(PROJ, cross) if kind == "plain" else fi.plus_image_proj(WIDTH, cross)
    return fi.nested_ip_adapter(proj, fi.kv_weights(cross, list(widths)))


def _diffusers_proj(nested: dict):
    """diffusers' projection module, chosen and filled by its own conversion of the original keys."""
    proj = {k: v.clone() for k, v in nested["image_proj"].items()}
    return UNet2DConditionLoadersMixin._convert_ip_adapter_image_proj_to_diffusers(
        None, proj, low_cpu_mem_usage=False).eval()


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("kind", ["plain", "plus"])
def test_image_tokens_match_diffusers(tmp_path, kind, family):
    cross = CROSS[family]
    nested = _nested(kind, cross)
    adapter = load_ip_adapter(_save(tmp_path, "ip.safetensors", fi.flat_ip_adapter(nested)))
    info = adapter.info
    tokens = 4 if kind == "plain" else 6
    assert (info.kind, info.tokens, info.cross_attention_dim, info.layers, info.layer_ids) == \
        (kind, tokens, cross, 3, (1, 3, 5))
    assert info.family is Family(family) and info.clip_dim == (PROJ if kind == "plain" else WIDTH)
    if kind == "plus":
        r = info.resampler
        assert (r.dim, r.depth, r.heads, r.queries, r.ff_width) == (128, 4, 2, 6, 512)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, PROJ, generator=gen) if kind == "plain" else torch.randn(3, 17, WIDTH, generator=gen)
    with torch.no_grad():
        ours = adapter.image_tokens(x)
        ref = _diffusers_proj(nested)(x)
    assert ours.shape == (3, tokens, cross)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["plain", "plus"])
def test_image_prompt_tokens_cond_and_uncond(tmp_path, kind):
    """The helper = HF CLIP on our preprocessing + diffusers' projection; uncond from zeros as documented."""
    sd = fi.clip_vision_state()
    clip = load_clip_vision(_save(tmp_path, "clip.safetensors", sd), heads=4)
    nested = _nested(kind, 768)
    adapter = load_ip_adapter(_save(tmp_path, "ip.bin", nested))
    images = torch.rand(2, 3, 40, 52, generator=torch.Generator().manual_seed(3))
    cond, uncond = image_prompt_tokens(adapter, clip, images)

    hf, proj = _hf_vision(sd, WIDTH, 4, "gelu"), _diffusers_proj(nested)
    with torch.no_grad():
        out = hf(pixel_values=preprocess(images, fi.IMAGE), output_hidden_states=True)
        zero = hf(pixel_values=torch.zeros(1, 3, fi.IMAGE, fi.IMAGE), output_hidden_states=True)
        if kind == "plain":
            ref_cond, ref_uncond = proj(out.image_embeds), proj(torch.zeros(1, PROJ))
        else:
            ref_cond, ref_uncond = proj(out.hidden_states[-2]), proj(zero.hidden_states[-2])
    torch.testing.assert_close(cond, ref_cond, atol=ATOL, rtol=0)
    torch.testing.assert_close(uncond, ref_uncond.expand(2, -1, -1), atol=ATOL, rtol=0)


def test_kv_layers_follow_diffusers_processor_order(tmp_path):
    """N = 2k+1 is the k-th cross-attention of diffusers' attn_processors (down, up, mid), per-layer widths."""
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=768,
        attention_head_dim=8, norm_num_groups=8)
    cross_names = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
    prefixes = [n.split(".")[0] for n in cross_names]
    assert prefixes == ["down_blocks"] * 2 + ["up_blocks"] * 4 + ["mid_block"]
    widths = [32, 64, 64, 64, 32, 32, 64]  # down 0, 1; up 0 (x2), 1 (x2); mid
    nested = _nested("plain", 768, widths)
    adapter = load_ip_adapter(_save(tmp_path, "ip.safetensors", fi.flat_ip_adapter(nested)))
    procs = unet._convert_ip_adapter_attn_to_diffusers([nested], low_cpu_mem_usage=False)
    pairs = adapter.kv_layers()
    assert adapter.info.layer_ids == tuple(range(1, 14, 2)) and len(pairs) == len(cross_names)
    for (k, v), name in zip(pairs, cross_names):
        assert torch.equal(k.weight, procs[name].to_k_ip[0].weight)
        assert torch.equal(v.weight, procs[name].to_v_ip[0].weight)


# ---------------------------------------------------------------------------- files and refusals

@pytest.mark.parametrize("kind", ["plain", "plus"])
def test_safetensors_and_bin_load_the_same(tmp_path, kind):
    nested = _nested(kind, 768)
    a = load_ip_adapter(_save(tmp_path, "ip.safetensors", fi.flat_ip_adapter(nested)))
    b = load_ip_adapter(_save(tmp_path, "ip.bin", nested))
    assert a.info == type(a.info)(**{**b.info.__dict__, "path": a.info.path})
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert set(sa) == set(fi.flat_ip_adapter(nested))
    half = load_ip_adapter(tmp_path / "ip.bin", dtype=torch.bfloat16)
    x = torch.zeros(1, PROJ) if kind == "plain" else torch.zeros(1, 5, WIDTH)
    assert half.image_tokens(x).dtype == torch.bfloat16
    assert a.nbytes() == sum(t.numel() * 4 for t in sa.values())
    a.release()


def _expect(tmp_path: Path, name: str, sd: dict, words: str, loader=load_ip_adapter) -> None:
    with pytest.raises(ModelFileError, match=words):
        loader(_save(tmp_path, name, sd))


def test_refusals_name_the_file_kind(tmp_path):
    t = torch.zeros(4, 4)
    ip = fi.flat_ip_adapter(_nested("plain", 768))
    clip = fi.clip_vision_state()
    _expect(tmp_path, "lora.safetensors", {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": t}, "LoRA")
    _expect(tmp_path, "cn.safetensors", {"control_model.input_hint_block.0.weight": t}, "ControlNet")
    _expect(tmp_path, "ckpt.safetensors", {"model.diffusion_model.input_blocks.0.0.weight": t}, "checkpoint")
    _expect(tmp_path, "clipv.safetensors", clip, "CLIP vision model")
    _expect(tmp_path, "faceid.bin", fi.nested_ip_adapter({"proj.0.weight": t, "proj.2.weight": t, "norm.weight": t[0]},
                                                         {"1.to_k_ip.weight": t}), "FaceID")
    _expect(tmp_path, "full.safetensors", {"image_proj.proj.0.weight": t, "image_proj.proj.3.weight": t[0],
                                           "ip_adapter.1.to_k_ip.weight": t}, "full")
    _expect(tmp_path, "faceidplus.safetensors", {"image_proj.perceiver_resampler.proj_in.weight": t,
                                                 "ip_adapter.1.to_k_ip.weight": t}, "FaceID-plus")
    # truncated files: the safetensors header check and the weights-only reader name them
    good = _save(tmp_path, "ip.safetensors", ip)
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:-100])
    with pytest.raises(ModelFileError, match="truncated"):
        load_ip_adapter(tmp_path / "cut.safetensors")
    good_bin = _save(tmp_path, "ip.bin", _nested("plain", 768))
    (tmp_path / "cut.bin").write_bytes(good_bin.read_bytes()[: good_bin.stat().st_size // 2])
    with pytest.raises(ModelFileError, match="truncated or corrupt"):
        load_ip_adapter(tmp_path / "cut.bin")
    # a missing pair half
    broken = {k: v for k, v in ip.items() if k != "ip_adapter.3.to_v_ip.weight"}
    _expect(tmp_path, "half.safetensors", broken, r"ip_adapter\.3: .*to_v_ip missing")

    # the CLIP vision loader
    _expect(tmp_path, "ip2.safetensors", ip, "IP-Adapter", load_clip_vision)
    _expect(tmp_path, "text.safetensors", {"text_model.embeddings.token_embedding.weight": t}, "text encoder",
            load_clip_vision)
    _expect(tmp_path, "oc.safetensors", {"visual.conv1.weight": t, "visual.proj": t}, "open_clip", load_clip_vision)
    _expect(tmp_path, "lora2.safetensors", {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": t}, "LoRA",
            load_clip_vision)
    _expect(tmp_path, "ckpt2.safetensors", {"model.diffusion_model.input_blocks.0.0.weight": t}, "checkpoint",
            load_clip_vision)
    no_proj = {k: v for k, v in clip.items() if k != "visual_projection.weight"}
    _expect(tmp_path, "noproj.safetensors", no_proj, "visual_projection", load_clip_vision)


def test_clip_vision_must_fit_the_adapter(tmp_path):
    clip = load_clip_vision(_save(tmp_path, "clip.safetensors", fi.clip_vision_state()), heads=4)
    for kind in ("plain", "plus"):
        proj = (fi.plain_image_proj(1024, 768) if kind == "plain" else fi.plus_image_proj(1280, 768, depth=1))
        adapter = load_ip_adapter(_save(tmp_path, f"{kind}.safetensors",
                                        fi.flat_ip_adapter(fi.nested_ip_adapter(proj, fi.kv_weights(768, [32])))))
        with pytest.raises(ModelFileError, match="ViT-H/14"):
            image_prompt_tokens(adapter, clip, torch.rand(1, 3, 32, 32))
    assert "needs ViT-H/14" in adapter.info.description
    info = detect_ip_adapter(open_ip_adapter_store(tmp_path / "plain.safetensors"))
    assert (info.kind, info.clip_dim, info.clip_name) == ("plain", 1024, "ViT-H/14")
