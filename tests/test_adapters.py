"""Adapters on a loaded source model, base and adapted in one batched forward.

Reference: a second checkpoint file whose weights the test merges itself from each format's
definition (LoRA: up @ down * alpha / rank; LoHa: (w1a @ w1b) * (w2a @ w2b); LoKr: kron(w1, w2);
full: + diff; norm: + w_norm / b_norm), loaded through the ordinary loader. The adapted branches
of the batched forward must equal that model's predictions; the base branches must be bit for
bit those of the model without adapters.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import factories
import factory_adapters as fa
from lib_deltasampling.errors import ModelFileError, SettingError
from lib_deltasampling.runtime.adapters.apply import AdapterSet
from lib_deltasampling.runtime.model import load_model
from lib_deltasampling.runtime.pair import SourcePair
from lib_deltasampling.runtime.placement import Placement

CPU32 = Placement(torch.device("cpu"), torch.float32)
ATOL = 1e-4
U = "model.diffusion_model."

# LDM module -> its diffusers name, written out by hand for the tiny SD1 layout of tests/factories.py
# (channel_mult (1, 2, 2), 2 res blocks, attention at levels 0 and 1).
SD1_UNET_TARGETS = {
    "input_blocks.1.1.transformer_blocks.0.attn1.to_q": "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "input_blocks.1.1.transformer_blocks.0.attn2.to_k": "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "middle_block.1.transformer_blocks.0.ff.net.0.proj": "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "input_blocks.1.1.proj_in": "down_blocks.0.attentions.0.proj_in",                # 1x1 conv in SD1
    "input_blocks.1.0.in_layers.2": "down_blocks.0.resnets.0.conv1",                 # 3x3 conv
    "input_blocks.3.0.op": "down_blocks.0.downsamplers.0.conv",                       # 3x3 conv, stride 2
    "output_blocks.3.1.proj_out": "up_blocks.1.attentions.0.proj_out",
}
SD1_NORM_TARGETS = {
    "input_blocks.1.0.in_layers.0": "down_blocks.0.resnets.0.norm1",                 # GroupNorm
    "input_blocks.1.1.transformer_blocks.0.norm1": "down_blocks.0.attentions.0.transformer_blocks.0.norm1",  # LayerNorm
}
TE_TARGETS = ["text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.1.mlp.fc1"]
# HF names in adapter files -> OpenCLIP checkpoint weights (rows of the packed in_proj for q/k/v)
OPENCLIP_OF_HF = {
    "text_model.encoder.layers.0.self_attn.q_proj": ("transformer.resblocks.0.attn.in_proj_weight", "q"),
    "text_model.encoder.layers.1.self_attn.v_proj": ("transformer.resblocks.1.attn.in_proj_weight", "v"),
    "text_model.encoder.layers.1.mlp.fc1": ("transformer.resblocks.1.mlp.c_fc.weight", None),
}


# ---------------------------------------------------------------- independent merge references

def ref_delta(group: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """The weight difference a group defines, straight from the formats (no runtime code)."""
    g = {k: v.double() for k, v in group.items()}
    if "lora_down.weight" in g:
        down, up = g["lora_down.weight"], g["lora_up.weight"]
        rank = down.shape[0]
        scale = g["alpha"].item() / rank if "alpha" in g else 1.0
        if "lora_mid.weight" in g:  # Tucker: up[o,r] mid[r,s,kh,kw] down[s,i]
            d = torch.einsum("or,rskl,si->oikl", up.flatten(1), g["lora_mid.weight"], down.flatten(1))
        elif down.ndim == 4 and down.shape[2:] != (1, 1):
            d = torch.einsum("or,rikl->oikl", up.flatten(1), down)
        else:
            d = up.flatten(1) @ down.flatten(1)
        return (d * scale).reshape(shape)
    if "hada_w1_a" in g:
        rank = g["hada_w1_b"].shape[0]
        scale = g["alpha"].item() / rank if "alpha" in g else 1.0
        d = (g["hada_w1_a"] @ g["hada_w1_b"]) * (g["hada_w2_a"] @ g["hada_w2_b"])
        return (d * scale).reshape(shape)
    if "lokr_w1" in g or "lokr_w1_a" in g:
        w1 = g["lokr_w1"] if "lokr_w1" in g else g["lokr_w1_a"] @ g["lokr_w1_b"]
        w2 = g["lokr_w2"] if "lokr_w2" in g else g["lokr_w2_a"] @ g["lokr_w2_b"].flatten(1)
        rank = g["lokr_w2_b"].shape[0] if "lokr_w2_b" in g else (g["lokr_w1_b"].shape[0] if "lokr_w1_b" in g else None)
        scale = g["alpha"].item() / rank if rank and "alpha" in g else 1.0
        w2 = w2.reshape(w2.shape[0], -1) if len(shape) == 2 else w2.reshape(w2.shape[0], -1, *shape[2:])
        d = torch.kron(w1, w2) if len(shape) == 2 else torch.kron(w1[:, :, None, None], w2)
        return (d * scale).reshape(shape)
    if "diff" in g:
        return g["diff"].reshape(shape)
    raise AssertionError(f"no reference for {sorted(g)}")


def merge(tensors: dict[str, torch.Tensor], weight_key: str, group: dict[str, torch.Tensor], mult: float,
          rows: slice | None = None) -> None:
    """Add the group's difference (times `mult`) to a checkpoint tensor, in place of a fresh copy."""
    w = tensors[weight_key].double()
    target = w if rows is None else w[rows]
    bias_key = weight_key[: -len("weight")] + "bias"
    if "w_norm" in group:
        target += mult * group["w_norm"].double()
        if "b_norm" in group:
            tensors[bias_key] = (tensors[bias_key].double() + mult * group["b_norm"].double()).float()
    elif "dora_scale" in group:
        # DoRA (A1111's convention): W + mult * (m * (W + dW) / ||W + dW|| - W), the norm per output row
        # when the magnitude is [out, 1, ...] (LyCORIS, PEFT), per input column when it is [1, in, ...].
        adapted = target + ref_delta({k: v for k, v in group.items() if k != "dora_scale"}, tuple(target.shape))
        m = group["dora_scale"].double()
        if m.shape[0] == target.shape[0] and (m.ndim == 1 or m.shape[1] == 1):
            norm = adapted.flatten(1).norm(dim=1).reshape(-1, *[1] * (adapted.ndim - 1))
        else:
            norm = adapted.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *[1] * (adapted.ndim - 2))
        target += mult * (m.reshape(norm.shape) * adapted / norm - target)
    else:
        target += mult * ref_delta(group, tuple(target.shape))
        if "diff_b" in group:
            tensors[bias_key] = (tensors[bias_key].double() + mult * group["diff_b"].double()).float()
    tensors[weight_key] = w.float()


