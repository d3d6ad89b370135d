"""``--print-config`` and ``--help-config``: the resolved config without running, and a run's own config.yaml
passed back with ``--config`` resolving to the same settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from leanfit.cli import main
from leanfit.core import registry
from leanfit.core.config import BaseConfig, option


@dataclass
class _Inner(BaseConfig):
    width: int = option(4, help="a width")


@dataclass
class _PrintToy(BaseConfig):
    sizes: list[int] = option(default_factory=lambda: [1, 2], help="sizes of things")
    rate: float = option(0.5, help="a rate")
    inner: _Inner = field(default_factory=_Inner, metadata={"help": "nested"})


PRESETS = {"quick": {}, "full": {"sizes": [8, 16, 32], "inner": {"width": 64}}}


@registry.register("print-config-toy", kind="experiment", description="toy", config_cls=_PrintToy, presets=PRESETS,
                   in_demo=False)
def _toy(ctx: Any) -> dict[str, Any]:
    return {"total": sum(ctx.config.sizes) * ctx.config.rate}


def _printed(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict[str, Any]:
    assert main(argv) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_a_runs_config_yaml_passed_back_resolves_to_the_same_record(capsys, tmp_path):
    argv = ["run", "print-config-toy", "--out", str(tmp_path), "--preset", "full", "--seed", "3", "rate=0.25",
            "report_to=none"]
    assert main(argv) == 0
    capsys.readouterr()
    (run,) = (tmp_path / "print-config-toy").iterdir()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    printed = _printed(capsys, ["run", "print-config-toy", "--config", str(run / "config.yaml"), "--print-config"])
    assert printed == saved
    assert printed["preset"] == "full" and printed["seed"] == 3 and printed["config"]["rate"] == 0.25
    # the same settings give the same run id: --resume finds the finished run instead of starting another
    assert main(["run", "print-config-toy", "--config", str(run / "config.yaml"), "--out", str(tmp_path),
                 "--resume"]) == 0
    assert [p.name for p in (tmp_path / "print-config-toy").iterdir()] == [run.name]


def test_print_config_applies_preset_then_file_then_overrides_and_runs_nothing(capsys, tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("rate: 0.125\ninner:\n  width: 5\n")
    printed = _printed(capsys, ["run", "print-config-toy", "--print-config", "--preset", "full", "--config", str(file),
                                "inner.width=6", "--out", str(tmp_path / "out")])
    assert printed == {"experiment": "print-config-toy", "kind": "experiment", "preset": "full", "seed": 0,
                       "config": {"sizes": [8, 16, 32], "rate": 0.125, "inner": {"width": 6}}}
    assert not (tmp_path / "out").exists()


def test_print_config_of_a_benchmark(capsys):
    printed = _printed(capsys, ["bench", "threads", "--print-config", "--preset", "full", "--seed", "2"])
    assert (printed["kind"], printed["experiment"], printed["preset"], printed["seed"]) == ("benchmark", "threads",
                                                                                          "full", 2)
    assert printed["config"] == registry.get("benchmark", "threads").preset_config("full").to_dict()


def test_help_config_shows_the_presets_values_and_element_types(capsys):
    assert main(["run", "print-config-toy", "--help-config", "--preset", "full"]) == 0
    out = capsys.readouterr().out
    assert "sizes: list[int] = [8, 16, 32]  (default: [1, 2])\n      sizes of things" in out
    assert "inner.width: int = 64  (default: 4)" in out
    assert "rate: float = 0.5\n" in out
    assert main(["run", "print-config-toy", "--help-config"]) == 0
    assert "sizes: list[int] = [1, 2]\n" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["run", "print-config-toy", "--print-config", "rate=abc"], "rate='abc' is invalid"),
        (["run", "print-config-toy", "--print-config", "--preset", "huge"], "--preset='huge'"),
        (["run", "print-config-toy", "--help-config", "--preset", "huge"], "--preset='huge'"),
        (["run", "print-config-toy", "--print-config", "--seed", "-1"], "--seed=-1"),
    ],
    ids=["bad-override", "bad-preset", "bad-preset-help", "negative-seed"],
)
def test_bad_input_is_one_line_exit_2(capsys, argv, fragment):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err, err


def test_a_record_of_another_experiment_is_refused_in_one_line(capsys, tmp_path: Path):
    record = tmp_path / "config.yaml"
    record.write_text(yaml.safe_dump({"experiment": "moe", "kind": "benchmark", "preset": "quick", "seed": 0,
                                      "config": {}}))
    assert main(["run", "print-config-toy", "--config", str(record), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run record of benchmark 'moe'" in err and "leanfit bench moe" in err, err
