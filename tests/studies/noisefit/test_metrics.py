"""Benchmark metrics against hand-computed values and naive float64 loops (their bootstrap intervals are tested in
tests/core/test_stats.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from leanfit.core.errors import ConfigError
from leanfit.studies.noisefit.metrics import (
    aurc,
    brier_score,
    closed_set_choice,
    confident_wrong_rate,
    evaluation_summary,
    exact_match,
    expected_calibration_error,
    hallucination_rate,
    is_abstention,
    reliability_curve,
)


# --- naive references -----------------------------------------------------------------------------------------------
def ece_reference(conf, correct, n_bins):
    """Loop over items and bins: bin k holds k/B <= c < (k+1)/B, and c == 1 falls in the last bin."""
    total, n = 0.0, len(conf)
    for k in range(n_bins):
        lo, hi = k / n_bins, (k + 1) / n_bins
        members = [i for i, c in enumerate(conf) if lo <= c < hi or (k == n_bins - 1 and c == 1.0)]
        if members:
            acc = sum(correct[i] for i in members) / len(members)
            mean_conf = sum(conf[i] for i in members) / len(members)
            total += len(members) / n * abs(acc - mean_conf)
    return total


def aurc_reference(conf, correct):
    """Mean over k of the error rate of the k most confident items (distinct confidences)."""
    order = sorted(range(len(conf)), key=lambda i: -conf[i])
    risks = [sum(not correct[i] for i in order[:k]) / k for k in range(1, len(conf) + 1)]
    return sum(risks) / len(risks)


# --- answers --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("pred", "gold", "expected"),
    [("Lima", " lima.", True), ("Washington  DC", "washington dc", True), ('"Paris"!', "paris", True),
     ("  Costa\tRica ", "Costa Rica", True), ("NewYork", "New York", False), ("1766", "1766.0", False),
     ("Lima Peru", "Lima", False), ("", "Lima", False)],
    ids=["case-dot", "spaces", "quotes-bang", "tab", "no-space", "number", "extra-word", "empty"],
)
def test_exact_match_normalisation(pred, gold, expected):
    assert exact_match(pred, gold) is expected


@pytest.mark.parametrize(
    ("pred", "expected"), [("unknown", True), (" Unknown.", True), ("unknowns", False), ("Lima", False)],
    ids=["plain", "case-dot", "plural", "answer"],
)
def test_is_abstention(pred, expected):
    assert is_abstention(pred) is expected


@pytest.mark.parametrize(
    "logprobs",
    [[-1.0, -2.0, -3.0], [-1000.0, -1001.0, -999.5], [-3.0, -float("inf"), -2.5], [-4.0]],
    ids=["plain", "large-magnitude", "impossible-candidate", "single"],
)
def test_closed_set_choice_matches_naive_softmax(logprobs):
    shifted = [lp - max(logprobs) for lp in logprobs]
    probs = [math.exp(s) for s in shifted]
    best = max(range(len(probs)), key=lambda i: probs[i])
    index, prob = closed_set_choice(logprobs)
    assert index == best and prob == pytest.approx(probs[best] / sum(probs), rel=1e-12)


def test_closed_set_choice_batched_and_ties():
    rows = np.array([[-1.0, -1.0, -5.0], [-7.0, -2.0, -2.0 - math.log(3.0)]])
    index, prob = closed_set_choice(rows)
    np.testing.assert_array_equal(index, [0, 1])  # ties go to the lowest index
    np.testing.assert_allclose(prob, [1 / (2 + math.exp(-4.0)), 3 / (4 + 3 * math.exp(-5.0))], rtol=1e-12)


# --- calibration ----------------------------------------------------------------------------------------------------
def test_ece_hand_example():
    conf, correct = [0.1, 0.4, 0.45, 0.9, 0.95], [0, 1, 0, 1, 1]
    # bin [0, .5): acc 1/3, conf 0.95/3 -> gap 1/60, weight 3/5; bin [.5, 1]: acc 1, conf .925 -> gap .075, weight 2/5
    assert expected_calibration_error(conf, correct, n_bins=2) == pytest.approx(3 / 5 / 60 + 2 / 5 * 0.075, abs=1e-15)


@pytest.mark.parametrize(
    ("conf", "correct", "expected"),
    [([0.25, 0.5], [1, 0], 0.625), ([0.25, 1.0], [1, 0], 0.875)],
    ids=["edge-opens-upper-bin", "one-in-last-bin"],
)
def test_ece_bin_edges(conf, correct, expected):
    # 2 bins: a confidence on an edge belongs to the upper bin; separate bins give gaps .75 and .5 (or 1.0), weight 1/2
    assert expected_calibration_error(conf, correct, n_bins=2) == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize("n_bins", [1, 10, 15], ids=["b1", "b10", "b15"])
def test_ece_matches_naive_loop(n_bins):
    rng = np.random.default_rng(n_bins)
    conf = np.concatenate([rng.random(300), np.arange(n_bins + 1) / n_bins])  # every edge k/B included
    correct = rng.random(len(conf)) < conf**1.5
    expected = ece_reference(conf.tolist(), correct.tolist(), n_bins)
    assert expected_calibration_error(conf, correct, n_bins) == pytest.approx(expected, abs=1e-14)


def test_reliability_curve_bins_and_empty_bins():
    mids, acc, mean_conf, counts = reliability_curve([0.05, 0.5, 0.55, 1.0], [1, 0, 1, 1], n_bins=4)
    np.testing.assert_allclose(mids, [0.125, 0.375, 0.625, 0.875])
    np.testing.assert_array_equal(counts, [1, 0, 2, 1])  # 0.5 opens bin [.5, .75); 1.0 closes the last bin
    np.testing.assert_allclose(acc, [1.0, np.nan, 0.5, 1.0])
    np.testing.assert_allclose(mean_conf, [0.05, np.nan, 0.525, 1.0])


def test_reliability_curve_edges_are_exact():
    # 0.29 * 100 rounds to 28.999...; the edge 29/100 still opens bin 29
    counts = reliability_curve(np.arange(101) / 100, np.ones(101, dtype=bool), n_bins=100)[3]
    np.testing.assert_array_equal(counts, [1] * 99 + [2])


def test_brier_hand_example():
    assert brier_score([0.8, 0.3, 1.0, 0.0], [1, 0, 0, 0]) == pytest.approx((0.04 + 0.09 + 1.0 + 0.0) / 4, abs=1e-15)


# --- selective prediction -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("conf", "correct", "expected"),
    [([0.9, 0.8, 0.7, 0.6], [1, 1, 0, 0], (1 / 3 + 2 / 4) / 4),
     ([0.9, 0.8, 0.7, 0.6], [0, 0, 1, 1], (1 + 1 + 2 / 3 + 2 / 4) / 4),
     ([0.5] * 4, [1, 0, 1, 1], 0.25), ([0.7, 0.7, 0.2], [1, 0, 0], (2 * 0.5 + 2 / 3) / 3)],
    ids=["perfect", "worst", "all-tied", "tied-group"],
)
def test_aurc_known_values(conf, correct, expected):
    assert aurc(conf, correct) == pytest.approx(expected, abs=1e-15)


def test_aurc_matches_naive_and_ignores_order():
    rng = np.random.default_rng(3)
    conf, correct = rng.random(200), rng.random(200) < 0.6
    assert aurc(conf, correct) == pytest.approx(aurc_reference(conf.tolist(), correct.tolist()), abs=1e-14)
    tied = np.round(conf, 1)
    perm = rng.permutation(200)
    assert aurc(tied[perm], correct[perm]) == pytest.approx(aurc(tied, correct), abs=1e-15)


# --- hallucination --------------------------------------------------------------------------------------------------
def test_hallucination_and_confident_wrong_hand_example():
    conf = [0.9, 0.9, 0.6, 0.4, 0.5, 0.95]
    correct = [1, 0, 0, 0, 0, 0]
    abstained = [0, 1, 0, 0, 0, 0]
    assert hallucination_rate(correct, abstained) == pytest.approx(4 / 6)  # items 2-5 answered wrongly
    assert confident_wrong_rate(conf, correct, abstained, tau=0.5) == pytest.approx(2 / 6)  # 0.6 and 0.95 (> 0.5)
    assert confident_wrong_rate(conf, correct, abstained, tau=0.0) == pytest.approx(4 / 6)


def test_evaluation_summary_per_split_and_pools():
    rng = np.random.default_rng(0)
    splits = np.array(["sft_known", "pretrain_only", "unseen_attribute", "fictitious"] * 25)
    conf, correct, abstained = rng.random(100), rng.random(100) < 0.5, rng.random(100) < 0.2
    out = evaluation_summary(conf, correct, abstained, splits, tau=0.6, n_bins=10)
    assert set(out) == {"sft_known", "pretrain_only", "unseen_attribute", "fictitious", "known", "unknown"}
    m = np.isin(splits, ["unseen_attribute", "fictitious"])
    expected = {"n": 50.0, "accuracy": correct[m].mean(), "abstain_rate": abstained[m].mean(),
                "hallucination_rate": np.mean(~abstained[m] & ~correct[m]),
                "confident_wrong_rate": np.mean(~abstained[m] & ~correct[m] & (conf[m] > 0.6)),
                "ece": ece_reference(conf[m].tolist(), correct[m].tolist(), 10),
                "brier": np.mean((conf[m] - correct[m]) ** 2),
                "aurc": aurc_reference(conf[m].tolist(), correct[m].tolist())}
    assert out["unknown"] == pytest.approx(expected, abs=1e-14)
    f = splits == "fictitious"
    assert out["fictitious"]["hallucination_rate"] == pytest.approx(np.mean(~abstained[f] & ~correct[f]))


# --- bad input ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("call", "param"),
    [(lambda: expected_calibration_error([0.5, 0.5], [1]), "len\\(correct\\)"),
     (lambda: expected_calibration_error([0.5, 1.2], [1, 0]), "confidence=1.2"),
     (lambda: brier_score([-0.1], [1]), "confidence=-0.1"),
     (lambda: aurc([float("nan")], [1]), "confidence=nan"),
     (lambda: expected_calibration_error([0.5], [1], n_bins=0), "n_bins=0"),
     (lambda: reliability_curve([0.5], [1], n_bins=2.5), "n_bins=2.5"),
     (lambda: confident_wrong_rate([0.5], [1], [0, 0]), "len\\(abstained\\)"),
     (lambda: confident_wrong_rate([0.5], [1], [0], tau=1.0), "tau=1.0"),
     (lambda: hallucination_rate([], []), "correct.shape"),
     (lambda: closed_set_choice([0.0, float("nan")]), "logprobs"),
     (lambda: closed_set_choice([-float("inf")] * 2), "logprobs"),
     (lambda: evaluation_summary([0.5], [1], [0], ["fictitious", "fictitious"]), "len\\(split\\)")],
    ids=["ece-len", "conf-high", "conf-low", "conf-nan", "bins-zero", "bins-float", "abstained-len", "tau", "empty",
         "logprob-nan", "logprob-all-inf", "split-len"],
)
def test_bad_input_names_the_parameter(call, param):
    with pytest.raises(ConfigError, match=param):
        call()
