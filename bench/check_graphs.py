"""GPU check (not in CI): the CUDA-graph path of the source step gives the eager path's results.

    python bench/check_graphs.py --vocab bpe_simple_vocab_16e6.txt.gz [--out results.json]

For every family (SD1, SD2 v-prediction, SDXL; the tests' small random checkpoints in the real
single-file layout) and adaptation (LoRA, LoHa, LoKr, DoRA, an adapted fine-tune), two generations
with different prompts, seeds and sizes are run through the standalone runner on CUDA fp16, once
with the graphs (the default) and once with --no-cuda-graphs; the final latents must agree within
fp16 tolerance, and the graphed runs must have captured and replayed. Exit code 1 on any miss.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import factories  # noqa: E402
from lib_deltasampling.__main__ import main as cli  # noqa: E402
from lib_deltasampling.runtime import graphs  # noqa: E402
from test_adapters import build_adapter  # noqa: E402

KINDS = {"lora": ("lora", {}), "loha": ("loha", {}), "lokr": ("lokr", {}), "dora": ("lora", {"dora": "out"}),
         "finetune": (None, {})}
GENERATIONS = [("a fox in the snow", "7", "64", "64", "style"), ("(a red house:1.2), night", "123", "96", "64", "ink")]
TOLERANCE = 2e-3  # relative to the latent's largest magnitude; fp16 replays usually match bit for bit


def count_graphs() -> dict[str, int]:
    """Count captures and replays of every GraphedCall, through `__call__` and `launch` alike."""
    counts = {"captures": 0, "replays": 0}
    load, capture = graphs.GraphedCall._load, graphs.GraphedCall._capture

    def counted_load(self, *args):
        counts["replays"] += 1
        return load(self, *args)

    def counted_capture(self, *args):
        entry = capture(self, *args)
        counts["captures"] += entry is not None
        return entry

    graphs.GraphedCall._load, graphs.GraphedCall._capture = counted_load, counted_capture
    return counts


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vocab", required=True)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--steps", default="6")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the script itself (nothing is graphed)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA device")
        return 2
    counts = count_graphs()
    rows, failed = [], False
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for family in factories.FAMILIES:
            base = factories.checkpoint_tensors(family, seed=5)
            source = d / f"{family}-source.safetensors"
            save_file(base, str(source))
            target = factories.write_checkpoint(d / f"{family}-target.safetensors", family, seed=1, vae=True)
            prediction = ["--source-prediction", "v", "--prediction", "v"] if family == "sd2" else []
            for kind, (algorithm, options) in KINDS.items():
                lora_dir = d / f"lora-{family}-{kind}"
                lora_dir.mkdir()
                extra = []
                if algorithm is None:
                    adapted = factories.write_checkpoint(d / f"{family}-adapted.safetensors", family, seed=9)
                    extra = ["--adapted", str(adapted)]
                else:
                    adapter, _ = build_adapter(family, "kohya", algorithm, base, **options)
                    save_file(adapter, str(lora_dir / "style.safetensors"))
                for i, (prompt, seed, width, height, words) in enumerate(GENERATIONS):
                    adapters = f"<lora:style:0.8> {words}" if algorithm else words
                    latents = {}
                    for graphed in (True, False):
                        counts.update(captures=0, replays=0)
                        out = d / f"{family}-{kind}-{i}-{graphed}"
                        code = cli(["generate", "--target", str(target), "--source", str(source), *extra, *prediction,
                                    "--lora-dir", str(lora_dir), "--vocab", args.vocab, "--device", args.device,
                                    "--dtype", "fp16" if args.device == "cuda" else "fp32", "--steps", args.steps, "--seed", seed, "--width", width,
                                    "--height", height, "--prompt", prompt, "--adapters", adapters, "--scale", "2",
                                    "--sampler", "DPM++ 2M", "--quiet", "--out", str(out) + ".png",
                                    "--latent-out", str(out) + ".safetensors",
                                    *([] if graphed else ["--no-cuda-graphs"])])
                        assert code == 0, (family, kind, graphed)
                        latents[graphed] = load_file(str(out) + ".safetensors")["latent"]
                        if graphed:
                            used = dict(counts)
                    diff = (latents[True] - latents[False]).abs().max().item()
                    scale = latents[False].abs().max().item()
                    ok = diff <= TOLERANCE * scale and used["captures"] >= 1 and used["replays"] >= 2
                    failed |= not ok
                    rows.append({"family": family, "adaptation": kind, "generation": i, "size": f"{width}x{height}",
                                 "max_abs_diff": diff, "latent_max": scale, **used, "ok": ok})
                    print(json.dumps(rows[-1]))
    meta = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__, "tolerance": TOLERANCE}
    if args.out:
        args.out.write_text(json.dumps({**meta, "rows": rows}, indent=2))
    print(f"{sum(r['ok'] for r in rows)}/{len(rows)} ok on {meta['device']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
