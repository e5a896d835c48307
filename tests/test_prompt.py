"""A1111 prompt syntax. Every expectation is derived by hand from A1111 1.10.1's rules
(modules/prompt_parser.py, sd_hijack_clip.py tokenize_line/process_tokens,
textual_inversion.py find_embedding_at_position, extra_networks.py parse_prompt); the
prompt-editing table is A1111's own doctest table. Token ids of single words come from
the tokenizer (tested against transformers in test_tokenizer.py).
"""

from __future__ import annotations


import pytest

from lib_deltasampling.errors import UserError
from lib_deltasampling.runtime.text.prompt import (
    MAX_BRACKET_DEPTH,
    MAX_PROMPT_CHARS,
    MAX_PROMPT_CHUNKS,
    ExtraNetworkTag,
    bracket_depth,
    extract_extra_networks,
    parse_prompt_attention,
    prompt_schedules,
    tokenize_prompt,
)
from lib_deltasampling.runtime.text.tokenizer import ClipTokenizer

UP = 1.1          # (x)
DOWN = 1 / 1.1    # [x]  (A1111 multiplies by 1/1.1)


@pytest.fixture(scope="module")
def tok(tokenizer) -> ClipTokenizer:
    return tokenizer


# ---------------------------------------------------------------------------------------
# parse_prompt_attention: (text, [(piece, weight), ...]); weights are the products of the
# bracket multipliers in the order the brackets close (unclosed ones at the end).

ATTENTION_TABLE = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", UP), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", UP)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", UP)]),
    # A1111's doctest: the first "(" never closes, so it multiplies everything after it at the end
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.3 * UP * UP), (" ", UP), ("on", DOWN * UP), (" a ", UP), ("hill", 0.5 * UP),
      (", sun, ", UP), ("sky", UP * UP * UP * UP), (".", UP)]),
    ("[x]", [("x", DOWN)]),
    ("[[x]]", [("x", DOWN * DOWN)]),
    ("(x:1.3)", [("x", 1.3)]),
    ("(x:0)", [("x", 0.0)]),
    ("(x:-1)", [("x", -1.0)]),
    ("a ( x : 1.5 ) b", [("a ", 1.0), (" x ", 1.5), (" b", 1.0)]),
    ("(x:+.5)", [("x", 0.5)]),
    ("x:1.2)", [("x:1.2)", 1.0)]),                       # ":1.2)" with no "(" open is text
    ("(a:b)", [("a:b", UP)]),                             # a colon without a number is text
    ("a) b]", [("a) b]", 1.0)]),                          # closers with nothing open are text
    ("[a", [("a", DOWN)]),
    ("((a)", [("a", UP * UP)]),
    ("(a [b] c)", [("a ", UP), ("b", DOWN * UP), (" c", UP)]),
    ("[a (b", [("a ", DOWN), ("b", UP * DOWN)]),           # unclosed: round ones first, then square
    ("\\\\", [("\\", 1.0)]),                              # escaped backslash
    (r"C:\path", [("C:path", 1.0)]),                      # a lone backslash is dropped
    (r"\(x:1.2\)", [("(x:1.2)", 1.0)]),
    ("(a)(b:1.1)", [("ab", UP)]),                         # equal weights merge
    ("(a:1.1)[b]", [("a", 1.1), ("b", DOWN)]),
    ("((a:0.5):2)", [("a", 1.0)]),
    ("[a:0.5]", [("a:0.5", DOWN)]),                       # "[x:w]" is not a weight
    ("(a:1e2)", [("a:1e2", UP)]),                         # exponent is not a weight either
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("BREAK", [("", 1.0), ("BREAK", -1.0), ("", 1.0)]),
    ("a\nBREAK\nb", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("aBREAK b, a BREAKfast", [("aBREAK b, a BREAKfast", 1.0)]),  # only a whole word
    ("(a BREAK b)", [("a", UP), ("BREAK", -1.0 * UP), ("b", UP)]),
    ("(a BREAK b:0)", [("aBREAKb", 0.0)]),                # all weight 0: merged, BREAK included
    ("", [("", 1.0)]),
    ("()", [("", 1.0)]),
]


