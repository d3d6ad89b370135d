"""The vq-logits experiment end to end at tiny sizes, through the CLI runner (both parts)."""

from __future__ import annotations

import math

import pytest

from leanfit.core.io import read_json
from leanfit.core.runner import run_experiment
from leanfit.studies.models.tiny_llama import tiny_llama

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pretrained_folder(tmp_path_factory):
    """A small 'pretrained' causal LM folder with a tokenizer, standing in for SmolLM2."""
    from leanfit.studies.data.tokenizer import to_hf_tokenizer, train_bpe

    root = tmp_path_factory.mktemp("pretrained")
    texts = ["the quick brown fox jumps over the lazy dog " * 50, "to be or not to be that is the question " * 50]
    tok = to_hf_tokenizer(train_bpe(texts, 320))
    tiny_llama(tok.vocab_size, d_model=32, n_layers=1, n_heads=2, seed=0, tie_embeddings=True).save_pretrained(root)
    tok.save_pretrained(root)
    return root


def test_quick_grid_at_tiny_sizes(tmp_path, pretrained_folder, tiny_corpus):
    overrides = [
        f"data.corpus={tiny_corpus}", "data.vocab_size=320", "data.valid_fraction=0.2", "data.test_fraction=0.2",
        "model.d_model=32", "model.n_heads=2", "model.n_layers=1", "train.steps=12", "train.batch_size=8",
        "train.seq_len=32", "train.eval_every=6", "train.checkpoint_every=6", "train.eval_tokens=1024",
        "train.log_every=6", "scratch.mappings=[equal_mass,random]", "scratch.code_fractions=[16]",
        "scratch.residual_ranks=[0,2]",
        f"pretrained.model={pretrained_folder}", f"pretrained.eval_corpus={tiny_corpus}", "pretrained.num_codes=[8]",
        "pretrained.train_tokens=256", "pretrained.eval_tokens=256", "pretrained.seq_len=64", "pretrained.steps=3",
        f"pretrained.train_corpus={tiny_corpus}",
    ]
    path, results = run_experiment("vq-logits", out=tmp_path, overrides=overrides)
    names = sorted(p.name for p in (path / "runs").iterdir())
    assert names == ["K20-equal_mass-bias-r2-s0", "K20-equal_mass-bias-s0", "K20-kmeans-nobias-s0",
                     "K20-random-bias-r2-s0", "K20-random-bias-s0", "full-s0"]
    rows = {(r["mapping"], r["bias"], r["rank"]): r for r in results["rows"]}
    full = rows[("-", False, 0)]
    for key in [("equal_mass", True, 0), ("random", True, 2), ("kmeans", False, 0)]:
        r = rows[key]
        assert r["K"] == 20
        assert r["ppl_ratio"] == pytest.approx(math.exp(r["val_loss"] - full["val_loss"]), rel=1e-12)
        params = 20 * 32 + 320 * (2 if r["bias"] else 1) + r["rank"] * (32 + 320)
        assert r["head_params"] == params and r["reduction"] == pytest.approx(1 - params / (320 * 32))
    assert rows[("equal_mass", True, 0)]["unigram_floor"] < rows[("random", True, 0)]["unigram_floor"]
    pre = results["pretrained"]["rows"]
    assert [(r["head"] == "original", r["K"], r["rank"]) for r in pre[1:]] == [(False, 8, 0), (False, 8, 16)]
    assert pre[0]["head"] == "original" and pre[0]["head_params"] == pre[0]["K"] * 32
    assert pre[0]["ppl_ratio"] == 1.0 and all(math.isfinite(r["eval_loss"]) for r in pre)
    report = (path / "report.md").read_text()
    assert "plots/pareto.png" in report and (path / "plots" / "pareto.png").stat().st_size > 1000

    # finished sub-runs are reused on --resume: the results do not change
    again_path, again = run_experiment("vq-logits", out=tmp_path, overrides=overrides, resume=True)
    assert again_path == path and read_json(path / "results.json")["rows"] == again["rows"]


def test_plateau_budget_learned_and_counted_maps(tmp_path, tiny_corpus):
    """The fair protocol: a full-softmax probe sets every run's steps, the learned map needs no full-softmax run,
    hybrid-counted's map run is half the budget, and every ratio is against the stronger full softmax."""
    overrides = [
        f"data.corpus={tiny_corpus}", "data.vocab_size=320", "data.valid_fraction=0.2", "data.test_fraction=0.2",
        "model.d_model=32", "model.n_heads=2", "model.n_layers=1", "train.steps=8", "train.batch_size=8",
        "train.seq_len=32", "train.eval_every=4", "train.checkpoint_every=4", "train.eval_tokens=1024",
        "train.log_every=4", "train.lr=0.03", "scratch.budget=plateau", "scratch.probe_factor=3",
        "scratch.patience=1", "scratch.mappings=[learned,hybrid-counted,hybrid]", "scratch.code_fractions=[16]",
        "scratch.paper_recipe=false", "scratch.learn_every=4", "pretrained.enabled=false",
    ]
    path, results = run_experiment("vq-logits", out=tmp_path, overrides=overrides)
    probe = read_json(path / "runs" / "probe-s0" / "result.json")
    budget = results["budget"]
    assert budget == probe["best_step"] and 4 <= budget <= 24 and budget % 4 == 0
    assert probe["stopped_early"] == (probe["steps"] < 24)
    # a probe that ended at its best step is the budget's full-softmax run; else that run is trained
    reused = probe["best_step"] == probe["steps"]
    names = sorted(p.name for p in (path / "runs").iterdir())
    assert names == ["K20-hybrid-bias-s0", "K20-hybrid-counted-bias-s0", "K20-learned-bias-s0", "full-half-s0",
                     *([] if reused else ["full-s0"]), "probe-s0"]
    rows = {r["mapping"]: r for r in results["rows"]}
    ref = probe["val_loss"] if reused else min(probe["val_loss"],
                                                read_json(path / "runs" / "full-s0" / "result.json")["val_loss"])
    assert rows["-"]["val_loss"] == ref
    for m in ("learned", "hybrid-counted"):
        assert rows[m]["ppl_ratio"] == pytest.approx(math.exp(rows[m]["val_loss"] - ref), rel=1e-12)
        assert math.isfinite(rows[m]["test_ppl_ratio"])
    assert rows["learned"]["steps"] == budget and rows["learned"]["map_steps"] == 0
    assert rows["hybrid-counted"]["steps"] + rows["hybrid-counted"]["map_steps"] == budget
    assert rows["hybrid"]["steps"] == rows["hybrid"]["map_steps"] == budget  # its map's run is beside the budget
    assert read_json(path / "runs" / "full-half-s0" / "result.json")["steps"] == budget // 2
    moved = read_json(path / "runs" / "K20-learned-bias-s0" / "result.json")["moved"]
    assert len(moved) == budget // 4 and sum(moved) > 0  # the map moved, every learn_every steps
    assert "best step" in (path / "report.md").read_text()
