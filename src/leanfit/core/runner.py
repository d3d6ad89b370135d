"""Resolve an experiment's config, prepare its run folder, run it, write results and the report.

Config precedence (later wins): dataclass defaults < ``--preset`` < ``--config FILE.yaml`` < ``key=value``.
The default run id is ``<preset>-seed<seed>-<hash of the resolved config>``, so re-issuing the same command with
``--resume`` finds the same folder, and a changed config never resumes someone else's checkpoints.
"""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from leanfit.core import registry
from leanfit.core.config import BaseConfig, load_yaml, merge_nested, parse_overrides
from leanfit.core.errors import ConfigError, LeanfitError, RunExistsError, RunFailedError, bad_value
from leanfit.core.io import sha256_bytes
from leanfit.core.parallel import JobsConfig, check_jobs
from leanfit.core.progress import notice
from leanfit.core.runs import RunDir, is_main_process

__all__ = ["RunContext", "resolve_config", "resolved_record", "run_experiment", "run_id_for"]

ConfigT = TypeVar("ConfigT", bound=BaseConfig)


@dataclass
class RunContext(Generic[ConfigT]):
    """What an experiment's ``run(ctx)`` receives; ``RunContext[MyConfig]`` types ``ctx.config``."""

    name: str
    config: ConfigT
    seed: int
    run: RunDir
    resume: bool
    preset: str
    report_to: tuple[str, ...] = ()  # experiment trackers (core.tracking); studies using transformers' Trainer pass
    # them on as TrainingArguments.report_to

    @property
    def is_main(self) -> bool:
        return is_main_process()


# keys every experiment takes beside its own config (they do not change results, so not the run id either)
RUN_KEYS = {"report_to": "experiment trackers: none (default), tensorboard, mlflow, wandb, a comma list, or all; "
                         "events go into the run folder"}


# the keys of a run folder's config.yaml (what RunDir.write_config writes); such a file passed as --config
RECORD_KEYS = frozenset({"experiment", "kind", "preset", "seed", "config", "report_to"})


def _as_record(entry: registry.Entry, data: Mapping[str, Any], path: str | os.PathLike) -> Mapping[str, Any] | None:
    """``data`` when it is a run record (a run folder's ``config.yaml``) of ``entry``; None for a plain mapping of
    config keys. A record of another experiment or benchmark is refused."""
    if not (isinstance(data.get("experiment"), str) and isinstance(data.get("config"), Mapping)
            and set(data) <= RECORD_KEYS):
        return None
    kind = data.get("kind", "experiment")
    if (data["experiment"], kind) != (entry.name, entry.kind):
        command = "run" if kind == "experiment" else "bench"
        raise ConfigError(f"--config={str(path)!r} is the run record of {kind} {data['experiment']!r}, not of "
                          f"{entry.kind} {entry.name!r}; pass it to `leanfit {command} {data['experiment']}`")
    return data


@dataclass(frozen=True)
class _Settings:
    preset: str
    seed: int
    values: dict[str, Any]


def _settings(
    entry: registry.Entry,
    preset: str | None,
    seed: int | None,
    config_file: str | os.PathLike | None,
    overrides: Sequence[str] | Mapping[str, Any],
) -> _Settings:
    """Preset, seed and config values (not yet converted) in the order of precedence. A run record given as
    ``config_file`` supplies its config (and report_to), and its preset and seed where the caller passes None."""
    record: Mapping[str, Any] = {}
    from_file: Mapping[str, Any] = {}
    if config_file is not None:
        from_file = load_yaml(config_file)
        record = _as_record(entry, from_file, config_file) or {}
        if record:
            from_file = {**record["config"], **({"report_to": record["report_to"]} if "report_to" in record else {})}
    preset = preset if preset is not None else str(record.get("preset", "quick"))
    seed = seed if seed is not None else record.get("seed", 0)
    if preset not in entry.presets:
        raise ConfigError(bad_value("--preset", preset, "one of " + ", ".join(entry.presets)))
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(bad_value("--seed", seed, "a non-negative integer"))
    values = merge_nested(entry.presets[preset], from_file)
    extra = overrides if isinstance(overrides, Mapping) else parse_overrides(overrides)
    return _Settings(preset, seed, merge_nested(values, extra))


def resolve_config(
    entry: registry.Entry,
    preset: str | None = "quick",
    config_file: str | os.PathLike | None = None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
) -> BaseConfig:
    return entry.config_cls.from_dict(_settings(entry, preset, 0, config_file, overrides).values)


