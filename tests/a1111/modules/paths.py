"""Mirrors modules/paths.py: re-exports the paths of paths_internal."""

from modules.paths_internal import data_path, models_path, script_path, extensions_dir, extensions_builtin_dir  # noqa: F401
