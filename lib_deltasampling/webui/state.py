"""The one home of process-wide mutable state: loaded source models and adapters, the WebUI's
FastAPI app (sd-webui-controlnet's preprocessors run through a route of it), and the LoRA
conversion job.

Source models stay loaded across generations whose settings name the same files (a grid over the
scale reuses them), are freed when a generation runs with Delta Sampling off, and when the host's
checkpoint changes if the settings page asks for it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..runtime.adapters.apply import AdapterSet
from ..runtime.model import SourceModel, load_model
from ..runtime.placement import Placement, empty_device_caches
from ..runtime.text.tokenizer import ClipTokenizer

log = logging.getLogger("delta-sampling")


def _file_key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path.resolve()), stat.st_mtime_ns, stat.st_size


@dataclass
class _Entry:
    key: tuple
    model: SourceModel


class SourceCache:
    def __init__(self) -> None:
        self._models: dict[tuple, SourceModel] = {}
        self._adapters: dict[tuple, AdapterSet] = {}
        self._tokenizers: dict[tuple, ClipTokenizer] = {}
        self.host_checkpoint: str | None = None
        self._extras: dict[str, tuple] = {}      # kind -> (file key and placement, loaded model)

    def tokenizer(self, vocab_paths: tuple[Path, ...], webui_root: Path | None) -> ClipTokenizer:
        key = (vocab_paths, webui_root)
        if key not in self._tokenizers:
            self._tokenizers[key] = ClipTokenizer.find(vocab_paths, webui_root=webui_root)
        return self._tokenizers[key]

    def has_model(self, path: Path, placement: Placement, timestep_mode: str) -> bool:
        return (_file_key(path), placement, timestep_mode) in self._models

    def model(self, path: Path, placement: Placement, tokenizer: ClipTokenizer, timestep_mode: str) -> SourceModel:
        key = (_file_key(path), placement, timestep_mode)
        model = self._models.get(key)
        if model is None:
            log.info("loading source model %s (%s)", path.name, placement)
            model = load_model(path, placement=placement, tokenizer=tokenizer, timestep_mode=timestep_mode)
            self._models[key] = model
        return model

    def adapters(self, model: SourceModel, files: tuple[tuple[str, Path, float, float], ...], source_name: str) -> AdapterSet:
        """An AdapterSet for these (name, path, te, unet) adapters on `model`, reused while unchanged."""
        key = (id(model), tuple((n, _file_key(p), te, unet) for n, p, te, unet in files))
        adapters = self._adapters.get(key)
        if adapters is None:
            adapters = AdapterSet(model.components(), model.family, source_name=source_name)
            for name, path, te, unet in files:
                adapters.add(path, name=name, te_multiplier=te, unet_multiplier=unet)
            self._adapters = {k: v for k, v in self._adapters.items() if k[0] != id(model)}  # one set per model
            self._adapters[key] = adapters
        return adapters

    def extra(self, kind: str, path: Path, placement: Placement, load: Callable[[], Any]) -> Any:
        """The extra model of `kind` ("controlnet", "ipadapter", "clipvision") from `path`, loaded by
        `load()` when not held already; one per kind (another file replaces it)."""
        key = (_file_key(path), placement)
        held = self._extras.get(kind)
        if held is not None and held[0] == key:
            return held[1]
        self.release_extra(kind)
        log.info("loading %s %s (%s)", kind, path.name, placement)
        loaded = load()
        self._extras[kind] = (key, loaded)
        return loaded

    def release_extra(self, kind: str | None = None) -> None:
        """Free the extra model of `kind` (every kind: None)."""
        for k in [kind] if kind else list(self._extras):
            held = self._extras.pop(k, None)
            if held is not None:
                held[1].release()

    def keep_only(self, models: list[SourceModel]) -> None:
        """Free every model not in `models` (and the adapters on them)."""
        keep = {id(m) for m in models}
        for key, model in list(self._models.items()):
            if id(model) not in keep:
                del self._models[key]
                self._adapters = {k: v for k, v in self._adapters.items() if k[0] != id(model)}
                model.release()

    def offload_all(self) -> None:
        """Move every model to CPU RAM (kept in its dtype); `process` moves them back when used."""
        for model in self._models.values():
            if model.placement.device.type != "cpu":
                model.to(Placement(torch.device("cpu"), model.placement.dtype, model.placement.weights))
        self.release_extra()   # small next to a source model: reloaded when used again
        empty_device_caches()

    def release_all(self) -> None:
        """Free every model, their adapters and the tokenizer (rebuilt in well under a second)."""
        self.keep_only([])
        self.release_extra()
        self._tokenizers.clear()

    @property
    def loaded(self) -> list[SourceModel]:
        return list(self._models.values())


CACHE = SourceCache()
HOST_APP: dict[str, Any] = {}    # "app": the WebUI's FastAPI app, set when the app starts (webui/setup.py)
CONVERT_JOB: dict[str, Any] = {}  # "job": the last LoRA conversion (webui/convert.py ConvertJob)
