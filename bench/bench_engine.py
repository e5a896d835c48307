"""Per-step cost of Delta Sampling against the target alone, and against the ideal.

    python bench/bench_engine.py --out results.json           # CUDA, fp16, full-size random-weight models
    python bench/bench_engine.py --tiny --out tiny.json       # CPU smoke run

Cases (issues 4 and 11), 20 Euler steps, image batch 1, CFG on both sides:
  (a) SD1.5-architecture target at 512x512, SD1.5 source + rank-32 LoRA (one fused batch-4 source forward)
  (b) SDXL target at 1024x1024, SD1.5 source, source resolution `target` and `native`
  (c) as (b) native, the source UNet stored in fp8, + LoRA, optionally under a memory cap (--memory-gib 8)
  (d) as (b) native + LoRA + an SD1.5 ControlNet on the adapted rows (issue 12; its weights count as the source's)
Per step: target-only time, Delta Sampling time, and the ideal = target CFG forward + source forward,
each timed standalone with the same shapes. Overhead = DS / ideal - 1 (goal <= 5%). Peak VRAM of DS
over the target alone (goal at 512: <= source weights + 1 GB). The Delta Sampling step runs eagerly and
as a CUDA graph (issue 11), side by side; the source forward's TFLOP/s is FlopCounterMode's count over
the graph replay's time. The target runs eagerly at batch 2, as the WebUIs run it. Conditioning is random (text encoders are
not part of the step); everything else is the real engine path (DeltaSampler, SourcePair, adapters).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_adapters import SD15, TINY, lora_tensors, peak_of, random_unet  # noqa: E402
from lib_deltasampling.engine.bridge import NATIVE_PIXELS, native_latent_size  # noqa: E402
from lib_deltasampling.engine.sampler import DeltaParams, DeltaSampler, Segment  # noqa: E402
from lib_deltasampling.runtime.adapters.apply import AdapterSet  # noqa: E402
from lib_deltasampling.runtime.checkpoint import TensorStore  # noqa: E402
from lib_deltasampling.runtime.control import SourceControl  # noqa: E402
from lib_deltasampling.runtime.controlnet import ControlNet, ControlNetInfo, LoadedControlNet  # noqa: E402
from lib_deltasampling.runtime.denoiser import Denoiser, DiscreteSchedule, Prediction  # noqa: E402
from lib_deltasampling.runtime.detect import Family, ModelInfo  # noqa: E402
from lib_deltasampling.runtime.fp8 import FP8_WEIGHTS, store_fp8  # noqa: E402
from lib_deltasampling.runtime.graphs import GraphedCall  # noqa: E402
from lib_deltasampling.runtime.model import SourceModel  # noqa: E402
from lib_deltasampling.runtime.pair import PairConditioning, SourcePair  # noqa: E402
from lib_deltasampling.runtime.placement import Placement  # noqa: E402
from lib_deltasampling.runtime.unet_config import UNetConfig  # noqa: E402

SDXL = UNetConfig(in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4), num_res_blocks=(2, 2, 2),
                  transformer_depth=(0, 0, 2, 2, 10, 10), transformer_depth_output=(0, 0, 0, 2, 2, 2, 10, 10, 10),
                  transformer_depth_middle=10, context_dim=2048, num_head_channels=64, use_linear_in_transformer=True,
                  adm_in_channels=2816)
TINY_XL = UNetConfig(in_channels=4, out_channels=4, model_channels=64, channel_mult=(1, 2), num_res_blocks=(1, 1),
                     transformer_depth=(0, 1), transformer_depth_output=(0, 0, 1, 1), transformer_depth_middle=1,
                     context_dim=64, num_head_channels=32, use_linear_in_transformer=True, adm_in_channels=96)


class _NoText:
    encoders: list = []


def model_of(config: UNetConfig, family: Family, placement: Placement, *, fp8: bool = False) -> SourceModel:
    unet = random_unet(config, placement.device, placement.dtype)
    if fp8:
        store_fp8(unet)
        placement = Placement(placement.device, placement.dtype, FP8_WEIGHTS)
    info = ModelInfo(None, family, "eps", "bench", config, False)
    denoiser = Denoiser(unet, Prediction.EPS, DiscreteSchedule(), net_dtype=placement.dtype)
    return SourceModel(info, unet, _NoText(), denoiser, placement)


def random_cond(model: SourceModel, rows: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    c = model.info.unet
    p = model.placement
    cond = {"context": torch.randn(rows, 77, c.context_dim, generator=g, device=p.device).to(p.dtype)}
    if c.adm_in_channels:
        cond["y"] = torch.randn(rows, c.adm_in_channels, generator=g, device=p.device).to(p.dtype)
    return cond


def time_ms(fn, repeats: int, cuda: bool) -> float:
    import time
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def random_controlnet(source: SourceModel) -> LoadedControlNet:
    """A ControlNet fitting `source` (random weights like `random_unet`), on its device and dtype."""
    torch.manual_seed(1)
    p = source.placement
    net = ControlNet(source.info.unet.encoder(), device=p.device, dtype=torch.float32)
    with torch.no_grad():
        for t in net.parameters():
            t.normal_(0, 0.02) if t.ndim > 1 else t.fill_(1.0)
    info = ControlNetInfo(None, source.family, "ldm", source.info.unet.encoder(), 3)
    return LoadedControlNet(info, net.to(p.dtype).eval().requires_grad_(False))


def run_case(name: str, target: SourceModel, source: SourceModel, latent: tuple[int, int], resolution: str,
             lora: bool, steps: int, repeats: int, cuda: bool, controlnet: bool = False) -> dict:
    p = target.placement
    g = torch.Generator(device=p.device).manual_seed(0)
    adapters = None
    if lora:
        adapters = AdapterSet(source.components(), source.family)
        adapters.add(TensorStore.from_dict(lora_tensors(source.unet, 32)), name="bench-lora")
    pair = SourcePair(source, adapters)
    sched = DiscreteSchedule()
    sigmas = torch.cat([sched.t_to_sigma(torch.linspace(999, 0, steps)), torch.zeros(1)]).to(p.device)
    noise = torch.randn(1, 4, *latent, generator=g, device=p.device)
    target_cond = random_cond(target, 2, g)
    params = DeltaParams(scale=1.0, resolution=resolution)
    # The source's conditioning: [base_u, base_c, adapted_u, adapted_c], random (text encoders are not timed).
    src = random_cond(source, 4, g)
    conds = PairConditioning({k: v[:2] for k, v in src.items()}, {k: v[2:] for k, v in src.items()}, 2, 2, 1, src)
    source_latent = native_latent_size(*latent, NATIVE_PIXELS["sd1"]) if resolution == "native" else latent
    control = None
    if controlnet:
        net = random_controlnet(source)
        control = SourceControl(net, torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(2)))
        control.check(source)
    samplers = {graphed: DeltaSampler(pair, [Segment(steps, conds)], params, steps=steps, cfg_scale=7.0,
                                      target_scale=target.latent_scale, noise=noise,
                                      noise_multiplier=sigmas[0].item(), sigma0=sigmas[0].item(),
                                      source_size=source_latent, cuda_graphs=graphed, control=control)
                for graphed in (False, True)}
    sig = [sigmas[i:i + 1] for i in range(steps + 1)]  # per-step views made once: no host work in the loop

    def target_denoised(x, i):
        both = target.denoise(x.repeat(2, 1, 1, 1), sig[i].repeat(2), target_cond)
        u, c = both.chunk(2)
        return u + 7.0 * (c - u)

    def loop(sampler: DeltaSampler | None):
        x = noise * sigmas[0]
        for i in range(steps):
            if sampler is not None:
                sampler.prefetch(x, sig[i], i, steps)  # as the WebUI hooks do in on_cfg_denoiser
            d = target_denoised(x, i)
            if sampler is not None:
                d = sampler(x, sig[i], i, steps, d)  # as the WebUI hooks call it, once per step
            x = x + (x - d) / sig[i] * (sig[i + 1] - sig[i])  # Euler
        return x

    xs = torch.randn(1, 4, *source_latent, generator=g, device=p.device)
    source_graph = GraphedCall(pair.denoise, name="bench source forward", enabled=cuda)
    with torch.inference_mode(), pair.running():
        for sampler in (None, *samplers.values()):
            loop(sampler)  # warm-up (and the graph's capture)
        t_target = time_ms(lambda: loop(None), repeats, cuda) / steps
        t_eager = time_ms(lambda: loop(samplers[False]), repeats, cuda) / steps
        t_graphs = time_ms(lambda: loop(samplers[True]), repeats, cuda) / steps
        f_target = time_ms(lambda: target_denoised(noise, 0), repeats * 5, cuda)
        f_source = time_ms(lambda: pair.denoise(xs, sig[0], conds), repeats * 5, cuda)
        for _ in range(2):
            source_graph(xs, sig[0], conds)
        f_source_graph = time_ms(lambda: source_graph(xs, sig[0], conds), repeats * 5, cuda)
        flops = source_flops(pair, xs, sig[0], conds)
        peak_target = peak_of(lambda: loop(None), cuda)
        peak_eager = peak_of(lambda: loop(samplers[False]), cuda)
        peak_graphs = peak_of(lambda: loop(samplers[True]), cuda)
        checks = {f"{what}_{kind}": host_work(lambda: loop(sampler), cuda)[i]
                  for what, sampler in (("target_only", None), ("ds_eager", samplers[False]), ("ds_graphs", samplers[True]))
                  for i, kind in enumerate(("syncs", "allocations"))}
    ideal = f_target + f_source
    source_weights = sum(t.numel() * t.element_size() for t in source.unet.parameters()) / 2**30
    if control is not None:   # the ControlNet's weights count as the source's (the goal: source + ControlNet + 0.5 GB)
        source_weights += sum(t.numel() * t.element_size() for t in control.net.model.parameters()) / 2**30
    # the source stays resident during the target-only loop too, so the increase over a target
    # running alone is the activation difference plus the source's weights
    return {"case": name, "latent": f"{latent[0]}x{latent[1]}", "source_latent": f"{source_latent[0]}x{source_latent[1]}",
            "target_only_ms_per_step": t_target, "ds_eager_ms_per_step": t_eager, "ds_graphs_ms_per_step": t_graphs,
            "ratio_eager": t_eager / t_target, "ratio_graphs": t_graphs / t_target,
            "target_forward_ms": f_target, "source_forward_ms": f_source, "source_forward_graph_ms": f_source_graph,
            "source_forward_tflop": flops / 1e12, "source_graph_tflops_per_s": flops / 1e12 / (f_source_graph / 1e3),
            "ideal_ms_per_step": ideal, "overhead_vs_ideal": t_eager / ideal - 1,
            "peak_target_only_gib": peak_target, "peak_ds_eager_gib": peak_eager, "peak_ds_graphs_gib": peak_graphs,
            "source_unet_weights_gib": source_weights,
            "source_unet_weights_fp16_gib": sum(t.numel() * 2 for t in source.unet.parameters()) / 2**30,
            "vram_increase_eager_gib": peak_eager - peak_target + source_weights,
            "vram_increase_graphs_gib": peak_graphs - peak_target + source_weights,
            **{k: v / steps if k.endswith("allocations") else v for k, v in checks.items()}}


def host_work(fn, cuda: bool) -> tuple[int, int]:
    """Host syncs (torch's sync debug mode, as warnings) and CUDA caching-allocator allocations
    during one call of `fn`; (0, 0) off CUDA."""
    if not cuda:
        return 0, 0
    import warnings

    torch.cuda.synchronize()
    before = torch.cuda.memory_stats().get("allocation.all.allocated", 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    allocations = torch.cuda.memory_stats().get("allocation.all.allocated", 0) - before
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    for w in syncs[:3]:
        print(f"sync: {w.filename}:{w.lineno}: {str(w.message)[:120]}", file=sys.stderr)
    return len(syncs), allocations


def source_flops(pair: SourcePair, x: torch.Tensor, sigma: torch.Tensor, conds: PairConditioning) -> float:
    """FLOPs of one source forward as torch's FlopCounterMode counts them (matmuls, convolutions, SDPA)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        pair.denoise(x, sigma, conds)
    return float(counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cases", nargs="+", default=["a", "a-fp8", "b-target", "b-native"],
                        help="a, a-fp8, b-target, b-native, c (SDXL + fp8 SD1.5 source + LoRA, native), "
                             "d (SDXL + SD1.5 source + LoRA + SD1.5 ControlNet, native; issue 12)")
    parser.add_argument("--memory-gib", type=float,
                        help="cap this process's CUDA allocations (torch.cuda.set_per_process_memory_fraction)")
    args = parser.parse_args()
    cuda = not args.tiny and torch.cuda.is_available()
    if cuda and args.memory_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(args.memory_gib * 2**30 / total)
    p = Placement(torch.device("cuda" if cuda else "cpu"), torch.float16 if cuda else torch.float32)
    sd15_cfg, sdxl_cfg = (TINY, TINY_XL) if args.tiny else (SD15, SDXL)
    small, large = ((8, 8), (16, 16)) if args.tiny else ((64, 64), (128, 128))
    meta = {"memory_cap_gib": args.memory_gib, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
            "torch": torch.__version__, "dtype": str(p.dtype).removeprefix("torch."), "steps": args.steps,
            "repeats": args.repeats, "tiny": args.tiny, "command": " ".join(sys.argv)}
    rows: list[dict] = []

    def add(row: dict) -> None:  # written after each case, so a run cut short keeps what it measured
        rows.append(row)
        args.out.write_text(json.dumps({**meta, "rows": rows}, indent=2))
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)

    if {"a", "a-fp8"} & set(args.cases):
        target = model_of(sd15_cfg, Family.SD1, p)
        for case in ("a", "a-fp8"):
            if case in args.cases:
                source = model_of(sd15_cfg, Family.SD1, p, fp8=case == "a-fp8")
                add(run_case(f"({case}) SD1.5 target 512 + SD1.5 source{' fp8' if case == 'a-fp8' else ''}"
                                     " + LoRA r32", target, source, small, "target", True, args.steps, args.repeats,
                                     cuda))
                del source
        del target
    if {"b-target", "b-native", "c", "d"} & set(args.cases):
        target = model_of(sdxl_cfg, Family.SDXL, p)
        for res in ("target", "native"):
            if f"b-{res}" in args.cases:
                source = model_of(sd15_cfg, Family.SD1, p)
                add(run_case(f"(b) SDXL target 1024 + SD1.5 source, {res}", target, source, large, res,
                                     False, args.steps, args.repeats, cuda))
                del source
        if "c" in args.cases:
            source = model_of(sd15_cfg, Family.SD1, p, fp8=True)
            add(run_case("(c) SDXL target 1024 + SD1.5 source fp8 + LoRA r32, native", target, source, large,
                                 "native", True, args.steps, args.repeats, cuda))
            del source
        if "d" in args.cases:
            source = model_of(sd15_cfg, Family.SD1, p)
            add(run_case("(d) SDXL target 1024 + SD1.5 source + LoRA r32 + SD1.5 ControlNet, native", target, source,
                         large, "native", True, args.steps, args.repeats, cuda, controlnet=True))


if __name__ == "__main__":
    main()
