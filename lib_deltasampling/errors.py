"""Errors a user can cause, worded in one place.

Every message names the file or setting, says what was wrong and what to do.
Internal bugs stay ordinary exceptions; only these are shown to users as one line.
"""

from __future__ import annotations

from pathlib import Path


class DeltaSamplingError(Exception):
    """Base of every error this package raises on purpose."""


class UserError(DeltaSamplingError):
    """Bad input the user can fix: `subject` (a file or setting), `problem`, `fix`."""

    def __init__(self, subject: str, problem: str, fix: str = "") -> None:
        self.subject = subject
        self.problem = problem
        self.fix = fix
        text = f"{subject}: {problem}"
        if fix:
            text += f". {fix}"
        super().__init__(text)


class ModelFileError(UserError):
    """A model, adapter, embedding or vocabulary file that cannot be used as asked."""

    def __init__(self, path: str | Path, problem: str, fix: str = "") -> None:
        self.path = Path(path)
        super().__init__(str(path), problem, fix)


class SettingError(UserError):
    """A setting (UI control, API field, infotext value, option) that is out of range or unknown."""
