"""Where this package keeps files between runs: `$XDG_CACHE_HOME/sd-webui-delta-sampling/...`
(default `~/.cache/...`), or the path an environment variable names."""

from __future__ import annotations

import os
from pathlib import Path


def user_cache_path(env_var: str, name: str) -> Path:
    """`$env_var` when set, else the cache folder's `name`."""
    override = os.environ.get(env_var)
    if override:
        return Path(override).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "sd-webui-delta-sampling" / name
