"""Prompt -> conditioning for SD1 / SD2 / SDXL, computed as A1111 1.10.1 computes it.

Sources followed (A1111 v1.10.1 and the repositories it pins: Stability-AI/stablediffusion
`cf1d67a6` = "ldm", Stability-AI/generative-models `45c443b3` = "sgm"):

- chunks of 77 tokens (BOS, 75 slots, EOS) are encoded separately and concatenated along
  tokens: `modules/sd_hijack_clip.py` `TextConditionalModel.forward` (`torch.hstack(zs)`);
  SDXL's pooled vector comes from the FIRST chunk (`zs[0].pooled`).
- OpenCLIP pads with 0 after the first EOS, CLIP-L with EOS: `TextConditionalModel.process_tokens`
  (`id_pad`), `sd_hijack_open_clip.py` (`id_pad = 0`), `FrozenCLIPEmbedderWithCustomWords` (`id_pad = id_end`).
  Each encoder tokenizes with its own tokenizer (CLIP-L: transformers' CLIPTokenizer; OpenCLIP:
  open_clip's, which html-unescapes), so SDXL tokenizes every prompt twice, as A1111 does.
- emphasis "Original": `modules/sd_emphasis.py` `EmphasisOriginal.after_transformers`, applied
  per encoder (SDXL: to the CLIP-L and bigG outputs separately, each embedder is hijacked on its own).
- layer choice per family: see `sd1_clip_l`, `sd2_openclip_h`, `sdxl_clip_l`, `sdxl_openclip_bigg`.
- textual inversion rows: `modules/sd_hijack.py` `EmbeddingsWithFixes.forward`.
- batches: prompts of different lengths are padded by repeating their last token vector
  (`modules/prompt_parser.py` `stack_conds`); cond vs uncond padding is `pad_to_chunks`.
- SDXL: an empty NEGATIVE prompt gives zero text conditioning (crossattn and pooled):
  `modules/sd_models_xl.py` `get_learned_conditioning` (`force_zero_negative_prompt`) with sgm
  `GeneralConditioner.forward(force_zero_embeddings=['txt'])`. The size embeddings stay.
- SDXL vector ("y", 2816): `sdxl_adm_vector`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Union

import torch

from ...errors import ModelFileError, SettingError, UserError
from ..checkpoint import TensorStore
from ..loading import load_strict
from .clip import (ClipTextConfig, HFClipText, OpenClipText, TokenFixes, build_clip_text, clip_text_config,
                   ignored_clip_key)
from .prompt import TokenizedPrompt, tokenize_prompt
from .tokenizer import ClipTokenizer

CHUNK = 77                      # BOS + 75 tokens + EOS
FAMILIES = ("sd1", "sd2", "sdxl")
EMPHASIS_MODES = ("Original", "No norm", "Ignore")
SIZE_EMBED_DIM = 256            # sgm ConcatTimestepEmbedderND(outdim=256) in sd_xl_base.yaml

# A textual-inversion embedding: [n, width] vectors, or per-encoder vectors {"clip_l": ..., "clip_g": ...} (SDXL files)
EmbeddingVectors = Union[torch.Tensor, Mapping[str, torch.Tensor]]


@dataclass
class Conditioning:
    context: torch.Tensor             # [B, 77*k, D]: cross-attention tokens
    pooled: torch.Tensor | None = None  # [B, P]: SDXL pooled bigG output (before size embeddings)

    @property
    def chunks(self) -> int:
        return self.context.shape[1] // CHUNK


# ---------------------------------------------------------------- output rules, one per family and encoder
# Each returns (tokens [N, 77, width], pooled [N, P] or None) for ids [N, 77].

def sd1_clip_l(model: HFClipText, ids: torch.Tensor, fixes: TokenFixes | None, clip_skip: int = 1):
    """A1111 `sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords.encode_with_transformers`:
    `last_hidden_state` (final norm included), or for Clip skip n > 1 `hidden_states[-n]`
    followed by `final_layer_norm`."""
    if clip_skip > 1:
        return model.final_norm(model.hidden(ids, fixes, model.config.layers + 1 - clip_skip)), None
    return model(ids, fixes), None


def sd2_openclip_h(model: OpenClipText, ids: torch.Tensor, fixes: TokenFixes | None):
    """ldm `FrozenOpenCLIPEmbedder(layer="penultimate")` (configs/stable-diffusion/v2-inference*.yaml):
    `text_transformer_forward` stops before the last block, then `ln_final`. A1111 1.10.1
    ignores Clip skip here (`sd_hijack_open_clip.encode_with_transformers` only has a comment)."""
    return model.final_norm(model.hidden(ids, fixes, model.config.layers - 1)), None


def sdxl_clip_l(model: HFClipText, ids: torch.Tensor, fixes: TokenFixes | None,
                clip_skip: int = 1, clip_l_skip: bool = False):
    """A1111 `FrozenCLIPEmbedderForSDXLWithCustomWords.encode_with_transformers` with sgm
    `FrozenCLIPEmbedder(layer="hidden", layer_idx=11)` (sd_xl_base.yaml): `hidden_states[11]`
    of 12 layers, i.e. the penultimate layer, WITHOUT final norm. With the "Clip skip SDXL"
    option (`sdxl_clip_l_skip`) it is `hidden_states[-clip_skip]`, also without final norm."""
    n = clip_skip if clip_l_skip else 2
    return model.hidden(ids, fixes, model.config.layers + 1 - n), None


def sdxl_openclip_bigg(model: OpenClipText, ids: torch.Tensor, fixes: TokenFixes | None):
    """sgm `FrozenOpenCLIPEmbedder2(layer="penultimate", always_return_pooled=True, legacy=False)`:
    `text_transformer_forward` keeps the input of the last block ("penultimate", NO ln_final)
    and the last output; pooled = `ln_final(last)` at the EOS position (argmax of ids) @ text_projection."""
    n = model.config.layers
    penultimate = model.hidden(ids, fixes, n - 1)
    last = model.run_blocks(penultimate, n - 1, n)
    pooled = model.project(model.eos_rows(model.final_norm(last), ids))
    return penultimate, pooled


@dataclass
class TextEncoder:
    name: str                          # for messages: "CLIP-L", "OpenCLIP-H", "OpenCLIP-bigG"
    model: HFClipText | OpenClipText
    tokenizer: ClipTokenizer           # in this encoder's A1111 style (see `styled_tokenizer`)
    pad_zero: bool                     # OpenCLIP: tokens after the first EOS become 0
    ti_key: str                        # key of this encoder's vectors in SDXL embedding files
    output: Callable                   # (model, ids, fixes) -> (tokens, pooled | None)

    @property
    def pad_id(self) -> int:
        return 0 if self.pad_zero else self.tokenizer.eos_id

    @property
    def width(self) -> int:
        return self.model.config.width


# ---------------------------------------------------------------- pieces of the pipeline

def pad_after_eos(ids: torch.Tensor, eos_id: int, pad_id: int = 0) -> torch.Tensor:
    """A1111 `process_tokens`: for OpenCLIP every token after the first EOS becomes `pad_id`."""
    first = (ids == eos_id).int().argmax(dim=-1, keepdim=True)
    pos = torch.arange(ids.shape[-1], device=ids.device)
    return torch.where(pos > first, torch.full_like(ids, pad_id), ids)


def emphasize(z: torch.Tensor, weights: torch.Tensor, mode: str = "Original") -> torch.Tensor:
    """Multiply each token by its weight; "Original" then restores the mean of the chunk.

    A1111 takes the mean over the whole [texts, 77, D] tensor of one chunk index of ONE prompt
    (texts are its prompt-editing variants, usually one); here each row [77, D] is one
    (prompt, chunk), which is the same for prompts without prompt editing.
    """
    if mode == "Ignore":
        return z
    weighted = z * weights[..., None].to(z.dtype)
    if mode == "No norm":
        return weighted
    before = z.mean(dim=(1, 2), keepdim=True)
    return weighted * (before / weighted.mean(dim=(1, 2), keepdim=True))


def pad_to_chunks(context: torch.Tensor, n_chunks: int, empty: torch.Tensor) -> torch.Tensor:
    """Append encodings of the empty prompt until `context` has `n_chunks` chunks of 77 tokens.

    This is A1111's "Pad prompt/negative prompt" option (`pad_cond_uncond`,
    `sd_samplers_cfg_denoiser.pad_cond`, `empty` = `cond_stage_model_empty_prompt`, the
    encoding of "" [1, 77, D]). It is OFF by default in A1111: there, a cond and uncond of
    different lengths run as separate UNet calls instead, which padding approximates
    (extra empty tokens change the attention softmax slightly) in exchange for one batch.
    """
    repeats = n_chunks - context.shape[1] // CHUNK
    if repeats <= 0:
        return context
    return torch.cat([context, empty.to(context).repeat(context.shape[0], repeats, 1)], dim=1)


def repeat_last(seq: torch.Tensor, length: int) -> torch.Tensor:
    """[T, D] -> [length, D] by repeating the last vector (A1111 `prompt_parser.stack_conds`)."""
    return seq if seq.shape[0] >= length else torch.cat([seq, seq[-1:].expand(length - seq.shape[0], -1)])


def stack_padded(contexts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack [T_i, D] token sequences, padding shorter ones by repeating their last vector
    (A1111 `prompt_parser.stack_conds`, used for the prompts of one batch)."""
    longest = max(c.shape[0] for c in contexts)
    return torch.stack([repeat_last(c, longest) for c in contexts])


