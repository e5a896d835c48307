"""Where the source models run (device) and in what precision (dtype), and freeing them.

Defaults: CUDA -> fp16, MPS -> fp16, CPU -> fp32 (as the WebUIs do).
- bf16 is allowed where the hardware runs it natively: CUDA compute capability 8.0+ (Ampere and
  later; ROCm builds report it themselves), MPS where PyTorch can make a bf16 tensor, and the CPU.
- fp16 on the CPU is refused: many CPU kernels have no half-precision version or are very slow in
  it, and the WebUIs themselves run CPU models in fp32.

The extension owns the source models (the hosts' memory managers do not see them), so
`ModelSlot` moves one between devices on demand and `release_module` frees it for good.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import sys
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch
from torch import nn

from ..errors import SettingError
from .fp8 import move_module

DEVICE_SETTING = "source model device"
DTYPE_SETTING = "source model precision"

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_DTYPE_ALIASES = {"float16": "fp16", "half": "fp16", "bfloat16": "bf16", "float32": "fp32", "float": "fp32"}
_DEVICE_CHOICES = "auto, cpu, cuda, cuda:N, mps"


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype                  # what the models compute in
    weights: torch.dtype | None = None  # float8_e4m3fn: the UNet's Linear/Conv2d weights stored so (fp8.py)

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", torch.device(self.device))

    def __str__(self) -> str:
        return f"{self.device} {dtype_name(self.dtype)}" + (", fp8 UNet weights" if self.weights is not None else "")


def dtype_name(dtype: torch.dtype) -> str:
    return next((name for name, d in DTYPES.items() if d == dtype), str(dtype).removeprefix("torch."))


def parse_device(value: str | torch.device | None) -> torch.device:
    """'auto' / None: CUDA if present, else MPS, else CPU. Checks the device exists."""
    if isinstance(value, torch.device):
        text = str(value)
    else:
        text = (value or "auto").strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        if not _mps_available():
            raise SettingError(DEVICE_SETTING, "'mps' was asked for but Apple's MPS backend is not available here",
                               "Use auto or cpu")
        return torch.device("mps")
    kind, colon, index = text.partition(":")
    if kind == "cuda" and (not colon or index.isdigit()):
        if not torch.cuda.is_available():
            raise SettingError(DEVICE_SETTING, f"'{text}' was asked for but PyTorch sees no CUDA device",
                               "Use auto or cpu, or install a CUDA build of PyTorch")
        if index and int(index) >= torch.cuda.device_count():
            raise SettingError(DEVICE_SETTING, f"'{text}' does not exist: PyTorch sees {torch.cuda.device_count()} CUDA device(s)",
                               f"Use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        return torch.device("cuda", int(index)) if index else torch.device("cuda")
    raise SettingError(DEVICE_SETTING, f"'{value}' is not a device", f"Use one of: {_DEVICE_CHOICES}")


def device_choices() -> list[str]:
    """The devices this machine offers for the source models: auto, cpu, cuda and cuda:0..N-1 for
    the GPUs PyTorch sees, mps where Apple's backend is available."""
    choices = ["auto", "cpu"]
    if torch.cuda.is_available():
        choices += ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    if _mps_available():
        choices.append("mps")
    return choices


def parse_dtype(value: str | None, device: torch.device) -> torch.dtype:
    """'auto' / None: fp16 on CUDA and MPS, fp32 on the CPU. Refuses what the device cannot run."""
    text = (value or "auto").strip().lower()
    text = _DTYPE_ALIASES.get(text, text)
    if text == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    if text not in DTYPES:
        raise SettingError(DTYPE_SETTING, f"'{value}' is not a precision", f"Use one of: auto, {', '.join(DTYPES)}, fp8")
    dtype = DTYPES[text]
    if dtype == torch.float16 and device.type == "cpu":
        raise SettingError(DTYPE_SETTING, "fp16 is not supported on the CPU (many CPU operations have no fast half-precision version)",
                           "Use fp32 (or bf16) on the CPU")
    if dtype == torch.bfloat16 and not _supports_bf16(device):
        raise SettingError(DTYPE_SETTING, f"bf16 is not supported natively on {_device_label(device)}",
                           "Use fp16 (or auto)")
    return dtype


def choose_placement(device: str | torch.device | None = None, dtype: str | None = None) -> Placement:
    """Placement from two settings, each 'auto' (or None) or an explicit value. 'fp8': the UNet's
    weights stored in fp8, computed in what 'auto' picks (fp16 on CUDA, fp32 on the CPU)."""
    dev = parse_device(device)
    if (dtype or "").strip().lower() == "fp8":
        if dev.type == "mps":
            raise SettingError(DTYPE_SETTING, "fp8 weights are not supported by Apple's MPS backend", "Use fp16 (or auto)")
        from .fp8 import FP8_WEIGHTS
        return Placement(dev, parse_dtype("auto", dev), FP8_WEIGHTS)
    return Placement(dev, parse_dtype(dtype, dev))


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def _device_label(device: torch.device) -> str:
    if device.type == "cuda":
        try:
            return f"{device} ({torch.cuda.get_device_name(device)})"
        except Exception:  # name is only for the message
            return str(device)
    return str(device)


