"""IP-Adapter files (h94/IP-Adapter, tencent-ailab): recognise them, load them, make image tokens.

An IP-Adapter has two parts:
- `image_proj`: turns a CLIP vision encoding of the reference image into `tokens` extra
  context tokens of the UNet's cross-attention width (`cross_attention_dim`: 768 SD1.x,
  2048 SDXL; 1024 would be SD2.x, for which none was released).
- `ip_adapter.N.to_k_ip` / `ip_adapter.N.to_v_ip`: Linear(cross_attention_dim -> that layer's
  width, no bias), one pair per UNet cross-attention layer; the image tokens are attended with
  them beside the text (out = attn(q, text k, text v) + scale * attn(q, to_k_ip(img), to_v_ip(img))).
  N = 2k + 1 for the k-th cross-attention (`attn2`) in diffusers' `UNet2DConditionModel.
  attn_processors` order: down blocks, then up blocks, then the mid block (the trainer numbered
  all attention processors, self- and cross-attention alternating, and only `attn2` has
  weights). SD1.5: N = 1, 3, ..., 31 (16 layers); SDXL: 1, 3, ..., 139 (70).

File formats: `.safetensors` with flat keys `image_proj.*` and `ip_adapter.*`; the original
`.bin` is `torch.save({"image_proj": {...}, "ip_adapter": {...}})`, read with
`torch.load(weights_only=True)` only (checkpoint.load_pickle_tree) and flattened to the same keys.

Kinds (from keys and shapes):
- "plain" (ip-adapter_sd15, _sd15_light, _sdxl, _sdxl_vit-h, _sd15_vit-G): `image_proj.proj`
  Linear(clip_dim -> tokens * cross_dim) and `image_proj.norm` LayerNorm(cross_dim); tokens =
  proj rows / cross_dim (4 in the releases). Input: CLIP `image_embeds` (the projected class
  token: clip_dim 1024 for ViT-H, 1280 for ViT-bigG).
- "plus" (ip-adapter-plus*_sd15, -plus*_sdxl_vit-h): the perceiver Resampler,
  `image_proj.latents` [1, queries, dim], `proj_in` Linear(clip width -> dim), `layers.N.0`
  (PerceiverAttention: `norm1` on the image features, `norm2` on the latents, `to_q`,
  `to_kv` over [features; latents], `to_out`, no biases, 64 channels per head), `layers.N.1`
  (LayerNorm, Linear, GELU, Linear, no biases: `.0`, `.1`, `.3`), `proj_out` Linear(dim ->
  cross_dim), `norm_out`. plus_sd15: dim 768, depth 4, 12 heads, 16 queries, ff x4; SDXL
  vit-h: dim 1280, 20 heads. Input: the CLIP penultimate hidden states (HF
  `hidden_states[-2]`, all tokens; clip_dim = the CLIP width, 1280 for ViT-H).
Refused by name: "full" (full-face: `proj.0/2/3` MLP over all tokens), FaceID and portrait
(`proj.0/2` + `norm`, or LoRA weights in `ip_adapter`), FaceID-plus (`perceiver_resampler`).

Unconditional tokens (what the uncond / negative row of CFG gets), as the original
`IPAdapter.get_image_embeds` makes them:
- plain: `image_proj` of all-zero image_embeds;
- plus: `image_proj` of the CLIP penultimate states of an all-zeros image in the normalised
  pixel space (zeros after `preprocess`, not a black image).
`image_prompt_tokens` returns both for a batch of images.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NoReturn

import torch
from torch import nn

from ..errors import ModelFileError
from .attention import attention
from .checkpoint import PICKLE_SUFFIXES, TensorStore, load_pickle_tree, open_store
from .clip_vision import LoadedClipVision
from .detect import LORA_KEY_PATTERN, UNET_PREFIX, Family
from .loading import load_strict
from .placement import LoadedPart

Kind = Literal["plain", "plus"]

HEAD_CHANNELS = 64  # the Resampler's dim_head (fixed in IP-Adapter's training code)
_FAMILY_BY_CONTEXT = {768: Family.SD1, 1024: Family.SD2, 2048: Family.SDXL}
# Which CLIP vision model gives a width: plain adapters read the projection, plus ones the width.
_CLIP_BY_PROJECTION = {768: "ViT-L/14", 1024: "ViT-H/14", 1280: "ViT-bigG/14"}
_CLIP_BY_WIDTH = {1024: "ViT-L/14", 1280: "ViT-H/14", 1664: "ViT-bigG/14"}

_HINT = ("Choose an IP-Adapter model (ip-adapter_sd15, ip-adapter-plus_sd15, ip-adapter_sdxl, "
         "ip-adapter-plus_sdxl_vit-h, ... as .safetensors or the original .bin)")
_KV_KEY = re.compile(r"^ip_adapter\.(\d+)\.to_([kv])_ip\.weight$")


@dataclass(frozen=True)
class ResamplerConfig:
    """IP-Adapter-plus perceiver Resampler, from shapes."""

    dim: int            # latent width
    depth: int
    heads: int          # inner width / 64
    queries: int        # = image tokens
    embedding_dim: int  # input: the CLIP vision width
    output_dim: int     # = cross_attention_dim
    ff_width: int       # feed-forward inner width (dim * ff_mult)

    @property
    def inner(self) -> int:
        return self.heads * HEAD_CHANNELS


@dataclass(frozen=True)
class IPAdapterInfo:
    path: Path | None
    kind: Kind
    tokens: int                       # image tokens per image
    cross_attention_dim: int
    clip_dim: int                     # plain: CLIP projection dim (image_embeds); plus: CLIP width
    layers: int                       # to_k_ip/to_v_ip pairs
    layer_ids: tuple[int, ...] = ()   # their N, ascending
    layer_widths: tuple[int, ...] = ()  # output width of each pair (the attention's width)
    resampler: ResamplerConfig | None = None

    @property
    def family(self) -> Family | None:
        return _FAMILY_BY_CONTEXT.get(self.cross_attention_dim)

    @property
    def clip_input(self) -> Literal["image_embeds", "penultimate"]:
        return "image_embeds" if self.kind == "plain" else "penultimate"

    @property
    def clip_name(self) -> str:
        """The CLIP vision model this adapter was trained with, as far as its input width tells."""
        table = _CLIP_BY_PROJECTION if self.kind == "plain" else _CLIP_BY_WIDTH
        return table.get(self.clip_dim, f"a CLIP vision model with {self.clip_input} width {self.clip_dim}")

    @property
    def description(self) -> str:
        family = self.family.label if self.family else f"cross-attention {self.cross_attention_dim}"
        kind = "IP-Adapter" if self.kind == "plain" else "IP-Adapter plus"
        return f"{family} {kind} ({self.tokens} tokens, {self.layers} layers, needs {self.clip_name})"


# ---------------------------------------------------------------------------- reading files

def open_ip_adapter_store(path: str | Path) -> TensorStore:
    """A `TensorStore` over an IP-Adapter file: .safetensors as stored; a pickle (.bin, .pth, ...)
    read weights-only, its nested {"image_proj": {...}, "ip_adapter": {...}} flattened to
    `image_proj.*` / `ip_adapter.*` keys (one level, as the format has)."""
    path = Path(path)
    if path.suffix.lower() not in PICKLE_SUFFIXES or not path.is_file():
        return open_store(path)  # also words the missing-file / wrong-type errors
    tree = load_pickle_tree(path)
    if isinstance(tree, dict) and isinstance(tree.get("state_dict"), dict):
        tree = tree["state_dict"]
    flat: dict[str, torch.Tensor] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            if not isinstance(key, str):
                continue
            if isinstance(value, torch.Tensor):
                flat[key] = value
            elif isinstance(value, dict):
                flat.update({f"{key}.{k}": v for k, v in value.items()
                             if isinstance(k, str) and isinstance(v, torch.Tensor)})
    if not flat:
        raise ModelFileError(path, "holds no tensors", "Check that this is a model file")
    return TensorStore.from_dict(flat, path=path)


# ---------------------------------------------------------------------------- detection

def _any(store: TensorStore, pattern: str) -> bool:
    rx = re.compile(pattern)
    return any(rx.search(k) for k in store.keys())


def _refuse_unknown(store: TensorStore, path: Path | str) -> NoReturn:
    """No IP-Adapter keys: name what the file is, if it is something common."""
    def has(*prefixes: str) -> bool:
        return any(store.has_prefix(p) for p in prefixes)

    if _any(store, LORA_KEY_PATTERN):
        raise ModelFileError(path, "this is a LoRA/LyCORIS adapter, not an IP-Adapter", _HINT)
    if has("control_model.", "controlnet_", "input_hint_block.", "zero_convs."):
        raise ModelFileError(path, "this is a ControlNet, not an IP-Adapter", _HINT)
    if has(UNET_PREFIX, "input_blocks.", "down_blocks."):
        raise ModelFileError(path, "this is a Stable Diffusion checkpoint or UNet, not an IP-Adapter", _HINT)
    if has("vision_model.", "visual."):
        raise ModelFileError(path, "this is a CLIP vision model (the image encoder an IP-Adapter needs), "
                             "not an IP-Adapter", _HINT + "; choose this file as the CLIP vision model")
    if has("text_model.", "cond_stage_model.", "conditioner.", "transformer.resblocks."):
        raise ModelFileError(path, "this is a CLIP text encoder, not an IP-Adapter", _HINT)
    if has("encoder.", "decoder.", "first_stage_model."):
        raise ModelFileError(path, "this is a VAE, not an IP-Adapter", _HINT)
    raise ModelFileError(path, "no IP-Adapter weights found (no image_proj.* and ip_adapter.* keys)", _HINT)


def _refuse_variants(proj: TensorStore, adapter: TensorStore, path: Path | str) -> None:
    """IP-Adapter variants other than plain and plus, by their image_proj layout."""
    if proj.has_prefix("perceiver_resampler."):
        raise ModelFileError(path, "this is an IP-Adapter FaceID-plus model, which is not supported",
                             "Use a plain or plus IP-Adapter")
    if "proj.3.weight" in proj:
        raise ModelFileError(path, "this is an IP-Adapter full(-face) model (an MLP over all CLIP tokens), "
                             "which is not supported", "Use ip-adapter-plus-face instead")
    if "proj.0.weight" in proj or _any(adapter, r"lora"):
        raise ModelFileError(path, "this is an IP-Adapter FaceID or portrait model (InsightFace embeddings), "
                             "which is not supported", "Use a plain or plus IP-Adapter")


def _resampler_config(proj: TensorStore, path: Path | str) -> ResamplerConfig:
    need = ("latents", "proj_in.weight", "proj_out.weight", "norm_out.weight", "layers.0.0.to_q.weight",
            "layers.0.1.1.weight")
    if missing := [k for k in need if k not in proj]:
        raise ModelFileError(path, f"IP-Adapter plus resampler incomplete (image_proj.{missing[0]} missing)",
                             "The file is damaged or an unsupported variant")
    _, queries, dim = proj.shape("latents")
    embedding_dim = proj.shape("proj_in.weight")[1]
    output_dim = proj.shape("proj_out.weight")[0]
    depth = 0
    while f"layers.{depth}.0.to_q.weight" in proj:
        depth += 1
    inner = proj.shape("layers.0.0.to_q.weight")[0]
    if inner % HEAD_CHANNELS:
        raise ModelFileError(path, f"IP-Adapter plus attention width {inner} is not a multiple of {HEAD_CHANNELS}",
                             "The file is damaged or an unsupported variant")
    return ResamplerConfig(dim=dim, depth=depth, heads=inner // HEAD_CHANNELS, queries=queries,
                           embedding_dim=embedding_dim, output_dim=output_dim,
                           ff_width=proj.shape("layers.0.1.1.weight")[0])


def _shown(shape: tuple[int, ...] | None) -> str:
    return "missing" if shape is None else str(list(shape))


def detect_ip_adapter(store: TensorStore) -> IPAdapterInfo:
    """What IP-Adapter a file holds (kind, tokens, widths, layers), from keys and shapes only; a
    file that is not a supported IP-Adapter raises ModelFileError saying what it is."""
    path = store.path or "(in memory)"
    if not (store.has_prefix("image_proj.") and store.has_prefix("ip_adapter.")):
        _refuse_unknown(store, path)
    proj, adapter = store.sub("image_proj."), store.sub("ip_adapter.")
    _refuse_variants(proj, adapter, path)

    resampler = None
    if "proj.weight" in proj and "norm.weight" in proj:
        kind: Kind = "plain"
        cross = proj.shape("norm.weight")[0]
        rows, clip_dim = proj.shape("proj.weight")
        if rows % cross:
            raise ModelFileError(path, f"IP-Adapter projection has {rows} outputs, not a multiple of its "
                                 f"{cross}-wide norm", "The file is damaged or an unsupported variant")
        tokens = rows // cross
    elif "latents" in proj:
        kind = "plus"
        resampler = _resampler_config(proj, path)
        cross, clip_dim, tokens = resampler.output_dim, resampler.embedding_dim, resampler.queries
    else:
        raise ModelFileError(path, "IP-Adapter with an unknown image projection (neither proj + norm nor a "
                             "Resampler's latents)", "Use a plain or plus IP-Adapter")

    pairs: dict[int, dict[str, tuple[int, ...]]] = {}
    for key in store.keys():
        if m := _KV_KEY.match(key):
            pairs.setdefault(int(m.group(1)), {})[m.group(2)] = store.shape(key)
    ids = tuple(sorted(pairs))
    widths = []
    for n in ids:
        k, v = pairs[n].get("k"), pairs[n].get("v")
        if k is None or v is None or len(k) != 2 or k != v or k[1] != cross:
            raise ModelFileError(path, f"IP-Adapter layer ip_adapter.{n}: to_k_ip {_shown(k)}, to_v_ip {_shown(v)}; "
                                 f"expected both [width, {cross}]", "The file is damaged")
        widths.append(k[0])
    if not ids:
        raise ModelFileError(path, "IP-Adapter without to_k_ip/to_v_ip layers", "The file is damaged or incomplete")
    return IPAdapterInfo(store.path, kind, tokens, cross, clip_dim, len(ids), ids, tuple(widths), resampler)


# ---------------------------------------------------------------------------- the model

class PlainProjection(nn.Module):
    """image_embeds [N, clip_dim] -> LayerNorm(Linear(x) as [N, tokens, cross_dim])."""

    def __init__(self, clip_dim: int, tokens: int, cross_dim: int) -> None:
        super().__init__()
        self.tokens = tokens
        self.proj = nn.Linear(clip_dim, tokens * cross_dim)
        self.norm = nn.LayerNorm(cross_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(image_embeds).reshape(image_embeds.shape[0], self.tokens, -1))


class PerceiverAttention(nn.Module):
    """The latents attend to [image features; latents]; q from the latents only."""

    def __init__(self, cfg: ResamplerConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.to_q = nn.Linear(cfg.dim, cfg.inner, bias=False)
        self.to_kv = nn.Linear(cfg.dim, 2 * cfg.inner, bias=False)
        self.to_out = nn.Linear(cfg.inner, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x, latents = self.norm1(x), self.norm2(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        # the original scales q and k by d^-1/4 each: the same as SDPA's d^-1/2 on the product
        return self.to_out(attention(self.to_q(latents), k, v, self.heads))


def _feed_forward(cfg: ResamplerConfig) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(cfg.dim), nn.Linear(cfg.dim, cfg.ff_width, bias=False), nn.GELU(),
                         nn.Linear(cfg.ff_width, cfg.dim, bias=False))


class Resampler(nn.Module):
    """IP-Adapter-plus: CLIP penultimate states [N, T, embedding_dim] -> [N, queries, output_dim]."""

    def __init__(self, cfg: ResamplerConfig) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.empty(1, cfg.queries, cfg.dim))
        self.proj_in = nn.Linear(cfg.embedding_dim, cfg.dim)
        self.proj_out = nn.Linear(cfg.dim, cfg.output_dim)
        self.norm_out = nn.LayerNorm(cfg.output_dim)
        self.layers = nn.ModuleList(nn.ModuleList([PerceiverAttention(cfg), _feed_forward(cfg)])
                                    for _ in range(cfg.depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        latents = self.latents.expand(x.shape[0], -1, -1)
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class KVPair(nn.Module):
    def __init__(self, cross_dim: int, width: int) -> None:
        super().__init__()
        self.to_k_ip = nn.Linear(cross_dim, width, bias=False)
        self.to_v_ip = nn.Linear(cross_dim, width, bias=False)


class IPAdapter(nn.Module):
    """Module names are the file's keys: `image_proj.*`, `ip_adapter.N.to_{k,v}_ip`."""

    def __init__(self, info: IPAdapterInfo) -> None:
        super().__init__()
        self.kind = info.kind
        if info.kind == "plain":
            self.image_proj: nn.Module = PlainProjection(info.clip_dim, info.tokens, info.cross_attention_dim)
        else:
            assert info.resampler is not None
            self.image_proj = Resampler(info.resampler)
        self.ip_adapter = nn.ModuleDict({str(n): KVPair(info.cross_attention_dim, w)
                                         for n, w in zip(info.layer_ids, info.layer_widths)})