def resolved_record(
    kind: registry.Kind,
    name: str,
    *,
    preset: str | None = None,
    config_file: str | os.PathLike | None = None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
    seed: int | None = None,
) -> dict[str, Any]:
    """The record a run with these settings writes as its ``config.yaml`` (experiment, kind, preset, seed, the
    resolved config, report_to when set), without running anything. ``preset`` and ``seed`` default to the run
    record given as ``config_file``, else to ``quick`` and 0; passing that record back reproduces it."""
    entry = registry.get(kind, name)
    return _resolve(entry, _settings(entry, preset, seed, config_file, overrides))[0]


def _resolve(entry: registry.Entry, settings: _Settings) -> tuple[dict[str, Any], BaseConfig, tuple[str, ...]]:
    """(record, config, report_to): the config built and checked; ``report_to`` only for experiments."""
    from leanfit.core.config import coerce
    from leanfit.core.tracking import parse_report_to

    values = dict(settings.values)
    report_to: tuple[str, ...] = ()
    if entry.kind == "experiment":
        report_to = parse_report_to(coerce(values.pop("report_to", "none"), Any, "report_to"))
    config = entry.config_cls.from_dict(values)
    record: dict[str, Any] = {"experiment": entry.name, "kind": entry.kind, "preset": settings.preset,
                              "seed": settings.seed, "config": config.to_dict()}
    if report_to:
        record["report_to"] = list(report_to)
    return record, config, report_to


def run_id_for(preset: str, seed: int, config: BaseConfig) -> str:
    digest = sha256_bytes(json.dumps(config.to_dict(), sort_keys=True).encode())[:8]
    return f"{preset}-seed{seed}-{digest}"


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".leanfit-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST):
            raise LeanfitError(
                f"--out={str(out)!r} is not writable ({reason}); choose a writable folder with --out DIR"
            ) from None
        raise


def _saved_config(entry: registry.Entry, saved: Any) -> Any:
    """The saved config as the current config class reads it, so a renamed key that the class still accepts (e.g.
    topk-moe's ``n_jobs``, now ``jobs``) does not make a resumed run look different; the raw record otherwise."""
    try:
        return entry.config_cls.from_dict(saved).to_dict()
    except (ConfigError, TypeError, ValueError):
        return saved


def _run_folder(out: Path, name: str, run_id: str) -> RunDir:
    """``OUT/<name>/<run_id>``, refusing a run id that is not one plain folder name (it would leave ``--out``)."""
    parent = out / name
    if (not run_id or run_id != run_id.strip() or run_id.startswith(".") or any(c in run_id for c in "/\\\0")
            or (parent / run_id).resolve().parent != parent.resolve()):
        raise ConfigError(bad_value("--run-id", run_id, f"one plain folder name inside --out={str(out)!r}",
                                    "use letters, digits, - and _, such as --run-id run1"))
    return RunDir(parent / run_id)


def _prepare_folder(run: RunDir, record: dict[str, Any], resume: bool, entry: registry.Entry) -> bool:
    """Create or reopen the folder; returns True when the run is already complete."""
    if not run.has_records():
        if resume:
            others = sorted(p.name for p in run.path.parent.glob("*") if p.is_dir() and p != run.path)
            hint = f" (runs of this experiment there: {', '.join(others[:5])})" if others else ""
            notice(f"--resume: nothing to resume at {str(run.path)!r}{hint}; starting a new run")
        return False
    if not resume:
        raise RunExistsError(
            f"run folder {str(run.path)!r} already exists; pass --resume to continue it, "
            "or --run-id NAME / --out DIR to start a new run"
        )
    saved = run.read_config()
    saved_config = _saved_config(entry, saved.get("config") or {})
    if saved_config != record["config"] or saved.get("seed") != record["seed"]:
        diff = _first_difference(saved_config if isinstance(saved_config, dict) else {}, record["config"])
        raise ConfigError(
            f"--resume of {str(run.path)!r} with a different config ({diff}); "
            "rerun with the original settings or start a new run with --run-id NAME"
        )
    return run.complete


