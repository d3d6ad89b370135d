"""Bad input on the command line and damaged run folders: one line on stderr, exit code 2, no traceback, and
nothing written where it should not be. Each case is a probe a new user ran into."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from leanfit.cli import main
from leanfit.core import registry
from leanfit.core.config import BaseConfig, option
from leanfit.core.io import read_json


@dataclass
class _ToyConfig(BaseConfig):
    value: float = option(1.0, help="a value the toy returns")


def _toy_report(run: Any, results: dict[str, Any]) -> Any:
    from leanfit.core.report import Report

    rep = Report("toy")
    rep.text(f"{len(run.metrics())} logged steps")
    return rep


@registry.register("bad-input-toy", kind="experiment", description="toy", config_cls=_ToyConfig, in_demo=False,
                   report=_toy_report)
def _toy(ctx: Any) -> dict[str, Any]:
    ctx.run.log(1, loss=1.0)
    loss = float("-inf") if ctx.config.value == 0 else math.log(ctx.config.value)  # a diverged run at value=0
    return {"value": ctx.config.value, "nested": {"loss": loss}}


def _one_line_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str], *fragments: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


CONFIG_PROBES = {
    "n_heads=0": (["model.n_heads=0"], ["model.n_heads=0 is invalid", ">= 1"]),
    "lr=nan": (["train.lr=.nan"], ["train.lr=nan is invalid", "finite"]),
    "lr=inf": (["train.lr=.inf"], ["train.lr=inf is invalid", "finite"]),
    "lr=1e999": (["train.lr=1e999"], ["train.lr=inf is invalid", "finite"]),
    "lr=-1": (["train.lr=-1"], ["train.lr=-1.0 is invalid", "> 0"]),
    "grad_clip=nan": (["train.grad_clip=.nan"], ["train.grad_clip=nan is invalid"]),
    "weight_decay=nan": (["train.weight_decay=.nan"], ["train.weight_decay=nan is invalid"]),
    "weight_decay=-1": (["train.weight_decay=-0.5"], ["train.weight_decay=-0.5 is invalid", ">= 0"]),
    "ffn_mult=nan": (["model.ffn_mult=.nan"], ["model.ffn_mult=nan is invalid"]),
    "ffn_mult=-1": (["model.ffn_mult=-1"], ["model.ffn_mult=-1.0 is invalid", "> 0"]),
    "valid_fraction=nan": (["data.valid_fraction=.nan"], ["data.valid_fraction=nan is invalid"]),
    "corpus=empty": (["data.corpus="], ["corpus=''", "name a corpus"]),
    "corpus=a+": (["data.corpus=shakespeare+"], ["corpus='shakespeare+'"]),
}


@pytest.mark.parametrize("probe", sorted(CONFIG_PROBES))
def test_bad_config_values_are_one_line(probe: str, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    overrides, fragments = CONFIG_PROBES[probe]
    _one_line_exit_2(capsys, ["run", "lm-baseline", "--out", str(tmp_path), *overrides], *fragments)
    assert not any(tmp_path.rglob("results.json"))


BINARY = bytes(range(256)) * 4


@pytest.mark.parametrize("where", ["file", "folder"])
def test_a_binary_corpus_names_the_file(where: str, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "ok.txt").write_text("some text\n" * 10, encoding="utf-8")
    (root / "bad.txt").write_bytes(BINARY)
    spec = root / "bad.txt" if where == "file" else root
    _one_line_exit_2(capsys, ["run", "lm-baseline", "--out", str(tmp_path / "o"), f"data.corpus={spec}"],
                     "not UTF-8 text", "bad.txt")


def test_an_empty_corpus_folder_is_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "empty.txt").write_text("  \n", encoding="utf-8")
    _one_line_exit_2(capsys, ["run", "lm-baseline", "--out", str(tmp_path / "o"), f"data.corpus={tmp_path / 'c'}"],
                     "every file is empty")


@pytest.mark.parametrize("content", [BINARY, b"a: [1,\n", b"- 1\n"], ids=["binary", "torn", "list"])
def test_a_bad_config_file_is_one_line(content: bytes, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_bytes(content)
    _one_line_exit_2(capsys, ["run", "lm-baseline", "--config", str(tmp_path / "c.yaml")], "--config=")


def test_a_folder_as_config_file_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    _one_line_exit_2(capsys, ["run", "lm-baseline", "--config", str(tmp_path)], "no such file")


@pytest.mark.parametrize("run_id", ["../../x", "../x", "..", ".", "a/b", "/tmp/x", ".hidden", ""])
def test_run_ids_that_leave_out_are_refused(run_id: str, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "out"
    _one_line_exit_2(capsys, ["run", "bad-input-toy", "--out", str(out), "--run-id", run_id], "--run-id=")
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_resume_with_nothing_to_resume_says_so(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["run", "bad-input-toy", "--out", str(tmp_path), "--run-id", "a"]) == 0
    capsys.readouterr()
    assert main(["run", "bad-input-toy", "--out", str(tmp_path), "--run-id", "b", "--resume"]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing to resume" in err and "starting a new run" in err and "a" in err, err


def test_non_finite_results_are_valid_json_and_the_run_is_failed(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _one_line_exit_2(capsys, ["run", "bad-input-toy", "--out", str(tmp_path), "--run-id", "r", "value=0"],
                     "non-finite results (nested.loss)", "marked failed")
    path = tmp_path / "bad-input-toy" / "r" / "results.json"
    results = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in results.json"))
    assert results["nested"]["loss"] is None and results["value"] == 0.0
    assert results["status"] == "failed" and results["nonfinite"] == ["nested.loss"]


@pytest.mark.parametrize("damage", ["config.yaml", "results.json", "metrics.jsonl", "config-list"])
def test_report_of_a_damaged_run_folder_is_one_line(
    damage: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["run", "bad-input-toy", "--out", str(tmp_path), "--run-id", "r"]) == 0
    capsys.readouterr()
    run = tmp_path / "bad-input-toy" / "r"
    if damage == "metrics.jsonl":  # a torn line before the last one (a torn last line is a kill, and skipped)
        (run / damage).write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n', encoding="utf-8")
    elif damage == "config-list":
        (run / "config.yaml").write_text("- 1\n", encoding="utf-8")
    elif damage == "config.yaml":  # torn inside a flow mapping (a cut at a line end often still parses)
        (run / damage).write_text("experiment: bad-input-toy\nconfig: {value: 1.", encoding="utf-8")
    else:
        (run / damage).write_text((run / damage).read_text()[:25], encoding="utf-8")
    _one_line_exit_2(capsys, ["report", str(run)], "config.yaml" if damage.startswith("config") else damage)


def test_a_torn_last_metrics_line_is_skipped(tmp_path: Path) -> None:
    assert main(["run", "bad-input-toy", "--out", str(tmp_path), "--run-id", "r"]) == 0
    run = tmp_path / "bad-input-toy" / "r"
    (run / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "lo', encoding="utf-8")
    assert main(["report", str(run)]) == 0
    assert "1 logged steps" in (run / "report.md").read_text()


def test_a_file_as_run_folder_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    _one_line_exit_2(capsys, ["report", str(tmp_path / "f")], "not a leanfit run folder")


def test_fp16_on_the_cpu_is_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                    tiny_overrides: list[str]) -> None:
    _one_line_exit_2(capsys, ["run", "lm-baseline", "--out", str(tmp_path), *tiny_overrides,
                              "train.mixed_precision=fp16", "train.device=cpu", "train.steps=5"],
                     "train.mixed_precision='fp16' is invalid", "bf16")


def test_outputs_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        assert main(["run", "bad-input-toy", "--out", str(tmp_path), "--run-id", "r"]) == 0
    finally:
        os.umask(old)
    run = tmp_path / "bad-input-toy" / "r"
    modes = {p.name: p.stat().st_mode & 0o777 for p in run.iterdir() if not p.name.startswith(".lock")}
    assert {"config.yaml", "env.json", "results.json", "report.md"} <= set(modes)
    assert all(m == (0o755 if (run / n).is_dir() else 0o644) for n, m in modes.items()), modes


# --- one writer per run folder -------------------------------------------------------------------------------------
def _start(out: Path, overrides: list[str], *extra: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "leanfit", "run", "lm-baseline", "--out", str(out), "--run-id", "r", *overrides,
           *extra]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "LEANFIT_NO_PROGRESS": "1"})


def _wait_for(path: Path, proc: subprocess.Popen[str], seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert path.exists(), proc.stderr.read() if proc.stderr and proc.poll() is not None else "timed out"


@pytest.mark.integration
def test_a_second_writer_is_refused_naming_the_holder(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_overrides: list[str]
) -> None:
    args = [*tiny_overrides, "train.steps=3000", "train.checkpoint_every=10"]
    first = _start(tmp_path, args)
    try:
        _wait_for(tmp_path / "lm-baseline" / "r" / "checkpoints" / "LATEST", first)
        err = _one_line_exit_2(capsys, ["run", "lm-baseline", "--out", str(tmp_path), "--run-id", "r", *args,
                                        "--resume"], "is in use by another leanfit process", f"pid {first.pid}")
        assert "--run-id" in err
        second = _start(tmp_path, args)  # started fresh while the first runs: refused the same way
        assert second.wait(timeout=120) == 2
        assert "in use by another leanfit process" in second.stderr.read()
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    run = tmp_path / "lm-baseline" / "r"
    steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == sorted(set(steps)), "two writers logged the same steps"


@pytest.mark.integration
def test_two_writers_started_together_one_wins(tmp_path: Path, tiny_overrides: list[str]) -> None:
    args = [*tiny_overrides, "train.steps=40"]
    procs = [_start(tmp_path, args) for _ in range(2)]
    codes = sorted(p.wait(timeout=300) for p in procs)
    errs = [p.stderr.read() for p in procs]
    assert codes == [0, 2], errs
    loser = next(e for p, e in zip(procs, errs, strict=True) if p.returncode == 2)
    assert loser.count("\n") == 1 and ("in use by another leanfit process" in loser or "already exists" in loser)
    assert read_json(tmp_path / "lm-baseline" / "r" / "results.json")["resumed_from"] is None
