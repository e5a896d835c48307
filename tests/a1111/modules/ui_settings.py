"""Mirrors modules/ui_settings.py (1.10.1): `get_value_for_setting(key)` - what every load of the
Settings page returns for each setting: `gr.update(value=..., **component_args)` (a callable
`component_args` is called; only 'precision' is dropped), which gradio then hands to the
component's `update()` - and `create_setting_component(key)` (the component class by
`info.component` or the default's type: str -> Textbox, int -> Number, bool -> Checkbox; built
with `label`, `value`, `elem_id` and the component_args; a refresh button when `info.refresh`)."""

import gradio as gr

from modules import ui_common
from modules.shared import opts
from modules.ui_components import FormRow


def get_value_for_setting(key):
    value = getattr(opts, key)
    info = opts.data_labels[key]
    args = info.component_args() if callable(info.component_args) else info.component_args or {}
    args = {k: v for k, v in args.items() if k not in {'precision'}}
    return gr.update(value=value, **args)


def setting_component_class(key):
    """The component class `create_setting_component` picks (the same branches, factored out)."""
    info = opts.data_labels[key]
    t = type(info.default)
    if info.component is not None:
        return info.component
    if t == str:
        return gr.Textbox
    if t == int:
        return gr.Number
    if t == bool:
        return gr.Checkbox
    raise Exception(f'bad options item type: {t} for key {key}')


def create_setting_component(key, is_quicksettings=False):
    def fun():
        return opts.data[key] if key in opts.data else opts.data_labels[key].default

    info = opts.data_labels[key]
    args = info.component_args() if callable(info.component_args) else info.component_args
    comp = setting_component_class(key)
    elem_id = f"setting_{key}"
    if info.refresh is not None:
        with FormRow():
            res = comp(label=info.label, value=fun(), elem_id=elem_id, **(args or {}))
            ui_common.create_refresh_button(res, info.refresh, info.component_args, f"refresh_{key}")
    else:
        res = comp(label=info.label, value=fun(), elem_id=elem_id, **(args or {}))
    return res
