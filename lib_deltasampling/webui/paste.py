"""Infotext -> the accordion's controls: PNG Info / paste button, "Send to" buttons, the API's `infotext`.

A1111 1.10.1 restores script controls from `Script.infotext_fields`, pairs of (component, target):
- UI paste (`infotext_utils.connect_paste.paste_func`): a callable target gets the parsed params
  dict and returns the value (None: control unchanged); a string target is looked up and
  converted by the control's value type, and a value that does not convert is dropped silently.
- API `infotext` field (`Api.apply_infotext`): the same callable, then `type(component.value)(v)`
  with no error handling, so a callable must return exactly typed values (bool, float, int, str).
- "Send to img2img" copies control -> control only for targets that are strings listed in
  `Script.paste_field_names` (`connect_paste_params_buttons`: `name in paste_field_names`).

So each target is an `InfotextKey`: a str (the infotext key, for "Send to" and the host's list of
infotext names) that is also the callable restoring its control. All callables of one paste read
the settings through one `engine.infotext.settings_from_infotext` call; malformed values are
logged as warnings (logger "delta-sampling") and fall back to their defaults, the rest is restored.
An infotext without any Delta Sampling key turns the accordion off and leaves the other controls.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any

from ..engine.infotext import ADAPTED_HASH, ADAPTER_HASHES, SOURCE_HASH, parse_hashes, settings_from_infotext
from ..engine.settings import FIELD_BY_NAME, FIELDS, DeltaSettings, FieldSpec
from .args import ui_value
from .files import checkpoint_choice

log = logging.getLogger("delta-sampling")

HASH_KEYS = {"source_checkpoint": SOURCE_HASH, "adapted_checkpoint": ADAPTED_HASH}


class InfotextKey(str):
    """An infotext key that is also the callable restoring its control (see the module doc)."""

    def __new__(cls, key: str, restore: Callable[[Mapping[str, Any]], Any]) -> "InfotextKey":
        obj = super().__new__(cls, key)
        obj.restore = restore
        return obj

    def __call__(self, params: Mapping[str, Any]) -> Any:
        return self.restore(params)


def _has_delta_keys(params: Mapping[str, Any]) -> bool:
    return any(f.infotext in params or f"{f.infotext}-1" in params for f in FIELDS)


def _snapshot(params: Mapping[str, Any]) -> tuple:
    return tuple(sorted((str(k), str(v)) for k, v in params.items() if str(k).startswith("Delta ")))


class PasteReader:
    """Reads the settings once per paste: every control's callable gets the same params dict."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: tuple[Any, tuple, DeltaSettings | None] | None = None

    def settings(self, params: Mapping[str, Any]) -> DeltaSettings | None:
        """The pasted settings; None when the infotext has no Delta Sampling key."""
        snapshot = _snapshot(params)
        with self._lock:
            last = self._last
            if last is not None and last[0] is params and last[1] == snapshot:
                return last[2]
            settings = read_settings(params)
            self._last = (params, snapshot, settings)  # holds `params`, so its id cannot be reused
            return settings


def read_settings(params: Mapping[str, Any]) -> DeltaSettings | None:
    """Settings from parsed infotext, warnings logged; never raises. None: no Delta Sampling key."""
    if not _has_delta_keys(params):
        return None
    try:
        settings, warnings = settings_from_infotext(params)
    except Exception as exc:  # noqa: BLE001 - a paste must never fail; the engine should not raise here
        log.warning("Delta Sampling infotext could not be read (%s); the controls are left unchanged", exc)
        return None
    for warning in warnings:
        log.warning(warning)
    return settings


def match_checkpoint(name: str, short_hash: str | None = None) -> str | None:
    """The host's dropdown entry for an infotext name (or, failing that, its hash); None if absent."""
    from modules import sd_models

    for query in (name, short_hash):
        info = sd_models.get_closet_checkpoint_match(query) if query else None
        if info is not None:
            return checkpoint_choice(info)
    return None


# The control image is not in infotext (its hash is): a paste leaves the image control as it is.
PASTED_FIELDS = tuple(spec for spec in FIELDS if spec.kind != "image")


def _restore(spec: FieldSpec, reader: PasteReader) -> Callable[[Mapping[str, Any]], Any]:
    if spec.name == "enabled":
        def restore_enabled(params: Mapping[str, Any]) -> bool:
            settings = reader.settings(params)
            return bool(settings is not None and settings.enabled)
        return restore_enabled

    def restore(params: Mapping[str, Any]) -> Any:
        settings = reader.settings(params)
        if settings is None:
            return None                 # no Delta Sampling in this infotext: leave the control
        value = getattr(settings, spec.name)
        if spec.kind == "checkpoint" and value:
            # The dropdown can only show the host's titles ("name.safetensors [hash]").
            return _checkpoint_title(spec, value, params)
        return ui_value(spec, value)
    return restore


def _checkpoint_title(spec: FieldSpec, value: str, params: Mapping[str, Any]) -> str | None:
    short_hash = params.get(HASH_KEYS.get(spec.name, ""))
    try:
        title = match_checkpoint(value, str(short_hash) if short_hash else None)
    except Exception as exc:  # noqa: BLE001 - host lookups must not break a paste
        log.warning('Delta Sampling infotext "%s: %s": the checkpoint list could not be searched (%s); '
                    "the control is left unchanged", spec.infotext, value, exc)
        return None
    if title is None:
        log.warning('Delta Sampling infotext "%s: %s": no such checkpoint in the WebUI\'s list; the control is '
                    "left unchanged (add the file and press the refresh button, then paste again)",
                    spec.infotext, value)
    return title


def infotext_fields(components: Mapping[str, Any]) -> list:
    """`Script.infotext_fields` for the accordion's controls ({setting name: component})."""
    try:
        from modules.infotext_utils import PasteField
    except ImportError:             # hosts before 1.8 take plain (component, target) pairs
        PasteField = None           # noqa: N806
    reader = PasteReader()
    fields = []
    for spec in PASTED_FIELDS:
        target = InfotextKey(spec.infotext, _restore(spec, reader))
        component = components[spec.name]
        fields.append(PasteField(component, target) if PasteField else (component, target))
    return fields


def paste_field_names() -> list[str]:
    """`Script.paste_field_names`: every control travels with "Send to txt2img/img2img"."""
    return [spec.infotext for spec in PASTED_FIELDS]


_TAG = re.compile(r"<(lora|lyco):([^:>]+)(?=[:>])")


def on_infotext_pasted(infotext: str, params: dict[str, Any]) -> None:
    """`script_callbacks.on_infotext_pasted`: as the Lora extension does for the prompt, point each
    `<lora:NAME` of the adapter text at the local file with the same hash (renamed files)."""
    key = FIELD_BY_NAME["adapters"].infotext
    text, hashes = params.get(key), params.get(ADAPTER_HASHES)
    if not isinstance(text, str) or not isinstance(hashes, str):
        return
    networks = sys.modules.get("networks")  # A1111's Lora extension, when loaded
    lookup = getattr(networks, "available_network_hash_lookup", None)
    if not lookup:
        return
    try:
        by_name = parse_hashes(hashes)

        def local_name(m: re.Match) -> str:
            entry = lookup.get(by_name.get(m.group(2), ""))
            return m.group(0) if entry is None else f"<{m.group(1)}:{entry.get_alias()}"

        params[key] = _TAG.sub(local_name, text)
    except Exception as exc:  # noqa: BLE001 - a paste must never fail
        log.warning("Delta Sampling: adapter names in the pasted infotext were kept as written (%s)", exc)
