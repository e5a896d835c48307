"""Norm-layer differences (LyCORIS `w_norm`/`b_norm`): added to a LayerNorm/GroupNorm's affine weight and bias.

A norm is n(x) * w + b with n(x) the normalised input, so with w + dw and b + db
    norm'(x) = norm(x) + n(x) * dw + db = norm(x) + F.layer_norm(x, shape, dw, db, eps)
(the same for GroupNorm): the bypass recomputes n(x) once through the functional norm with
the differences as its affine parameters. A1111 network_norm.py: dw * scale * multiplier,
db * multiplier.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .base import LayerSpec
from .common import Additive, describe_base, dims, like, parse_error, weight_scale

PARTS = frozenset({"w_norm", "b_norm"})


def norm_delta(x: torch.Tensor, base: LayerSpec, dw: torch.Tensor, db: torch.Tensor | None) -> torch.Tensor:
    """n(x) * dw + db for the norm `base` describes."""
    if not base.norm_groups:                     # None (or 0): a LayerNorm over the weight's shape
        return F.layer_norm(x, tuple(base.weight.shape), dw, db, base.norm_eps)
    return F.group_norm(x, base.norm_groups, dw, db, base.norm_eps)


def norm_fit(names: str, w: torch.Tensor, b: torch.Tensor | None, base: LayerSpec) -> str | None:
    """None if per-channel differences w (and b) fit the norm `base`."""
    if base.kind != "norm":
        return f"{names} parts cannot adapt {describe_base(base)}"
    channels = base.weight.numel()
    if w.numel() != channels or (b is not None and b.numel() != channels):
        sizes = " / ".join(dims(t) for t in (w, b) if t is not None)
        return f"{names} {sizes} do not fit {describe_base(base)}"
    return None


@dataclass(eq=False)
class NormLayer(Additive):
    w_norm: torch.Tensor
    b_norm: torch.Tensor | None
    scale: float

    algorithm = "norm"
    rank = None
    dora = False

    def check(self, base: LayerSpec) -> str | None:
        return norm_fit("w_norm / b_norm", self.w_norm, self.b_norm, base)

    def diff_weight(self, base: LayerSpec, multiplier: float) -> torch.Tensor:
        dw = self.w_norm.float().to(base.weight.device).reshape(base.weight.shape) * (self.scale * multiplier)
        return dw.to(base.weight.dtype)

    def diff_bias(self, base: LayerSpec, multiplier: float) -> torch.Tensor | None:
        if self.b_norm is None:
            return None
        return (self.b_norm.float().to(base.weight.device).reshape(-1) * multiplier).to(base.weight.dtype)

    def delta(self, x: torch.Tensor, base: LayerSpec, multiplier: float) -> torch.Tensor:
        """What the adaptation adds to the norm's output for x: n(x) * dw + db."""
        dw = like(self.w_norm, x).reshape(base.weight.shape) * (self.scale * multiplier)
        db = None if self.b_norm is None else like(self.b_norm, x).reshape(-1) * multiplier
        return norm_delta(x, base, dw, db)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.w_norm, self.b_norm) if t is not None)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> NormLayer:
        b = None if self.b_norm is None else self.b_norm.to(device=device, dtype=dtype)
        return NormLayer(self.w_norm.to(device=device, dtype=dtype), b, self.scale)


def parse(parts: dict[str, torch.Tensor], layer: str, source: Path | str | None) -> NormLayer:
    w, b = parts.get("w_norm"), parts.get("b_norm")
    if w is None:
        raise parse_error(source, layer, "incomplete norm difference: b_norm without w_norm")
    if w.dim() != 1 or (b is not None and b.shape != w.shape):
        sizes = " / ".join(dims(t) for t in (w, b) if t is not None)
        raise parse_error(source, layer, f"w_norm / b_norm {sizes} are not one value per channel")
    if "dora_scale" in parts:
        raise parse_error(source, layer, "dora_scale on a norm difference (DoRA applies to Linear/Conv2d weights)")
    return NormLayer(w_norm=w, b_norm=b, scale=weight_scale(parts, None))
