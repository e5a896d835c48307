"""Every Delta Sampling setting, defined once.

`FIELDS` is the single definition that the UI (label, slider range, tooltip), the infotext (key),
the X/Y/Z plot (axis label), the HTTP API (snake_case key) and the command line all read.
`DeltaSettings` is the validated value object; a test keeps its fields and `FIELDS` in step.

    s = DeltaSettings.from_dict({"enabled": True, "source_checkpoint": "sd15.safetensors", "scale": 1.5})
    s.replace(end=0.8).to_dict()

FIELDS order is the UI's control order, hence the positional order of `alwayson_scripts` args.
Imports nothing heavy (the WebUI builds its UI from this module at start-up).
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from ..errors import SettingError
from ..runtime.names import path_problem
from ..runtime.preprocess import DEFAULT as PREPROCESSOR_DEFAULT, PREPROCESSORS, canonical
from .schedule import SHAPES

KINDS = ("bool", "float", "int", "choice", "text", "checkpoint", "controlnet", "ipadapter", "clipvision", "image",
         "preprocessor")
NAME_KINDS = ("checkpoint", "controlnet", "ipadapter", "clipvision")   # a model file named as the WebUI lists it
GUIDANCE_MODES = ("full", "cond")
RESOLUTIONS = ("target", "native")
CONTROL_MODES = ("balanced", "prompt", "control")   # runtime/control.py (sd-webui-controlnet's three modes)

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def _num(x: float) -> str:
    """A range bound as people write it: 10, 0.5, -10."""
    return f"{x:g}"


@dataclass(frozen=True)
class FieldSpec:
    """One setting: how it is named in each place, its default and what values it accepts."""

    name: str                     # API / dict key (snake_case)
    label: str                    # UI label
    infotext: str                 # A1111 infotext key, e.g. "Delta scale"
    default: Any
    kind: str                     # one of KINDS
    tooltip: str                  # one helpful sentence
    minimum: float | None = None  # valid range (float/int)
    maximum: float | None = None
    ui_minimum: float | None = None   # slider range; may be narrower than the valid range
    ui_maximum: float | None = None
    step: float | None = None
    choices: tuple[str, ...] = ()
    xyz: str | None = None        # X/Y/Z axis label, None: no axis

    def subject(self, source: str = "") -> str:
        where = f"Delta Sampling {source} setting" if source else "Delta Sampling setting"
        return f'{where} "{self.label}" ({self.name})'

    def allowed(self) -> str:
        """What values are accepted, as the fix part of an error message."""
        if self.kind in ("float", "int"):
            what = "a number" if self.kind == "float" else "a whole number"
            return f"Use {what} from {_num(self.minimum)} to {_num(self.maximum)}"
        if self.kind == "choice":
            return f"Use one of: {', '.join(self.choices)}"
        if self.kind == "bool":
            return "Use true or false"
        if self.kind == "checkpoint":
            return "Use the checkpoint's name as the WebUI lists it (empty for none)"
        if self.kind in ("controlnet", "ipadapter", "clipvision"):
            what = {"controlnet": "ControlNet", "ipadapter": "IP-Adapter", "clipvision": "CLIP vision encoder"}[self.kind]
            return f"Use the {what}'s name as the Delta Sampling list shows it (empty for none)"
        if self.kind == "image":
            return "Use an image: base64 PNG/JPEG/WebP data (a data: URL works), or empty for none"
        if self.kind == "preprocessor":
            return (f"Use {', '.join(PREPROCESSORS)}, or a preprocessor of the WebUI's ControlNet "
                    "(Forge's built-in one, sd-webui-controlnet) by its name")
        return "Use text (empty for the default)"

    def _error(self, value: Any, problem: str, source: str) -> SettingError:
        return SettingError(self.subject(source), f"{value!r} {problem}", self.allowed())

    def check(self, value: Any, source: str = "") -> Any:
        """The value in canonical form (float for floats, the listed spelling of a choice), or a
        SettingError naming the setting, the value and what is allowed."""
        kind = self.kind
        if kind == "bool":
            if not isinstance(value, bool):
                raise self._error(value, f"is a {type(value).__name__}, not true or false", source)
            return value
        if kind in ("float", "int"):
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise self._error(value, f"is a {type(value).__name__}, not a number", source)
            try:
                number = float(value)
            except OverflowError:                    # an int beyond float's range (10**400)
                raise self._error(f"{str(value)[:12]}...", "is not a finite number", source) from None
            if not math.isfinite(number):
                raise self._error(value, "is not a finite number", source)
            if kind == "int":
                if not number.is_integer():     # UI sliders may send 2.0 for 2; 2.5 is wrong
                    raise self._error(value, "is not a whole number", source)
                number = int(number)
            if not self.minimum <= number <= self.maximum:
                raise self._error(value, f"is outside {_num(self.minimum)} to {_num(self.maximum)}", source)
            return number
        if kind == "image":
            return ControlImage.of(value, self.subject(source))
        if not isinstance(value, str):
            raise self._error(value, f"is a {type(value).__name__}, not text", source)
        if kind == "choice":
            for choice in self.choices:         # case-insensitive; stored as listed
                if value.strip().lower() == choice:
                    return choice
            raise self._error(value, "is not one of the choices", source)
        _check_text(self, value, source)
        if kind == "preprocessor":     # the host's names are checked when a generation starts
            return canonical(value) if value.strip() else "none"     # a cleared dropdown: none
        return value

    def parse(self, text: str, source: str = "infotext") -> Any:
        """The typed, checked value of a text form (infotext value, X/Y/Z axis entry, CLI word)."""
        if self.kind == "bool":
            word = text.strip().lower()
            if word in _TRUE or word in _FALSE:
                return word in _TRUE
            raise self._error(text, "is not true or false", source)
        if self.kind in ("float", "int"):
            try:
                number = float(text.strip())
            except ValueError:
                raise self._error(text, "is not a number", source) from None
            return self.check(number, source)
        return self.check(text, source)

    def format(self, value: Any) -> str:
        """The text form: parse(format(v)) == v. Floats use repr, the shortest exact form."""
        if self.kind == "bool":
            return "True" if value else "False"
        if self.kind == "float":
            return repr(float(value))
        if self.kind == "image":
            return value.short_hash if value else ""
        return str(value)


def _check_text(spec: FieldSpec, value: str, source: str) -> None:
    """Text must be storable (UTF-8, no NUL); a checkpoint name is a name, not a path."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise SettingError(spec.subject(source), "contains characters that are not valid Unicode text "
                           "(e.g. bytes from a terminal in another encoding)", "Retype the text") from None
    if spec.kind in NAME_KINDS:
        problem = path_problem(value, subfolders=True)  # resolved only through the host's list, never as a path
        if problem:
            raise SettingError(spec.subject(source), f"{value!r} {problem}", spec.allowed())
    elif "\0" in value:
        raise SettingError(spec.subject(source), f"{value!r} contains the control character '\\x00'", "Remove it")