def test_attention_table_size():
    assert len(ATTENTION_TABLE) >= 30


@pytest.mark.parametrize("text,expected", ATTENTION_TABLE)
def test_parse_prompt_attention(text, expected):
    got = parse_prompt_attention(text)
    assert [p for p, _ in got] == [p for p, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12, abs=1e-15)


def test_bad_weight_is_a_user_error():
    with pytest.raises(UserError, match="1.2.3"):
        parse_prompt_attention("(a:1.2.3)")


# ---------------------------------------------------------------------------------------
# tokenize_prompt

BOS, EOS = 49406, 49407


def rows(tok, chunks, pad=EOS):
    """Expected ids/weights: each chunk is [(token, weight), ...] of at most 75 slots."""
    ids, weights = [], []
    for chunk in chunks:
        assert len(chunk) <= 75
        fill = 75 - len(chunk)
        ids.append([BOS] + [t for t, _ in chunk] + [EOS] + [pad] * fill)
        weights.append([1.0] + [w for _, w in chunk] + [1.0] * (fill + 1))
    return ids, weights


def run(tok, text, **kw):
    out = tokenize_prompt(text, tok, pad_id=kw.pop("pad_id", EOS), **kw)
    assert out.ids.shape == out.weights.shape == (len(out.fixes), 77)
    return out.ids.tolist(), out.weights.tolist(), out.fixes


def word(tok, text):
    ids = tok.encode(text)
    assert len(ids) == 1, text
    return ids[0]


def test_empty_prompt_is_one_chunk(tok):
    assert run(tok, "") == (*rows(tok, [[]]), [[]])
    ids, _, _ = run(tok, "", pad_id=0)
    assert ids == [[BOS, EOS] + [0] * 75]  # OpenCLIP: pad after the first EOS


def test_emphasis_weights_per_token(tok):
    cat, red, a = word(tok, "cat"), word(tok, "red"), word(tok, "a")
    assert run(tok, "a (red:1.5) cat") == (*rows(tok, [[(a, 1.0), (red, 1.5), (cat, 1.0)]]), [[]])
    assert run(tok, "(cat:0) a") == (*rows(tok, [[(cat, 0.0), (a, 1.0)]]), [[]])
    assert run(tok, "(cat:-1)") == (*rows(tok, [[(cat, -1.0)]]), [[]])
    ids, weights, _ = run(tok, "(cat a")  # unbalanced
    assert (ids, weights) == rows(tok, [[(cat, pytest.approx(UP)), (a, pytest.approx(UP))]])
    ids, _, _ = run(tok, r"\(cat\)")
    assert ids == rows(tok, [[(t, 1.0) for t in tok.encode("(cat)")]])[0]


def test_break(tok):
    a, b, brk = word(tok, "a"), word(tok, "b"), word(tok, "break")
    assert run(tok, "a BREAK b")[:2] == rows(tok, [[(a, 1.0)], [(b, 1.0)]])
    assert run(tok, "BREAK a")[:2] == rows(tok, [[], [(a, 1.0)]])     # leading BREAK: an empty chunk
    assert run(tok, "a BREAK")[:2] == rows(tok, [[(a, 1.0)]])         # trailing: nothing after it
    assert run(tok, "a BREAK BREAK b")[:2] == rows(tok, [[(a, 1.0)], [], [(b, 1.0)]])
    # inside brackets BREAK's weight is no longer -1: it is the word "break"
    ids, weights, _ = run(tok, "(a BREAK b)")
    assert ids == rows(tok, [[(a, 0), (brk, 0), (b, 0)]])[0]
    assert weights[0][1:4] == pytest.approx([UP, -UP, UP])


def test_chunks_of_75(tok):
    cat = word(tok, "cat")
    assert run(tok, "cat " * 75)[:2] == rows(tok, [[(cat, 1.0)] * 75])
    assert run(tok, "cat " * 76)[:2] == rows(tok, [[(cat, 1.0)] * 75, [(cat, 1.0)]])
    assert run(tok, "cat " * 160)[:2] == rows(tok, [[(cat, 1.0)] * 75] * 2 + [[(cat, 1.0)] * 10])
    ids, _, _ = run(tok, "cat " * 80, pad_id=0)
    assert ids == rows(tok, [[(cat, 1.0)] * 75, [(cat, 1.0)] * 5], pad=0)[0]


