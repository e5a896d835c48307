"""Adapters on a loaded model, applied to the adapted rows of a batch only.

Nothing is merged and no weight is copied: every adapted layer gets a forward hook that
adds the adaptation to the layer's output for a contiguous block of batch rows (the
adapted rows: the batch is laid out base rows first, adapted rows after). So one forward
of [base_uncond, base_cond, adapted_uncond, adapted_cond] gives all four predictions with
one copy of the base weights, and rows outside the block are computed exactly as without
adapters. Rows are a Python slice set before the forward: no host sync, no mask tensor,
static shapes (CUDA-graph friendly).

    adapters = AdapterSet(model.components(), model.family)
    adapters.add(Path("moxin.safetensors"), unet_multiplier=0.8)   # checks everything, attaches nothing yet
    with adapters.applied(rows=slice(2, 4)):                        # hooks installed, rows 2..3 adapted
        out = model.unet(x4, t4, ctx4)
    # here every hook is removed again, even after an exception

For a whole generation, `attach()` once, set `rows` before each forward, `detach()` at the end
(`SourcePair` does this), so no hook is installed or removed per step.

Loading checks every layer before anything is attached: an adapter for another family, or
one whose keys match nothing, is refused with an error naming both files.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ...errors import ModelFileError, SettingError
from ..checkpoint import TensorStore, open_store
from ..detect import Family
from ..fp8 import compute_dtype
from .algorithms import parse_layer
from .base import AdapterLayer, LayerSpec
from .keys import KeyMap, Target, component_of, group_layers

log = logging.getLogger("delta-sampling")

_MAX_NAMES = 5
_ADAPTER_FIX = "Use a LoRA/LyCORIS file (LoRA, LoCon, LoHa, LoKr, DoRA, full or norm differences)"


@dataclass
class AttachedLayer:
    target: Target
    layer: AdapterLayer
    multiplier: float


@dataclass
class LoadedAdapter:
    """One adapter file as applied: what `describe()` reports for infotext and `inspect`."""

    name: str
    path: Path | None
    unet_multiplier: float
    te_multiplier: float
    family: str | None                       # family its shapes say it was made for (None: unknown)
    layers: list[AttachedLayer] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)

    def describe(self) -> dict:
        summary = _summary([(a.layer, a.target.component) for a in self.layers])
        return {"name": self.name, "file": str(self.path) if self.path else None, "family": self.family, **summary,
                "unmatched": len(self.unmatched), "unet_multiplier": self.unet_multiplier,
                "te_multiplier": self.te_multiplier}


def _summary(layers: list[tuple[AdapterLayer, str | None]]) -> dict:
    """Algorithms (with counts), rank(s) and touched modules per component, for infotext and `inspect`."""
    algorithms = Counter(layer.algorithm + ("+dora" if layer.dora else "") for layer, _ in layers)
    ranks = sorted({layer.rank for layer, _ in layers if layer.rank is not None})
    return {"format": ", ".join(f"{k} x{v}" for k, v in algorithms.most_common()),
            "rank": ranks[0] if len(ranks) == 1 else ranks,
            "modules": dict(Counter(component or "unprefixed" for _, component in layers))}


def describe_adapter_file(source: str | Path | TensorStore) -> dict:
    """What an adapter file holds, without a model: every layer parsed (so bad values are errors),
    algorithms, ranks, layers per component, the family its shapes point to, unknown keys."""
    store = source if isinstance(source, TensorStore) else open_store(source)
    groups, unknown = group_layers(store.keys())
    if not groups:
        raise ModelFileError(store.path or "adapter", "holds no adapter layers this runtime knows", _ADAPTER_FIX)
    layers = [(parse_layer({s: store.tensor(k) for s, k in parts.items()}, name, store.path), component_of(name))
              for name, parts in groups.items()]
    return {"file": str(store.path) if store.path else None, "family": guess_family(store, groups),
            **_summary(layers), "layers": len(groups), "unknown keys": len(unknown)}


def layer_spec(components: dict[str, nn.Module], target: Target) -> LayerSpec:
    """The base layer a target names, as the algorithms see it (sliced for packed q/k/v)."""
    module = components[target.component].get_submodule(target.module)
    if target.param == "in_proj_weight":  # OpenCLIP packed attention: q/k/v rows of one weight
        weight, bias = module.in_proj_weight, module.in_proj_bias
        if target.rows is not None:
            weight, bias = weight[target.rows[0]:target.rows[1]], bias[target.rows[0]:target.rows[1]]
        return LayerSpec("linear", weight, bias)
    if isinstance(module, nn.Linear):
        return LayerSpec("linear", module.weight, module.bias)
    if isinstance(module, nn.Conv2d):
        return LayerSpec("conv", module.weight, module.bias, stride=tuple(module.stride), padding=tuple(module.padding),
                         dilation=tuple(module.dilation), groups=module.groups)
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
        groups = module.num_groups if isinstance(module, nn.GroupNorm) else None
        return LayerSpec("norm", module.weight, module.bias, norm_eps=module.eps, norm_groups=groups)
    raise TypeError(f"{target.component}.{target.module} is a {type(module).__name__}, which adapters cannot target")


def _hook_module(components: dict[str, nn.Module], target: Target) -> nn.Module:
    module = components[target.component].get_submodule(target.module)
    return module.in_proj if target.param == "in_proj_weight" else module


def guess_family(store: TensorStore, groups: dict[str, dict[str, str]]) -> str | None:
    """The family an adapter was trained for, from its key names and the cross-attention width."""
    if any(component_of(name) == "te2" for name in groups):
        return "SDXL"
    widths = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL", 1280: "SDXL refiner"}
    for name, parts in groups.items():
        if "attn2" in name and "to_k" in name and "lora_down.weight" in parts:
            return widths.get(store.shape(parts["lora_down.weight"])[1])
    return None


class AdapterSet:
    """The adapters of one source model. Holds hooks only while `applied()` is active."""

    def __init__(self, components: dict[str, nn.Module], family: Family, source_name: str = "the source model") -> None:
        self.components = components          # {"unet": UNetModel, "te1": ..., "te2": ...}
        self.family = family
        self.family_label = family.label
        self.source_name = source_name
        self.adapters: list[LoadedAdapter] = []
        self._keymap: KeyMap | None = None
        self._rows: slice | None = None
        self._handles: list = []

    @property
    def keymap(self) -> KeyMap:
        if self._keymap is None:
            unet = self.components["unet"]
            texts = {k: v for k, v in self.components.items() if k != "unet"}
            self._keymap = KeyMap.build(self.family.value, unet, texts)
        return self._keymap

    def add(self, source: str | Path | TensorStore, *, name: str | None = None, unet_multiplier: float = 1.0,
            te_multiplier: float | None = None) -> LoadedAdapter:
        """Load and check one adapter file; it takes effect inside `applied()`. Nothing changes on error."""
        te_multiplier = unet_multiplier if te_multiplier is None else te_multiplier
        for label, value in (("UNet multiplier", unet_multiplier), ("text encoder multiplier", te_multiplier)):
            if not (isinstance(value, (int, float)) and abs(value) < 1e4 and value == value):
                raise SettingError(f"adapter {name or source} {label}", f"{value!r} is not a usable number",
                                   "Use a weight such as 1 or 0.8")
        store = source if isinstance(source, TensorStore) else open_store(source)
        path = store.path
        label = name or (path.stem if path else "adapter")
        groups, unknown = group_layers(store.keys())
        if not groups:
            raise ModelFileError(path or label, "holds no adapter layers this runtime knows", _ADAPTER_FIX)
        family = guess_family(store, groups)
        adapter = LoadedAdapter(label, path, float(unet_multiplier), float(te_multiplier), family,
                                unmatched=list(unknown))
        misfits: list[str] = []
        for layer_name, parts in groups.items():
            target = self.keymap.resolve(layer_name)
            if target is None:
                adapter.unmatched.append(layer_name)
                continue
            spec = layer_spec(self.components, target)
            # Checked in the file's own precision (a huge fp32 value must not become inf first), then placed.
            layer = parse_layer({suffix: store.tensor(key) for suffix, key in parts.items()}, layer_name, path)
            # parts in the dtype the layer computes in (not its fp8 storage: they would lose their precision)
            layer = layer.to(spec.weight.device, compute_dtype(self.components[target.component], spec.weight))
            problem = layer.check(spec)
            if problem:
                misfits.append(f"{layer_name}: {problem}")
                continue
            mult = adapter.unet_multiplier if target.component == "unet" else adapter.te_multiplier
            adapter.layers.append(AttachedLayer(target, layer, mult))

        self._refuse_if_unusable(adapter, misfits, len(groups))
        if adapter.unmatched:
            log.warning("%s: %d adapter keys match no module of %s and are ignored: %s", label, len(adapter.unmatched),
                        self.source_name, ", ".join(adapter.unmatched[:_MAX_NAMES]))
        self.adapters.append(adapter)
        return adapter

    def _refuse_if_unusable(self, adapter: LoadedAdapter, misfits: list[str], total: int) -> None:
        where = adapter.path or adapter.name
        if adapter.family and adapter.family != self.family_label and (misfits or not adapter.layers):
            raise ModelFileError(
                where, f"is an {adapter.family} adapter (from its shapes) and does not fit {self.source_name}, "
                       f"which is {self.family_label}",
                f"Use a {self.family_label} adapter, or pick an {adapter.family} checkpoint as the source")
        if misfits:
            raise ModelFileError(
                where, f"{len(misfits)} of {total} layers do not fit {self.source_name} ({self.family_label}): "
                       + "; ".join(misfits[:3]),
                "The adapter was made for another model family or is damaged")
        if not adapter.layers:
            raise ModelFileError(
                where, f"none of its {total} layers matches a module of {self.source_name} ({self.family_label}); "
                       f"first names: {', '.join(adapter.unmatched[:_MAX_NAMES])}",
                "Check that the adapter was made for this model family")

    def remove_all(self) -> None:
        self.detach()
        self.adapters.clear()

    # ------------------------------------------------------------------ application

    def _hook_for(self, attached: list[AttachedLayer]):
        specs = [layer_spec(self.components, a.target) for a in attached]
        rows_of = [a.target.rows for a in attached]

        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            rows = self._rows
            if rows is None:
                return
            x, adapted = args[0][rows], out[rows]  # views: the adapted rows of this batch
            for a, spec, feat in zip(attached, specs, rows_of):
                target = adapted if feat is None else adapted[..., feat[0]:feat[1]]
                a.layer.add_delta_(x, target, spec, a.multiplier)  # in place: the output is fresh

        return hook

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> None:
        """Install the hooks (inactive until `rows` is set). Idempotent."""
        if self._handles:
            return
        by_module: dict[int, tuple[nn.Module, list[AttachedLayer]]] = {}
        for adapter in self.adapters:
            for a in adapter.layers:
                module = _hook_module(self.components, a.target)
                by_module.setdefault(id(module), (module, []))[1].append(a)
        try:
            for module, attached in by_module.values():
                self._handles.append(module.register_forward_hook(self._hook_for(attached)))
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        """Remove every hook: the model computes exactly as without adapters."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._rows = None

    @property
    def rows(self) -> slice | None:
        return self._rows

    @rows.setter
    def rows(self, rows: slice | None) -> None:
        """Batch rows the next forwards adapt (None: none). Set per forward; a Python slice, no tensor."""
        self._rows = rows

    @contextmanager
    def applied(self, rows: slice = slice(None)) -> Iterator["AdapterSet"]:
        """Within the block, adapted layers add their adaptation to batch rows `rows` (default: all)."""
        was_attached = self.attached
        previous = self._rows
        self.attach()
        try:
            self._rows = rows
            yield self
        finally:
            if was_attached:
                self._rows = previous
            else:
                self.detach()

    def describe(self) -> list[dict]:
        return [a.describe() for a in self.adapters]