class ControlImage:
    """A control image as 8-bit RGB pixels [H, W, 3] (numpy), equal to another by content. Not
    written into infotext (as sd-webui-controlnet does); its hash is."""

    def __init__(self, pixels: Any, sha256: str) -> None:
        self.pixels = pixels
        self.sha256 = sha256
        self._hints: dict[tuple, Any] = {}   # (preprocessor, host, params) -> hint pixels

    @classmethod
    def of(cls, value: Any, what: str) -> "ControlImage | str":
        """"" for none (None, ""), else the image: a ControlImage, base64 text or a data: URL, an array
        (gradio's gr.Image), a PIL image, or gradio's {"image": ..., "mask": ...} editor value."""
        if value is None or (isinstance(value, str) and not value.strip()):
            return ""
        if isinstance(value, ControlImage):
            return value
        from ..runtime import images   # numpy (and Pillow when present): only when an image is given
        if isinstance(value, Mapping) and "image" in value:
            value = value["image"]
        pixels = images.decode_base64(value.strip(), what) if isinstance(value, str) else images.rgb_pixels(value, what)
        return cls(pixels, images.pixels_sha256(pixels))

    @property
    def short_hash(self) -> str:
        return self.sha256[:10]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ControlImage) and other.sha256 == self.sha256

    def __hash__(self) -> int:
        return hash(self.sha256)

    def __bool__(self) -> bool:
        return True

    def __repr__(self) -> str:
        return f"ControlImage({self.pixels.shape[1]}x{self.pixels.shape[0]}, sha256 {self.short_hash})"

    def tensor(self, preprocessor: str = "none", host: Any = None, **params: float):
        """[1, 3, H, W] float32 in 0..1 after `preprocessor` (runtime/preprocess.py; `host`: the
        host's preprocessors, `params`: resolution, threshold_a, threshold_b). The hint is kept per
        preprocessor and parameters, so a hires pass or the next batch does not run it again.
        torch is imported here, not by the settings module."""
        import numpy as np
        import torch

        from ..runtime.preprocess import preprocess
        key = (preprocessor, getattr(host, "source", None), tuple(sorted(params.items())))
        if key not in self._hints:
            self._hints.clear()        # one at a time: a changed setting makes a new image object anyway
            self._hints[key] = np.ascontiguousarray(preprocess(self.pixels, preprocessor, host=host, **params))
        return torch.from_numpy(self._hints[key]).permute(2, 0, 1)[None].float().div_(255.0)


