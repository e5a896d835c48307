"""The accordion: one gradio control per setting, generated from FIELDS (gradio 3.41, A1111 1.10).

The controls are returned in FIELDS order, which is the positional order of the script's
arguments (UI and `alwayson_scripts` alike). The `enabled` control is the `InputAccordion` itself
(its header checkbox). Every control gets `elem_id = script.elem_id(name)` (per tab:
`script_txt2img_delta_sampling_scale`) and A1111's `tooltip=` from the field's tooltip.

`build_ui` runs three times per tab (the UI, then twice in `Api.init_default_script_args`): it only
reads the host's name lists (through `UiChoices`) and never loads a model.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..engine.settings import FIELD_BY_NAME, FIELDS, FieldSpec
from . import paste
from .args import NONE_CHOICE, NONE_CHOICE_FIELDS, ui_value


@dataclass(frozen=True)
class UiChoices:
    """The host's name lists, read when the UI is built and when a refresh button is pressed."""

    checkpoints: Callable[[], list[str]]                  # checkpoint titles
    loras: Callable[[], list[tuple[str, str]]]            # (name for <lora:name:w>, label with family)
    refresh_checkpoints: Callable[[], None] | None = None  # default: modules.sd_models.list_models
    refresh_loras: Callable[[], None] | None = None        # default: the Lora extension's re-scan
    models: Callable[[str], list[str]] | None = None       # names of a model kind ("controlnet", ...);
                                                           # default: webui/files.py model_names
    preprocessors: Callable[[], list[str]] | None = None   # default: webui/preprocessors.py
    preprocessor_labels: Callable[[str], tuple] | None = None  # (resolution, A, B) labels, None: unused


# Rows of the accordion. A field missing here still gets a control, in a row of its own at the end.
LAYOUT: tuple[tuple[str, ...], ...] = (
    ("source_checkpoint", "adapted_checkpoint"),
    ("adapters",),
    ("source_prompt", "source_negative"),
    ("scale", "start", "end"),
    ("schedule", "source_cfg"),
    ("guidance", "reuse"),
    ("hires", "resolution"),
    ("control_model", "control_mode"),
    ("control_image", "control_preprocessor"),
    ("control_resolution", "control_threshold_a", "control_threshold_b"),
    ("control_weight", "control_start", "control_end"),
    ("ip_adapter", "ip_encoder"),
    ("ip_image", "ip_weight"),
)
# Sections (closed accordions) for the optional parts, by the first field of their rows
SECTIONS = {"control_": "ControlNet on the adapted source", "ip_": "IP-Adapter on the adapted source"}
TEXT_LINES = {"adapters": 2, "source_prompt": 2, "source_negative": 2}
PLACEHOLDERS = {
    "adapters": "<lora:name:1> embedding-name trigger words",
    "source_prompt": "empty: the main prompt without its <lora:...> tags",
    "source_negative": "empty: the main negative prompt",
}
HIDDEN_IN_IMG2IMG = ("hires",)   # img2img has no hires pass; the control stays for the arg order
LORA_PICKER_TOOLTIP = "Adds <lora:NAME:1> to the adaptation text; the family its shapes point to is in brackets."


def layout_rows() -> list[tuple[str, ...]]:
    """LAYOUT plus any field it does not name (except `enabled`, the accordion itself)."""
    placed = {name for row in LAYOUT for name in row}
    return list(LAYOUT) + [(f.name,) for f in FIELDS if f.name != "enabled" and f.name not in placed]


def append_lora_tag(text: str, name: str, weight: float = 1) -> str:
    """The adapter text with `<lora:name:weight>` added at the end."""
    tag = f"<lora:{name}:{weight:g}>"
    text = (text or "").rstrip()
    return f"{text} {tag}" if text else tag


def picked_lora_text(picked: str | None, text: str, loras: list[tuple[str, str]]) -> str | None:
    """The adapter text after picking the entry labelled `picked`; None when nothing was picked."""
    if not picked:
        return None
    names = {label: name for name, label in loras}
    return append_lora_tag(text, names.get(picked, picked))


