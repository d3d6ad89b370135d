"""``leanfit bench neural-de-adjoint`` at toy sizes: every arm trains from the same weights on the same batches, so
direct and checkpoint (the same discrete gradients) end with the same accuracy and NFE; the backward NFE and the
ratios are the ones measured; memory is measured per arm; bad arms are refused. Timings are not asserted."""

from __future__ import annotations

import pytest

from leanfit.core.errors import ConfigError
from leanfit.core.io import read_json
from leanfit.core.runner import run_benchmark
from leanfit.studies.neural_de.adjoint_cost import add_ratios, targets

TINY = ["dataset=digits", "hidden=6", "batch_size=32", "steps=3", "rtol=1e-5", "atol=1e-5", "eval_batch=128",
        "threads=1", "memory_tols=[1e-7]", "lambdas={global: 1.0, local_taken: 1.0}",
        "arms=[vanilla:direct,vanilla:checkpoint,vanilla:backsolve,global:direct,global:checkpoint]"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("adj")
    path = run_benchmark("neural-de-adjoint", preset="quick", out=out, overrides=TINY)
    return path, read_json(path / "results.json")


@pytest.mark.slow  # eight fresh processes: about a minute
def test_checkpoint_trains_the_same_model_as_direct(results):
    _, res = results
    by = {r["arm"]: r for r in res["rows"]}
    assert len(by) == 5
    for method in ("vanilla", "global"):
        d, c = by[f"{method}:direct"], by[f"{method}:checkpoint"]
        assert c["test_accuracy"] == d["test_accuracy"] and c["test_nfe_joint"] == d["test_nfe_joint"]
        assert c["train_nfe_forward"] == d["train_nfe_forward"] and c["accuracy_vs_direct_points"] == 0.0
        assert d["train_nfe_backward"] == 0 and c["train_nfe_backward"] > 0
    assert by["vanilla:backsolve"]["train_nfe_backward"] > 0
    assert abs(by["vanilla:backsolve"]["accuracy_vs_direct_points"]) <= 5.0  # gradients to the tolerance


@pytest.mark.slow
def test_ratios_are_the_measured_ones(results):
    path, res = results
    by = {r["arm"]: r for r in res["rows"]}
    for r in res["rows"]:
        d = by[f"{r['method']}:direct"]
        assert r["peak_mb"] > 0
        assert r["memory_vs_direct"] == pytest.approx(r["peak_mb"] / d["peak_mb"])
        assert r["time_vs_direct"] == pytest.approx(r["train_seconds"] / d["train_seconds"])
    mem = res["memory_at_tols"]
    assert sorted(m["arm"] for m in mem) == ["vanilla:backsolve", "vanilla:checkpoint", "vanilla:direct"]
    assert all(m["tol"] == 1e-7 and m["nfe_forward"] > by[m["arm"]]["memory_nfe_forward"] for m in mem)
    checks = {t["check"]: t for t in res["targets"]}
    assert checks["vanilla:checkpoint memory <= 0.25 x direct"]["met"] == (by["vanilla:checkpoint"]["memory_vs_direct"]
                                                                         <= 0.25)
    assert (path / "plots" / "adjoint_cost.png").is_file() and "memory" in (path / "report.md").read_text()


@pytest.mark.parametrize(("override", "match"), [
    ("arms=[global:backsolve]", "discrete sensitivities"), ("arms=[vanilla:adjoint]", "method:adjoint"),
    ("arms=[global:direct]", "no lambda"), ("steps=0", "steps"), ("dataset=cifar", "dataset"),
    ("memory_tols=[2.0]", "memory_tols"),
])
def test_bad_settings_are_refused(override, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        run_benchmark("neural-de-adjoint", preset="quick", out=tmp_path,
                      overrides=[override, "lambdas={}"] if "global:direct" in override else [override])


def _row(arm: str, peak: float, seconds: float, acc: float) -> dict:
    method, _, adjoint = arm.partition(":")
    return {"arm": arm, "method": method, "adjoint": adjoint, "peak_mb": peak, "train_seconds": seconds,
            "step_seconds": seconds / 10, "test_accuracy": acc}


def test_ratios_and_targets_from_rows():
    rows = [_row("vanilla:direct", 400.0, 10.0, 0.9), _row("vanilla:checkpoint", 100.0, 14.0, 0.9),
            _row("vanilla:backsolve", 41.0, 20.0, 0.89), _row("global:checkpoint", 120.0, 12.0, 0.91),
            _row("local_taken:backsolve", 50.0, 11.0, 0.9)]
    add_ratios(rows)
    by = {r["arm"]: r for r in rows}
    assert by["vanilla:checkpoint"]["memory_vs_direct"] == 0.25 and by["vanilla:backsolve"]["time_vs_direct"] == 2.0
    assert by["vanilla:backsolve"]["accuracy_vs_direct_points"] == pytest.approx(-1.0)
    assert "memory_vs_direct" not in by["global:checkpoint"]  # no global:direct row to divide by
    checks = {t["check"]: (t["measured"], t["met"]) for t in targets(rows)}
    assert checks["vanilla:checkpoint memory <= 0.25 x direct"] == (0.25, True)
    assert checks["vanilla:backsolve memory <= 0.1 x direct"] == (pytest.approx(0.1025), False)
    assert checks["local_taken:backsolve training time <= global:checkpoint"] == (pytest.approx(11 / 12), True)
