"""The topk-moe study at toy sizes: it runs through the runner, its slopes are the least-squares slopes of the
means, an interrupted study resumes to the same records, and bad settings are refused."""

from __future__ import annotations

import math

import pytest

from leanfit.core.errors import ConfigError, LeanfitError
from leanfit.core.io import read_jsonl, rewrite_jsonl
from leanfit.core.runner import run_experiment
from leanfit.studies.moe.experiment import TRUTH, TopKMoEStudyConfig, always_selected, rate_slope, start_params

TINY = ["ns=[300,900]", "replications=2", "bootstrap=50", "jobs=1", "backend=threading", "max_iter=60"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("moe")
    path, results = run_experiment("topk-moe", out=out, overrides=TINY)
    return out, path, results


def test_study_records_every_fit_and_reports(study):
    _, path, results = study
    fits = read_jsonl(path / "fits.jsonl")
    assert sorted((f["setting"], f["n"], f["rep"]) for f in fits) == sorted(
        (s, n, r) for s in ("exact", "over") for n in (300, 900) for r in range(2))
    assert {(r["setting"], r["quantity"]) for r in results["slopes"]} >= {("exact", "loss"), ("over", "split_coef")}
    assert (path / "plots" / "exact.png").is_file() and (path / "plots" / "over.png").is_file()
    assert "D1 slope" in results["headline"] and "reach the truth" in results["headline"]
    # a fit below the truth is refitted from the truth; ECM never lowers the likelihood, so every kept fit reaches it
    assert all(f["refit"] == (not f["reached_truth_first"]) for f in fits)
    assert all(f["reached_truth"] and f["loglik"] >= f["truth_loglik"] - 1e-9 for f in fits)
    # the over-specified fits start with the split expert doubled: its cell holds two atoms
    assert all(f["cell_sizes"].count(2) == 1 for f in fits if f["setting"] == "over")


def test_single_start_success_is_recorded_and_reported(study):
    """One fit per replication from the estimator's own start (n_init=1); its success rate per setting and n is the
    mean of the records, shown in the report's "Single starts" table and in the headline."""
    _, path, results = study
    fits = read_jsonl(path / "fits.jsonl")
    assert all(len(f["single_reached"]) == 1 and len(f["single_gap"]) == 1 for f in fits)
    # the threshold is the study's: reached exactly when the single start's log-likelihood is at least the truth's
    assert all(hit == (gap >= -1e-12 * abs(f["truth_loglik"]))
               for f in fits for hit, gap in zip(f["single_reached"], f["single_gap"], strict=True))
    report = (path / "report.md").read_text()
    assert "### Single starts" in report and "init='random'" in report
    for row in results["per_n"]:
        hits = [h for f in fits if (f["setting"], f["n"]) == (row["setting"], row["n"]) for h in f["single_reached"]]
        assert row["single_starts"] == len(hits) == 2
        assert row["single_start_success"] == pytest.approx(sum(hits) / len(hits), abs=0)
        line = f"| {row['setting']} | {row['n']} | {row['fits']} | 2 | {row['single_start_success']:.4g} |"
        assert line in report, line
    total = [h for f in fits for h in f["single_reached"]]
    assert results["single_start_success"] == pytest.approx(sum(total) / len(total), abs=0)
    assert "single starts from the estimator's own start (init='random')" in results["headline"]


def test_no_single_starts_leaves_the_rates_alone(study, tmp_path):
    _, _, results = study
    path, without = run_experiment("topk-moe", out=tmp_path, overrides=[*TINY, "single_starts=0"])
    assert without["slopes"] == results["slopes"] and without["single_start_success"] is None
    assert all(r["single_starts"] == 0 and r["single_start_success"] is None for r in without["per_n"])
    assert "### Single starts" not in (path / "report.md").read_text()  # no empty table


def test_slope_is_the_least_squares_slope_of_the_means():
    fits = [{"n": n, "rep": r, "loss": 3.0 * n**-0.5 * (1 + 0.1 * r)} for n in (100, 1000, 10000) for r in range(3)]
    s = rate_slope(fits, "loss", n_boot=200, seed=0)
    assert s.estimate == pytest.approx(-0.5, abs=1e-12)
    assert s.low <= -0.5 <= s.high


def test_slope_needs_two_sample_sizes_with_positive_values():
    fits = [{"n": n, "rep": r, "loss": 1.0 if n == 100 else float("nan")} for n in (100, 1000) for r in range(3)]
    assert all(math.isnan(v) for v in rate_slope(fits, "loss", n_boot=10, seed=0))


def test_parallel_fits_equal_sequential_fits(study, tmp_path):
    _, _, results = study
    _, parallel = run_experiment("topk-moe", out=tmp_path, overrides=[*TINY, "jobs=2"])
    timing = ("mean_seconds", "mean_single_seconds")
    assert parallel["slopes"] == results["slopes"] and parallel["per_n"] == [
        {**row, **{k: p[k] for k in timing}} for row, p in zip(results["per_n"], parallel["per_n"], strict=True)]


def test_the_old_knob_name_n_jobs_is_read_as_jobs():
    assert TopKMoEStudyConfig.from_dict({"n_jobs": 3}).jobs == 3
    with pytest.raises(ConfigError, match="n_jobs"):
        TopKMoEStudyConfig.from_dict({"n_jobs": 3, "jobs": 2})


def test_resume_finishes_an_interrupted_study(study, tmp_path):
    out, path, results = study
    done = read_jsonl(path / "fits.jsonl")
    import shutil

    copy = tmp_path / "topk-moe" / path.name
    shutil.copytree(path, copy)
    (copy / "results.json").unlink()
    rewrite_jsonl(copy / "fits.jsonl", lambda f: not (f["setting"] == "over" and f["n"] == 900))
    _, resumed = run_experiment("topk-moe", out=tmp_path, overrides=TINY, resume=True)
    again = read_jsonl(copy / "fits.jsonl")
    key = lambda f: (f["setting"], f["n"], f["rep"])  # noqa: E731
    strip = lambda f: {k: v for k, v in f.items() if k not in ("seconds", "single_seconds")}  # noqa: E731
    assert sorted(map(strip, again), key=key) == sorted(map(strip, done), key=key)
    assert resumed["slopes"] == results["slopes"]


def test_starts_do_not_depend_on_n_and_split_the_chosen_expert():
    a = start_params("over", 0.1, 1, seed=7)
    b = start_params("over", 0.1, 1, seed=7)
    assert a == b and len(a["var"]) == 4
    # both copies of expert 1 start near half its weight
    assert math.exp(a["gate_intercept"][0]) + math.exp(a["gate_intercept"][2]) == pytest.approx(
        math.exp(TRUTH["gate_intercept"][1]), rel=0.5)
    assert always_selected(TRUTH, 2) == [1]


def test_split_needs_a_log2_margin_over_the_unselected_experts():
    # expert 1's logit minus the best unselected one is min(3x + 1, 1 - 3x) >= 1 on [-1, 1]; with intercept 0.5 the
    # margin falls to 0.5 < log 2 at x = 0, where half-weight atoms drop below an unselected expert
    assert always_selected(TRUTH, 2, margin=math.log(2)) == [1]
    assert always_selected(TRUTH, 2, margin=1.01) == []
    weaker = {**TRUTH, "gate_intercept": [0.0, 0.5, 0.0]}
    assert always_selected(weaker, 2) == [1] and always_selected(weaker, 2, margin=math.log(2)) == []


@pytest.mark.parametrize(("override", "fragment"), [("split_expert=0", "contains the truth"),
                                                    ("settings=[under]", "settings="),
                                                    ("backend=spark", "backend='spark'"),
                                                    ("replications=1", "replications=1"),
                                                    ("single_starts=-1", "single_starts=-1"),
                                                    ("single_start_init=given", "single_start_init='given'"),
                                                    ("jobs=0", "jobs=0")])
def test_bad_settings(tmp_path, override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[")):
        run_experiment("topk-moe", out=tmp_path, overrides=[*TINY, override])


def test_cluster_backends_name_their_install(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_dask(name, *args, **kwargs):
        if name.startswith("dask"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_dask)
    with pytest.raises(LeanfitError, match="dask"):
        run_experiment("topk-moe", out=tmp_path, overrides=[*TINY, "backend=dask", "jobs=2"])


def test_a_run_recorded_with_the_old_knob_name_resumes(study):
    """--resume compares configs as the class reads them, so a run folder written with n_jobs resumes."""
    import yaml

    out, path, results = study
    record = yaml.safe_load((path / "config.yaml").read_text())
    record["config"]["n_jobs"] = record["config"].pop("jobs")  # as written before the knob was renamed
    (path / "config.yaml").write_text(yaml.safe_dump(record, sort_keys=False))
    again, resumed = run_experiment("topk-moe", out=out, overrides=TINY, run_id=path.name, resume=True)
    assert again == path and resumed == results
