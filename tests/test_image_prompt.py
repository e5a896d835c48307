"""IP-Adapter on the adapted source rows (runtime/image_prompt.py), on small random models.

The reference is the IP-Adapter formula written literally inside each cross-attention:
to_out(attention(q, k, v) + w * attention(q, to_k_ip(img), to_v_ip(img))); the hooks instead add
w * (to_out(attention(q, k_ip, v_ip)) - bias) after the layer, so the two must agree. The layer
order (the file's `ip_adapter.{2k+1}` for our k-th attn2) is checked against diffusers' own
conversion in test_ipadapter.py.
"""

from __future__ import annotations

import types

import pytest
import torch
from safetensors.torch import save_file

import factories
from factory_ipadapter import clip_vision_state, flat_ip_adapter, kv_weights, nested_ip_adapter, plain_image_proj
from lib_deltasampling.runtime.attention import attention
from lib_deltasampling.runtime.clip_vision import load_clip_vision
from lib_deltasampling.runtime.image_prompt import ImagePromptHooks, attn2_in_diffusers_order
from lib_deltasampling.runtime.ipadapter import image_prompt_tokens, load_ip_adapter
from lib_deltasampling.runtime.model import load_model
from lib_deltasampling.runtime.pair import SourcePair
from lib_deltasampling.runtime.placement import Placement

CPU = Placement(torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def parts(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("ip")
    model = load_model(factories.write_checkpoint(d / "sd1.safetensors", "sd1", seed=2), placement=CPU,
                       tokenizer=tokenizer)
    widths = [m.to_k.out_features for m in attn2_in_diffusers_order(model.unet)]
    cross = model.unet.config.context_dim
    ip = d / "ip-adapter_tiny.safetensors"
    save_file(flat_ip_adapter(nested_ip_adapter(plain_image_proj(48, cross), kv_weights(cross, widths))), str(ip))
    clip = d / "clip_vision.safetensors"
    save_file(clip_vision_state(width=64, projection=48), str(clip))
    adapter, vision = load_ip_adapter(ip), load_clip_vision(clip)
    image = torch.rand(1, 3, 40, 56, generator=torch.Generator().manual_seed(3))
    cond, uncond = image_prompt_tokens(adapter, vision, image)
    return model, adapter, cond, uncond


def _literal_reference(unet, kv_layers, tokens, weight):
    """Patch every attn2 to compute the IP-Adapter formula inside the layer; returns an undo."""
    originals = []
    for layer, (to_k, to_v) in zip(attn2_in_diffusers_order(unet), kv_layers):
        def forward(self, x, context=None, to_k=to_k, to_v=to_v):
            q = self.to_q(x)
            text = attention(q, self.to_k(context), self.to_v(context), self.heads)
            img = attention(q, to_k(tokens), to_v(tokens), self.heads)
            return self.to_out[0](text + weight * img)
        originals.append((layer, layer.forward))
        layer.forward = types.MethodType(forward, layer)

    def undo():
        for layer, original in originals:
            layer.forward = original
    return undo


def test_hooks_equal_the_literal_formula(parts):
    model, adapter, cond, _ = parts
    unet = model.unet
    g = torch.Generator().manual_seed(4)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([600.0])
    ctx = torch.randn(2, 5, unet.config.context_dim, generator=g)
    hooks = ImagePromptHooks(unet, adapter.kv_layers(), cond, cond, weight=0.7)
    hooks.prepare(batch=2, with_uncond=False)
    with torch.no_grad():
        plain = unet(x, t, ctx)
        hooks.attach()
        hooks.rows = slice(None)
        try:
            got = unet(x, t, ctx)
        finally:
            hooks.rows = None
            hooks.detach()
        undo = _literal_reference(unet, adapter.kv_layers(), cond.expand(2, -1, -1), 0.7)
        try:
            want = unet(x, t, ctx)
        finally:
            undo()
        after = unet(x, t, ctx)
    assert (got - plain).abs().max() > 1e-2
    assert (got - want).abs().max() <= 1e-5
    assert torch.equal(after, plain)            # detached: the UNet is as before


def test_adapted_rows_only_and_uncond_tokens_per_branch(parts):
    model, adapter, cond, uncond = parts
    plain_pair = SourcePair(model)
    conds = plain_pair.encode(["a fox"], [""], ["a fox"], [""], width=64, height=64)
    x, sigma = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5)), torch.tensor([3.0])
    with torch.no_grad():
        plain = plain_pair.denoise(x, sigma, conds)
        pair = SourcePair(model, image_prompt=ImagePromptHooks(model.unet, adapter.kv_layers(), cond, uncond, 0.9))
        pair.encode(["a fox"], [""], ["a fox"], [""], width=64, height=64)   # prepares the adapted rows' layout
        with pair.running():
            got = pair.denoise(x, sigma, conds)
        # per branch: the adapted uncond row with the uncond image tokens, the cond row with the image's
        for i, tokens in ((2, uncond), (3, cond)):
            one = ImagePromptHooks(model.unet, adapter.kv_layers(), tokens, tokens, 0.9)
            one.prepare(batch=1, with_uncond=False)
            one.attach()
            one.rows = slice(None)
            try:
                alone = model.denoiser(x, sigma, **{k: v[i:i + 1] for k, v in conds.joint.items()})
            finally:
                one.detach()
            assert (alone - got[i]).abs().max() <= 1e-4, i   # batch 4 vs 1: float32 summation order
    assert torch.equal(got[0], plain[0]) and torch.equal(got[1], plain[1])
    assert (got[3] - plain[3]).abs().max() > 1e-3 and (got[2] - got[3]).abs().max() > 0
    assert not any(layer._forward_hooks for layer in attn2_in_diffusers_order(model.unet))


