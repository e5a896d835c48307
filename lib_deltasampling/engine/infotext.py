"""Delta Sampling settings in A1111's infotext, and the infotext text itself.

The infotext (PNG `parameters` chunk, PNG Info tab, paste button) is, in A1111 1.10.1:

    prompt line(s)
    Negative prompt: negative line(s)          (absent when the negative prompt is empty)
    Key: value, Key: value, ...

`modules/processing.py:create_infotext` writes each `extra_generation_params` entry as `Key: value`
(only `Key` when the value equals the key; None skipped), passing the value through
`infotext_utils.quote`: json.dumps(ensure_ascii=False) when it holds a comma, a colon or a newline,
else as is. `infotext_utils.parse_generation_parameters` reads it back: the last line is the
parameter line only if `re_param` finds at least 3 entries in it; each value that starts and ends
with '"' goes through json.loads (kept as is if that fails); a value of the form `NxM` becomes two
entries `Key-1`, `Key-2`; an empty value is dropped.

So that the host's writer and parser give back exactly what we stored, `infotext_value` pre-quotes
the values the host would otherwise change (empty, surrounded by quotes or whitespace, equal to
their key, holding control characters). One A1111 loss remains: a text value that is exactly
`<digits>x<digits>` is split into Key-1/Key-2 (joined again here), and with a trailing newline
(`"12x34\\n"`) that newline is lost, since A1111's size pattern matches before it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from ..errors import SettingError
from .settings import FIELD_BY_INFOTEXT, FIELDS, NAME_KINDS, PART_OF, DeltaSettings, FieldSpec, field

# A1111 1.10.1 modules/infotext_utils.py
RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")
RE_KEY = re.compile(r"\w[\w \-/]+")

# Keys the caller may add through `extra` (checkpoint and adapter hashes); never a setting.
SOURCE_HASH = "Delta source hash"
ADAPTED_HASH = "Delta adapted hash"
ADAPTER_HASHES = "Delta adapter hashes"
CONTROL_HASH = "Delta control hash"      # the ControlNet file (the image's hash is a setting's key)
IP_HASH = "Delta IP-Adapter hash"         # the IP-Adapter file
EXTRA_KEYS = (SOURCE_HASH, ADAPTED_HASH, ADAPTER_HASHES, CONTROL_HASH, IP_HASH)
PREFIX = "Delta "


# ---------------------------------------------------------------- A1111's text conventions

def quote(value: Any) -> Any:
    """A1111 `quote`: JSON-quote a value holding ',', ':' or a newline; anything else as is."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return value
    return json.dumps(value, ensure_ascii=False)


def unquote(text: str) -> str:
    """A1111 `unquote`: json.loads a "..." value, the text itself when that fails."""
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:    # A1111 keeps the raw text on any failure
        return text


def format_parameters(prompt: str, negative: str, params: Mapping[str, object]) -> str:
    """The whole `parameters` text, byte for byte as A1111's `create_infotext` writes it for these
    prompts and (already per-image) parameter values."""
    entries = [k if k == v else f"{k}: {quote(v)}" for k, v in params.items() if v is not None]
    negative_text = f"\nNegative prompt: {negative}" if negative else ""
    return f"{prompt}{negative_text}\n{', '.join(entries)}".strip()


def parse_parameters(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, {key: value}) as A1111's `parse_generation_parameters` reads them,
    before it adds its own defaults, styles and back-compatibility entries."""
    *lines, last = text.strip().split("\n")
    if len(RE_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""

    prompt, negative, in_negative = "", "", False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[16:].strip()
        if in_negative:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line

    params: dict[str, str] = {}
    for key, value in RE_PARAM.findall(last):
        if not value:                   # A1111: value[0] raises, the entry is skipped
            continue
        if value[0] == '"' and value[-1] == '"':
            value = unquote(value)
        size = RE_IMAGESIZE.match(value)
        if size is not None:
            params[f"{key}-1"], params[f"{key}-2"] = size.group(1), size.group(2)
        else:
            params[key] = value
    return prompt, negative, params


def infotext_value(key: str, value: str) -> str:
    """`value` in the form that A1111's quote + parse give back unchanged (see the module doc)."""
    if "," in value or ":" in value or "\n" in value:
        return value                    # the host JSON-quotes it; that always reads back exactly
    risky = (value == "" or value == key or value != value.strip()
             or value[0] == '"' or any(ord(c) < 32 or ord(c) == 127 for c in value))
    return json.dumps(value, ensure_ascii=False) if risky else value


