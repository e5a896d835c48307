"""Mirrors modules/shared_cmd_options.py + cmd_args.py: `cmd_opts` with the defaults of the
arguments extensions read (--ckpt-dir, --embeddings-dir <data>/embeddings, --lora-dir
<models>/Lora from extensions-builtin/Lora/preload.py, --api-auth, --no-hashing ...).
The fixture's `cmd_overrides` play the role of the command line."""

import os
import types

import _standin_support as _support
from modules.paths_internal import data_path, models_path, sd_model_file

cmd_opts = types.SimpleNamespace(
    data_dir=data_path,
    models_dir=None,
    ckpt=sd_model_file,
    ckpt_dir=None,
    vae_dir=None,
    embeddings_dir=os.path.join(data_path, "embeddings"),
    hypernetwork_dir=os.path.join(models_path, "hypernetworks"),
    lora_dir=os.path.join(models_path, "Lora"),
    lyco_dir_backcompat=os.path.join(models_path, "LyCORIS"),
    api=False,
    nowebui=False,
    api_auth=None,
    api_log=False,
    no_hashing=False,
    no_download_sd_model=True,
    no_prompt_history=True,
    freeze_settings=False,
    freeze_settings_in_sections=None,
    freeze_specific_settings=None,
    hide_ui_dir_config=False,
    ui_settings_file=os.path.join(data_path, "config.json"),
    lowvram=False,
    medvram=False,
    medvram_sdxl=False,
    disable_safe_unpickle=False,
    api_server_stop=False,
)
for _k, _v in _support.config.cmd_overrides.items():
    setattr(cmd_opts, _k, _v)
