"""Mirrors modules/paths_internal.py: data_path (--data-dir), models_path (--models-dir or
<data_path>/models), script_path. Here all three come from the fixture's temporary folder."""

import os

import _standin_support as _support

script_path = _support.config.data_path
data_path = _support.config.data_path
models_path = _support.config.models_path or os.path.join(data_path, "models")
extensions_dir = os.path.join(data_path, "extensions")
extensions_builtin_dir = os.path.join(script_path, "extensions-builtin")
sd_configs_path = os.path.join(script_path, "configs")
sd_default_config = os.path.join(sd_configs_path, "v1-inference.yaml")
sd_model_file = os.path.join(script_path, "model.ckpt")
default_sd_model_file = sd_model_file
