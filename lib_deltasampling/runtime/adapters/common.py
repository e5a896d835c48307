"""What the weight-difference algorithms share: the base op, DoRA, shape texts, parse errors.

Each algorithm (lora.py, loha.py, lokr.py, full.py) is a `DeltaLayer` that says only how its
parts rebuild the scaled difference `gain * dW` (`_weight`) and how to apply it to an input
without building more than it must (`_apply`). `DeltaLayer` turns that into the
`AdapterLayer` interface of base.py (plus `delta`, what `bypass` adds), A1111's way
(`network.py` `finalize_updown`):

    diff_weight = multiplier * scale * dW                              (no DoRA)
    diff_weight = multiplier * (m * W' / ||W'|| - W),  W' = W + scale * dW   (DoRA)
    diff_bias   = multiplier * diff_b

`scale` is alpha / rank (or the file's `scale`, or 1), and the multiplier scales the whole
difference, also for DoRA (A1111 applies it after the decomposition).
"""

from __future__ import annotations

import dataclasses
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F

from ...errors import ModelFileError
from .base import LayerSpec

FIX = ("The file is damaged or in a layout this extension cannot read; "
       "re-download it or export it again with kohya-ss or LyCORIS")


def parse_error(source: Path | str | None, layer: str, problem: str) -> ModelFileError:
    return ModelFileError(source or "(in memory)", f"adapter layer {layer}: {problem}", FIX)


def dims(t: torch.Tensor | torch.Size | tuple[int, ...]) -> str:
    """320x8 for a [320, 8] tensor."""
    shape = t.shape if isinstance(t, torch.Tensor) else t
    return "x".join(str(n) for n in shape) or "scalar"


def describe_base(base: LayerSpec) -> str:
    """'a 320x768 Linear', 'a 320x320x3x3 Conv2d', 'a 320 LayerNorm', 'a 320 GroupNorm (32 groups)'."""
    if base.kind == "linear":
        return f"a {dims(base.weight)} Linear"
    if base.kind == "conv":
        return f"a {dims(base.weight)} Conv2d"
    if not base.norm_groups:
        return f"a {dims(base.weight)} LayerNorm"
    return f"a {dims(base.weight)} GroupNorm ({base.norm_groups} groups)"


def scalar(t: torch.Tensor) -> float:
    """A one-number tensor (alpha, scale) as a float. Load time only: this syncs."""
    return float(t.reshape(-1)[0])


def weight_scale(parts: dict[str, torch.Tensor], rank: int | None) -> float:
    """A1111 `calc_scale`: the file's `scale` if given, else alpha / rank, else 1."""
    if "scale" in parts:
        return scalar(parts["scale"])
    if "alpha" in parts and rank:
        return scalar(parts["alpha"]) / rank
    return 1.0


def conv_args(base: LayerSpec) -> dict:
    return {"stride": base.stride, "padding": base.padding, "dilation": base.dilation}


def base_op(x: torch.Tensor, weight: torch.Tensor, base: LayerSpec) -> torch.Tensor:
    """The base layer's op with another weight, no bias."""
    if base.kind == "linear":
        return F.linear(x, weight)
    return F.conv2d(x, weight, None, groups=base.groups, **conv_args(base))


def per_channel(v: torch.Tensor, x: torch.Tensor, base: LayerSpec) -> torch.Tensor:
    """A per-channel vector shaped to broadcast over `x` (channels last for Linear, dim 1 for Conv2d)."""
    return v if base.kind == "linear" else v.reshape(-1, *([1] * (x.dim() - 2)))


def like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`t` on x's device in x's dtype (no copy when it already is)."""
    return t.to(device=x.device, dtype=x.dtype)


def dora_axis(dora_scale: torch.Tensor, weight_shape: torch.Size) -> str | None:
    """Which norm a DoRA magnitude belongs to, from its shape.

    [out, 1, ...] or [out] (LyCORIS `wd_on_out`, PEFT): one norm per output row.
    [1, in, ...] (A1111, LyCORIS `wd_on_out=False`): one norm per input column, taken over
    the output and kernel dims.
    """
    out, in_ = weight_shape[0], weight_shape[1]
    s = dora_scale.shape
    if s and s[0] == out and dora_scale.numel() == out:
        return "out"
    if len(s) >= 2 and s[0] == 1 and s[1] == in_ and dora_scale.numel() == in_:
        return "in"
    return None


def dora_norm(merged: torch.Tensor, axis: str) -> torch.Tensor:
    """||W'|| per output row ([out]) or per input column ([in])."""
    if axis == "out":
        return merged.reshape(merged.shape[0], -1).norm(dim=1)
    return merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1)


