"""X/Y/Z plot axes for the settings that have an axis label (FieldSpec.xyz), delta scale first.

A1111's `scripts/xyz_grid.py` is loaded as a script module named "xyz_grid.py"; it is found in
`modules.scripts.scripts_data` as real extensions do, and axes are appended to its module-level
`axis_options`. Its `Script.ui` copies that list when the UI is built, so `register_axes` must run
before (extension import time or `on_before_ui`); it is idempotent (labels already present are
skipped).

Each grid cell is `copy(p)`, a shallow copy: a dict stored on `p` would be shared by every cell.
`apply` therefore never mutates: it stores a NEW dict in `p.delta_sampling_overrides` holding the
earlier axes' values of this cell plus its own. `confirm` checks every value before the grid
starts, with an error naming the axis and the value.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ..engine.settings import XYZ_FIELDS, FieldSpec
from ..errors import SettingError
from .args import NONE_CHOICE, NONE_CHOICE_FIELDS, OVERRIDES_ATTR, setting_value
from .files import checkpoint_choice

log = logging.getLogger("delta-sampling")

XYZ_MODULE_NAMES = ("xyz_grid.py", "scripts.xyz_grid")
SOURCE = "X/Y/Z axis"
# Grid loop order: a higher cost is an outer loop, so the source models change least often.
COSTS = {"checkpoint": 0.6, "text": 0.3}
TXT2IMG_ONLY = ("hires",)


def find_xyz_module() -> Any | None:
    """A1111's xyz_grid module, if the WebUI loaded it."""
    from modules import scripts

    for data in getattr(scripts, "scripts_data", []):
        if data.script_class.__module__ in XYZ_MODULE_NAMES:
            return data.module
    return None


def store_override(p: Any, name: str, value: Any) -> None:
    """Record one axis value on this cell's `p`, in a fresh dict (cells share `p`'s dicts)."""
    setattr(p, OVERRIDES_ATTR, {**(getattr(p, OVERRIDES_ATTR, None) or {}), name: value})


def parse_axis_value(spec: FieldSpec, x: Any) -> Any:
    """An axis entry as the setting's value: numbers as the grid cast them, words parsed."""
    if spec.kind in ("float", "int"):
        return spec.check(x, SOURCE)
    value = setting_value(spec, str(x).strip() if spec.kind == "checkpoint" else str(x))
    return spec.parse(value, SOURCE)


def axis_subject(spec: FieldSpec) -> str:
    return f'Delta Sampling X/Y/Z axis "{spec.xyz}"'


def _checkpoint_title(spec: FieldSpec, value: str) -> str:
    """The host's title for a checkpoint axis value ("" stays ""); a clear error if it is not listed."""
    if value == "":
        return ""
    from modules import sd_models

    info = sd_models.get_closet_checkpoint_match(value)
    if info is None:
        raise SettingError(axis_subject(spec), f"{value!r} is not in the WebUI's checkpoint list",
                           "Use a name from the axis' value list (refresh the checkpoint list after adding files)")
    return checkpoint_choice(info)


def axis_value(spec: FieldSpec, x: Any) -> Any:
    """The checked value an axis entry stands for; SettingError naming the axis and the value."""
    try:
        value = parse_axis_value(spec, x)
    except SettingError as exc:
        raise SettingError(axis_subject(spec), exc.problem, exc.fix) from None
    return _checkpoint_title(spec, value) if spec.kind == "checkpoint" else value


def make_apply(spec: FieldSpec) -> Callable[[Any, Any, list], None]:
    def apply(p: Any, x: Any, xs: list) -> None:
        store_override(p, spec.name, axis_value(spec, x))
    return apply


def make_confirm(spec: FieldSpec) -> Callable[[Any, list], None]:
    def confirm(p: Any, xs: list) -> None:
        for x in xs:
            axis_value(spec, x)       # raises SettingError naming the axis and the value
    return confirm


def _checkpoint_choices(spec: FieldSpec) -> Callable[[], list[str]]:
    def choices() -> list[str]:
        from modules import sd_models
        titles = sorted(sd_models.checkpoint_tiles(), key=str.casefold)  # as the host's own dropdowns
        return [NONE_CHOICE, *titles] if spec.name in NONE_CHOICE_FIELDS else titles
    return choices


def _choices(spec: FieldSpec) -> Callable[[], list[str]] | None:
    if spec.kind == "checkpoint":
        return _checkpoint_choices(spec)
    if spec.kind == "bool":
        return lambda: ["True", "False"]
    if spec.kind == "choice":
        return lambda: list(spec.choices)
    if spec.kind == "preprocessor":
        from .preprocessors import preprocessor_choices
        return preprocessor_choices
    return None


def build_axes(xyz: Any) -> list:
    """One AxisOption per field with an axis label, in XYZ_FIELDS order (delta scale first)."""
    axes = []
    for spec in XYZ_FIELDS:
        # `bool` would not work as an axis type (bool("False") is True): booleans are words.
        kind = {"float": float, "int": int}.get(spec.kind, str)
        cls = xyz.AxisOptionTxt2Img if spec.name in TXT2IMG_ONLY else xyz.AxisOption
        axes.append(cls(spec.xyz, kind, make_apply(spec), confirm=make_confirm(spec),
                        cost=COSTS.get(spec.kind, 0.0), choices=_choices(spec)))
    return axes


def register_axes() -> bool:
    """Add the Delta Sampling axes to A1111's X/Y/Z plot once; False if the plot script is absent."""
    xyz = find_xyz_module()
    if xyz is None:
        log.debug("X/Y/Z plot script not loaded; no Delta Sampling axes")
        return False
    present = {getattr(opt, "label", None) for opt in xyz.axis_options}
    xyz.axis_options.extend(axis for axis in build_axes(xyz) if axis.label not in present)
    return True
