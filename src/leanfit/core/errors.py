"""User-facing errors.

Every error a user can cause derives from :class:`LeanfitError`. The CLI prints such errors as one line and exits
with code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ConfigError",
    "LeanfitError",
    "MissingDependencyError",
    "RunExistsError",
    "RunFailedError",
    "RunLockedError",
    "UnreadableFileError",
    "bad_value",
]


class LeanfitError(Exception):
    """Base class of errors caused by input, environment or missing assets (CLI exit code 2)."""


class ConfigError(LeanfitError, ValueError):
    """A configuration key, value or combination is invalid."""


class MissingDependencyError(LeanfitError, ImportError):
    """An optional package or offline asset is not installed; the message says how to install it."""


class RunExistsError(LeanfitError, FileExistsError):
    """A run folder already exists and `--resume` was not given."""


class RunFailedError(LeanfitError):
    """A run finished with non-finite results (it diverged); they are written as null and the run marked failed."""


class RunLockedError(LeanfitError):
    """Another process is writing the run folder (it holds the folder's lock)."""


class UnreadableFileError(LeanfitError, ValueError):
    """A file given to leanfit, or one of its records, cannot be parsed (torn, binary, not the expected format)."""


def bad_value(param: str, value: Any, expected: str, fix: str | None = None) -> str:
    """Format the standard message: parameter, value received, what was expected, and the fix."""
    msg = f"{param}={value!r} is invalid: expected {expected}"
    return f"{msg}; {fix}" if fix else msg
