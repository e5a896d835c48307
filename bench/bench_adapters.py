"""Base + adapted source predictions with a LoRA: fused masked batch vs the alternatives.

    python bench/bench_adapters.py --out results.json          # CUDA, fp16, full-size SD1.5 UNet
    python bench/bench_adapters.py --tiny --out tiny.json      # CPU smoke run

Full-size SD1.5 UNet configuration with random weights, fp16, 64x64 latents, a rank-32 LoRA
on every attention projection (to_q/k/v/out) and feed-forward layer (ff.net.0.proj, ff.net.2),
image batch 1, i.e. the four source predictions of one Delta Sampling step:
  (a) fused: ONE batch-4 forward [base_u, base_c, adapted_u, adapted_c], LoRA on rows 2..3 only
  (b) merged: two batch-2 forwards, base weights and a second UNet with the LoRA merged in
  (c) four batch-1 forwards (the official ComfyUI node's pattern), base and merged models
  (d) plain: one batch-4 forward without adapters (the floor)
Goals (issue 3): (a) <= 1.1x (d); (a) >= 1.5x faster than (c); peak memory of (a) <= base
weights + 5% + activations of (d). (a) and (d) are also timed as CUDA graphs, which removes the
per-kernel launch cost that dominates eager PyTorch at this size. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import re
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib_deltasampling.runtime.adapters.apply import AdapterSet  # noqa: E402
from lib_deltasampling.runtime.checkpoint import TensorStore  # noqa: E402
from lib_deltasampling.runtime.detect import Family  # noqa: E402
from lib_deltasampling.runtime.unet import UNetModel  # noqa: E402
from lib_deltasampling.runtime.unet_config import UNetConfig  # noqa: E402

SD15 = UNetConfig(in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4, 4),
                  num_res_blocks=(2, 2, 2, 2), transformer_depth=(1, 1, 1, 1, 1, 1, 0, 0),
                  transformer_depth_output=(0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1), transformer_depth_middle=1,
                  context_dim=768, num_heads=8)
TINY = UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=(1, 1),
                  transformer_depth=(1, 0), transformer_depth_output=(0, 0, 1, 1), transformer_depth_middle=1,
                  context_dim=64, num_heads=8)
LORA_TARGETS = re.compile(r"transformer_blocks\.\d+\.(attn[12]\.to_(q|k|v|out\.0)|ff\.net\.(0\.proj|2))$")


def random_unet(config: UNetConfig, device, dtype) -> UNetModel:
    torch.manual_seed(0)
    unet = UNetModel(config, device=device, dtype=torch.float32)
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.02) if p.ndim > 1 else p.fill_(1.0 if p.ndim == 1 else 0.0)
    return unet.to(dtype).eval().requires_grad_(False)


def lora_tensors(unet: UNetModel, rank: int) -> dict[str, torch.Tensor]:
    """kohya-style keys (LDM-named variant) for every target Linear of the UNet."""
    out = {}
    g = torch.Generator().manual_seed(1)
    for name, module in unet.named_modules():
        if LORA_TARGETS.search(name):
            key = "lora_unet_" + name.replace(".", "_")
            out[key + ".lora_down.weight"] = torch.randn(rank, module.in_features, generator=g) * 0.02
            out[key + ".lora_up.weight"] = torch.randn(module.out_features, rank, generator=g) * 0.02
            out[key + ".alpha"] = torch.tensor(float(rank))
    return out


def merged_copy(unet: UNetModel, adapters: AdapterSet) -> UNetModel:
    """A second UNet with the LoRA merged into its weights (what (b) and (c) need)."""
    from lib_deltasampling.runtime.adapters.apply import layer_spec
    merged = copy.deepcopy(unet)
    with torch.no_grad():
        for adapter in adapters.adapters:
            for a in adapter.layers:
                spec = layer_spec({"unet": unet}, a.target)
                merged.get_submodule(a.target.module).weight += a.layer.diff_weight(spec, a.multiplier).to(spec.weight.dtype)
    return merged


def timed(fns: dict, warmup: int, iters: int, cuda: bool) -> dict[str, float]:
    """Median ms of each callable, timed in alternating rounds so that drift of host or GPU
    clocks (the eager cases are launch-bound) affects every variant alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times[name].append(start.elapsed_time(end))
            else:
                import time
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def graphed(fn):
    """`fn` captured as a CUDA graph (after warm-up on a side stream); returns its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def peak_of(fn, cuda: bool) -> float:
    if not cuda:
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--latent", type=int, default=64, help="latent side (64 = 512 px, the issue's case)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=30)
    args = parser.parse_args()
    cuda = not args.tiny and torch.cuda.is_available()
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    config = TINY if args.tiny else SD15
    side = 8 if args.tiny else args.latent

    unet = random_unet(config, device, dtype)
    weights_gib = sum(p.numel() * p.element_size() for p in unet.parameters()) / 2**30
    adapters = AdapterSet({"unet": unet}, Family.SD1)
    adapters.add(TensorStore.from_dict(lora_tensors(unet, args.rank)), name="bench-lora")
    n_layers = len(adapters.adapters[0].layers)

    g = torch.Generator(device=device).manual_seed(2)
    x4 = torch.randn(4, 4, side, side, device=device, dtype=dtype, generator=g)
    t4 = torch.full((4,), 500.0, device=device)
    ctx4 = torch.randn(4, 77, config.context_dim, device=device, dtype=dtype, generator=g)

    results: dict[str, float] = {}
    with torch.inference_mode():
        merged = merged_copy(unet, adapters)

        def plain():
            return unet(x4, t4, ctx4)

        def fused():
            adapters.rows = slice(2, 4)  # the adapted rows of [base_u, base_c, adapted_u, adapted_c]
            try:
                return unet(x4, t4, ctx4)
            finally:
                adapters.rows = None

        def two():
            return unet(x4[:2], t4[:2], ctx4[:2]), merged(x4[2:], t4[2:], ctx4[2:])

        def four():
            return [m(x4[i:i + 1], t4[i:i + 1], ctx4[i:i + 1]) for i, m in enumerate((unet, unet, merged, merged))]

        adapters.attach()
        eager = timed({"a_fused_ms": fused, "b_merged_two_ms": two, "c_four_ms": four, "d_plain_ms": plain},
                      args.warmup, args.iters, cuda)
        results.update(eager)
        if cuda:  # without launch overhead: what the GPU itself spends (the CUDA-graph issue builds on this)
            graphs = timed({"a_fused_graph_ms": graphed(fused), "d_plain_graph_ms": graphed(plain)},
                           args.warmup, args.iters, cuda)
            results.update(graphs)
        out_fused = fused()
        ref_adapted = merged(x4[2:], t4[2:], ctx4[2:])
        ref_base = unet(x4[:2], t4[:2], ctx4[:2])
        results["adapted_rows_max_abs_diff_vs_merged"] = (out_fused[2:] - ref_adapted).abs().max().item()
        results["base_rows_max_abs_diff"] = (out_fused[:2] - ref_base).abs().max().item()
        adapters.detach()
        merged = None  # free the second UNet before measuring peak memory
        if cuda:
            torch.cuda.empty_cache()
        results["d_peak_gib"] = peak_of(plain, cuda)  # only the base weights (+ LoRA) resident
        adapters.attach()
        results["a_peak_gib"] = peak_of(fused, cuda)
        adapters.detach()

    results.update(
        weights_gib=weights_gib, lora_layers=n_layers, rank=args.rank,
        ratio_a_over_d=results["a_fused_ms"] / results["d_plain_ms"],
        speedup_a_vs_c=results["c_four_ms"] / results["a_fused_ms"],
        ratio_a_over_d_graph=(results["a_fused_graph_ms"] / results["d_plain_graph_ms"]) if cuda else float("nan"),
        activations_gib=results["d_peak_gib"] - weights_gib,
        a_peak_budget_gib=weights_gib * 1.05 + (results["d_peak_gib"] - weights_gib),
    )
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
            "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."), "tiny": args.tiny,
            "warmup": args.warmup, "iters": args.iters, "latent": f"{side}x{side}"}
    args.out.write_text(json.dumps({**meta, **results}, indent=2))
    print(json.dumps({**meta, **results}, indent=2))


if __name__ == "__main__":
    main()
