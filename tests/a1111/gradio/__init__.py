"""Stand-in for gradio 3.41.2 (the version A1111 1.10.1 pins), enough to build and inspect a UI.

Mirrors (gradio 3.41.2 wheel): `blocks.py` (Block, BlockContext, Blocks, Context), `layouts.py`
(Row, Column(scale, min_width), Group, Box, Accordion(label, open), Tab(label, id), Tabs, Form),
`components/*.py` constructor signatures (positional order, keyword-only rest) and what each
stores as `.value` (`IOComponent.__init__` runs `postprocess(value)`: Slider None -> minimum,
Number -> float / rounded by `precision`, Textbox -> str, Markdown -> cleandoc), `Dropdown`
choices as `str(c)`, `Radio` choices as `(str(c), c)` tuples, `helpers.update` (a dict with
`"__type__": "generic_update"`) and `Component.update` (a dict with `"__type__": "update"`).
Unknown kwargs are kept in `unused_kwargs` with a warning, as gradio's
`check_deprecated_parameters` warns. Nothing is rendered; event listeners are recorded.

Differences: `X.update(...)` leaves out the None-valued fields gradio would list; no queue,
no serving. A1111's own patches (tooltip, before/after component callbacks) are applied by
`modules.gradio_extensons`, as in A1111.
"""

from __future__ import annotations

import inspect
import math
import types
import warnings
from typing import Any, Callable

NO_VALUE = object()   # gradio's _Keywords.NO_VALUE

messages: list[tuple[str, str]] = []   # gr.Warning / gr.Info shown to the user: (kind, text)


class Context:
    root_block: "Blocks | None" = None
    block: "BlockContext | None" = None
    id = 0


class Dependency(dict):
    """What an event listener returns; `.then()` chains another listener."""

    def then(self, fn=None, inputs=None, outputs=None, **kwargs):
        return _listen(self["trigger"], "then", fn, inputs, outputs, kwargs)


def _as_list(x):
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple, set)) else [x]


def _listen(block, event, fn, inputs, outputs, kwargs):
    dep = Dependency(trigger=block, event=event, fn=fn, inputs=_as_list(inputs), outputs=_as_list(outputs),
                     js=kwargs.pop("_js", None), kwargs=kwargs)
    block.events.append(dep)
    if Context.root_block is not None:
        Context.root_block.fns.append(dep)
    return dep


def _event(name):
    def listener(self, fn: Callable | None = None, inputs=None, outputs=None, **kwargs):
        return _listen(self, name, fn, inputs, outputs, kwargs)
    listener.__name__ = name
    return listener


class Block:
    def __init__(self, *, visible: bool = True, elem_id: str | None = None, elem_classes=None,
                 render: bool = True, **kwargs):
        Context.id += 1
        self._id = Context.id
        self.visible = visible
        self.elem_id = elem_id
        self.elem_classes = [elem_classes] if isinstance(elem_classes, str) else list(elem_classes or [])
        self.parent: BlockContext | None = None
        self.events: list[Dependency] = []
        self.unused_kwargs = dict(kwargs)
        if kwargs:
            warnings.warn(f"You have unused kwarg parameters in {type(self).__name__}, please remove them: {kwargs}")
        if render:
            self.render()

    def render(self):
        if Context.root_block is not None:
            Context.root_block.blocks[self._id] = self
        if Context.block is not None:
            Context.block.add(self)
        return self

    def get_block_name(self) -> str:
        return type(self).__name__.lower()

    def get_expected_parent(self):
        return None

    @classmethod
    def update(cls, value=NO_VALUE, **kwargs) -> dict:
        upd = {k: v for k, v in kwargs.items() if v is not None}
        if value is not NO_VALUE:
            upd["value"] = value
        upd["__type__"] = "update"
        return upd

    change = _event("change")
    click = _event("click")
    select = _event("select")
    input = _event("input")
    release = _event("release")
    blur = _event("blur")
    submit = _event("submit")
    upload = _event("upload")
    clear = _event("clear")


class BlockContext(Block):
    def __init__(self, visible: bool = True, render: bool = True, **kwargs):
        self.children: list[Block] = []
        Block.__init__(self, visible=visible, render=render, **kwargs)

    def add(self, child: Block):
        child.parent = self
        self.children.append(child)

    def __enter__(self):
        self.parent_context = Context.block
        Context.block = self
        return self

    def __exit__(self, *exc):
        Context.block = self.parent_context

    def walk(self):
        """Every block inside, depth first (not gradio API; for tests)."""
        for child in self.children:
            yield child
            if isinstance(child, BlockContext):
                yield from child.walk()


