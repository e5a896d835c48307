"""CLIP text transformers in the two key layouts found in SD checkpoints.

Module names are exactly the checkpoint names, so `load_strict` fills them directly:

- HF layout (`transformers` CLIPTextModel, CLIP ViT-L/14): SD1 `cond_stage_model.transformer.*`,
  SDXL `conditioner.embedders.0.transformer.*`. quick_gelu.
- OpenCLIP layout (open_clip `CLIP` text tower): SD2 `cond_stage_model.model.*` (ViT-H/14),
  SDXL `conditioner.embedders.1.model.*` (ViT-bigG/14, with `text_projection`). Exact (erf) gelu,
  `attn.in_proj_weight` packs q, k, v.

Both are pre-norm causal transformers over 77 positions. The models only run blocks and
expose the pieces (`hidden`, `run_blocks`, `final_norm`, `pool`); which layer and which norm a
family uses (clip skip, penultimate, pooled) is decided in `encode.py`, next to the A1111
source it follows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ModelFileError
from ..attention import attention
from ..checkpoint import TensorStore

HEAD_CHANNELS = 64  # every CLIP text tower used by SD (L: 12 heads, H: 16, bigG: 20) has 64 channels per head


@dataclass(frozen=True)
class ClipTextConfig:
    layout: str                  # "hf" | "openclip"
    width: int
    layers: int
    heads: int
    mlp_width: int
    vocab: int
    context: int                 # positions (77)
    projection_dim: int | None   # OpenCLIP `text_projection` [width, projection_dim], when stored
    act: str                     # "quick_gelu" | "gelu"

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


class EncoderDims(Protocol):
    """What the HF-layout encoder layers need from a config: `ClipTextConfig` and the vision
    tower's `ClipVisionConfig` (runtime/clip_vision.py) both provide it."""

    width: int
    layers: int
    heads: int
    mlp_width: int
    act: str


@dataclass
class TokenFixes:
    """Rows of the token embedding replaced before position embedding (textual inversion).

    `mask` [N, T] bool marks replaced rows, `values` [N, T, width] holds their vectors
    (A1111 `sd_hijack.EmbeddingsWithFixes`, applied to the token embedding output).
    """

    mask: torch.Tensor
    values: torch.Tensor


def _count_indexed(store: TensorStore, pattern: str) -> int:
    """Number of consecutive N for keys matching `pattern` (a regex with one (\\d+) group)."""
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in store.keys() if (m := rx.match(k))}
    n = 0
    while n in found:
        n += 1
    return n


def clip_text_config(store: TensorStore) -> ClipTextConfig:
    """Derive the config from shapes; `store` holds one text encoder's keys without their prefix."""
    path = store.path or "(in memory)"
    if "text_model.embeddings.token_embedding.weight" in store:
        vocab, width = store.shape("text_model.embeddings.token_embedding.weight")
        context = store.shape("text_model.embeddings.position_embedding.weight")[0]
        layers = _count_indexed(store, r"text_model\.encoder\.layers\.(\d+)\.")
        mlp_width = store.shape("text_model.encoder.layers.0.mlp.fc1.weight")[0] if layers else 4 * width
        layout, act, proj = "hf", "quick_gelu", None
    elif "token_embedding.weight" in store:
        vocab, width = store.shape("token_embedding.weight")
        context = store.shape("positional_embedding")[0] if "positional_embedding" in store else 0
        layers = _count_indexed(store, r"transformer\.resblocks\.(\d+)\.")
        mlp_width = store.shape("transformer.resblocks.0.mlp.c_fc.weight")[0] if layers else 4 * width
        layout, act = "openclip", "gelu"
        proj = store.shape("text_projection")[1] if "text_projection" in store else None
    else:
        raise ModelFileError(path, f"no CLIP text encoder under '{store.prefix}' (token embedding missing)",
                             "The checkpoint lacks its text encoder or uses an unsupported layout")
    if layers == 0 or width % HEAD_CHANNELS:
        raise ModelFileError(path, f"text encoder under '{store.prefix}' has {layers} layers and width {width}",
                             "Expected a CLIP text transformer (width a multiple of 64); the file may be damaged")
    return ClipTextConfig(layout=layout, width=width, layers=layers, heads=width // HEAD_CHANNELS,
                          mlp_width=mlp_width, vocab=vocab, context=context, projection_dim=proj, act=act)


