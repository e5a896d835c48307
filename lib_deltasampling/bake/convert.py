"""Convert a LoRA (or LyCORIS) made for one base model into a LoRA for another model of the same
architecture, once, by ProLoRA's projection (prolora.py), so any WebUI's own LoRA loader uses it.

    report = convert_lora("sdxl_base.safetensors", "pony.safetensors", "style.safetensors", "style-pony.safetensors")

Only the weights the LoRA changes are read from the two checkpoints, one layer at a time (the
module trees are built on the meta device, for their names; nothing else is loaded). Each layer:
the adapter's weight change on the source (LoRA, LoCon, LoHa, LoKr, DoRA: `diff_weight`, the
same code that applies them), the subspaces of the source and target weights, their similarity,
and the projected change re-factored to the requested rank. The output is a kohya-format LoRA
(`lora_unet_...`, `lora_te_...`/`lora_te1_...`/`lora_te2_...`, alpha = rank) with metadata.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ModelFileError, SettingError, UserError
from ..runtime.adapters.algorithms import parse_layer
from ..runtime.adapters.apply import guess_family
from ..runtime.adapters.base import LayerSpec
from ..runtime.adapters.keys import KeyMap, Target, group_layers
from ..runtime.checkpoint import TensorStore, open_store
from ..runtime.detect import UNET_PREFIX, ModelInfo, detect_model
from ..runtime.loading import meta_init
from . import prolora
from .cache import SubspaceCache

METHOD = "ProLoRA (subspace and null-space projection), sd-webui-delta-sampling"
DEFAULT_RANK = 32   # for inputs without a rank of their own (LoHa, LoKr, full differences)


class ModelWeights:
    """One checkpoint's adaptable weights by runtime `Target`, read lazily from its file."""

    def __init__(self, path: Path | str, file_sha256: Callable[[Path], str] | None = None) -> None:
        from ..runtime.text.clip import build_clip_text, clip_text_config
        from ..runtime.text.encode import text_encoder_stores
        from ..runtime.unet import UNetModel

        self.path = Path(path)
        self.store = open_store(self.path)
        self.info: ModelInfo = detect_model(self.store)
        self.stores: dict[str, TensorStore] = {"unet": self.store.sub(UNET_PREFIX),
                                               **text_encoder_stores(self.store, self.info.family.value)}
        with meta_init():        # names and shapes only: no memory
            unet = UNetModel(self.info.unet)
            texts = {c: build_clip_text(clip_text_config(s)) for c, s in self.stores.items() if c != "unet"}
        self.keymap = KeyMap.build(self.info.family, unet, texts)
        self._sha256: str | None = None
        self._hash = file_sha256

    @property
    def sha256(self) -> str:
        """The file's sha256, by `file_sha256` (a cached one: the runner's, the WebUI's) or read whole."""
        if self._sha256 is None:
            from ..runtime.checkpoint import file_sha256
            self._sha256 = (self._hash or file_sha256)(self.path)
        return self._sha256

    def subspace(self, target: Target, subspace_rank: int, device: torch.device,
                 cache: SubspaceCache | None) -> prolora.Subspace:
        def compute() -> prolora.Subspace:
            return prolora.subspace(self.weight(target).to(device, torch.float32), subspace_rank)
        if cache is None:
            return compute()
        key = f"{target.component}.{target.module}.{target.param}" + (f".{target.rows[0]}-{target.rows[1]}"
                                                                      if target.rows else "")
        return cache.get(self.sha256, key, subspace_rank, device, compute)

    def has(self, target: Target) -> bool:
        return f"{target.module}.{target.param}" in self.stores[target.component]

    def weight(self, target: Target) -> torch.Tensor:
        w = self.stores[target.component].tensor(f"{target.module}.{target.param}")
        return w[target.rows[0]:target.rows[1]] if target.rows else w


@dataclass
class LayerResult:
    name: str                        # the layer's name in the input file
    transferred: bool
    reason: str = ""                 # why it was dropped
    similarity: tuple[float, float] | None = None
    output_name: str | None = None
    kept: float | None = None        # |projected change|_F / |source change|_F