class Blocks(BlockContext):
    def __init__(self, theme=None, analytics_enabled=None, mode: str = "blocks", title: str = "Gradio",
                 css: str | None = None, **kwargs):
        self.blocks: dict[int, Block] = {}
        self.fns: list[Dependency] = []
        self.title = title
        super().__init__(render=False, **kwargs)

    def __enter__(self):
        self.parent_root = Context.root_block
        Context.root_block = self
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        Context.root_block = self.parent_root

    load = _event("load")

    def launch(self, *args, **kwargs):
        return None

    def queue(self, *args, **kwargs):
        return self


class Row(BlockContext):
    def __init__(self, *, variant: str = "default", visible: bool = True, elem_id: str | None = None,
                 equal_height: bool = True, **kwargs):
        self.variant, self.equal_height = variant, equal_height
        super().__init__(visible=visible, elem_id=elem_id, **kwargs)


class Column(BlockContext):
    def __init__(self, scale: int = 1, min_width: int = 320, *, variant: str = "default", visible: bool = True,
                 elem_id: str | None = None, **kwargs):
        self.scale, self.min_width, self.variant = scale, min_width, variant
        super().__init__(visible=visible, elem_id=elem_id, **kwargs)


class Group(BlockContext):
    def __init__(self, *, visible: bool = True, elem_id: str | None = None, **kwargs):
        super().__init__(visible=visible, elem_id=elem_id, **kwargs)


class Box(Group):
    pass


class Form(BlockContext):
    pass


class Tabs(BlockContext):
    def __init__(self, *, selected=None, visible: bool = True, elem_id: str | None = None, **kwargs):
        self.selected = selected
        super().__init__(visible=visible, elem_id=elem_id, **kwargs)


class Tab(BlockContext):
    def __init__(self, label: str | None = None, *, id=None, elem_id: str | None = None, **kwargs):
        self.label, self.id = label, id
        super().__init__(elem_id=elem_id, **kwargs)


TabItem = Tab


class Accordion(BlockContext):
    def __init__(self, label: str | None = None, *, open: bool = True, visible: bool = True,
                 elem_id: str | None = None, **kwargs):
        self.label, self.open = label, open
        super().__init__(visible=visible, elem_id=elem_id, **kwargs)


class Component(Block):
    pass


class IOComponent(Component):
    def __init__(self, *, value: Any = None, label: str | None = None, info: str | None = None,
                 show_label: bool | None = None, container: bool = True, scale: int | None = None,
                 min_width: int | None = None, interactive: bool | None = None, visible: bool = True,
                 elem_id: str | None = None, elem_classes=None, load_fn: Callable | None = None,
                 every: float | None = None, **kwargs):
        Component.__init__(self, elem_id=elem_id, elem_classes=elem_classes, visible=visible, **kwargs)
        self.label, self.info = label, info
        self.show_label = False if not container else (True if show_label is None else show_label)
        self.container, self.scale, self.min_width, self.interactive = container, scale, min_width, interactive
        self.load_fn = value if callable(value) else None
        self.value = self.postprocess(value() if callable(value) else value)

    def postprocess(self, y):
        return y


class FormComponent(IOComponent):
    def get_expected_parent(self):
        return Form


class Checkbox(FormComponent):
    def __init__(self, value: bool | Callable = False, *, label: str | None = None, info: str | None = None,
                 every: float | None = None, show_label: bool | None = None, container: bool = True,
                 scale: int | None = None, min_width: int = 160, interactive: bool | None = None,
                 visible: bool = True, elem_id: str | None = None, elem_classes=None, **kwargs):
        super().__init__(value=value, label=label, info=info, every=every, show_label=show_label,
                         container=container, scale=scale, min_width=min_width, interactive=interactive,
                         visible=visible, elem_id=elem_id, elem_classes=elem_classes, **kwargs)


class Slider(FormComponent):
    def __init__(self, minimum: float = 0, maximum: float = 100, value: float | Callable | None = None, *,
                 step: float | None = None, label: str | None = None, info: str | None = None,
                 every: float | None = None, show_label: bool | None = None, container: bool = True,
                 scale: int | None = None, min_width: int = 160, interactive: bool | None = None,
                 visible: bool = True, elem_id: str | None = None, elem_classes=None,
                 randomize: bool = False, **kwargs):
        self.minimum, self.maximum = minimum, maximum
        # gradio: without a step, 1/100 of the range rounded down to a power of ten
        self.step = step if step is not None else 10 ** math.floor(math.log10(maximum - minimum) - 2)
        super().__init__(value=value, label=label, info=info, every=every, show_label=show_label,
                         container=container, scale=scale, min_width=min_width, interactive=interactive,
                         visible=visible, elem_id=elem_id, elem_classes=elem_classes, **kwargs)

    def postprocess(self, y):
        return self.minimum if y is None else y


