"""Mirrors modules/api/api.py (1.10.1), the parts an extension meets:

- `Api(app, queue_lock)`: reads `cmd_opts.api_auth` ("user:pass,user2:pass2") into
  `credentials`; `add_api_route(path, endpoint, **kwargs)` adds `dependencies=[Depends(self.auth)]`
  only when --api-auth is set; `auth(credentials)` raises HTTPException(401).
  (The built-in /sdapi routes are not registered.)
- `script_name_to_index(name, scripts)` (title().lower(), HTTP 422 "Script '<name>' not found").
- `init_default_script_args(runner)`: list of length max(args_to), [0] = 0, each script's slice
  from a fresh `script.ui()` inside a throwaway `gr.Blocks()` (ui() runs again, twice).
- `init_script_args(request, defaults, selectable_scripts, selectable_idx, runner,
  input_script_args=None)`: `alwayson_scripts[title]["args"]` copied positionally
  (min(len(args), args_to - args_from)); unknown title -> 422; selectable -> 422; a dict
  "args" raises KeyError as in A1111 (HTTP 500 there).
- `apply_infotext(request, tabname, script_runner, mentioned_script_args)`: the request field
  `infotext` -> script args through the tab's paste fields, `type(component.value)(value)` with
  no bool special case and no try/except (as A1111).
- `txt2img(request)`: the order of `text2imgapi` for scripts (infotext args, defaults,
  alwayson args, `p.is_api = True`, `p.scripts`, `p.script_args = tuple(...)` -> setup,
  `process_images` under `queue_lock`, `state.begin/end`).
"""

from __future__ import annotations

from secrets import compare_digest
from types import SimpleNamespace

import gradio as gr
from fastapi import Depends, HTTPException
from fastapi.security import HTTPBasicCredentials

from modules import infotext_utils, scripts, shared


def script_name_to_index(name, scripts_list):
    try:
        return [script.title().lower() for script in scripts_list].index(name.lower())
    except Exception as e:
        raise HTTPException(status_code=422, detail=f"Script '{name}' not found") from e