FRACTION = dict(minimum=0.0, maximum=1.0, ui_minimum=0.0, ui_maximum=1.0, step=0.01)  # a fraction of the steps

FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec("enabled", "Enable Delta Sampling", "Delta sampling", False, "bool",
              "Add, at every step, the change your LoRA, embedding or fine-tune makes on its own base model.",
              xyz="Delta enabled"),
    FieldSpec("source_checkpoint", "Source base checkpoint", "Delta source", "", "checkpoint",
              "The base model your adaptation was made for (e.g. SD 1.5); it runs beside the main model.",
              xyz="Delta source checkpoint"),
    FieldSpec("adapted_checkpoint", "Adapted checkpoint (optional)", "Delta adapted", "", "checkpoint",
              "A fine-tune of the source base to transfer; leave empty to adapt the base with the adapter text.",
              xyz="Delta adapted checkpoint"),
    FieldSpec("adapters", "Adaptation: LoRAs, embeddings, trigger words", "Delta adapters", "", "text",
              "Added to the adapted source's prompt: <lora:name:weight> tags, embedding names and trigger words.",
              xyz="Delta adapters"),
    FieldSpec("source_prompt", "Source prompt (empty: the main prompt)", "Delta source prompt", "", "text",
              "What both source models are prompted with; empty uses the main prompt without its <lora:...> tags."),
    FieldSpec("source_negative", "Source negative prompt (empty: the main one)", "Delta source negative prompt",
              "", "text", "The source models' negative prompt; empty uses the main negative prompt without its tags."),
    FieldSpec("scale", "Delta scale", "Delta scale", 1.0, "float",
              "How much of the adaptation's effect is added: 1 as on the source, 0 none; 2 to 4.5 between "
              "SD 1.5 and SDXL.",
              minimum=-10.0, maximum=10.0, ui_minimum=0.0, ui_maximum=5.0, step=0.05, xyz="Delta scale"),
    FieldSpec("start", "Start (fraction of steps)", "Delta start", 0.0, "float",
              "The fraction of the sampling steps at which the delta starts being added.",
              **FRACTION, xyz="Delta start"),
    FieldSpec("end", "End (fraction of steps)", "Delta end", 1.0, "float",
              "The fraction of the sampling steps from which no delta is added; must be greater than start.",
              **FRACTION, xyz="Delta end"),
    FieldSpec("schedule", "Schedule", "Delta schedule", "constant", "choice",
              "The scale over the start-end window: constant, or falling to 0 linearly, along a cosine or along a sigmoid (S-curve).",
              choices=tuple(SHAPES), xyz="Delta schedule"),
    FieldSpec("source_cfg", "Source CFG scale (0: same as main)", "Delta source CFG", 0.0, "float",
              "The CFG scale of both source models; 0 uses the main CFG scale.",
              minimum=0.0, maximum=30.0, ui_minimum=0.0, ui_maximum=15.0, step=0.5, xyz="Delta source CFG"),
    FieldSpec("guidance", "Source guidance", "Delta guidance", "full", "choice",
              "full: four source evaluations per step, as in the paper; cond: two, positive prompt only "
              "(faster, an approximation).",
              choices=GUIDANCE_MODES, xyz="Delta guidance"),
    FieldSpec("reuse", "Reuse the delta for k steps", "Delta reuse", 1, "int",
              "Run the source models every k-th step of the window and reuse the last delta in between "
              "(about k times cheaper).",
              minimum=1, maximum=10, ui_minimum=1, ui_maximum=10, step=1, xyz="Delta reuse"),
    FieldSpec("hires", "Apply in the hires pass", "Delta hires", True, "bool",
              "Also add the delta in the hires-fix second pass.", xyz="Delta hires"),
    FieldSpec("resolution", "Source resolution", "Delta source resolution", "target", "choice",
              "target: the source runs at the image's size; native: at its own training size, the delta resized.",
              choices=RESOLUTIONS, xyz="Delta source resolution"),
    # ControlNet on the adapted source (issue 12); after the older fields so positional API args keep their places
    FieldSpec("control_model", "ControlNet on the source (optional)", "Delta control", "", "controlnet",
              "A ControlNet of the source's family, applied to the adapted source only: its effect reaches the "
              "main model through the delta."),
    FieldSpec("control_image", "Control image", "Delta control image hash", "", "image",
              "The ControlNet's input: a map (edges, depth, pose), or a picture for the preprocessor; cropped and "
              "resized to the source's size."),
    FieldSpec("control_weight", "Control weight", "Delta control weight", 1.0, "float",
              "How strongly the ControlNet steers the adapted source.",
              minimum=0.0, maximum=2.0, ui_minimum=0.0, ui_maximum=2.0, step=0.05, xyz="Delta control weight"),
    FieldSpec("control_start", "Control start", "Delta control start", 0.0, "float",
              "The fraction of the steps from which the ControlNet applies.",
              **FRACTION, xyz="Delta control start"),
    FieldSpec("control_end", "Control end", "Delta control end", 1.0, "float",
              "The fraction of the steps after which the ControlNet no longer applies.",
              **FRACTION, xyz="Delta control end"),
    FieldSpec("control_mode", "Control mode", "Delta control mode", "balanced", "choice",
              "As in sd-webui-controlnet: balanced; prompt (my prompt is more important); control (the ControlNet "
              "is more important).",
              choices=CONTROL_MODES, xyz="Delta control mode"),
    FieldSpec("control_preprocessor", "Control preprocessor", "Delta control preprocessor", "none", "preprocessor",
              "Makes the ControlNet's input from the image: none, the WebUI ControlNet's preprocessors, or the "
              "built-in invert and canny.",
              xyz="Delta control preprocessor"),
    # IP-Adapter on the adapted source (issue 12)
    FieldSpec("ip_adapter", "IP-Adapter on the source (optional)", "Delta IP-Adapter", "", "ipadapter",
              "An IP-Adapter of the source's family (e.g. ip-adapter-plus_sd15), applied to the adapted source only."),
    FieldSpec("ip_encoder", "CLIP vision encoder", "Delta IP-Adapter encoder", "", "clipvision",
              "The image encoder the IP-Adapter was trained with (ViT-H/14 for the SD 1.5 ones)."),
    FieldSpec("ip_image", "IP-Adapter image", "Delta IP-Adapter image hash", "", "image",
              "The image prompt; centre-cropped to a square as CLIP sees it."),
    FieldSpec("ip_weight", "IP-Adapter weight", "Delta IP-Adapter weight", 1.0, "float",
              "How strongly the image prompt steers the adapted source.",
              minimum=0.0, maximum=2.0, ui_minimum=0.0, ui_maximum=2.0, step=0.05, xyz="Delta IP-Adapter weight"),
    # the preprocessor's parameters, as sd-webui-controlnet's API names them (-1: the preprocessor's default)
    FieldSpec("control_resolution", "Preprocessor resolution", "Delta control resolution", PREPROCESSOR_DEFAULT,
              "int", "The size a host preprocessor works at (processor_res); -1: its default. The built-in ones "
              "work at the image's size.", minimum=-1, maximum=4096, ui_minimum=-1, ui_maximum=2048, step=1),
    FieldSpec("control_threshold_a", "Preprocessor threshold A", "Delta control threshold A", float(PREPROCESSOR_DEFAULT),
              "float", "The preprocessor's first parameter (canny: low threshold); -1: its default.",
              minimum=-1.0, maximum=4096.0, ui_minimum=-1.0, ui_maximum=256.0, step=0.01),
    FieldSpec("control_threshold_b", "Preprocessor threshold B", "Delta control threshold B", float(PREPROCESSOR_DEFAULT),
              "float", "The preprocessor's second parameter (canny: high threshold); -1: its default.",
              minimum=-1.0, maximum=4096.0, ui_minimum=-1.0, ui_maximum=256.0, step=0.01),
)