class Number(FormComponent):
    def __init__(self, value: float | Callable | None = None, *, label: str | None = None,
                 info: str | None = None, every: float | None = None, show_label: bool | None = None,
                 container: bool = True, scale: int | None = None, min_width: int = 160,
                 interactive: bool | None = None, visible: bool = True, elem_id: str | None = None,
                 elem_classes=None, precision: int | None = None, minimum: float | None = None,
                 maximum: float | None = None, step: float = 1, **kwargs):
        self.precision, self.minimum, self.maximum, self.step = precision, minimum, maximum, step
        super().__init__(value=value, label=label, info=info, every=every, show_label=show_label,
                         container=container, scale=scale, min_width=min_width, interactive=interactive,
                         visible=visible, elem_id=elem_id, elem_classes=elem_classes, **kwargs)

    def postprocess(self, y):
        if y is None:
            return None
        if self.precision is None:
            return float(y)
        if self.precision == 0:
            return int(round(y, 0))
        return round(y, self.precision)


class Dropdown(FormComponent):
    def __init__(self, choices: list[str] | None = None, *, value=None, type: str = "value",
                 multiselect: bool | None = None, allow_custom_value: bool = False, max_choices: int | None = None,
                 label: str | None = None, info: str | None = None, every: float | None = None,
                 show_label: bool | None = None, container: bool = True, scale: int | None = None,
                 min_width: int = 160, interactive: bool | None = None, visible: bool = True,
                 elem_id: str | None = None, elem_classes=None, **kwargs):
        self.choices = [str(c) for c in choices] if choices else []
        if type not in ("value", "index"):
            raise ValueError(f"Invalid value for parameter `type`: {type}. Please choose from one of: ['value', 'index']")
        self.type, self.multiselect, self.max_choices = type, multiselect, max_choices
        self.allow_custom_value = allow_custom_value
        if multiselect and isinstance(value, str):
            value = [value]
        if multiselect and allow_custom_value:
            raise ValueError("Custom values are not supported when `multiselect` is True.")
        super().__init__(value=value, label=label, info=info, every=every, show_label=show_label,
                         container=container, scale=scale, min_width=min_width, interactive=interactive,
                         visible=visible, elem_id=elem_id, elem_classes=elem_classes, **kwargs)


class Radio(FormComponent):
    def __init__(self, choices=None, *, value=None, type: str = "value", label: str | None = None,
                 info: str | None = None, every: float | None = None, show_label: bool | None = None,
                 container: bool = True, scale: int | None = None, min_width: int = 160,
                 interactive: bool | None = None, visible: bool = True, elem_id: str | None = None,
                 elem_classes=None, **kwargs):
        self.choices = [c if isinstance(c, tuple) else (str(c), c) for c in choices] if choices else []
        self.type = type
        super().__init__(value=value, label=label, info=info, every=every, show_label=show_label,
                         container=container, scale=scale, min_width=min_width, interactive=interactive,
                         visible=visible, elem_id=elem_id, elem_classes=elem_classes, **kwargs)


class CheckboxGroup(FormComponent):
    def __init__(self, choices=None, *, value=None, type: str = "value", label: str | None = None,
                 info: str | None = None, visible: bool = True, elem_id: str | None = None, **kwargs):
        self.choices = [c if isinstance(c, tuple) else (str(c), c) for c in choices] if choices else []
        self.type = type
        super().__init__(value=[] if value is None else value, label=label, info=info, visible=visible,
                         elem_id=elem_id, **kwargs)


class Textbox(FormComponent):
    def __init__(self, value: str | Callable | None = "", *, lines: int = 1, max_lines: int = 20,
                 placeholder: str | None = None, label: str | None = None, info: str | None = None,
                 every: float | None = None, show_label: bool | None = None, container: bool = True,
                 scale: int | None = None, min_width: int = 160, interactive: bool | None = None,
                 visible: bool = True, elem_id: str | None = None, autofocus: bool = False,
                 elem_classes=None, type: str = "text", text_align: str | None = None, rtl: bool = False,
                 show_copy_button: bool = False, **kwargs):
        self.lines, self.max_lines, self.placeholder, self.type = lines, max_lines, placeholder, type
        super().__init__(value=value, label=label, info=info, every=every, show_label=show_label,
                         container=container, scale=scale, min_width=min_width, interactive=interactive,
                         visible=visible, elem_id=elem_id, elem_classes=elem_classes, **kwargs)

    def postprocess(self, y):
        return None if y is None else str(y)