def size_embedding(values: torch.Tensor, dim: int = SIZE_EMBED_DIM) -> torch.Tensor:
    """sgm `timestep_embedding` (and A1111's patched copy in `sd_hijack_unet`) per value:
    [cos(v * f_i), sin(v * f_i)] with f_i = 10000^(-i/half), i < half. [B, n] -> [B, n*dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=values.device) / half)
    args = values.float()[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).flatten(1)


def sdxl_adm_vector(pooled: torch.Tensor, width: int, height: int,
                    crop_top: int = 0, crop_left: int = 0) -> torch.Tensor:
    """SDXL UNet vector input y = [pooled (1280), original size, crop, target size] -> [B, 2816].

    A1111 `sd_models_xl.get_learned_conditioning`: original_size_as_tuple = target_size_as_tuple
    = (height, width), crop_coords_top_left = (sdxl_crop_top, sdxl_crop_left); sgm
    `ConcatTimestepEmbedderND` embeds each number with 256 dims and concatenates in that order;
    `GeneralConditioner` appends vectors in embedder order (bigG pooled first).
    """
    sizes = torch.tensor([[height, width, crop_top, crop_left, height, width]], dtype=torch.float32,
                         device=pooled.device)
    emb = size_embedding(sizes).to(pooled.dtype).expand(pooled.shape[0], -1)
    return torch.cat([pooled, emb], dim=1)


def _vectors(embeddings: Mapping[str, EmbeddingVectors], name: str, enc: TextEncoder) -> torch.Tensor:
    emb = embeddings.get(name)
    if emb is None:
        raise UserError(f"embedding '{name}'", "the prompt uses it but its vectors were not loaded",
                        "Check the embedding file name and that it loaded without errors")
    if isinstance(emb, Mapping):
        if enc.ti_key not in emb:
            raise UserError(f"embedding '{name}'", f"has no '{enc.ti_key}' vectors for the {enc.name} text encoder "
                            f"(it has {', '.join(sorted(emb)) or 'none'})",
                            "Use an embedding made for this model family")
        emb = emb[enc.ti_key]
    if emb.ndim == 1:
        emb = emb[None]
    if emb.ndim != 2 or emb.shape[1] != enc.width:
        raise UserError(f"embedding '{name}'", f"has vectors of shape {list(emb.shape)}, the {enc.name} text encoder "
                        f"needs [n, {enc.width}]", "Use an embedding made for this model family")
    return emb


def vector_counts(embeddings: Mapping[str, EmbeddingVectors], ti_key: str | None = None) -> dict[str, int]:
    """name -> number of token rows it occupies (what the tokenizer needs)."""
    counts = {}
    for name, emb in embeddings.items():
        if isinstance(emb, Mapping):
            emb = emb[ti_key] if ti_key in emb else next(iter(emb.values()))
        counts[name] = 1 if emb.ndim == 1 else emb.shape[0]
    return counts


def styled_tokenizer(tokenizer: ClipTokenizer, openclip: bool) -> ClipTokenizer:
    """A1111 tokenizes CLIP-L text with transformers' CLIPTokenizer and OpenCLIP text with
    open_clip's tokenizer, which also html-unescapes ("&amp;" -> "&"); `ClipTokenizer` has both
    styles over one (shared) vocabulary."""
    if tokenizer.html_unescape == openclip:
        return tokenizer
    return ClipTokenizer(tokenizer.source, html_unescape=openclip)


def token_fixes(fixes: Sequence[Sequence[tuple[int, str]]], embeddings: Mapping[str, EmbeddingVectors],
                enc: TextEncoder, length: int, device, dtype) -> TokenFixes | None:
    """Dense replacement rows for a batch of chunks (A1111 `EmbeddingsWithFixes`): an embedding
    whose vectors start at row r fills rows r .. r+n-1, cut at the end of the chunk."""
    if not any(fixes):
        return None
    mask = torch.zeros(len(fixes), length, dtype=torch.bool)
    values = torch.zeros(len(fixes), length, enc.width, dtype=dtype, device=device)
    for i, row_fixes in enumerate(fixes):
        for row, name in row_fixes:
            vec = _vectors(embeddings, name, enc)
            n = min(length - row, vec.shape[0])
            values[i, row:row + n] = vec[:n].to(device=device, dtype=dtype)  # device-side copy, no sync
            mask[i, row:row + n] = True
    return TokenFixes(mask.to(device), values)


# ---------------------------------------------------------------- the stack

class TextStack:
    """The text encoders of one source model and the prompt pipeline around them."""

    def __init__(self, family: str, encoders: Sequence[TextEncoder], *, emphasis: str = "Original",
                 comma_padding_backtrack: int = 20) -> None:
        if emphasis not in EMPHASIS_MODES:
            raise SettingError("Emphasis mode", f"'{emphasis}' is not supported", f"Use one of {', '.join(EMPHASIS_MODES)}")
        self.family = family
        self.encoders = list(encoders)
        self.emphasis = emphasis
        self.comma_padding_backtrack = comma_padding_backtrack
        self._empty: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return next(self.encoders[0].model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.encoders[0].model.parameters()).dtype

    @property
    def context_dim(self) -> int:
        return sum(e.width for e in self.encoders)

    def tokenize(self, prompt: str, embeddings: Mapping[str, EmbeddingVectors] = {}) -> list[TokenizedPrompt]:
        """Chunks of one prompt, once per encoder (each has its tokenizer style and padding)."""
        return [tokenize_prompt(prompt, enc.tokenizer, pad_id=enc.pad_id,
                                embeddings=vector_counts(embeddings, enc.ti_key),
                                comma_padding_backtrack=self.comma_padding_backtrack) for enc in self.encoders]

    def encode(self, prompts: Sequence[str], embeddings: Mapping[str, EmbeddingVectors] = {}, *,
               negative: bool = False) -> Conditioning:
        """Encode prompts (extra-network tags already removed) to [B, 77k, D] (+ pooled for SDXL).

        `negative`: these are negative prompts; SDXL then encodes an empty one as zeros, like A1111.
        Identical prompts are encoded once.
        """
        if not prompts:
            raise ValueError("encode() needs at least one prompt")
        unique = list(dict.fromkeys(prompts))
        per_prompt = [self.tokenize(p, embeddings) for p in unique]
        per_encoder = [list(t) for t in zip(*per_prompt)]
        zero = [negative and self.family == "sdxl" and p == "" for p in unique]
        cond = self.encode_tokenized(per_encoder, embeddings, zero=zero)
        if len(unique) == len(prompts):
            return cond
        index = torch.tensor([unique.index(p) for p in prompts], device=cond.context.device)
        return Conditioning(cond.context[index], None if cond.pooled is None else cond.pooled[index])

    @torch.no_grad()
    def encode_tokenized(self, tokenized: Sequence[TokenizedPrompt] | Sequence[Sequence[TokenizedPrompt]],
                         embeddings: Mapping[str, EmbeddingVectors] = {},
                         zero: Sequence[bool] | None = None) -> Conditioning:
        """Encode tokenized prompts: one list per encoder, or one list used for every encoder.

        All chunks of all prompts go through each encoder as one batch. OpenCLIP ids may come
        padded with EOS; they are re-padded with 0 after the first EOS either way.
        """
        per_encoder = [tokenized] * len(self.encoders) if hasattr(tokenized[0], "ids") else tokenized
        seqs, pooled = [], None
        for enc, toks in zip(self.encoders, per_encoder):
            s, p = self._run_encoder(enc, toks, embeddings)
            seqs.append(s)
            pooled = p if p is not None else pooled
        contexts = []
        for parts in zip(*seqs):  # one prompt: [T, width] per encoder
            # SDXL: [CLIP-L | bigG] along channels. Chunk counts only differ between the two
            # tokenizer styles in rare html-escape cases, where A1111 fails; pad instead.
            longest = max(x.shape[0] for x in parts)
            contexts.append(torch.cat([repeat_last(x, longest) for x in parts], dim=-1))
        context = stack_padded(contexts)
        if zero is not None and any(zero):
            keep = torch.tensor([not q for q in zero], device=context.device, dtype=context.dtype)
            context = context * keep[:, None, None]
            pooled = None if pooled is None else pooled * keep[:, None]
        return Conditioning(context, pooled)

    def _run_encoder(self, enc: TextEncoder, toks: Sequence[TokenizedPrompt],
                     embeddings: Mapping[str, EmbeddingVectors]) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        counts = [t.ids.shape[0] for t in toks]
        starts = [sum(counts[:i]) for i in range(len(counts))]
        ids = torch.cat([t.ids for t in toks]).to(self.device)
        if enc.pad_zero:
            ids = pad_after_eos(ids, enc.tokenizer.eos_id)
        weights = torch.cat([t.weights for t in toks]).to(self.device)
        fixes = token_fixes([f for t in toks for f in t.fixes], embeddings, enc, ids.shape[1], self.device, self.dtype)
        z, pooled = enc.output(enc.model, ids, fixes)
        z = emphasize(z, weights, self.emphasis)
        seqs = [z[s:s + k].reshape(k * z.shape[1], z.shape[2]) for s, k in zip(starts, counts)]  # chunks along tokens
        if pooled is not None:
            pooled = pooled[torch.tensor(starts, device=pooled.device)]  # first chunk of each prompt
        return seqs, pooled

    def empty_context(self) -> torch.Tensor:
        """Encoding of "" ([1, 77, D]), as A1111's `cond_stage_model_empty_prompt` (not zeroed)."""
        if self._empty is None:
            self._empty = self.encode([""]).context
        return self._empty

    def pad_to_chunks(self, cond: Conditioning, n_chunks: int) -> Conditioning:
        """`pad_to_chunks` with this model's empty-prompt encoding; pooled is unchanged."""
        return Conditioning(pad_to_chunks(cond.context, n_chunks, self.empty_context()), cond.pooled)


