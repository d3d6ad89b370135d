"""``leanfit bench vq-logits`` at toy sizes: it runs end to end, measures what it claims on the same problem for
every method, and rejects bad settings. Timings are not asserted (benchmarks, not timed tests)."""

from __future__ import annotations

import json

import pytest

from leanfit.cli import main
from leanfit.core.io import read_csv
from leanfit.core.runner import run_benchmark
from leanfit.studies.vq_logits.bench import DECODE_METHODS, METHODS, measure_step

TINY = ["ns=[48]", "ds=[16]", "vs=[300,600]", "ks=[4,16]", "decode_vs=[300,600]", "decode_d=8", "decode_k=16",
        "decode_steps=3", "decode_rounds=1", "repeats=1", "warmup=0", "min_seconds=0", "isolate=false"]


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    return run_benchmark("vq-logits", out=tmp_path_factory.mktemp("bench"), overrides=TINY)


def test_every_method_is_measured_at_every_cell(bench_dir):
    rows = read_csv(bench_dir / "results.csv")
    # per V: vq and gather at 2 K each, 3 baselines
    assert len(rows) == 2 * (2 * 2 + 3)
    assert {r["method"] for r in rows} == set(METHODS)
    assert all(float(r["step_ms"]) > 0 and float(r["peak_mb"]) >= 0 for r in rows)
    decode = read_csv(bench_dir / "decode.csv")
    assert sorted((r["method"], int(r["v"])) for r in decode) == sorted((m, v) for m in DECODE_METHODS for v in (300, 600))
    for name in ("report.md", "results.json", "env.json", "plots/step_time.png", "plots/peak_memory.png",
                 "plots/decode.png"):
        assert (bench_dir / name).is_file(), name


def test_methods_solve_the_same_problem(bench_dir):
    """The exact heads agree on the loss of identical inputs, so the timings compare like with like."""
    rows = read_csv(bench_dir / "results.csv")
    loss = {(r["method"], r["v"], r["k"]): float(r["loss"]) for r in rows}
    for v in ("300", "600"):
        for k in ("4", "16"):
            assert loss[("vq", v, k)] == pytest.approx(loss[("gather", v, k)], rel=1e-5)
        assert loss[("linear_ce", v, "")] == pytest.approx(loss[("linear_cross_entropy", v, "")], rel=1e-5)


def _decode(results, method, v):
    return next(r["us_per_token"] for r in results["decode_rows"] if r["method"] == method and r["v"] == v)


def test_ratios_and_headline(bench_dir):
    results = json.loads((bench_dir / "results.json").read_text())
    by = {(r["method"], r["v"], r["k"]): r for r in results["rows"]}
    vq, dense = by[("vq", 600, 16)], by[("linear_ce", 600, None)]
    assert vq["speedup_vs_linear_ce"] == pytest.approx(dense["step_ms"] / vq["step_ms"])
    assert vq["speedup_vs_gather"] == pytest.approx(by[("gather", 600, 16)]["step_ms"] / vq["step_ms"])
    assert results["summary"]["decode_v_range"] == [300, 600]
    assert "greedy" in results["headline"] and "top-p" in results["headline"]
    assert results["summary"]["decode_vq_argmax_change"] == pytest.approx(
        _decode(results, "vq_argmax", 600) / _decode(results, "vq_argmax", 300) - 1)


def test_peak_memory_sees_the_materialised_logits():
    """Memory accounting is real: 8k x 32k float32 logits (1 GiB) show up for Linear+CE, not for the VQ head."""
    pytest.importorskip("resource")
    dense = measure_step("linear_ce", 8192, 8, 32768, 0, warmup=0, repeats=1)
    vq = measure_step("vq", 8192, 8, 32768, 64, warmup=0, repeats=1)
    assert dense["peak_mb"] > 1024
    assert vq["peak_mb"] < 0.1 * dense["peak_mb"]


@pytest.mark.parametrize(("override", "fragment"), [("methods=[dense]", "methods contains 'dense'"),
                                                    ("decode_k=40000", "decode_k=40000"),
                                                    ("ks=[0]", "ks contains 0")])
def test_bad_settings_are_one_line_errors(capsys, tmp_path, override, fragment):
    with pytest.raises(SystemExit) as exit_info:
        raise SystemExit(main(["bench", "vq-logits", override, "--out", str(tmp_path)]))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and fragment in err, err
    assert not (tmp_path / "vq-logits").exists()
