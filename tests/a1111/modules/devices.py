"""Mirrors modules/devices.py for a CPU fp32 run (`--no-half` on CPU): device, dtypes,
`autocast()` (a null context in fp32), `without_autocast()`, `torch_gc()`, `cond_cast_unet`."""

import contextlib

import torch

cpu = torch.device("cpu")
device = device_interrogate = device_gfpgan = device_esrgan = device_codeformer = cpu
dtype = dtype_vae = dtype_unet = dtype_inference = torch.float32
unet_needs_upcast = False
fp8 = False


def autocast(disable=False):
    return contextlib.nullcontext()


def without_autocast(disable=False):
    return contextlib.nullcontext()


def torch_gc():
    pass


def cond_cast_unet(x):
    return x


def cond_cast_float(x):
    return x


class NansException(Exception):
    pass


def test_for_nans(x, where):
    if torch.all(torch.isnan(x)).item():
        raise NansException(f"A tensor with all NaNs was produced in {where}.")
