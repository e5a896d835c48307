"""CLIP tokenizer against independent references.

References:
- transformers.CLIPTokenizer built from the real vocabulary. A1111 1.10 runs transformers'
  Python CLIPTokenizer, which applies ftfy.fix_text first; the transformers 5 tokenizer has
  no ftfy step, so ftfy.fix_text is applied to its input.
- open_clip's SimpleTokenizer (its tokenizer.py loaded as a lone file: importing the
  open_clip package would need torchvision), for the OpenCLIP flavour and for the cases
  where the `tokenizers` library departs from Python's `regex`/str.lower() (which A1111's
  Python tokenizers use).
- the `regex` package for the pre-tokenization pattern itself.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import random
import unicodedata
from pathlib import Path

import pytest

from lib_deltasampling.errors import ModelFileError, UserError
from lib_deltasampling.runtime.text import tokenizer as tk
from lib_deltasampling.runtime.text.tokenizer import ClipTokenizer, VocabSource, find_vocab, pre_tokenize

ftfy = pytest.importorskip("ftfy")
regex = pytest.importorskip("regex")
transformers = pytest.importorskip("transformers")


from vocab import open_clip_dir as _open_clip_dir


@pytest.fixture(scope="module")
def gz_path() -> Path:
    return _open_clip_dir() / "bpe_simple_vocab_16e6.txt.gz"


@pytest.fixture(scope="module")
def hf_dir(gz_path, tmp_path_factory) -> Path:
    """vocab.json + merges.txt made the standard way (OpenAI CLIP / open_clip): the 256
    byte characters, the same with '</w>', one token per merge, then the two specials."""
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    lines = gzip.decompress(gz_path.read_bytes()).decode("utf-8").split("\n")[1:48894 + 1]
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = [chr(b) for b in bs] + [chr(256 + n) for n in range(256 - len(bs))]
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in lines]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def hf(hf_dir):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return transformers.CLIPTokenizer.from_pretrained(str(hf_dir))


@pytest.fixture(scope="module")
def open_clip_ref(gz_path):
    spec = importlib.util.spec_from_file_location("_open_clip_tokenizer_file", gz_path.parent / "tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer(str(gz_path))


@pytest.fixture(scope="module")
def tok(gz_path) -> ClipTokenizer:
    return ClipTokenizer(gz_path)


@pytest.fixture(scope="module")
def tok_open_clip(gz_path) -> ClipTokenizer:
    return ClipTokenizer(gz_path, html_unescape=True)


PROMPTS = [
    "",
    "a photo of a cat",
    "masterpiece, best quality, 1girl, solo, long hair, looking at viewer",
    "A Photo Of A CAT",
    # accents, precomposed and combining
    "Café naïve résumé, crème brûlée",
    "e\u0301le\u0300ve, n\u0303, Zoë",
    "q\u0303 a\u0308\u0304 combining marks",
    "Ångström ﬁne ﬂour (ligatures)",
    # scripts
    "東京タワーの夜景",
    "中文提示词，高质量",
    "한국어 프롬프트",
    "Привет мир, ЁЖИК",
    "Ελληνικά γράμματα",
    "مرحبا بالعالم",
    "שלום עולם",
    "हिन्दी पाठ",
    "ไทยภาษา",
    # emoji and symbols
    "😀🎉 party 👩‍👩‍👧 family",
    "🇯🇵 flag, ❤️ heart, ©®™",
    "★☆♪ → ← ∞ ≠ ±",
    # punctuation
    "hello!!! what?? ... --- ___",
    "(((masterpiece))), [[bad hands]], {curly}",
    "a|b|c <tag> #hash @at $5 %20 ^caret &and *star",
    "\"double\" 'single' `back`",
    "“curly” ‘quotes’ «guillemets»",
    "em—dash en–dash",
    "path/to\\file.png",
    # numbers
    "12345 and 3.14159",
    "1girl 2boys 100%",
    "½ cup, ¼ inch, ¾",
    "x² + y³ = z⁴, H₂O",
    "Ⅻ roman ⅻ numerals, ① circled",
    "٣ arabic-indic ٤٥, ۷ persian",
    "1,000,000 and 1.5e10",
    # contractions
    "don't won't I'm we'll they've you're he'd",
    "DON'T SHE'S IT'LL",
    "rock'n'roll o'clock '90s",
    "it ' s spaced ' t",
    # whitespace
    "  lots   of \t\n space  ",
    "tab\tseparated\nnew\r\nlines",
    "no\u00a0break\u2003em\u3000ideographic",
    "   ",
    # html entities (ftfy unescapes them when the text has no '<')
    "&amp; &lt;b&gt; &quot;q&quot; &#39; &eacute;",
    "tom &amp; jerry",
    # fullwidth
    "Ｆｕｌｌｗｉｄｔｈ　ｔｅｘｔ１２３",
    # mixed and long
    "score_9, score_8_up, source_anime, rating_safe",
    "a (red:1.3) [blue] hat, <lora:foo:0.8> BREAK next",
    "a very long prompt " * 40,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "camelCaseWords snake_case_words kebab-case-words",
    "mixed123letters456 and x86_64",
    "<|startoftext|> x <|endoftext|>",
    "word<|endoftext|>word",
]


def test_at_least_fifty_prompts():
    assert len(PROMPTS) >= 50


@pytest.mark.parametrize("text", PROMPTS)
def test_ids_match_transformers(tok, hf, text):
    expected = hf(ftfy.fix_text(text), add_special_tokens=False)["input_ids"]
    assert tok.encode(text) == expected


@pytest.mark.parametrize("text", [p for p in PROMPTS if "<|" not in p])
def test_open_clip_flavour_matches_open_clip(tok_open_clip, open_clip_ref, text):
    assert tok_open_clip.encode(text) == open_clip_ref.encode(text)


@pytest.mark.parametrize("text", [
    "ΣΑΣ ΟΔΟΣ",            # Python's lower() writes a final sigma; `tokenizers` does not
    "'ſ test 'ſ",           # IGNORECASE: "'ſ" matches the contraction 's in `regex`
    "a\u0345b !\u0345!",    # IGNORECASE: U+0345 matches no alternative in `regex`
])
def test_python_regex_semantics(tok, open_clip_ref, text):
    # A1111's transformers 4.30 CLIPTokenizer uses `regex` and str.lower() exactly like
    # open_clip's SimpleTokenizer; without '&' or special spellings both give the same ids.
    assert tok.encode(text) == open_clip_ref.encode(text)


def test_special_token_spellings(tok, tok_open_clip):
    eos = tok.eos_id
    # transformers: exact spellings are cut out of the raw text first ...
    assert tok.encode("!<|endoftext|>") == tok.encode("!") + [eos]
    # ... other casings are lowercased, matched by the pattern and mapped to the special token.
    assert tok.encode("<|ENDOFTEXT|>") == [eos]
    assert tok.encode("x <|StartOfText|> y") == tok.encode("x") + [tok.bos_id] + tok.encode("y")
    # open_clip spells them <start_of_text>/<end_of_text>; the HF spelling is ordinary text.
    assert tok_open_clip.encode("a <end_of_text>") == tok.encode("a") + [eos]
    assert tok_open_clip.encode("<|endoftext|>") == tok.encode("<|") + tok.encode("endoftext") + tok.encode("|>")
    assert tok.encode("<end_of_text>") == tok.encode("<") + tok.encode("end_of_text") + tok.encode(">")


def test_html_unescape(tok, tok_open_clip):
    # ftfy.fix_text unescapes entities once when the text has no '<'; open_clip then
    # applies html.unescape twice more.
    assert tok.encode("&amp;amp;") == tok.encode("&amp;")
    assert tok_open_clip.encode("&amp;amp;") == tok.encode("&")
    # with a '<' in the text ftfy leaves entities alone: "amp" stays a word for CLIP-L
    assert tok.token_id("amp</w>") in tok.encode("<b>&amp;</b>")
    assert tok.encode("<b>&amp;</b>") != tok.encode("<b>&</b>")
    assert tok_open_clip.encode("<b>&amp;</b>") == tok.encode("<b>&</b>")
    assert tok_open_clip.encode("fish &amp;amp; chips") == tok.encode("fish & chips")


def test_pre_tokenize_matches_regex_package():
    pattern = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
                            r"""[^\s\p{L}\p{N}]+""", regex.IGNORECASE)
    rng = random.Random(0)
    assigned = [chr(c) for c in range(0x20, 0x30000, 7)
                if not 0xD800 <= c < 0xE000 and unicodedata.category(chr(c)) != "Cn"]
    tricky = list("'sStTrReEvVmMlLdDſK<|> \t\n\x1c\x1f\x85\xa0\u2028\u0345_1½²٣") + [
        "<|startoftext|>", "<|endoftext|>", "<|EndOfText|>", "<|ſtartoftext|>", "'ll", "'RE", "'ve"]
    for _ in range(3000):
        text = "".join(rng.choice(tricky) if rng.random() < 0.6 else rng.choice(assigned)
                       for _ in range(rng.randint(0, 24)))
        assert pre_tokenize(text) == pattern.findall(text), repr(text)


def test_whitespace_clean_matches_regex_package():
    for text in ["  a \t b\n\nc  ", "\x1ca\x1f", "a\x1cb", "\u3000x\u2003y\xa0", "\x85z"]:
        assert tk.whitespace_clean(text) == regex.sub(r"\s+", " ", text).strip()


def test_hf_folder_and_merges_file_agree(gz_path, hf_dir, tok):
    from_folder = ClipTokenizer(hf_dir)
    assert from_folder.source.kind == "hf_folder" and tok.source.kind == "merges_gz"
    for text in PROMPTS:
        assert from_folder.encode(text) == tok.encode(text)
    a, b = tk.load_vocab(from_folder.source), tk.load_vocab(tok.source)
    assert dict(a.encoder) == dict(b.encoder) and dict(a.ranks) == dict(b.ranks)


def test_special_ids_and_size(tok, hf):
    assert (tok.bos_id, tok.eos_id) == (hf.bos_token_id, hf.eos_token_id)
    assert tok.vocab_size == len(hf.get_vocab())
    assert tok.comma_id == hf.convert_tokens_to_ids(",</w>")
    assert tok.token_id("cat</w>") == hf.convert_tokens_to_ids("cat</w>")


@pytest.mark.parametrize("text", ["a photo of a cat", "Café, 東京! 😀", "don't stop"])
def test_decode_matches_transformers(tok, hf, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == hf.decode(ids)


def test_bpe_cache_is_bounded(gz_path, tok):
    small = ClipTokenizer(gz_path, cache_size=4)
    text = "alpha beta gamma delta epsilon zeta eta theta iota kappa"
    assert small.encode(text) == tok.encode(text)
    assert len(small._cache) <= 4
    assert small.encode(text) == tok.encode(text)


def test_vocab_parse_is_shared(gz_path):
    assert tk.load_vocab(VocabSource("merges_gz", gz_path)) is tk.load_vocab(VocabSource("merges_gz", gz_path))


# ---------------------------------------------------------------------------------------
# find_vocab


@pytest.fixture
def no_packages(monkeypatch):
    monkeypatch.setattr(tk, "_package_dir", lambda name: None)


def test_find_vocab_names_the_places_in_a_few_lines(tmp_path, no_packages):
    env = {"HOME": str(tmp_path / "home"), "HF_HOME": str(tmp_path / "hfhome")}
    with pytest.raises(UserError) as err:
        find_vocab(env=env, webui_root=tmp_path / "webui")
    message = str(err.value)
    assert tk.VOCAB_ENV in message and "Delta Sampling's settings" in message and len(message) < 600
    assert str(tmp_path / "hfhome" / "hub") in message and str(tmp_path / "webui") in message
    assert "open_clip" in message and "pip install open_clip_torch" in message
    looked = "\n".join(err.value.looked)  # the full list, for a log
    assert str(tmp_path / "hfhome" / "hub" / "models--openai--clip-vit-large-patch14") in looked
    assert str(tmp_path / "home" / ".cache" / "huggingface" / "hub") in looked
    assert str(tmp_path / "webui" / "backend" / "huggingface") in looked
    # from the command line the fix names the flag, not a WebUI settings screen
    with pytest.raises(UserError) as err:
        find_vocab(env=env, configure="--vocab")
    assert "Point --vocab" in str(err.value) and "settings" not in str(err.value) and "WebUI" not in str(err.value)


def test_find_vocab_configured_paths(tmp_path, gz_path, hf_dir, no_packages):
    env = {"HOME": str(tmp_path), tk.VOCAB_ENV: str(gz_path)}
    assert find_vocab(env=env) == VocabSource("merges_gz", gz_path, f"${tk.VOCAB_ENV}")
    # settings come before the environment variable; a vocab.json path means its folder
    found = find_vocab([hf_dir / "vocab.json"], env=env)
    assert (found.kind, found.path) == ("hf_folder", hf_dir)
    # a folder holding the .gz
    assert find_vocab([gz_path.parent], env={}).path == gz_path
    # an explicit path that does not work is an error naming it, not silently skipped
    missing = tmp_path / "nowhere" / "vocab"
    with pytest.raises(ModelFileError) as err:
        find_vocab(env={tk.VOCAB_ENV: str(missing)})
    assert str(missing) in str(err.value) and "does not exist" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFileError, match="vocab.json and merges.txt"):
        find_vocab([tmp_path / "empty"], env={})


def _copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for name in ("vocab.json", "merges.txt"):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_find_vocab_hf_cache_and_webui(tmp_path, hf_dir, no_packages):
    snap = _copy_folder(hf_dir, tmp_path / "hub" / "models--openai--clip-vit-large-patch14" / "snapshots" / "abc")
    found = find_vocab(env={"HF_HUB_CACHE": str(tmp_path / "hub"), "HOME": str(tmp_path)})
    assert (found.kind, found.path, found.found_in) == ("hf_folder", snap, "Hugging Face cache")

    sdxl = _copy_folder(hf_dir, tmp_path / "hfhome" / "hub" / "models--stabilityai--stable-diffusion-xl-base-1.0"
                        / "snapshots" / "def" / "tokenizer_2")
    assert find_vocab(env={"HF_HOME": str(tmp_path / "hfhome"), "HOME": str(tmp_path)}).path == sdxl

    forge = _copy_folder(hf_dir, tmp_path / "forge" / "backend/huggingface/runwayml/stable-diffusion-v1-5/tokenizer")
    assert find_vocab(env={"HOME": str(tmp_path)}, webui_root=tmp_path / "forge").path == forge
    reforge = _copy_folder(hf_dir, tmp_path / "reforge" / "ldm_patched/modules/sd1_tokenizer")
    assert find_vocab(env={"HOME": str(tmp_path)}, webui_root=tmp_path / "reforge").path == reforge


def test_find_vocab_installed_open_clip(tmp_path, gz_path):
    found = find_vocab(env={"HOME": str(tmp_path)})
    assert found == VocabSource("merges_gz", gz_path, "package open_clip")


def test_broken_vocab_files(tmp_path, gz_path, hf_dir):
    short = tmp_path / "short.txt.gz"
    lines = gzip.decompress(gz_path.read_bytes()).decode("utf-8").split("\n")
    short.write_bytes(gzip.compress("\n".join(lines[:1000]).encode("utf-8")))
    with pytest.raises(ModelFileError, match="merges"):
        ClipTokenizer(short)
    bad = _copy_folder(hf_dir, tmp_path / "bad")
    vocab = json.loads((bad / "vocab.json").read_text(encoding="utf-8"))
    del vocab["<|endoftext|>"]
    (bad / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    with pytest.raises(ModelFileError, match="vocabulary"):
        ClipTokenizer(bad)
    (tmp_path / "junk.gz").write_bytes(b"not gzip")
    with pytest.raises(ModelFileError, match="gzip"):
        ClipTokenizer(tmp_path / "junk.gz")
