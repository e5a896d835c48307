"""Subspaces (the SVDs of conversion) kept on disk per (model file's sha256, weight, subspace rank),
so converting many LoRAs for one target computes each layer's SVD once.

    $XDG_CACHE_HOME/sd-webui-delta-sampling/svd/<sha256[:16]>/k<rank>/<weight key>.safetensors

(`~/.cache/...` by default; $DELTA_SAMPLING_SVD_CACHE names another folder.) Only the layers a LoRA
changes are stored: u [out, k] and v [in, k] in fp32, about 3 MB for an SDXL attention layer at
k = 320. Written atomically (a temporary file, then renamed); an unreadable entry is recomputed,
and a cache that cannot be written costs only the SVD next time.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable
from pathlib import Path

import torch

from ..runtime.cachedir import user_cache_path
from .prolora import Subspace

log = logging.getLogger("delta-sampling")
ENV_VAR = "DELTA_SAMPLING_SVD_CACHE"


def default_folder() -> Path:
    return user_cache_path(ENV_VAR, "svd")


class SubspaceCache:
    def __init__(self, folder: Path | str | None = None) -> None:
        self.folder = Path(folder) if folder is not None else default_folder()
        self.hits = self.misses = 0

    def _path(self, model_sha256: str, key: str, subspace_rank: int) -> Path:
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in key)
        return self.folder / model_sha256[:16] / f"k{subspace_rank}" / f"{safe}.safetensors"

    def get(self, model_sha256: str, key: str, subspace_rank: int, device: torch.device,
            compute: Callable[[], Subspace]) -> Subspace:
        """The cached subspace of weight `key` of that model, else `compute()` (and store it)."""
        from safetensors.torch import load_file, save_file

        path = self._path(model_sha256, key, subspace_rank)
        try:
            stored = load_file(str(path), device=str(device))
            self.hits += 1
            return Subspace(stored["u"], stored["v"])
        except FileNotFoundError:
            pass
        except Exception as exc:   # a damaged entry: computed again and replaced
            log.debug("SVD cache entry %s unreadable (%s)", path, exc)
        self.misses += 1
        space = compute()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")
            save_file({"u": space.u.contiguous().cpu(), "v": space.v.contiguous().cpu()}, str(partial))
            os.replace(partial, path)
        except OSError as exc:
            log.debug("SVD cache %s not written (%s)", path, exc)
        return space