def _tooltip(component: Any, text: str) -> None:
    # A1111 reads `webui_tooltip` from any block's config (gradio_extensons.Block_get_config) and
    # javascript/hints.js turns it into the element's title. `InputAccordion(tooltip=...)` would
    # also pass the kwarg to gr.Accordion, which warns about it, so it is set here instead.
    component.webui_tooltip = text


def build_ui(script: Any, is_img2img: bool, choices: UiChoices) -> list:
    """The accordion's controls in FIELDS order; sets `script.infotext_fields`/`paste_field_names`."""
    import gradio as gr
    from modules.ui_components import InputAccordion

    enabled = FIELD_BY_NAME["enabled"]
    controls: dict[str, Any] = {}
    with InputAccordion(enabled.default, label=script.title(), elem_id=script.elem_id("enable")) as accordion:
        _tooltip(accordion, enabled.tooltip)
        _tooltip(accordion.accordion, enabled.tooltip)
        controls["enabled"] = accordion
        rows = layout_rows()
        for row in (r for r in rows if not _section(r)):
            _row(gr, row, controls, script, is_img2img, choices)
        for prefix, title in SECTIONS.items():
            with gr.Accordion(title, open=False, elem_id=script.elem_id(f"{prefix}accordion")):
                for row in (r for r in rows if _section(r) == prefix):
                    _row(gr, row, controls, script, is_img2img, choices)
        _convert_section(gr, script, controls, choices)
    _wire_preprocessor(controls, choices)
    script.infotext_fields = paste.infotext_fields(controls)
    script.paste_field_names = paste.paste_field_names()
    return [controls[f.name] for f in FIELDS]


CONVERT_TITLE = "Convert a LoRA for the current checkpoint (same architecture)"
CONVERT_HELP = ("For a model of the source's architecture (SD1.5 -> an SD1.5 fine-tune, SDXL -> Pony/Illustrious): "
                "writes a converted LoRA into the LoRA folder once, then use it as a normal LoRA, no source model "
                "per step. Runs in the background; generating goes on meanwhile.")


CONVERT_TOOLTIPS = {
    "help": CONVERT_HELP,
    "lora": "The LoRA to convert; it must be made for the source checkpoint above.",
    "name": "Name of the new file in the LoRA folder; empty: the LoRA's name + -for- + the checkpoint's.",
    "threshold": "How alike a layer's subspaces must be (0-1) for it to be transferred; unlike layers are dropped.",
    "rank": "Rank of the converted layers; 0 keeps each layer's own rank.",
    "overwrite": "Replace a file of that name in the LoRA folder.",
    "start": "Start converting in the background (the status below updates every 2 s).",
    "cancel": "Stop the running conversion; nothing is written.",
    "status": "The conversion's progress and result.",
}


def _convert_section(gr: Any, script: Any, controls: dict, choices: UiChoices) -> None:
    """The conversion action (webui/convert.py): the accordion's source checkpoint is the LoRA's base,
    the WebUI's current checkpoint the target. Not part of the script's arguments."""
    from . import convert

    def labels() -> list[str]:
        return [label for _, label in choices.loras()]

    def run(source: str, picked: str | None, name: str, threshold: float, rank: float, overwrite: bool) -> str:
        lora = {label: n for n, label in choices.loras()}.get(picked or "", picked or "")
        if not lora:
            return "Choose the LoRA to convert."
        try:
            convert.start(convert.ConvertRequest(lora=lora, source_checkpoint=source or "", name=name or "",
                                                 threshold=float(threshold), rank=int(rank or 0),
                                                 overwrite=bool(overwrite)))
        except Exception as exc:  # noqa: BLE001 - shown in the status box; nothing started
            return f"not started: {exc}"
        return convert.status_text()

    def eid(name: str) -> dict:
        return {"elem_id": script.elem_id(f"convert_{name}"), "tooltip": CONVERT_TOOLTIPS[name]}

    with gr.Accordion(CONVERT_TITLE, open=False, elem_id=script.elem_id("convert_accordion")):
        gr.Markdown(CONVERT_HELP, **eid("help"))
        with gr.Row():
            lora = gr.Dropdown(choices=labels(), value=None, label="LoRA (made for the source checkpoint)", **eid("lora"))
            name = gr.Textbox(value="", label="File name (empty: <lora>-for-<checkpoint>)", **eid("name"))
        with gr.Row():
            threshold = gr.Slider(minimum=0.0, maximum=1.0, step=0.01, value=0.8, label="Similarity threshold",
                                  **eid("threshold"))
            rank = gr.Number(value=0, precision=0, label="Rank (0: the LoRA's own)", **eid("rank"))
            overwrite = gr.Checkbox(value=False, label="Replace a file of that name", **eid("overwrite"))
        with gr.Row():
            start = gr.Button("Convert", **eid("start"))
            stop = gr.Button("Cancel", **eid("cancel"))
        status = gr.Textbox(value=convert.status_text, every=2.0, interactive=False, label="Conversion", **eid("status"))
    start.click(fn=run, inputs=[controls["source_checkpoint"], lora, name, threshold, rank, overwrite],
                outputs=[status], show_progress=False)
    stop.click(fn=lambda: (convert.cancel(), convert.status_text())[1], inputs=[], outputs=[status],
               show_progress=False)


