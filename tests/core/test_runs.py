"""core.runs sub-runs: a child run folder whose record is stored atomically, read back when present, written by the
main process only, and kept apart from a second record of the same sub-run."""

from __future__ import annotations

import pytest

from leanfit.core.errors import ConfigError
from leanfit.core.io import read_json
from leanfit.core.runs import RunDir, SubRun


def test_a_new_subrun_is_an_empty_child_folder(tmp_path):
    sub = RunDir(tmp_path).subrun("ode-global-lam1-s0")
    assert isinstance(sub, SubRun) and isinstance(sub, RunDir)
    assert sub.path == tmp_path / "runs" / "ode-global-lam1-s0" and sub.path.is_dir()
    assert sub.stored() is None
    assert sub.checkpoint_dir == sub.path / "checkpoints"  # usable as the run folder of a training loop


def test_a_stored_record_is_returned_by_the_next_subrun(tmp_path):
    record = {"name": "a", "val_accuracy": 0.1 + 0.2, "sizes": [1, 2]}
    assert RunDir(tmp_path).subrun("a").store(record) is record
    assert read_json(tmp_path / "runs" / "a" / "result.json") == record
    again = RunDir(tmp_path).subrun("a").stored()
    assert again == record and again["val_accuracy"] == 0.1 + 0.2  # floats round-trip exactly
    assert not list((tmp_path / "runs" / "a").glob("*.tmp*"))  # written through a temporary file, then renamed


def test_records_of_one_subrun_under_different_names_are_independent(tmp_path):
    run = RunDir(tmp_path)
    run.subrun("clf").store({"train_seconds": 1.0})
    assert run.subrun("clf", file="test.json").stored() is None
    run.subrun("clf", file="test.json").store({"test_accuracy": 0.5})
    assert run.subrun("clf").stored() == {"train_seconds": 1.0}
    assert run.subrun("clf", file="test.json").stored() == {"test_accuracy": 0.5}


def test_only_the_main_process_writes(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    sub = RunDir(tmp_path).subrun("b")
    assert sub.store({"x": 1}) == {"x": 1}
    assert sub.stored() is None


@pytest.mark.parametrize("name", ["", "a/b", "..", "a\\b"], ids=["empty", "slash", "parent", "backslash"])
def test_names_that_are_not_one_folder_are_refused(tmp_path, name):
    with pytest.raises(ConfigError, match="name="):
        RunDir(tmp_path).subrun(name)
