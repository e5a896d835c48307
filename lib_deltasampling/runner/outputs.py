"""Where the runner writes: every path planned and checked before anything loads, each file
written whole or not at all.

`--out NAME.png` names the file (NAME-1.png ... for a batch); `--out DIR/` (or an existing folder,
or a name without suffix) numbers new files in it as A1111 does (`00012-SEED.png`). An existing
file is never replaced without `--overwrite`, and an input file never. Files are written beside
their destination and renamed into place, so a crash leaves no truncated image.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import SettingError
from ..runtime import atomic

OVERWRITE_FIX = "Pass --overwrite to replace it, or give a folder (--out DIR/) to number new images as the WebUI does"


@dataclass(frozen=True)
class OutputPlan:
    images: list[Path]
    plain_images: list[Path]  # --compare: the target alone
    latent: Path | None
    overwrite: bool
    grid: Path | None = None  # --compare-converted: DS | converted LoRA | copied LoRA


def plan_outputs(out: str, seeds: Sequence[int], *, compare: bool, latent_out: str | None, overwrite: bool,
                 inputs: Sequence[Path], grid: bool = False) -> OutputPlan:
    """The files a run will write, or a SettingError naming the flag, before anything is loaded."""
    if not out.strip():
        raise SettingError("--out", "is empty", "Name the image file (NAME.png) or a folder (DIR/)")
    images, plain = _image_paths(out, seeds, compare)
    latent = None
    if latent_out is not None:
        latent = Path(latent_out)
        if latent.suffix.lower() != ".safetensors" or latent_out.endswith(("/", os.sep)):
            raise SettingError("--latent-out", f"'{latent_out}' is not a .safetensors file name",
                               "Name the file, e.g. --latent-out fox.safetensors")
    grid_path = images[0].with_name(images[0].stem + "-converted.png") if grid else None
    planned = [("--out", p) for p in images + plain] + ([("--latent-out", latent)] if latent else []) + \
        ([("--compare-converted", grid_path)] if grid_path else [])
    _check_targets(planned, overwrite, inputs)
    return OutputPlan(images, plain, latent, overwrite, grid_path)


def _image_paths(out: str, seeds: Sequence[int], compare: bool) -> tuple[list[Path], list[Path]]:
    path = Path(out)
    if out.endswith(("/", os.sep)) or path.is_dir() or path.suffix == "":
        first = next_sequence_number(path)
        stems = [f"{first + i:05}-{seed}" for i, seed in enumerate(seeds)]
        folder = path
    elif path.suffix.lower() == ".png":
        stems = [path.stem] if len(seeds) == 1 else [f"{path.stem}-{i + 1}" for i in range(len(seeds))]
        folder = path.parent
    else:
        raise SettingError("--out", f"'{out}' is neither a .png file nor a folder",
                           "The runner writes PNG: name the file NAME.png, or give a folder as DIR/")
    images = [folder / f"{stem}.png" for stem in stems]
    plain = [folder / f"{stem}-nodelta.png" for stem in stems] if compare else []
    return images, plain


def next_sequence_number(folder: Path) -> int:
    """A1111's `images.get_next_sequence_number` with no basename: one past the largest leading
    number of the folder's 'NNNNN-...' file names, 0 in an empty or missing folder."""
    largest = -1
    if folder.is_dir():
        for name in os.listdir(folder):
            head = os.path.splitext(name)[0].split("-")[0]
            if head.isdigit():
                largest = max(largest, int(head))
    return largest + 1


def _check_targets(planned: list[tuple[str, Path]], overwrite: bool, inputs: Sequence[Path]) -> None:
    real_inputs = {os.path.realpath(p) for p in inputs if p is not None}
    existing = []
    for flag, path in planned:
        if os.path.realpath(path) in real_inputs:
            raise SettingError(flag, f"{path} is one of the input files", "Choose another output name")
        if path.is_dir():
            raise SettingError(flag, f"{path} is a folder", "Choose a file name")
        if path.exists():
            existing.append((flag, path))
        _check_folder(flag, path.parent)
    if existing and not overwrite:
        flag, first = existing[0]
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise SettingError(flag, f"{first} already exists{more}", OVERWRITE_FIX)


def _check_folder(flag: str, folder: Path) -> None:
    """The nearest existing folder above the output must be a folder we may write in."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise SettingError(flag, f"{probe} is a file, so the folder {folder} cannot be made", "Choose another folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise SettingError(flag, f"the folder {probe} is not writable", "Choose a folder you may write to")


def write_atomic(path: Path, data: bytes, *, overwrite: bool) -> Path:
    """runtime/atomic.py's write, with the runner's advice for a file that appeared meanwhile."""
    return atomic.write_atomic(path, data, overwrite=overwrite, exists_fix=OVERWRITE_FIX)
