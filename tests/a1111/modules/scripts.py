"""Mirrors modules/scripts.py (1.10.1).

- `Script`: every hook of 1.10.1 with its signature (`setup`, `before_process`, `process`,
  `before_process_batch`, `after_extra_networks_activate`, `process_before_every_sampling`,
  `process_batch`, `postprocess_batch`, `postprocess_batch_list`, `on_mask_blend`, `post_sample`,
  `postprocess_image`, `postprocess_maskoverlay`, `postprocess_image_after_composite`,
  `postprocess`, `before_hr`, `before_component`, `after_component`), attributes (`section`,
  `create_group`, `infotext_fields`, `paste_field_names`, `args_from/args_to`, `is_txt2img`,
  `is_img2img`, `tabname`, `alwayson`, `controls`, `api_info`) and `elem_id()` with the real formula.
- `AlwaysVisible`, `MaskBlendArgs`, `PostSampleArgs`, `PostprocessImageArgs`,
  `PostProcessMaskOverlayArgs`, `PostprocessBatchListArgs`, `ScriptClassData`, `scripts_data`,
  `basedir()`, `load_scripts(paths)` (load order and sys.path handling of `load_scripts`).
- `ScriptRunner`: `initialize_scripts` (one new instance per tab), `create_script_ui` (arg
  slicing from `len(inputs)`; `inputs` starts as [None]), `setup_ui_for_section`, `setup_ui`,
  hooks dispatched only to scripts overriding the method (`ordered_scripts`, cached per method),
  each call in try/except Exception -> `errors.report`, `set_named_arg`, `script(title)`, `run`.
"""

from __future__ import annotations

import inspect
import os
import re
import sys
from collections import namedtuple

import gradio as gr

from modules import errors, paths, script_callbacks, script_loading

AlwaysVisible = object()

# modules/shared_items.py: the default order of the txt2img/img2img UI categories
ui_reorder_categories_builtin_items = ["prompt", "image", "inpaint", "sampler", "accordions", "checkboxes",
                                       "dimensions", "cfg", "denoising", "seed", "batch", "override_settings"]


class MaskBlendArgs:
    def __init__(self, current_latent, nmask, init_latent, mask, blended_latent, denoiser=None, sigma=None):
        self.current_latent = current_latent
        self.nmask = nmask
        self.init_latent = init_latent
        self.mask = mask
        self.blended_latent = blended_latent
        self.denoiser = denoiser
        self.is_final_blend = denoiser is None
        self.sigma = sigma


class PostSampleArgs:
    def __init__(self, samples):
        self.samples = samples


class PostprocessImageArgs:
    def __init__(self, image):
        self.image = image


class PostProcessMaskOverlayArgs:
    def __init__(self, index, mask_for_overlay, overlay_image):
        self.index, self.mask_for_overlay, self.overlay_image = index, mask_for_overlay, overlay_image


class PostprocessBatchListArgs:
    def __init__(self, images):
        self.images = images


class Script:
    name = None
    section = None
    filename = None
    args_from = None
    args_to = None
    alwayson = False
    is_txt2img = False
    is_img2img = False
    tabname = None
    group = None
    create_group = True
    infotext_fields = None
    paste_field_names = None
    api_info = None
    on_before_component_elem_id = None
    on_after_component_elem_id = None
    setup_for_ui_only = False
    controls = None

    def title(self):
        raise NotImplementedError()

    def ui(self, is_img2img):
        pass

    def show(self, is_img2img):
        return True

    def run(self, p, *args):
        pass

    def setup(self, p, *args):
        pass

    def before_process(self, p, *args):
        pass

    def process(self, p, *args):
        pass

    def before_process_batch(self, p, *args, **kwargs):
        pass

    def after_extra_networks_activate(self, p, *args, **kwargs):
        pass

    def process_before_every_sampling(self, p, *args, **kwargs):
        pass

    def process_batch(self, p, *args, **kwargs):
        pass

    def postprocess_batch(self, p, *args, **kwargs):
        pass

    def postprocess_batch_list(self, p, pp: PostprocessBatchListArgs, *args, **kwargs):
        pass

    def on_mask_blend(self, p, mba: MaskBlendArgs, *args):
        pass

    def post_sample(self, p, ps: PostSampleArgs, *args):
        pass

    def postprocess_image(self, p, pp: PostprocessImageArgs, *args):
        pass

    def postprocess_maskoverlay(self, p, ppmo: PostProcessMaskOverlayArgs, *args):
        pass

    def postprocess_image_after_composite(self, p, pp: PostprocessImageArgs, *args):
        pass

    def postprocess(self, p, processed, *args):
        pass

    def before_component(self, component, **kwargs):
        pass

    def after_component(self, component, **kwargs):
        pass

    def on_before_component(self, callback, *, elem_id):
        if self.on_before_component_elem_id is None:
            self.on_before_component_elem_id = []
        self.on_before_component_elem_id.append((elem_id, callback))

    def on_after_component(self, callback, *, elem_id):
        if self.on_after_component_elem_id is None:
            self.on_after_component_elem_id = []
        self.on_after_component_elem_id.append((elem_id, callback))

    def describe(self):
        return ""

    def elem_id(self, item_id):
        need_tabname = self.show(True) == self.show(False)
        tabkind = 'img2img' if self.is_img2img else 'txt2img'
        tabname = f"{tabkind}_" if need_tabname else ""
        title = re.sub(r'[^a-z_0-9]', '', re.sub(r'\s', '_', self.title().lower()))
        return f'script_{tabname}{title}_{item_id}'

    def before_hr(self, p, *args):
        pass


