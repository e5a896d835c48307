"""Mirrors modules/script_callbacks.py (1.10.1).

- Registration: `on_<name>(callback, *, name=None)` -> `add_callback` appends a
  `ScriptCallback(script=<registering file>, callback, name="<ext>/<file>/<category>[/name]")`
  (a numeric suffix keeps names unique).
- Order: `ordered_callbacks(category)` sorts (user priority `opts.prioritized_callbacks_<category>`;
  no metadata.ini ordering here) and caches the sorted list until the count changes.
- Dispatch: each `<name>_callback(...)` calls the callbacks in that order; an `Exception` from
  one is reported via `errors.report(..., exc_info=True)` and the next one still runs
  (`report_exception`). A `BaseException` (e.g. `InterruptedException`) propagates.
  `script_unloaded_callback` and `before_ui_callback` run in REVERSED order.
- Params objects with A1111's fields: `CFGDenoiserParams(x, image_cond, sigma, sampling_step,
  total_sampling_steps, text_cond, text_uncond, denoiser=None)`, `CFGDenoisedParams(x,
  sampling_step, total_sampling_steps, inner_model)`, `AfterCFGCallbackParams(x, sampling_step,
  total_sampling_steps)`, `ExtraNoiseParams`, `ImageSaveParams`, `BeforeTokenCounterParams`.
- `remove_callbacks_for_function(fn)` (from every list and every cached order),
  `remove_current_script_callbacks()`, `clear_callbacks()`.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from typing import Any

from modules import errors, extensions, shared


def report_exception(c, job):
    errors.report(f"Error executing callback {job} for {c.script}", exc_info=True)


class ImageSaveParams:
    def __init__(self, image, p, filename, pnginfo):
        self.image, self.p, self.filename, self.pnginfo = image, p, filename, pnginfo


class ExtraNoiseParams:
    def __init__(self, noise, x, xi):
        self.noise, self.x, self.xi = noise, x, xi


class CFGDenoiserParams:
    def __init__(self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond, denoiser=None):
        self.x = x
        self.image_cond = image_cond
        self.sigma = sigma
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps
        self.text_cond = text_cond
        self.text_uncond = text_uncond
        self.denoiser = denoiser


class CFGDenoisedParams:
    def __init__(self, x, sampling_step, total_sampling_steps, inner_model):
        self.x = x
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps
        self.inner_model = inner_model


class AfterCFGCallbackParams:
    def __init__(self, x, sampling_step, total_sampling_steps):
        self.x = x
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps


@dataclasses.dataclass
class BeforeTokenCounterParams:
    prompt: str
    steps: int
    styles: list
    is_positive: bool = True


@dataclasses.dataclass
class ScriptCallback:
    script: str
    callback: Any
    name: str = "unnamed"


def add_callback(callbacks, fun, *, name=None, category='unknown', filename=None):
    if filename is None:
        stack = [x for x in inspect.stack() if x.filename != __file__]
        filename = stack[0].filename if stack else 'unknown file'

    extension = extensions.find_extension(filename)
    extension_name = extension.canonical_name if extension else 'base'

    callback_name = f"{extension_name}/{os.path.basename(filename)}/{category}"
    if name is not None:
        callback_name += f'/{name}'

    unique = callback_name
    for index in range(1000):
        if not any(x.name == unique for x in callbacks):
            break
        unique = f'{callback_name}-{index + 1}'

    callbacks.append(ScriptCallback(filename, fun, unique))


def sort_callbacks(category, unordered_callbacks, *, enable_user_sort=True):
    callbacks = unordered_callbacks.copy()
    if enable_user_sort:
        for name in reversed(getattr(shared.opts, 'prioritized_callbacks_' + category, [])):
            index = next((i for i, c in enumerate(callbacks) if c.name == name), None)
            if index is not None:
                callbacks.insert(0, callbacks.pop(index))
    return callbacks


def ordered_callbacks(category, unordered_callbacks=None, *, enable_user_sort=True):
    if unordered_callbacks is None:
        unordered_callbacks = callback_map.get('callbacks_' + category, [])
    if not enable_user_sort:
        return sort_callbacks(category, unordered_callbacks, enable_user_sort=False)
    callbacks = ordered_callbacks_map.get(category)
    if callbacks is not None and len(callbacks) == len(unordered_callbacks):
        return callbacks
    callbacks = sort_callbacks(category, unordered_callbacks)
    ordered_callbacks_map[category] = callbacks
    return callbacks


def enumerate_callbacks():
    for category, callbacks in callback_map.items():
        yield (category[10:] if category.startswith('callbacks_') else category), callbacks


callback_map = dict(
    callbacks_app_started=[],
    callbacks_model_loaded=[],
    callbacks_ui_tabs=[],
    callbacks_ui_train_tabs=[],
    callbacks_ui_settings=[],
    callbacks_before_image_saved=[],
    callbacks_image_saved=[],
    callbacks_extra_noise=[],
    callbacks_cfg_denoiser=[],
    callbacks_cfg_denoised=[],
    callbacks_cfg_after_cfg=[],
    callbacks_before_component=[],
    callbacks_after_component=[],
    callbacks_image_grid=[],
    callbacks_infotext_pasted=[],
    callbacks_script_unloaded=[],
    callbacks_before_ui=[],
    callbacks_on_reload=[],
    callbacks_list_optimizers=[],
    callbacks_list_unets=[],
    callbacks_before_token_counter=[],
)

ordered_callbacks_map = {}


def clear_callbacks():
    for callback_list in callback_map.values():
        callback_list.clear()
    ordered_callbacks_map.clear()


def _run_each(category, job, *args, reverse=False, **kwargs):
    callbacks = ordered_callbacks(category)
    for c in (reversed(callbacks) if reverse else callbacks):
        try:
            c.callback(*args, **kwargs)
        except Exception:
            report_exception(c, job)


def app_started_callback(demo, app):
    _run_each('app_started', 'app_started_callback', demo, app)


def app_reload_callback():
    _run_each('on_reload', 'callbacks_on_reload')


def model_loaded_callback(sd_model):
    _run_each('model_loaded', 'model_loaded_callback', sd_model)


def ui_tabs_callback():
    res = []
    for c in ordered_callbacks('ui_tabs'):
        try:
            res += c.callback() or []
        except Exception:
            report_exception(c, 'ui_tabs_callback')
    return res


def ui_settings_callback():
    _run_each('ui_settings', 'ui_settings_callback')


def before_image_saved_callback(params: ImageSaveParams):
    _run_each('before_image_saved', 'before_image_saved_callback', params)


def image_saved_callback(params: ImageSaveParams):
    _run_each('image_saved', 'image_saved_callback', params)


def extra_noise_callback(params: ExtraNoiseParams):
    _run_each('extra_noise', 'callbacks_extra_noise', params)


def cfg_denoiser_callback(params: CFGDenoiserParams):
    _run_each('cfg_denoiser', 'cfg_denoiser_callback', params)


def cfg_denoised_callback(params: CFGDenoisedParams):
    _run_each('cfg_denoised', 'cfg_denoised_callback', params)


def cfg_after_cfg_callback(params: AfterCFGCallbackParams):
    _run_each('cfg_after_cfg', 'cfg_after_cfg_callback', params)


def before_component_callback(component, **kwargs):
    _run_each('before_component', 'before_component_callback', component, **kwargs)


def after_component_callback(component, **kwargs):
    _run_each('after_component', 'after_component_callback', component, **kwargs)


def image_grid_callback(params):
    _run_each('image_grid', 'image_grid', params)


def infotext_pasted_callback(infotext: str, params: dict[str, Any]):
    _run_each('infotext_pasted', 'infotext_pasted', infotext, params)


def script_unloaded_callback():
    _run_each('script_unloaded', 'script_unloaded', reverse=True)


def before_ui_callback():
    _run_each('before_ui', 'before_ui', reverse=True)


def list_optimizers_callback():
    res = []
    _run_each('list_optimizers', 'list_optimizers', res)
    return res


def list_unets_callback():
    res = []
    _run_each('list_unets', 'list_unets', res)
    return res


def before_token_counter_callback(params: BeforeTokenCounterParams):
    _run_each('before_token_counter', 'before_token_counter', params)


def remove_current_script_callbacks():
    stack = [x for x in inspect.stack() if x.filename != __file__]
    filename = stack[0].filename if stack else 'unknown file'
    if filename == 'unknown file':
        return
    for callback_list in [*callback_map.values(), *ordered_callbacks_map.values()]:
        for cb in [cb for cb in callback_list if cb.script == filename]:
            callback_list.remove(cb)


def remove_callbacks_for_function(callback_func):
    for callback_list in [*callback_map.values(), *ordered_callbacks_map.values()]:
        for cb in [cb for cb in callback_list if cb.callback == callback_func]:
            callback_list.remove(cb)


def _register(category):
    def on(callback, *, name=None):
        add_callback(callback_map['callbacks_' + category], callback, name=name, category=category)
    on.__name__ = f"on_{category}"
    return on


on_app_started = _register('app_started')            # callback(demo: gr.Blocks | None, app: FastAPI)
on_before_reload = _register('on_reload')
on_model_loaded = _register('model_loaded')          # callback(sd_model)
on_ui_tabs = _register('ui_tabs')
on_ui_train_tabs = _register('ui_train_tabs')
on_ui_settings = _register('ui_settings')            # callback()
on_before_image_saved = _register('before_image_saved')
on_image_saved = _register('image_saved')
on_extra_noise = _register('extra_noise')
on_cfg_denoiser = _register('cfg_denoiser')          # callback(CFGDenoiserParams)
on_cfg_denoised = _register('cfg_denoised')          # callback(CFGDenoisedParams)
on_cfg_after_cfg = _register('cfg_after_cfg')        # callback(AfterCFGCallbackParams)
on_before_component = _register('before_component')
on_after_component = _register('after_component')
on_image_grid = _register('image_grid')
on_infotext_pasted = _register('infotext_pasted')    # callback(infotext: str, params: dict)
on_script_unloaded = _register('script_unloaded')    # callback()
on_before_ui = _register('before_ui')                # callback()
on_list_optimizers = _register('list_optimizers')
on_list_unets = _register('list_unets')
on_before_token_counter = _register('before_token_counter')
