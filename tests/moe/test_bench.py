"""``leanfit bench moe`` at toy sizes: every method at every cell, ratios computed from the measured times, the
estimator section, and bad settings. Timings are not asserted."""

from __future__ import annotations

import csv

import pytest

from leanfit.core.errors import ConfigError
from leanfit.core.io import read_json
from leanfit.core.runner import run_benchmark
from leanfit.moe.bench import LAYER_METHODS

TINY = ["tokens=[128]", "ds=[16]", "experts=[4]", "ks=[1,2]", "estimator_ns=[200]", "repeats=1", "min_seconds=0",
        "target=[128,16,4,2]"]  # fmt: skip


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    return run_benchmark("moe", out=tmp_path_factory.mktemp("moe"), overrides=TINY)


def test_layer_rows_and_ratios(bench_dir):
    with open(bench_dir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["method"], r["k"]) for r in rows) == sorted((m, k) for m in LAYER_METHODS for k in ("1", "2"))
    for k in ("1", "2"):
        ms = {r["method"]: float(r["ms"]) for r in rows if r["k"] == k}
        for r in (r for r in rows if r["k"] == k):
            assert float(r["speedup_vs_hf_eager"]) == pytest.approx(ms["hf_eager"] / float(r["ms"]), rel=1e-9)
            assert float(r["fraction_of_ideal"]) == pytest.approx(ms["ideal_dense"] / float(r["ms"]), rel=1e-9)
    results = read_json(bench_dir / "results.json")
    assert "the HF Mixtral loop" in results["headline"]
    assert (bench_dir / "plots" / "layer.png").is_file() and (bench_dir / "plots" / "estimator.png").is_file()


def test_estimator_section(bench_dir):
    with open(bench_dir / "estimator.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["n"] == "200" and float(row["seconds"]) > 0


def test_bad_methods_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="methods contains 'dense'"):
        run_benchmark("moe", out=tmp_path, overrides=[*TINY, "methods=[dense]"])
