"""Deterministic scoring for the controlled hallucination benchmark (numpy only, float64).

Per evaluation item a scorer records ``correct`` (bool), ``abstained`` (bool), ``confidence`` (the probability of
the model's chosen answer, e.g. from :func:`closed_set_choice`) and a split label. This module turns those into
exact match, calibration (ECE, Brier, reliability curve), selective prediction (AURC), and hallucination and
confident-wrong rates. Their bootstrap intervals over seeds and items are :mod:`leanfit.core.stats`'s.

Definitions (all means are over every item of the split, abstentions included):

- hallucination rate = mean(answered and wrong), answered = not abstained. On the ``fictitious`` split no answer
  can be right, so it equals the answer rate; on ``unseen_attribute`` a lucky right guess does not count.
- confident-wrong rate = mean(answered and wrong and confidence > tau).
- ECE: equal-width bins ``[k/B, (k+1)/B)`` (the last one closed), sum over bins of (bin count / N) times
  |accuracy - mean confidence|. Brier: mean((confidence - correct)^2), the binary score of the chosen answer.
- AURC: items ranked by confidence, highest first; the risk (error rate) of the accepted items is read after each
  group of tied confidences and weighted by the coverage that group adds, so tied items are accepted together
  and the value does not depend on input order. Without ties this is the mean over k of risk(top k).

Why our own code: these are a few lines each, but the conventions (bin edges, ties, abstentions) must be
fixed and tested; the libraries that have them differ on exactly these.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np

from leanfit.core.errors import ConfigError, bad_value
from leanfit.studies.noisefit.facts_qa import ABSTAIN

__all__ = [
    "UNKNOWN_SPLITS",
    "aurc",
    "brier_score",
    "closed_set_choice",
    "confident_wrong_rate",
    "evaluation_summary",
    "exact_match",
    "expected_calibration_error",
    "hallucination_rate",
    "is_abstention",
    "normalize_answer",
    "reliability_curve",
]

UNKNOWN_SPLITS = ("unseen_attribute", "fictitious")
KNOWN_SPLITS = ("sft_known", "pretrain_only")
_TRAILING = re.compile(r"[\s.,;:!?\"'`]+$")
_LEADING = re.compile(r"^[\s\"'`]+")


# --- answers --------------------------------------------------------------------------------------------------------
def normalize_answer(text: str) -> str:
    """Lower case, inner whitespace collapsed, surrounding quotes and trailing punctuation removed."""
    text = " ".join(str(text).split()).lower()
    return _TRAILING.sub("", _LEADING.sub("", text))


def exact_match(pred: str, gold: str) -> bool:
    """True when the normalised prediction equals the normalised gold answer."""
    return normalize_answer(pred) == normalize_answer(gold)


def is_abstention(pred: str) -> bool:
    """True when the (normalised) answer is the abstention string ``ABSTAIN``."""
    return normalize_answer(pred) == ABSTAIN


def closed_set_choice(logprobs: Sequence[float] | np.ndarray) -> tuple[int | np.ndarray, float | np.ndarray]:
    """(index, probability) of the best candidate, probabilities softmax-normalised over the candidates.

    logprobs: (K,) or (N, K) total log-likelihoods of each candidate completion; ``-inf`` marks an impossible
    candidate. Ties go to the lowest index. Returns an int and a float for (K,), arrays (N,) for (N, K)."""
    x = np.asarray(logprobs, dtype=np.float64)
    if x.ndim not in (1, 2) or x.shape[-1] == 0:
        raise ConfigError(bad_value("logprobs.shape", x.shape, "(K,) or (N, K) with K >= 1 candidates"))
    if np.isnan(x).any() or np.isposinf(x).any() or (~np.isfinite(x)).all(axis=-1).any():
        raise ConfigError(bad_value("logprobs", "NaN, +inf or an all -inf row", "finite values or -inf"))
    top = x.max(axis=-1, keepdims=True)
    probs = np.exp(x - top) / np.exp(x - top).sum(axis=-1, keepdims=True)
    index = probs.argmax(axis=-1)
    chosen = np.take_along_axis(probs, index[..., None], axis=-1)[..., 0]
    if x.ndim == 1:
        return int(index), float(chosen)
    return index, chosen


# --- input checks ---------------------------------------------------------------------------------------------------
def _array(values: object, name: str, *, dtype: type = np.float64) -> np.ndarray:
    arr = np.asarray(values, dtype=dtype)
    if arr.ndim != 1 or arr.size == 0:
        raise ConfigError(bad_value(f"{name}.shape", arr.shape, "a non-empty 1-D array"))
    return arr


def _confidence(conf: object) -> np.ndarray:
    arr = _array(conf, "confidence")
    if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
        bad = arr[~(np.isfinite(arr) & (arr >= 0) & (arr <= 1))][0]
        raise ConfigError(bad_value("confidence", float(bad), "probabilities in [0, 1]"))
    return arr


def _same_length(**arrays: np.ndarray) -> None:
    names = list(arrays)
    for name in names[1:]:
        if len(arrays[name]) != len(arrays[names[0]]):
            expected = f"len({names[0]})={len(arrays[names[0]])}"
            raise ConfigError(bad_value(f"len({name})", len(arrays[name]), expected))


def _bins(n_bins: int) -> int:
    if not isinstance(n_bins, int | np.integer) or n_bins < 1:
        raise ConfigError(bad_value("n_bins", n_bins, "an integer >= 1"))
    return int(n_bins)


# --- calibration and selective prediction ---------------------------------------------------------------------------
def reliability_curve(
    conf: object, correct: object, n_bins: int = 15
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(bin mids, accuracy, mean confidence, counts), each (n_bins,); empty bins have NaN accuracy and confidence.

    Bins are ``[k/B, (k+1)/B)`` with the last one closed at 1."""
    c, y, b = _confidence(conf), _array(correct, "correct", dtype=bool), _bins(n_bins)
    _same_length(confidence=c, correct=y)
    idx = np.searchsorted(np.arange(1, b) / b, c, side="right")  # edges k/B exactly; c * B can round below k
    counts = np.bincount(idx, minlength=b)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.bincount(idx, weights=y.astype(np.float64), minlength=b) / counts
        mean_conf = np.bincount(idx, weights=c, minlength=b) / counts
    mids = (np.arange(b) + 0.5) / b
    return mids, np.where(counts > 0, acc, np.nan), np.where(counts > 0, mean_conf, np.nan), counts