# ---------------------------------------------------------------- loading

def _prefixed_view(store: TensorStore, add: str) -> TensorStore:
    """A view of `store` whose keys carry an extra prefix `add` (renaming without copying)."""
    keys = store.keys()
    shapes = {add + k: store.shape(k) for k in keys}
    dtypes = {add + k: store.dtype(k) for k in keys}
    return TensorStore(store.path, shapes, dtypes, lambda k: store.tensor(k[len(add):]), metadata=store.metadata)


def _sd1_clip_store(store: TensorStore) -> TensorStore:
    base = store.sub("cond_stage_model.transformer.")
    if "embeddings.token_embedding.weight" in base and "text_model.embeddings.token_embedding.weight" not in base:
        # old transformers naming without `text_model.` (A1111 sd_models.checkpoint_dict_replacements_sd1)
        return _prefixed_view(base, "text_model.")
    return base


def _sd2_clip_store(store: TensorStore) -> TensorStore:
    if not store.has_prefix("cond_stage_model.model.") and store.has_prefix("conditioner.embedders.0.model."):
        # SD2.1-Turbo in sgm naming (A1111 sd_models.checkpoint_dict_replacements_sd2_turbo)
        return store.sub("conditioner.embedders.0.model.")
    return store.sub("cond_stage_model.model.")


