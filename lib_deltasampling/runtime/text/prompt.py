"""A1111 prompt syntax, as AUTOMATIC1111 stable-diffusion-webui 1.10 reads it.

- `parse_prompt_attention`: emphasis `(x)` x1.1, `[x]` /1.1, `(x:1.3)`, escapes, BREAK
  (modules/prompt_parser.py).
- `tokenize_prompt`: 75-token chunks with BOS/EOS, BREAK, the comma word-wrap rule,
  textual-inversion slots, padding (modules/sd_hijack_clip.py `tokenize_line` and
  `process_tokens`, modules/textual_inversion/textual_inversion.py).
- `extract_extra_networks`: removes `<lora:name:1>`-style tags (modules/extra_networks.py).
- `prompt_schedules`: prompt editing `[a:b:N]` and alternation `[a|b]` per step
  (modules/prompt_parser.py `get_learned_conditioning_prompt_schedules`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Union

import torch

from ...errors import UserError
from .tokenizer import ClipTokenizer

CHUNK_TOKENS = 75              # prompt tokens per chunk; +BOS +EOS = 77 rows
ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1    # A1111 multiplies by this (not divides by 1.1): same floats

# ---------------------------------------------------------------------------------------
# Emphasis

# One token of emphasis syntax per match, tried in this order.
_ATTENTION_TOKEN = re.compile(r"""
      \\[()\[\]\\]                  # escaped bracket or backslash: the character itself
    | \\                            # any other backslash: dropped
    | [(\[]                         # open
    | :\s*([+-]?[.\d]+)\s*\)        # ":1.3)" closes a round bracket with that weight
    | [)\]]                         # close
    | [^\\()\[\]:]+                 # text
    | :                             # a colon that closes nothing is text
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
BREAK_WEIGHT = -1.0  # marker weight of a BREAK piece (only a bare BREAK outside brackets keeps it)


MAX_BRACKET_DEPTH = 100  # nesting of ( and [ a prompt may have (the schedule parser recurses per level)
# Bounds on work and memory no real prompt meets (a long one is 5-8 chunks): characters before any
# parsing, and 75-token chunks (each is a text-encoder pass and 77 rows of cross-attention context).
MAX_PROMPT_CHARS = 40_000
MAX_PROMPT_CHUNKS = 32


def _weight_value(text: str, prompt: str) -> float:
    try:
        weight = float(text)
    except ValueError:
        raise UserError("prompt", f"emphasis weight '{text}' in '{prompt[:80]}' is not a number",
                        r"Write it like (word:1.2), or escape literal brackets as \( \)") from None
    if not math.isfinite(weight):
        raise UserError("prompt", f"emphasis weight '{text[:20]}' in '{prompt[:80]}' is not a finite number",
                        "Write it like (word:1.2)")
    return weight


def bracket_depth(prompt: str) -> int:
    """The deepest nesting of unescaped ( and [ in `prompt`."""
    depth = deepest = 0
    escaped = False
    for c in prompt:
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif c in "([":
            depth += 1
            deepest = max(deepest, depth)
        elif c in ")]" and depth:
            depth -= 1
    return deepest


