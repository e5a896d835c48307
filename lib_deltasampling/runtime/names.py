"""Names that users type (UI, API, pasted infotext, X/Y/Z, `<lora:NAME>` tags) -> files, only
inside the model folders.

A name is never a path: it is matched exactly (never as a glob) against the file names found in
the folders, and a file whose real location (symlinks followed) is outside them is refused.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..errors import UserError

_DRIVE = re.compile(r"^[A-Za-z]:")


def path_problem(name: str, *, subfolders: bool = False) -> str | None:
    """Why `name` reads as a path rather than a model name, or None. `subfolders`: a relative
    folder part is allowed (the WebUI's checkpoint titles are 'sub/model.safetensors [hash]')."""
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "contains a control character"
    if name.startswith(("/", "\\")) or _DRIVE.match(name):
        return "is an absolute path"
    parts = re.split(r"[/\\]", name)
    if ".." in parts:
        return "contains '..'"
    if len(parts) > 1 and not subfolders:
        return "contains a folder separator"
    return None


def check_name(name: str, subject: str, fix: str, *, subfolders: bool = False) -> None:
    problem = path_problem(name, subfolders=subfolders)
    if problem:
        raise UserError(subject, f"{name!r} {problem}; a name is not a path", fix)


def inside(path: Path, folders: Iterable[Path]) -> bool:
    """Whether `path`, symlinks followed, lies inside one of `folders` (also followed)."""
    real = Path(os.path.realpath(path))
    return any(real.is_relative_to(os.path.realpath(folder)) for folder in folders)


def files_named(name: str, folders: Sequence[Path], suffixes: Sequence[str]) -> list[Path]:
    """Files `name` + one of `suffixes` in `folders` and their subfolders, by exact comparison
    (case-insensitive suffix), sorted; no glob is built from `name`."""
    wanted = {s.lower() for s in suffixes}
    hits = []
    for folder in folders:
        if folder.is_dir():
            for root, _, filenames in os.walk(folder):  # linked folders lie outside: not followed
                hits += [Path(root, f) for f in filenames if f.startswith(name) and f[len(name):].lower() in wanted]
    return sorted(hits)


def find_named_file(name: str, folders: Sequence[Path], suffixes: Sequence[str], subject: str,
                    missing_fix: str) -> Path:
    """The one file `name` names in `folders`; a named error when it reads as a path, is not
    there, or links outside the folders."""
    check_name(name, subject, "Use the file name without folder or extension, as the WebUI lists it")
    hits = files_named(name, folders, suffixes)
    if not hits:
        where = ", ".join(str(f) for f in folders) or "no folder given"
        raise UserError(subject, f"no file {name}{{{','.join(suffixes)}}} in {where}", missing_fix)
    for hit in hits:
        if inside(hit, folders):
            return hit
    raise UserError(subject, f"{hits[0]} links to {os.path.realpath(hits[0])}, outside the model folders",
                    "Move or copy the file into the folder instead of linking it")