# ---------------------------------------------------------------------------- loading and use

ClipOutput = tuple[torch.Tensor, torch.Tensor]  # ClipVision.encode: (image_embeds, penultimate)


@dataclass
class LoadedIPAdapter(LoadedPart):
    info: IPAdapterInfo
    model: IPAdapter
    released: bool = field(default=False, init=False)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def image_tokens(self, clip_output: ClipOutput | torch.Tensor) -> torch.Tensor:
        """Image prompt tokens [N, tokens, cross_attention_dim] in the adapter's dtype and device.

        `clip_output`: `ClipVision.encode`'s (image_embeds, penultimate), of which the kind's input
        is used, or that input alone (plain: image_embeds [N, clip_dim]; plus: penultimate
        [N, T, clip_dim])."""
        if isinstance(clip_output, tuple):
            x = clip_output[0] if self.info.kind == "plain" else clip_output[1]
        else:
            x = clip_output
        want = 2 if self.info.kind == "plain" else 3
        if x.dim() != want or x.shape[-1] != self.info.clip_dim:
            shape = "[N, clip_dim]" if want == 2 else "[N, tokens, clip_dim]"
            raise ValueError(f"{self.info.kind} IP-Adapter takes CLIP {self.info.clip_input} {shape} with clip_dim "
                             f"{self.info.clip_dim}, got {list(x.shape)}")
        return self.model.image_proj(x.to(self.device, self.dtype))

    def kv_layers(self) -> list[tuple[nn.Linear, nn.Linear]]:
        """(to_k_ip, to_v_ip) per UNet cross-attention, in ascending N (module docstring: the k-th
        pair belongs to the k-th cross-attention in diffusers' down, up, mid order)."""
        return [(pair.to_k_ip, pair.to_v_ip) for pair in
                (self.model.ip_adapter[str(n)] for n in self.info.layer_ids)]

    def check_clip_vision(self, clip: LoadedClipVision) -> None:
        """Refuse a CLIP vision model whose output does not fit this adapter's input width."""
        c = clip.info.config
        got = c.projection_dim if self.info.kind == "plain" else c.width
        if got != self.info.clip_dim:
            what = "image embeddings" if self.info.kind == "plain" else "hidden states"
            raise ModelFileError(self.info.path or "(in memory)",
                                 f"this IP-Adapter needs CLIP {what} of width {self.info.clip_dim} "
                                 f"({self.info.clip_name}); the CLIP vision model {c.name} gives {got}",
                                 f"Choose the {self.info.clip_name} CLIP vision model for it")


