"""The `generate` command's flags. Importing this needs no torch, so `--help` works before the
runtime is installed; the Delta Sampling flags come from the one settings definition."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..engine.settings import FIELDS, DeltaSettings
from ..runtime.preprocess import PREPROCESSORS

ADAPTER_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")
# The runner's samplers and schedule types, as runner/sampling.py builds them (test_cli checks).
SAMPLER_NAMES = ("Euler", "Euler a", "DPM++ 2M")
SCHEDULE_LABELS = ("Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform", "KL Optimal",
                   "Align Your Steps", "Simple", "Normal", "DDIM")
# A1111's own UI limits (modules/ui.py sliders: steps 1-150, batch size 1-8, width/height 64-2048,
# CFG 1-30), checked before anything loads: a typo must not run for hours or allocate gigabytes
MAX_STEPS, MAX_BATCH, MAX_SIZE, MAX_CFG = 150, 8, 2048, 30.0
# Settings given by their own flags (paths), implied by running `generate`, or without meaning
# here (the runner has no hires pass).
NOT_FLAGS = {"enabled", "source_checkpoint", "adapted_checkpoint", "hires", "control_model", "control_image",
             "ip_adapter", "ip_encoder", "ip_image"}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default only where it has one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, [], "") or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    models = parser.add_argument_group("models")
    models.add_argument("--target", type=Path, required=True, help="the model you generate with (SD1.x, SD2.x, SDXL)")
    models.add_argument("--source", type=Path, required=True, help="the source base checkpoint the adaptation was made for")
    models.add_argument("--adapted", type=Path, help="an adapted (fine-tuned) checkpoint of the source's family")
    models.add_argument("--control", type=Path,
                        help="a ControlNet of the source's family, applied to the adapted source (SD1.x/SD2.x/SDXL, "
                             "lllyasviel or diffusers layout)")
    models.add_argument("--control-image", type=Path,
                        help="the ControlNet's input image, already preprocessed (an edge, depth or pose map)")
    models.add_argument("--ip-adapter", type=Path,
                        help="an IP-Adapter of the source's family (ip-adapter_sd15, ip-adapter-plus_sd15, ...), applied "
                             "to the adapted source; needs --ip-encoder and --ip-image")
    models.add_argument("--ip-encoder", type=Path, help="the IP-Adapter's CLIP vision encoder (HF layout)")
    models.add_argument("--ip-image", type=Path, help="the image prompt for the IP-Adapter")
    models.add_argument("--vae", type=Path, help="VAE file for decoding (default: the target checkpoint's own)")
    models.add_argument("--lora-dir", type=Path, action="append", default=[],
                        help="folder holding the <lora:NAME> files (searched with its subfolders; repeatable)")
    models.add_argument("--embeddings-dir", type=Path, action="append", default=[], help="textual-inversion folder")
    models.add_argument("--prediction", default="auto", help="target prediction type: auto, eps or v")
    models.add_argument("--source-prediction", default="auto", help="source prediction type: auto, eps or v")
    models.add_argument("--vocab", type=Path, action="append", default=[],
                        help="CLIP vocabulary: open_clip's bpe_simple_vocab_16e6.txt.gz or a tokenizer folder "
                             "(found by itself when open_clip_torch is installed)")
    models.add_argument("--device", default="auto", help="auto, cuda, cuda:N, mps or cpu")
    models.add_argument("--dtype", default="auto",
                        help="auto, fp16, bf16, fp32, or fp8: the source UNet's weights stored in 8 bits (half the "
                             "memory), computed as auto")
    models.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                        help="run the source's step eagerly (on NVIDIA GPUs it is replayed as a CUDA graph)")

    gen = parser.add_argument_group("generation")
    gen.add_argument("--prompt", default="", help="the prompt (extra-network tags are removed)")
    gen.add_argument("--negative", default="", help="the negative prompt")
    gen.add_argument("--steps", type=int, default=20, help=f"sampling steps, 1 to {MAX_STEPS}")
    gen.add_argument("--cfg", type=float, default=7.0,
                     help=f"CFG scale of the target (and of the source unless set), 0 to {MAX_CFG:g}")
    gen.add_argument("--sampler", default="Euler", help=f"one of: {', '.join(SAMPLER_NAMES)}")
    gen.add_argument("--schedule-type", default="Automatic", help=f"one of: {', '.join(SCHEDULE_LABELS)}")
    gen.add_argument("--timesteps", default="interpolate", choices=("interpolate", "nearest"),
                     help="sigma -> timestep: interpolate (A1111) or nearest (Forge, ComfyUI)")
    gen.add_argument("--seed", type=int, default=-1, help="-1: random")
    gen.add_argument("--width", type=int, default=512, help=f"a multiple of 8 from 64 to {MAX_SIZE}")
    gen.add_argument("--height", type=int, default=512, help=f"a multiple of 8 from 64 to {MAX_SIZE}")
    gen.add_argument("--batch", type=int, default=1, help=f"images generated together, 1 to {MAX_BATCH}")
    gen.add_argument("--out", default="delta.png",
                     help="NAME.png (NAME-1.png ... for a batch), or a folder DIR/ to number new images in "
                          "as the WebUI does (00012-SEED.png)")
    gen.add_argument("--overwrite", action="store_true", help="replace output files that exist (default: refuse)")
    gen.add_argument("--compare", action="store_true", help="also write NAME-nodelta.png: the target alone")
    gen.add_argument("--compare-converted", type=Path, metavar="LORA",
                     help="also write NAME-converted.png: a labelled grid of this image, the target with LORA (the "
                          "adapter converted for it by `convert`) and the target with the original adapter copied "
                          "unchanged; target and source of one architecture")
    gen.add_argument("--latent-out", help="save the final latents as NAME.safetensors")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")

    ds = parser.add_argument_group("Delta Sampling (the same settings as the WebUI accordion)")
    for spec in FIELDS:
        if spec.name in NOT_FLAGS:
            continue
        extra = f" One of: {', '.join(spec.choices)}." if spec.kind == "choice" else ""
        if spec.kind == "preprocessor":     # no WebUI here: the built-in set
            extra = f" Here one of: {', '.join(PREPROCESSORS)}."
        default = spec.format(spec.default) or "empty"
        ds.add_argument(flag(spec.name), dest=f"ds_{spec.name}", default=None, metavar=spec.kind.upper(),
                        help=f"{spec.tooltip}{extra} Default: {default}.")


def settings_from_args(args: argparse.Namespace) -> DeltaSettings:
    values: dict[str, object] = {"enabled": True, "source_checkpoint": args.source.name,
                                 "adapted_checkpoint": args.adapted.name if args.adapted else ""}
    control = getattr(args, "control", None)
    if control is not None:
        values["control_model"] = control.stem   # the images themselves are read by the generate command
    for name in ("ip_adapter", "ip_encoder"):
        path = getattr(args, name, None)
        if path is not None:
            values[name] = path.stem
    for spec in FIELDS:
        raw = getattr(args, f"ds_{spec.name}", None)
        if raw is not None:
            values[spec.name] = spec.parse(raw, source="command-line")
    return DeltaSettings.from_dict(values, source="command-line")
