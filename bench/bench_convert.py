"""Time to convert a rank-32 SDXL LoRA for another SDXL-architecture model (issue 13), first with
an empty SVD cache, then again with the SVDs cached.

    python bench/bench_convert.py --out results.json                # full-size SDXL, CUDA if present
    python bench/bench_convert.py --tiny --out tiny.json            # tiny models: checks the script runs

The two checkpoints are full-size SDXL files with random weights (fp16, UNet + both text
encoders + VAE, the real single-file layout; tests/hosts/models.py writes them streamed), the LoRA
a kohya file on every attention projection of the UNet and both text encoders, named through the
runtime's own key map. The conversion is the real path (`bake.convert.convert_lora`), reading each
layer from the files.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "hosts")]

from lib_deltasampling.bake.cache import SubspaceCache  # noqa: E402
from lib_deltasampling.bake.convert import ModelWeights, convert_lora  # noqa: E402

ATTENTION = (".to_q", ".to_k", ".to_v", ".to_out.0", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
             "self_attn.out_proj")


def write_models(folder: Path, tiny: bool) -> tuple[Path, Path]:
    if tiny:
        import factories
        return (factories.write_checkpoint(folder / "source.safetensors", "sdxl", seed=1),
                factories.write_checkpoint(folder / "target.safetensors", "sdxl", seed=2))
    import models
    return (models.write_checkpoint(folder / "source.safetensors", "sdxl", seed=1),
            models.write_checkpoint(folder / "target.safetensors", "sdxl", seed=2))


def write_lora(path: Path, source: Path, rank: int) -> int:
    """A kohya LoRA on every attention projection the source's key map names; its layer count."""
    from safetensors.torch import save_file

    weights = ModelWeights(source)
    gen = torch.Generator().manual_seed(3)
    tensors: dict[str, torch.Tensor] = {}
    for component in weights.keymap.components:
        for target in weights.keymap.targets(component):
            name = weights.keymap.kohya_name(target)
            if name is None or not any(name.replace("_", ".").endswith(a.replace("_", ".")) for a in ATTENTION):
                continue
            out, in_ = weights.weight(target).shape[:2]
            tensors[f"{name}.lora_down.weight"] = (torch.randn(rank, in_, generator=gen) / math.sqrt(in_)).half()
            tensors[f"{name}.lora_up.weight"] = (torch.randn(out, rank, generator=gen) / math.sqrt(rank)).half()
            tensors[f"{name}.alpha"] = torch.tensor(float(rank), dtype=torch.float16)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora", "ss_base_model_version": "sdxl"})
    return len(tensors) // 3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--runs", nargs="+", default=["no_cache", "first", "cached"],
                        choices=["no_cache", "first", "cached"], help="which conversions to time (cached needs first)")
    args = parser.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    meta = {"date": datetime.date.today().isoformat(), "command": " ".join(sys.argv), "device": device,
            "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
            "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        source, target = write_models(folder, args.tiny)
        layers = write_lora(folder / "lora.safetensors", source, args.rank)
        meta["write_models_s"] = round(time.perf_counter() - t0, 1)
        cache = SubspaceCache(folder / "svd")
        hashes: dict[Path, str] = {}

        def file_sha256(path: Path) -> str:          # hashing is timed apart: the runner caches it per file
            from lib_deltasampling.runtime.checkpoint import file_sha256 as sha
            if path not in hashes:
                hashes[path] = sha(path)
            return hashes[path]

        for p in (source, target):
            start = time.perf_counter()
            file_sha256(p)
            meta[f"sha256_{p.stem}_s"] = round(time.perf_counter() - start, 1)
        runs = {}
        for label, use_cache in (("no_cache", False), ("first", True), ("cached", True)):
            if label not in args.runs:
                continue
            if device.startswith("cuda"):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            report = convert_lora(source, target, folder / "lora.safetensors", folder / f"out-{label}.safetensors",
                                  rank=args.rank, threshold=0.0, device=device, cache=cache if use_cache else None,
                                  file_sha256=file_sha256)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            runs[label] = {"seconds": round(time.perf_counter() - start, 2), "layers": len(report.layers),
                           "transferred": len(report.transferred),
                           "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3)
                           if device.startswith("cuda") else None}
            print(json.dumps({label: runs[label]}), flush=True)
        meta.update(lora_layers=layers, rank=args.rank, runs=runs,
                    cache_mib=round(sum(f.stat().st_size for f in (folder / "svd").rglob("*")) / 2**20, 1))
    args.out.write_text(json.dumps(meta, indent=2))
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
