"""Text encoders against `transformers` CLIP (and diffusers' OpenCLIP key conversion).

The same tiny random weights (tests/factory_text.py, real key layouts) are loaded into the
runtime through the whole-checkpoint loader and into `transformers` models; every output
rule, padding, textual-inversion rows, emphasis, chunking and the SDXL vector is checked
against the reference or a hand computation from the A1111 formula.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from diffusers.models.embeddings import get_timestep_embedding
from transformers import CLIPTextModelWithProjection

import factory_text as ft
from references import BOS, EOS, hf_clip_l, hf_openclip
from lib_deltasampling.errors import ModelFileError, SettingError, UserError
from lib_deltasampling.runtime.checkpoint import TensorStore
from lib_deltasampling.runtime.text.encode import Conditioning, load_text_stack, pad_after_eos, sdxl_adm_vector
from lib_deltasampling.runtime.text.prompt import TokenizedPrompt
from lib_deltasampling.runtime.text.tokenizer import ClipTokenizer
from vocab import clip_vocab_path

TOL = 1e-4


# ---------------------------------------------------------------- tokens

def chunk(tokens: list[int], pad: int = EOS) -> list[int]:
    assert len(tokens) <= 75
    return [BOS] + tokens + [EOS] + [pad] * (75 - len(tokens))


def tok(*chunks_tokens: list[int], weights: list[list[float]] | None = None, fixes=None) -> TokenizedPrompt:
    """Hand-made chunks (ids padded with EOS), for exact control of rows and weights."""
    ids = torch.tensor([chunk(t) for t in chunks_tokens])
    w = torch.ones(ids.shape, dtype=torch.float32) if weights is None else torch.tensor(weights)
    return TokenizedPrompt(ids, w, fixes or [[] for _ in chunks_tokens])


@functools.lru_cache(maxsize=1)
def tokenizer() -> ClipTokenizer:
    """The real BPE over open_clip's bundled vocabulary file (open_clip itself is never imported)."""
    return ClipTokenizer(clip_vocab_path())