class Image(IOComponent):
    """gradio 3.41.2 components/image.py: an upload box; `type` says what the handler gets
    ("numpy": an H x W x 3 uint8 array, "pil", "filepath"); None when nothing is uploaded."""

    def __init__(self, value=None, *, shape=None, height: int | None = None, width: int | None = None,
                 image_mode: str = "RGB", invert_colors: bool = False, source: str = "upload", tool: str | None = None,
                 type: str = "numpy", label: str | None = None, every: float | None = None,
                 show_label: bool | None = None, show_download_button: bool = True, container: bool = True,
                 scale: int | None = None, min_width: int = 160, interactive: bool | None = None,
                 visible: bool = True, streaming: bool = False, elem_id: str | None = None, elem_classes=None,
                 mirror_webcam: bool = True, brush_radius: float | None = None, brush_color: str = "#000000",
                 mask_opacity: float = 0.7, show_share_button: bool | None = None, **kwargs):
        if type not in ("numpy", "pil", "filepath"):
            raise ValueError(f"Invalid value for parameter `type`: {type}. Please choose from one of: "
                             "['numpy', 'pil', 'filepath']")
        self.type, self.source, self.tool, self.image_mode = type, source, tool, image_mode
        super().__init__(value=value, label=label, every=every, show_label=show_label, container=container,
                         scale=scale, min_width=min_width, interactive=interactive, visible=visible,
                         elem_id=elem_id, elem_classes=elem_classes, **kwargs)


class Button(IOComponent):
    def __init__(self, value: str | Callable = "Run", *, variant: str = "secondary", size: str | None = None,
                 icon: str | None = None, link: str | None = None, visible: bool = True, interactive: bool = True,
                 elem_id: str | None = None, elem_classes=None, scale: int | None = None,
                 min_width: int | None = None, **kwargs):
        self.variant, self.size, self.icon, self.link = variant, size, icon, link
        super().__init__(value=value, visible=visible, interactive=interactive, elem_id=elem_id,
                         elem_classes=elem_classes, scale=scale, min_width=min_width, **kwargs)


class HTML(IOComponent):
    def __init__(self, value: str | Callable = "", *, label: str | None = None, every: float | None = None,
                 show_label: bool | None = None, visible: bool = True, elem_id: str | None = None,
                 elem_classes=None, **kwargs):
        super().__init__(value=value, label=label, every=every, show_label=show_label, visible=visible,
                         elem_id=elem_id, elem_classes=elem_classes, **kwargs)


class Markdown(IOComponent):
    def __init__(self, value: str | Callable = "", *, rtl: bool = False, latex_delimiters=None,
                 visible: bool = True, elem_id: str | None = None, elem_classes=None, **kwargs):
        self.rtl = rtl
        super().__init__(value=value, visible=visible, elem_id=elem_id, elem_classes=elem_classes, **kwargs)

    def postprocess(self, y):
        return None if y is None else inspect.cleandoc(y)


class ColorPicker(FormComponent):
    def __init__(self, value: str | Callable | None = None, *, label: str | None = None, **kwargs):
        super().__init__(value=value, label=label, **kwargs)


class State(IOComponent):
    def __init__(self, value: Any = None, **kwargs):
        super().__init__(value=value, **kwargs)


def update(**kwargs) -> dict:
    """gradio.update: a generic update of whatever component it is returned to."""
    kwargs["__type__"] = "generic_update"
    return kwargs


class Error(Exception):
    pass


def Warning(message: str = "Warning issued.") -> None:  # noqa: N802 (gradio's name)
    messages.append(("warning", message))


def Info(message: str = "Info issued.") -> None:  # noqa: N802
    messages.append(("info", message))


themes = types.SimpleNamespace(Base=lambda *a, **k: None, Default=lambda *a, **k: None)
components = types.SimpleNamespace(Component=Component, IOComponent=IOComponent, FormComponent=FormComponent,
                                   Form=Form, Checkbox=Checkbox, Slider=Slider, Number=Number, Dropdown=Dropdown,
                                   Radio=Radio, Textbox=Textbox, Button=Button, HTML=HTML, Markdown=Markdown)
blocks = types.SimpleNamespace(Block=Block, BlockContext=BlockContext, Blocks=Blocks, Context=Context)
layouts = types.SimpleNamespace(Row=Row, Column=Column, Group=Group, Box=Box, Accordion=Accordion, Tab=Tab,
                                Tabs=Tabs, Form=Form)

__version__ = "3.41.2"