FIELD_BY_NAME: dict[str, FieldSpec] = {f.name: f for f in FIELDS}
CONTROL_FIELDS: tuple[str, ...] = tuple(f.name for f in FIELDS if f.name.startswith("control_"))
IP_FIELDS: tuple[str, ...] = tuple(f.name for f in FIELDS if f.name.startswith("ip_"))
# Optional parts: their settings mean something (and are written to infotext) only with the model chosen.
PART_OF: dict[str, str] = {**{n: "control_model" for n in CONTROL_FIELDS}, **{n: "ip_adapter" for n in IP_FIELDS}}
FIELD_BY_INFOTEXT: dict[str, FieldSpec] = {f.infotext: f for f in FIELDS}
# X/Y/Z axes, the delta scale first, then the UI order.
XYZ_FIELDS: tuple[FieldSpec, ...] = tuple(sorted((f for f in FIELDS if f.xyz), key=lambda f: f.name != "scale"))


def field(name: str) -> FieldSpec:
    return FIELD_BY_NAME[name]


def _check_window(values: Mapping[str, Any], source: str) -> None:
    start, end = values["start"], values["end"]
    if not start < end:
        s, e = FIELD_BY_NAME["start"], FIELD_BY_NAME["end"]
        where = f"Delta Sampling {source} settings" if source else "Delta Sampling settings"
        raise SettingError(f'{where} "{s.label}" ({s.name}) and "{e.label}" ({e.name})',
                           f"start {start!r} is not before end {end!r}, so no step would get the delta",
                           "Make start smaller than end (both are fractions of the steps, 0 to 1)")
    if values["control_start"] > values["control_end"]:
        s, e = FIELD_BY_NAME["control_start"], FIELD_BY_NAME["control_end"]
        where = f"Delta Sampling {source} settings" if source else "Delta Sampling settings"
        raise SettingError(f'{where} "{s.label}" ({s.name}) and "{e.label}" ({e.name})',
                           f"start {values['control_start']!r} is after end {values['control_end']!r}, so the "
                           "ControlNet would apply at no step", "Make the control start at most the control end")