def _first_difference(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> str:
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            if (found := _first_difference(va, vb, f"{prefix}{key}.")) != "no difference":
                return found
        elif va != vb:
            return f"{prefix}{key}: saved {va!r}, now {vb!r}"
    return "no difference"


def run_experiment(
    name: str,
    *,
    preset: str | None = None,
    config_file: str | os.PathLike | None = None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
    out: str | os.PathLike = "runs",
    seed: int | None = None,
    resume: bool = False,
    run_id: str | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Run experiment ``name`` and return (run folder, results).

    ``preset`` and ``seed`` left as None come from a run record given as ``config_file`` (a run folder's
    ``config.yaml``), else they are ``quick`` and 0."""
    from leanfit.core.env import environment_info
    from leanfit.core.tracking import close_trackers, open_trackers

    entry = registry.get("experiment", name)
    settings = _settings(entry, preset, seed, config_file, overrides)
    record, config, report_to = _resolve(entry, settings)
    if isinstance(config, JobsConfig):
        check_jobs(config.jobs)  # refused under torchrun before anything is written
    preset, seed = settings.preset, settings.seed
    out = Path(out)
    run = _run_folder(out, name, run_id if run_id is not None else run_id_for(preset, seed, config))
    if is_main_process():
        _check_writable(out)
    with run.lock():
        if is_main_process():
            if _prepare_folder(run, record, resume, entry):
                return run.path, run.results() or {}
            run.write_config(record)
            run.write_env(environment_info())
            run.trackers = open_trackers(report_to, run.path, f"{name}/{run.path.name}", record["config"])
        ctx = RunContext(name=name, config=config, seed=seed, run=run, resume=resume, preset=preset,
                         report_to=report_to)
        try:
            return run.path, _execute(entry, ctx)
        finally:
            close_trackers(run.trackers)


def run_benchmark(
    name: str,
    *,
    preset: str | None = None,
    config_file: str | os.PathLike | None = None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
    out: str | os.PathLike = "benchmarks/results",
    seed: int | None = None,
) -> Path:
    """Run benchmark ``name`` into ``OUT/<name>/`` (replacing earlier results there): ``results.csv`` (one row
    per measurement), ``results.json`` (rows + summary), ``env.json`` (machine), ``report.md`` and plots.
    ``preset`` and ``seed`` default as in :func:`run_experiment`."""
    entry = registry.get("benchmark", name)
    settings = _settings(entry, preset, seed, config_file, overrides)
    record, config, _ = _resolve(entry, settings)
    out = Path(out)
    _check_writable(out)
    run = RunDir(out / name)
    with run.lock():
        for stale in ("metrics.jsonl", "results.json"):
            (run.path / stale).unlink(missing_ok=True)
        run.write_config(record)
        _execute(entry, RunContext(name=name, config=config, seed=settings.seed, run=run, resume=False,
                                   preset=settings.preset))
    return run.path


def _execute(entry: registry.Entry, ctx: RunContext[Any]) -> dict[str, Any]:
    """Seed, run, time; the main process writes env.json, results.json (a benchmark's rows also as results.csv)
    and the report.

    Results with a non-finite number (a diverged training) are written as valid JSON, each such number ``null``,
    with ``"status": "failed"`` and the keys listed under ``"nonfinite"``; then :class:`RunFailedError`."""
    from leanfit.core.env import environment_info
    from leanfit.core.io import atomic_write_csv, finite_json
    from leanfit.core.report import render_run
    from leanfit.core.seed import seed_everything

    seed_everything(ctx.seed)
    start = time.perf_counter()
    results = entry.run(ctx)
    results = {**results, "wall_seconds": time.perf_counter() - start}
    clean, nonfinite = finite_json(results)
    if nonfinite:
        results = {**clean, "status": "failed", "nonfinite": nonfinite}
    if is_main_process():
        ctx.run.write_env(environment_info())
        ctx.run.write_results(results)
        if entry.kind == "benchmark":
            atomic_write_csv(ctx.run.path / "results.csv", results.get("rows", []))
        if not nonfinite:
            render_run(ctx.run.path)
    if nonfinite:
        shown = ", ".join(nonfinite[:4]) + (f" and {len(nonfinite) - 4} more" if len(nonfinite) > 4 else "")
        raise RunFailedError(
            f"{ctx.name} produced non-finite results ({shown}); they are null in "
            f"{str(ctx.run.path / 'results.json')!r} and the run is marked failed: lower the learning rate or check "
            "the data, then rerun (--resume continues from the last checkpoint)"
        )
    return results


def run_demo(out: str | os.PathLike = "runs/demo", seed: int = 0, fresh: bool = False) -> Path:
    """The quick preset of every registered experiment, then ``OUT/index.md`` linking their reports.

    Completed quick runs are reused (so a repeated ``make demo`` is cheap) unless ``fresh`` is set."""
    import shutil

    from leanfit.core.report import render_index

    out = Path(out)
    done = []
    for entry in registry.entries("experiment"):
        if not entry.in_demo:
            continue
        run_id = f"quick-seed{seed}"
        if fresh:
            shutil.rmtree(out / entry.name / run_id, ignore_errors=True)
        print(f"== {entry.name}: {entry.description}")
        resume = RunDir(out / entry.name / run_id).has_records()  # reuse a finished or interrupted quick run
        path, results = run_experiment(entry.name, preset="quick", out=out, seed=seed, resume=resume, run_id=run_id)
        done.append((entry.name, path, results.get("headline", {})))
    return render_index(out, done)
