"""Run folders: records, run ids, --resume rules, reports re-rendered from records, benchmarks."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from leanfit.core import registry
from leanfit.core.config import BaseConfig, option
from leanfit.core.errors import ConfigError, LeanfitError, RunExistsError
from leanfit.core.report import render_run
from leanfit.core.runner import RunContext, resolve_config, run_benchmark, run_experiment
from leanfit.core.runs import RunDir

CALLS: list[int] = []


@dataclass
class ToyConfig(BaseConfig):
    steps: int = option(4, help="steps")
    scale: float = option(1.0, help="scale")


@registry.register("toy-test", kind="experiment", description="toy", config_cls=ToyConfig,
                   presets={"quick": {"steps": 3}, "full": {"steps": 5}}, in_demo=False)
def _toy(ctx: RunContext[ToyConfig]) -> dict[str, Any]:
    assert isinstance(ctx.config, ToyConfig)
    CALLS.append(ctx.seed)
    for step in range(1, ctx.config.steps + 1):
        ctx.run.log(step, loss=ctx.config.scale / step)
    return {"final": ctx.config.scale / ctx.config.steps, "steps": ctx.config.steps}


@registry.register("toy-bench", kind="benchmark", description="toy bench", config_cls=ToyConfig)
def _toy_bench(ctx: RunContext[ToyConfig]) -> dict[str, Any]:
    return {"rows": [{"n": n, "value": n * ctx.config.scale} for n in range(ctx.config.steps)]}


def test_run_writes_every_record(tmp_path):
    path, results = run_experiment("toy-test", out=tmp_path, seed=3)
    assert path.parent == tmp_path / "toy-test" and path.name.startswith("quick-seed3-")
    record = yaml.safe_load((path / "config.yaml").read_text())
    assert record == {"experiment": "toy-test", "kind": "experiment", "preset": "quick", "seed": 3,
                      "config": {"steps": 3, "scale": 1.0}}
    run = RunDir(path)
    assert [m["loss"] for m in run.metrics()] == pytest.approx([1.0, 0.5, 1 / 3])
    assert run.results()["final"] == pytest.approx(1 / 3) == results["final"]
    assert run.read_env()["packages"]["torch"]
    assert (path / "plots" / "loss.png").stat().st_size > 1000
    assert "![loss](plots/loss.png)" in (path / "report.md").read_text()


def test_same_command_same_folder_and_no_silent_overwrite(tmp_path):
    path, _ = run_experiment("toy-test", out=tmp_path, overrides=["scale=2"])
    with pytest.raises(RunExistsError, match="pass --resume"):
        run_experiment("toy-test", out=tmp_path, overrides=["scale=2"])
    n = len(CALLS)
    again, results = run_experiment("toy-test", out=tmp_path, overrides=["scale=2"], resume=True)
    assert again == path and len(CALLS) == n and results["final"] == pytest.approx(2 / 3)
    other, _ = run_experiment("toy-test", out=tmp_path, overrides=["scale=3"])
    assert other != path


def test_resume_with_changed_config_is_refused(tmp_path):
    run_experiment("toy-test", out=tmp_path, run_id="mine")
    with pytest.raises(ConfigError, match=r"scale: saved 1.0, now 5.0"):
        run_experiment("toy-test", out=tmp_path, run_id="mine", overrides=["scale=5"], resume=True)


def test_unwritable_out_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(LeanfitError, match=r"--out=.*is not writable.*choose a writable folder"):
        run_experiment("toy-test", out=blocker / "sub")


def test_precedence_defaults_preset_yaml_overrides(tmp_path):
    entry = registry.get("experiment", "toy-test")
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("steps: 7\nscale: 4\n")
    assert resolve_config(entry, "full") == ToyConfig(steps=5, scale=1.0)
    assert resolve_config(entry, "full", cfg_file) == ToyConfig(steps=7, scale=4.0)
    assert resolve_config(entry, "full", cfg_file, ["scale=9"]) == ToyConfig(steps=7, scale=9.0)
    with pytest.raises(ConfigError, match="--preset='huge'"):
        resolve_config(entry, "huge")


def test_report_rebuilds_identically_from_records(tmp_path):
    path, _ = run_experiment("toy-test", out=tmp_path)
    before = (path / "report.md").read_text()
    (path / "report.md").unlink()
    (path / "plots" / "loss.png").unlink()
    render_run(path)
    assert (path / "report.md").read_text() == before
    assert (path / "plots" / "loss.png").exists()


def test_report_of_unfinished_run_says_how_to_continue(tmp_path):
    path, _ = run_experiment("toy-test", out=tmp_path)
    (path / "results.json").unlink()
    with pytest.raises(LeanfitError, match="--resume"):
        render_run(path)
    with pytest.raises(LeanfitError, match="not a leanfit run folder"):
        render_run(tmp_path)


def test_benchmark_writes_csv_json_and_machine_info(tmp_path):
    path = run_benchmark("toy-bench", out=tmp_path, overrides=["scale=0.5"])
    rows = list(csv.DictReader((path / "results.csv").open()))
    assert [(int(r["n"]), float(r["value"])) for r in rows] == [(0, 0.0), (1, 0.5), (2, 1.0), (3, 1.5)]
    assert RunDir(path).read_env()["cpu_count"] >= 1
    assert "| n | value |" in (path / "report.md").read_text()


def test_demo_index_takes_mapping_and_sentence_headlines(tmp_path):
    """Experiments report their headline as a mapping of numbers or as a sentence (topk-moe, neural-de): the demo
    index renders both, with pipes escaped so the table keeps its columns."""
    from leanfit.core.report import render_index

    a, b = tmp_path / "a" / "r", tmp_path / "b" / "r"
    index = render_index(tmp_path, [("a", a, {"ppl": 2.5}), ("b", b, "D1 slope -0.48 | 96% reach\nthe truth")])
    rows = index.read_text().splitlines()[4:]
    assert rows == ["| a | [a/r/report.md](a/r/report.md) | ppl = 2.5 |",
                    "| b | [b/r/report.md](b/r/report.md) | D1 slope -0.48 \\| 96% reach the truth |"]