def test_comma_backtrack(tok):
    cat, dog, comma = word(tok, "cat"), word(tok, "dog"), tok.comma_id
    text = "cat " * 70 + ", " + "dog " * 10
    # The 76th token finds the chunk full with a comma 5 tokens from its end (<= 20):
    # the 4 dogs after the comma move to the next chunk.
    moved = rows(tok, [[(cat, 1.0)] * 70 + [(comma, 1.0)], [(dog, 1.0)] * 10])
    kept = rows(tok, [[(cat, 1.0)] * 70 + [(comma, 1.0)] + [(dog, 1.0)] * 4, [(dog, 1.0)] * 6])
    assert run(tok, text)[:2] == moved
    assert run(tok, text, comma_padding_backtrack=5)[:2] == moved
    assert run(tok, text, comma_padding_backtrack=4)[:2] == kept   # 5 > 4
    assert run(tok, text, comma_padding_backtrack=0)[:2] == kept   # 0 disables
    # comma in the last slot: nothing to move
    assert run(tok, "cat " * 74 + ", dog dog")[:2] == rows(
        tok, [[(cat, 1.0)] * 74 + [(comma, 1.0)], [(dog, 1.0)] * 2])
    # comma arriving on a full chunk starts the next chunk (and does not count there)
    assert run(tok, "cat " * 75 + ", dog")[:2] == rows(tok, [[(cat, 1.0)] * 75, [(comma, 1.0), (dog, 1.0)]])


def test_embeddings(tok):
    cat, a, b = word(tok, "cat"), word(tok, "a"), word(tok, "b")
    emb = {"myemb": 3}
    # slots hold id 0; the fix row counts BOS as row 0
    assert run(tok, "a myemb b", embeddings=emb) == (
        *rows(tok, [[(a, 1.0), (0, 1.0), (0, 1.0), (0, 1.0), (b, 1.0)]]), [[(2, "myemb")]])
    ids, weights, fixes = run(tok, "(myemb:1.2)", embeddings=emb)
    assert weights[0][1:4] == [pytest.approx(1.2)] * 3 and fixes == [[(1, "myemb")]]
    # longest name first: "my emb" (3 tokens) before "my" (1 token)
    assert run(tok, "my emb cat my cat", embeddings={"my": 1, "my emb": 2}) == (
        *rows(tok, [[(0, 1.0), (0, 1.0), (cat, 1.0), (0, 1.0), (cat, 1.0)]]), [[(1, "my emb"), (4, "my")]])
    # matching is by whole tokens: "cats" is another token than "cat"
    assert run(tok, "cat cats", embeddings={"cat": 1})[2] == [[(1, "cat")]]
    # an embedding is never split across chunks: 73 + 3 > 75 starts a new chunk
    ids, _, fixes = run(tok, "cat " * 73 + "myemb", embeddings=emb)
    assert ids == rows(tok, [[(cat, 1.0)] * 73, [(0, 1.0)] * 3])[0] and fixes == [[], [(1, "myemb")]]
    # 73 + 2 fits exactly
    ids, _, fixes = run(tok, "cat " * 73 + "myemb", embeddings={"myemb": 2})
    assert ids == rows(tok, [[(cat, 1.0)] * 73 + [(0, 1.0)] * 2])[0] and fixes == [[(74, "myemb")]]
    # a name without tokens cannot be registered (A1111 needs its first token id)
    assert run(tok, "cat", embeddings={"  ": 1})[2] == [[]]
    with pytest.raises(UserError, match="76 vectors"):
        tokenize_prompt("cat", tok, pad_id=EOS, embeddings={"big": 76})


