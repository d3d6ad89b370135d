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

Only the main process (``RANK`` 0) writes; other ranks of a distributed run read the same folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from leanfit.core.errors import ConfigError, LeanfitError, bad_value
from leanfit.core.io import (
    append_jsonl,
    atomic_write_json,
    atomic_write_yaml,
    read_json,
    read_jsonl,
    rewrite_jsonl,
)

__all__ = ["RunDir", "SubRun", "is_main_process"]


def is_main_process() -> bool:
    """True on the process that writes files (``RANK`` 0, or a single process)."""
    return int(os.environ.get("RANK", "0")) == 0


@dataclass
class RunDir:
    """A run folder; every write is atomic and happens on the main process only."""

    path: Path

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

    # --- writes ----------------------------------------------------------------------------------------------
    def write_config(self, record: dict[str, Any]) -> None:
        if is_main_process():
            atomic_write_yaml(self.path / "config.yaml", record)

    def write_env(self, env: dict[str, Any]) -> None:
        if is_main_process():
            atomic_write_json(self.path / "env.json", env)

    def log(self, step: int, **metrics: Any) -> None:
        """Append ``{"step": step, **metrics}`` to ``metrics.jsonl``."""
        if is_main_process():
            append_jsonl(self.path / "metrics.jsonl", {"step": int(step), **metrics})

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
        return yaml.safe_load(path.read_text(encoding="utf-8"))

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
        return (self.path / "results.json").exists()

    # --- sub-runs --------------------------------------------------------------------------------------------
    def subrun(self, name: str, file: str = "result.json") -> SubRun:
        """The sub-run ``runs/<name>/`` (created), the one cache of a study's finished pieces: its ``stored()``
        record is there when an earlier (or interrupted and resumed) run finished it; otherwise the caller computes
        it and calls ``store(record)``, written atomically, so a half-written record is never read back.

        file: the record's name in the folder; a second record of the same sub-run (test scores beside the
        training record) uses another name."""
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            raise ConfigError(bad_value("name", name, "a folder name (no path separators)"))
        sub = SubRun(self.path / "runs" / name, file=file)
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