current_basedir = paths.script_path


def basedir():
    return current_basedir


ScriptFile = namedtuple("ScriptFile", ["basedir", "filename", "path"])
ScriptClassData = namedtuple("ScriptClassData", ["script_class", "path", "basedir", "module"])

scripts_data: list[ScriptClassData] = []


def load_scripts(script_files: list[ScriptFile]):
    """`load_scripts` for an explicit, already ordered list (root scripts first, then extensions):
    clears `scripts_data` and every callback, executes each file with its basedir in front of
    sys.path and as `basedir()`, registers every `Script` subclass found, and creates the two
    runners. A failing file is reported and skipped."""
    global current_basedir, scripts_txt2img, scripts_img2img
    scripts_data.clear()
    script_callbacks.clear_callbacks()
    syspath = sys.path

    for scriptfile in script_files:
        try:
            if scriptfile.basedir != paths.script_path:
                sys.path = [scriptfile.basedir] + sys.path
            current_basedir = scriptfile.basedir
            module = script_loading.load_module(scriptfile.path)
            for script_class in module.__dict__.values():
                if inspect.isclass(script_class) and issubclass(script_class, Script):
                    scripts_data.append(ScriptClassData(script_class, scriptfile.path, scriptfile.basedir, module))
        except Exception:
            errors.report(f"Error loading script: {scriptfile.filename}", exc_info=True)
        finally:
            sys.path = syspath
            current_basedir = paths.script_path

    scripts_txt2img = ScriptRunner()
    scripts_img2img = ScriptRunner()


def wrap_call(func, filename, funcname, *args, default=None, **kwargs):
    try:
        return func(*args, **kwargs)
    except Exception:
        errors.report(f"Error calling: {filename}/{funcname}", exc_info=True)
    return default


