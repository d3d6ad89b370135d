"""Scoring of the hallucination benchmark against naive one-sequence-at-a-time references, and the pipeline's
bootstrap plumbing (its selection rule is core.stats.choose_within_drop, tested in tests/core/test_stats.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from leanfit.core.stats import bootstrap_ci, paired_bootstrap_ci
from leanfit.studies.models.tiny_llama import tiny_llama
from leanfit.studies.noisefit.facts_qa import build_fact_world, qa_prompt, tokenizer_texts
from leanfit.studies.noisefit.hallucination import (
    batch_to_tensors,
    build_tokenizer,
    closed_set_scores,
    greedy_answers,
    heldout_loss,
    qa_features,
)
from leanfit.studies.noisefit.metrics import brier_score, expected_calibration_error
from leanfit.studies.noisefit.pipeline import _stat


@pytest.fixture(scope="module")
def setup():
    world = build_fact_world(0, pretrain_fraction=0.1, n_fictitious=6, abstain_examples=2)
    tok = build_tokenizer(tokenizer_texts(world), 400)
    model = tiny_llama(len(tok), d_model=32, n_layers=2, n_heads=2, seed=0).double().eval()
    return world, tok, model


def _teacher_forced_logp(model, ids: list[int], start: int) -> float:
    """Sum of log p(ids[t] | ids[:t]) for t >= start, one unpadded sequence."""
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([ids])).logits[0].double().log_softmax(-1)
    return sum(logp[t - 1, ids[t]].item() for t in range(start, len(ids)))


def test_qa_features_mask_prompt_and_end_with_eos(setup):
    world, tok, _ = setup
    feats = qa_features(tok, world.sft_train[:5])
    for f, fact in zip(feats, world.sft_train[:5], strict=True):
        n_prompt = len(tok(qa_prompt(fact), add_special_tokens=False)["input_ids"])
        assert f["labels"][:n_prompt] == [-100] * n_prompt
        assert f["labels"][n_prompt:] == f["input_ids"][n_prompt:]
        assert f["input_ids"][-1] == tok.eos_token_id
        assert tok.decode(f["input_ids"][n_prompt:-1]) == f" {fact.answer}\n"


def test_batch_to_tensors_pads_right_with_masked_labels():
    feats = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    b = batch_to_tensors(feats, pad_id=1)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_greedy_answers_batched_equal_one_by_one_and_confidence_is_sequence_probability(setup):
    world, tok, model = setup
    prompts = [qa_prompt(f) for _, f in world.evaluation("valid")[:6]]
    answers, conf = greedy_answers(model, tok, prompts, batch_size=4, max_new_tokens=5)
    stops = {tok.eos_token_id, tok("\n", add_special_tokens=False)["input_ids"][0]}
    for prompt, answer, c in zip(prompts, answers, conf, strict=True):
        single, single_conf = greedy_answers(model, tok, [prompt], max_new_tokens=5)
        assert single == [answer]
        assert single_conf[0] == pytest.approx(c, rel=1e-9)
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        n_prompt = len(ids)
        for _ in range(5):  # naive greedy decoding without cache or padding
            with torch.no_grad():
                nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(nxt)
            if nxt in stops:
                break
        expected = math.exp(_teacher_forced_logp(model, ids, n_prompt))
        assert c == pytest.approx(expected, rel=1e-9)
        cut = [t for t in ids[n_prompt:] if t not in stops] if ids[-1] in stops else ids[n_prompt:]
        assert answer == tok.decode(cut).strip()


def test_closed_set_scores_match_one_sequence_at_a_time(setup):
    world, tok, model = setup
    facts = [f for _, f in world.evaluation("valid")[:3]]
    prompts = [qa_prompt(f) for f in facts]
    cands = [["Lima", "Paris", "Fe"], ["12"], ["Oslo", "unknown"]]
    got = closed_set_scores(model, tok, prompts, cands, batch_size=2)
    for prompt, cand_list, scores in zip(prompts, cands, got, strict=True):
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        for cand, score in zip(cand_list, scores, strict=True):
            ids = p + tok(f" {cand}\n", add_special_tokens=False)["input_ids"]
            assert score == pytest.approx(_teacher_forced_logp(model, ids, len(p)), rel=1e-9)


def test_heldout_loss_matches_unpadded_float64_reference(setup):
    _, tok, model = setup
    sentences = ["The capital of Peru is Lima.", "Iron has the symbol Fe and many more words.", "Oslo."]
    total, count = 0.0, 0
    for s in sentences:
        ids = tok(s, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        total -= _teacher_forced_logp(model, ids, 1)
        count += len(ids) - 1
    assert heldout_loss(model, tok, sentences, batch_size=2) == pytest.approx(total / count, rel=1e-9)


def test_pair_bootstrap_estimates_equal_direct_metrics():
    rng = np.random.default_rng(0)
    conf = rng.uniform(size=(3, 40))
    correct = rng.uniform(size=(3, 40)) < conf
    pairs = np.stack([conf, correct.astype(float)], -1)  # (seeds, items, 2), as the summary bootstraps them
    est = bootstrap_ci(pairs, n_boot=200, stat=_stat("ece"), trailing_axes=1)
    assert est[0] == pytest.approx(expected_calibration_error(conf.ravel(), correct.ravel()), abs=1e-12)
    assert est[1] <= est[0] + 0.05 and est[2] >= est[0] - 0.05
    brier = {"n_boot": 200, "stat": _stat("brier"), "trailing_axes": 1, "effect": "relative"}
    assert tuple(paired_bootstrap_ci(pairs, pairs, **brier)) == (0.0, 0.0, 0.0)
    other = np.stack([conf * 0.5, correct.astype(float)], -1)
    rel = paired_bootstrap_ci(other, pairs, **brier)
    direct = brier_score((conf * 0.5).ravel(), correct.ravel()) / brier_score(conf.ravel(), correct.ravel()) - 1
    assert rel[0] == pytest.approx(direct, abs=1e-12)
    assert rel[1] <= rel[0] <= rel[2]