class Api:
    def __init__(self, app, queue_lock):
        if shared.cmd_opts.api_auth:
            self.credentials = {}
            for auth in shared.cmd_opts.api_auth.split(","):
                user, password = auth.split(":")
                self.credentials[user] = password
        self.app = app
        self.queue_lock = queue_lock
        self.default_script_arg_txt2img = []
        self.default_script_arg_img2img = []
        if scripts.scripts_txt2img is not None and scripts.scripts_txt2img.scripts:
            self.default_script_arg_txt2img = self.init_default_script_args(scripts.scripts_txt2img)
        if scripts.scripts_img2img is not None and scripts.scripts_img2img.scripts:
            self.default_script_arg_img2img = self.init_default_script_args(scripts.scripts_img2img)

    def add_api_route(self, path: str, endpoint, **kwargs):
        if shared.cmd_opts.api_auth:
            return self.app.add_api_route(path, endpoint, dependencies=[Depends(self.auth)], **kwargs)
        return self.app.add_api_route(path, endpoint, **kwargs)

    def auth(self, credentials: HTTPBasicCredentials):
        if credentials.username in self.credentials:
            if compare_digest(credentials.password, self.credentials[credentials.username]):
                return True
        raise HTTPException(status_code=401, detail="Incorrect username or password", headers={"WWW-Authenticate": "Basic"})

    def get_selectable_script(self, script_name, script_runner):
        if script_name is None or script_name == "":
            return None, None
        script_idx = script_name_to_index(script_name, script_runner.selectable_scripts)
        return script_runner.selectable_scripts[script_idx], script_idx

    def get_script(self, script_name, script_runner):
        if script_name is None or script_name == "":
            return None, None
        return script_runner.scripts[script_name_to_index(script_name, script_runner.scripts)]

    def init_default_script_args(self, script_runner):
        last_arg_index = 1
        for script in script_runner.scripts:
            if last_arg_index < script.args_to:
                last_arg_index = script.args_to
        script_args = [None] * last_arg_index
        script_args[0] = 0
        with gr.Blocks():
            for script in script_runner.scripts:
                if script.ui(script.is_img2img):
                    script_args[script.args_from:script.args_to] = [elem.value for elem in script.ui(script.is_img2img)]
        return script_args

    def init_script_args(self, request, default_script_args, selectable_scripts, selectable_idx, script_runner, *,
                         input_script_args=None):
        script_args = default_script_args.copy()
        if input_script_args is not None:
            for index, value in input_script_args.items():
                script_args[index] = value
        if selectable_scripts:
            script_args[selectable_scripts.args_from:selectable_scripts.args_to] = request.script_args
            script_args[0] = selectable_idx + 1
        if request.alwayson_scripts:
            for name in request.alwayson_scripts.keys():
                alwayson_script = self.get_script(name, script_runner)
                if alwayson_script is None:
                    raise HTTPException(status_code=422, detail=f"always on script {name} not found")
                if alwayson_script.alwayson is False:
                    raise HTTPException(status_code=422, detail="Cannot have a selectable script in the always on scripts params")
                if "args" in request.alwayson_scripts[name]:
                    args = request.alwayson_scripts[name]["args"]
                    for idx in range(0, min((alwayson_script.args_to - alwayson_script.args_from), len(args))):
                        script_args[alwayson_script.args_from + idx] = args[idx]
        return script_args

    def apply_infotext(self, request, tabname, *, script_runner=None, mentioned_script_args=None):
        if not getattr(request, "infotext", None):
            return {}
        possible_fields = infotext_utils.paste_fields[tabname]["fields"]
        params = infotext_utils.parse_generation_parameters(request.infotext)

        def get_field_value(field, params):
            value = field.function(params) if field.function else params.get(field.label)
            if value is None:
                return None
            target_type = type(field.component.value)
            if target_type == type(None):
                return None
            if isinstance(value, dict) and value.get('__type__') == 'generic_update':
                value = value.get('value')
            if value is not None and not isinstance(value, target_type):
                value = target_type(value)
            return value

        if script_runner is not None and mentioned_script_args is not None:
            indexes = {id(v): i for i, v in enumerate(script_runner.inputs)}
            for field in possible_fields:
                if id(field.component) not in indexes:
                    continue
                value = get_field_value(field, params)
                if value is not None:
                    mentioned_script_args[indexes[id(field.component)]] = value
        return params

    def txt2img(self, request: dict):
        """Run a txt2img API request given as a dict of `StableDiffusionTxt2ImgProcessingAPI`
        fields (prompt, steps, ..., alwayson_scripts, script_name, script_args, infotext)."""
        from modules.processing import StableDiffusionProcessingTxt2Img, process_images

        req = SimpleNamespace(script_name=None, script_args=[], alwayson_scripts={}, infotext=None)
        req.__dict__.update(request)
        runner = scripts.scripts_txt2img
        infotext_script_args = {}
        self.apply_infotext(req, "txt2img", script_runner=runner, mentioned_script_args=infotext_script_args)
        selectable, selectable_idx = self.get_selectable_script(req.script_name, runner)
        args = {k: v for k, v in vars(req).items()
                if k not in ("script_name", "script_args", "alwayson_scripts", "infotext", "send_images", "save_images")}
        script_args = self.init_script_args(req, self.default_script_arg_txt2img, selectable, selectable_idx, runner,
                                            input_script_args=infotext_script_args)
        with self.queue_lock:
            p = StableDiffusionProcessingTxt2Img(sd_model=shared.sd_model, **args)
            p.is_api = True
            p.scripts = runner
            p.script_args = tuple(script_args)
            shared.state.begin(job="scripts_txt2img")
            try:
                processed = runner.run(p, *p.script_args) if selectable is not None else None
                if processed is None:
                    processed = process_images(p)
            finally:
                shared.state.end()
        return processed