def _unknown(name: object, source: str) -> SettingError:
    where = f"Delta Sampling {source}" if source else "Delta Sampling settings"
    close = difflib.get_close_matches(str(name), FIELD_BY_NAME, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return SettingError(where, f"unknown setting {name!r}{hint}", f"Known settings: {', '.join(FIELD_BY_NAME)}")


def checked_values(values: Mapping[str, Any], source: str = "") -> dict[str, Any]:
    """Every field's canonical value: defaults for absent names, each present one checked, the
    window checked; unknown names are an error listing the known ones."""
    if not isinstance(values, Mapping):
        raise SettingError(f"Delta Sampling {source}".strip(), f"settings must be a mapping of names to values, "
                           f"not a {type(values).__name__}", f"Known settings: {', '.join(FIELD_BY_NAME)}")
    for name in values:
        if name not in FIELD_BY_NAME:
            raise _unknown(name, source)
    out = {f.name: f.check(values[f.name], source) if f.name in values else f.default for f in FIELDS}
    _check_window(out, source)
    return out


@dataclass(frozen=True)
class DeltaSettings:
    """All Delta Sampling settings, valid by construction (same names, order and defaults as FIELDS)."""

    enabled: bool = False
    source_checkpoint: str = ""
    adapted_checkpoint: str = ""          # "": none, adapt the base with `adapters`
    adapters: str = ""                    # <lora:...> tags, embedding names, extra words
    source_prompt: str = ""               # "": the host's prompt minus extra-network tags
    source_negative: str = ""
    scale: float = 1.0
    start: float = 0.0                    # fractions of the steps, start < end
    end: float = 1.0
    schedule: str = "constant"
    source_cfg: float = 0.0               # 0: the host's CFG scale
    guidance: str = "full"
    reuse: int = 1
    hires: bool = True
    resolution: str = "target"
    control_model: str = ""               # "": no ControlNet
    control_image: Any = ""               # ControlImage, or "" for none
    control_weight: float = 1.0
    control_start: float = 0.0            # fractions of the steps, both ends included
    control_end: float = 1.0
    control_mode: str = "balanced"
    control_preprocessor: str = "none"
    ip_adapter: str = ""                  # "": no IP-Adapter
    ip_encoder: str = ""
    ip_image: Any = ""                    # ControlImage, or "" for none
    ip_weight: float = 1.0
    control_resolution: int = -1          # -1: the preprocessor's default
    control_threshold_a: float = -1.0
    control_threshold_b: float = -1.0

    def __post_init__(self) -> None:
        values = checked_values({f.name: getattr(self, f.name) for f in fields(self)})
        for name, value in values.items():   # canonical forms (1 -> 1.0, "Cosine" -> "cosine")
            object.__setattr__(self, name, value)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "API") -> DeltaSettings:
        """Settings from API-form values; absent names take their defaults. SettingError names the
        setting (label and key), the bad value and what is allowed; `source` says where it came from."""
        return cls(**checked_values(d, source))

    def to_dict(self) -> dict[str, Any]:
        """API form: {name: value} in FIELDS order."""
        return {f.name: getattr(self, f.name) for f in FIELDS}

    def replace(self, **changes: Any) -> DeltaSettings:
        return self.from_dict({**self.to_dict(), **changes}, source="")

    def validate(self) -> DeltaSettings:
        checked_values(self.to_dict())
        return self

    def to_params(self):
        """The engine's `DeltaParams` (engine/sampler.py; imports torch, hence the late import)."""
        from .sampler import DeltaParams
        return DeltaParams(scale=self.scale, start=self.start, end=self.end, shape=self.schedule,
                           guidance=self.guidance, reuse=self.reuse,
                           source_cfg=None if self.source_cfg == 0 else self.source_cfg,
                           resolution=self.resolution)

    def to_control(self, net: Any, preprocessors: Any = None):
        """The runtime's `SourceControl` for the loaded ControlNet `net` (runtime/control.py);
        `preprocessors`: the host's (runtime/preprocess.py HostPreprocessors), None for the built-in set."""
        from ..runtime.control import SourceControl
        hint = self.control_image.tensor(self.control_preprocessor, preprocessors, resolution=self.control_resolution,
                                         threshold_a=self.control_threshold_a, threshold_b=self.control_threshold_b)
        return SourceControl(net, hint, weight=self.control_weight,
                             start=self.control_start, end=self.control_end, mode=self.control_mode)

    def to_image_prompt(self, adapter: Any, encoder: Any, unet: Any):
        """The runtime's `ImagePromptHooks` for the loaded IP-Adapter and CLIP vision encoder on the
        adapted model's `unet` (runtime/image_prompt.py); the image is encoded here, once."""
        from ..runtime.image_prompt import ImagePromptHooks
        from ..runtime.ipadapter import image_prompt_tokens
        cond, uncond = image_prompt_tokens(adapter, encoder, self.ip_image.tensor().to(encoder.model.device))
        try:
            return ImagePromptHooks(unet, adapter.kv_layers(), cond, uncond, self.ip_weight)
        except ValueError as exc:
            raise SettingError(FIELD_BY_NAME["ip_adapter"].subject(), f"{self.ip_adapter!r} does not fit the source "
                               f"model ({exc})", "Use an IP-Adapter made for the source's family") from None

    def control_problem(self) -> SettingError | None:
        """Why the ControlNet settings cannot run (checked when a generation starts, not here: a
        pasted infotext names the ControlNet but never carries the image)."""
        if self.control_model and not self.control_image:
            spec = FIELD_BY_NAME["control_image"]
            return SettingError(spec.subject(), f"the ControlNet {self.control_model!r} is chosen but no control "
                                "image is given", "Add the (preprocessed) control image, or choose no ControlNet")
        if self.ip_adapter and not self.ip_image:
            return SettingError(FIELD_BY_NAME["ip_image"].subject(), f"the IP-Adapter {self.ip_adapter!r} is chosen "
                                "but no image is given", "Add the image prompt, or choose no IP-Adapter")
        if self.ip_adapter and not self.ip_encoder:
            return SettingError(FIELD_BY_NAME["ip_encoder"].subject(), f"the IP-Adapter {self.ip_adapter!r} needs "
                                "its CLIP vision encoder", "Pick the encoder it was trained with (ViT-H/14 for SD 1.5)")
        return None
