"""Tiny random CLIP vision models and IP-Adapters in the real key layouts, for tests.

The names and shapes are written out by hand from the reference definitions, as the spec the
runtime must match:

- CLIP vision (transformers `CLIPVisionModelWithProjection` state dict): `vision_model.embeddings.
  {class_embedding [w], patch_embedding.weight [w, 3, p, p], position_embedding.weight [g*g+1, w]}`,
  `vision_model.pre_layrnorm`, `vision_model.encoder.layers.N.{self_attn.{q,k,v,out}_proj, layer_norm1,
  mlp.fc1 [4w, w], mlp.fc2 [w, 4w], layer_norm2}`, `vision_model.post_layernorm`,
  `visual_projection.weight [proj, w]`.
- IP-Adapter (h94/IP-Adapter `ip_adapter.py` / `resampler.py`), nested as the original .bin:
  {"image_proj": plain {proj [tokens*cross, clip], norm [cross]} or plus {latents [1, q, dim],
  proj_in [dim, clip], proj_out [cross, dim], norm_out, layers.N.0.{norm1, norm2, to_q [inner, dim],
  to_kv [2*inner, dim], to_out [dim, inner]}, layers.N.1.{0 LN, 1 [4*dim, dim], 3 [dim, 4*dim]}},
  "ip_adapter": {"N.to_k_ip.weight" [width, cross], "N.to_v_ip.weight"}} with N = 1, 3, 5, ...
"""

from __future__ import annotations

import torch

from factory_text import _Rand as TextRand

# tiny CLIP vision: 32 px, 8 px patches (16 patches + class token)
IMAGE, PATCH = 32, 8


class _Rand(TextRand):
    """factory_text's random draws, plus a norm layer's pair."""

    def norm(self, sd: dict, name: str, n: int) -> None:
        sd[name + ".weight"] = self.vec(n, base=1.0)
        sd[name + ".bias"] = self.vec(n)


def clip_vision_state(width: int = 64, layers: int = 3, projection: int = 48, image: int = IMAGE,
                      patch: int = PATCH, seed: int = 0, position_ids: bool = False) -> dict[str, torch.Tensor]:
    r = _Rand(seed)
    grid = image // patch
    pre = "vision_model."
    sd = {
        pre + "embeddings.class_embedding": r.table(width),
        pre + "embeddings.patch_embedding.weight":
            torch.randn(width, 3, patch, patch, generator=r.g) / (3 * patch * patch) ** 0.5,
        pre + "embeddings.position_embedding.weight": r.table(grid * grid + 1, width),
    }
    if position_ids:  # stored by older transformers versions
        sd[pre + "embeddings.position_ids"] = torch.arange(grid * grid + 1)[None]
    r.norm(sd, pre + "pre_layrnorm", width)
    for n in range(layers):
        p = f"{pre}encoder.layers.{n}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[p + f"self_attn.{proj}.weight"] = r.linear(width, width)
            sd[p + f"self_attn.{proj}.bias"] = r.vec(width)
        r.norm(sd, p + "layer_norm1", width)
        r.norm(sd, p + "layer_norm2", width)
        sd[p + "mlp.fc1.weight"] = r.linear(4 * width, width)
        sd[p + "mlp.fc1.bias"] = r.vec(4 * width)
        sd[p + "mlp.fc2.weight"] = r.linear(width, 4 * width)
        sd[p + "mlp.fc2.bias"] = r.vec(width)
    r.norm(sd, pre + "post_layernorm", width)
    sd["visual_projection.weight"] = r.linear(projection, width)
    return sd


def plain_image_proj(clip_dim: int, cross: int, tokens: int = 4, seed: int = 1) -> dict[str, torch.Tensor]:
    r = _Rand(seed)
    sd = {"proj.weight": r.linear(tokens * cross, clip_dim), "proj.bias": r.vec(tokens * cross)}
    r.norm(sd, "norm", cross)
    return sd


def plus_image_proj(clip_width: int, cross: int, dim: int = 128, depth: int = 4, heads: int = 2,
                    queries: int = 6, ff_mult: int = 4, seed: int = 2) -> dict[str, torch.Tensor]:
    r = _Rand(seed)
    inner = heads * 64
    sd = {"latents": r.table(1, queries, dim, scale=dim ** -0.5),
          "proj_in.weight": r.linear(dim, clip_width), "proj_in.bias": r.vec(dim),
          "proj_out.weight": r.linear(cross, dim), "proj_out.bias": r.vec(cross)}
    r.norm(sd, "norm_out", cross)
    for n in range(depth):
        p = f"layers.{n}."
        r.norm(sd, p + "0.norm1", dim)
        r.norm(sd, p + "0.norm2", dim)
        sd[p + "0.to_q.weight"] = r.linear(inner, dim)
        sd[p + "0.to_kv.weight"] = r.linear(2 * inner, dim)
        sd[p + "0.to_out.weight"] = r.linear(dim, inner)
        r.norm(sd, p + "1.0", dim)
        sd[p + "1.1.weight"] = r.linear(ff_mult * dim, dim)
        sd[p + "1.3.weight"] = r.linear(dim, ff_mult * dim)
    return sd


def kv_weights(cross: int, widths: list[int], seed: int = 3) -> dict[str, torch.Tensor]:
    """`ip_adapter` part: one (to_k_ip, to_v_ip) pair per width, N = 1, 3, 5, ..."""
    r = _Rand(seed)
    sd = {}
    for k, w in enumerate(widths):
        sd[f"{2 * k + 1}.to_k_ip.weight"] = r.linear(w, cross)
        sd[f"{2 * k + 1}.to_v_ip.weight"] = r.linear(w, cross)
    return sd


def nested_ip_adapter(image_proj: dict, ip_adapter: dict) -> dict[str, dict[str, torch.Tensor]]:
    """The original .bin's object."""
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def flat_ip_adapter(nested: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The .safetensors keys."""
    return {f"{part}.{k}": v for part, sub in nested.items() for k, v in sub.items()}
