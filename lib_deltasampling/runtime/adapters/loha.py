"""LoHa (LyCORIS): dW = (w1_a @ w1_b) * (w2_a @ w2_b), a Hadamard product of two low-rank products.

Parts: `hada_w1_a` [out, r], `hada_w1_b` [r, in] or [r, in*kh*kw] (or [r, in, kh, kw]), the same
for w2, `alpha` (scale = alpha / r, r = hada_w1_b's rows, as A1111 network_hada.py), `dora_scale`.
With Tucker cores `hada_t1`/`hada_t2` [r, r, kh, kw] a half is rebuilt as
    half[p, q, h, w] = sum_i,j t[i, j, h, w] * a[i, p] * b[j, q],   a = hada_wX_a [r, out], b = hada_wX_b [r, in].

The bypass builds dW for the call (a temporary of the base weight's size) and runs the base
op with it: a Hadamard product has no cheap factored form at these ranks (its rank is r1*r2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .base import LayerSpec
from .common import DeltaLayer, describe_base, dims, kernel_of, like, parse_error, weight_scale

PARTS = frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"})


def _half_shape(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None) -> tuple[int, ...] | None:
    """The shape one half rebuilds to, or None if its parts do not chain."""
    if t is None:
        if a.dim() != 2 or b.dim() < 2 or a.shape[1] != b.shape[0]:
            return None
        return (a.shape[0], *b.shape[1:])
    if t.dim() != 4 or a.dim() != 2 or b.dim() != 2 or t.shape[0] != a.shape[0] or t.shape[1] != b.shape[0]:
        return None
    return (a.shape[1], b.shape[1], *t.shape[2:])


def _rebuild(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None, shape: torch.Size) -> torch.Tensor:
    if t is None:
        return (a @ b.reshape(b.shape[0], -1)).reshape(shape)
    return torch.einsum("ijhw,ip,jq->pqhw", t, a, b).reshape(shape)


@dataclass(eq=False)
class LohaLayer(DeltaLayer):
    w1a: torch.Tensor
    w1b: torch.Tensor
    w2a: torch.Tensor
    w2b: torch.Tensor
    t1: torch.Tensor | None
    t2: torch.Tensor | None
    scale: float
    dora_scale: torch.Tensor | None = None
    diff_b: torch.Tensor | None = None

    algorithm = "loha"

    @property
    def rank(self) -> int:
        return self.w1b.shape[0]

    def _fit(self, base: LayerSpec) -> str | None:
        shape = base.weight.shape
        fits = True
        for a, b, t in ((self.w1a, self.w1b, self.t1), (self.w2a, self.w2b, self.t2)):
            half = _half_shape(a, b, t)
            fits = fits and half[0] == shape[0] and math.prod(half) == math.prod(shape)
            if t is not None:
                fits = fits and base.kind == "conv" and half[1:] == (shape[1], *kernel_of(base))
        if fits:
            return None
        parts = [f"hada_w1_a {dims(self.w1a)}", f"hada_w1_b {dims(self.w1b)}",
                 f"hada_w2_a {dims(self.w2a)}", f"hada_w2_b {dims(self.w2b)}"]
        parts += [f"{n} {dims(t)}" for n, t in (("hada_t1", self.t1), ("hada_t2", self.t2)) if t is not None]
        return f"{' / '.join(parts)} do not fit {describe_base(base)}"

    def _weight(self, base: LayerSpec, gain: float, ref: torch.Tensor) -> torch.Tensor:
        shape = base.weight.shape
        t1 = None if self.t1 is None else like(self.t1, ref)
        t2 = None if self.t2 is None else like(self.t2, ref)
        half1 = _rebuild(like(self.w1a, ref) * gain, like(self.w1b, ref), t1, shape)
        half2 = _rebuild(like(self.w2a, ref), like(self.w2b, ref), t2, shape)
        return half1 * half2


def parse(parts: dict[str, torch.Tensor], layer: str, source: Path | str | None) -> LohaLayer:
    need = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    missing = [k for k in need if k not in parts]
    if missing:
        raise parse_error(source, layer, f"incomplete LoHa: no {', '.join(missing)}")
    w1a, w1b, w2a, w2b = (parts[k] for k in need)
    t1, t2 = parts.get("hada_t1"), parts.get("hada_t2")
    half1, half2 = _half_shape(w1a, w1b, t1), _half_shape(w2a, w2b, t2)
    for n, half, (a, b, t) in (("1", half1, (w1a, w1b, t1)), ("2", half2, (w2a, w2b, t2))):
        if half is None:
            tucker = f" / hada_t{n} {dims(t)}" if t is not None else ""
            raise parse_error(source, layer, f"hada_w{n}_a {dims(a)} / hada_w{n}_b {dims(b)}{tucker} "
                                             "do not chain (their ranks differ)")
    if half1[0] != half2[0] or math.prod(half1) != math.prod(half2):
        raise parse_error(source, layer, f"the LoHa halves have different shapes ({dims(half1)} and {dims(half2)})")
    return LohaLayer(w1a=w1a, w1b=w1b, w2a=w2a, w2b=w2b, t1=t1, t2=t2,
                     scale=weight_scale(parts, w1b.shape[0]), dora_scale=parts.get("dora_scale"))
