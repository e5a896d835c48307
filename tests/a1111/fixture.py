"""The `a1111` pytest fixture: a fresh A1111 1.10.1 stand-in for one test.

Use it by importing the fixture into a test module:

    from a1111.fixture import a1111  # noqa: F401  (pytest finds the fixture by name)

    def test_my_script(a1111):
        a1111.add_checkpoint("target.safetensors", "sd1")
        a1111.load_scripts(a1111.repo / "scripts" / "delta_sampling.py")
        a1111.create_ui()                     # before_ui, ui_settings, both tabs' ui(), paste fields
        gen = a1111.txt2img({"Delta Sampling": [True, ...]}, prompt="a fox", steps=3)
        assert gen.processed.infotexts[0] ...
        assert not a1111.reports              # nothing was reported and swallowed

What it does: writes nothing to the repository; points the stand-in's data/models folders at
`tmp_path/webui` (`models/Stable-diffusion`, `models/Lora`, `embeddings`); puts tests/a1111
at the front of sys.path and imports `modules.*` / `gradio` / `fastapi` fresh (every
module-level registry - callbacks, opts, state, checkpoint list, paste fields, routes, xyz
axes - starts empty); applies A1111's gradio patches (`modules.gradio_extensons`). Afterwards
it removes every `modules*`, `gradio*`, `fastapi*`, `scripts*`, `network(s)` (Lora) and
`lib_deltasampling.webui*` entry from sys.modules and the sys.path entry, so no other test sees them.

Helpers: `add_checkpoint(name, family, seed=)`, `load_checkpoint(name)`, `load_scripts(*files,
lora=True)`, `create_ui()`, `start_app()` (then `api`, `app`, `call_route(...)`),
`script_args(tab, {title: args})`, `txt2img(alwayson, **p)` / `img2img(latent, alwayson, **p)`
-> Generation(p, processed), `reports`, `paste(infotext, tab)`, `xyz_grid()`, `networks()`,
and `a1111.<module>` for any `modules.<module>`. Paths: `root`, `ckpt_dir`, `lora_dir`,
`embeddings_dir`, `repo`.

Command-line options are plain attributes: e.g. `a1111.shared.cmd_opts.api_auth = "u:p"`
before `start_app()`.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any, NamedTuple

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PURGED = ("modules", "gradio", "fastapi", "scripts", "lib_deltasampling.webui", "network", "networks")


class Generation(NamedTuple):
    p: Any            # the StableDiffusionProcessing object after the run
    processed: Any    # what process_images returned


def _purge() -> None:
    for name in list(sys.modules):
        if any(name == root or name.startswith(root + ".") for root in PURGED):
            del sys.modules[name]
    package = sys.modules.get("lib_deltasampling")
    if package is not None and hasattr(package, "webui"):
        delattr(package, "webui")


class A1111:
    """Handle on the stand-in. `a1111.<name>` imports and returns `modules.<name>`
    (e.g. `a1111.shared.opts`, `a1111.script_callbacks`, `a1111.sd_models`)."""

    repo = REPO

    def __init__(self, root: Path, cmd_overrides: dict[str, Any] | None = None):
        self.root = root
        self.models_path = root / "models"
        self.ckpt_dir = self.models_path / "Stable-diffusion"
        self.lora_dir = self.models_path / "Lora"
        self.embeddings_dir = root / "embeddings"
        for d in (self.ckpt_dir, self.lora_dir, self.embeddings_dir):
            d.mkdir(parents=True, exist_ok=True)

        _purge()
        sys.path.insert(0, str(HERE))
        import _standin_support
        self._support = _standin_support
        self._saved_config = (_standin_support.config.data_path, _standin_support.config.models_path,
                              dict(_standin_support.config.cmd_overrides))
        _standin_support.config.data_path = str(root)
        _standin_support.config.models_path = str(self.models_path)
        _standin_support.config.cmd_overrides = dict(cmd_overrides or {})

        importlib.import_module("modules.shared")
        importlib.import_module("modules.gradio_extensons")   # A1111 imports it at startup
        self.demo = None
        self.app = None
        self.api = None

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return importlib.import_module(f"modules.{name}")

    # ------------------------------------------------------------------ models

    def add_checkpoint(self, name: str = "target.safetensors", family: str = "sd1", *, seed: int = 0) -> Path:
        """Put a tiny `family` checkpoint at models/Stable-diffusion/<name> (a link to a file
        written once per session by tests/factories.py) and rescan (`sd_models.list_models`)."""
        path = self.ckpt_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.symlink_to(self._support.checkpoint_file(family, seed))
        self.sd_models.list_models()
        return path

    def load_checkpoint(self, name: str):
        """Make `name` the loaded model (`shared.sd_model`) and the selected checkpoint."""
        info = self.sd_models.get_closet_checkpoint_match(name)
        assert info is not None, f"no checkpoint matches {name!r}: {list(self.sd_models.checkpoints_list)}"
        return self.sd_models.load_model(info)

    # ------------------------------------------------------------------ scripts, UI, app

    def load_scripts(self, *paths: str | Path, extension_dir: str | Path | None = None,
                     extension_name: str = "sd-webui-delta-sampling", lora: bool = True):
        """A1111's `load_scripts`: the root scripts (the X/Y/Z plot) first, then the built-in Lora
        extension (`lora=True`: its stand-in puts `network`/`networks` in sys.modules and lists
        models/Lora), then the given extension script files with the extension folder (default:
        this repository) on sys.path and as `scripts.basedir()`. Registers the extension so
        callback names read "<extension>/<file>/<category>" as in A1111."""
        ext_dir = Path(extension_dir) if extension_dir is not None else REPO
        extensions = self.extensions
        if not any(e.path == str(ext_dir) for e in extensions.extensions):
            extensions.extensions.append(extensions.Extension(extension_name, str(ext_dir)))
        scripts = self.scripts
        xyz = HERE / "builtin_scripts" / "xyz_grid.py"
        files = [scripts.ScriptFile(scripts.paths.script_path, xyz.name, str(xyz))]
        if lora:
            lora_dir = HERE / "lora_ext"
            if not any(e.path == str(lora_dir) for e in extensions.extensions):
                extensions.extensions.insert(0, extensions.Extension("Lora", str(lora_dir), is_builtin=True))
            files.append(scripts.ScriptFile(str(lora_dir), "lora_script.py", str(lora_dir / "lora_script.py")))
        files += [scripts.ScriptFile(str(ext_dir), Path(p).name, str(p)) for p in paths]
        scripts.load_scripts(files)
        return scripts

    def networks(self):
        """The Lora extension's `networks` module (after `load_scripts(lora=True)`), as
        extensions reach it: `sys.modules["networks"]`."""
        return sys.modules["networks"]

    def xyz_grid(self):
        """The X/Y/Z module exactly as extensions look it up."""
        return next(x.module for x in self.scripts.scripts_data if x.script_class.__module__ == "xyz_grid.py")

    def create_ui(self):
        """webui startup after load_scripts: before_ui callbacks, then `ui.create_ui`: paste
        fields reset, settings (`ui_settings` callbacks), txt2img scripts (initialize_scripts,
        prepare_ui, setup_ui, paste fields), img2img scripts (+ "inpaint" paste fields)."""
        import gradio as gr
        scripts, cb, iu = self.scripts, self.script_callbacks, self.infotext_utils
        cb.before_ui_callback()
        iu.reset()
        cb.ui_settings_callback()
        with gr.Blocks() as demo:
            for tab, is_img2img in (("txt2img", False), ("img2img", True)):
                runner = scripts.scripts_img2img if is_img2img else scripts.scripts_txt2img
                scripts.scripts_current = runner
                runner.initialize_scripts(is_img2img=is_img2img)
                with gr.Tab(tab, id=tab):
                    runner.prepare_ui()
                    runner.setup_ui()
                iu.add_paste_fields(tab, None, list(runner.infotext_fields))
                if is_img2img:
                    iu.add_paste_fields("inpaint", None, list(runner.infotext_fields))
        scripts.scripts_current = None
        self.shared.demo = self.demo = demo
        return demo

    def start_app(self):
        """webui(): `create_api(app)` (an `Api` on a recording FastAPI) then
        `app_started_callback(demo, app)`."""
        from fastapi import FastAPI
        app = FastAPI()
        self.api = self.import_("modules.api.api").Api(app, self.call_queue.queue_lock)
        self.script_callbacks.app_started_callback(self.demo, app)
        self.app = app
        return app

    def import_(self, name: str):
        return importlib.import_module(name)

    # ------------------------------------------------------------------ generation

    def script_args(self, tab: str = "txt2img", alwayson: dict[str, Any] | None = None) -> list:
        """The API's script args: every script's defaults from a fresh `ui()`, then
        `alwayson_scripts={title: {"args": [...]}}` given here as {title: [...]} (or the dict)."""
        runner = self.scripts.scripts_img2img if tab == "img2img" else self.scripts.scripts_txt2img
        api = self.api or self.import_("modules.api.api").Api(None, self.call_queue.queue_lock)
        defaults = api.init_default_script_args(runner)
        request = type("Request", (), {})()
        request.script_args = []
        request.alwayson_scripts = {k: (v if isinstance(v, dict) else {"args": v}) for k, v in (alwayson or {}).items()}
        return api.init_script_args(request, defaults, None, None, runner)

    def _run(self, p, tab: str, alwayson, script_args):
        runner = self.scripts.scripts_img2img if tab == "img2img" else self.scripts.scripts_txt2img
        if runner is not None:
            args = script_args if script_args is not None else self.script_args(tab, alwayson)
            p.scripts = runner
            p.script_args = tuple(args)
        state = self.shared.state
        state.begin(job=tab)
        try:
            processed = self.processing.process_images(p)
        finally:
            state.end()
        return Generation(p, processed)

    def txt2img(self, alwayson: dict[str, Any] | None = None, *, script_args: list | None = None, **kwargs) -> Generation:
        """A txt2img run through `process_images`, with the scripts of `load_scripts` (if any)
        and a small default size (64x64, 3 steps, Euler, seed 1, CFG 5)."""
        params = dict(prompt="a fox", negative_prompt="", width=64, height=64, steps=3, sampler_name="Euler",
                      seed=1, cfg_scale=5.0)
        params.update(kwargs)
        p = self.processing.StableDiffusionProcessingTxt2Img(**params)
        return self._run(p, "txt2img", alwayson, script_args)

    def img2img(self, init_latent, alwayson: dict[str, Any] | None = None, *, script_args: list | None = None,
                **kwargs) -> Generation:
        """An img2img run; `init_latent` is a latent [C, h, w] (or a list of them), `mask=` a
        latent-size [h, w] tensor with 1 where to inpaint."""
        init = init_latent if isinstance(init_latent, (list, tuple)) else [init_latent]
        params = dict(prompt="a fox", negative_prompt="", width=init[0].shape[-1] * 8, height=init[0].shape[-2] * 8,
                      steps=4, sampler_name="Euler", seed=1, cfg_scale=5.0, denoising_strength=0.5, init_images=list(init))
        params.update(kwargs)
        p = self.processing.StableDiffusionProcessingImg2Img(**params)
        return self._run(p, "img2img", alwayson, script_args)

    # ------------------------------------------------------------------ checks

    @property
    def reports(self) -> list:
        """Everything passed to `errors.report`/`errors.display` (reported and swallowed)."""
        return self.errors.reports

    def paste(self, infotext: str, tab: str = "txt2img") -> dict:
        """The paste button of `tab` on `infotext`: {component: gradio update} for every paste
        field (on_infotext_pasted callbacks run first)."""
        fields = self.infotext_utils.paste_fields[tab]["fields"]
        _, updates = self.infotext_utils.paste_infotext(infotext, fields)
        return {field[0]: update for field, update in zip(fields, updates)}

    def call_route(self, method: str, path: str, *, credentials=None, **params):
        """Run a route registered on the app (dependencies such as --api-auth first)."""
        return self.app.call(method, path, credentials=credentials, **params)

    def close(self) -> None:
        cfg = self._support.config
        cfg.data_path, cfg.models_path, cfg.cmd_overrides = self._saved_config
        _purge()
        while str(HERE) in sys.path:
            sys.path.remove(str(HERE))


@pytest.fixture
def a1111(tmp_path):
    handle = A1111(tmp_path / "webui")
    try:
        yield handle
    finally:
        handle.close()