def _supports_bf16(device: torch.device) -> bool:
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        if torch.version.hip:
            return torch.cuda.is_bf16_supported()
        # Native bf16 needs Ampere (8.0) or later; older GPUs only emulate it, slowly.
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "mps":
        try:  # bf16 on MPS depends on the macOS version; ask the backend directly.
            torch.ones(1, dtype=torch.bfloat16, device=device)
            return True
        except (RuntimeError, TypeError):
            return False
    return False


def _unique_tensors(module: nn.Module) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for t in (*module.parameters(), *module.buffers()):
        seen.setdefault(id(t), t)
    return list(seen.values())


def module_nbytes(module: nn.Module) -> int:
    """Bytes held by the module's parameters and buffers (meta tensors hold none)."""
    return sum(t.numel() * t.element_size() for t in _unique_tensors(module) if not t.is_meta)


@functools.cache
def _malloc_trim():
    """glibc's `malloc_trim`, or None (other C libraries, other systems)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def trim_host_memory() -> None:
    """Hand freed heap memory back to the OS. glibc keeps freed blocks in its per-thread arenas, so
    after a model's CPU weights (or the fp16 copies read while loading) are freed the process stays as
    large as it was, and each load/free cycle can leave more behind (measured in a real A1111:
    +1.5 GB per source load on CPU). Called when models are released, never on the step path."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def empty_device_caches() -> None:
    """Collect garbage, then hand cached device and heap memory back (only where the backend is in use)."""
    gc.collect()
    trim_host_memory()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    if _mps_available() and hasattr(torch, "mps") and hasattr(torch.mps, "empty_cache"):
        torch.mps.empty_cache()


def release_module(module: nn.Module, *, empty_caches: bool = True) -> None:
    """Free every parameter and buffer of a module this package owns.

    Each tensor's storage is dropped in place (so a stray reference to the old Parameter does not
    keep GPU memory alive), and the module is left with meta tensors of the original shapes:
    using it afterwards fails loudly instead of computing on garbage.
    """
    _swap_to_meta(module)
    if empty_caches:  # False: the caller frees several modules and empties the caches once after
        empty_device_caches()  # after _swap_to_meta returned: no local still holds an old tensor


class LoadedPart:
    """Mixin of a loaded model part held as `self.model` (a ControlNet, an IP-Adapter, a CLIP
    vision encoder): its size, and `release()` freeing its weights now. The class sets
    `released = False` as a dataclass field."""

    model: nn.Module
    released: bool

    def nbytes(self) -> int:
        return module_nbytes(self.model)

    def release(self) -> None:
        """Free every weight now (even if something else still references the module)."""
        if not self.released:
            release_module(self.model)
            self.released = True



def _swap_to_meta(module: nn.Module) -> None:
    # old tensor id -> (old tensor, meta stand-in): tied tensors stay tied and keep their shape;
    # holding the (emptied) old tensors until the end keeps their ids unique.
    replaced: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for sub in module.modules():
        for store in (sub._parameters, sub._buffers):
            for name, t in list(store.items()):
                if t is None:
                    continue
                if id(t) not in replaced:
                    meta = torch.empty(t.shape, dtype=t.dtype, device="meta")
                    if isinstance(t, nn.Parameter):
                        meta = nn.Parameter(meta, requires_grad=t.requires_grad)
                    replaced[id(t)] = (t, meta)
                    t.data = torch.empty(0, dtype=t.dtype, device=t.device)
                store[name] = replaced[id(t)][1]


M = TypeVar("M", bound=nn.Module)


class ModelSlot(Generic[M]):
    """Holds one loaded module and where it is; moves it on demand and releases it.

    Typical use: compute on the GPU during a generation, `offload()` to CPU RAM between
    generations (keeping its dtype, so moving back is a plain copy), `release()` when unloaded.
    """

    def __init__(self, module: M, placement: Placement, *, name: str = "model") -> None:
        self.name = name
        self._module: M | None = module
        self._placement: Placement | None = placement

    @property
    def loaded(self) -> bool:
        return self._module is not None

    @property
    def module(self) -> M:
        if self._module is None:
            raise RuntimeError(f"{self.name} was released")
        return self._module

    @property
    def placement(self) -> Placement | None:
        return self._placement

    def to(self, placement: Placement) -> M:
        """Move (and cast floating tensors) to `placement`, if not there already."""
        module = self.module
        if placement != self._placement:
            move_module(module, placement.device, placement.dtype)
            self._placement = placement
        return module

    def offload(self) -> None:
        """Move to CPU RAM in the current dtype (storage only: compute places come from choose_placement)."""
        if self._placement is not None and self._module is not None and self._placement.device.type != "cpu":
            self.to(Placement(torch.device("cpu"), self._placement.dtype, self._placement.weights))

    def nbytes(self) -> int:
        return 0 if self._module is None else module_nbytes(self._module)

    def release(self) -> None:
        """Free the module's memory for good; the slot is empty afterwards."""
        module, self._module, self._placement = self._module, None, None
        if module is not None:
            release_module(module)
