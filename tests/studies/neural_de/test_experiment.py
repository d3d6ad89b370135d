"""The neural-de experiment at toy sizes: it runs through the runner, every arm of a seed starts from the same
weights, the lambda rule (core.stats.choose_within_drop) picks on validation, ratios are to vanilla of the same
seed, and an interrupted run resumes without retraining finished models."""

from __future__ import annotations

import shutil

import pytest
import torch

from leanfit.core.errors import ConfigError
from leanfit.core.io import read_json, read_jsonl
from leanfit.core.runner import run_experiment

TINY = ["seeds=[0,1]", "timing_repeats=1", "eval_batch=128", "threads=1",
        "ode.steps=4", "ode.hidden=8", "ode.lambdas=[0.5,2.0]", "ode.rtol=1e-4", "ode.atol=1e-4",
        "ode.methods=[vanilla,global,local_unbiased,local_taken]", "ode.eval_every=2",
        "sde.steps=3", "sde.hidden=8", "sde.latent=4", "sde.lambdas=[1.0]", "sde.methods=[vanilla,local_biased]"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("nde")
    path, results = run_experiment("neural-de", out=out, overrides=TINY)
    return out, path, results


def test_every_arm_is_trained_scored_and_reported(study):
    _, path, results = study
    rows = results["rows"]
    got = sorted((r["family"], r["method"], r["seed"]) for r in rows)
    want = sorted([("ode", m, s) for m in ("vanilla", "global", "local_unbiased", "local_taken") for s in (0, 1)]
                  + [("sde", m, s) for m in ("vanilla", "local_biased") for s in (0, 1)])
    assert got == want
    for r in rows:
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["test_nfe_joint"] >= 6 and r["predict_seconds"] > 0
        assert r["test_nfe_sample"] >= 6
    # the sweep ran on the first seed only, with both lambdas, and the other seed reuses the chosen lambda
    sweeps = [s for s in results["sweeps"] if s["family"] == "ode" and s["method"] == "global"]
    assert sorted(s["lambda"] for s in sweeps) == [0.5, 2.0] and sum(s["chosen"] for s in sweeps) == 1
    chosen = next(s["lambda"] for s in sweeps if s["chosen"])
    assert {r["lambda"] for r in rows if r["method"] == "global"} == {chosen}
    assert (path / "runs" / "ode-global-lam0.5-s0").is_dir() and (path / "runs" / "ode-global-lam2-s0").is_dir()
    assert not (path / "runs" / f"ode-global-lam{2.0 if chosen == 0.5 else 0.5:g}-s1").exists()
    for name in ("ode_nfe_training", "ode_acc_vs_nfe", "sde_nfe_training", "sde_acc_vs_nfe"):
        assert (path / "plots" / f"{name}.png").is_file()
    assert "Neural ODE" in (path / "report.md").read_text()


def test_ratios_are_to_vanilla_of_the_same_seed(study):
    _, _, results = study
    rows = results["rows"]
    for r in rows:
        base = next(b for b in rows if b["family"] == r["family"] and b["method"] == "vanilla" and b["seed"] == r["seed"])
        assert r["test_nfe_joint_ratio"] == pytest.approx(r["test_nfe_joint"] / base["test_nfe_joint"])
        assert r["train_seconds_ratio"] == pytest.approx(r["train_seconds"] / base["train_seconds"])
        assert r["accuracy_drop_points"] == pytest.approx(100 * (base["test_accuracy"] - r["test_accuracy"]))
    s = next(x for x in results["summary"] if x["family"] == "ode" and x["method"] == "global")
    vals = [r["test_nfe_joint_ratio"] for r in rows if r["family"] == "ode" and r["method"] == "global"]
    assert s["test_nfe_joint_ratio_mean"] == pytest.approx(sum(vals) / len(vals))


def test_arms_of_a_seed_start_from_the_same_weights_and_batches(study):
    _, path, _ = study
    # step 1's task loss is computed before any update: equal weights and batch give equal losses in every arm
    first = {}
    for sub in (path / "runs").glob("ode-*-s0"):
        first[sub.name] = read_jsonl(sub / "metrics.jsonl")[0]["task_loss"]
    assert len(first) >= 4 and max(first.values()) - min(first.values()) < 1e-12
    regs = [read_jsonl(sub / "metrics.jsonl")[0]["reg"] for sub in (path / "runs").glob("ode-local_*-s0")]
    assert regs and all(r is not None and r > 0 for r in regs)


def test_resume_reuses_finished_models_and_retrains_the_missing_one_identically(study, tmp_path):
    _, path, _ = study
    copy = tmp_path / "neural-de" / path.name
    shutil.copytree(path, copy)
    (copy / "results.json").unlink()
    victim = copy / "runs" / "ode-global-lam0.5-s0"
    before = read_json(victim / "result.json")
    shutil.rmtree(victim)
    kept = copy / "runs" / "ode-vanilla-lam0-s1" / "result.json"
    stamp = kept.stat().st_mtime_ns
    run_experiment("neural-de", out=tmp_path, overrides=TINY, resume=True)
    assert kept.stat().st_mtime_ns == stamp  # not retrained
    after = read_json(victim / "result.json")
    for key in ("val_accuracy", "val_nfe_joint", "train_nfe_per_step"):
        assert after[key] == before[key]


def test_parallel_training_gives_the_models_of_sequential_training(study, tmp_path):
    _, path, _ = study
    _, results = run_experiment("neural-de", out=tmp_path, overrides=[*TINY, "jobs=2", "sde.enabled=false"])
    rows = {r["name"]: r for r in results["rows"]}
    assert len(rows) == 8 and results["jobs"] == 2
    for name, row in rows.items():
        seq = read_json(path / "runs" / name / "result.json")
        assert row["train_jobs"] == 2 and seq["train_jobs"] == 1 and row["train_device"] == "cpu"
        for key in ("lambda", "val_accuracy", "val_nfe_joint", "train_nfe_per_step"):
            assert row[key] == seq[key], (name, key)
        par_losses = [r["loss"] for r in read_jsonl(tmp_path / "neural-de" / _folder(tmp_path) / "runs" / name /
                                                    "metrics.jsonl")]
        assert par_losses == [r["loss"] for r in read_jsonl(path / "runs" / name / "metrics.jsonl")]


def _folder(out):
    (folder,) = [p.name for p in (out / "neural-de").iterdir()]
    return folder


@pytest.mark.parametrize(("override", "match"), [
    ("dataset=cifar", "dataset"), ("ode.methods=[global]", "vanilla"), ("sde.methods=[vanilla,local_taken]", "sde"),
    ("ode.lambdas=[0.0]", "lambdas"), ("seeds=[0,0]", "seeds"), ("val_fraction=0.9", "val_fraction"),
    ("lambda_decay=0.5", "lambda_decay"), ("dtype=float16", "dtype"), ("ode.steps=0", "steps"),
    ("jobs=0", "jobs"), ("backend=threading", "backend"), ("device=mps", "device"), ("device=tpu", "device"),
])
def test_bad_settings_are_refused(override, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        run_experiment("neural-de", out=tmp_path, overrides=[override])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_study_runs_on_a_gpu_and_agrees_with_the_cpu(study, tmp_path):
    _, results = run_experiment("neural-de", out=tmp_path, overrides=[*TINY, "device=cuda"])
    cpu = {r["name"]: r for r in study[2]["rows"]}
    assert results["device"] != "cpu" and len(results["rows"]) == len(cpu)
    for row in results["rows"]:
        assert row["train_device"] != "cpu" and row["predict_seconds"] > 0
        if row["method"] in ("vanilla", "global"):  # no random draws: the same model up to rounding
            ref = cpu[row["name"]]
            assert abs(row["test_accuracy"] - ref["test_accuracy"]) <= 0.02
            assert abs(row["test_nfe_joint"] - ref["test_nfe_joint"]) <= 0.1 * ref["test_nfe_joint"] + 6