def _section(row: tuple[str, ...]) -> str | None:
    return next((prefix for prefix in SECTIONS if row[0].startswith(prefix)), None)


def _row(gr: Any, row: tuple[str, ...], controls: dict, script: Any, is_img2img: bool, choices: UiChoices) -> None:
    with gr.Row():
        for name in row:
            controls[name] = _control(gr, FIELD_BY_NAME[name], script, is_img2img, choices)


def _control(gr: Any, spec: FieldSpec, script: Any, is_img2img: bool, choices: UiChoices) -> Any:
    common = {"label": spec.label, "elem_id": script.elem_id(spec.name), "tooltip": spec.tooltip}
    if spec.kind == "checkpoint":
        return _checkpoint_dropdown(gr, spec, script, choices, common)
    if spec.kind in MODEL_KINDS:
        return _model_dropdown(gr, spec, script, choices, common)
    if spec.kind == "image":
        return gr.Image(type="numpy", **common)
    if spec.kind == "preprocessor":
        # a value the list lacks (pasted from a WebUI with other preprocessors) is kept, and named
        # in an error when a generation starts
        return gr.Dropdown(choices=_preprocessor_choices(choices), value=spec.default, allow_custom_value=True,
                           **common)
    if spec.name in PREPROCESSOR_PARAMS:
        label = _labels(choices, FIELD_BY_NAME["control_preprocessor"].default)[PREPROCESSOR_PARAMS.index(spec.name)]
        return gr.Slider(minimum=spec.ui_minimum, maximum=spec.ui_maximum, step=spec.step, value=spec.default,
                         visible=label is not None, **{**common, "label": _param_label(spec, label)})
    if spec.name == "adapters":
        return _adapter_text(gr, spec, script, choices, common)
    if spec.kind in ("float", "int"):
        cast = float if spec.kind == "float" else int
        return gr.Slider(minimum=cast(spec.ui_minimum), maximum=cast(spec.ui_maximum), step=cast(spec.step),
                         value=cast(spec.default), **common)
    if spec.kind == "choice":
        return gr.Radio(choices=list(spec.choices), value=spec.default, **common)
    if spec.kind == "bool":
        return gr.Checkbox(value=spec.default, visible=not (is_img2img and spec.name in HIDDEN_IN_IMG2IMG), **common)
    return gr.Textbox(value=spec.default, lines=TEXT_LINES.get(spec.name, 1),
                      placeholder=PLACEHOLDERS.get(spec.name, ""), **common)


def _checkpoint_choices(spec: FieldSpec, choices: UiChoices) -> list[str]:
    titles = list(choices.checkpoints())
    return [NONE_CHOICE, *titles] if spec.name in NONE_CHOICE_FIELDS else titles


def _checkpoint_dropdown(gr: Any, spec: FieldSpec, script: Any, choices: UiChoices, common: dict) -> Any:
    from modules.ui_common import create_refresh_button

    def refresh() -> None:
        if choices.refresh_checkpoints is not None:
            choices.refresh_checkpoints()
        else:
            from modules import sd_models
            sd_models.list_models()

    with gr.Row():
        dropdown = gr.Dropdown(choices=_checkpoint_choices(spec, choices), value=ui_value(spec, spec.default),
                               **common)
        create_refresh_button(dropdown, refresh, lambda: {"choices": _checkpoint_choices(spec, choices)},
                              script.elem_id(f"{spec.name}_refresh"))
    return dropdown


