"""Mirrors modules/shared.py (+ the objects modules/shared_init.py puts there): `cmd_opts`,
`opts` (Options over `options_templates`), `state`, `sd_model` (A1111 makes it a lazy property
that loads the selected checkpoint; here a plain settable attribute, None until a model is
loaded by `sd_models.reload_model_weights`/`load_model` or set by a test), `OptionInfo`,
`options_section`, `latent_upscale_modes`, `sd_upscalers`, `device`, `prompt_styles` (no
styles), `total_tqdm`, `list_checkpoint_tiles`, `refresh_checkpoints`, `hf_endpoint`."""

import os

from modules import options, shared_options
from modules.paths_internal import models_path, script_path, data_path, sd_default_config, sd_model_file, default_sd_model_file, extensions_dir, extensions_builtin_dir  # noqa: F401
from modules.shared_cmd_options import cmd_opts
from modules.shared_state import State

batch_cond_uncond = True
parallel_processing_allowed = True
config_filename = cmd_opts.ui_settings_file
hide_dirs = {"visible": not cmd_opts.hide_ui_dir_config}
demo = None
device = "cpu"

options_templates = shared_options.options_templates
restricted_opts = shared_options.restricted_opts
opts = options.Options(options_templates, restricted_opts)
state = State()
sd_model = None
settings_components = {}
tab_names = []

OptionInfo = options.OptionInfo
OptionHTML = options.OptionHTML
options_section = options.options_section

latent_upscale_default_mode = "Latent"
latent_upscale_modes = {
    "Latent": {"mode": "bilinear", "antialias": False},
    "Latent (antialiased)": {"mode": "bilinear", "antialias": True},
    "Latent (bicubic)": {"mode": "bicubic", "antialias": False},
    "Latent (bicubic antialiased)": {"mode": "bicubic", "antialias": True},
    "Latent (nearest)": {"mode": "nearest", "antialias": False},
    "Latent (nearest-exact)": {"mode": "nearest-exact", "antialias": False},
}
sd_upscalers = []
face_restorers = []
hf_endpoint = os.getenv('HF_ENDPOINT', 'https://huggingface.co')


class _NoStyles:
    """modules/styles.py StyleDatabase with no styles: prompts pass through."""
    styles = {}

    def apply_styles_to_prompt(self, prompt, styles):
        return prompt

    def apply_negative_styles_to_prompt(self, prompt, styles):
        return prompt

    def extract_styles_from_prompt(self, prompt, negative_prompt):
        return [], prompt, negative_prompt


prompt_styles = _NoStyles()


class _TotalTQDM:
    def update(self):
        pass

    def updateTotal(self, new_total):  # noqa: N802 (A1111's name)
        pass

    def clear(self):
        pass


total_tqdm = _TotalTQDM()


def list_checkpoint_tiles(use_short=False):
    import modules.sd_models
    return modules.sd_models.checkpoint_tiles(use_short)


def refresh_checkpoints():
    import modules.sd_models
    return modules.sd_models.list_models()