def text_encoder_stores(store: TensorStore, family: str) -> dict[str, TensorStore]:
    """{"te1": ..., ["te2": ...]}: each text encoder's tensors in a whole checkpoint, under the
    names its module tree uses (as `load_text_stack` reads them)."""
    if family == "sd1":
        return {"te1": _sd1_clip_store(store)}
    if family == "sd2":
        return {"te1": _sd2_clip_store(store)}
    return {"te1": store.sub("conditioner.embedders.0.transformer."), "te2": store.sub("conditioner.embedders.1.model.")}


def _load_encoder(sub: TensorStore, name: str, layout: str, device, dtype,
                  need_projection: bool = False) -> HFClipText | OpenClipText:
    cfg: ClipTextConfig = clip_text_config(sub)
    path = sub.path or "(in memory)"
    if cfg.layout != layout:
        raise ModelFileError(path, f"the {name} text encoder under '{sub.prefix}' is in {cfg.layout} layout, "
                             f"expected {layout}", "The checkpoint does not match the detected model family")
    if need_projection and cfg.projection_dim is None:
        raise ModelFileError(path, f"the {name} text encoder has no '{sub.prefix}text_projection'",
                             "SDXL needs it for the pooled text vector; the file may be damaged")
    return load_strict(lambda: build_clip_text(cfg), sub, what=f"{name} text encoder", device=device, dtype=dtype,
                       ignore=ignored_clip_key(cfg))


