"""Progress: the info field (the loss) stays visible, logs that are not a terminal get timed plain lines, a stage
without a count says when it starts and how long it took."""

from __future__ import annotations

from typing import Any

import pytest

from leanfit.core import progress
from leanfit.core.progress import ProgressBar, progress_bar, stage


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def update(self, task: Any, **kwargs: Any) -> None:
        self.calls.append(kwargs)


def test_advance_without_fields_keeps_the_shown_loss() -> None:
    rec = _Recorder()
    bar = ProgressBar(rec, 0)
    bar.advance(0, loss=1.23456)
    bar.advance(1)
    assert rec.calls == [{"advance": 0, "info": "loss=1.235"}, {"advance": 1}]  # no info="" that would blank it


@pytest.fixture
def shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LEANFIT_NO_PROGRESS", raising=False)
    monkeypatch.delenv("RANK", raising=False)


def test_plain_lines_when_stdout_is_not_a_terminal(
    shown: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LEANFIT_PROGRESS_SECONDS", "0")  # a line on every advance
    with progress_bar(4, "training", completed=1) as bar:
        bar.advance(1, loss=2.5)
        bar.advance(1)
        bar.advance(1, loss=2.0)
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert captured.out == ""
    assert lines[0] == "leanfit: training: started (1/4)"
    assert lines[1].startswith("leanfit: training: 2/4 (50%) elapsed 0:00:0") and lines[1].endswith("loss=2.5")
    assert lines[2].startswith("leanfit: training: 3/4 (75%)") and lines[2].endswith("loss=2.5")  # kept
    assert lines[3].startswith("leanfit: training: 4/4 (100%)") and lines[3].endswith("loss=2")
    assert lines[4].startswith("leanfit: training: finished 4/4 (100%)")
    assert len(lines) == 5


def test_plain_lines_are_spaced_by_the_interval(
    shown: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clock = iter([0.0, 1.0, 2.0, 16.0, 17.0, 40.0, 41.0])  # start, five advances, close
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    with progress_bar(5, "fit") as bar:
        for _ in range(5):
            bar.advance(1)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(": ", 2)[2].split(" elapsed")[0] for line in lines] == [
        "started (0/5)", "3/5 (60%)", "5/5 (100%)", "finished 5/5 (100%)"]
    assert lines[1].endswith("elapsed 0:00:16") and lines[3].endswith("elapsed 0:00:41")


def test_nothing_is_printed_when_progress_is_off(capsys: pytest.CaptureFixture[str]) -> None:
    with progress_bar(3, "quiet") as bar, stage("quiet stage"):
        bar.advance(3, loss=1.0)
    assert capsys.readouterr().err == ""


def test_stage_says_when_it_starts_and_how_long_it_took(shown: None, capsys: pytest.CaptureFixture[str]) -> None:
    with stage("data: tokenizer"):
        pass
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "leanfit: data: tokenizer ..."
    assert lines[1].startswith("leanfit: data: tokenizer: done in 0.") and lines[1].endswith(" s")


def test_non_main_processes_print_nothing(
    shown: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RANK", "1")
    with progress_bar(2, "rank1") as bar, stage("rank1 stage"):
        bar.advance(2)
    progress.notice("hidden")
    assert capsys.readouterr().err == ""
