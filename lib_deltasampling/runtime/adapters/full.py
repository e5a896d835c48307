"""Full differences (LyCORIS `full`): the file stores dW itself (`diff`) and optionally the bias's (`diff_b`).

On a Linear/Conv2d the bypass runs the base op with dW (the file's own tensor, no new weight)
and adds diff_b; on a LayerNorm/GroupNorm `diff`/`diff_b` are affine differences as in norm.py.
Scale 1 (A1111 network_full.py: no rank, so alpha is not used), times the multiplier.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .base import LayerSpec
from .common import DeltaLayer, base_op, describe_base, dims, like, parse_error, weight_scale
from .norm import norm_delta, norm_fit

PARTS = frozenset({"diff", "diff_b"})


@dataclass(eq=False)
class FullLayer(DeltaLayer):
    diff: torch.Tensor
    diff_b: torch.Tensor | None
    scale: float
    dora_scale: torch.Tensor | None = None

    algorithm = "full"
    rank = None
    kinds = ("linear", "conv", "norm")

    def check(self, base: LayerSpec) -> str | None:
        if base.kind == "norm":
            if self.dora_scale is not None:
                return f"dora_scale cannot apply to {describe_base(base)}"
            return norm_fit("diff / diff_b", self.diff, self.diff_b, base)
        return super().check(base)

    def _fit(self, base: LayerSpec) -> str | None:
        shape = base.weight.shape
        if self.diff.shape[0] == shape[0] and self.diff.numel() == math.prod(shape):
            return None
        return f"diff {dims(self.diff)} does not fit {describe_base(base)}"

    def _weight(self, base: LayerSpec, gain: float, ref: torch.Tensor) -> torch.Tensor:
        return like(self.diff, ref).reshape(base.weight.shape) * gain

    def _apply(self, x: torch.Tensor, base: LayerSpec, gain: float) -> torch.Tensor:
        return base_op(x, like(self.diff, x).reshape(base.weight.shape), base) * gain

    def delta(self, x: torch.Tensor, base: LayerSpec, multiplier: float) -> torch.Tensor:
        if base.kind != "norm":
            return super().delta(x, base, multiplier)
        dw = like(self.diff, x).reshape(base.weight.shape) * (self.scale * multiplier)
        db = None if self.diff_b is None else like(self.diff_b, x).reshape(-1) * multiplier
        return norm_delta(x, base, dw, db)

def parse(parts: dict[str, torch.Tensor], layer: str, source: Path | str | None) -> FullLayer:
    diff, diff_b = parts.get("diff"), parts.get("diff_b")
    if diff is None:
        raise parse_error(source, layer, "incomplete full difference: diff_b without diff")
    if diff_b is not None and diff_b.numel() != diff.shape[0]:
        raise parse_error(source, layer, f"diff_b {dims(diff_b)} does not match the {diff.shape[0]} outputs "
                                         f"of diff {dims(diff)}")
    return FullLayer(diff=diff, diff_b=diff_b, scale=weight_scale(parts, None), dora_scale=parts.get("dora_scale"))