def format_hashes(hashes: Mapping[str, str]) -> str:
    """`name: hash, name: hash` as A1111's "Lora hashes" / "TI hashes" (':' and ',' dropped from names)."""
    return ", ".join(f"{name.replace(':', '').replace(',', '')}: {h}" for name, h in hashes.items())


def parse_hashes(text: str) -> dict[str, str]:
    """The inverse of `format_hashes` (A1111 lora_script.py reads "Lora hashes" the same way)."""
    pairs = [part.strip().split(":", 1) for part in text.split(",") if ":" in part]
    return {name.strip(): h.strip() for name, h in pairs}


# ---------------------------------------------------------------- Delta Sampling settings

def settings_to_infotext(s: DeltaSettings, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """{infotext key: value} for `p.extra_generation_params` (or `format_parameters`); empty when
    Delta Sampling is off. Every setting is written except empty texts (their default), so a paste
    restores the UI exactly whatever the current defaults are. `extra`: hashes and other facts
    (EXTRA_KEYS), written after the settings."""
    if not s.enabled:
        return {}
    out = {}
    for spec in FIELDS:
        value = getattr(s, spec.name)
        if spec.kind in ("text", *NAME_KINDS, "image") and value == "":
            continue
        if spec.name in PART_OF and not getattr(s, PART_OF[spec.name]):
            continue            # no ControlNet / IP-Adapter: their settings are not part of the image
        out[spec.infotext] = infotext_value(spec.infotext, spec.format(value))
    for key, value in (extra or {}).items():
        if not RE_KEY.fullmatch(key) or key in FIELD_BY_INFOTEXT:
            raise ValueError(f"infotext key {key!r} is not a free A1111 key (\\w[\\w -/]+, not a setting's)")
        if value is not None and value != "":
            out[key] = infotext_value(key, str(value))
    return out


def _raw_value(params: Mapping[str, Any], spec: FieldSpec) -> str | None:
    if spec.infotext in params:
        value = params[spec.infotext]
        return None if value is None else str(value)
    first, second = params.get(f"{spec.infotext}-1"), params.get(f"{spec.infotext}-2")
    if spec.kind in ("text", "preprocessor", *NAME_KINDS) and first is not None and second is not None:
        return f"{first}x{second}"      # A1111 split an `NxM` text into two entries
    return None


def _warning(key: str, raw: str, problem: str, fallback: str) -> str:
    return f'Delta Sampling infotext "{key}: {raw}": {problem}; using {fallback}'


def settings_from_infotext(params: Mapping[str, Any]) -> tuple[DeltaSettings, list[str]]:
    """Settings from parsed infotext entries (ours or A1111's `parse_generation_parameters`), and
    warnings instead of errors: a malformed value falls back to its default, named in a warning.
    No Delta Sampling key at all: the defaults (disabled), no warning."""
    warnings: list[str] = []
    values: dict[str, Any] = {}
    for spec in FIELDS:
        raw = _raw_value(params, spec)
        if raw is None or spec.kind == "image":   # an image is never in infotext, only its hash
            continue
        try:
            values[spec.name] = spec.parse(raw, "infotext")
        except SettingError as e:
            warnings.append(_warning(spec.infotext, raw, e.problem, f"the default {spec.format(spec.default)}"))
    if all(_raw_value(params, spec) is None for spec in FIELDS):
        return DeltaSettings(), warnings
    if _raw_value(params, field("enabled")) is None:
        values["enabled"] = True        # we write settings only when on; a malformed switch stays off

    start, end = field("start"), field("end")
    first, last = values.get("start", start.default), values.get("end", end.default)
    if not first < last:
        warnings.append(f'Delta Sampling infotext "{start.infotext}: {start.format(first)}, {end.infotext}: '
                        f'{end.format(last)}": start is not before end, so no step would get the delta; using the '
                        f"defaults {start.format(start.default)} and {end.format(end.default)}")
        values.pop("start", None)
        values.pop("end", None)

    known = set(FIELD_BY_INFOTEXT) | set(EXTRA_KEYS)
    for key in params:
        base = re.sub(r"-[12]$", "", key)
        if key.startswith(PREFIX) and key not in known and base not in known:
            warnings.append(f'Delta Sampling infotext "{key}": not a Delta Sampling key of this version; ignored')
    return DeltaSettings(**values), warnings
