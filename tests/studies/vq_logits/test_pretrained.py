"""vq-logits-pretrained end to end at tiny sizes (a tiny random Llama saved to a folder stands in for SmolLM2),
the parameter budgets and the Sigma-SVD baseline against a naive computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from leanfit.core.io import read_json
from leanfit.core.runner import run_experiment
from leanfit.studies.models.tiny_llama import tiny_llama
from leanfit.studies.vq_logits.lowrank import LowRankHead, budget, rank_for, sigma_svd, vq_shape
from leanfit.studies.vq_logits.pretrained import rank_candidates

V, D = 320, 64  # the BPE's vocabulary may come out smaller than V


@pytest.fixture(scope="module")
def pretrained_folder(tmp_path_factory):
    """A small 'pretrained' causal LM folder with a tokenizer, standing in for SmolLM2."""
    from leanfit.studies.data.tokenizer import to_hf_tokenizer, train_bpe

    root = tmp_path_factory.mktemp("pretrained")
    texts = ["the quick brown fox jumps over the lazy dog " * 50, "to be or not to be that is the question " * 50]
    tok = to_hf_tokenizer(train_bpe(texts, V))
    model = tiny_llama(tok.vocab_size, d_model=D, n_layers=1, n_heads=2, seed=0, tie_embeddings=True)
    with torch.no_grad():  # a peaked teacher (a fresh tiny model's distribution is nearly uniform)
        model.get_output_embeddings().weight.mul_(6)
    model.save_pretrained(root)
    tok.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def other_corpus(tmp_path_factory):
    """Three other plays: a second domain."""
    from leanfit.studies.data.corpora import shakespeare

    root = tmp_path_factory.mktemp("other-corpus")
    for doc in shakespeare()[10:13]:
        (root / f"{doc.name.split('/')[-1]}.txt").write_text(doc.text[:30_000], encoding="utf-8")
    return root


@pytest.mark.parametrize("reduction", [50.0, 80.0, 95.0, 98.0], ids=["50", "80", "95", "98"])
def test_every_head_fits_the_budget_and_the_baseline_matches_it(reduction):
    vocab, d = 49152, 576  # SmolLM2's head
    p = budget(vocab, d, reduction)
    assert p == int((1 - reduction / 100) * vocab * d)
    k = vq_shape(vocab, d, p)
    r = rank_for(vocab, d, p)
    vq, low = k * d + 2 * vocab, r * (vocab + d)
    assert p - d < vq <= p and p - (vocab + d) < low <= p
    for k6, r6 in rank_candidates(vocab, d, p, [0.25, 0.5]):
        assert p - d < k6 * d + 2 * vocab + r6 * (vocab + d) <= p and r6 >= 1


def test_sigma_svd_equals_the_naive_computation():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 6, generator=g, dtype=torch.float64)
    h = torch.randn(500, 6, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, 6, dtype=torch.float64) + 0.3
    sigma = h.t() @ h / h.shape[0]
    a, b = sigma_svd(w, sigma, 3, ridge=0.0)
    vals, vecs = np.linalg.eigh(sigma.numpy())  # naive: S^{1/2} by eigendecomposition, numpy's SVD, map back
    root = vecs @ np.diag(np.sqrt(vals)) @ vecs.T
    u, s, vt = np.linalg.svd(w.numpy() @ root)
    naive = (u[:, :3] * s[:3]) @ vt[:3] @ np.linalg.inv(root)
    assert np.abs((a @ b).numpy() - naive).max() < 1e-10
    # it is the optimum of the mean squared logit error: any other rank-3 matrix does worse
    err = lambda m: float((((w - m) @ h.t()) ** 2).mean())  # noqa: E731
    plain_u, plain_s, plain_vh = torch.linalg.svd(w, full_matrices=False)
    assert err(a @ b) < err((plain_u[:, :3] * plain_s[:3]) @ plain_vh[:3]) - 1e-6
    assert LowRankHead(a, b).parameter_count() == 3 * (40 + 6)


@pytest.mark.slow
def test_pretrained_study_at_tiny_sizes(tmp_path, pretrained_folder, tiny_corpus, other_corpus):
    overrides = [f"model={pretrained_folder}", f"corpus={tiny_corpus}", f"other_domains=[{other_corpus},austen]",
                 "reductions=[50,80]", "text_tokens=1024", "sample_tokens=128", "valid_tokens=256",
                 "test_tokens=256", "seq_len=64", "steps=6", "batch_tokens=256", "rank_shares=[0.25,0.5]",
                 "kmeans_iters=3", "reassign_every=2", "threads=1"]
    path, results = run_experiment("vq-logits-pretrained", out=tmp_path, overrides=overrides)
    rows = results["rows"]
    original = rows[0]
    domains = results["domains"]
    assert domains[0] == str(tiny_corpus) and str(other_corpus) in domains
    assert original["recipe"] == "original" and original["valid_ratio"] == 1.0
    assert all(v == 1.0 for v in original["ratios"].values())
    assert len(rows) == 1 + 2 * 8
    vocab = results["vocab_size"]
    assert results["d_model"] == D and original["head_params"] == vocab * D
    for level in (50.0, 80.0):
        at = {r["recipe"]: r for r in rows if r["level"] == level}
        p = budget(vocab, D, level)
        for r in at.values():  # the paper's head has leanfit-v1's K and no bias: V fewer parameters
            slack = vocab + D + (vocab if r["recipe"] == "paper" else 0)
            assert p - slack < r["head_params"] <= p, r
            assert r["reduction"] == pytest.approx(100 * (1 - r["head_params"] / (vocab * D)), rel=1e-12)
            assert all(math.isfinite(x) and x > 0 for x in r["ratios"].values())
        assert at["sigma-svd"]["head_params"] == rank_for(vocab, D, p) * (vocab + D)
        assert at["freq-sigma"]["K"] == at["distilled"]["K"] == vq_shape(vocab, D, p)
        # distillation lowers the KL on the fitting data, hence (on the tiny model) the validation ratio
        assert at["distilled"]["valid_ratio"] < at["freq-sigma"]["valid_ratio"]
        # the learned map moves tokens, so it ends elsewhere than the fixed one from the same start
        assert at["learned-map"]["valid_ratio"] != at["distilled"]["valid_ratio"]
        assert len(at["rank-r"]["candidates"]) == 2 and at["rank-r"]["rank"] >= 1
    report = (path / "report.md").read_text()
    assert "austen" in report and (path / "plots" / "pareto.png").stat().st_size > 1000
    again_path, again = run_experiment("vq-logits-pretrained", out=tmp_path, overrides=overrides, resume=True)
    assert again_path == path and read_json(path / "results.json")["rows"] == again["rows"]


@pytest.mark.parametrize(("overrides", "fragment"), [
    ({"recipes": ["paper", "kmeans"]}, "recipes"),
    ({"reductions": []}, "reductions"),
    ({"reductions": [100.0]}, "reductions"),
    ({"rank_shares": [1.5]}, "rank_shares"),
    ({"steps": 30, "reassign_every": 50}, "reassign_every"),
], ids=["unknown-recipe", "no-reduction", "reduction-100", "share-above-1", "map-never-moves"])
def test_bad_config_names_the_parameter(overrides, fragment):
    from leanfit.core.errors import ConfigError
    from leanfit.studies.vq_logits.config import PretrainedStudyConfig

    with pytest.raises((ConfigError, ValueError)) as err:
        PretrainedStudyConfig(**overrides)
    message = str(err.value)
    assert fragment in message and len(message.splitlines()) == 1


def test_a_reduction_leaving_no_room_for_bias_and_map_is_refused():
    from leanfit.core.errors import ConfigError
    from leanfit.studies.vq_logits.pretrained import check_level

    check_level(49152, 576, 99.6)  # 113k parameters: 2V + 2d fit
    with pytest.raises(ConfigError, match=r"reductions.*at most 99\.6%"):
        check_level(49152, 576, 99.7)