class ScriptRunner:
    def __init__(self):
        self.scripts = []
        self.selectable_scripts = []
        self.alwayson_scripts = []
        self.titles = []
        self.title_map = {}
        self.infotext_fields = []
        self.paste_field_names = []
        self.inputs = [None]
        self.callback_map = {}
        self.on_before_component_elem_id = {}
        self.on_after_component_elem_id = {}

    def initialize_scripts(self, is_img2img):
        self.scripts.clear()
        self.alwayson_scripts.clear()
        self.selectable_scripts.clear()

        for script_data in scripts_data:
            try:
                script = script_data.script_class()
            except Exception:
                errors.report(f"Error # failed to initialize Script {script_data.module}: ", exc_info=True)
                continue

            script.filename = script_data.path
            script.is_txt2img = not is_img2img
            script.is_img2img = is_img2img
            script.tabname = "img2img" if is_img2img else "txt2img"

            visibility = script.show(script.is_img2img)
            if visibility == AlwaysVisible:
                self.scripts.append(script)
                self.alwayson_scripts.append(script)
                script.alwayson = True
            elif visibility:
                self.scripts.append(script)
                self.selectable_scripts.append(script)

        self.callback_map.clear()
        self.apply_on_before_component_callbacks()

    def apply_on_before_component_callbacks(self):
        for script in self.scripts:
            on_before = script.on_before_component_elem_id or []
            on_after = script.on_after_component_elem_id or []
            for elem_id, callback in on_before:
                self.on_before_component_elem_id.setdefault(elem_id, []).append((callback, script))
            for elem_id, callback in on_after:
                self.on_after_component_elem_id.setdefault(elem_id, []).append((callback, script))
            on_before.clear()
            on_after.clear()

    def create_script_ui(self, script):
        script.args_from = len(self.inputs)
        script.args_to = len(self.inputs)
        try:
            self.create_script_ui_inner(script)
        except Exception:
            errors.report(f"Error creating UI for {script.name}: ", exc_info=True)

    def create_script_ui_inner(self, script):
        import modules.api.models as api_models

        controls = wrap_call(script.ui, script.filename, "ui", script.is_img2img)
        script.controls = controls
        if controls is None:
            return

        script.name = wrap_call(script.title, script.filename, "title", default=script.filename).lower()

        api_args = []
        for control in controls:
            control.custom_script_source = os.path.basename(script.filename)
            arg_info = api_models.ScriptArg(label=control.label or "")
            for field in ("value", "minimum", "maximum", "step"):
                v = getattr(control, field, None)
                if v is not None:
                    setattr(arg_info, field, v)
            choices = getattr(control, 'choices', None)
            if choices is not None:
                arg_info.choices = [x[0] if isinstance(x, tuple) else x for x in choices]
            api_args.append(arg_info)

        script.api_info = api_models.ScriptInfo(name=script.name, is_img2img=script.is_img2img,
                                                is_alwayson=script.alwayson, args=api_args)

        if script.infotext_fields is not None:
            self.infotext_fields += script.infotext_fields
        if script.paste_field_names is not None:
            self.paste_field_names += script.paste_field_names

        self.inputs += controls
        script.args_to = len(self.inputs)

    def setup_ui_for_section(self, section, scriptlist=None):
        if scriptlist is None:
            scriptlist = self.alwayson_scripts
        for script in scriptlist:
            if script.alwayson and script.section != section:
                continue
            if script.create_group:
                with gr.Group(visible=script.alwayson) as group:
                    self.create_script_ui(script)
                script.group = group
            else:
                self.create_script_ui(script)

    def prepare_ui(self):
        self.inputs = [None]

    def setup_ui(self):
        """What modules/ui.py does for one tab after `prepare_ui()`: scripts with a section are
        built where `ordered_ui_categories()` puts it (built-in categories in their default order,
        then new sections, then "scripts"), then `setup_ui` proper: AlwaysOn scripts with section
        None, the Script dropdown as inputs[0], the selectable scripts."""
        all_titles = [wrap_call(s.title, s.filename, "title") or s.filename for s in self.scripts]
        self.title_map = {title.lower(): s for title, s in zip(all_titles, self.scripts)}
        self.titles = [wrap_call(s.title, s.filename, "title") or f"{s.filename} [error]" for s in self.selectable_scripts]

        present = dict.fromkeys(s.section for s in self.alwayson_scripts if s.section is not None)
        for section in [c for c in ui_reorder_categories_builtin_items if c in present] + \
                [c for c in present if c not in ui_reorder_categories_builtin_items]:
            self.setup_ui_for_section(section)
        self.setup_ui_for_section(None)

        dropdown = gr.Dropdown(label="Script", elem_id="script_list", choices=["None"] + self.titles, value="None", type="index")
        self.inputs[0] = dropdown

        self.setup_ui_for_section(None, self.selectable_scripts)

        def select_script(script_index):
            if script_index is None:
                script_index = 0
            selected = self.selectable_scripts[script_index - 1] if script_index > 0 else None
            return [gr.update(visible=selected == s) for s in self.selectable_scripts]

        dropdown.change(fn=select_script, inputs=[dropdown], outputs=[s.group for s in self.selectable_scripts])
        self.infotext_fields.append((dropdown, lambda x: gr.update(value=x.get('Script', 'None'))))
        self.apply_on_before_component_callbacks()
        return self.inputs

    def run(self, p, *args):
        script_index = args[0]
        if script_index == 0 or script_index is None:
            return None
        script = self.selectable_scripts[script_index - 1]
        if script is None:
            return None
        return script.run(p, *args[script.args_from:script.args_to])

    def list_scripts_for_method(self, method_name):
        if method_name in ('before_component', 'after_component'):
            return self.scripts
        return self.alwayson_scripts

    def create_ordered_callbacks_list(self, method_name, *, enable_user_sort=True):
        script_list = self.list_scripts_for_method(method_name)
        category = f'script_{method_name}'
        callbacks = []
        for script in script_list:
            if getattr(script.__class__, method_name, None) == getattr(Script, method_name, None):
                continue
            script_callbacks.add_callback(callbacks, script, category=category, name=script.__class__.__name__,
                                          filename=script.filename)
        return script_callbacks.sort_callbacks(category, callbacks, enable_user_sort=enable_user_sort)

    def ordered_callbacks(self, method_name, *, enable_user_sort=True):
        script_list = self.list_scripts_for_method(method_name)
        category = f'script_{method_name}'
        scripts_len, callbacks = self.callback_map.get(category, (-1, None))
        if callbacks is None or scripts_len != len(script_list):
            callbacks = self.create_ordered_callbacks_list(method_name, enable_user_sort=enable_user_sort)
            self.callback_map[category] = len(script_list), callbacks
        return callbacks

    def ordered_scripts(self, method_name):
        return [x.callback for x in self.ordered_callbacks(method_name)]

    def _dispatch(self, method_name, label, p, *pre, **kwargs):
        """Every runner hook of A1111: slice this script's args, call, report and go on."""
        for script in self.ordered_scripts(method_name):
            try:
                script_args = p.script_args[script.args_from:script.args_to]
                getattr(script, method_name)(p, *pre, *script_args, **kwargs)
            except Exception:
                errors.report(f"Error running {label}: {script.filename}", exc_info=True)

    def before_process(self, p):
        self._dispatch('before_process', 'before_process', p)

    def process(self, p):
        self._dispatch('process', 'process', p)

    def process_before_every_sampling(self, p, **kwargs):
        self._dispatch('process_before_every_sampling', 'process_before_every_sampling', p, **kwargs)

    def before_process_batch(self, p, **kwargs):
        self._dispatch('before_process_batch', 'before_process_batch', p, **kwargs)

    def after_extra_networks_activate(self, p, **kwargs):
        self._dispatch('after_extra_networks_activate', 'after_extra_networks_activate', p, **kwargs)

    def process_batch(self, p, **kwargs):
        self._dispatch('process_batch', 'process_batch', p, **kwargs)

    def postprocess(self, p, processed):
        self._dispatch('postprocess', 'postprocess', p, processed)

    def postprocess_batch(self, p, images, **kwargs):
        self._dispatch('postprocess_batch', 'postprocess_batch', p, images=images, **kwargs)

    def postprocess_batch_list(self, p, pp: PostprocessBatchListArgs, **kwargs):
        self._dispatch('postprocess_batch_list', 'postprocess_batch_list', p, pp, **kwargs)

    def post_sample(self, p, ps: PostSampleArgs):
        self._dispatch('post_sample', 'post_sample', p, ps)

    def on_mask_blend(self, p, mba: MaskBlendArgs):
        self._dispatch('on_mask_blend', 'post_sample', p, mba)   # [sic] A1111's label

    def postprocess_image(self, p, pp: PostprocessImageArgs):
        self._dispatch('postprocess_image', 'postprocess_image', p, pp)

    def postprocess_maskoverlay(self, p, ppmo: PostProcessMaskOverlayArgs):
        self._dispatch('postprocess_maskoverlay', 'postprocess_image', p, ppmo)   # [sic]

    def postprocess_image_after_composite(self, p, pp: PostprocessImageArgs):
        self._dispatch('postprocess_image_after_composite', 'postprocess_image_after_composite', p, pp)

    def before_hr(self, p):
        self._dispatch('before_hr', 'before_hr', p)

    def setup_scrips(self, p, *, is_ui=True):   # [sic] A1111's name
        for script in self.ordered_scripts('setup'):
            if not is_ui and script.setup_for_ui_only:
                continue
            try:
                script_args = p.script_args[script.args_from:script.args_to]
                script.setup(p, *script_args)
            except Exception:
                errors.report(f"Error running setup: {script.filename}", exc_info=True)

    def before_component(self, component, **kwargs):
        for callback, script in self.on_before_component_elem_id.get(kwargs.get("elem_id"), []):
            try:
                callback(OnComponent(component=component))
            except Exception:
                errors.report(f"Error running on_before_component: {script.filename}", exc_info=True)
        for script in self.ordered_scripts('before_component'):
            try:
                script.before_component(component, **kwargs)
            except Exception:
                errors.report(f"Error running before_component: {script.filename}", exc_info=True)

    def after_component(self, component, **kwargs):
        for callback, script in self.on_after_component_elem_id.get(component.elem_id, []):
            try:
                callback(OnComponent(component=component))
            except Exception:
                errors.report(f"Error running on_after_component: {script.filename}", exc_info=True)
        for script in self.ordered_scripts('after_component'):
            try:
                script.after_component(component, **kwargs)
            except Exception:
                errors.report(f"Error running after_component: {script.filename}", exc_info=True)

    def script(self, title):
        return self.title_map.get(title.lower())

    def set_named_arg(self, args, script_name, arg_elem_id, value, fuzzy=False):
        script = next((x for x in self.scripts if x.name == script_name), None)
        if script is None:
            raise RuntimeError(f"script {script_name} not found")
        for i, control in enumerate(script.controls):
            if arg_elem_id in control.elem_id if fuzzy else arg_elem_id == control.elem_id:
                index = script.args_from + i
                if isinstance(args, tuple):
                    return args[:index] + (value,) + args[index + 1:]
                if isinstance(args, list):
                    args[index] = value
                    return args
                raise RuntimeError(f"args is not a list or tuple, but {type(args)}")
        raise RuntimeError(f"arg_elem_id {arg_elem_id} not found in script {script_name}")


class OnComponent:
    def __init__(self, component):
        self.component = component


scripts_txt2img: ScriptRunner | None = None
scripts_img2img: ScriptRunner | None = None
scripts_current: ScriptRunner | None = None