def check_prompt(prompt: str) -> None:
    """Unicode text, length and bracket nesting within bounds, before any parser runs; a named
    error otherwise."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError("prompt", "holds characters that are not valid Unicode text (e.g. bytes from a terminal "
                        "in another encoding)", "Retype the prompt") from None
    if len(prompt) > MAX_PROMPT_CHARS:
        raise UserError("prompt", f"'{prompt[:40]}...' is {len(prompt):,} characters long; the limit is "
                        f"{MAX_PROMPT_CHARS:,}", "Shorten the prompt")
    depth = bracket_depth(prompt)
    if depth > MAX_BRACKET_DEPTH:
        raise UserError("prompt", f"brackets nest {depth} levels deep in '{prompt[:40]}...'; the limit is "
                        f"{MAX_BRACKET_DEPTH}", "Remove the extra brackets, or escape literal ones as \\( \\[")


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split `text` into (piece, weight) runs. Brackets multiply the weight of every
    piece inside them when they close (unclosed ones at the end); a BREAK outside any
    bracket becomes the piece ("BREAK", -1.0). Adjacent pieces of equal weight merge."""
    pieces: list[list] = []           # [text, weight], mutated as brackets close
    round_open: list[int] = []        # index of the first piece inside each open "("
    square_open: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for m in _ATTENTION_TOKEN.finditer(text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(pieces))
        elif token == "[":
            square_open.append(len(pieces))
        elif weight is not None and round_open:
            scale_from(round_open.pop(), _weight_value(weight, text))
        elif token == ")" and round_open:
            scale_from(round_open.pop(), ROUND_MULTIPLIER)
        elif token == "]" and square_open:
            scale_from(square_open.pop(), SQUARE_MULTIPLIER)
        else:  # text, or a bracket / ":w)" with nothing to close
            for k, part in enumerate(_BREAK.split(token)):
                if k:
                    pieces.append(["BREAK", BREAK_WEIGHT])
                pieces.append([part, 1.0])

    # Brackets never closed apply to everything after them.
    for start in round_open:
        scale_from(start, ROUND_MULTIPLIER)
    for start in square_open:
        scale_from(start, SQUARE_MULTIPLIER)

    for piece in pieces:
        if not math.isfinite(piece[1]):
            raise UserError("prompt", f"the emphasis of '{piece[0][:40]}' in '{text[:80]}' multiplies to {piece[1]}",
                            "Use fewer nested brackets or smaller weights")
    if not pieces:
        pieces = [["", 1.0]]
    merged = [pieces[0]]
    for piece in pieces[1:]:
        if piece[1] == merged[-1][1]:  # exact float equality, as A1111
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(t, w) for t, w in merged]


# ---------------------------------------------------------------------------------------
# Token chunks


@dataclass
class TokenizedPrompt:
    """A prompt as A1111 feeds it to a CLIP text encoder, one row per 77-token chunk.

    ids: [n_chunks, 77] BOS, 75 token slots, EOS; after the first EOS every id is pad_id.
    Textual-inversion slots hold id 0 (their vectors replace the token embeddings).
    weights: [n_chunks, 77] emphasis multipliers (1.0 at BOS/EOS/padding).
    fixes: per chunk, (row index in the 77 ids, embedding name): the embedding's vectors
    go at rows index .. index + n_vectors - 1 (cut at row 76), as A1111's EmbeddingsWithFixes.
    """

    ids: torch.Tensor
    weights: torch.Tensor
    fixes: list[list[tuple[int, str]]]


@dataclass
class _Chunk:
    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    fixes: list[tuple[int, str]] = field(default_factory=list)


# first token id -> [(name token ids, name, n_vectors)], longest name first
_EmbeddingLookup = dict[int, list[tuple[tuple[int, ...], str, int]]]


def _embedding_lookup(embeddings: Mapping[str, int], tokenizer: ClipTokenizer) -> _EmbeddingLookup:
    lookup: _EmbeddingLookup = {}
    for name, n_vectors in embeddings.items():
        if not (isinstance(n_vectors, int) and 1 <= n_vectors <= CHUNK_TOKENS):
            raise UserError(f"embedding '{name}'", f"has {n_vectors} vectors; a prompt chunk holds 1 to {CHUNK_TOKENS}",
                            "Use an embedding with at most 75 vectors per token")
        ids = tuple(tokenizer.encode(name))
        if ids:  # A1111 cannot register a name that has no tokens
            lookup.setdefault(ids[0], []).append((ids, name, n_vectors))
    for candidates in lookup.values():
        candidates.sort(key=lambda c: len(c[0]), reverse=True)  # stable: ties keep mapping order
    return lookup


def _embedding_at(lookup: _EmbeddingLookup, tokens: list[int], pos: int) -> tuple[str, int, int] | None:
    """(name, n_vectors, n_name_tokens) of the longest embedding name starting at `pos`."""
    for ids, name, n_vectors in lookup.get(tokens[pos], ()):
        if tuple(tokens[pos:pos + len(ids)]) == ids:
            return name, n_vectors, len(ids)
    return None