def expected_calibration_error(conf: object, correct: object, n_bins: int = 15) -> float:
    """ECE with ``n_bins`` equal-width bins, each weighted by its share of items."""
    _, acc, mean_conf, counts = reliability_curve(conf, correct, n_bins)
    filled = counts > 0
    return float(np.sum(counts[filled] * np.abs(acc[filled] - mean_conf[filled])) / counts.sum())


def brier_score(conf: object, correct: object) -> float:
    """mean((confidence - correct)^2) of the chosen answer."""
    c, y = _confidence(conf), _array(correct, "correct", dtype=bool)
    _same_length(confidence=c, correct=y)
    return float(np.mean((c - y) ** 2))


def aurc(conf: object, correct: object) -> float:
    """Area under the risk-coverage curve (lower is better); tied confidences are accepted together."""
    c, y = _confidence(conf), _array(correct, "correct", dtype=bool)
    _same_length(confidence=c, correct=y)
    order = np.argsort(-c, kind="stable")
    c, errors = c[order], np.cumsum(~y[order])
    ends = np.flatnonzero(np.append(c[1:] != c[:-1], True))  # last index of each tie group
    accepted = ends + 1
    sizes = np.diff(np.concatenate(([0], accepted)))
    return float(np.sum(sizes * errors[ends] / accepted) / len(c))


# --- hallucination ---------------------------------------------------------------------------------------------------
def hallucination_rate(correct: object, abstained: object) -> float:
    """mean(not abstained and not correct) over all items: wrong answers given instead of abstaining."""
    y, a = _array(correct, "correct", dtype=bool), _array(abstained, "abstained", dtype=bool)
    _same_length(correct=y, abstained=a)
    return float(np.mean(~a & ~y))


def confident_wrong_rate(conf: object, correct: object, abstained: object, tau: float = 0.5) -> float:
    """mean(not abstained and not correct and confidence > tau) over all items."""
    if not 0 <= tau < 1:
        raise ConfigError(bad_value("tau", tau, "a threshold in [0, 1)"))
    c, y = _confidence(conf), _array(correct, "correct", dtype=bool)
    a = _array(abstained, "abstained", dtype=bool)
    _same_length(confidence=c, correct=y, abstained=a)
    return float(np.mean(~a & ~y & (c > tau)))


def _split_metrics(c: np.ndarray, y: np.ndarray, a: np.ndarray, tau: float, n_bins: int) -> dict[str, float]:
    return {"n": float(len(y)), "accuracy": float(np.mean(y)), "abstain_rate": float(np.mean(a)),
            "hallucination_rate": hallucination_rate(y, a), "confident_wrong_rate": confident_wrong_rate(c, y, a, tau),
            "ece": expected_calibration_error(c, y, n_bins), "brier": brier_score(c, y),
            "aurc": aurc(c, y)}


def evaluation_summary(
    conf: object, correct: object, abstained: object, split: Sequence[str], *, tau: float = 0.5, n_bins: int = 15
) -> dict[str, dict[str, float]]:
    """Every metric of this module per split label, plus ``known`` (sft_known + pretrain_only) and ``unknown``
    (unseen_attribute + fictitious) pools where those labels occur. Accuracy is exact match over all items."""
    c, y, a = _confidence(conf), _array(correct, "correct", dtype=bool), _array(abstained, "abstained", dtype=bool)
    labels = np.asarray(split, dtype=object)
    _same_length(confidence=c, correct=y, abstained=a, split=labels)
    groups: Mapping[str, Sequence[str]] = {s: (s,) for s in dict.fromkeys(labels.tolist())}
    groups = {**groups, "known": KNOWN_SPLITS, "unknown": UNKNOWN_SPLITS}
    out = {}
    for name, members in groups.items():
        mask = np.isin(labels, members)
        if mask.any():
            out[name] = _split_metrics(c[mask], y[mask], a[mask], tau, n_bins)
    return out
