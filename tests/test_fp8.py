"""fp8 storage of the source UNet's weights (the low-VRAM option): the same results as the model whose
weights were rounded to fp8 and back by hand, adapters included; half the bytes; moves keep fp8."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import factories
from lib_deltasampling.errors import SettingError
from lib_deltasampling.runtime.adapters.apply import AdapterSet
from lib_deltasampling.runtime.fp8 import FP8_WEIGHTS, Fp8Conv2d, Fp8Linear, move_module, store_fp8
from lib_deltasampling.runtime.model import load_model
from lib_deltasampling.runtime.pair import SourcePair
from lib_deltasampling.runtime.placement import ModelSlot, Placement, choose_placement, module_nbytes
from test_adapters import ADAPTED, PROMPTS, build_adapter, run_pair

CPU32 = Placement(torch.device("cpu"), torch.float32)
CPU_FP8 = Placement(torch.device("cpu"), torch.float32, FP8_WEIGHTS)


def rounded_by_hand(model) -> None:
    """The reference: every Linear/Conv2d weight of the UNet rounded to fp8 and back, kept in fp32."""
    for layer in model.unet.modules():
        if type(layer) in (nn.Linear, nn.Conv2d):
            layer.weight.data = layer.weight.data.to(FP8_WEIGHTS).to(torch.float32)


@pytest.fixture(scope="module")
def sd1_file(tmp_path_factory):
    return factories.write_checkpoint(tmp_path_factory.mktemp("fp8") / "sd1.safetensors", "sd1", seed=5)


def test_choose_placement_fp8():
    placement = choose_placement("cpu", "fp8")
    assert placement == CPU_FP8 and str(placement) == "cpu fp32, fp8 UNet weights"
    with pytest.raises(SettingError, match="Use one of: auto, fp16, bf16, fp32, fp8"):
        choose_placement("cpu", "fp4")


def test_fp8_unet_equals_the_weights_rounded_by_hand_and_takes_half(sd1_file, tokenizer):
    fp8 = load_model(sd1_file, placement=CPU_FP8, tokenizer=tokenizer, prediction="eps")
    ref = load_model(sd1_file, placement=CPU32, tokenizer=tokenizer, prediction="eps")
    layers = [m for m in fp8.unet.modules() if isinstance(m, (Fp8Linear, Fp8Conv2d))]
    assert layers and all(m.weight.dtype == FP8_WEIGHTS for m in layers)
    assert all(p.dtype == torch.float32 for enc in fp8.text.encoders for p in enc.model.parameters())
    weights = sum(m.weight.numel() for m in layers)
    assert module_nbytes(ref.unet) - module_nbytes(fp8.unet) == weights * 3  # 4 bytes -> 1 per weight
    rounded_by_hand(ref)
    assert all(torch.equal(a, b) for a, b in zip(run_pair(SourcePair(fp8), PROMPTS, ADAPTED),
                                                run_pair(SourcePair(ref), PROMPTS, ADAPTED)))


@pytest.mark.parametrize("algorithm, options", [("lora", {}), ("lora", {"dora": "out"}), ("loha", {}), ("lokr", {})])
def test_adapters_on_fp8_weights(sd1_file, tokenizer, tmp_path, algorithm, options):
    adapter, _ = build_adapter("sd1", "kohya", algorithm, factories.checkpoint_tensors("sd1", seed=5), **options)
    save_file(adapter, str(tmp_path / "a.safetensors"))
    outs = []
    for placement in (CPU_FP8, CPU32):
        model = load_model(sd1_file, placement=placement, tokenizer=tokenizer, prediction="eps")
        if placement.weights is None:
            rounded_by_hand(model)
        adapters = AdapterSet(model.components(), model.family)
        adapters.add(tmp_path / "a.safetensors", unet_multiplier=0.8)
        outs.append(run_pair(SourcePair(model, adapters), PROMPTS, ADAPTED))
    for a, b in zip(*outs):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_moves_keep_fp8_weights_and_cast_the_rest():
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv2d(4, 4, 3), nn.LayerNorm(4))
    assert store_fp8(model) == 2
    move_module(model, torch.device("cpu"), torch.bfloat16)
    assert model[0].weight.dtype == FP8_WEIGHTS and model[1].weight.dtype == FP8_WEIGHTS
    assert model[0].bias.dtype == torch.bfloat16 and model[2].weight.dtype == torch.bfloat16
    slot = ModelSlot(model, Placement(torch.device("cpu"), torch.bfloat16, FP8_WEIGHTS))
    slot.to(Placement(torch.device("cpu"), torch.float32, FP8_WEIGHTS))
    assert model[0].weight.dtype == FP8_WEIGHTS and model[0].bias.dtype == torch.float32
    x = torch.randn(2, 4)
    assert torch.equal(model[0](x), torch.nn.functional.linear(x, model[0].weight.float(), model[0].bias))