@dataclass
class ConvertReport:
    source: Path
    target: Path
    lora: Path
    out: Path | None
    threshold: float
    subspace_rank: int
    layers: list[LayerResult] = field(default_factory=list)

    @property
    def transferred(self) -> list[LayerResult]:
        return [r for r in self.layers if r.transferred]

    @property
    def dropped(self) -> list[LayerResult]:
        return [r for r in self.layers if not r.transferred]

    def summary(self) -> dict:
        sims = [min(r.similarity) for r in self.layers if r.similarity]
        reasons: dict[str, int] = {}
        for r in self.dropped:
            key = r.reason.split(":")[0]
            reasons[key] = reasons.get(key, 0) + 1
        return {"layers": len(self.layers), "transferred": len(self.transferred), "dropped": reasons,
                "similarity_min": round(min(sims), 4) if sims else None,
                "similarity_mean": round(sum(sims) / len(sims), 4) if sims else None}


def architecture_problem(source: ModelInfo, target: ModelInfo) -> str | None:
    """Why a LoRA cannot be moved between these two models by projection or copying, or None."""
    if source.family != target.family:
        return f"the source is {source.family.label} and the target {target.family.label}"
    if source.unet != target.unet:
        return f"both are {source.family.label} but their UNets differ in layout"
    return None


def _spec(weight: torch.Tensor) -> LayerSpec:
    return LayerSpec("conv" if weight.ndim == 4 else "linear", weight, None)