def _act(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "quick_gelu":  # OpenAI CLIP's approximation, kept by HF CLIP-L (hidden_act="quick_gelu")
        return x * torch.sigmoid(1.702 * x)
    return F.gelu(x)


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """[N, T, C] x3 -> [N, T, C]; each token sees itself and earlier tokens only."""
    n, t, c = q.shape
    q, k, v = (z.view(n, t, heads, c // heads).transpose(1, 2) for z in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return out.transpose(1, 2).reshape(n, t, c)


class _ClipTextBase(nn.Module):
    """Shared forward: embed -> blocks -> (final norm, pool); subclasses name the parts."""

    config: ClipTextConfig

    def _token_embedding(self) -> nn.Embedding:
        raise NotImplementedError

    def _position_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def _blocks(self) -> nn.ModuleList:
        raise NotImplementedError

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def embed(self, ids: torch.Tensor, fixes: TokenFixes | None = None) -> torch.Tensor:
        """Token embedding, textual-inversion rows replaced, then position embedding added."""
        x = self._token_embedding()(ids)
        if fixes is not None:
            x = torch.where(fixes.mask[..., None], fixes.values.to(x.dtype), x)
        return x + self._position_weight()[: ids.shape[1]].to(x.dtype)

    def run_blocks(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        for block in self._blocks()[start:stop]:
            x = block(x)
        return x

    def hidden(self, ids: torch.Tensor, fixes: TokenFixes | None = None, layers: int | None = None) -> torch.Tensor:
        """Output of the first `layers` blocks (all by default), before the final norm.

        HF `hidden_states[i]` is `hidden(ids, layers=i)`; `hidden_states[-n]` is `layers=L+1-n`.
        """
        n = self.config.layers if layers is None else layers
        return self.run_blocks(self.embed(ids, fixes), 0, n)

    def forward(self, ids: torch.Tensor, fixes: TokenFixes | None = None) -> torch.Tensor:
        """Final-normed last layer ([N, T, width]), like HF `last_hidden_state`."""
        return self.final_norm(self.hidden(ids, fixes))

    @staticmethod
    def eos_rows(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Rows at the end-of-text token: the highest id of each sequence (open_clip / sgm `pool`)."""
        return x[torch.arange(x.shape[0], device=x.device), ids.argmax(dim=-1)]


# ---------------------------------------------------------------- HF layout (CLIP-L)
# The layer classes are shared with the CLIP vision tower (runtime/clip_vision.py), which
# builds them with causal=False: text tokens see earlier tokens only, image patches see all.

class HFAttention(nn.Module):
    def __init__(self, cfg: EncoderDims, causal: bool = True) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.causal = causal
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        out = _causal_attention(q, k, v, self.heads) if self.causal else attention(q, k, v, self.heads)
        return self.out_proj(out)


class HFMLP(nn.Module):
    def __init__(self, cfg: EncoderDims) -> None:
        super().__init__()
        self.act = cfg.act
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_width)
        self.fc2 = nn.Linear(cfg.mlp_width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(_act(self.act, self.fc1(x)))


class HFLayer(nn.Module):
    def __init__(self, cfg: EncoderDims, causal: bool = True) -> None:
        super().__init__()
        self.self_attn = HFAttention(cfg, causal)
        self.layer_norm1 = nn.LayerNorm(cfg.width)
        self.mlp = HFMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class HFEmbeddings(nn.Module):
    def __init__(self, cfg: ClipTextConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab, cfg.width)
        self.position_embedding = nn.Embedding(cfg.context, cfg.width)


class HFEncoder(nn.Module):
    def __init__(self, cfg: EncoderDims, causal: bool = True) -> None:
        super().__init__()
        self.layers = nn.ModuleList(HFLayer(cfg, causal) for _ in range(cfg.layers))


class HFTextTransformer(nn.Module):
    def __init__(self, cfg: ClipTextConfig) -> None:
        super().__init__()
        self.embeddings = HFEmbeddings(cfg)
        self.encoder = HFEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width)


class HFClipText(_ClipTextBase):
    """Keys `text_model.*` as in `transformers` CLIPTextModel (4.x naming, as stored in SD files)."""

    def __init__(self, cfg: ClipTextConfig) -> None:
        super().__init__()
        self.config = cfg
        self.text_model = HFTextTransformer(cfg)

    def _token_embedding(self) -> nn.Embedding:
        return self.text_model.embeddings.token_embedding

    def _position_weight(self) -> torch.Tensor:
        return self.text_model.embeddings.position_embedding.weight

    def _blocks(self) -> nn.ModuleList:
        return self.text_model.encoder.layers

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.text_model.final_layer_norm(x)


# ---------------------------------------------------------------- OpenCLIP layout (ViT-H, ViT-bigG)

class PackedProjection(nn.Module):
    """The packed q/k/v projection as a call of its own, holding no parameters (so checkpoint
    names stay `attn.in_proj_weight`): adapters hook it like any Linear (`runtime/adapters/apply.py`)."""

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)


class OpenClipAttention(nn.Module):
    """`nn.MultiheadAttention` parameter names: q, k, v packed in `in_proj_weight` [3*width, width]."""

    def __init__(self, cfg: ClipTextConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * cfg.width, cfg.width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * cfg.width))
        self.in_proj = PackedProjection()
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.in_proj(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        return self.out_proj(_causal_attention(q, k, v, self.heads))


class OpenClipMLP(nn.Module):
    def __init__(self, cfg: ClipTextConfig) -> None:
        super().__init__()
        self.act = cfg.act
        self.c_fc = nn.Linear(cfg.width, cfg.mlp_width)
        self.c_proj = nn.Linear(cfg.mlp_width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(_act(self.act, self.c_fc(x)))


class OpenClipBlock(nn.Module):
    def __init__(self, cfg: ClipTextConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width)
        self.attn = OpenClipAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.width)
        self.mlp = OpenClipMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class OpenClipTransformer(nn.Module):
    def __init__(self, cfg: ClipTextConfig) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(OpenClipBlock(cfg) for _ in range(cfg.layers))


class OpenClipText(_ClipTextBase):
    """Keys of open_clip's `CLIP` text tower; `text_projection` only when the file has it."""

    def __init__(self, cfg: ClipTextConfig) -> None:
        super().__init__()
        self.config = cfg
        self.token_embedding = nn.Embedding(cfg.vocab, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context, cfg.width))
        self.transformer = OpenClipTransformer(cfg)
        self.ln_final = nn.LayerNorm(cfg.width)
        if cfg.projection_dim is not None:
            self.text_projection = nn.Parameter(torch.empty(cfg.width, cfg.projection_dim))

    def _token_embedding(self) -> nn.Embedding:
        return self.token_embedding

    def _position_weight(self) -> torch.Tensor:
        return self.positional_embedding

    def _blocks(self) -> nn.ModuleList:
        return self.transformer.resblocks

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_final(x)

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """open_clip applies `x @ text_projection` ([width, projection_dim]), not a Linear."""
        return pooled @ self.text_projection


def build_clip_text(cfg: ClipTextConfig) -> HFClipText | OpenClipText:
    return HFClipText(cfg) if cfg.layout == "hf" else OpenClipText(cfg)


def ignored_clip_key(cfg: ClipTextConfig):
    """Stored keys that are known and unused: HF `position_ids` buffer; OpenCLIP `logit_scale`,
    `attn_mask` (non-persistent in open_clip, kept by some converters) and the visual tower."""
    if cfg.layout == "hf":
        return lambda k: k == "text_model.embeddings.position_ids"
    return lambda k: k in ("logit_scale", "attn_mask") or k.startswith("visual.")
