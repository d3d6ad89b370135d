"""Experiment tracking: report_to sends the run's own metric records to TensorBoard (through accelerate's tracker)
with the same numbers, sub-runs prefixed; bad names are one-line errors; tracking does not change the run id."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from leanfit.cli import main
from leanfit.core import registry
from leanfit.core.config import BaseConfig
from leanfit.core.errors import ConfigError, MissingDependencyError
from leanfit.core.io import read_jsonl
from leanfit.core.runner import run_experiment
from leanfit.core.tracking import parse_report_to

pytest.importorskip("tensorboard")


@registry.register("tracking-toy", kind="experiment", description="toy", config_cls=BaseConfig, in_demo=False)
def _toy(ctx: Any) -> dict[str, Any]:
    for step in (1, 2, 3):
        ctx.run.log(step, loss=1.0 / step, note="text is not plotted")
        ctx.run.subrun("arm-a").log(step, loss=2.0 * step)
    return {"done": 1}


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert list(folder.glob("*/hparams.yml")), "the config is stored as hyper-parameters"
    acc = EventAccumulator(str(folder))  # the scalars' events file (the hyper-parameters have a sub-folder)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_gets_the_logged_numbers_and_sub_runs_are_prefixed(tmp_path: Path) -> None:
    path, _ = run_experiment("tracking-toy", out=tmp_path, overrides=["report_to=tensorboard"], run_id="r")
    scalars = _scalars(path / "tensorboard")
    assert scalars["loss"] == [(1, 1.0), (2, pytest.approx(0.5)), (3, pytest.approx(1 / 3))]
    assert scalars["arm-a/loss"] == [(1, 2.0), (2, 4.0), (3, 6.0)]
    assert "note" not in scalars


@pytest.mark.integration
def test_lm_baseline_report_to_tensorboard_matches_metrics_jsonl(tmp_path: Path, tiny_overrides: list[str]) -> None:
    args = [*tiny_overrides, "train.steps=20"]
    assert main(["run", "lm-baseline", "--out", str(tmp_path), "--run-id", "r", *args, "report_to=tensorboard"]) == 0
    run = tmp_path / "lm-baseline" / "r"
    scalars = _scalars(run / "tensorboard")
    logged = [(m["step"], m["loss"]) for m in read_jsonl(run / "metrics.jsonl") if "loss" in m]
    assert len(logged) == 4
    assert [(s, pytest.approx(v, rel=1e-6)) for s, v in logged] == scalars["loss"]
    assert [s for s, _ in scalars["val_loss"]] == [20]


def test_the_run_id_does_not_depend_on_tracking(tmp_path: Path) -> None:
    a, _ = run_experiment("tracking-toy", out=tmp_path / "a")
    b, _ = run_experiment("tracking-toy", out=tmp_path / "b", overrides=["report_to=tensorboard"])
    assert a.name == b.name
    assert not (a / "tensorboard").exists() and (b / "tensorboard").is_dir()


@pytest.mark.parametrize(
    ("value", "expected"),
    [("none", ()), (None, ()), ([], ()), ("tensorboard", ("tensorboard",)), (" tensorboard , tensorboard", ("tensorboard",)),
     (["tensorboard"], ("tensorboard",))],
    ids=["none", "null", "empty", "name", "comma-list", "list"],
)
def test_parse_report_to(value: Any, expected: tuple[str, ...]) -> None:
    assert parse_report_to(value) == expected


def test_all_means_every_installed_tracker() -> None:
    installed = tuple(n for n in ("tensorboard", "mlflow", "wandb") if importlib.util.find_spec(n) is not None)
    assert parse_report_to("all") == installed


@pytest.mark.parametrize("value", ["tensorbord", "tensorboard,comet", 3, [1]], ids=["typo", "one-unknown", "int", "list-int"])
def test_unknown_trackers_are_config_errors(value: Any) -> None:
    with pytest.raises(ConfigError, match="report_to=.* is invalid: expected none, all, or"):
        parse_report_to(value)


def test_a_missing_tracker_package_names_the_install(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(MissingDependencyError, match="pip install mlflow"):
        parse_report_to("mlflow")
    assert main(["run", "tracking-toy", "--out", str(tmp_path), "report_to=mlflow"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install mlflow" in err
    assert not any(tmp_path.rglob("config.yaml"))