def test_weight_zero_is_plain_and_a_mismatched_adapter_is_refused(parts):
    model, adapter, cond, uncond = parts
    conds = SourcePair(model).encode(["a"], None, ["a"], None, width=64, height=64)
    x, sigma = torch.randn(1, 4, 8, 8), torch.tensor([2.0])
    pair = SourcePair(model, image_prompt=ImagePromptHooks(model.unet, adapter.kv_layers(), cond, uncond, 0.0))
    pair.encode(["a"], None, ["a"], None, width=64, height=64)
    with torch.no_grad(), pair.running():
        zero = pair.denoise(x, sigma, conds)
    with torch.no_grad():
        plain = SourcePair(model).denoise(x, sigma, conds)
    assert all(torch.equal(a, b) for a, b in zip(zero, plain))
    with pytest.raises(ValueError, match="cross-attention layers"):
        ImagePromptHooks(model.unet, adapter.kv_layers()[:-1], cond, uncond)


def test_runner_ip_adapter_flags(tmp_path, tokenizer):
    from PIL import Image
    from safetensors.torch import load_file

    from lib_deltasampling.__main__ import main as cli
    from lib_deltasampling.engine.settings import ControlImage
    from vocab import clip_vocab_path

    source = factories.write_checkpoint(tmp_path / "sd1.safetensors", "sd1", seed=2)
    target = factories.write_checkpoint(tmp_path / "target.safetensors", "sd1", seed=1, vae=True)
    unet = load_model(source, placement=CPU, tokenizer=tokenizer).unet
    widths = [m.to_k.out_features for m in attn2_in_diffusers_order(unet)]
    ip = tmp_path / "ip-adapter_tiny.safetensors"
    save_file(flat_ip_adapter(nested_ip_adapter(plain_image_proj(48, unet.config.context_dim),
                                                kv_weights(unet.config.context_dim, widths))), str(ip))
    encoder = tmp_path / "clip_vision.safetensors"
    save_file(clip_vision_state(width=64, projection=48), str(encoder))
    image = _png(tmp_path / "style.png", 8)
    common = ["generate", "--target", str(target), "--source", str(source), "--vocab", str(clip_vocab_path()),
              "--device", "cpu", "--steps", "3", "--width", "64", "--height", "64", "--seed", "3", "--quiet",
              "--adapters", "ink", "--scale", "2"]
    latents = {}
    for name, extra in (("plain", []), ("ip", ["--ip-adapter", str(ip), "--ip-encoder", str(encoder),
                                               "--ip-image", str(image), "--ip-weight", "0.8"])):
        out = tmp_path / f"{name}.png"
        assert cli([*common, *extra, "--out", str(out), "--latent-out", str(tmp_path / f"{name}.safetensors")]) == 0
        latents[name] = load_file(str(tmp_path / f"{name}.safetensors"))["latent"]
    assert (latents["ip"] - latents["plain"]).abs().max() > 1e-3
    text = Image.open(tmp_path / "ip.png").info["parameters"]
    short = ControlImage.of(image.read_bytes(), "x").short_hash
    for entry in (f"Delta IP-Adapter: {ip.stem}", f"Delta IP-Adapter encoder: {encoder.stem}",
                  f"Delta IP-Adapter image hash: {short}", "Delta IP-Adapter weight: 0.8", "Delta IP-Adapter hash: "):
        assert entry in text, entry
    assert cli([*common, "--ip-adapter", str(ip), "--ip-image", str(image), "--out", str(tmp_path / "x.png")]) == 2


def _png(path, seed):
    import numpy as np
    from PIL import Image
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (30, 44, 3), dtype=np.uint8)).save(path)
    return path
