"""Run folders: ``OUT/<experiment>/<run-id>/`` with everything a result needs beside it.

Layout::

    config.yaml     resolved config, experiment name, preset and seed
    env.json        package versions, CPU/GPU, threads, git commit
    metrics.jsonl   one JSON record per logged step (appended, fsynced)
    results.json    final results (written once, at the end)
    report.md       rendered from results.json + metrics.jsonl (``leanfit report RUN_DIR``)
    plots/*.png     figures of the report
    checkpoints/    training checkpoints (see :mod:`leanfit.core.checkpoint`)
    runs/<name>/    sub-runs (one trained model each, :meth:`RunDir.subrun`), their record in ``result.json``
    .lock           held by the process writing the folder (:meth:`RunDir.lock`); ``.lock.owner`` names it

Only the main process (``RANK`` 0) writes; other ranks of a distributed run read the same folder.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leanfit.core.errors import ConfigError, LeanfitError, RunLockedError, bad_value
from leanfit.core.io import (
    append_jsonl,
    atomic_write_json,
    atomic_write_text,
    atomic_write_yaml,
    read_json,
    read_jsonl,
    read_yaml,
    rewrite_jsonl,
)

LOCK_FILES = (".lock", ".lock.owner")

__all__ = ["RunDir", "SubRun", "is_main_process"]


def is_main_process() -> bool:
    """True on the process that writes files (``RANK`` 0, or a single process)."""
    return int(os.environ.get("RANK", "0")) == 0


@dataclass
class RunDir:
    """A run folder; every write is atomic and happens on the main process only."""

    path: Path
    # experiment trackers (core.tracking) that every ``log`` record also goes to, and this folder's key prefix
    trackers: list[Any] = field(default_factory=list, repr=False, compare=False)
    track_prefix: str = field(default="", repr=False, compare=False)

    def __post_init__(self) -> None:
        self.path = Path(self.path)

    # --- locations -------------------------------------------------------------------------------------------
    @property
    def plots_dir(self) -> Path:
        return self.path / "plots"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def artifacts_dir(self) -> Path:
        return self.path / "artifacts"

    # --- the one writer ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder's lock (``filelock``) while the block runs; the main process only. A second writer
        gets :class:`RunLockedError` at once, naming the holder's pid and host."""
        if not is_main_process():
            yield
            return
        from filelock import FileLock, Timeout

        self.path.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.path / ".lock"), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            owner = self.path / ".lock.owner"
            holder = owner.read_text(encoding="utf-8", errors="replace").strip() if owner.is_file() else ""
            raise RunLockedError(
                f"run folder {str(self.path)!r} is in use by another leanfit process "
                f"({holder or 'its pid is not recorded yet'}); wait for it to finish, or start a separate run "
                "with --run-id NAME"
            ) from None
        try:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            atomic_write_text(self.path / ".lock.owner", f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n")
            yield
        finally:
            with contextlib.suppress(OSError):
                (self.path / ".lock.owner").unlink()
            lock.release()

    def has_records(self) -> bool:
        """Whether the folder holds anything but its lock files."""
        return self.path.is_dir() and any(p.name not in LOCK_FILES for p in self.path.iterdir())

    # --- writes ----------------------------------------------------------------------------------------------
    def write_config(self, record: dict[str, Any]) -> None:
        if is_main_process():
            atomic_write_yaml(self.path / "config.yaml", record)

    def write_env(self, env: dict[str, Any]) -> None:
        if is_main_process():
            atomic_write_json(self.path / "env.json", env)

    def log(self, step: int, **metrics: Any) -> None:
        """Append ``{"step": step, **metrics}`` to ``metrics.jsonl`` (and send its numbers to the trackers)."""
        if is_main_process():
            append_jsonl(self.path / "metrics.jsonl", {"step": int(step), **metrics})
            if self.trackers:
                from leanfit.core.tracking import scalars

                for tracker in self.trackers:
                    tracker.log(scalars(metrics, self.track_prefix), step=int(step))

    def truncate_metrics(self, last_step: int) -> None:
        """Drop records logged after ``last_step`` (used when resuming from a checkpoint at that step)."""
        if is_main_process() and (self.path / "metrics.jsonl").exists():
            rewrite_jsonl(self.path / "metrics.jsonl", lambda r: r.get("step", 0) <= last_step)

    def write_results(self, results: dict[str, Any]) -> None:
        if is_main_process():
            atomic_write_json(self.path / "results.json", results)

    # --- reads -----------------------------------------------------------------------------------------------
    def read_config(self) -> dict[str, Any]:
        path = self.path / "config.yaml"
        if not path.is_file():
            raise LeanfitError(
                f"RUN_DIR={str(self.path)!r} is not a leanfit run folder (no config.yaml); "
                "pass a folder made by `leanfit run`, such as runs/lm-baseline/quick-seed0-…"
            )
        record = read_yaml(path)
        if not isinstance(record, dict) or not isinstance(record.get("experiment"), str):
            raise LeanfitError(f"{str(path)!r} is not a leanfit run record (no experiment name); restore it")
        return record

    def read_env(self) -> dict[str, Any]:
        path = self.path / "env.json"
        return read_json(path) if path.exists() else {}

    def metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path / "metrics.jsonl")

    def results(self) -> dict[str, Any] | None:
        path = self.path / "results.json"
        return read_json(path) if path.exists() else None

    @property
    def complete(self) -> bool:
        """Finished: results.json is written and the run did not fail (a failed run can be resumed)."""
        if not (self.path / "results.json").exists():
            return False
        results = self.results()
        return not (isinstance(results, dict) and results.get("status") == "failed")

    # --- sub-runs --------------------------------------------------------------------------------------------
    def subrun(self, name: str, file: str = "result.json") -> SubRun:
        """The sub-run ``runs/<name>/`` (created), the one cache of a study's finished pieces: its ``stored()``
        record is there when an earlier (or interrupted and resumed) run finished it; otherwise the caller computes
        it and calls ``store(record)``, written atomically, so a half-written record is never read back.

        file: the record's name in the folder; a second record of the same sub-run (test scores beside the
        training record) uses another name."""
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            raise ConfigError(bad_value("name", name, "a folder name (no path separators)"))
        sub = SubRun(self.path / "runs" / name, self.trackers, f"{self.track_prefix}{name}/", file=file)
        sub.path.mkdir(parents=True, exist_ok=True)
        return sub


@dataclass
class SubRun(RunDir):
    """A child run folder with one cached record, ``file`` (see :meth:`RunDir.subrun`)."""

    file: str = "result.json"

    def stored(self) -> Any | None:
        """The stored record, or None when this sub-run has not finished."""
        path = self.path / self.file
        return read_json(path) if path.exists() else None

    def store(self, record: Any) -> Any:
        """Write ``record`` atomically (main process only) and return it."""
        if is_main_process():
            atomic_write_json(self.path / self.file, record)
        return record
