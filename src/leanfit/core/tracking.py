"""Experiment tracking: a run's own metric records (``RunDir.log``) also go to TensorBoard, MLflow or Weights &
Biases through accelerate's tracker classes.

``report_to`` takes the values ``transformers.TrainingArguments.report_to`` takes for these three: ``none`` (the
default), one name, a comma-separated list or a list. TensorBoard events are written to ``RUN/tensorboard/``,
MLflow runs to ``RUN/mlruns/`` (unless ``MLFLOW_TRACKING_URI`` says otherwise), W&B files to ``RUN/wandb/``.
A sub-run's metrics carry its name as a prefix (``lr-0.001/loss``).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from leanfit.core.errors import ConfigError, MissingDependencyError, bad_value

__all__ = ["TRACKERS", "close_trackers", "open_trackers", "parse_report_to", "scalars"]

# name -> (module that must be importable, PyPI package that provides it)
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}


def parse_report_to(value: Any) -> tuple[str, ...]:
    """``"none"`` / ``None`` / ``[]`` -> ``()``; ``"all"`` -> every tracker whose package is installed; a name, a
    comma-separated string or a list of names -> those names (checked)."""
    if value is None:
        return ()
    if isinstance(value, str):
        names = [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        names = [v.strip() for v in value]
    else:
        raise ConfigError(bad_value("report_to", value, "none, all, or tracker names", "e.g. report_to=tensorboard"))
    if names in ([], ["none"]):
        return ()
    if names == ["all"]:
        return tuple(n for n, (module, _) in TRACKERS.items() if importlib.util.find_spec(module) is not None)
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ConfigError(bad_value("report_to", value, f"none, all, or names from {', '.join(TRACKERS)}",
                                    "e.g. report_to=tensorboard or report_to=tensorboard,mlflow"))
    for name in names:
        module, package = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise MissingDependencyError(f"report_to={name} needs PyPI '{package}'; install it with "
                                         f"`pip install {package}`")
    return tuple(dict.fromkeys(names))


def open_trackers(names: Sequence[str], folder: Path, run_name: str, config: dict[str, Any]) -> list[Any]:
    """Started accelerate trackers for ``names``, writing under ``folder``, with ``config`` stored as their
    hyper-parameters (flattened to dotted keys)."""
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

    trackers: list[Any] = []
    for name in names:
        if name == "tensorboard":
            tracker: Any = TensorBoardTracker("", folder / "tensorboard")  # events straight in RUN/tensorboard
        elif name == "mlflow":
            tracker = MLflowTracker(experiment_name=run_name.split("/")[0], logging_dir=str(folder / "mlruns"),
                                    run_name=run_name)
        else:
            tracker = WandBTracker(run_name, dir=str(folder))
        tracker.start()
        tracker.store_init_configuration(_flat(config))
        trackers.append(tracker)
    return trackers


def close_trackers(trackers: Sequence[Any]) -> None:
    for tracker in trackers:
        tracker.finish()


def scalars(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of a metrics record, keys prefixed (what a tracker can plot)."""
    return {f"{prefix}{k}": float(v) for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        elif isinstance(value, bool | int | float | str):
            out[f"{prefix}{key}"] = value
        else:
            out[f"{prefix}{key}"] = str(value)
    return out
