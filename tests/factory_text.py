"""Tiny random text encoders in the real checkpoint key layouts.

The key names and shapes below are written out by hand from the two reference
definitions, and are the independent spec the runtime's modules must match:

- HF layout (`transformers` CLIPTextModel as stored in SD1/SDXL files, `text_model.` naming):
  embeddings.token_embedding.weight [vocab, w], embeddings.position_embedding.weight [77, w],
  embeddings.position_ids [1, 77] (int64 buffer kept by older transformers),
  encoder.layers.N.self_attn.{q,k,v,out}_proj.{weight [w, w], bias [w]},
  encoder.layers.N.layer_norm{1,2}.{weight,bias} [w], encoder.layers.N.mlp.fc1 [4w, w] / fc2 [w, 4w],
  final_layer_norm.{weight,bias}.
- OpenCLIP layout (open_clip `CLIP` with `model.visual` deleted, as ldm/sgm store it):
  token_embedding.weight [vocab, w], positional_embedding [77, w],
  transformer.resblocks.N.ln_1/ln_2.{weight,bias}, .attn.in_proj_weight [3w, w], .attn.in_proj_bias [3w],
  .attn.out_proj.{weight [w, w], bias}, .mlp.c_fc.{weight [4w, w], bias}, .mlp.c_proj.{weight [w, 4w], bias},
  ln_final.{weight,bias}, text_projection [w, proj], logit_scale [] (unused).

Widths are multiples of 64 (heads = width // 64, as in the real models) so several heads are exercised.
"""

from __future__ import annotations

import torch

VOCAB = 49408
CONTEXT = 77

# tiny sizes: (width, layers); real: CLIP-L (768, 12), OpenCLIP-H (1024, 24), bigG (1280, 32)
CLIP_L = (128, 3)
CLIP_H = (128, 3)
CLIP_G = (192, 3)
CLIP_G_PROJ = 96   # != width, so a transposed projection cannot pass


class _Rand:
    def __init__(self, seed: int) -> None:
        self.g = torch.Generator().manual_seed(seed)

    def linear(self, out_f: int, in_f: int) -> torch.Tensor:
        return torch.randn(out_f, in_f, generator=self.g) / in_f ** 0.5

    def vec(self, n: int, scale: float = 0.1, base: float = 0.0) -> torch.Tensor:
        return base + scale * torch.randn(n, generator=self.g)

    def table(self, *shape: int, scale: float = 0.5) -> torch.Tensor:
        return scale * torch.randn(*shape, generator=self.g)


def hf_clip_text_state(width: int = CLIP_L[0], layers: int = CLIP_L[1], seed: int = 0,
                       position_ids: bool = True, text_model_prefix: bool = True) -> dict[str, torch.Tensor]:
    r = _Rand(seed)
    pre = "text_model." if text_model_prefix else ""
    sd = {
        f"{pre}embeddings.token_embedding.weight": r.table(VOCAB, width),
        f"{pre}embeddings.position_embedding.weight": r.table(CONTEXT, width),
    }
    if position_ids:
        sd[f"{pre}embeddings.position_ids"] = torch.arange(CONTEXT)[None]
    for n in range(layers):
        p = f"{pre}encoder.layers.{n}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[p + f"self_attn.{proj}.weight"] = r.linear(width, width)
            sd[p + f"self_attn.{proj}.bias"] = r.vec(width)
        for ln in ("layer_norm1", "layer_norm2"):
            sd[p + f"{ln}.weight"] = r.vec(width, base=1.0)
            sd[p + f"{ln}.bias"] = r.vec(width)
        sd[p + "mlp.fc1.weight"] = r.linear(4 * width, width)
        sd[p + "mlp.fc1.bias"] = r.vec(4 * width)
        sd[p + "mlp.fc2.weight"] = r.linear(width, 4 * width)
        sd[p + "mlp.fc2.bias"] = r.vec(width)
    sd[f"{pre}final_layer_norm.weight"] = r.vec(width, base=1.0)
    sd[f"{pre}final_layer_norm.bias"] = r.vec(width)
    return sd


def openclip_text_state(width: int, layers: int, projection: int | None, seed: int = 1,
                        logit_scale: bool = True, visual: bool = False) -> dict[str, torch.Tensor]:
    r = _Rand(seed)
    sd = {
        "token_embedding.weight": r.table(VOCAB, width),
        "positional_embedding": r.table(CONTEXT, width),
    }
    for n in range(layers):
        p = f"transformer.resblocks.{n}."
        sd[p + "ln_1.weight"] = r.vec(width, base=1.0)
        sd[p + "ln_1.bias"] = r.vec(width)
        sd[p + "attn.in_proj_weight"] = r.linear(3 * width, width)
        sd[p + "attn.in_proj_bias"] = r.vec(3 * width)
        sd[p + "attn.out_proj.weight"] = r.linear(width, width)
        sd[p + "attn.out_proj.bias"] = r.vec(width)
        sd[p + "ln_2.weight"] = r.vec(width, base=1.0)
        sd[p + "ln_2.bias"] = r.vec(width)
        sd[p + "mlp.c_fc.weight"] = r.linear(4 * width, width)
        sd[p + "mlp.c_fc.bias"] = r.vec(4 * width)
        sd[p + "mlp.c_proj.weight"] = r.linear(width, 4 * width)
        sd[p + "mlp.c_proj.bias"] = r.vec(width)
    sd["ln_final.weight"] = r.vec(width, base=1.0)
    sd["ln_final.bias"] = r.vec(width)
    if projection is not None:
        sd["text_projection"] = r.linear(width, projection).contiguous()
    if logit_scale:
        sd["logit_scale"] = torch.tensor(4.6052)
    if visual:  # a few keys of a visual tower some merged files keep; the runtime must ignore them
        sd["visual.class_embedding"] = r.vec(32)
        sd["visual.conv1.weight"] = r.table(32, 3, 2, 2)
    return sd


def _prefixed(prefix: str, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in sd.items()}


def sd1_text_checkpoint(seed: int = 0, **kw) -> dict[str, torch.Tensor]:
    return _prefixed("cond_stage_model.transformer.", hf_clip_text_state(*CLIP_L, seed=seed, **kw))


def sd2_text_checkpoint(seed: int = 1, **kw) -> dict[str, torch.Tensor]:
    # SD2 files keep text_projection and logit_scale (unused by SD2)
    kw.setdefault("visual", True)
    return _prefixed("cond_stage_model.model.", openclip_text_state(*CLIP_H, projection=CLIP_H[0], seed=seed, **kw))


def sdxl_text_checkpoint(seed: int = 2) -> dict[str, torch.Tensor]:
    return {**_prefixed("conditioner.embedders.0.transformer.", hf_clip_text_state(*CLIP_L, seed=seed)),
            **_prefixed("conditioner.embedders.1.model.", openclip_text_state(*CLIP_G, projection=CLIP_G_PROJ,
                                                                              seed=seed + 1))}
