"""Adapter key names -> runtime modules, against diffusers' own conversions.

The correspondence between names is learnt independently: a state dict whose every tensor
holds a unique id (and, per row, the row number) goes through diffusers' single-file
converters (`convert_ldm_unet_checkpoint`, `convert_open_clip_checkpoint`); where each
diffusers/HF weight's ids came from is the module (and q/k/v row slice) an adapter layer of
that name must change. File spellings come from diffusers' own LoRA converters where it has
them (PEFT <-> old diffusers <-> kohya), so the names are the ones real files carry.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import factory_text as ft
from factories import FAMILIES, unet_config
from lib_deltasampling.runtime.adapters.keys import (CANONICAL_SUFFIXES, KeyMap, Target, dora_scale_on_output,
                                                      group_layers, split_key)
from lib_deltasampling.runtime.checkpoint import TensorStore
from lib_deltasampling.runtime.text.clip import build_clip_text, clip_text_config
from lib_deltasampling.runtime.unet import UNetModel

pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint,  # noqa: E402
                                                 convert_open_clip_checkpoint, create_unet_diffusers_config_from_ldm)
from diffusers.utils.state_dict_utils import (DIFFUSERS_OLD_TO_PEFT, UNET_TO_DIFFUSERS,  # noqa: E402
                                              convert_state_dict, convert_state_dict_to_diffusers,
                                              convert_state_dict_to_kohya)
from transformers import CLIPTextConfig, CLIPTextModelWithProjection  # noqa: E402

UNET_PREFIX = "model.diffusion_model."
ROW = 4096  # id encoding: value = key_id * ROW + row (exact in fp32 below 2**24)
WEIGHTED = (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm)


def flat(name: str) -> str:
    return name.replace(".", "_")


def ids_like(shapes: dict[str, torch.Size]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """One tensor per key, each element = key id * ROW + its row (first-dim index)."""
    names = list(shapes)
    out = {}
    for i, k in enumerate(names):
        shape = shapes[k]
        rows = torch.arange(shape[0], dtype=torch.float32) if len(shape) else torch.zeros(())
        out[k] = (i * ROW + rows).reshape(-1, *([1] * (len(shape) - 1))).expand(shape) if len(shape) else rows + i * ROW
    return out, names


def source_of(t: torch.Tensor, names: list[str]) -> tuple[str, int, int]:
    """(source key, first row, end row) of a tensor built by `ids_like`, possibly row-sliced."""
    rows = t.reshape(t.shape[0], -1)[:, 0] if t.dim() else t.reshape(1)
    ids = (rows // ROW).long()
    assert (ids == ids[0]).all(), "one converted tensor mixes several source tensors"
    r = (rows % ROW).long()
    assert torch.equal(r, torch.arange(int(r[0]), int(r[0]) + len(r))), "rows are not one contiguous slice"
    return names[int(ids[0])], int(r[0]), int(r[-1]) + 1


# ---------------------------------------------------------------- models

def original_unet_params(c) -> dict:
    """The ldm/sgm yaml `unet_config.params` a `UNetConfig` corresponds to."""
    assert len(set(c.num_res_blocks)) == 1
    starts = [sum(c.num_res_blocks[:i]) for i in range(len(c.channel_mult))]
    per_level = [c.transformer_depth[s] for s in starts]
    depths = {d for d in per_level if d}
    p = dict(in_channels=c.in_channels, out_channels=c.out_channels, model_channels=c.model_channels,
             attention_resolutions=[2 ** i for i, d in enumerate(per_level) if d], num_res_blocks=c.num_res_blocks[0],
             channel_mult=list(c.channel_mult), context_dim=c.context_dim,
             use_linear_in_transformer=c.use_linear_in_transformer,
             transformer_depth=depths.pop() if len(depths) == 1 else per_level)
    if isinstance(p["transformer_depth"], list):  # diffusers' mid block takes the last level's depth
        assert per_level[-1] == c.transformer_depth_middle
    p.update({"num_heads": c.num_heads} if c.num_heads else {"num_head_channels": c.num_head_channels})
    if c.adm_in_channels:
        p.update(num_classes="sequential", adm_in_channels=c.adm_in_channels)
    return p


class UNetPair:
    """Our UNet (meta), diffusers' UNet of the same config (meta), and which LDM weight each
    diffusers weight comes from according to diffusers' converter."""

    def __init__(self, family: str) -> None:
        config = unet_config(family)
        self.ours = UNetModel(config, device="meta")
        shapes = {UNET_PREFIX + k: v.shape for k, v in self.ours.state_dict().items()}
        ckpt, self.names = ids_like(shapes)
        original = {"model": {"params": {"unet_config": {"params": original_unet_params(config)},
                                         "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}
        dconfig = create_unet_diffusers_config_from_ldm(original, ckpt)
        if family == "sdxl":  # diffusers spots SDXL by its real context width; name text_time explicitly
            dconfig.update(class_embed_type=None, addition_embed_type="text_time", addition_time_embed_dim=256)
        with torch.device("meta"):
            self.ref = UNet2DConditionModel(**dconfig)
        self.converted = convert_ldm_unet_checkpoint(ckpt, self.ref.config)
        assert set(self.converted) == set(self.ref.state_dict()), "diffusers' conversion must fill its model exactly"

    def expected(self) -> dict[str, Target]:
        """diffusers module name -> the Target its weight comes from."""
        out = {}
        for name, module in self.ref.named_modules():
            if isinstance(module, WEIGHTED) and module.weight is not None:
                src, r0, r1 = source_of(self.converted[name + ".weight"], self.names)
                assert src.startswith(UNET_PREFIX) and src.endswith(".weight") and r0 == 0
                out[name] = Target("unet", src[len(UNET_PREFIX):-len(".weight")])
        return out


def hf_text(width: int, layers: int) -> nn.Module:
    cfg = clip_text_config(TensorStore.from_dict(ft.hf_clip_text_state(width, layers)))
    with torch.device("meta"):
        return build_clip_text(cfg)


def openclip_text(width: int, layers: int, projection: int | None) -> nn.Module:
    cfg = clip_text_config(TensorStore.from_dict(ft.openclip_text_state(width, layers, projection)))
    with torch.device("meta"):
        return build_clip_text(cfg)


TEXT = {  # family -> {component: (layout, width, layers, projection)}
    "sd1": {"te1": ("hf", *ft.CLIP_L, None)},
    "sd2": {"te1": ("openclip", *ft.CLIP_H, ft.CLIP_H[0])},
    "sdxl": {"te1": ("hf", *ft.CLIP_L, None), "te2": ("openclip", *ft.CLIP_G, ft.CLIP_G_PROJ)},
}


def text_models(family: str) -> dict[str, nn.Module]:
    return {c: hf_text(w, n) if layout == "hf" else openclip_text(w, n, p)
            for c, (layout, w, n, p) in TEXT[family].items()}


@pytest.fixture(scope="module", params=FAMILIES)
def family_maps(request):
    family = request.param
    pair = UNetPair(family)
    texts = text_models(family)
    return family, pair, KeyMap.build(family, pair.ours, texts)


# ---------------------------------------------------------------- UNet

def test_unet_every_diffusers_layer_resolves_in_every_style(family_maps):
    family, pair, km = family_maps
    expected = pair.expected()
    assert len(expected) > 50
    for dname, want in expected.items():
        ldm = want.module
        spellings = [
            f"lora_unet_{flat(dname)}", f"lycoris_{flat(dname)}",                     # kohya SD1/SD2, SimpleTuner
            f"unet.{dname}", dname, f"base_model.model.{dname}", f"unet.base_model.model.{dname}",  # diffusers/PEFT
            f"lora_unet_{flat(ldm)}", f"lycoris_{flat(ldm)}",                         # kohya SDXL (LDM names)
            f"diffusion_model.{ldm}", ldm,                                            # ComfyUI generic
        ]
        for s in spellings:
            assert km.resolve(s) == want, f"{family}: {s} -> {km.resolve(s)}, want {want}"
    # ...and every adaptable weight of our UNet is one diffusers has (nothing left unreachable).
    assert set(expected.values()) == km.targets("unet")


def test_unet_block_numbering_matches_a1111_for_real_sd_layout():
    """A1111's `convert_diffusers_name_to_compvis` hard-codes the real layout (2 res blocks):
    input block 1 + 3i + j, output block 3i + j, downsampler 3 + 3i, upsampler 2 + 3i (index 2, 1 for level 0 of up)."""
    import dataclasses

    from factory_unet import sd1_config
    from lib_deltasampling.runtime.adapters.keys import unet_block_names

    c = dataclasses.replace(sd1_config(), channel_mult=(1, 2, 4, 4), num_res_blocks=(2, 2, 2, 2),
                            transformer_depth=(1, 1, 1, 1, 1, 1, 0, 0),
                            transformer_depth_output=(0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1))
    names = unet_block_names(c)
    inverse = {v: k for k, v in names.items()}
    for i in range(4):
        for j in range(2):
            assert inverse[f"down_blocks.{i}.resnets.{j}"] == f"input_blocks.{1 + 3 * i + j}.0"
        for j in range(3):
            assert inverse[f"up_blocks.{i}.resnets.{j}"] == f"output_blocks.{3 * i + j}.0"
    for i in range(3):
        assert inverse[f"down_blocks.{i}.downsamplers.0.conv"] == f"input_blocks.{3 + 3 * i}.0.op"
        assert inverse[f"up_blocks.{i}.upsamplers.0.conv"] == f"output_blocks.{2 + 3 * i}.{2 if i > 0 else 1}.conv"


# ---------------------------------------------------------------- text encoders

def hf_reference_names(width: int, layers: int) -> list[str]:
    """Adaptable layer names of transformers' own CLIP text model (`text_model.` level kept)."""
    cfg = CLIPTextConfig(vocab_size=ft.VOCAB, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                         num_attention_heads=width // 64, max_position_embeddings=ft.CONTEXT, projection_dim=width)
    with torch.device("meta"):
        model = CLIPTextModelWithProjection(cfg)
    return [n for n, m in model.named_modules() if n.startswith("text_model.") and isinstance(m, WEIGHTED)]


def openclip_reference(component: str, width: int, layers: int, projection: int) -> dict[str, Target]:
    """HF layer name -> Target, from where diffusers' OpenCLIP conversion takes each HF weight."""
    state = ft.openclip_text_state(width, layers, projection)
    prefix = "cond_stage_model.model."
    ckpt, names = ids_like({prefix + k: v.shape for k, v in state.items()})
    dummy = SimpleNamespace(config=SimpleNamespace(hidden_size=width))
    converted = convert_open_clip_checkpoint(dummy, ckpt, prefix=prefix)
    out = {}
    for key, t in converted.items():
        if not key.endswith(".weight") or "embedding" in key or "text_projection" in key:
            continue
        src, r0, r1 = source_of(t, names)
        module, _, param = src[len(prefix):].rpartition(".")
        rows = None if (r0, r1) == (0, ckpt[src].shape[0]) else (r0, r1)
        out[key[: -len(".weight")]] = Target(component, module, param, rows)
    return out


def text_prefixes(component: str) -> tuple[list[str], list[str]]:
    """(flat prefixes, dotted prefixes) files use for one text encoder."""
    if component == "te1":
        return ["lora_te_", "lora_te1_"], ["text_encoder.", "text_encoder.base_model.model."]
    return ["lora_te2_"], ["text_encoder_2."]


def test_text_encoder_layers_resolve(family_maps):
    family, _, km = family_maps
    for component, (layout, width, layers, projection) in TEXT[family].items():
        if layout == "hf":
            want = {n: Target(component, n) for n in hf_reference_names(width, layers)}
        else:
            want = openclip_reference(component, width, layers, projection)
        assert len(want) == 8 * layers + 1  # q, k, v, out, fc1, fc2, 2 norms per layer + final norm
        flat_prefixes, dotted_prefixes = text_prefixes(component)
        for name, target in want.items():
            short = name[len("text_model."):]  # transformers 5 CLIPTextModel naming
            spellings = ([p + flat(name) for p in flat_prefixes] + [p + flat(short) for p in flat_prefixes]
                         + [p + name for p in dotted_prefixes] + [p + short for p in dotted_prefixes])
            for s in spellings:
                assert km.resolve(s) == target, f"{family}: {s} -> {km.resolve(s)}, want {target}"
        if layout == "openclip":
            qkv = [t for n, t in want.items() if n.endswith(("q_proj", "k_proj", "v_proj"))]
            assert {t.rows for t in qkv} == {(0, width), (width, 2 * width), (2 * width, 3 * width)}
            assert all(t.param == "in_proj_weight" and t.module.endswith(".attn") for t in qkv)


def test_text_encoder_components_are_family_specific(family_maps):
    family, _, km = family_maps
    name = "text_model.encoder.layers.0.mlp.fc1"
    te2 = km.resolve("lora_te2_" + flat(name))
    assert (te2 is not None) == (family == "sdxl")
    assert km.resolve("text_encoder_2." + name) == te2
    assert km.resolve("lora_te_" + flat(name)).component == "te1"
    assert km.resolve("lora_te_text_model_encoder_layers_99_mlp_fc1") is None
    assert km.resolve("lora_unet_" + flat(name)) is None  # a TE name under the UNet prefix is not a UNet layer


# ---------------------------------------------------------------- spellings (group_layers)

def test_group_layers_kohya_lycoris_algorithms():
    layer = "lora_unet_down_blocks_0_attentions_0_proj_in"
    keys = [f"{layer}.{s}" for s in CANONICAL_SUFFIXES]
    groups, unknown = group_layers(keys)
    assert unknown == []
    assert groups == {layer: {s: f"{layer}.{s}" for s in CANONICAL_SUFFIXES}}


def test_group_layers_reports_unknown_and_duplicate_keys():
    keys = ["lora_unet_x.lora_down.weight", "lora_unet_x.lora_up.weight", "lora_unet_x.oft_blocks",
            "bundle_emb.tok.string_to_param.*", "lora_unet_x.lora_A.weight", "something"]
    groups, unknown = group_layers(keys)
    assert groups == {"lora_unet_x": {"lora_down.weight": "lora_unet_x.lora_down.weight",
                                      "lora_up.weight": "lora_unet_x.lora_up.weight"}}
    assert unknown == ["lora_unet_x.oft_blocks", "bundle_emb.tok.string_to_param.*",
                       "lora_unet_x.lora_A.weight", "something"]


def peft_keys(names: list[str], prefix: str, dora: bool) -> dict[str, torch.Tensor]:
    sd = {}
    for n in names:
        sd[f"{prefix}{n}.lora_A.weight"] = torch.zeros(2, 1)
        sd[f"{prefix}{n}.lora_B.weight"] = torch.zeros(1, 2)
        if dora:
            sd[f"{prefix}{n}.lora_magnitude_vector"] = torch.zeros(1)
    return sd


def assert_same_layers(km: KeyMap, a: dict, b: dict) -> None:
    """Two spellings of one file: same targets, same suffixes per target."""
    def by_target(keys):
        groups, unknown = group_layers(keys)
        assert unknown == [], unknown[:5]
        out = {}
        for layer, parts in groups.items():
            target = km.resolve(layer)
            assert target is not None, layer
            out.setdefault(target, set()).update(set(parts) - {"alpha"})  # kohya conversion adds alphas
        return out
    ta, tb = by_target(a), by_target(b)
    assert ta == tb


def test_group_layers_diffusers_spellings_resolve_alike(family_maps):
    """PEFT keys, diffusers' conversion of them (`lora.down`, `lora_linear_layer`), diffusers' kohya
    conversion (`lora_unet_`, `lora_te1_`), and old attention-processor keys converted by diffusers'
    own tables all land on the same runtime weights."""
    family, pair, km = family_maps
    unet_names = list(pair.expected())
    text = {c: hf_reference_names(w, n) for c, (_, w, n, _) in TEXT[family].items()}
    peft = {**peft_keys(unet_names, "unet.", dora=False),
            **peft_keys(text["te1"], "text_encoder.", dora=False),
            **(peft_keys(text["te2"], "text_encoder_2.", dora=False) if "te2" in text else {})}
    assert_same_layers(km, peft, convert_state_dict_to_diffusers(dict(peft)))
    assert_same_layers(km, peft, convert_state_dict_to_kohya(dict(peft)))
    kohya = convert_state_dict_to_kohya(dict(peft))
    assert any(k.startswith("lora_te1_") for k in kohya) and any(k.startswith("lora_unet_") for k in kohya)

    # Old attention-processor files: diffusers' own maps to PEFT names are the reference.
    attn = [n for n in unet_names if n.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))]
    old_unet = {}
    for n in attn:
        base = n[: -len(".0")] if n.endswith(".to_out.0") else n
        head, _, proj = base.rpartition(".")
        for d in ("down", "up"):
            old_unet[f"unet.{head}.processor.{proj}_lora.{d}.weight"] = torch.zeros(1)
    assert_same_layers(km, old_unet, convert_state_dict(dict(old_unet), UNET_TO_DIFFUSERS))
    old_te = {}
    for n in text["te1"]:
        if n.endswith(("q_proj", "k_proj", "v_proj", "out_proj")):
            head, _, proj = n.rpartition(".")
            for d in ("down", "up"):
                old_te[f"text_encoder.{head}.to_{proj[:-5] if proj != 'out_proj' else 'out'}_lora.{d}.weight"] = 0
    converted = convert_state_dict(dict(old_te), DIFFUSERS_OLD_TO_PEFT)
    assert any(".q_proj.lora_A" in k for k in converted)
    assert_same_layers(km, old_te, {k if k.endswith(".weight") else k + ".weight": v for k, v in converted.items()})


def test_peft_dora_magnitude_is_dora_scale(family_maps):
    family, pair, km = family_maps
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0"
    for key in (f"unet.{name}.lora_magnitude_vector", f"unet.{name}.lora_magnitude_vector.default.weight",
                f"{name}.lora_magnitude_vector.weight", f"unet.{name[:-2]}.lora_magnitude_vector"):
        layer, suffix = split_key(key)
        assert suffix == "dora_scale" and km.resolve(layer) == pair.expected()[name], key
    layer, suffix = split_key(f"lora_unet_{flat(name)}.dora_scale")
    assert suffix == "dora_scale" and km.resolve(layer) == pair.expected()[name]


def test_dora_scale_axis():
    # PEFT: always per output ([out] Linear, [1, out, 1, 1] Conv2d), even for square layers
    assert dora_scale_on_output("a.lora_magnitude_vector", (8,), (8, 8))
    assert dora_scale_on_output("a.lora_magnitude_vector", (1, 8, 1, 1), (8, 8, 3, 3))
    # LyCORIS wd_on_out=True: [out, 1...]; before: [1, in...]
    assert dora_scale_on_output("a.dora_scale", (16, 1), (16, 8))
    assert dora_scale_on_output("a.dora_scale", (8, 1, 1, 1), (8, 8, 3, 3))
    assert not dora_scale_on_output("a.dora_scale", (1, 8), (16, 8))
    assert not dora_scale_on_output("a.dora_scale", (1, 8, 1, 1), (8, 8, 3, 3))


def test_peft_real_adapter_keys(family_maps):
    """Optional: a real PEFT adapter on diffusers' UNet (all adaptable layers, DoRA) groups and resolves."""
    peft = pytest.importorskip("peft")
    from peft.utils import get_peft_model_state_dict

    family, pair, km = family_maps
    expected = pair.expected()
    dconfig = dict(pair.ref.config)
    ref = UNet2DConditionModel(**{k: v for k, v in dconfig.items() if not k.startswith("_")})
    targets = [n for n in expected if isinstance(ref.get_submodule(n), (nn.Linear, nn.Conv2d))]
    ref.add_adapter(peft.LoraConfig(r=2, lora_alpha=2, target_modules=targets, use_dora=True))
    sd = {"unet." + k: v for k, v in get_peft_model_state_dict(ref).items()}
    groups, unknown = group_layers(sd)
    assert unknown == []
    assert len(groups) == len(targets)
    for layer, parts in groups.items():
        assert set(parts) == {"lora_down.weight", "lora_up.weight", "dora_scale"}
        assert km.resolve(layer) == expected[layer[len("unet."):]]
