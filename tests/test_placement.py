"""Device/dtype choice, module size and release. CUDA/MPS presence is simulated with monkeypatch
on CPU machines; the tests marked `cuda` run for real where a GPU is present."""

from __future__ import annotations

import dataclasses
import gc
import weakref

import pytest
import torch
from torch import nn

from lib_deltasampling.errors import SettingError
from lib_deltasampling.runtime.placement import (ModelSlot, Placement, choose_placement, module_nbytes,
                                                  release_module)

HAS_CUDA = torch.cuda.is_available()
cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.fixture
def fake_cuda(monkeypatch):
    """Two CUDA devices of compute capability 7.5 (no native bf16)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake T4")
    monkeypatch.setattr(torch.version, "hip", None)


# ---------------------------------------------------------------- choose_placement

def test_auto_on_cpu_is_fp32(no_gpu):
    for args in [(), (None, None), ("auto", "auto"), ("AUTO ", "")]:
        assert choose_placement(*args) == Placement(torch.device("cpu"), torch.float32)


def test_auto_on_cuda_is_fp16(fake_cuda):
    assert choose_placement() == Placement(torch.device("cuda"), torch.float16)
    assert choose_placement("cuda:1") == Placement(torch.device("cuda", 1), torch.float16)
    assert choose_placement("cuda", "fp32").dtype == torch.float32
    assert choose_placement("cpu").dtype == torch.float32  # CPU asked for on a CUDA machine


def test_auto_on_mps_is_fp16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert choose_placement() == Placement(torch.device("mps"), torch.float16)
    assert choose_placement("mps", "fp32").dtype == torch.float32


@pytest.mark.parametrize("text, dtype", [("fp32", torch.float32), ("float32", torch.float32), ("FP32", torch.float32),
                                         ("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16)])
def test_cpu_dtypes(no_gpu, text, dtype):
    assert choose_placement("cpu", text).dtype == dtype


def test_fp16_on_cpu_is_refused_with_a_reason(no_gpu):
    for text in ("fp16", "half", "float16"):
        with pytest.raises(SettingError, match="source model precision: fp16 is not supported on the CPU.*Use fp32"):
            choose_placement("cpu", text)


def test_bf16_needs_native_support_on_cuda(fake_cuda, monkeypatch):
    with pytest.raises(SettingError, match=r"source model precision: bf16 is not supported natively on cuda:1 \(Fake T4\).*fp16"):
        choose_placement("cuda:1", "bf16")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert choose_placement("cuda:1", "bf16") == Placement(torch.device("cuda:1"), torch.bfloat16)
    assert choose_placement("cuda", "fp16").dtype == torch.float16


@pytest.mark.parametrize("device", ["tpu", "gpu", "cuda:x", "cuda:", "cuda:-1", "xla:0"])
def test_unknown_device_names_the_setting_and_the_choices(fake_cuda, device):
    with pytest.raises(SettingError) as e:
        choose_placement(device)
    msg = str(e.value)
    assert msg.startswith("source model device: ") and f"'{device}'" in msg
    assert "auto, cpu, cuda, cuda:N, mps" in msg


@pytest.mark.parametrize("dtype", ["int8", "fp4", "double", "f16"])
def test_unknown_dtype_names_the_setting_and_the_choices(no_gpu, dtype):
    with pytest.raises(SettingError, match=f"source model precision: '{dtype}' is not a precision.*auto, fp16, bf16, fp32, fp8"):
        choose_placement("cpu", dtype)


def test_missing_devices_are_refused(no_gpu, fake_cuda, monkeypatch):
    with pytest.raises(SettingError, match="'cuda:2' does not exist: PyTorch sees 2 CUDA device.*cuda:0 to cuda:1"):
        choose_placement("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SettingError, match="source model device: 'cuda' was asked for but PyTorch sees no CUDA device"):
        choose_placement("cuda")
    with pytest.raises(SettingError, match="'mps' was asked for but Apple's MPS backend is not available"):
        choose_placement("mps")


def test_placement_is_a_frozen_value():
    p = Placement("cpu", torch.float32)
    assert p.device == torch.device("cpu") and str(p) == "cpu fp32"
    assert p == Placement(torch.device("cpu"), torch.float32) and hash(p) == hash(Placement(torch.device("cpu"), torch.float32))
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.dtype = torch.float16  # type: ignore[misc]
    assert choose_placement(torch.device("cpu")) == p


# ---------------------------------------------------------------- module size and release

class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 32)
        self.b = nn.Linear(32, 64, bias=False)
        self.b.weight = nn.Parameter(self.a.weight.detach().t().clone())
        self.tied = nn.Linear(64, 32)
        self.tied.weight = self.a.weight                  # shared parameter: counted once
        self.register_buffer("steps", torch.arange(10))   # int64 buffer
        self.register_buffer("scale", torch.ones(5), persistent=False)


def _by_hand(net: Net) -> int:
    floats = 64 * 32 + 32 + 32 * 64 + 32  # a.weight, a.bias, b.weight, tied.bias
    return floats * net.a.weight.element_size() + 10 * 8 + 5 * net.scale.element_size()


def test_module_nbytes_counts_each_tensor_once():
    net = Net()
    assert module_nbytes(net) == _by_hand(net)
    net.half()
    assert module_nbytes(net) == _by_hand(net)  # float tensors halved, int64 buffer unchanged
    assert module_nbytes(nn.Linear(4, 4, device="meta")) == 0


def test_release_module_frees_every_tensor_and_leaves_meta_shapes():
    net = Net()
    shapes = {k: v.shape for k, v in net.state_dict().items()}
    weight_ref = weakref.ref(net.a.weight)
    stray = net.b.weight                 # a reference held elsewhere must not keep the memory
    release_module(net)
    gc.collect()
    assert weight_ref() is None          # the old Parameter is gone
    assert stray.numel() == 0            # ...and a held one was emptied in place
    assert module_nbytes(net) == 0
    assert all(t.is_meta for t in (*net.parameters(), *net.buffers()))
    assert {k: v.shape for k, v in net.state_dict().items()} == shapes
    assert net.tied.weight is net.a.weight  # ties survive
    with pytest.raises((NotImplementedError, RuntimeError)):
        net.a(torch.ones(1, 64)).sum().item()


def test_model_slot_moves_casts_and_releases():
    net = Net()
    slot = ModelSlot(net, Placement("cpu", torch.float32), name="source UNet")
    ref = weakref.ref(net.a.weight)
    del net
    assert slot.loaded and slot.nbytes() == _by_hand(slot.module)
    m = slot.to(Placement("cpu", torch.bfloat16))
    assert m.a.weight.dtype == torch.bfloat16 and m.steps.dtype == torch.int64  # integer buffers keep their dtype
    assert slot.placement == Placement("cpu", torch.bfloat16)
    slot.offload()  # already on the CPU: nothing to do
    assert slot.placement == Placement("cpu", torch.bfloat16)
    del m
    slot.release()
    gc.collect()
    assert not slot.loaded and slot.nbytes() == 0 and slot.placement is None
    assert ref() is None
    with pytest.raises(RuntimeError, match="source UNet was released"):
        slot.module
    slot.release()  # twice is harmless


# ---------------------------------------------------------------- real GPU (skipped on CPU machines)

@cuda
def test_real_cuda_choice():
    p = choose_placement()
    assert p.device.type == "cuda" and p.dtype == torch.float16
    native = torch.cuda.get_device_capability()[0] >= 8
    if native:
        assert choose_placement("cuda:0", "bf16").dtype == torch.bfloat16
    else:
        with pytest.raises(SettingError):
            choose_placement("cuda:0", "bf16")


@cuda
def test_real_cuda_offload_and_release_give_memory_back():
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    slot = ModelSlot(nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(8)]), Placement("cpu", torch.float32))
    slot.to(Placement("cuda", torch.float16))
    on_gpu = torch.cuda.memory_allocated() - base
    assert on_gpu >= slot.nbytes() == 8 * (1024 * 1024 + 1024) * 2
    slot.offload()
    assert slot.placement == Placement("cpu", torch.float16)
    assert torch.cuda.memory_allocated() == base
    slot.to(Placement("cuda", torch.float16))
    stray = slot.module[0].weight  # a stray reference must not pin GPU memory after release
    slot.release()
    assert torch.cuda.memory_allocated() == base and stray.numel() == 0
    assert torch.cuda.memory_reserved() <= on_gpu  # empty_cache ran
