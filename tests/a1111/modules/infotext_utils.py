"""Mirrors modules/infotext_utils.py (1.10.1; also registered as modules.generation_parameters_copypaste).

- `PasteField(component, target, *, api=None)`: a (component, target) tuple with `.component`,
  `.label` (target if str), `.function` (target if callable), `.api`.
- `quote(text)`: unchanged unless str(text) has ',', '\\n' or ':'; then json.dumps(ensure_ascii=False).
  `unquote(text)`: json.loads of a "..." value (unchanged if that fails).
- `re_param_code` (the real regex), `re_imagesize`; `parse_generation_parameters(x, skip_fields)`:
  the last line is parameters only with >= 3 matches; "NxM" values split into "<Key>-1"/"<Key>-2";
  all values strings; the built-in defaults injected ("Clip skip": "1", "Hires sampler": "Use same
  sampler", "Schedule type": "Automatic", "RNG": "GPU", ...); `opts.infotext_skip_pasting` removed.
  (Styles are not extracted: the stand-in has no styles; infotext_versions.backcompat is not run.)
- `paste_fields`, `add_paste_fields(tabname, init_img, fields, override_settings_component)`
  (tuples become PasteField), `get_override_settings`, `create_override_settings_dict`.
- `paste(params, paste_fields)`: what `connect_paste.paste_func` returns for already parsed
  params, one entry per field: callable target -> its result (an exception is reported and the
  field left unchanged); key -> params.get(key); None -> `gr.update()` (unchanged); a dict
  (a gradio update) is passed through; else converted by type(component.value): bool ->
  False iff the string is "False" else bool(v); int -> float(v); other -> type(v); a failing
  conversion (e.g. component value None) -> `gr.update()`. Each converted value is returned as
  `gr.update(value=...)`.
- `paste_infotext(infotext, paste_fields)`: parse, `infotext_pasted_callback`, then `paste`.
"""

from __future__ import annotations

import json
import re
import sys

import gradio as gr

from modules import errors, prompt_parser, script_callbacks, shared

sys.modules['modules.generation_parameters_copypaste'] = sys.modules[__name__]

re_param_code = r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)'
re_param = re.compile(re_param_code)
re_imagesize = re.compile(r"^(\d+)x(\d+)$")
type_of_gr_update = type(gr.update())


class PasteField(tuple):
    def __new__(cls, component, target, *, api=None):
        return super().__new__(cls, (component, target))

    def __init__(self, component, target, *, api=None):
        super().__init__()
        self.api = api
        self.component = component
        self.label = target if isinstance(target, str) else None
        self.function = target if callable(target) else None


paste_fields: dict[str, dict] = {}


def reset():
    paste_fields.clear()


def quote(text):
    if ',' not in str(text) and '\n' not in str(text) and ':' not in str(text):
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text):
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:
        return text


def add_paste_fields(tabname, init_img, fields, override_settings_component=None):
    if fields:
        for i in range(len(fields)):
            if not isinstance(fields[i], PasteField):
                fields[i] = PasteField(*fields[i])
    paste_fields[tabname] = {"init_img": init_img, "fields": fields, "override_settings_component": override_settings_component}


def restore_old_hires_fix_params(res):
    firstpass_width = res.get('First pass size-1', None)
    firstpass_height = res.get('First pass size-2', None)
    if shared.opts.use_old_hires_fix_width_height:
        hires_width = int(res.get("Hires resize-1", 0))
        hires_height = int(res.get("Hires resize-2", 0))
        if hires_width and hires_height:
            res['Size-1'] = hires_width
            res['Size-2'] = hires_height
            return
    if firstpass_width is None or firstpass_height is None:
        return
    firstpass_width, firstpass_height = int(firstpass_width), int(firstpass_height)
    width = int(res.get("Size-1", 512))
    height = int(res.get("Size-2", 512))
    if firstpass_width == 0 or firstpass_height == 0:
        from modules import processing
        firstpass_width, firstpass_height = processing.old_hires_fix_first_pass_dimensions(width, height)
    res['Size-1'] = firstpass_width
    res['Size-2'] = firstpass_height
    res['Hires resize-1'] = width
    res['Hires resize-2'] = height


_DEFAULTS = [
    ("Hires sampler", "Use same sampler"), ("Hires schedule type", "Use same scheduler"),
    ("Hires checkpoint", "Use same checkpoint"), ("Hires prompt", ""), ("Hires negative prompt", ""),
    ("Mask mode", "Inpaint masked"), ("Masked content", 'original'), ("Inpaint area", "Whole picture"),
    ("Masked area padding", 32),
]
_DEFAULTS_AFTER_HIRES = [
    ("RNG", "GPU"), ("Schedule type", "Automatic"), ("Schedule max sigma", 0), ("Schedule min sigma", 0),
    ("Schedule rho", 0), ("VAE Encoder", "Full"), ("VAE Decoder", "Full"), ("FP8 weight", "Disable"),
]