def load_text_stack(store: TensorStore, family: str, tokenizer: ClipTokenizer,
                    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                    clip_skip: int = 1, *, sdxl_clip_l_skip: bool = False, emphasis: str = "Original",
                    comma_padding_backtrack: int = 20) -> TextStack:
    """Load the text encoders of a whole checkpoint `store` for `family` ("sd1" | "sd2" | "sdxl").

    `tokenizer`: a `ClipTokenizer` of either style; each encoder gets the style A1111 uses for it.
    `clip_skip` is A1111's "Clip skip" (1 = all layers): used by SD1, and by SDXL's CLIP-L only
    with `sdxl_clip_l_skip` (A1111 "Clip skip SDXL"); SD2 ignores it as A1111 1.10.1 does.
    `emphasis`: A1111's "Emphasis mode" ("Original", "No norm" or "Ignore");
    `comma_padding_backtrack`: its "Prompt word wrap length limit" (20).
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}")
    if family == "sd1":
        model = _load_encoder(_sd1_clip_store(store), "CLIP-L", "hf", device, dtype)
        _check_clip_skip(clip_skip, model.config.layers)
        encoders = [TextEncoder("CLIP-L", model, styled_tokenizer(tokenizer, False), False, "clip_l",
                                lambda m, i, f: sd1_clip_l(m, i, f, clip_skip))]
    elif family == "sd2":
        model = _load_encoder(_sd2_clip_store(store), "OpenCLIP-H", "openclip", device, dtype)
        # A1111 wraps SD2's token embedding with the default key "clip_l" (sd_hijack.py)
        encoders = [TextEncoder("OpenCLIP-H", model, styled_tokenizer(tokenizer, True), True, "clip_l", sd2_openclip_h)]
    else:
        clip_l = _load_encoder(store.sub("conditioner.embedders.0.transformer."), "CLIP-L", "hf", device, dtype)
        bigg = _load_encoder(store.sub("conditioner.embedders.1.model."), "OpenCLIP-bigG", "openclip", device, dtype,
                             need_projection=True)
        if sdxl_clip_l_skip:
            _check_clip_skip(clip_skip, clip_l.config.layers)
        encoders = [TextEncoder("CLIP-L", clip_l, styled_tokenizer(tokenizer, False), False, "clip_l",
                                lambda m, i, f: sdxl_clip_l(m, i, f, clip_skip, sdxl_clip_l_skip)),
                    TextEncoder("OpenCLIP-bigG", bigg, styled_tokenizer(tokenizer, True), True, "clip_g",
                                sdxl_openclip_bigg)]
    return TextStack(family, encoders, emphasis=emphasis, comma_padding_backtrack=comma_padding_backtrack)


def _check_clip_skip(clip_skip: int, layers: int) -> None:
    if not 1 <= clip_skip <= layers:
        raise SettingError("Clip skip", f"{clip_skip} is outside 1..{layers} for this text encoder",
                           "Use 1 (all layers) or a small value such as 2")