def tokenize_prompt(text: str, tokenizer: ClipTokenizer, *, pad_id: int,
                    embeddings: Mapping[str, int] = {}, comma_padding_backtrack: int = 20) -> TokenizedPrompt:
    """A1111's `tokenize_line` + the padding of `process_tokens`.

    `pad_id`: id written after the first EOS of every row (A1111: EOS for CLIP-L, 0 for
    OpenCLIP). `embeddings`: textual-inversion name (as typed) -> number of vectors.
    `comma_padding_backtrack`: A1111's "Prompt word wrap length limit" (0 disables).
    """
    check_prompt(text)
    eos = tokenizer.eos_id
    lookup = _embedding_lookup(embeddings, tokenizer)
    chunks: list[_Chunk] = []
    chunk = _Chunk()
    last_comma = -1  # index in chunk.tokens of the last comma, -1 if none in this chunk

    def close_chunk() -> None:
        nonlocal chunk, last_comma
        if len(chunks) == MAX_PROMPT_CHUNKS:
            raise UserError("prompt", f"'{text[:40]}...' needs more than {MAX_PROMPT_CHUNKS} chunks of "
                            f"{CHUNK_TOKENS} tokens; the limit is {MAX_PROMPT_CHUNKS * CHUNK_TOKENS:,} tokens",
                            "Shorten the prompt or use fewer BREAKs")
        fill = CHUNK_TOKENS - len(chunk.tokens)
        chunk.tokens += [eos] * fill
        chunk.weights += [1.0] * fill
        chunks.append(chunk)
        chunk = _Chunk()
        last_comma = -1

    for piece, weight in parse_prompt_attention(text):
        if piece == "BREAK" and weight == BREAK_WEIGHT:
            close_chunk()
            continue
        tokens = tokenizer.encode(piece)
        pos = 0
        while pos < len(tokens):
            token = tokens[pos]
            if token == tokenizer.comma_id:
                last_comma = len(chunk.tokens)
            elif (comma_padding_backtrack != 0 and len(chunk.tokens) == CHUNK_TOKENS and last_comma != -1
                  and len(chunk.tokens) - last_comma <= comma_padding_backtrack):
                # Full chunk, a comma close to its end: the words after that comma move
                # to the next chunk. (As A1111, embedding fixes among them stay behind.)
                cut = last_comma + 1
                moved_tokens, moved_weights = chunk.tokens[cut:], chunk.weights[cut:]
                del chunk.tokens[cut:], chunk.weights[cut:]
                close_chunk()
                chunk.tokens, chunk.weights = moved_tokens, moved_weights

            if len(chunk.tokens) == CHUNK_TOKENS:
                close_chunk()

            found = _embedding_at(lookup, tokens, pos)
            if found is None:
                chunk.tokens.append(token)
                chunk.weights.append(weight)
                pos += 1
                continue
            name, n_vectors, n_name_tokens = found
            if len(chunk.tokens) + n_vectors > CHUNK_TOKENS:  # an embedding is never split
                close_chunk()
            chunk.fixes.append((len(chunk.tokens) + 1, name))  # +1: row 0 is BOS
            chunk.tokens += [0] * n_vectors
            chunk.weights += [weight] * n_vectors
            pos += n_name_tokens

    if chunk.tokens or not chunks:
        close_chunk()

    rows = [[tokenizer.bos_id, *c.tokens, eos] for c in chunks]
    for row in rows:  # process_tokens: everything after the first EOS becomes padding
        first_eos = row.index(eos)
        row[first_eos + 1:] = [pad_id] * (len(row) - first_eos - 1)
    return TokenizedPrompt(
        ids=torch.tensor(rows, dtype=torch.long),
        weights=torch.tensor([[1.0, *c.weights, 1.0] for c in chunks], dtype=torch.float32),
        fixes=[c.fixes for c in chunks],
    )


# ---------------------------------------------------------------------------------------
# Extra networks

_EXTRA_NETWORK_TAG = re.compile(r"<(\w+):([^>]+)>")