def parse_generation_parameters(x: str, skip_fields: list[str] | None = None):
    if skip_fields is None:
        skip_fields = shared.opts.infotext_skip_pasting

    res = {}
    prompt = ""
    negative_prompt = ""
    done_with_prompt = False

    *lines, lastline = x.strip().split("\n")
    if len(re_param.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ''

    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative_prompt += ("" if negative_prompt == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line

    for k, v in re_param.findall(lastline):
        try:
            if v[0] == '"' and v[-1] == '"':
                v = unquote(v)
            m = re_imagesize.match(v)
            if m is not None:
                res[f"{k}-1"] = m.group(1)
                res[f"{k}-2"] = m.group(2)
            else:
                res[k] = v
        except Exception:
            print(f"Error parsing \"{k}: {v}\"")

    res["Prompt"] = prompt
    res["Negative prompt"] = negative_prompt

    if "Clip skip" not in res:
        res["Clip skip"] = "1"

    hypernet = res.get("Hypernet", None)
    if hypernet is not None:
        res["Prompt"] += f"""<hypernet:{hypernet}:{res.get("Hypernet strength", "1.0")}>"""

    if "Hires resize-1" not in res:
        res["Hires resize-1"] = 0
        res["Hires resize-2"] = 0

    for key, default in _DEFAULTS:
        res.setdefault(key, default)

    restore_old_hires_fix_params(res)

    for key, default in _DEFAULTS_AFTER_HIRES:
        res.setdefault(key, default)

    if "Cache FP16 weight for LoRA" not in res and res["FP8 weight"] != "Disable":
        res["Cache FP16 weight for LoRA"] = False

    prompt_attention = prompt_parser.parse_prompt_attention(prompt) + prompt_parser.parse_prompt_attention(negative_prompt)
    prompt_uses_emphasis = len(prompt_attention) != len([p for p in prompt_attention if p[1] == 1.0 or p[0] == 'BREAK'])
    if "Emphasis" not in res and prompt_uses_emphasis:
        res["Emphasis"] = "Original"

    if "Refiner switch by sampling steps" not in res:
        res["Refiner switch by sampling steps"] = False

    for key in skip_fields:
        res.pop(key, None)

    return res


infotext_to_setting_name_mapping = []


def create_override_settings_dict(text_pairs):
    res = {}
    params = {}
    for pair in text_pairs:
        k, v = pair.split(":", maxsplit=1)
        params[k] = v.strip()
    mapping = [(info.infotext, k) for k, info in shared.opts.data_labels.items() if info.infotext]
    for param_name, setting_name in mapping + infotext_to_setting_name_mapping:
        value = params.get(param_name, None)
        if value is None:
            continue
        res[setting_name] = shared.opts.cast_value(setting_name, value)
    return res


def get_override_settings(params, *, skip_fields=None):
    res = []
    mapping = [(info.infotext, k) for k, info in shared.opts.data_labels.items() if info.infotext]
    for param_name, setting_name in mapping + infotext_to_setting_name_mapping:
        if param_name in (skip_fields or {}):
            continue
        v = params.get(param_name, None)
        if v is None:
            continue
        if setting_name == "sd_model_checkpoint" and shared.opts.disable_weights_auto_swap:
            continue
        v = shared.opts.cast_value(setting_name, v)
        current_value = getattr(shared.opts, setting_name, None)
        if v == current_value:
            continue
        res.append((param_name, setting_name, v))
    return res


def paste(params: dict, fields) -> list:
    res = []
    for output, key in fields:
        if callable(key):
            try:
                v = key(params)
            except Exception:
                errors.report(f"Error executing {key}", exc_info=True)
                v = None
        else:
            v = params.get(key, None)

        if v is None:
            res.append(gr.update())
        elif isinstance(v, type_of_gr_update):
            res.append(v)
        else:
            try:
                valtype = type(output.value)
                if valtype == bool and v == "False":
                    val = False
                elif valtype == int:
                    val = float(v)
                else:
                    val = valtype(v)
                res.append(gr.update(value=val))
            except Exception:
                res.append(gr.update())
    return res


def paste_infotext(infotext: str, fields) -> tuple[dict, list]:
    """The UI paste button on `infotext`: (parsed params after the callbacks, one update per field)."""
    params = parse_generation_parameters(infotext)
    script_callbacks.infotext_pasted_callback(infotext, params)
    return params, paste(params, fields)
