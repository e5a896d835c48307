"""`python -m lib_deltasampling convert`: bake a LoRA for another model of the same architecture
(lib_deltasampling/bake). The flags are defined without importing torch (--help works before it
is installed)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEFAULT_THRESHOLD = 0.8          # bake/prolora.py's defaults, repeated here to keep torch out of --help
DEFAULT_SUBSPACE_RANK = 320


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source-base", type=Path, required=True, help="the base checkpoint the LoRA was made for")
    parser.add_argument("--target", type=Path, required=True,
                        help="the checkpoint to convert it for (same architecture: SD1.5 -> an SD1.5 fine-tune, "
                             "SDXL -> Pony/Illustrious/NoobAI)")
    parser.add_argument("--lora", type=Path, required=True, help="the LoRA/LyCORIS file (LoRA, LoCon, LoHa, LoKr, DoRA)")
    parser.add_argument("--out", type=Path, required=True, help="the converted LoRA (.safetensors, kohya format)")
    parser.add_argument("--rank", type=int, default=None,
                        help="rank of the converted layers. Default: each layer's own rank (32 for LoHa/LoKr/full)")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help="subspace similarity (0-1) a layer needs to be transferred")
    parser.add_argument("--subspace-rank", type=int, default=DEFAULT_SUBSPACE_RANK,
                        help="singular vectors that span a weight's subspace (at most its smaller side)")
    parser.add_argument("--device", default="auto", help="where the SVDs run: auto (CUDA when present), cpu, cuda:1...")
    parser.add_argument("--no-cache", action="store_true",
                        help="do not keep the SVDs on disk (default: kept per model file and layer, so the next "
                             "LoRA for the same models converts much faster; $DELTA_SAMPLING_SVD_CACHE names the folder)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists (default: refuse)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> list[str]:
    """Convert; the report's lines (the progress bar goes to stderr)."""
    import torch

    from ..bake.cache import SubspaceCache
    from ..bake.convert import convert_lora
    from ..errors import SettingError
    from .hashcache import sha256

    if args.out.suffix.lower() != ".safetensors":
        raise SettingError("convert --out", f"{str(args.out)!r} is not a .safetensors file",
                           "Name the output NAME.safetensors (the WebUIs' LoRA folders list those)")
    if args.out.exists() and not args.overwrite:
        raise SettingError("convert --out", f"{args.out} exists", "Add --overwrite to replace it, or choose another name")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        raise SettingError("convert --device", f"{args.device!r} is not usable here ({exc})",
                           "Use auto, cpu, or a CUDA device this machine has") from None
    cache = None if args.no_cache else SubspaceCache()
    start = time.perf_counter()

    def progress(done: int, total: int, name: str) -> None:
        if args.quiet or total == 0:
            return
        bar = "#" * (24 * done // total)
        end = "\n" if done == total else ""
        print(f"\rconverting [{bar:<24}] {done}/{total} layers", end=end, file=sys.stderr, flush=True)

    report = convert_lora(args.source_base, args.target, args.lora, args.out, rank=args.rank, threshold=args.threshold,
                          subspace_rank=args.subspace_rank, device=device, overwrite=args.overwrite,
                          progress=progress, cache=cache, file_sha256=sha256)
    summary = report.summary()
    lines = [f"{args.out}: {summary['transferred']} of {summary['layers']} layers transferred in "
             f"{time.perf_counter() - start:.1f} s (similarity min {summary['similarity_min']}, "
             f"mean {summary['similarity_mean']}, threshold {args.threshold:g}; on {device}"
             + (f"; SVD cache: {cache.hits} reused, {cache.misses} computed" if cache else "") + ")"]
    for result in report.dropped[:20]:
        lines.append(f"  dropped {result.name}: {result.reason}")
    if len(report.dropped) > 20:
        lines.append(f"  ... and {len(report.dropped) - 20} more dropped ({summary['dropped']})")
    return lines