def axis_view(v: torch.Tensor, axis: str, ndim: int) -> torch.Tensor:
    """A per-row ([out]) or per-column ([in]) vector shaped to broadcast over a weight."""
    if axis == "out":
        return v.reshape(-1, *([1] * (ndim - 1)))
    return v.reshape(1, -1, *([1] * (ndim - 2)))


class Additive:
    """Every algorithm's adaptation is an addition to the base output: `delta(x, base, multiplier)`.
    `bypass` and the in-place `add_delta_` follow from it (algorithms may override for speed)."""

    def delta(self, x: torch.Tensor, base: LayerSpec, multiplier: float) -> torch.Tensor:
        raise NotImplementedError

    def bypass(self, x: torch.Tensor, out: torch.Tensor, base: LayerSpec, multiplier: float) -> torch.Tensor:
        if multiplier == 0:
            return out
        return out + self.delta(x, base, multiplier)

    def add_delta_(self, x: torch.Tensor, out: torch.Tensor, base: LayerSpec, multiplier: float) -> None:
        """`out += delta(x)` in place; `out` is the base output for x (a view into the batch's output)."""
        if multiplier != 0:
            out.add_(self.delta(x, base, multiplier))


class DeltaLayer(Additive):
    """A Linear/Conv2d weight difference. Subclasses are dataclasses with tensor fields and

    `scale: float`, `dora_scale: Tensor | None`, `diff_b: Tensor | None`, and implement
    `_fit`, `_weight` and (where cheaper than building the weight) `_apply`.
    """

    algorithm: str
    kinds: tuple[str, ...] = ("linear", "conv")
    scale: float
    dora_scale: torch.Tensor | None
    diff_b: torch.Tensor | None

    # --- per algorithm -------------------------------------------------------------------
    def _fit(self, base: LayerSpec) -> str | None:
        """What in the parts does not fit `base` (kind already checked), or None."""
        raise NotImplementedError

    def _weight(self, base: LayerSpec, gain: float, ref: torch.Tensor) -> torch.Tensor:
        """gain * dW shaped like base.weight, in ref's dtype and on its device (no alpha scale of its own)."""
        raise NotImplementedError

    def _apply(self, x: torch.Tensor, base: LayerSpec, gain: float) -> torch.Tensor:
        """The base op applied to x with gain * dW (no bias). Default: build the weight for this call."""
        return base_op(x, self._weight(base, gain, x), base)

    # --- AdapterLayer ----------------------------------------------------------------------
    @property
    def dora(self) -> bool:
        return self.dora_scale is not None

    def check(self, base: LayerSpec) -> str | None:
        if base.kind not in self.kinds:
            return f"{self.algorithm} parts cannot adapt {describe_base(base)}"
        if base.kind == "conv" and base.groups != 1:
            return f"{self.algorithm} parts cannot adapt a grouped convolution ({base.groups} groups)"
        problem = self._fit(base)
        if problem:
            return problem
        if self.dora_scale is not None and dora_axis(self.dora_scale, base.weight.shape) is None:
            return (f"dora_scale {dims(self.dora_scale)} is neither per output row nor per input "
                    f"column of {describe_base(base)}")
        out = base.weight.shape[0]
        if self.diff_b is not None and self.diff_b.numel() != out:
            return f"diff_b {dims(self.diff_b)} does not fit the {out} outputs of {describe_base(base)}"
        return None

    def diff_weight(self, base: LayerSpec, multiplier: float) -> torch.Tensor:
        w = base.weight.float()
        delta = self._weight(base, self.scale, w)
        if self.dora_scale is not None:
            axis = dora_axis(self.dora_scale, w.shape)
            merged = w + delta
            magnitude = axis_view(self.dora_scale.float().to(w.device), axis, w.dim())
            delta = merged * (magnitude / axis_view(dora_norm(merged, axis), axis, w.dim())) - w
        return (delta * multiplier).to(base.weight.dtype)

    def diff_bias(self, base: LayerSpec, multiplier: float) -> torch.Tensor | None:
        if self.diff_b is None:
            return None
        return (self.diff_b.float().to(base.weight.device).reshape(-1) * multiplier).to(base.weight.dtype)

    def delta(self, x: torch.Tensor, base: LayerSpec, multiplier: float) -> torch.Tensor:
        """What the adaptation adds to the base output for x: op(x, diff_weight) + diff_bias.

        Never reads the base output, so adapters chained through `bypass` add up
        (W + d1 + d2, each difference taken against the base weight), DoRA ones included.
        """
        if self.dora_scale is None:
            y = self._apply(x, base, self.scale * multiplier)
        else:
            y = self._dora_delta(x, base) * multiplier
        if self.diff_b is not None:
            y = y + per_channel(like(self.diff_b.reshape(-1), x) * multiplier, x, base)
        return y

    # --- DoRA --------------------------------------------------------------------------------
    def _dora_delta(self, x: torch.Tensor, base: LayerSpec) -> torch.Tensor:
        """op(x, m * W'/||W'|| - W) from the structured delta, without a full weight.

        Per output row (r = m / ||W'||, a vector over outputs):
            op(x, r*W' - W) = (r - 1) * (W x) + r * (dW x)
        Per input column (c = m / ||W'||, a vector over inputs), W' c scales the input channels:
            op(x, W' c - W) = W ((c - 1) x) + dW (c x)
        Either way one extra base op on the rows given; W x is recomputed rather than taken
        from the base output so that chained adapters stay additive.
        """
        axis = dora_axis(self.dora_scale, base.weight.shape)
        v, v_minus_1 = self._dora_vectors(base, axis, x)
        v, v_minus_1 = per_channel(v, x, base), per_channel(v_minus_1, x, base)
        w = like(base.weight, x)
        if axis == "out":
            return v_minus_1 * base_op(x, w, base) + v * self._apply(x, base, self.scale)
        return base_op(x * v_minus_1, w, base) + self._apply(x * v, base, self.scale)

    def _dora_vectors(self, base: LayerSpec, axis: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """m / ||W + scale*dW|| and that minus 1, computed once per base weight, dtype and device.

        The norm needs the merged weight once (fp32, temporary); what is kept is two vectors.
        `v - 1` is formed in fp32 before the cast, so fp16 keeps its small value accurately.
        An entry holds only while it is the same weight tensor object, at the same address and
        unmodified (tensor version), so a released or reloaded model never gets a stale vector;
        keep one LayerSpec per layer so its weight view stays the same object.
        """
        w = base.weight
        cache = self.__dict__.setdefault("_dora_cache", {})
        key = (id(w), x.dtype, x.device)
        entry = cache.get(key)
        if entry is None or entry[0]() is not w or entry[1] != (w.data_ptr(), w._version):
            for dead in [k for k, e in cache.items() if e[0]() is None]:   # weights (views) since freed
                del cache[dead]
            w32 = w.detach().float()
            merged = w32 + self._weight(base, self.scale, w32)
            v = self.dora_scale.detach().float().to(w32.device).reshape(-1) / dora_norm(merged, axis)
            entry = cache[key] = (weakref.ref(w), (w.data_ptr(), w._version), like(v, x), like(v - 1, x))
        return entry[2], entry[3]

    # --- housekeeping ------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        """A copy with every part on `device` in `dtype` (floating parts only); caches start empty."""
        moved = {k: t.to(device=device, dtype=dtype if t.is_floating_point() else None)
                 for k, t in self.tensors().items()}
        return dataclasses.replace(self, **moved)


def kernel_of(base: LayerSpec) -> tuple[int, ...]:
    return tuple(base.weight.shape[2:])
