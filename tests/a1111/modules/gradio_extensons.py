"""Mirrors modules/gradio_extensons.py [sic] (imported by A1111 at startup): patches gradio so
that every IOComponent pops `tooltip=` into `webui_tooltip`, and every IOComponent and
BlockContext calls `scripts_current.before_component`, `before_component_callback`, (init),
`after_component_callback`, `scripts_current.after_component`; adds the "gradio-<name>" class.
Block contexts do NOT pop `tooltip` (it reaches gradio as an unused kwarg)."""

import gradio as gr

from modules import scripts


def add_classes_to_gradio_component(comp):
    comp.elem_classes = [f"gradio-{comp.get_block_name()}", *(comp.elem_classes or [])]
    if getattr(comp, 'multiselect', False):
        comp.elem_classes.append('multiselect')


def _around(original, pop_tooltip):
    def init(self, *args, **kwargs):
        if pop_tooltip:
            self.webui_tooltip = kwargs.pop('tooltip', None)
        if scripts.scripts_current is not None:
            scripts.scripts_current.before_component(self, **kwargs)
        scripts.script_callbacks.before_component_callback(self, **kwargs)
        res = original(self, *args, **kwargs)
        add_classes_to_gradio_component(self)
        scripts.script_callbacks.after_component_callback(self, **kwargs)
        if scripts.scripts_current is not None:
            scripts.scripts_current.after_component(self, **kwargs)
        return res
    init.__wrapped__ = original
    return init


if not getattr(gr.components.IOComponent.__init__, "__wrapped__", None):
    original_IOComponent_init = gr.components.IOComponent.__init__
    original_BlockContext_init = gr.blocks.BlockContext.__init__
    gr.components.IOComponent.__init__ = _around(original_IOComponent_init, pop_tooltip=True)
    gr.blocks.BlockContext.__init__ = _around(original_BlockContext_init, pop_tooltip=False)
