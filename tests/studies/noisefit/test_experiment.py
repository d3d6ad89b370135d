"""The noisefit benchmark at toy sizes: every arm trains through its Trainer, settings are chosen on validation
of the first seed only, the test split is scored once per chosen model, summaries carry consistent CIs, and a
second call with ``resume`` retrains nothing."""

from __future__ import annotations

import pytest

from leanfit.core.errors import ConfigError
from leanfit.core.runner import run_experiment
from leanfit.studies.noisefit.hallucination import ARMS

TINY = ["world.pretrain_fraction=0.1", "world.n_fictitious=10", "world.abstain_examples=4", "vocab_size=400",
        "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "pretrain.steps=20", "pretrain.batch_size=16",
        "pretrain.eval_every=20", "pretrain.checkpoint_every=0", "sft.steps=6", "sft.batch_size=8", "seeds=[0,1]",
        "label_smoothing=[0.1]", "neftune_alpha=[5.0]", "rdrop_alpha=[1.0]", "paper_noise=[0.1]",
        "noisefit_noise=[0.05,0.2]", "closed_set_size=5", "n_boot=50", "threads=1"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("nf")
    path, results = run_experiment("noisefit", out=out, overrides=TINY, run_id="tiny")
    return out, path, results


def test_every_arm_and_seed_is_scored_once_with_chosen_settings(bench):
    _, path, results = bench
    got = sorted((r["arm"], r["seed"]) for r in results["rows"])
    assert got == sorted((a, s) for a in ARMS for s in (0, 1))
    sweeps = [s for s in results["sweeps"] if s["arm"] == "noisefit"]
    assert sorted(s["setting"]["noise"] for s in sweeps) == [0.05, 0.2] and sum(s["chosen"] for s in sweeps) == 1
    chosen = next(s["setting"] for s in sweeps if s["chosen"])
    assert {r["setting"]["noise"] for r in results["rows"] if r["arm"] == "noisefit"} == {chosen["noise"]}
    other = 0.2 if chosen["noise"] == 0.05 else 0.05
    assert (path / "runs" / f"noisefit-noise{other}-s0").is_dir()
    assert not (path / "runs" / f"noisefit-noise{other}-s1").exists()
    assert not (path / "runs" / f"noisefit-noise{other}-s0" / "test_scores.npz").exists()  # test scored once
    for r in results["rows"]:
        assert (path / "runs" / r["name"] / "test_scores.npz").is_file()
        for key in ("em_sft_known", "em_pretrain_only", "hallucination_unknown", "confident_wrong_unknown",
                    "ece", "brier"):
            assert 0.0 <= r[key] <= 1.0
    assert (path / "plots" / "metrics.png").is_file() and (path / "plots" / "reliability.png").is_file()
    assert "Relative change against SFT" in (path / "report.md").read_text()


def test_summary_estimates_are_seed_means_with_ordered_intervals(bench):
    _, _, results = bench
    for s in results["summary"]:
        for key in ("em_sft_known", "confident_wrong_unknown", "hallucination_unknown"):
            est, lo, hi = s[key]
            per_seed = [r[key] for r in results["rows"] if r["arm"] == s["arm"]]
            assert est == pytest.approx(sum(per_seed) / len(per_seed), abs=1e-12)  # equal item counts per seed
            assert lo <= est + 1e-12 and est <= hi + 1e-12
        if s["arm"] != "sft":
            assert "em_sft_known_rel_vs_sft" in s or results["summary"][0]["em_sft_known"][0] == 0
    calib = results["calibration"]
    assert any(name.startswith("noisefit-") for name in calib)
    assert all(v["layers"] for v in calib.values())


def test_resume_reuses_finished_stages_and_redoes_only_the_missing_one(bench, tmp_path):
    import shutil

    out, path, results = bench
    copy = tmp_path / "noisefit" / "tiny"
    shutil.copytree(path, copy)
    (copy / "results.json").unlink()  # an interrupted run: no final results, one fine-tuning run lost
    shutil.rmtree(copy / "runs" / "noisefit_paper-noise0.1-s1")
    stamps = {p.relative_to(copy): p.stat().st_mtime_ns for p in (copy / "runs").glob("*/result.json")}
    pretrained = (copy / "runs" / "pretrain-shared" / "model" / "config.json").stat().st_mtime_ns
    _, again = run_experiment("noisefit", out=tmp_path, overrides=TINY, run_id="tiny", resume=True)
    assert {p.relative_to(copy): p.stat().st_mtime_ns for p in (copy / "runs").glob("*/result.json")
            if p.parent.name != "noisefit_paper-noise0.1-s1"} == stamps
    assert (copy / "runs" / "pretrain-shared" / "model" / "config.json").stat().st_mtime_ns == pretrained
    assert (copy / "runs" / "noisefit_paper-noise0.1-s1" / "result.json").is_file()
    redone = {r["name"]: r for r in again["rows"]}["noisefit_paper-noise0.1-s1"]
    before = {r["name"]: r for r in results["rows"]}["noisefit_paper-noise0.1-s1"]
    for key in ("em_sft_known", "confident_wrong_unknown", "ece", "heldout_loss"):
        assert redone[key] == pytest.approx(before[key], abs=1e-9), key  # same seed, same numbers


@pytest.mark.parametrize(("override", "param"), [
    ("arms=[noisefit]", "arms"), ("arms=[sft,magic]", "arms"), ("seeds=[0,0]", "seeds"),
    ("closed_set_size=1", "closed_set_size"), ("sft.steps=0", "sft.steps"),
])
def test_bad_config_names_the_parameter(tmp_path, override, param):
    with pytest.raises(ConfigError, match=param.split(".")[-1]):
        run_experiment("noisefit", out=tmp_path, overrides=[override])
