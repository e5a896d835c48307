"""LoRA and LoCon (kohya-ss, LyCORIS): dW = up @ down, or with a Tucker core up x mid x down.

Parts: `lora_down.weight` [r, in] or [r, in, kh, kw]; `lora_up.weight` [out, r] or [out, r, 1, 1];
`lora_mid.weight` [r, r, kh, kw] (LoCon with Tucker decomposition; down and up are then 1x1);
`alpha` (scale = alpha / r, r = lora_down's rows); `dora_scale` (DoRA, see common.py).

As ops (A1111 network_lora.py): on a Conv2d, down is a conv with the base's kernel, stride and
padding, up a 1x1 conv; with lora_mid, down and up are 1x1 and mid has the base's kernel,
stride and padding. On a Linear, 4-D [r, in, 1, 1] parts are matrices; on a 1x1 Conv2d, 2-D
parts are 1x1 kernels (SD1's proj_in is a 1x1 conv, SD2/SDXL's a Linear; files have either).

The bypass stays low-rank: up(mid(down(x))), never the full weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .base import LayerSpec
from .common import DeltaLayer, conv_args, describe_base, dims, kernel_of, like, parse_error, weight_scale

PARTS = frozenset({"lora_down.weight", "lora_up.weight", "lora_mid.weight"})


def _kernel(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape[2:]) or (1, 1)


@dataclass(eq=False)
class LoraLayer(DeltaLayer):
    down: torch.Tensor
    up: torch.Tensor
    mid: torch.Tensor | None
    scale: float
    dora_scale: torch.Tensor | None = None
    diff_b: torch.Tensor | None = None          # never in LoRA files; kept for DeltaLayer

    @property
    def algorithm(self) -> str:
        return "locon" if self.mid is not None or _kernel(self.down) != (1, 1) else "lora"

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def _fit(self, base: LayerSpec) -> str | None:
        out, in_ = base.weight.shape[:2]
        fits = self.up.shape[0] == out and self.down.shape[1] == in_
        if base.kind == "linear":
            fits = fits and self.mid is None and _kernel(self.down) == (1, 1)
        elif self.mid is None:
            fits = fits and _kernel(self.down) == kernel_of(base)
        else:
            fits = fits and tuple(self.mid.shape[2:]) == kernel_of(base)
        if fits:
            return None
        mid = f" / lora_mid {dims(self.mid)}" if self.mid is not None else ""
        return f"lora_up {dims(self.up)} / lora_down {dims(self.down)}{mid} do not fit {describe_base(base)}"

    def _weight(self, base: LayerSpec, gain: float, ref: torch.Tensor) -> torch.Tensor:
        up = like(self.up, ref).reshape(self.up.shape[0], -1) * gain
        down = like(self.down, ref).reshape(self.rank, -1)
        if self.mid is None:
            return (up @ down).reshape(base.weight.shape)
        # W[i, j, h, w] = sum_n,m up[i, n] mid[n, m, h, w] down[m, j]
        return torch.einsum("nmhw,in,mj->ijhw", like(self.mid, ref), up, down).reshape(base.weight.shape)

    def add_delta_(self, x: torch.Tensor, out: torch.Tensor, base: LayerSpec, multiplier: float) -> None:
        """Linear LoRA in two kernels: h = x down^T, then out += h (gain * up)^T fused in one addmm_.

        The per-step path of a Delta Sampling generation runs this for every adapted Linear, so
        the scaled, transposed up matrix is cached per (multiplier, dtype, device). Everything
        else (convs, DoRA, packed q/k/v row slices) takes the general path.
        """
        if multiplier == 0:
            return
        if base.kind != "linear" or self.dora_scale is not None or self.diff_b is not None or not out.is_contiguous():
            return super().add_delta_(x, out, base, multiplier)
        cache = self.__dict__.setdefault("_linear_cache", {})
        key = (multiplier, x.dtype, x.device)
        if key not in cache:
            down = like(self.down, x).reshape(self.rank, -1)
            up_t = (like(self.up, x).reshape(self.up.shape[0], -1) * (self.scale * multiplier)).t()
            cache[key] = (down, up_t)
        down, up_t = cache[key]
        h = F.linear(x, down)
        out.view(-1, out.shape[-1]).addmm_(h.reshape(-1, self.rank), up_t)

    def _apply(self, x: torch.Tensor, base: LayerSpec, gain: float) -> torch.Tensor:
        out, in_ = base.weight.shape[:2]
        if base.kind == "linear":
            h = F.linear(x, like(self.down, x).reshape(self.rank, in_))
            return F.linear(h * gain, like(self.up, x).reshape(out, -1))
        if self.mid is None:
            h = F.conv2d(x, like(self.down, x).reshape(self.rank, in_, *kernel_of(base)), **conv_args(base))
        else:
            h = F.conv2d(x, like(self.down, x).reshape(self.rank, in_, 1, 1))
            h = F.conv2d(h, like(self.mid, x), **conv_args(base))
        return F.conv2d(h * gain, like(self.up, x).reshape(out, -1, 1, 1))


def parse(parts: dict[str, torch.Tensor], layer: str, source: Path | str | None) -> LoraLayer:
    down, up, mid = parts.get("lora_down.weight"), parts.get("lora_up.weight"), parts.get("lora_mid.weight")
    if down is None or up is None:
        have = "lora_up.weight" if up is not None else "lora_down.weight" if down is not None else "lora_mid.weight"
        need = " and ".join(k for k in ("lora_down.weight", "lora_up.weight") if k not in parts)
        raise parse_error(source, layer, f"incomplete LoRA: has {have} but no {need}")
    if down.dim() not in (2, 4) or up.dim() not in (2, 4) or _kernel(up) != (1, 1):
        raise parse_error(source, layer, f"lora_up {dims(up)} / lora_down {dims(down)} are not LoRA matrices "
                                         "(2-D, or 4-D with a 1x1 lora_up)")
    if mid is None:
        if up.shape[1] != down.shape[0]:
            raise parse_error(source, layer, f"lora_up {dims(up)} has rank {up.shape[1]} but lora_down "
                                             f"{dims(down)} has rank {down.shape[0]}")
    elif mid.dim() != 4 or _kernel(down) != (1, 1) or mid.shape[0] != up.shape[1] or mid.shape[1] != down.shape[0]:
        raise parse_error(source, layer, f"lora_mid {dims(mid)} does not join lora_up {dims(up)} and lora_down "
                                         f"{dims(down)} (expected {up.shape[1]}x{down.shape[0]}xKxK between 1x1 parts)")
    return LoraLayer(down=down, up=up, mid=mid, scale=weight_scale(parts, down.shape[0]),
                     dora_scale=parts.get("dora_scale"))
