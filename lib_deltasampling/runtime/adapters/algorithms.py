"""Which algorithm a layer's parts belong to, and the checks every file gets before use.

`parse_layer(group, layer_name, source)` takes one layer's tensors keyed by canonical part
name ("lora_down.weight", "hada_w1_a", "lokr_w2", "diff", "w_norm", "alpha", "dora_scale", ...;
the key mapping has already turned PEFT's lora_A/lora_B and `lora.down` into these) and
returns the AdapterLayer of the one algorithm whose parts are present. Refused, naming the
file and layer: parts of no algorithm or of two, a part no algorithm has, an incomplete or
inconsistent group, a non-finite value, a non-scalar alpha.

kohya-ss's sparse LoRA bias (`bias_indices`/`bias_values`/`bias_size`) is ignored, as A1111 does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from . import full, loha, lokr, lora, norm
from .base import AdapterLayer
from .common import dims, parse_error

# name shown in messages, the parts that identify the algorithm, its parser; tried in order
ALGORITHMS: tuple[tuple[str, frozenset[str], Callable], ...] = (
    ("LoRA", lora.PARTS, lora.parse),
    ("LoHa", loha.PARTS, loha.parse),
    ("LoKr", lokr.PARTS, lokr.parse),
    ("full difference", full.PARTS, full.parse),
    ("norm difference", norm.PARTS, norm.parse),
)
SHARED_PARTS = frozenset({"alpha", "scale", "dora_scale"})
IGNORED_PARTS = frozenset({"bias_indices", "bias_values", "bias_size"})


def _names(keys) -> str:
    return ", ".join(sorted(keys))


def _check_values(group: Mapping[str, torch.Tensor], layer: str, source: Path | str | None) -> None:
    """Every floating part finite, alpha/scale one number. Load time only (this syncs)."""
    for name, t in group.items():
        if name in IGNORED_PARTS:
            continue
        if not isinstance(t, torch.Tensor):
            raise parse_error(source, layer, f"{name} is not a tensor")
        if t.is_floating_point() or t.is_complex():
            values = t if t.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) else t.float()
            if not bool(torch.isfinite(values).all()):
                raise parse_error(source, layer, f"{name} {dims(t)} contains NaN or infinite values")
        if name in ("alpha", "scale") and t.numel() != 1:
            raise parse_error(source, layer, f"{name} should be one number but is {dims(t)}")


def parse_layer(group: Mapping[str, torch.Tensor], layer_name: str, source: Path | str | None = None) -> AdapterLayer:
    parts = {k: v for k, v in group.items() if k not in IGNORED_PARTS}
    found = [(name, known, parser) for name, known, parser in ALGORITHMS if known & parts.keys()]
    if not found:
        what = f"only {_names(parts)}" if parts else "no parts"
        raise parse_error(source, layer_name, f"no LoRA/LoCon, LoHa, LoKr, full or norm weights ({what})")
    if len(found) > 1:
        raise parse_error(source, layer_name, "mixes parts of " + " and ".join(name for name, _, _ in found)
                          + f" ({_names(parts)})")
    name, known, parser = found[0]
    unknown = parts.keys() - known - SHARED_PARTS
    if unknown:
        raise parse_error(source, layer_name, f"{_names(unknown)} is not part of a {name} layer")
    _check_values(parts, layer_name, source)
    return parser(parts, layer_name, source)