@dataclass(frozen=True)
class ExtraNetworkTag:
    """One `<network:arg1:arg2:key=value>` tag. `items`: every ':'-separated argument as
    typed; an item with exactly one '=' is named (`te=0.5`), the rest positional."""

    network: str
    items: tuple[str, ...]
    positional: tuple[str, ...]
    named: Mapping[str, str]

    @classmethod
    def from_items(cls, network: str, items: list[str]) -> "ExtraNetworkTag":
        positional: list[str] = []
        named: dict[str, str] = {}
        for item in items:
            parts = item.split("=", 2)  # "a=b=c" has three parts: positional, as A1111
            if len(parts) == 2:
                named[parts[0]] = parts[1]
            else:
                positional.append(item)
        return cls(network, tuple(items), tuple(positional), named)


def extract_extra_networks(text: str) -> tuple[str, list[ExtraNetworkTag]]:
    """Remove every `<name:args>` tag (A1111's regex `<(\\w+):([^>]+)>`), in prompt order."""
    tags: list[ExtraNetworkTag] = []

    def take(m: re.Match) -> str:
        tags.append(ExtraNetworkTag.from_items(m.group(1), m.group(2).split(":")))
        return ""

    return _EXTRA_NETWORK_TAG.sub(take, text), tags


# ---------------------------------------------------------------------------------------
# Prompt editing and alternation
#
# A1111 parses with a lark grammar:
#   start: (prompt | /[][():]/+)*
#   prompt: (emphasized | scheduled | alternate | plain | WHITESPACE)*
#   emphasized: "(" prompt ")" | "(" prompt ":" prompt ")" | "[" prompt "]"
#   scheduled: "[" [prompt ":"] prompt ":" [WHITESPACE] NUMBER [WHITESPACE] "]"
#   alternate: "[" prompt ("|" [prompt])+ "]"
#   plain: /([^\\\[\]():|]|\\.)+/
# Inside a prompt every bracket must form one of these, so a bracket's extent and kind
# are determined; only at the top level may a bracket that forms none be literal text.
# Emphasis keeps its brackets in the output, so it is kept as text here.


@dataclass
class _Scheduled:
    before: list | None   # None: "[to:N]" form (nothing before)
    after: list
    number: str
    when: int = 0


@dataclass
class _Alternate:
    options: list[list]


_Node = Union[str, _Scheduled, _Alternate]
_NUMBER_TAIL = re.compile(r"\s*([+-]?(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)(?:[eE][+-]?[0-9]+)?)\s*\]")
_PLAIN_STOP = set("\\[]():|")


class _Unparsable(Exception):
    pass


def _parse_prompt(s: str, i: int) -> tuple[list[_Node], int]:
    """Longest `prompt` from i; stops at ':', '|', ']', ')' or the end."""
    nodes: list[_Node] = []
    while i < len(s):
        c = s[i]
        if c == "\\":
            if i + 1 >= len(s) or s[i + 1] == "\n":
                raise _Unparsable  # plain's `\\.` needs a following character
            nodes.append(s[i:i + 2])
            i += 2
        elif c == "(":
            sub, i = _parse_round(s, i)
            nodes += sub
        elif c == "[":
            sub, i = _parse_square(s, i)
            nodes += sub
        elif c in _PLAIN_STOP:
            break
        else:
            nodes.append(c)
            i += 1
    return nodes, i


def _expect(s: str, i: int, chars: str) -> str:
    if i >= len(s) or s[i] not in chars:
        raise _Unparsable
    return s[i]


def _parse_round(s: str, i: int) -> tuple[list[_Node], int]:
    inner, i = _parse_prompt(s, i + 1)
    if _expect(s, i, "):") == ")":
        return ["(", *inner, ")"], i + 1
    second, i = _parse_prompt(s, i + 1)
    _expect(s, i, ")")
    return ["(", *inner, ":", *second, ")"], i + 1


def _number_tail(s: str, i: int) -> tuple[str, int] | None:
    m = _NUMBER_TAIL.match(s, i)
    return (m.group(1), m.end()) if m else None


