"""Files written whole or not at all: beside their destination, fsynced, then renamed into place
(or hard-linked, so a file that appeared meanwhile is never replaced without `overwrite`)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from ..errors import UserError

EXISTS_FIX = "Allow replacing it (overwrite), or choose another name"


def write_atomic(path: Path, data: bytes, *, overwrite: bool, exists_fix: str = EXISTS_FIX) -> Path:
    """Write `data` to `path` whole or not at all (a hidden file beside it, then renamed); folders
    are created; without `overwrite` a file that exists (even one that appeared meanwhile) stays."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # mode from the umask, as open()
    except OSError as e:
        raise UserError(str(path), f"cannot be written ({e.strerror or e})",
                        "Choose a folder that exists and that you may write to") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(partial, path)
        else:
            _link_without_replacing(partial, path, exists_fix)
    except OSError as e:
        raise UserError(str(path), f"cannot be written ({e.strerror or e})",
                        "Check the free space and that you may write there") from None
    finally:
        partial.unlink(missing_ok=True)
    return path


def _link_without_replacing(partial: Path, path: Path, exists_fix: str) -> None:
    try:
        os.link(partial, path)  # fails when `path` exists: no check-then-write race
    except FileExistsError:
        raise UserError(str(path), "appeared while generating and was left as it is", exists_fix) from None
    except OSError:  # a file system without hard links
        if path.exists():
            raise UserError(str(path), "appeared while generating and was left as it is", exists_fix) from None
        os.replace(partial, path)
