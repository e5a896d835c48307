"""Command line: `python -m lib_deltasampling inspect FILE...`, `generate ...`, `convert ...`, `demo`.

Exit codes: 0 ok, 2 a user error (one clear line, no traceback), 1 an internal error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import UserError


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{nbytes} B"
        nbytes /= 1024
    raise AssertionError


def inspect_file(path: Path) -> list[str]:
    """Lines describing a checkpoint, an adapter (LoRA/LyCORIS) or a textual-inversion embedding."""
    from .errors import ModelFileError
    from .runtime.adapters.keys import group_layers
    from .runtime.checkpoint import open_store
    from .runtime.detect import UNET_PREFIX

    if path.suffix.lower() == ".png":
        return _describe(path, "embedding", _embedding(path))
    try:
        store = open_store(path)
    except ModelFileError as e:
        if "holds no tensors" not in str(e):  # a .pt embedding nests its tensors
            raise
        return _describe(path, "embedding", _embedding(path))
    if not store.has_prefix(UNET_PREFIX) and group_layers(store.keys())[0]:
        from .runtime.adapters.apply import describe_adapter_file
        return _describe(path, "adapter", describe_adapter_file(store))
    if not store.has_prefix(UNET_PREFIX) and len(store) <= 4:
        return _describe(path, "embedding", _embedding(path))
    return _checkpoint_lines(path, store)


def _embedding(path: Path) -> dict:
    from .runtime.text.embeddings import describe_embedding_file
    return describe_embedding_file(path)


def _describe(path: Path, kind: str, facts: dict) -> list[str]:
    lines = [f"{path}", f"  kind:        {kind}"]
    for key, value in facts.items():
        if key not in ("file",) and value not in (None, "", [], {}):
            shown = ", ".join(f"{k} {v}" for k, v in value.items()) if isinstance(value, dict) else value
            lines.append(f"  {key + ':':<12} {shown}")
    return lines


def _checkpoint_lines(path: Path, store) -> list[str]:
    """Family, prediction, format, precision, size and UNet shape of a checkpoint."""
    from .runtime.detect import detect_model

    info = detect_model(store)
    u = info.unet
    dtypes = ", ".join(f"{str(dt).removeprefix('torch.')} x{n}"
                       for dt, n in sorted(store.stored_dtypes().items(), key=lambda kv: -kv[1]))
    prediction = info.prediction or "decided when loaded (A1111's SD2 v-prediction probe)"
    depth = ",".join(map(str, u.transformer_depth))
    return [
        f"{path}",
        "  kind:        checkpoint",
        f"  family:      {info.family.label}",
        f"  prediction:  {prediction}" + (f" (from {info.prediction_source})" if info.prediction else ""),
        f"  format:      {path.suffix.lstrip('.')}, {len(store)} tensors, {_size(store.nbytes())}",
        f"  precision:   {dtypes}",
        f"  UNet:        {u.model_channels} channels x {list(u.channel_mult)}, res blocks {list(u.num_res_blocks)}, "
        f"transformer depth [{depth}] / middle {u.transformer_depth_middle}, context {u.context_dim}"
        + (f", ADM {u.adm_in_channels}" if u.adm_in_channels else ""),
        f"  VAE:         {'included' if info.has_vae else 'not included'}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib_deltasampling", description="Delta Sampling tools")
    sub = parser.add_subparsers(dest="command", required=True)
    p_inspect = sub.add_parser("inspect", help="describe checkpoints, adapters (LoRA/LyCORIS) and embeddings")
    p_inspect.add_argument("files", nargs="+", type=Path, help="checkpoints, adapters or embeddings to describe")
    from .runner.cli import HelpFormatter, add_arguments  # no torch: --help works before it is installed
    p_generate = sub.add_parser("generate", help="generate images with Delta Sampling (target + source pair)",
                                formatter_class=HelpFormatter)
    add_arguments(p_generate)
    from .runner import convert_cli
    p_convert = sub.add_parser("convert", help="bake a LoRA for another model of the same architecture (ProLoRA)",
                               formatter_class=HelpFormatter)
    convert_cli.add_arguments(p_convert)
    from .lab import demo
    p_demo = sub.add_parser("demo", help="Delta Sampling on the shipped miniature models: a labelled grid, no downloads",
                            formatter_class=HelpFormatter, description=demo.__doc__)
    demo.add_arguments(p_demo)
    args = parser.parse_args(argv)
    try:
        if args.command == "inspect":
            for path in args.files:
                print("\n".join(inspect_file(path)))
        elif args.command == "generate":
            from .runner.generate import run
            for path in run(args):
                print(path)
        elif args.command == "convert":
            print("\n".join(convert_cli.run(args)))
        elif args.command == "demo":
            print("\n".join(demo.run(args)))
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:  # an internal error: the traceback is what a bug report needs
        import traceback
        traceback.print_exc()
        print("error: internal error (above); please report it with the command you ran", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
