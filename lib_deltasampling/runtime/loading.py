"""Build a module without allocating it twice, then fill it strictly from a store.

Modules are constructed on the `meta` device (no memory, no random init), and every
parameter/buffer is then taken from the file, converted once to the compute dtype
on the target device. Missing or unexpected keys are an error that names them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager
from typing import TypeVar

import torch
from torch import nn

from ..errors import ModelFileError
from .checkpoint import TensorStore

M = TypeVar("M", bound=nn.Module)

# Buffers computed at construction (not stored in checkpoints) are listed by the module
# in this attribute; they are re-created on the target device instead of loaded.
DERIVED_BUFFERS_ATTR = "derived_buffers"


@contextmanager
def meta_init():
    with torch.device("meta"):
        yield


def _names(keys: Iterable[str], limit: int = 5) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def load_strict(build: Callable[[], M], store: TensorStore, *, what: str,
                device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                ignore: Callable[[str], bool] | None = None) -> M:
    """Construct `build()` on meta, then load every tensor of `store` into it.

    `what` names the part for messages ("UNet", "CLIP-L text encoder").
    `ignore(key)` marks stored keys that are known to be unused (e.g. position_ids).
    Floating tensors are cast to `dtype`; integer buffers keep their dtype.
    """
    with meta_init():
        module = build()
    expected = dict(module.state_dict(keep_vars=True))
    stored = [k for k in store.keys() if not (ignore and ignore(k))]
    missing = expected.keys() - set(stored)
    unexpected = set(stored) - expected.keys()
    path = store.path or "(in memory)"
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing {what} weights ({_names(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected {what} weights ({_names(unexpected)})")
        raise ModelFileError(path, "; ".join(parts),
                             "The checkpoint does not match the detected model layout; it may be damaged or an unsupported variant")
    loaded: dict[str, torch.Tensor] = {}
    for key, target in expected.items():
        shape = store.shape(key)
        if tuple(shape) != tuple(target.shape):
            raise ModelFileError(path, f"{what} weight '{store.prefix}{key}' has shape {list(shape)}, expected {list(target.shape)}",
                                 "The checkpoint does not match the detected model layout")
        t = store.tensor(key)
        t = t.to(device=device, dtype=dtype if t.is_floating_point() or t.dtype in FP8 else t.dtype)
        loaded[key] = t
    module.load_state_dict(loaded, strict=True, assign=True)
    _materialize_derived(module, device)
    return module.eval().requires_grad_(False)


FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def _materialize_derived(module: nn.Module, device: torch.device | str) -> None:
    """Re-create non-persistent buffers left on meta (they are not in checkpoints)."""
    for sub in module.modules():
        make = getattr(sub, DERIVED_BUFFERS_ATTR, None)
        if make is not None:
            for name, value in make(device).items():
                sub.register_buffer(name, value, persistent=False)
    leftover = [n for n, b in module.named_buffers() if b.is_meta] + [n for n, p in module.named_parameters() if p.is_meta]
    if leftover:
        raise RuntimeError(f"module has uninitialised tensors after loading: {_names(leftover)}")
