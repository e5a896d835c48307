"""Mirrors the script description models of modules/api/models.py: `ScriptArg(label, value,
minimum, maximum, step, choices)` and `ScriptInfo(name, is_alwayson, is_img2img, args)`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ScriptArg:
    label: str | None = None
    value: Any = None
    minimum: Any = None
    maximum: Any = None
    step: Any = None
    choices: list[str] | None = None


@dataclass
class ScriptInfo:
    name: str | None = None
    is_alwayson: bool | None = None
    is_img2img: bool | None = None
    args: list[ScriptArg] = field(default_factory=list)