def convert_lora(source_base: Path | str, target: Path | str, lora: Path | str, out: Path | str | None = None, *,
                 rank: int | None = None, threshold: float = prolora.DEFAULT_THRESHOLD,
                 subspace_rank: int = prolora.DEFAULT_SUBSPACE_RANK, device: torch.device | str = "cpu",
                 overwrite: bool = False, cache: SubspaceCache | None = None,
                 file_sha256: Callable[[Path], str] | None = None,
                 progress: Callable[[int, int, str], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> ConvertReport:
    """Project `lora` (made for `source_base`) onto `target`; write it to `out` (None: report only;
    an existing file only with `overwrite`). `cache`: subspaces kept on disk (None: computed each
    time), keyed by `file_sha256` of the models (default: read each file whole once).
    UserError for files that do not go together; nothing is written then."""
    if not 0.0 <= threshold <= 1.0:
        raise SettingError("convert --threshold", f"{threshold!r} is outside 0 to 1", "Use a similarity such as 0.8")
    if rank is not None and rank < 1:
        raise SettingError("convert --rank", f"{rank!r} is not a rank", "Use a whole number such as 32")
    src, tgt = ModelWeights(source_base, file_sha256), ModelWeights(target, file_sha256)
    problem = architecture_problem(src.info, tgt.info)
    if problem:
        raise UserError(str(tgt.path), f"cannot take a LoRA converted from {src.path.name}: {problem}, and a "
                        "projection needs the same architecture", "Use Delta Sampling instead (the accordion, or "
                        "`python -m lib_deltasampling generate`): it transfers across architectures at sampling time")
    adapter = open_store(Path(lora))
    groups, unknown = group_layers(adapter.keys())
    if not groups:
        raise ModelFileError(adapter.path, "holds no adapter layers this runtime knows",
                             "Use a LoRA/LyCORIS file (.safetensors)")
    family = guess_family(adapter, groups)
    if family is not None and family != src.info.family.label:
        raise ModelFileError(adapter.path, f"is an {family} adapter and the source base {src.path.name} is "
                             f"{src.info.family.label}", "Give the base model the LoRA was trained on as the source")

    report = ConvertReport(src.path, tgt.path, Path(lora), Path(out) if out else None, threshold, subspace_rank)
    tensors: dict[str, torch.Tensor] = {}
    names = sorted(groups)
    for i, name in enumerate(names):
        if should_stop is not None and should_stop():
            raise UserError(str(out or lora), "the conversion was interrupted", "Nothing was written; start it again")
        if progress is not None:
            progress(i, len(names), name)
        report.layers.append(_convert_layer(name, groups[name], adapter, src, tgt, rank, threshold, subspace_rank,
                                            torch.device(device), tensors, cache))
    if progress is not None:
        progress(len(names), len(names), "")
    if not report.transferred:
        raise UserError(str(lora), f"no layer of {Path(lora).name} could be transferred to {tgt.path.name} "
                        f"(reasons: {report.summary()['dropped']}); nothing was written",
                        "A lower --threshold takes less similar layers; or use Delta Sampling")
    if out is not None:
        _write(Path(out), tensors, report, src, tgt, overwrite)
    return report


def _convert_layer(name: str, parts: dict[str, str], adapter: TensorStore, src: ModelWeights, tgt: ModelWeights,
                   rank: int | None, threshold: float, subspace_rank: int, device: torch.device,
                   tensors: dict[str, torch.Tensor], cache: SubspaceCache | None) -> LayerResult:
    target = src.keymap.resolve(name)
    if target is None:
        return LayerResult(name, False, "no such layer in the source model")
    if not tgt.has(target):
        raise ModelFileError(tgt.path, f"has no weight for the LoRA's layer {name!r} "
                             f"({target.component} {target.module}.{target.param})",
                             "Use a complete checkpoint of the same architecture as the source")
    w_s = src.weight(target).to(device, torch.float32)
    if w_s.ndim < 2:
        return LayerResult(name, False, "a norm or bias layer: not projected")
    layer = parse_layer({suffix: adapter.tensor(key) for suffix, key in parts.items()}, name, adapter.path)
    layer = layer.to(device, torch.float32)
    problem = layer.check(_spec(w_s))
    if problem:
        raise ModelFileError(adapter.path, f"layer {name!r} does not fit the source model: {problem}",
                             "Give the base model the LoRA was trained on as the source")
    out_name = tgt.keymap.kohya_name(target)
    if out_name is None:
        return LayerResult(name, False, "a packed weight kohya-format files cannot name")
    delta = layer.diff_weight(_spec(w_s), 1.0)
    s_space = src.subspace(target, subspace_rank, device, cache)
    t_space = tgt.subspace(target, subspace_rank, device, cache)
    sim = prolora.similarity(s_space, t_space)
    if min(sim) < threshold:
        return LayerResult(name, False, f"similarity {min(sim):.3f} below the threshold {threshold:g}", sim)
    moved = prolora.project(delta, s_space, t_space)
    r = rank or layer.rank or DEFAULT_RANK
    up, down = prolora.low_rank(moved, r)
    r = up.shape[1]
    if w_s.ndim == 4:      # conv: down carries the kernel, up is 1x1 (kohya LoCon)
        down = down.reshape(r, *w_s.shape[1:])
        up = up.reshape(*up.shape, 1, 1)
    tensors[f"{out_name}.lora_up.weight"] = up.to(torch.float16).cpu().contiguous()
    tensors[f"{out_name}.lora_down.weight"] = down.to(torch.float16).cpu().contiguous()
    tensors[f"{out_name}.alpha"] = torch.tensor(float(r), dtype=torch.float16)
    norm = float(delta.norm())
    kept = float(moved.norm()) / norm if norm > 0 else 1.0
    return LayerResult(name, True, "", sim, out_name, kept if math.isfinite(kept) else None)


def _write(out: Path, tensors: dict[str, torch.Tensor], report: ConvertReport, src: ModelWeights,
           tgt: ModelWeights, overwrite: bool) -> None:
    from safetensors.torch import save

    from ..runtime.atomic import write_atomic
    metadata = {
        "ss_network_module": "networks.lora", "ss_base_model_version": tgt.info.family.value,
        "ds_method": METHOD, "ds_source": src.path.name, "ds_target": tgt.path.name, "ds_lora": report.lora.name,
        "ds_threshold": repr(report.threshold), "ds_subspace_rank": str(report.subspace_rank),
        "ds_summary": json.dumps(report.summary()),
        "ds_choices": "subspace: the k = min(subspace_rank, min(out, in)) leading singular vectors; null-space "
                      "part: the change minus its projection onto the subspace pair (mixed terms kept); a layer "
                      "passes when both sides' similarity reach the threshold; conv kernels as [out, in*kh*kw]; "
                      "re-factored by truncated SVD; norm/bias changes dropped",
    }
    write_atomic(out, save(tensors, metadata=metadata), overwrite=overwrite,
                 exists_fix="Allow replacing it (--overwrite), or choose another name")