def _parse_square(s: str, i: int) -> tuple[list[_Node], int]:
    first, i = _parse_prompt(s, i + 1)
    sep = _expect(s, i, "]|:")
    if sep == "]":
        return ["[", *first, "]"], i + 1
    if sep == "|":
        options = [first]
        while s[i] == "|":
            option, i = _parse_prompt(s, i + 1)
            options.append(option)
            _expect(s, i, "|]")
        return [_Alternate(options)], i + 1
    tail = _number_tail(s, i + 1)
    if tail is not None:                      # [to:N]
        return [_Scheduled(None, first, tail[0])], tail[1]
    second, i = _parse_prompt(s, i + 1)       # [from:to:N]
    _expect(s, i, ":")
    tail = _number_tail(s, i + 1)
    if tail is None:
        raise _Unparsable
    return [_Scheduled(first, second, tail[0])], tail[1]


def _parse_schedule_syntax(prompt: str) -> list[_Node]:
    nodes: list[_Node] = []
    i = 0
    while i < len(prompt):
        c = prompt[i]
        if c in "([":
            try:
                sub, i = (_parse_round if c == "(" else _parse_square)(prompt, i)
                nodes += sub
                continue
            except _Unparsable:
                pass  # top level: a bracket that forms nothing is text
            nodes.append(c)
            i += 1
        elif c in "]):":
            nodes.append(c)
            i += 1
        elif c == "|":
            raise _Unparsable  # '|' outside [a|b]
        elif c == "\\":
            if i + 1 >= len(prompt) or prompt[i + 1] == "\n":
                raise _Unparsable  # plain's `\\.` needs a following character
            nodes.append(prompt[i:i + 2])
            i += 2
        else:
            nodes.append(c)
            i += 1
    return nodes


def _walk(nodes: list[_Node]):
    for node in nodes:
        if isinstance(node, _Scheduled):
            yield node
            yield from _walk(node.before or [])
            yield from _walk(node.after)
        elif isinstance(node, _Alternate):
            yield node
            for option in node.options:
                yield from _walk(option)


def _render(nodes: list[_Node], step: int) -> str:
    out: list[str] = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, _Scheduled):
            chosen = (node.before or []) if step <= node.when else node.after
            out.append(_render(chosen, step))
        else:
            out.append(_render(node.options[(step - 1) % len(node.options)], step))
    return "".join(out)


def prompt_schedules(prompt: str, steps: int, *, hires_steps: int | None = None,
                     use_old_scheduling: bool = False) -> list[tuple[int, str]]:
    """[(last step, prompt text)] as A1111's `get_learned_conditioning_prompt_schedules`.

    `[a:b:N]`: a until step N, then b (N with a '.' is a fraction of the steps). For the
    hires pass A1111 passes hires_steps (then N counts from the first pass: 1.5 = half of
    the hires steps). use_old_scheduling: A1111's "Use old prompt editing timelines"
    (default False). A prompt the grammar rejects (e.g. a '|' outside [a|b]) is used as is.
    """
    check_prompt(prompt)  # before the recursive parser
    if hires_steps is None or use_old_scheduling:
        int_offset, frac_offset, total = 0, 0.0, steps
    else:
        int_offset, frac_offset, total = steps, 1.0, hires_steps
    try:
        nodes = _parse_schedule_syntax(prompt)
    except _Unparsable:
        return [(total, prompt)]

    boundaries = {total}
    for node in _walk(nodes):
        if isinstance(node, _Alternate):
            boundaries.update(range(1, total + 1))
            continue
        v = float(node.number)
        if not math.isfinite(v):  # A1111 raises OverflowError in int(); named here
            raise UserError("prompt", f"the step {node.number!r} of a [from:to:step] edit in '{prompt[:40]}' is not "
                            "a finite number", "Write the step as a step number or a fraction such as 0.5")
        if use_old_scheduling:
            v = v * total if v < 1 else v
        elif "." in node.number:
            v = (v - frac_offset) * total
        else:
            v = v - int_offset
        node.when = min(total, int(v))
        if node.when >= 1:
            boundaries.add(node.when)
    return [(t, _render(nodes, t)) for t in sorted(boundaries)]