def load_ip_adapter(source: str | Path | TensorStore, *, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> LoadedIPAdapter:
    """Load an IP-Adapter (.safetensors flat keys or the original nested .bin) strictly: every
    stored tensor used and every weight filled, cast to `dtype` on `device`."""
    store = source if isinstance(source, TensorStore) else open_ip_adapter_store(source)
    info = detect_ip_adapter(store)
    model = load_strict(lambda: IPAdapter(info), store, what="IP-Adapter", device=device, dtype=dtype)
    return LoadedIPAdapter(info, model)


@torch.no_grad()
def image_prompt_tokens(adapter: LoadedIPAdapter, clip: LoadedClipVision,
                        images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, uncond) image tokens, each [N, tokens, cross_attention_dim] in the adapter's dtype,
    for images [N, 3, H, W] with values 0..1 (module docstring: how uncond is made)."""
    adapter.check_clip_vision(clip)
    n = images.shape[0]
    embeds, penultimate = clip.encode_images(images)
    cond = adapter.image_tokens((embeds, penultimate))
    if adapter.info.kind == "plain":
        zeros = torch.zeros_like(embeds[:1])
    else:
        s = clip.info.config.image_size
        zeros = clip.model.encode(torch.zeros(1, 3, s, s, device=clip.model.device))[1]
    uncond = adapter.image_tokens(zeros).repeat(n, 1, 1)  # the same for every image
    return cond, uncond
