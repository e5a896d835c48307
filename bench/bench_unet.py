"""Time one UNet forward of the runtime against diffusers' UNet2DConditionModel.

    python bench/bench_unet.py --out results.json            # CUDA, fp16, full-size SD1.5 and SDXL
    python bench/bench_unet.py --tiny --out tiny.json        # CPU smoke run with tiny models

Both models get the same random weights: drawn in the LDM layout, then converted
with diffusers' own single-file conversion (ours is reloaded through the runtime's
strict loader). Peak allocated memory of one forward is measured with each model
alone on the device (the other freed first; weights included, and the "working"
columns subtract what was allocated before the forward). Times are the median of N
forwards after warm-up, timed with CUDA events, taken in alternating rounds with
both models resident so that drift of GPU clocks or of the host CPU (the small-latent
cases are launch-bound) affects both alike. The outputs of both are compared as a
sanity check. diffusers runs its default attention
processor (SDPA). Needs torch with CUDA and diffusers; not part of the test suite.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the package is beside bench/

from lib_deltasampling.runtime.checkpoint import TensorStore  # noqa: E402
from lib_deltasampling.runtime.unet import UNetModel, load_unet  # noqa: E402
from lib_deltasampling.runtime.unet_config import UNetConfig  # noqa: E402

PREFIX = "model.diffusion_model."

# Full-size layouts as in the families' yaml files (v1-inference.yaml, sd_xl_base.yaml).
MODELS = {
    "sd15": dict(
        config=UNetConfig(
            in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=(2, 2, 2, 2),
            transformer_depth=(1, 1, 1, 1, 1, 1, 0, 0),
            transformer_depth_output=(0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1), transformer_depth_middle=1,
            context_dim=768, num_heads=8, use_linear_in_transformer=False),
        original=dict(in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
                      num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, transformer_depth=1,
                      context_dim=768, use_linear_in_transformer=False),
        pooled=None),
    "sdxl": dict(
        config=UNetConfig(
            in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4), num_res_blocks=(2, 2, 2),
            transformer_depth=(0, 0, 2, 2, 10, 10),
            transformer_depth_output=(10, 10, 10, 2, 2, 2, 0, 0, 0), transformer_depth_middle=10,
            context_dim=2048, num_head_channels=64, use_linear_in_transformer=True, adm_in_channels=2816),
        original=dict(in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2],
                      num_res_blocks=2, channel_mult=[1, 2, 4], num_head_channels=64, transformer_depth=[0, 2, 10],
                      context_dim=2048, use_linear_in_transformer=True, num_classes="sequential",
                      adm_in_channels=2816),
        pooled=1280),
}
CASES = [(4, 64), (2, 128)]  # (batch, latent side): 512 px x4 and 1024 px x2

# --tiny: same families shrunk, for a CPU run that proves the script works.
TINY_MODELS = {
    "sd15": dict(
        config=UNetConfig(
            in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=(1, 1, 1),
            transformer_depth=(1, 1, 0), transformer_depth_output=(0, 0, 1, 1, 1, 1), transformer_depth_middle=1,
            context_dim=64, num_heads=8, use_linear_in_transformer=False),
        original=dict(in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1, 2],
                      num_res_blocks=1, channel_mult=[1, 2, 2], num_heads=8, transformer_depth=1,
                      context_dim=64, use_linear_in_transformer=False),
        pooled=None),
    "sdxl": dict(
        config=UNetConfig(
            in_channels=4, out_channels=4, model_channels=64, channel_mult=(1, 2), num_res_blocks=(1, 1),
            transformer_depth=(0, 2), transformer_depth_output=(2, 2, 0, 0), transformer_depth_middle=2,
            context_dim=1280, num_head_channels=64, use_linear_in_transformer=True, adm_in_channels=32 + 1536),
        original=dict(in_channels=4, out_channels=4, model_channels=64, attention_resolutions=[2],
                      num_res_blocks=1, channel_mult=[1, 2], num_head_channels=64, transformer_depth=[0, 2],
                      context_dim=1280, use_linear_in_transformer=True, num_classes="sequential",
                      adm_in_channels=32 + 1536),
        pooled=32),
}
TINY_CASES = [(2, 16), (1, 24)]


# ---------------------------------------------------------------------------- models

@torch.no_grad()
def random_ours(config: UNetConfig, device: torch.device, dtype: torch.dtype, seed: int) -> UNetModel:
    """Our UNet with weights ~ N(0, 1/fan_in), biases ~ 0.1 N, norm scales ~ 1 + 0.1 N (activations stay O(1))."""
    model = UNetModel(config, device=device, dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        noise = torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32)
        if p.dim() >= 2:
            p.copy_(noise / math.sqrt(math.prod(p.shape[1:])))
        elif name.endswith(".weight"):
            p.copy_(1.0 + 0.1 * noise)
        else:
            p.copy_(0.1 * noise)
    return model.eval().requires_grad_(False)


def diffusers_from_ldm(original: dict, ldm_state: dict[str, torch.Tensor], device: torch.device,
                       dtype: torch.dtype):
    """diffusers' UNet with diffusers' own config derivation and checkpoint conversion."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    ckpt = {PREFIX + k: v for k, v in ldm_state.items()}
    original_config = {"model": {"params": {"unet_config": {"params": original},
                                            "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}
    config = create_unet_diffusers_config_from_ldm(original_config, ckpt)
    if original.get("num_classes") == "sequential":  # SDXL (diffusers only guesses it for context 2048/1280)
        config.update(class_embed_type=None, addition_embed_type="text_time", addition_time_embed_dim=256)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    converted = convert_ldm_unet_checkpoint(ckpt, unet.config)
    unet.load_state_dict(converted, strict=True, assign=True)
    unet = unet.to(device=device, dtype=dtype).eval().requires_grad_(False)
    processors = sorted({type(p).__name__ for p in unet.attn_processors.values()})
    return unet, processors


# ---------------------------------------------------------------------------- inputs and timing

def make_inputs(spec: dict, batch: int, side: int, device: torch.device, dtype: torch.dtype, seed: int) -> dict:
    from diffusers.models.embeddings import get_timestep_embedding

    gen = torch.Generator().manual_seed(seed)
    config: UNetConfig = spec["config"]
    inp = {
        "x": torch.randn(batch, 4, side, side, generator=gen),
        "t": torch.linspace(999.0, 1.5, batch),
        "context": torch.randn(batch, 77, config.context_dim, generator=gen),
    }
    if spec["pooled"]:
        pooled = torch.randn(batch, spec["pooled"], generator=gen)
        time_ids = torch.tensor([[side * 8.0, side * 8.0, 0.0, 0.0, side * 8.0, side * 8.0]]).repeat(batch, 1)
        ids = get_timestep_embedding(time_ids.flatten(), 256, flip_sin_to_cos=True, downscale_freq_shift=0)
        inp.update(pooled=pooled, time_ids=time_ids, y=torch.cat([pooled, ids.reshape(batch, -1)], dim=-1))
    return {k: (v.to(device, dtype) if k != "t" else v.to(device)) for k, v in inp.items()}


def call_ours(model: UNetModel, inp: dict):
    return lambda: model(inp["x"], inp["t"], inp["context"], inp.get("y"))


def call_diffusers(unet, inp: dict):
    extra = {}
    if "time_ids" in inp:
        extra["added_cond_kwargs"] = {"text_embeds": inp["pooled"], "time_ids": inp["time_ids"]}
    return lambda: unet(inp["x"], inp["t"], encoder_hidden_states=inp["context"], return_dict=False, **extra)[0]


def peak_memory(fn, device: torch.device, warmup: int) -> tuple[int | None, int | None]:
    """(peak allocated bytes, peak minus what was allocated before) of one forward."""
    if device.type != "cuda":
        return None, None
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        free(device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del out
    return peak, peak - before


def time_one(fn, device: torch.device) -> tuple[float, torch.Tensor]:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end), out
    t0 = time.perf_counter()
    out = fn()
    return (time.perf_counter() - t0) * 1000, out


def time_interleaved(fns: dict, device: torch.device, warmup: int, iters: int) -> dict:
    """Forward ms of each function, taken in alternating rounds so that clock or host-CPU
    drift during the run hits both alike. Returns {name: (times, last output on CPU)}."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    outs = {}
    with torch.inference_mode():
        for _ in range(warmup):
            for n in names:
                fns[n]()
        for i in range(iters):
            for n in (names if i % 2 == 0 else names[::-1]):
                ms, out = time_one(fns[n], device)
                times[n].append(ms)
                outs[n] = out
    return {n: (times[n], outs[n].float().cpu()) for n in names}


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------- main

def bench_model(spec: dict, cases: list, device: torch.device, dtype: torch.dtype, warmup: int, iters: int) -> list[dict]:
    config: UNetConfig = spec["config"]
    inputs = {case: make_inputs(spec, *case, device, dtype, seed=1) for case in cases}
    mem: dict[tuple, dict] = {case: {} for case in cases}

    # 1. ours alone on the device: peak memory
    ours = random_ours(config, device, dtype, seed=0)
    ldm_state = {k: v.cpu() for k, v in ours.state_dict().items()}
    for case in cases:
        mem[case]["ours"] = peak_memory(call_ours(ours, inputs[case]), device, warmup)
    del ours
    free(device)

    # 2. diffusers alone (same weights through diffusers' conversion): peak memory
    ref, processors = diffusers_from_ldm(spec["original"], ldm_state, device, dtype)
    for case in cases:
        mem[case]["diffusers"] = peak_memory(call_diffusers(ref, inputs[case]), device, warmup)

    # 3. ours again, through the runtime's own strict loader; both resident: interleaved timing
    ours = load_unet(TensorStore.from_dict(ldm_state), config, device=device, dtype=dtype)
    del ldm_state
    rows = []
    for case in cases:
        r = time_interleaved({"ours": call_ours(ours, inputs[case]), "diffusers": call_diffusers(ref, inputs[case])},
                             device, warmup, iters)
        (ta, a), (tb, b) = r["ours"], r["diffusers"]
        (pa, wa), (pb, wb) = mem[case]["ours"], mem[case]["diffusers"]
        batch, side = case
        rows.append({
            "batch": batch, "latent": f"{side}x{side}",
            "ours_ms": round(statistics.median(ta), 3), "diffusers_ms": round(statistics.median(tb), 3),
            "time_ratio": round(statistics.median(ta) / statistics.median(tb), 4),
            "ours_min_ms": round(min(ta), 3), "diffusers_min_ms": round(min(tb), 3),
            "ours_peak_gib": _gib(pa), "diffusers_peak_gib": _gib(pb),
            "ours_working_gib": _gib(wa), "diffusers_working_gib": _gib(wb),
            "max_abs_diff": (a - b).abs().max().item(), "out_abs_max": b.abs().max().item(),
            "diffusers_attention": processors,
        })
    del ours, ref, inputs
    free(device)
    return rows


def run(args) -> dict:
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.float16
    models = TINY_MODELS if args.tiny else MODELS
    cases = TINY_CASES if args.tiny else CASES
    warmup, iters = (1, 3) if args.tiny else (args.warmup, args.iters)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("CUDA is not available: run with --tiny for a CPU smoke run")

    rows = []
    for name in args.models:
        for row in bench_model(models[name], cases, device, dtype, warmup, iters):
            rows.append({"model": name, **row})
            print(_row_line(rows[-1]), flush=True)

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "diffusers": __import__("diffusers").__version__, "python": platform.python_version(),
        "warmup": warmup, "iters": iters, "tiny": args.tiny, "rows": rows,
    }


def _gib(n: int | None) -> float | None:
    return None if n is None else round(n / 2**30, 3)


HEADER = ("| model | batch | latent | ours ms | diffusers ms | ratio | ours peak GiB | diffusers peak GiB "
          "| ours working GiB | diffusers working GiB | max abs diff |\n" + "|---" * 11 + "|")


def _row_line(r: dict) -> str:
    return (f"| {r['model']} | {r['batch']} | {r['latent']} | {r['ours_ms']:.2f} | {r['diffusers_ms']:.2f} "
            f"| {r['time_ratio']:.3f} | {r['ours_peak_gib']} | {r['diffusers_peak_gib']} | {r['ours_working_gib']} "
            f"| {r['diffusers_working_gib']} | {r['max_abs_diff']:.3g} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the results")
    parser.add_argument("--tiny", action="store_true", help="tiny models on CPU (checks that the script runs)")
    parser.add_argument("--models", nargs="+", default=["sd15", "sdxl"], choices=["sd15", "sdxl"])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=30)
    args = parser.parse_args()
    print(HEADER, flush=True)
    result = run(args)
    table = "\n".join([HEADER] + [_row_line(r) for r in result["rows"]])
    print(f"\n{result['device']}, {result['dtype']}, torch {result['torch']}, diffusers {result['diffusers']}, "
          f"median of {result['iters']} after {result['warmup']} warm-up, {result['date']}\n{table}")
    args.out.write_text(json.dumps({**result, "table": table}, indent=2))


if __name__ == "__main__":
    main()
