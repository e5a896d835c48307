"""Textual-inversion embedding files: every real layout, the family check, the library, and
prompt encoding against transformers' text models with the embedding rows put in by hand.

Files are written here the way their tools write them (A1111 `Embedding.save`, rinongal's
ParameterDict, kohya `emb_params` and SDXL `clip_l`/`clip_g` safetensors, diffusers
`learned_embeds.bin`, A1111's embedding PNG with its base64 JSON text chunk); the source models
are tiny real-layout checkpoints (tests/factories.py) loaded with `load_model`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from safetensors.torch import save_file
from transformers import CLIPTextModelWithProjection

import factories
import factory_text as ft
from references import BOS, EOS, hf_clip_l, hf_openclip
from lib_deltasampling.errors import ModelFileError
from lib_deltasampling.runtime.model import load_model
from lib_deltasampling.runtime.placement import Placement
from lib_deltasampling.runtime.text import embeddings as emb_mod
from lib_deltasampling.runtime.text.embeddings import (EmbeddingLibrary, encoder_widths, load_embedding,
                                                       ti_hashes)
from lib_deltasampling.runtime.text.tokenizer import ClipTokenizer

CPU32 = Placement(torch.device("cpu"), torch.float32)
SEED = 5
WL, WG = ft.CLIP_L[0], ft.CLIP_G[0]    # tiny CLIP-L and bigG widths (SD1 and SD2 are both 128 here)
SD1_WIDTHS = {"clip_l": WL}
TOL = 1e-4


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- writers, one per tool

def write_a1111_pt(path: Path, vec: torch.Tensor) -> Path:
    """A1111 `Embedding.save`: this dict, torch.save'd (vec is the trained leaf tensor)."""
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vec.clone().requires_grad_(True)},
                "name": path.stem, "step": 1500, "sd_checkpoint": "e1441589a6",
                "sd_checkpoint_name": "v1-5-pruned-emaonly"}, path)
    return path


