"""LoKr (LyCORIS): dW = kron(w1, w2), a Kronecker product of a small and a larger factor.

Parts: `lokr_w1` [a, c] or `lokr_w1_a` [a, r] @ `lokr_w1_b` [r, c];
`lokr_w2` [b, d] / [b, d, kh, kw], or `lokr_w2_a` [b, r] @ `lokr_w2_b` [r, d*kh*kw] (or [r, d, kh, kw]),
or with a Tucker core `lokr_t2` [r, r, kh, kw]: w2[p, q] = sum_i,j t2[i, j] * w2_a[i, p] * w2_b[j, q]
(w2_a [r, b], w2_b [r, d]). The base weight is [a*b, c*d(, kh, kw)]:
    W[i*b + p, j*d + q, h, w] = w1[i, j] * w2[p, q, h, w].
Scale: alpha / r only when a factored part exists (r = lokr_w2_b's rows, else lokr_w1_b's), else 1,
as A1111 network_lokr.py (LyCORIS stores alpha = dim for two full factors, which means 1 too).

The bypass never builds dW: with x's input channels viewed as [c, d],
    y[i, p] = sum_j w1[i, j] * (w2 applied to x[j, :])[p]
i.e. w2 runs as a Linear/Conv2d (base stride/padding) over the c channel groups, and w1 mixes
the groups: O(batch * (c*d*b + a*c*b)) instead of O(batch * a*b*c*d) per position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .base import LayerSpec
from .common import DeltaLayer, conv_args, describe_base, dims, kernel_of, like, parse_error, weight_scale

PARTS = frozenset({"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"})


@dataclass(eq=False)
class LokrLayer(DeltaLayer):
    w1: torch.Tensor | None
    w1a: torch.Tensor | None
    w1b: torch.Tensor | None
    w2: torch.Tensor | None
    w2a: torch.Tensor | None
    w2b: torch.Tensor | None
    t2: torch.Tensor | None
    scale: float
    dora_scale: torch.Tensor | None = None
    diff_b: torch.Tensor | None = None

    algorithm = "lokr"

    @property
    def rank(self) -> int | None:
        factor_b = self.w2b if self.w2b is not None else self.w1b
        return None if factor_b is None else factor_b.shape[0]

    def w1_shape(self) -> tuple[int, int]:
        return tuple(self.w1.shape) if self.w1 is not None else (self.w1a.shape[0], self.w1b.shape[1])

    def w2_shape(self) -> tuple[int, ...]:
        if self.w2 is not None:
            return tuple(self.w2.shape)
        if self.t2 is None:
            return (self.w2a.shape[0], *self.w2b.shape[1:])
        return (self.w2a.shape[1], self.w2b.shape[1], *self.t2.shape[2:])

    def _fit(self, base: LayerSpec) -> str | None:
        out, in_ = base.weight.shape[:2]
        (a, c), w2 = self.w1_shape(), self.w2_shape()
        b, k = w2[0], kernel_of(base)
        fits = a * b == out and in_ % c == 0
        if fits:
            d = in_ // c
            if len(w2) == 2:
                fits = w2[1] == d * math.prod(k)
            else:
                fits = w2[1:] == (d, *(k or (1, 1)))
        if fits:
            return None
        return (f"lokr w1 {a}x{c} and w2 {dims(w2)} do not fit {describe_base(base)} "
                f"(kron needs outputs a*b and inputs c*d)")

    def _factors(self, base: LayerSpec, gain: float, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """w1 * gain [a, c] and w2 [b, d, *kernel] for this base."""
        if self.w1 is not None:
            w1 = like(self.w1, ref) * gain
        else:
            w1 = (like(self.w1a, ref) * gain) @ like(self.w1b, ref)
        if self.w2 is not None:
            w2 = like(self.w2, ref)
        elif self.t2 is None:
            w2 = like(self.w2a, ref) @ like(self.w2b, ref).reshape(self.w2b.shape[0], -1)
        else:
            w2 = torch.einsum("ijhw,ip,jq->pqhw", like(self.t2, ref), like(self.w2a, ref), like(self.w2b, ref))
        d = base.weight.shape[1] // w1.shape[1]
        return w1, w2.reshape(w2.shape[0], d, *kernel_of(base))

    def _weight(self, base: LayerSpec, gain: float, ref: torch.Tensor) -> torch.Tensor:
        w1, w2 = self._factors(base, gain, ref)
        w1 = w1.reshape(*w1.shape, *([1] * (w2.dim() - 2)))
        return torch.kron(w1, w2.contiguous()).reshape(base.weight.shape)   # kron needs contiguous factors

    def _apply(self, x: torch.Tensor, base: LayerSpec, gain: float) -> torch.Tensor:
        w1, w2 = self._factors(base, gain, x)
        (a, c), b = w1.shape, w2.shape[0]
        if base.kind == "linear":
            groups = x.reshape(*x.shape[:-1], c, -1)                   # [..., c, d]
            y = torch.matmul(w1, groups @ w2.transpose(0, 1))          # [..., a, b]
            return y.reshape(*x.shape[:-1], a * b)
        n = x.shape[0]
        h = F.conv2d(x.reshape(n * c, -1, *x.shape[2:]), w2, **conv_args(base))   # [n*c, b, H', W']
        spatial = h.shape[2:]
        y = torch.matmul(w1, h.reshape(n, c, -1))                      # [n, a, b*H'*W']
        return y.reshape(n, a * b, *spatial)


def _matrix(parts: dict, name: str, layer: str, source) -> None:
    t = parts.get(name)
    if t is not None and t.dim() != 2:
        raise parse_error(source, layer, f"{name} {dims(t)} is not a matrix")


def parse(parts: dict[str, torch.Tensor], layer: str, source: Path | str | None) -> LokrLayer:
    p = {k: parts.get(k) for k in PARTS}
    for n in ("1", "2"):
        full, fa, fb = p[f"lokr_w{n}"], p[f"lokr_w{n}_a"], p[f"lokr_w{n}_b"]
        if full is not None and (fa is not None or fb is not None):
            raise parse_error(source, layer, f"has both lokr_w{n} and its factors lokr_w{n}_a/lokr_w{n}_b")
        if full is None and (fa is None or fb is None):
            raise parse_error(source, layer, f"incomplete LoKr: no lokr_w{n} (or lokr_w{n}_a and lokr_w{n}_b)")
    for name in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a"):
        _matrix(p, name, layer, source)
    w1a, w1b, t2 = p["lokr_w1_a"], p["lokr_w1_b"], p["lokr_t2"]
    w2, w2a, w2b = p["lokr_w2"], p["lokr_w2_a"], p["lokr_w2_b"]
    if w1a is not None and w1a.shape[1] != w1b.shape[0]:
        raise parse_error(source, layer, f"lokr_w1_a {dims(w1a)} has rank {w1a.shape[1]} "
                                         f"but lokr_w1_b {dims(w1b)} has rank {w1b.shape[0]}")
    if t2 is not None:
        if w2 is not None:
            raise parse_error(source, layer, "has lokr_t2 with a full lokr_w2 (a Tucker core needs lokr_w2_a/_b)")
        _matrix(p, "lokr_w2_b", layer, source)
        if t2.dim() != 4 or t2.shape[0] != w2a.shape[0] or t2.shape[1] != w2b.shape[0]:
            raise parse_error(source, layer, f"lokr_t2 {dims(t2)} does not join lokr_w2_a {dims(w2a)} "
                                             f"and lokr_w2_b {dims(w2b)}")
    elif w2 is not None:
        if w2.dim() not in (2, 4):
            raise parse_error(source, layer, f"lokr_w2 {dims(w2)} is neither a matrix nor a conv kernel")
    elif w2b.dim() not in (2, 4) or w2a.shape[1] != w2b.shape[0]:
        raise parse_error(source, layer, f"lokr_w2_a {dims(w2a)} has rank {w2a.shape[1]} "
                                         f"but lokr_w2_b {dims(w2b)} has rank {w2b.shape[0]}")
    result = LokrLayer(w1=p["lokr_w1"], w1a=w1a, w1b=w1b, w2=w2, w2a=w2a, w2b=w2b, t2=t2, scale=1.0,
                       dora_scale=parts.get("dora_scale"))
    result.scale = weight_scale(parts, result.rank)
    return result
