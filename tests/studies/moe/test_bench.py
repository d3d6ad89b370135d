"""``leanfit bench moe`` at toy sizes: every method and mode at every cell, ratios computed from the measured times,
the report's sections and plots, and bad settings. Timings are not asserted."""

from __future__ import annotations

import pytest
import torch

from leanfit.core.errors import ConfigError
from leanfit.core.io import read_csv, read_json
from leanfit.core.runner import run_benchmark
from leanfit.studies.moe.bench import LAYER_METHODS, MODES, _calls

TINY = ["tokens=[64]", "ds=[8]", "experts=[2,4]", "ks=[1,4]", "estimator_ns=[200]", "repeats=1", "warmup=0",
        "min_seconds=0", "target=[64,8,4,4]"]


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    return run_benchmark("moe", out=tmp_path_factory.mktemp("moe"), overrides=TINY)


def test_every_method_and_mode_at_every_cell_with_ratios(bench_dir):
    rows = read_csv(bench_dir / "results.csv")
    cells = [("2", "1"), ("4", "1"), ("4", "4")]  # (E, K); K=4 > E=2 is skipped
    expected = sorted((m, mode, e, k) for m in LAYER_METHODS for mode in MODES for e, k in cells)
    assert sorted((r["method"], r["mode"], r["e"], r["k"]) for r in rows) == expected
    for e, k in cells:
        for mode in MODES:
            group = [r for r in rows if (r["e"], r["k"], r["mode"]) == (e, k, mode)]
            ms = {r["method"]: float(r["ms"]) for r in group}
            for r in group:
                assert float(r["speedup_vs_hf"]) == pytest.approx(ms["hf_mixtral"] / float(r["ms"]), rel=1e-9)
                assert float(r["fraction_of_ideal"]) == pytest.approx(ms["ideal_dense"] / float(r["ms"]), rel=1e-9)
                assert float(r["tokens_per_s"]) == pytest.approx(64 / float(r["ms"]) * 1e3, rel=1e-9)
                assert r["intermediate"] == "16"


def test_headline_report_and_plots(bench_dir):
    results = read_json(bench_dir / "results.json")
    target = next(r for r in results["rows"] if (r["method"], r["mode"], r["e"], r["k"]) == ("leanfit", "train", 4, 4))
    assert results["headline"].startswith("SparseMoE at T=64, d=8, E=4, K=4: forward ")
    assert f"train {target['ms']:.0f} ms = {target['speedup_vs_hf']:.2f}x the HF Mixtral loop" in results["headline"]
    report = (bench_dir / "report.md").read_text()
    assert "## Layer" in report and "## Estimator" in report
    for name in ("plots/layer_forward.png", "plots/layer_train.png", "plots/estimator.png", "env.json"):
        assert (bench_dir / name).is_file(), name
    (est,) = read_csv(bench_dir / "estimator.csv")
    assert est["n"] == "200" and float(est["seconds"]) > 0


@pytest.mark.parametrize("mode", MODES)
def test_every_method_computes_the_same_layer(mode):
    # the timed callables run the same computation: leanfit and both HF paths agree; ideal has the routed-row shape
    from leanfit.moe.layer import SparseMoE

    layer = SparseMoE(8, 16, 4, 2)
    block, x = layer.to_mixtral(), torch.randn(1, 10, 8)
    calls = _calls(mode, list(LAYER_METHODS), layer, block, x)
    with torch.inference_mode(mode == "forward"):
        out = {m: fn() for m, fn in calls.items()}
    if mode == "forward":
        torch.testing.assert_close(out["leanfit"], out["hf_mixtral"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out["hf_grouped_mm"], out["hf_mixtral"], rtol=1e-5, atol=1e-6)
        assert out["ideal_dense"].shape == (20, 8)
    else:  # gradients of the input and of every weight
        assert [len(out[m]) for m in LAYER_METHODS] == [4, 4, 4, 3]
        for name in ("leanfit", "hf_grouped_mm"):
            for a, b in zip(out[name], out["hf_mixtral"], strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("override", "pattern"), [("methods=[dense]", "methods contains 'dense'"),
                                                   ("modes=[backward]", "modes contains 'backward'"),
                                                   ("target=[1,2]", r"target=\[1, 2\] is invalid")])
def test_bad_settings_are_refused(tmp_path, override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        run_benchmark("moe", out=tmp_path, overrides=[*TINY, override])
