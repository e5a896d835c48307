"""`python -m lib_deltasampling demo`: Delta Sampling end to end on the shipped miniature models, no
downloads. The SD1-layout mini model has a style LoRA ("stripes"); the SDXL-layout mini model
generates, and the delta between the SD1 model with and without its LoRA carries the style over.
Writes a labelled grid: the target alone | Delta Sampling | the oracle (the same LoRA trained on
the target itself), and prints the world classifier's style score of each column."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..errors import SettingError

PROMPTS = ("a red circle on sand", "a blue square above a yellow triangle, on sky",
           "a green triangle left of a red square, on snow", "a yellow circle on night")
DEMO_SCALE = 4.0      # the quality study's chosen scale for the cross-latent pair (docs/QUALITY.md)
NEEDED = ("sd1.safetensors", "sdxl.safetensors", "classifier.safetensors",
          "lora/style-sd1.safetensors", "lora/style-sdxl.safetensors")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from . import DEFAULT_FOLDER
    p.add_argument("--out", type=Path, default=Path("delta-demo.png"), help="the grid PNG (default: delta-demo.png)")
    p.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    p.add_argument("--models", type=Path, default=DEFAULT_FOLDER,
                   help="the miniature models (default: the ones shipped in lib_deltasampling/lab/minis)")
    p.add_argument("--scale", type=float, default=DEMO_SCALE, help=f"Delta scale (default {DEMO_SCALE:g})")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--vocab", help="CLIP vocabulary: open_clip's bpe_simple_vocab_16e6.txt.gz or a tokenizer folder "
                                   "(default: found where open_clip or a WebUI keeps it)")
    p.add_argument("--device", default="cpu")


def run(args: argparse.Namespace) -> list[str]:
    missing = [n for n in NEEDED if not (args.models / n).is_file()]
    if missing:
        raise SettingError("--models", f"{args.models} lacks the miniature models ({', '.join(missing)})",
                           f"Regenerate them: python -m lib_deltasampling.lab.train --out {args.models}")
    if args.out.exists() and not args.overwrite:
        raise SettingError("--out", f"{args.out} exists", "Pass --overwrite or choose another --out")
    import numpy as np

    from ..runner.grid import labelled_grid
    from ..runner.png import write_png
    from .generate import Lab, Transfer, generate
    from .metrics import evaluate

    started = time.perf_counter()
    lab = Lab(args.models, args.device, args.vocab)
    prompts = list(PROMPTS)
    seeds = [args.seed + i for i in range(len(prompts))]
    columns = {
        "SDXL-mini alone": generate(lab, "sdxl", prompts, seeds),
        f"DS: SD1-mini+LoRA x{args.scale:g}": generate(lab, "sdxl", prompts, seeds,
                                                       transfer=Transfer("sd1", "style", scale=args.scale)),
        "oracle: LoRA on SDXL": generate(lab, "sdxl", prompts, seeds, target_lora="style"),
    }
    scenes = [_scene(p) for p in prompts]
    lines = []
    for label, images in columns.items():
        score = evaluate(lab.classifier(), images, scenes)
        lines.append(f"{label:32} style {score['style']:.2f}  content {score['content']:.2f}")
    big = [np.repeat(np.repeat(c, 3, axis=1), 3, axis=2) for c in columns.values()]
    path = write_png(args.out, labelled_grid(big, list(columns)), overwrite=args.overwrite)
    return [*lines, f"{time.perf_counter() - started:.1f} s", str(path)]


def _scene(prompt: str):
    """The `Scene` a demo prompt describes (the classifier's labels for it)."""
    from . import world
    head, _, background = prompt.rpartition(" on ")
    head = head.rstrip(",")
    words = head.replace("left of", "left_of").split()
    if len(words) == 3:
        return world.Scene("single", ((words[2], words[1]),), background)
    layout = "above" if words[3] == "above" else "left"
    return world.Scene(layout, ((words[2], words[1]), (words[6], words[5])), background)
