"""Script arguments -> `DeltaSettings`, and the X/Y/Z overrides carried on `p`.

A1111 passes an AlwaysVisible script its arguments positionally, in the order `ui()` returned the
controls, which is FIELDS order. Two forms arrive here:

- the positional list, as the UI sends it and as `alwayson_scripts: {"Delta Sampling": {"args":
  [true, "sd15.safetensors", ...]}}` gives it. The API pads a short list with the UI's default
  values (`Api.init_script_args` copies `min(len(args), n)` items over `init_default_script_args`),
  so direct callers get the same: missing trailing values are the defaults.
- one dict of named settings, `"args": [{"source_checkpoint": "sd15.safetensors", "scale": 1.5}]`
  (A1111 requires a list and indexes it, so the dict travels as its first element; the other
  positions then hold the UI defaults). Names absent from the dict take their defaults, except
  `enabled`, which is true: sending settings means "use them".

`None` anywhere means "the default". The adapted-checkpoint dropdown shows "None" for no
checkpoint (gradio 3.41 has no (label, value) choices); "None" is read as "" in every form.
Unknown names and invalid values raise `SettingError` naming the setting, the value and what is
allowed; `source` ("UI", "API", ...) says where they came from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..engine.settings import FIELD_BY_NAME, FIELDS, NAME_KINDS, DeltaSettings, FieldSpec
from ..errors import SettingError

# X/Y/Z axis values travel on the processing object; webui/xyz.py writes a NEW dict per cell.
OVERRIDES_ATTR = "delta_sampling_overrides"
NONE_CHOICE = "None"
NONE_CHOICE_FIELDS = ("adapted_checkpoint", "control_model", "ip_adapter", "ip_encoder")  # dropdowns whose empty value is shown as "None"


def ui_value(spec: FieldSpec, value: Any) -> Any:
    """The value a control holds for a setting value ("" -> "None" where the dropdown offers it)."""
    if spec.name in NONE_CHOICE_FIELDS and value == "":
        return NONE_CHOICE
    if spec.kind == "image" and value == "":
        return None                   # an empty upload box
    return value


def ui_defaults() -> list[Any]:
    """The controls' initial values in FIELDS order (what the API pads the args with)."""
    return [ui_value(spec, spec.default) for spec in FIELDS]


def setting_value(spec: FieldSpec, value: Any) -> Any:
    """A control's (or API) value in settings form: "None" -> "" for checkpoints; None stays None."""
    if spec.kind in NAME_KINDS and isinstance(value, str) and value.strip().lower() == "none":
        return ""
    return value


def _where(source: str) -> str:
    return f"Delta Sampling {source} arguments".replace("  ", " ")


def settings_from_script_args(args: Sequence[Any], *, source: str) -> DeltaSettings:
    """Settings from the script's positional args (FIELDS order) or from `[{name: value}]`."""
    args = list(args)
    if args and isinstance(args[0], Mapping):
        return _from_named(args[0], args[1:], source)
    if len(args) > len(FIELDS):
        raise SettingError(_where(source), f"{len(args)} values given, but there are only {len(FIELDS)} settings",
                           f"Pass them in this order: {', '.join(f.name for f in FIELDS)}; "
                           'or pass one dict of named settings: "args": [{"scale": 1.5}]')
    values = {spec.name: setting_value(spec, value) for spec, value in zip(FIELDS, args) if value is not None}
    return DeltaSettings.from_dict(values, source=source)


def _from_named(named: Mapping[Any, Any], rest: list[Any], source: str) -> DeltaSettings:
    # The API fills the positions after the dict with the UI defaults; anything else there was
    # sent by the caller and would be silently lost.
    for spec, value, default in zip(FIELDS[1:], rest, ui_defaults()[1:]):
        if value is not None and value != default:
            raise SettingError(_where(source), f"a dict of named settings is followed by more values "
                               f"({spec.name} = {value!r})",
                               'Send either one dict, "args": [{"scale": 1.5, ...}], or the positional list')
    values = {name: setting_value(FIELD_BY_NAME[name], value) if name in FIELD_BY_NAME else value
              for name, value in named.items() if value is not None}
    values.setdefault("enabled", True)
    return DeltaSettings.from_dict(values, source=source)


def overrides_from_p(p: Any) -> dict[str, Any]:
    """The X/Y/Z overrides of this cell: {setting name: checked value}; {} when there are none."""
    raw = getattr(p, OVERRIDES_ATTR, None)
    if not raw:
        return {}
    if not isinstance(raw, Mapping):
        raise SettingError("Delta Sampling X/Y/Z overrides", f"p.{OVERRIDES_ATTR} is a {type(raw).__name__}, "
                           "not a dict of settings", "Set it to {setting name: value} (webui/xyz.py does)")
    out = {}
    for name, value in raw.items():
        spec = FIELD_BY_NAME.get(name)
        if spec is None:
            raise SettingError("Delta Sampling X/Y/Z overrides", f"unknown setting {name!r}",
                               f"Known settings: {', '.join(FIELD_BY_NAME)}")
        out[name] = spec.check(setting_value(spec, value), "X/Y/Z")
    return out


def apply_overrides(settings: DeltaSettings, overrides: Mapping[str, Any]) -> DeltaSettings:
    """`settings` with the X/Y/Z overrides of a cell. Any override turns Delta Sampling on (a sweep
    works from a closed accordion), unless an axis sets "Delta enabled" itself."""
    if not overrides:
        return settings
    return DeltaSettings.from_dict({**settings.to_dict(), "enabled": True, **overrides}, source="X/Y/Z")