def test_embedding_moved_by_comma_backtrack_keeps_its_fix_behind(tok):
    # A1111 1.10 moves the tokens after the comma but leaves their fixes in the old
    # chunk (at the old offsets); the new chunk gets the id-0 slots without a fix.
    cat, dog, comma = word(tok, "cat"), word(tok, "dog"), tok.comma_id
    ids, _, fixes = run(tok, "cat " * 70 + ", myemb dog dog dog", embeddings={"myemb": 2})
    assert ids == rows(tok, [[(cat, 1.0)] * 70 + [(comma, 1.0)], [(0, 1.0), (0, 1.0)] + [(dog, 1.0)] * 3])[0]
    assert fixes == [[(72, "myemb")], []]


def test_break_between_weighted_parts(tok):
    a, b = word(tok, "a"), word(tok, "b")
    ids, weights, _ = run(tok, "(a:1.2) BREAK (b:1.3)")
    assert (ids, weights) == rows(tok, [[(a, pytest.approx(1.2))], [(b, pytest.approx(1.3))]])


# ---------------------------------------------------------------------------------------
# extra networks

def tag(network, *items, positional=None, named=None):
    return ExtraNetworkTag(network, tuple(items), tuple(positional if positional is not None else items), named or {})


EXTRA_NETWORK_TABLE = [
    ("a <lora:foo:0.8> b", "a  b", [tag("lora", "foo", "0.8")]),
    ("<lora:foo:te=0.5:unet=1>", "", [tag("lora", "foo", "te=0.5", "unet=1", positional=["foo"],
                                          named={"te": "0.5", "unet": "1"})]),
    ("<lyco:bar:1:dyn=16>x", "x", [tag("lyco", "bar", "1", "dyn=16", positional=["bar", "1"], named={"dyn": "16"})]),
    ("<hypernet:h>", "", [tag("hypernet", "h")]),
    ("<lora:a=b=c>", "", [tag("lora", "a=b=c")]),               # two '=': positional
    ("<lora:x:te=1:te=2>", "", [tag("lora", "x", "te=1", "te=2", positional=["x"], named={"te": "2"})]),
    ("<lora:a:1><LORA:b>, c", ", c", [tag("lora", "a", "1"), tag("LORA", "b")]),
    ("<lora:>", "<lora:>", []),                                 # needs an argument
    ("<lora foo>", "<lora foo>", []),
    ("<my-net:x>", "<my-net:x>", []),                           # \w+ only
    ("<lora:<x:1>>", ">", [tag("lora", "<x", "1")]),
    ("<lora:my lora file:0.5>", "", [tag("lora", "my lora file", "0.5")]),
]


@pytest.mark.parametrize("text,rest,tags", EXTRA_NETWORK_TABLE)
def test_extract_extra_networks(text, rest, tags):
    assert extract_extra_networks(text) == (rest, tags)


# ---------------------------------------------------------------------------------------
# prompt editing / alternation: A1111's doctest table