# ---------------------------------------------------------------- adapter files in each key style

def unet_key(style: str, ldm: str, diffusers: str) -> str:
    return {"kohya-ldm": "lora_unet_" + ldm.replace(".", "_"),
            "kohya": "lora_unet_" + diffusers.replace(".", "_"),
            "peft": "unet." + diffusers,
            "lycoris": "lycoris_" + diffusers.replace(".", "_")}[style]


def te_key(style: str, family: str, component: str, hf: str) -> str:
    if style == "peft":
        return ("text_encoder_2." if component == "te2" else "text_encoder.") + hf
    prefix = {"te1": "lora_te1_" if family == "sdxl" else "lora_te_", "te2": "lora_te2_"}[component]
    return prefix + hf.replace(".", "_")


PEFT_NAMES = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}


def file_keys(style: str, layer: str, group: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if style == "peft":  # PEFT stores no alpha: fold alpha/rank into lora_B
        g = dict(group)
        alpha = g.pop("alpha", None)
        if alpha is not None:
            g["lora_up.weight"] = g["lora_up.weight"] * (alpha / g["lora_down.weight"].shape[0])
        return {f"{layer}.{PEFT_NAMES[k]}": v for k, v in g.items()}
    return {f"{layer}.{k}": v for k, v in group.items()}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("src")
    out = {f: factories.write_checkpoint(d / f"{f}.safetensors", f, seed=5) for f in factories.FAMILIES}
    out["sd1-finetune"] = factories.write_checkpoint(d / "sd1-finetune.safetensors", "sd1", seed=6)
    return out


def options_for(shape: tuple[int, ...], options: dict) -> dict:
    """Tucker (`mid`) exists only for kxk convolutions; other layers of the same file get plain LoRA."""
    if options.get("mid") and (len(shape) != 4 or tuple(shape[2:]) == (1, 1)):
        return {k: v for k, v in options.items() if k != "mid"}
    return options


def build_adapter(family: str, style: str, algorithm: str, base: dict[str, torch.Tensor], *, seed: int = 0,
                  unet_mult: float = 1.0, te_mult: float = 1.0, te: bool = True, **options):
    """(adapter file tensors, merged checkpoint tensors) for one family/key style/algorithm."""
    adapter, merged = {}, dict(base)
    if family == "sd1":
        unet_targets = SD1_NORM_TARGETS if algorithm == "norm" else SD1_UNET_TARGETS
    else:  # linear layers that exist in every tiny family
        unet_targets = {k: v for k, v in SD1_UNET_TARGETS.items() if "transformer_blocks" in k}
        if family == "sdxl":  # level 0 has no attention in SDXL
            unet_targets = {"input_blocks.4.1.transformer_blocks.0.attn1.to_q":
                            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
                            "middle_block.1.transformer_blocks.1.ff.net.2":
                            "mid_block.attentions.0.transformer_blocks.1.ff.net.2"}
    for i, (ldm, diff_name) in enumerate(unet_targets.items()):
        wkey = U + ldm + ".weight"
        extra = {"bias": U + ldm + ".bias" in base} if algorithm == "full" else {}
        group = fa.group_for(algorithm, base[wkey].shape, seed=seed * 100 + i,
                             **options_for(tuple(base[wkey].shape), options), **extra)
        adapter.update(file_keys(style, unet_key(style, ldm, diff_name), group))
        merge(merged, wkey, group, unet_mult)
    if te and algorithm != "norm":
        encoders = {"sd1": [("te1", "cond_stage_model.transformer.", "hf")],
                    "sd2": [("te1", "cond_stage_model.model.", "openclip")],
                    "sdxl": [("te1", "conditioner.embedders.0.transformer.", "hf"),
                             ("te2", "conditioner.embedders.1.model.", "openclip")]}[family]
        for j, (component, prefix, layout) in enumerate(encoders):
            names = TE_TARGETS if layout == "hf" else list(OPENCLIP_OF_HF)
            for k, hf in enumerate(names):
                if layout == "hf":
                    wkey, rows = prefix + hf + ".weight", None
                    shape = base[wkey].shape
                else:
                    ocname, part = OPENCLIP_OF_HF[hf]
                    wkey = prefix + ocname
                    width = base[wkey].shape[1]
                    rows = None if part is None else slice("qkv".index(part) * width, ("qkv".index(part) + 1) * width)
                    shape = base[wkey][rows].shape if rows else base[wkey].shape
                extra = {"bias": False} if algorithm == "full" else {}  # keep the reference simple for packed rows
                group = fa.group_for(algorithm, shape, seed=seed * 100 + 50 + 10 * j + k,
                                     **options_for(tuple(shape), options), **extra)
                adapter.update(file_keys(style, te_key(style, family, component, hf), group))
                merge(merged, wkey, group, te_mult, rows)
    return adapter, merged


def run_pair(pair: SourcePair, prompts, adapted_prompts, negatives=("", "ugly")) -> tuple[torch.Tensor, ...]:
    conds = pair.encode(prompts, list(negatives), adapted_prompts, list(negatives), width=64, height=48)
    x = torch.randn(len(prompts), 4, 6, 8, generator=torch.Generator().manual_seed(9)) * 3
    sigma = torch.tensor([3.0, 0.4])
    with pair.running():
        return pair.denoise(x, sigma, conds)


def separate(path: Path, tokenizer, prompts, negatives=("", "ugly")) -> tuple[torch.Tensor, torch.Tensor]:
    """(uncond, cond) predictions of one model on its own, for the reference."""
    model = load_model(path, placement=CPU32, tokenizer=tokenizer, prediction="eps")
    alone = SourcePair(model)
    out = run_pair(alone, prompts, prompts, negatives)
    return out[0], out[1]


PROMPTS = ["a red cat", "a (blue:1.2) dog"]
ADAPTED = ["a red cat, shuimo style", "a (blue:1.2) dog, shuimo style"]


def check_pair(family, style, algorithm, ckpts, tokenizer, tmp_path, **options):
    source = factories.checkpoint_tensors(family, seed=5)
    adapter, merged = build_adapter(family, style, algorithm, source, unet_mult=0.8, te_mult=0.6, **options)
    save_file(adapter, str(tmp_path / "adapter.safetensors"))
    save_file(merged, str(tmp_path / "merged.safetensors"))

    base = load_model(ckpts[family], placement=CPU32, tokenizer=tokenizer, prediction="eps")
    plain = run_pair(SourcePair(base), PROMPTS, ADAPTED)
    adapters = AdapterSet(base.components(), base.family)
    loaded = adapters.add(tmp_path / "adapter.safetensors", unet_multiplier=0.8, te_multiplier=0.6)
    assert not loaded.unmatched
    fused = run_pair(SourcePair(base, adapters), PROMPTS, ADAPTED)

    # base rows: bit for bit the model without adapters
    assert torch.equal(fused[0], plain[0]) and torch.equal(fused[1], plain[1])
    # adapted rows: the merged model on its own
    ref_u, ref_c = separate(tmp_path / "merged.safetensors", tokenizer, ADAPTED)
    for got, want in ((fused[2], ref_u), (fused[3], ref_c)):
        assert (got - plain[2]).abs().max() > 1e-2, "the adapter changed nothing: the comparison would prove nothing"
        assert (got - want).abs().max() <= ATOL
    assert not adapters.attached and not any(m._forward_hooks for c in base.components().values() for m in c.modules())


@pytest.mark.parametrize("style", ["kohya-ldm", "kohya", "peft", "lycoris"])
def test_lora_every_key_style_sd1(style, ckpts, tokenizer, tmp_path):
    check_pair("sd1", style, "lora", ckpts, tokenizer, tmp_path)


@pytest.mark.parametrize("algorithm, options", [
    ("lora", {"mid": True}), ("lora", {"dora": "out"}), ("lora", {"dora": "in"}), ("loha", {}), ("lokr", {}),
    ("lokr", {"w1": "factors"}), ("full", {}), ("norm", {})], ids=lambda v: v if isinstance(v, str) else
    ",".join(f"{k}={x}" for k, x in v.items()) or "plain")
def test_every_algorithm_sd1(algorithm, options, ckpts, tokenizer, tmp_path):
    check_pair("sd1", "kohya-ldm", algorithm, ckpts, tokenizer, tmp_path, **options)


@pytest.mark.parametrize("family, style", [("sd2", "kohya"), ("sdxl", "kohya"), ("sdxl", "peft")])
def test_lora_on_openclip_and_sdxl_encoders(family, style, ckpts, tokenizer, tmp_path):
    check_pair(family, style, "lora", ckpts, tokenizer, tmp_path)


def test_multiplier_zero_is_the_base_model(ckpts, tokenizer, tmp_path):
    source = factories.checkpoint_tensors("sd1", seed=5)
    adapter, _ = build_adapter("sd1", "kohya", "lora", source)
    save_file(adapter, str(tmp_path / "a.safetensors"))
    base = load_model(ckpts["sd1"], placement=CPU32, tokenizer=tokenizer, prediction="eps")
    adapters = AdapterSet(base.components(), base.family)
    adapters.add(tmp_path / "a.safetensors", unet_multiplier=0.0, te_multiplier=0.0)
    out = run_pair(SourcePair(base, adapters), PROMPTS, PROMPTS)
    assert torch.equal(out[2], out[0]) and torch.equal(out[3], out[1])  # adapted rows == base rows, bit for bit


def test_two_adapters_add(ckpts, tokenizer, tmp_path):
    source = factories.checkpoint_tensors("sd1", seed=5)
    first, merged = build_adapter("sd1", "kohya", "lora", source, seed=1, unet_mult=0.7, te_mult=0.7)
    second, merged_both = build_adapter("sd1", "kohya-ldm", "loha", merged, seed=2, unet_mult=-0.5, te_mult=1.2)
    save_file(first, str(tmp_path / "first.safetensors"))
    save_file(second, str(tmp_path / "second.safetensors"))
    save_file(merged_both, str(tmp_path / "merged.safetensors"))
    base = load_model(ckpts["sd1"], placement=CPU32, tokenizer=tokenizer, prediction="eps")
    adapters = AdapterSet(base.components(), base.family)
    adapters.add(tmp_path / "first.safetensors", unet_multiplier=0.7)
    adapters.add(tmp_path / "second.safetensors", unet_multiplier=-0.5, te_multiplier=1.2)
    fused = run_pair(SourcePair(base, adapters), PROMPTS, ADAPTED)
    ref_u, ref_c = separate(tmp_path / "merged.safetensors", tokenizer, ADAPTED)
    assert (fused[2] - ref_u).abs().max() <= ATOL and (fused[3] - ref_c).abs().max() <= ATOL


def test_finetuned_adapted_checkpoint_with_a_lora_on_top(ckpts, tokenizer, tmp_path):
    finetune = factories.checkpoint_tensors("sd1", seed=6)
    adapter, merged = build_adapter("sd1", "kohya", "lora", finetune, unet_mult=0.9, te_mult=0.9)
    save_file(adapter, str(tmp_path / "a.safetensors"))
    save_file(merged, str(tmp_path / "merged.safetensors"))
    base = load_model(ckpts["sd1"], placement=CPU32, tokenizer=tokenizer, prediction="eps")
    tuned = load_model(ckpts["sd1-finetune"], placement=CPU32, tokenizer=tokenizer, prediction="eps")
    adapters = AdapterSet(tuned.components(), tuned.family)
    adapters.add(tmp_path / "a.safetensors", unet_multiplier=0.9)
    out = run_pair(SourcePair(base, adapters, adapted=tuned), PROMPTS, ADAPTED)
    base_u, base_c = separate(ckpts["sd1"], tokenizer, PROMPTS)
    ref_u, ref_c = separate(tmp_path / "merged.safetensors", tokenizer, ADAPTED)
    for got, want in zip(out, (base_u, base_c, ref_u, ref_c)):
        assert (got - want).abs().max() <= ATOL


def test_finetune_of_another_family_is_refused(ckpts, tokenizer):
    base = load_model(ckpts["sd1"], placement=CPU32, tokenizer=tokenizer, prediction="eps")
    other = load_model(ckpts["sdxl"], placement=CPU32, tokenizer=tokenizer)
    with pytest.raises(ModelFileError, match=r"sdxl.safetensors: is SDXL but the source base sd1.safetensors is SD1.x"):
        SourcePair(base, adapted=other)


@pytest.fixture(scope="module")
def sd1(ckpts, tokenizer):
    return load_model(ckpts["sd1"], placement=CPU32, tokenizer=tokenizer, prediction="eps")


def test_adapter_of_another_family_names_both_files(sd1, tmp_path):
    sdxl_source = factories.checkpoint_tensors("sdxl", seed=5)
    adapter, _ = build_adapter("sdxl", "kohya", "lora", sdxl_source)
    save_file(adapter, str(tmp_path / "xl_style.safetensors"))
    adapters = AdapterSet(sd1.components(), sd1.family, source_name="sd1.safetensors")
    with pytest.raises(ModelFileError) as e:
        adapters.add(tmp_path / "xl_style.safetensors")
    msg = str(e.value)
    assert "xl_style.safetensors" in msg and "SDXL adapter" in msg and "sd1.safetensors" in msg and "SD1.x" in msg
    assert adapters.adapters == [] and not adapters.attached


def test_adapter_matching_nothing_and_partial_matches(sd1, tmp_path, caplog):
    adapters = AdapterSet(sd1.components(), sd1.family)
    junk = {"lora_unet_no_such_block_to_q.lora_down.weight": torch.zeros(2, 8),
            "lora_unet_no_such_block_to_q.lora_up.weight": torch.zeros(8, 2)}
    save_file(junk, str(tmp_path / "junk.safetensors"))
    with pytest.raises(ModelFileError, match=r"junk.safetensors: none of its 1 layers matches.*no_such_block"):
        adapters.add(tmp_path / "junk.safetensors")
    source = factories.checkpoint_tensors("sd1", seed=5)
    good, _ = build_adapter("sd1", "kohya", "lora", source, te=False)
    save_file({**good, **junk}, str(tmp_path / "partial.safetensors"))
    with caplog.at_level("WARNING", logger="delta-sampling"):
        loaded = adapters.add(tmp_path / "partial.safetensors")
    assert loaded.unmatched == ["lora_unet_no_such_block_to_q"]
    assert "1 adapter keys match no module" in caplog.text and "no_such_block" in caplog.text
    described = loaded.describe()
    # 1x1 convs and Linears are plain LoRA; the two 3x3 convs (in_layers.2, op) are LoCon
    assert described["format"] == "lora x5, locon x2" and described["rank"] == 4
    assert described["modules"] == {"unet": len(SD1_UNET_TARGETS)} and described["unmatched"] == 1


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_adapter_values(sd1, tmp_path, value):
    source = factories.checkpoint_tensors("sd1", seed=5)
    adapter, _ = build_adapter("sd1", "kohya", "lora", source, te=False)
    key = next(k for k in adapter if k.endswith("lora_up.weight"))
    adapter[key][0, 0] = value
    save_file(adapter, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ModelFileError, match=r"bad.safetensors.*(NaN|infinite)"):
        AdapterSet(sd1.components(), sd1.family).add(tmp_path / "bad.safetensors")


def test_corrupt_adapter_file_and_bad_multiplier(sd1, tmp_path):
    source = factories.checkpoint_tensors("sd1", seed=5)
    adapter, _ = build_adapter("sd1", "kohya", "lora", source, te=False)
    save_file(adapter, str(tmp_path / "ok.safetensors"))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes((tmp_path / "ok.safetensors").read_bytes()[:-64])
    adapters = AdapterSet(sd1.components(), sd1.family)
    with pytest.raises(ModelFileError, match="cut.safetensors.*truncated"):
        adapters.add(cut)
    with pytest.raises(SettingError, match="UNet multiplier"):
        adapters.add(tmp_path / "ok.safetensors", unet_multiplier=float("nan"))
    assert adapters.adapters == []


def test_hooks_are_removed_even_when_the_forward_fails(sd1, tmp_path):
    source = factories.checkpoint_tensors("sd1", seed=5)
    adapter, _ = build_adapter("sd1", "kohya", "lora", source)
    save_file(adapter, str(tmp_path / "a.safetensors"))
    adapters = AdapterSet(sd1.components(), sd1.family)
    adapters.add(tmp_path / "a.safetensors")
    pair = SourcePair(sd1, adapters)
    conds = pair.encode(["x"], [""], ["x"], [""], width=64, height=64)
    with pytest.raises(RuntimeError, match="inside `with pair.running"):
        pair.denoise(torch.zeros(1, 4, 8, 8), torch.ones(1), conds)
    with pytest.raises(RuntimeError):
        with pair.running():
            pair.denoise(torch.zeros(1, 4, 8, 7, 1), torch.ones(1), conds)  # a 5-D latent fails inside the UNet
    assert not adapters.attached
    assert not any(m._forward_hooks for c in sd1.components().values() for m in c.modules())


def test_text_encoder_parts_change_only_the_adapted_encoding(sd1, tmp_path):
    source = factories.checkpoint_tensors("sd1", seed=5)
    adapter, _ = build_adapter("sd1", "kohya", "lora", source)
    te_only = {k: v for k, v in adapter.items() if k.startswith("lora_te_")}
    save_file(te_only, str(tmp_path / "te.safetensors"))
    adapters = AdapterSet(sd1.components(), sd1.family)
    adapters.add(tmp_path / "te.safetensors")
    with_te = SourcePair(sd1, adapters).encode(PROMPTS, ["", "ugly"], PROMPTS, ["", "ugly"], width=64, height=64)
    plain = SourcePair(sd1).encode(PROMPTS, ["", "ugly"], PROMPTS, ["", "ugly"], width=64, height=64)
    assert torch.equal(with_te.base["context"], plain.base["context"])          # base branches untouched
    assert torch.equal(plain.adapted["context"], plain.base["context"])         # same prompts, no adapter
    assert (with_te.adapted["context"] - plain.adapted["context"]).abs().max() > 1e-2
    assert not adapters.attached  # encoding attaches the hooks only while it runs
