"""The source UNet's weights stored in 8-bit floats (e4m3fn) and computed in fp16/bf16/fp32.

Half the memory of fp16 weights, as A1111's and Forge's "FP8 weight" options: every Linear and
Conv2d weight of the UNet is cast to float8_e4m3fn (no scaling, as theirs), and each layer casts
it back to the input's dtype when it runs. Biases, norms and the text encoders keep the compute
dtype. Adapter parts take the compute dtype (`compute_dtype`), not the storage's.

    store_fp8(model.unet)          # after loading in the compute dtype
    move_module(unet, placement)   # device moves that keep the fp8 weights (Module.to would upcast them)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP8_WEIGHTS = torch.float8_e4m3fn


class Fp8Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), self.bias)


class Fp8Conv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight.to(x.dtype), self.bias)


_FP8_CLASS = {nn.Linear: Fp8Linear, nn.Conv2d: Fp8Conv2d}


def store_fp8(module: nn.Module) -> int:
    """Store every Linear/Conv2d weight under `module` in fp8; returns how many layers changed."""
    count = 0
    for layer in module.modules():
        fp8_class = _FP8_CLASS.get(type(layer))
        if fp8_class is not None:
            layer.weight.data = layer.weight.data.to(FP8_WEIGHTS)
            layer.__class__ = fp8_class  # same state, a forward that casts the weight back
            count += 1
    return count


def compute_dtype(module: nn.Module, weight: torch.Tensor) -> torch.dtype:
    """The dtype `module` computes in: `weight`'s, or for fp8-stored weights its first other floating tensor's."""
    if weight.dtype != FP8_WEIGHTS:
        return weight.dtype
    return next(p.dtype for p in module.parameters() if p.is_floating_point() and p.dtype != FP8_WEIGHTS)


def move_module(module: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """`module.to(device, dtype)`, except that fp8 weights stay fp8."""
    module.to(device=device)
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.is_floating_point() and tensor.dtype not in (FP8_WEIGHTS, dtype):
            tensor.data = tensor.data.to(dtype)