MODEL_KINDS = ("controlnet", "ipadapter", "clipvision")   # files listed from their folders (webui/files.py)
PREPROCESSOR_PARAMS = ("control_resolution", "control_threshold_a", "control_threshold_b")


def _preprocessor_choices(choices: UiChoices) -> list[str]:
    if choices.preprocessors is not None:
        return choices.preprocessors()
    from .preprocessors import preprocessor_choices
    return preprocessor_choices()


def _labels(choices: UiChoices, name: str) -> tuple:
    if choices.preprocessor_labels is not None:
        return choices.preprocessor_labels(name)
    from .preprocessors import preprocessor_labels
    return preprocessor_labels(name)


def _param_label(spec: FieldSpec, label: str | None) -> str:
    """The slider's label: the preprocessor's own name for the parameter, with -1's meaning."""
    return f"{label} (-1: its default)" if label else spec.label


def _wire_preprocessor(controls: dict, choices: UiChoices) -> None:
    """Choosing a preprocessor shows the parameters it uses, under its own names. Values are left
    alone, so a pasted infotext (which sets the preprocessor and its values together) keeps them."""
    import gradio as gr

    dropdown = controls.get("control_preprocessor")
    sliders = [controls.get(name) for name in PREPROCESSOR_PARAMS]
    if dropdown is None or any(s is None for s in sliders):
        return

    def show(name: str | None) -> list:
        labels = _labels(choices, name or "none")
        return [gr.update(visible=label is not None, label=_param_label(FIELD_BY_NAME[n], label))
                for n, label in zip(PREPROCESSOR_PARAMS, labels)]

    dropdown.change(fn=show, inputs=[dropdown], outputs=sliders, show_progress=False)


def _model_choices(kind: str, choices: UiChoices) -> list[str]:
    if choices.models is not None:
        return [NONE_CHOICE, *choices.models(kind)]
    from .files import model_names
    return [NONE_CHOICE, *model_names(kind)]


def _model_dropdown(gr: Any, spec: FieldSpec, script: Any, choices: UiChoices, common: dict) -> Any:
    """A ControlNet / IP-Adapter / CLIP vision dropdown; refresh lists the folders again."""
    from modules.ui_common import create_refresh_button

    with gr.Row():
        dropdown = gr.Dropdown(choices=_model_choices(spec.kind, choices), value=ui_value(spec, spec.default), **common)
        create_refresh_button(dropdown, lambda: None, lambda: {"choices": _model_choices(spec.kind, choices)},
                              script.elem_id(f"{spec.name}_refresh"))
    return dropdown


def _adapter_text(gr: Any, spec: FieldSpec, script: Any, choices: UiChoices, common: dict) -> Any:
    from modules.ui_common import create_refresh_button

    def labels() -> list[str]:
        return [label for _, label in choices.loras()]

    def pick(picked: str | None, text: str) -> tuple[Any, Any]:
        new_text = picked_lora_text(picked, text, choices.loras())
        if new_text is None:
            return gr.update(), gr.update()
        # The picker resets to empty, so the same LoRA can be picked again.
        return gr.update(value=new_text), gr.update(value=None)

    def refresh() -> None:
        if choices.refresh_loras is not None:
            choices.refresh_loras()
            return
        networks = sys.modules.get("networks")     # A1111's Lora extension, when loaded
        if hasattr(networks, "list_available_networks"):
            networks.list_available_networks()

    with gr.Column(scale=3):
        text = gr.Textbox(value=spec.default, lines=TEXT_LINES.get(spec.name, 1),
                          placeholder=PLACEHOLDERS.get(spec.name, ""), **common)
    with gr.Column(scale=1, min_width=160):
        with gr.Row():
            picker = gr.Dropdown(choices=labels(), value=None, label="Add a LoRA",
                                 elem_id=script.elem_id("lora_picker"), tooltip=LORA_PICKER_TOOLTIP)
            create_refresh_button(picker, refresh, lambda: {"choices": labels()},
                                  script.elem_id("lora_picker_refresh"))
    picker.change(fn=pick, inputs=[picker, text], outputs=[text, picker], show_progress=False)
    return text
