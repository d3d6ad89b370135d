"""Locating offline data packages without importing them, with install hints in the errors."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from leanfit.core.errors import MissingDependencyError

__all__ = ["package_dir", "require_file"]


def package_dir(module: str, pip_name: str, what: str) -> Path:
    """Folder of installed package ``module`` (found by spec, so packages with broken imports still work)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            f"{what} needs the PyPI package {pip_name!r}, which is not installed; "
            f"install it with `pip install {pip_name}` (or `make demo`), then check `leanfit data status`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def require_file(path: str | Path, what: str, install: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise MissingDependencyError(
            f"{what} is not installed (missing {path}); install it with `{install}`, then check `leanfit data status`"
        )
    return path