SCHEDULE_TABLE = [
    ("test", 10, None, [(10, "test")]),
    ("a [b:3]", 10, None, [(3, "a "), (10, "a b")]),
    ("a [b: 3]", 10, None, [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", 10, None, [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", 10, None, [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", 10, None, [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", 10, None, [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", 10, None, [(10, "a [unbalanced")]),
    ("a [b:.5] c", 10, None, [(5, "a  c"), (10, "a b c")]),
    # A1111's doctest hopes for more, but 1.10.1 returns the prompt as is ('|' outside [a|b])
    ("a [{b|d{:.5] c", 10, None, [(10, "a [{b|d{:.5] c")]),
    ("((a][:b:c [d:3]", 10, None, [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", 10, None, [(s, "a" if s % 2 else "(b:1.1)") for s in range(1, 11)]),
    ("[fe|]male", 10, None, [(s, "female" if s % 2 else "male") for s in range(1, 11)]),
    ("[fe|||]male", 10, None, [(s, "female" if s % 4 == 1 else "male") for s in range(1, 11)]),
    ("a [b:.5] c", 10, 10, [(10, "a b c")]),
    ("a [b:1.5] c", 10, 10, [(5, "a  c"), (10, "a b c")]),
    # header example of prompt_parser.py
    ("fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75][ in foreground::0.6]"
     "[: in background:0.25] [shoddy:masterful:0.5]", 100, None,
     [(25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
      (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
      (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
      (75, "fantasy landscape with a lake and an oak in background masterful"),
      (100, "fantasy landscape with a lake and a christmas tree in background masterful")]),
]


@pytest.mark.parametrize("prompt,steps,hires,expected", SCHEDULE_TABLE)
def test_prompt_schedules(prompt, steps, hires, expected):
    assert prompt_schedules(prompt, steps, hires_steps=hires) == expected


def test_prompt_schedules_old_timelines():
    # old: N < 1 is a fraction, N >= 1 a step count (with or without a decimal point)
    assert prompt_schedules("a [b:c:0.3] [d:e:4.0]", 10, use_old_scheduling=True) == [
        (3, "a b d"), (4, "a c d"), (10, "a c e")]
    # new: a decimal point makes it a fraction, so 4.0 is 40 steps -> capped at 10
    assert prompt_schedules("a [b:c:0.3] [d:e:4.0]", 10) == [(3, "a b d"), (10, "a c d")]
    # hires pass, new timelines: integers count from the first pass (12 - 10 = 2)
    assert prompt_schedules("[b:c:12]", 10, hires_steps=20) == [(2, "b"), (20, "c")]


def test_prompt_schedules_unparsable_is_kept():
    assert prompt_schedules("a | b", 10) == [(10, "a | b")]
    assert prompt_schedules("trailing \\", 10) == [(10, "trailing \\")]


# ------------------------------------------------------------------ bounds: deep nesting, non-finite weights

def test_bracket_depth_counts_unescaped_brackets():
    assert bracket_depth("a (b [c] (d)) e") == 2
    assert bracket_depth(r"\(\(\( a") == 0 and bracket_depth("))) ((a") == 2


def test_deep_nesting_is_a_named_error_not_a_recursion_error():
    """10,000 nested brackets: the schedule parser recurses per level; past MAX_BRACKET_DEPTH the
    prompt is refused before parsing, with the depth and the limit in the message."""
    with pytest.raises(UserError, match=r"^prompt: brackets nest 10000 levels deep.*the limit is 100"):
        prompt_schedules("(" * 10000 + "a", 20)
    deep = "(" * MAX_BRACKET_DEPTH + "a" + ")" * MAX_BRACKET_DEPTH
    assert prompt_schedules(deep, 20) == [(20, deep)]   # the limit itself parses


def test_prompt_length_is_bounded_before_parsing(tok):
    with pytest.raises(UserError, match=r"^prompt: 'aaaa.*' is 40,001 characters long; the limit is 40,000"):
        prompt_schedules("a" * (MAX_PROMPT_CHARS + 1), 20)
    with pytest.raises(UserError, match="40,001 characters"):
        tokenize_prompt("a" * (MAX_PROMPT_CHARS + 1), tok, pad_id=tok.eos_id)


def test_prompt_chunks_are_bounded(tok):
    # BREAK closes a chunk: n BREAKs make n + 1 chunks (A1111 tokenize_line)
    ok = tokenize_prompt(" BREAK ".join(["a fox"] * MAX_PROMPT_CHUNKS), tok, pad_id=tok.eos_id)
    assert ok.ids.shape == (MAX_PROMPT_CHUNKS, 77)
    with pytest.raises(UserError, match=r"more than 32 chunks of 75 tokens; the limit is 2,400 tokens"):
        tokenize_prompt(" BREAK ".join(["a fox"] * (MAX_PROMPT_CHUNKS + 1)), tok, pad_id=tok.eos_id)
    with pytest.raises(UserError, match="more than 32 chunks"):
        tokenize_prompt("fox " * (75 * MAX_PROMPT_CHUNKS + 1), tok, pad_id=tok.eos_id)


@pytest.mark.parametrize("text, words", [
    ("(cat:" + "9" * 400 + ")", ["emphasis weight", "not a finite number"]),   # float() gives inf
    ("(" * 10000 + "a", ["multiplies to inf"]),                               # 1.1 ** 10000
])
def test_non_finite_emphasis_is_a_named_error(text, words):
    with pytest.raises(UserError) as caught:
        parse_prompt_attention(text)
    for word in words:
        assert word in str(caught.value)
    assert str(caught.value).startswith("prompt:") and len(str(caught.value)) < 300