def rand_tokens(n: int, seed: int) -> list[int]:
    return torch.randint(1, 49400, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# ---------------------------------------------------------------- references

def hf_run(model, ids: torch.Tensor, replace: dict[tuple[int, int], torch.Tensor] | None = None):
    """Run a transformers model; `replace` {(row, position): vector} overrides token embeddings
    through a forward hook, the way A1111 wraps the token embedding module."""
    emb = (model.text_model if isinstance(model, CLIPTextModelWithProjection) else model).embeddings.token_embedding

    def hook(_m, _inp, out):
        out = out.clone()
        for (r, p), v in (replace or {}).items():
            out[r, p] = v
        return out

    h = emb.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model(input_ids=ids, output_hidden_states=True)
    finally:
        h.remove()


def final_norm(model, x):
    return (model.text_model if isinstance(model, CLIPTextModelWithProjection) else model).final_layer_norm(x)


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = (a - b).abs().max().item()
    assert diff <= TOL, diff


def zero_pad(ids: torch.Tensor) -> torch.Tensor:
    """OpenCLIP padding written independently: everything after the first EOS is 0."""
    out = ids.clone()
    for r in range(ids.shape[0]):
        first = ids[r].tolist().index(EOS)
        out[r, first + 1:] = 0
    return out


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: one thread is fastest, and far faster than two on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sd1():
    state = ft.sd1_text_checkpoint()
    return state, TensorStore.from_dict(state), hf_clip_l(state, "cond_stage_model.transformer.")


@pytest.fixture(scope="module")
def sd2():
    state = ft.sd2_text_checkpoint()
    return state, load_text_stack(TensorStore.from_dict(state), "sd2", tokenizer()), \
        hf_openclip(state, "cond_stage_model.model.", ft.CLIP_H, None)


@pytest.fixture(scope="module")
def sdxl():
    state = ft.sdxl_text_checkpoint()
    store = TensorStore.from_dict(state)
    return (store, load_text_stack(store, "sdxl", tokenizer()),
            hf_clip_l(state, "conditioner.embedders.0.transformer."),
            hf_openclip(state, "conditioner.embedders.1.model.", ft.CLIP_G, ft.CLIP_G_PROJ))


def sd1_stack(store, clip_skip=1, **kw):
    return load_text_stack(store, "sd1", tokenizer(), clip_skip=clip_skip, **kw)


# ---------------------------------------------------------------- output rules

@pytest.mark.parametrize("clip_skip", [1, 2, 3])
def test_sd1_clip_l_last_layer_and_clip_skip(sd1, clip_skip):
    _, store, ref = sd1
    t = [tok(rand_tokens(20, 1)), tok(rand_tokens(75, 2))]
    got = sd1_stack(store, clip_skip).encode_tokenized(t)
    out = hf_run(ref, torch.cat([x.ids for x in t]))
    # A1111: last_hidden_state, or final_layer_norm(hidden_states[-n]) for Clip skip n > 1
    want = out.last_hidden_state if clip_skip == 1 else final_norm(ref, out.hidden_states[-clip_skip])
    assert got.pooled is None
    close(got.context, want)


def test_sd2_penultimate_then_ln_final_and_zero_padding(sd2):
    _, stack, ref = sd2
    t = [tok(rand_tokens(10, 3)), tok(rand_tokens(40, 4))]
    got = stack.encode_tokenized(t)  # ids arrive padded with EOS; the runtime pads OpenCLIP with 0
    out = hf_run(ref, zero_pad(torch.cat([x.ids for x in t])))
    close(got.context, final_norm(ref, out.hidden_states[-2]))
    # the padding matters: EOS padding would give different outputs at the padded positions
    eos_padded = hf_run(ref, torch.cat([x.ids for x in t]))
    assert (final_norm(ref, eos_padded.hidden_states[-2]) - got.context).abs().max() > 1e-3


def test_sdxl_clip_l_penultimate_bigg_penultimate_and_pooled(sdxl):
    _, stack, ref_l, ref_g = sdxl
    t = [tok(rand_tokens(12, 5)), tok(rand_tokens(75, 6))]
    ids = torch.cat([x.ids for x in t])
    got = stack.encode_tokenized(t)
    out_l = hf_run(ref_l, ids)
    out_g = hf_run(ref_g, zero_pad(ids))
    w = ft.CLIP_L[0]
    assert got.context.shape == (2, 77, ft.CLIP_L[0] + ft.CLIP_G[0])
    close(got.context[..., :w], out_l.hidden_states[-2])      # no final norm
    close(got.context[..., w:], out_g.hidden_states[-2])      # no ln_final
    close(got.pooled, out_g.text_embeds)                      # ln_final(last)[EOS] @ text_projection


@pytest.mark.parametrize("clip_skip", [1, 3])
def test_sdxl_clip_l_skip_option(sdxl, clip_skip):
    store, _, ref_l, _ = sdxl
    stack = load_text_stack(store, "sdxl", tokenizer(), clip_skip=clip_skip, sdxl_clip_l_skip=True)
    t = [tok(rand_tokens(30, 7))]
    got = stack.encode_tokenized(t)
    close(got.context[..., :ft.CLIP_L[0]], hf_run(ref_l, t[0].ids).hidden_states[-clip_skip])


def test_sd2_ignores_clip_skip_like_a1111(sd2):
    state, stack, _ = sd2
    skip = load_text_stack(TensorStore.from_dict(state), "sd2", tokenizer(), clip_skip=2)
    t = [tok(rand_tokens(9, 8))]
    close(skip.encode_tokenized(t).context, stack.encode_tokenized(t).context)


# ---------------------------------------------------------------- textual inversion rows

def test_sd1_embedding_fixes_equal_replaced_input_embeddings(sd1):
    _, store, ref = sd1
    g = torch.Generator().manual_seed(9)
    vec = torch.randn(3, ft.CLIP_L[0], generator=g)
    tail = torch.randn(4, ft.CLIP_L[0], generator=g)
    tokens = rand_tokens(74, 10)
    tokens[4:7] = [0, 0, 0]                       # A1111 puts token 0 where the vectors go
    t = [tok(tokens, fixes=[[(5, "emb"), (75, "tail")]])]  # rows 5..7; "tail" is cut to rows 75, 76
    got = sd1_stack(store).encode_tokenized(t, {"emb": vec, "tail": tail})
    replace = {(0, 5 + i): vec[i] for i in range(3)} | {(0, 75): tail[0], (0, 76): tail[1]}
    close(got.context, hf_run(ref, t[0].ids, replace).last_hidden_state)


def test_sdxl_embedding_fixes_per_encoder_and_pooled(sdxl):
    _, stack, ref_l, ref_g = sdxl
    g = torch.Generator().manual_seed(11)
    emb = {"clip_l": torch.randn(2, ft.CLIP_L[0], generator=g), "clip_g": torch.randn(2, ft.CLIP_G[0], generator=g)}
    t = [tok(rand_tokens(3, 12) + [0, 0] + rand_tokens(5, 13), fixes=[[(4, "e")]]), tok(rand_tokens(6, 14))]
    ids = torch.cat([x.ids for x in t])
    got = stack.encode_tokenized(t, {"e": emb})
    out_l = hf_run(ref_l, ids, {(0, 4): emb["clip_l"][0], (0, 5): emb["clip_l"][1]})
    out_g = hf_run(ref_g, zero_pad(ids), {(0, 4): emb["clip_g"][0], (0, 5): emb["clip_g"][1]})
    close(got.context[..., :ft.CLIP_L[0]], out_l.hidden_states[-2])
    close(got.context[..., ft.CLIP_L[0]:], out_g.hidden_states[-2])
    close(got.pooled, out_g.text_embeds)


def test_embedding_errors_name_the_embedding(sdxl):
    _, stack, _, _ = sdxl
    t = [tok([0, 0], fixes=[[(1, "e")]])]
    with pytest.raises(UserError, match="'e'.*not loaded"):
        stack.encode_tokenized(t, {})
    with pytest.raises(UserError, match="no 'clip_g' vectors"):
        stack.encode_tokenized(t, {"e": {"clip_l": torch.zeros(2, ft.CLIP_L[0])}})
    with pytest.raises(UserError, match=r"shape \[2, 77\]"):
        stack.encode_tokenized(t, {"e": torch.zeros(2, 77)})


# ---------------------------------------------------------------- emphasis

def original_emphasis(z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A1111 EmphasisOriginal on one chunk of one prompt: z *= w; z *= mean(before) / mean(after)."""
    out = []
    for zi, wi in zip(z, w):
        before = zi.mean()
        zi = zi * wi[:, None]
        out.append(zi * (before / zi.mean()))
    return torch.stack(out)


def test_sd1_emphasis_original(sd1):
    _, store, ref = sd1
    w = torch.ones(2, 77)
    w[0, 3:6] = 1.21
    w[1, 10] = 0.9
    t = [tok(rand_tokens(20, 15), weights=[w[0].tolist()]), tok(rand_tokens(20, 16), weights=[w[1].tolist()])]
    got = sd1_stack(store).encode_tokenized(t)
    z = hf_run(ref, torch.cat([x.ids for x in t])).last_hidden_state
    close(got.context, original_emphasis(z, w))
    nonorm = sd1_stack(store, emphasis="No norm").encode_tokenized(t)
    close(nonorm.context, z * w[..., None])


def test_sdxl_emphasis_normalises_each_encoder_separately_and_spares_pooled(sdxl):
    _, stack, ref_l, ref_g = sdxl
    w = torch.ones(1, 77)
    w[0, 2:5] = 1.5
    t = [tok(rand_tokens(8, 17), weights=[w[0].tolist()])]
    got = stack.encode_tokenized(t)
    out_g = hf_run(ref_g, zero_pad(t[0].ids))
    close(got.context[..., :ft.CLIP_L[0]], original_emphasis(hf_run(ref_l, t[0].ids).hidden_states[-2], w))
    close(got.context[..., ft.CLIP_L[0]:], original_emphasis(out_g.hidden_states[-2], w))
    close(got.pooled, out_g.text_embeds)


# ---------------------------------------------------------------- chunks, batches, padding

def test_sdxl_multi_chunk_concat_and_pooled_from_first_chunk(sdxl):
    _, stack, ref_l, ref_g = sdxl
    t = [tok(rand_tokens(75, 18), rand_tokens(30, 19)), tok(rand_tokens(5, 20))]
    got = stack.encode_tokenized(t)
    assert got.context.shape[:2] == (2, 154) and got.chunks == 2
    ids = t[0].ids
    ref = torch.cat([hf_run(ref_l, ids).hidden_states[-2], hf_run(ref_g, zero_pad(ids)).hidden_states[-2]], -1)
    close(got.context[0], torch.cat([ref[0], ref[1]]))        # chunks side by side along tokens
    close(got.pooled[0], hf_run(ref_g, zero_pad(ids[:1])).text_embeds[0])
    # the 1-chunk prompt is padded by repeating its last token vector (A1111 stack_conds)
    one = torch.cat([hf_run(ref_l, t[1].ids).hidden_states[-2], hf_run(ref_g, zero_pad(t[1].ids)).hidden_states[-2]], -1)[0]
    close(got.context[1, :77], one)
    close(got.context[1, 77:], one[-1:].expand(77, -1))
    close(got.pooled[1], hf_run(ref_g, zero_pad(t[1].ids)).text_embeds[0])


def test_pad_to_chunks_appends_empty_prompt_encoding(sd1):
    _, store, ref = sd1
    stack = sd1_stack(store)
    cond = stack.encode(["a b c"])
    empty = hf_run(ref, torch.tensor([chunk([])])).last_hidden_state   # "" = BOS + EOS*76
    padded = stack.pad_to_chunks(cond, 3)
    assert padded.context.shape[1] == 231
    close(padded.context[:, :77], cond.context)
    close(padded.context[:, 77:154], empty)
    close(padded.context[:, 154:], empty)
    assert stack.pad_to_chunks(cond, 1).context is cond.context


def test_encode_strings_dedupes_and_uses_embeddings(sd1):
    _, store, ref = sd1
    stack = sd1_stack(store)
    vec = torch.randn(2, ft.CLIP_L[0], generator=torch.Generator().manual_seed(21))
    cond = stack.encode(["a photo of myemb, red", "z", "a photo of myemb, red"], {"myemb": vec})
    assert cond.context.shape == (3, 77, ft.CLIP_L[0])
    close(cond.context[0], cond.context[2])
    enc = tokenizer().encode
    head = enc("a photo of")
    ids = torch.tensor([chunk(head + [0, 0] + enc(", red"))])   # two placeholder rows for the vectors
    row = 1 + len(head)
    close(cond.context[:1], hf_run(ref, ids, {(0, row): vec[0], (0, row + 1): vec[1]}).last_hidden_state)


def test_encode_strings_with_emphasis_syntax(sd1):
    _, store, ref = sd1
    cond = sd1_stack(store).encode(["(red cat:1.5) on a [mat]"])
    enc = tokenizer().encode
    a, b, c = enc("red cat"), enc(" on a "), enc("mat")
    ids = torch.tensor([chunk(a + b + c)])
    w = torch.ones(1, 77)
    w[0, 1:1 + len(a)] = 1.5
    w[0, 1 + len(a) + len(b):1 + len(a) + len(b) + len(c)] = 1 / 1.1
    close(cond.context, original_emphasis(hf_run(ref, ids).last_hidden_state, w))


def test_sdxl_empty_negative_is_zero_but_empty_positive_is_not(sdxl):
    _, stack, ref_l, _ = sdxl
    neg = stack.encode(["", "bad"], negative=True)
    assert torch.count_nonzero(neg.context[0]) == 0 and torch.count_nonzero(neg.pooled[0]) == 0
    assert torch.count_nonzero(neg.context[1]) > 0
    pos = stack.encode([""])
    close(pos.context[..., :ft.CLIP_L[0]], hf_run(ref_l, torch.tensor([chunk([])])).hidden_states[-2])


def test_pad_after_eos_matches_a1111_rule():
    ids = torch.tensor([chunk([5, 6]), chunk(list(range(1, 76)))])
    close(pad_after_eos(ids, EOS).float(), zero_pad(ids).float())


# ---------------------------------------------------------------- SDXL vector

def test_sdxl_adm_vector_against_diffusers_and_hand_formula():
    pooled = torch.randn(2, 1280, generator=torch.Generator().manual_seed(22))
    width, height, top, left = 1216, 832, 16, 48
    y = sdxl_adm_vector(pooled, width, height, crop_top=top, crop_left=left)
    assert y.shape == (2, 2816)
    close(y[:, :1280], pooled)
    # diffusers SDXL: add_time_ids = original (h, w) + crop (top, left) + target (h, w), embedded by
    # Timesteps(256, flip_sin_to_cos=True, freq_shift=0) each, flattened per image
    times = torch.tensor([height, width, top, left, height, width], dtype=torch.float32)
    ref = get_timestep_embedding(times, 256, flip_sin_to_cos=True, downscale_freq_shift=0).flatten()
    close(y[0, 1280:], ref)
    close(y[1, 1280:], ref)
    # by hand: block 1 is the width; its first half cosines, second half sines of w * 10000^(-i/128)
    for i in (0, 5, 127):
        f = math.exp(-math.log(10000) * i / 128)
        assert abs(y[0, 1280 + 256 + i].item() - math.cos(width * f)) < 1e-4
        assert abs(y[0, 1280 + 256 + 128 + i].item() - math.sin(width * f)) < 1e-4


# ---------------------------------------------------------------- loading

def test_sd1_legacy_key_layout_loads_the_same(sd1):
    _, store, _ = sd1
    legacy = TensorStore.from_dict(ft._prefixed("cond_stage_model.transformer.",
                                                ft.hf_clip_text_state(*ft.CLIP_L, seed=0, text_model_prefix=False)))
    t = [tok(rand_tokens(11, 23))]
    close(sd1_stack(legacy).encode_tokenized(t).context, sd1_stack(store).encode_tokenized(t).context)


def test_sd2_turbo_sgm_prefix_loads(sd2):
    state, stack, _ = sd2
    turbo = {k.replace("cond_stage_model.", "conditioner.embedders.0."): v for k, v in state.items()}
    other = load_text_stack(TensorStore.from_dict(turbo), "sd2", tokenizer())
    t = [tok(rand_tokens(7, 24))]
    close(other.encode_tokenized(t).context, stack.encode_tokenized(t).context)


def test_loader_errors_name_keys_and_settings(sd1, sdxl):
    state, store, _ = sd1
    broken = {k: v for k, v in state.items() if "layers.1.mlp.fc2.bias" not in k}
    with pytest.raises(ModelFileError, match="missing CLIP-L text encoder weights .*layers.1.mlp.fc2.bias"):
        sd1_stack(TensorStore.from_dict(broken))
    extra = dict(state, **{"cond_stage_model.transformer.text_model.extra.weight": torch.zeros(1)})
    with pytest.raises(ModelFileError, match="unexpected"):
        sd1_stack(TensorStore.from_dict(extra))
    with pytest.raises(SettingError, match="Clip skip"):
        sd1_stack(store, clip_skip=ft.CLIP_L[1] + 1)
    xl_store = sdxl[0]
    no_proj = {k: xl_store.tensor(k) for k in xl_store.keys() if not k.endswith("text_projection")}
    with pytest.raises(ModelFileError, match="text_projection"):
        load_text_stack(TensorStore.from_dict(no_proj), "sdxl", tokenizer())
    with pytest.raises(ModelFileError, match="no CLIP text encoder"):
        load_text_stack(store, "sd2", tokenizer())


def test_half_precision_load_keeps_dtype(sd1):
    _, store, _ = sd1
    stack = sd1_stack(store, dtype=torch.bfloat16)
    cond = stack.encode_tokenized([tok(rand_tokens(5, 25))])
    assert cond.context.dtype == torch.bfloat16 and isinstance(cond, Conditioning)


def test_each_encoder_tokenizes_in_its_own_style(sdxl):
    """SDXL: CLIP-L as transformers' CLIPTokenizer, bigG as open_clip's (html unescape)."""
    store, _, ref_l, ref_g = sdxl
    stack = load_text_stack(store, "sdxl", tokenizer())
    assert [e.tokenizer.html_unescape for e in stack.encoders] == [False, True]
    got = stack.encode(["salt &amp; pepper"])
    ids_l = torch.tensor([chunk(tokenizer().encode("salt &amp; pepper"))])
    ids_g = torch.tensor([chunk(tokenizer().encode("salt & pepper"), pad=0)])
    assert not torch.equal(ids_l[:, :6], ids_g[:, :6])
    close(got.context[..., :ft.CLIP_L[0]], hf_run(ref_l, ids_l).hidden_states[-2])
    close(got.context[..., ft.CLIP_L[0]:], hf_run(ref_g, ids_g).hidden_states[-2])
    close(got.pooled, hf_run(ref_g, ids_g).text_embeds)


def test_sd2_encode_string_pads_with_zero(sd2):
    _, stack, ref = sd2
    got = stack.encode(["a castle on a hill"])
    ids = torch.tensor([chunk(tokenizer().encode("a castle on a hill"), pad=0)])
    close(got.context, final_norm(ref, hf_run(ref, ids).hidden_states[-2]))
