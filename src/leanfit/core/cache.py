"""The leanfit cache folder (``$LEANFIT_CACHE``, else ``$XDG_CACHE_HOME/leanfit``, else ``~/.cache/leanfit``) and
hash-verified cache entries: a folder whose ``manifest.json`` records the sha256 of every file, checked on load,
so a corrupted entry is detected and rebuilt instead of silently used."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from leanfit.core.io import atomic_dir, atomic_write_json, read_json, sha256_tree

__all__ = ["cache_dir", "cached_folder", "verify_folder"]

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


def cache_dir(*parts: str) -> Path:
    root = os.environ.get("LEANFIT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "leanfit"
    return Path(root, *parts)


def verify_folder(path: Path) -> bool:
    """True when ``path`` holds a manifest and every file matches its recorded sha256."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return False
    try:
        expected = read_json(manifest)["files"]
    except (ValueError, KeyError, OSError):
        return False
    return sha256_tree(path, exclude=(MANIFEST,)) == expected


def cached_folder(path: Path, build: Callable[[Path], None], *, meta: dict | None = None) -> Path:
    """Return ``path`` after verifying it; (re)build it atomically with ``build(tmp_folder)`` when missing or
    corrupted. A file lock makes concurrent processes (e.g. the ranks of a ``torchrun`` job) build it once."""
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if path.exists():
            if verify_folder(path):
                return path
            log.warning("cache entry %s is corrupted (hash mismatch); rebuilding it", path)
            shutil.rmtree(path, ignore_errors=True)
        with atomic_dir(path) as tmp:
            build(tmp)
            atomic_write_json(tmp / MANIFEST, {"meta": meta or {}, "files": sha256_tree(tmp, exclude=(MANIFEST,))})
    return path