def write_parameterdict_pt(path: Path, vec: torch.Tensor) -> Path:
    """rinongal/ldm textual_inversion `EmbeddingManager.save`: string_to_param is a ParameterDict."""
    torch.save({"string_to_token": {"*": torch.tensor(265)},
                "string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(vec.clone())})}, path)
    return path


def write_emb_params(path: Path, vec: torch.Tensor) -> Path:
    """kohya sd-scripts train_textual_inversion, .safetensors output."""
    save_file({"emb_params": vec.contiguous()}, str(path), metadata={"ss_output_name": path.stem})
    return path


def write_learned_embeds(path: Path, vec: torch.Tensor) -> Path:
    """diffusers textual_inversion.py `learned_embeds.bin`: {placeholder token: vector(s)}; one vector is 1-D."""
    torch.save({"<cat-toy>": vec[0] if vec.shape[0] == 1 else vec}, path)
    return path


def write_sdxl(path: Path, clip_l: torch.Tensor, clip_g: torch.Tensor) -> Path:
    """kohya sdxl_train_textual_inversion / civitai SDXL embeddings."""
    save_file({"clip_l": clip_l.contiguous(), "clip_g": clip_g.contiguous()}, str(path))
    return path


def a1111_png(path: Path, vec: torch.Tensor, name: str, zip_text: bool = False) -> Path:
    """A1111 training's embedding image: the .pt dict as JSON (tensors -> {"TORCHTENSOR": lists}),
    base64, in a PNG text chunk "sd-ti-embedding" (`embedding_to_b64`, `PngInfo.add_text`)."""
    data = {"string_to_token": {"*": 265}, "string_to_param": {"*": {"TORCHTENSOR": vec.tolist()}},
            "name": name, "step": 500, "sd_checkpoint": None, "sd_checkpoint_name": None}
    info = PngInfo()
    info.add_text("sd-ti-embedding", base64.b64encode(json.dumps(data).encode()), zip=zip_text)
    Image.new("RGB", (16, 16), (40, 90, 140)).save(path, pnginfo=info)
    return path


# ---------------------------------------------------------------- references (transformers)

def run_with_rows(model, ids: list[int], rows: dict[int, torch.Tensor]):
    """Run the text model on one row of ids; token-embedding outputs at positions `rows` are
    replaced by the given vectors (what a textual-inversion embedding is)."""
    inner = model.text_model if isinstance(model, CLIPTextModelWithProjection) else model
    def hook(_m, _inp, out):
        out = out.clone()
        for pos, v in rows.items():
            out[0, pos] = v
        return out
    h = inner.embeddings.token_embedding.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    finally:
        h.remove()


def prompt_ids(tokenizer: ClipTokenizer, prefix: str, n_vectors: int, pad: int) -> tuple[list[int], list[int]]:
    """A1111's ids for "<prefix> <embedding>": BOS, prefix tokens, n placeholder slots (id 0), EOS, padding."""
    head = [BOS] + tokenizer.encode(prefix)
    ids = head + [0] * n_vectors + [EOS]
    return ids + [pad] * (77 - len(ids)), list(range(len(head), len(head) + n_vectors))


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    assert (a - b).abs().max().item() <= TOL


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("ckpt")
    return {f: load_model(factories.write_checkpoint(d / f"{f}.safetensors", f, seed=SEED), placement=CPU32,
                          tokenizer=tokenizer, prediction="eps") for f in ("sd1", "sdxl")}


# ---------------------------------------------------------------- layouts

LAYOUTS = {
    "a1111.pt": (write_a1111_pt, "string_to_param"),
    "ldm_parameterdict.pt": (write_parameterdict_pt, "string_to_param"),
    "kohya.safetensors": (write_emb_params, "emb_params"),
    "learned_embeds.bin": (write_learned_embeds, "diffusers"),
}


@pytest.mark.parametrize("n_vectors", [1, 3])
@pytest.mark.parametrize("filename", list(LAYOUTS))
def test_each_layout_reads_its_vectors_and_takes_the_file_name(tmp_path, filename, n_vectors):
    if filename == "ldm_parameterdict.pt" and not hasattr(torch.serialization, "safe_globals"):
        pytest.skip("torch < 2.5 cannot allow ParameterDict in weights_only loads")
    writer, fmt = LAYOUTS[filename]
    vec = rand(n_vectors, WL, seed=n_vectors)
    e = load_embedding(writer(tmp_path / filename, vec), "sd1", SD1_WIDTHS)
    assert e.name == Path(filename).stem          # A1111: file name without extension, never the stored name
    assert e.format == fmt and e.n_vectors == n_vectors and e.family == "sd1"
    assert e.vectors.dtype == torch.float32 and not e.vectors.requires_grad
    assert torch.equal(e.vectors, vec)


def test_low_precision_vectors_become_float32(tmp_path):
    vec = rand(2, WL, seed=3).half()
    e = load_embedding(write_emb_params(tmp_path / "half.safetensors", vec), "sd1", SD1_WIDTHS)
    assert e.vectors.dtype == torch.float32 and torch.equal(e.vectors, vec.float())


def test_name_keeps_inner_dots(tmp_path):
    e = load_embedding(write_emb_params(tmp_path / "style.v2.safetensors", rand(1, WL, seed=1)), "sd1", SD1_WIDTHS)
    assert e.name == "style.v2"


@pytest.mark.parametrize("zip_text", [False, True])
def test_a1111_png_text_chunk_is_read_without_pickle(tmp_path, zip_text):
    vec = rand(2, WL, seed=4)
    e = load_embedding(a1111_png(tmp_path / "shown-500.png", vec, "inner-name", zip_text), "sd1", SD1_WIDTHS)
    assert e.name == "inner-name"                 # A1111 takes the name stored in the image
    assert e.format == "png text" and torch.allclose(e.vectors, vec, rtol=0, atol=0)


def test_images_without_the_text_chunk_are_refused_clearly(tmp_path):
    plain = tmp_path / "pixels.png"
    Image.new("RGB", (16, 16)).save(plain)
    with pytest.raises(ModelFileError, match="pixels.png.*no 'sd-ti-embedding' text chunk.*pixels are not supported"):
        load_embedding(plain, "sd1", SD1_WIDTHS)
    webp = tmp_path / "emb.webp"
    webp.write_bytes(b"RIFF\x00\x00\x00\x00WEBP")
    with pytest.raises(ModelFileError, match=r"emb.webp.*\.webp images.*not supported.*\.pt or \.safetensors"):
        load_embedding(webp, "sd1", SD1_WIDTHS)


# ---------------------------------------------------------------- family check

def test_sdxl_embedding_on_sd1_source_names_file_and_both_families(tmp_path, models):
    path = write_sdxl(tmp_path / "xl_style.safetensors", rand(1, WL, seed=1), rand(1, WG, seed=2))
    with pytest.raises(ModelFileError) as e:
        load_embedding(path, "sd1", encoder_widths(models["sd1"].text))
    msg = str(e.value)
    assert "xl_style.safetensors" in msg and "SDXL-style" in msg and "source model is SD1.x" in msg
    assert "Use an embedding trained for SD1.x" in msg


def test_sd1_embedding_on_sdxl_source_names_file_and_both_families(tmp_path, models):
    path = write_a1111_pt(tmp_path / "sd15_thing.pt", rand(2, WL, seed=1))
    with pytest.raises(ModelFileError) as e:
        load_embedding(path, "sdxl", encoder_widths(models["sdxl"].text))
    msg = str(e.value)
    assert "sd15_thing.pt" in msg and "width 128" in msg and "source model is SDXL" in msg


@pytest.mark.parametrize("vectors, family, widths, says", [
    ({"v": (768,)}, "sdxl", {"clip_l": 768, "clip_g": 1280}, "an SD1.x embedding (width 768), but the source model is SDXL"),
    ({"v": (1024,)}, "sd1", {"clip_l": 768}, "an SD2.x embedding (width 1024), but the source model is SD1.x"),
    ({"clip_l": (768,), "clip_g": (1280,)}, "sd2", {"clip_l": 1024}, "an SDXL embedding, but the source model is SD2.x"),
    ({"v": (768,)}, "sd2", {"clip_l": 1024}, "an SD1.x embedding (width 768), but the source model is SD2.x"),
])
def test_real_widths_name_the_embedding_family(tmp_path, vectors, family, widths, says):
    path = tmp_path / "e.safetensors"
    save_file({k: torch.zeros(1, *s) + 0.1 for k, s in vectors.items()}, str(path))
    with pytest.raises(ModelFileError, match=says.replace("(", r"\(").replace(")", r"\)")):
        load_embedding(path, family, widths)


def test_matching_real_widths_load(tmp_path):
    path = write_sdxl(tmp_path / "xl.safetensors", torch.full((2, 768), 0.1), torch.full((2, 1280), 0.2))
    e = load_embedding(path, "sdxl", {"clip_l": 768, "clip_g": 1280})
    assert e.n_vectors == 2 and e.widths == {"clip_l": 768, "clip_g": 1280} and e.format == "clip_l/clip_g"


# ---------------------------------------------------------------- broken and hostile files

@pytest.mark.parametrize("tensors, says", [
    ({"emb_params": torch.tensor([[0.1] * WL, [float("nan")] * WL])}, "NaN or infinite"),
    ({"emb_params": torch.full((1, WL), float("inf"))}, "NaN or infinite"),
    ({"emb_params": torch.zeros(0, WL)}, "holds no vectors"),
    ({"emb_params": torch.zeros(76, WL)}, "76 vectors"),
    ({"emb_params": torch.zeros(2, 3, WL)}, r"shape \[2, 3, 128\]"),
    ({"emb_params": torch.zeros(2, WL, dtype=torch.int32)}, "not floating-point"),
    ({"clip_l": torch.zeros(2, WL), "clip_g": torch.zeros(3, WG)}, "different vector counts"),
    ({f"lora_unet_block_{i}.lora_down.weight": torch.zeros(4, 8) for i in range(7)},
     "not a textual-inversion embedding .7 tensors"),
])
def test_broken_embeddings_are_refused(tmp_path, tensors, says):
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    widths = {"clip_l": WL, "clip_g": WG} if "clip_g" in tensors else SD1_WIDTHS
    with pytest.raises(ModelFileError, match="bad.safetensors.*" + says):
        load_embedding(path, "sdxl" if "clip_g" in tensors else "sd1", widths)


def test_pt_with_several_terms_or_no_dict_is_refused(tmp_path):
    two = tmp_path / "two.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1, WL), "#": torch.zeros(1, WL)}}, two)
    with pytest.raises(ModelFileError, match="two.pt.*holds 2 terms"):
        load_embedding(two, "sd1", SD1_WIDTHS)
    bare = tmp_path / "bare.pt"
    torch.save(torch.zeros(1, WL), bare)
    with pytest.raises(ModelFileError, match="bare.pt.*holds a Tensor, not an embedding dictionary"):
        load_embedding(bare, "sd1", SD1_WIDTHS)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ModelFileError, match="empty.pt.*empty"):
        load_embedding(empty, "sd1", SD1_WIDTHS)


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


def test_malicious_pt_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "marker.txt"
    evil = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": _RunsCode(marker)}, "name": "evil"}, evil)
    with pytest.raises(ModelFileError, match="evil.pt.*refused.*could run code"):
        load_embedding(evil, "sd1", SD1_WIDTHS)
    assert not marker.exists(), "the pickle's code ran"
    # control: an ordinary unpickle of the same payload does run it
    control = tmp_path / "control.pkl"
    control.write_bytes(pickle.dumps(_RunsCode(marker)))
    pickle.loads(control.read_bytes())
    assert marker.exists()


# ---------------------------------------------------------------- encoding (transformers reference)

def test_sd1_prompt_with_embedding_equals_transformers_with_replaced_rows(tmp_path, models, tokenizer):
    model = models["sd1"]
    vec = rand(2, WL, seed=21)
    write_a1111_pt(tmp_path / "myemb.pt", vec)
    write_emb_params(tmp_path / "unused.safetensors", rand(1, WL, seed=22))
    lib = EmbeddingLibrary.for_text_stack([tmp_path], model.text)
    prompt = "a photo of myemb"
    embeddings = lib.for_prompt(prompt)
    assert list(embeddings) == ["myemb"]
    got = model.encode([prompt], width=64, height=64, embeddings=embeddings)["context"]

    state = factories.checkpoint_tensors("sd1", SEED)
    ids, slots = prompt_ids(tokenizer, "a photo of", 2, pad=EOS)
    ref = run_with_rows(hf_clip_l(state, "cond_stage_model.transformer."), ids, dict(zip(slots, vec)))
    close(got, ref.last_hidden_state)             # SD1: last layer with final norm (Clip skip 1)
    plain = model.encode([prompt], width=64, height=64)["context"]  # the name as ordinary words
    assert (plain - got).abs().max() > 1e-2


def test_sdxl_clip_l_vectors_go_to_clip_l_and_clip_g_to_bigg(tmp_path, models, tokenizer):
    model = models["sdxl"]
    clip_l, clip_g = rand(3, WL, seed=31), rand(3, WG, seed=32)
    write_sdxl(tmp_path / "xlemb.safetensors", clip_l, clip_g)
    lib = EmbeddingLibrary.for_text_stack([tmp_path], model.text)
    prompt = "a photo of xlemb"
    got = model.text.encode([prompt], lib.for_prompt(prompt))

    state = factories.checkpoint_tensors("sdxl", SEED)
    ids_l, slots = prompt_ids(tokenizer, "a photo of", 3, pad=EOS)
    ids_g, _ = prompt_ids(tokenizer, "a photo of", 3, pad=0)      # OpenCLIP pads with 0
    out_l = run_with_rows(hf_clip_l(state, "conditioner.embedders.0.transformer."), ids_l, dict(zip(slots, clip_l)))
    out_g = run_with_rows(hf_openclip(state, "conditioner.embedders.1.model.", ft.CLIP_G, ft.CLIP_G_PROJ), ids_g, dict(zip(slots, clip_g)))
    close(got.context[..., :WL], out_l.hidden_states[-2])    # CLIP-L penultimate, no final norm
    close(got.context[..., WL:], out_g.hidden_states[-2])    # bigG penultimate
    close(got.pooled, out_g.text_embeds)                     # pooled sees the clip_g rows too


# ---------------------------------------------------------------- the library

@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "embeddings"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    write_a1111_pt(root / "myemb.pt", rand(1, WL, seed=41))
    write_emb_params(root / "a" / "myemb.safetensors", rand(2, WL, seed=42))   # same name, loaded later: wins
    write_emb_params(root / "a" / "other.safetensors", rand(1, WL, seed=43))
    write_emb_params(root / "b" / "hand.safetensors", rand(1, WL, seed=44))
    write_emb_params(root / "b" / "bad-hands-5.safetensors", rand(2, WL, seed=45))
    write_sdxl(root / "b" / "xlonly.safetensors", rand(1, WL, seed=46), rand(1, WG, seed=47))
    a1111_png(root / "b" / "picture.png", rand(1, WL, seed=48), "fromimage")
    Image.new("RGB", (8, 8)).save(root / "myemb.preview.png")
    Image.new("RGB", (8, 8)).save(root / "b" / "cover.png")
    (root / "notes.txt").write_text("not an embedding")
    (root / "zero.pt").write_bytes(b"")
    return root


@pytest.fixture
def load_count(monkeypatch):
    calls = []
    real = emb_mod.load_embedding
    monkeypatch.setattr(emb_mod, "load_embedding", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    return calls


def test_library_indexes_names_without_loading(folder, load_count):
    lib = EmbeddingLibrary([folder], "sd1", SD1_WIDTHS)
    assert sorted(lib.names()) == ["bad-hands-5", "fromimage", "hand", "myemb", "other", "xlonly"]
    assert load_count == []
    assert lib.path("myemb") == folder / "a" / "myemb.safetensors"   # subfolders walk after their parent
    assert len(lib.collisions) == 1 and "myemb" in lib.collisions[0] and "myemb.pt" in lib.collisions[0]
    assert folder / "b" / "cover.png" in lib.ignored and folder / "zero.pt" in lib.ignored
    assert folder / "myemb.preview.png" not in lib.ignored          # previews are skipped silently


@pytest.mark.parametrize("with_tokenizer", [True, False])
def test_for_prompt_returns_only_the_names_used(folder, tokenizer, load_count, with_tokenizer):
    lib = EmbeddingLibrary([folder], "sd1", SD1_WIDTHS, tokenizers=[tokenizer] if with_tokenizer else [])
    got = lib.for_prompt("a photo of MyEmb, (other:1.2), two hands, <lora:hand:1> BREAK bad-hands-5")
    assert list(got) == ["myemb", "other", "bad-hands-5"]       # index order; "hands" is not "hand"
    assert torch.equal(got["myemb"], rand(2, WL, seed=42))       # the copy loaded last
    assert torch.equal(got["bad-hands-5"], rand(2, WL, seed=45))
    assert lib.for_prompt("nothing here, handsome photo") == {}
    assert lib.for_prompt(["fromimage", "x"]).keys() == {"fromimage"}
    n = len(load_count)
    lib.for_prompt("other myemb")
    assert len(load_count) == n                                  # cached


def test_tokenizer_matching_is_a1111s_and_feeds_encode(folder, tokenizer, models):
    lib = EmbeddingLibrary.for_text_stack([folder], models["sd1"].text)
    prompt = "bad-hands-5 and other,myemb"
    embeddings = lib.for_prompt(prompt)
    assert set(embeddings) == {"bad-hands-5", "other", "myemb"}
    # the encoder's own tokenization finds exactly these names (and occupies their vector rows)
    t = models["sd1"].text.tokenize(prompt, embeddings)[0]
    assert {name for chunk in t.fixes for _, name in chunk} == set(embeddings)


def test_wrong_family_in_a_prompt_raises_or_is_skipped(folder):
    lib = EmbeddingLibrary([folder], "sd1", SD1_WIDTHS)
    with pytest.raises(ModelFileError, match="xlonly.safetensors.*SDXL-style.*source model is SD1.x"):
        lib.for_prompt("xlonly, other")
    got = lib.for_prompt("xlonly, other", strict=False)          # A1111 skips it: the name stays plain text
    assert list(got) == ["other"] and "xlonly" in lib.problems and "SD1.x" in lib.problems["xlonly"]


def test_changed_file_is_reloaded(folder):
    lib = EmbeddingLibrary([folder], "sd1", SD1_WIDTHS)
    first = lib.get("other")
    assert lib.get("other") is first
    write_emb_params(folder / "a" / "other.safetensors", rand(3, WL, seed=50))
    os.utime(folder / "a" / "other.safetensors", ns=(1, 10**18))
    assert lib.get("other").n_vectors == 3


# ---------------------------------------------------------------- describe, hashes

def test_describe_and_ti_hashes(tmp_path):
    path = write_a1111_pt(tmp_path / "wei:rd,name.pt", rand(2, WL, seed=60))
    e = load_embedding(path, "sd1", SD1_WIDTHS)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    d = e.describe()
    assert d["hash"] == sha[:12] and e.sha256 == sha              # A1111 Embedding.set_hash: sha256[0:12]
    assert (d["name"], d["format"], d["family"], d["vectors"], d["widths"]) == \
        ("wei:rd,name", "string_to_param", "SD1.x", 2, {"clip_l": WL})
    assert d["step"] == 1500 and d["sd_checkpoint_name"] == "v1-5-pruned-emaonly"
    other = load_embedding(write_emb_params(tmp_path / "b.safetensors", rand(1, WL, seed=61)), "sd1", SD1_WIDTHS)
    # A1111 sd_hijack_clip: "name: shorthash" joined by ", ", ':' and ',' removed from names
    assert ti_hashes([e, other]) == f"weirdname: {sha[:12]}, b: {other.shorthash}"
