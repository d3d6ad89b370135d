"""Deterministic scoring for the controlled hallucination benchmark (numpy only, float64).

Per evaluation item a scorer records ``correct`` (bool), ``abstained`` (bool), ``confidence`` (the probability of
the model's chosen answer, e.g. from :func:`closed_set_choice`) and a split label. This module turns those into
exact match, calibration (ECE, Brier, reliability curve), selective prediction (AURC), hallucination and
confident-wrong rates, and percentile-bootstrap confidence intervals over items, item groups and seeds.

Definitions (all means are over every item of the split, abstentions included):

- hallucination rate = mean(answered and wrong), answered = not abstained. On the ``fictitious`` split no answer
  can be right, so it equals the answer rate; on ``unseen_attribute`` a lucky right guess does not count.
- confident-wrong rate = mean(answered and wrong and confidence > tau).
- ECE: equal-width bins ``[k/B, (k+1)/B)`` (the last one closed), sum over bins of (bin count / N) times
  |accuracy - mean confidence|. Brier: mean((confidence - correct)^2), the binary score of the chosen answer.
- AURC: items ranked by confidence, highest first; the risk (error rate) of the accepted items is read after each
  group of tied confidences and weighted by the coverage that group adds, so tied items are accepted together
  and the value does not depend on input order. Without ties this is the mean over k of risk(top k).

Why our own code: these are a few lines each, but the conventions (bin edges, ties, abstentions, two-way
bootstrap over seeds and items) must be fixed and tested; the libraries that have them differ on exactly these.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import numpy as np

from leanfit.core.errors import ConfigError, bad_value
from leanfit.studies.noisefit.facts_qa import ABSTAIN

__all__ = [
    "UNKNOWN_SPLITS",
    "ConfidenceInterval",
    "aurc",
    "bootstrap_ci",
    "brier_score",
    "closed_set_choice",
    "confident_wrong_rate",
    "evaluation_summary",
    "exact_match",
    "expected_calibration_error",
    "hallucination_rate",
    "is_abstention",
    "normalize_answer",
    "paired_bootstrap_diff",
    "relative_change_ci",
    "reliability_curve",
]

UNKNOWN_SPLITS = ("unseen_attribute", "fictitious")
KNOWN_SPLITS = ("sft_known", "pretrain_only")
_TRAILING = re.compile(r"[\s.,;:!?\"'`]+$")
_LEADING = re.compile(r"^[\s\"'`]+")
Stat = Callable[[np.ndarray], float]


class ConfidenceInterval(NamedTuple):
    """A point estimate on the full data and a percentile-bootstrap interval ``[low, high]``."""

    estimate: float
    low: float
    high: float


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
            "aurc": aurc(c, y)}  # fmt: skip


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


# --- bootstrap -------------------------------------------------------------------------------------------------------
def _resampler(
    shape: tuple[int, ...], groups: object, rng: np.random.Generator
) -> Callable[[], tuple[np.ndarray | None, np.ndarray]]:
    """A function drawing (seed rows or None, item columns) for one bootstrap replicate."""
    n_items = shape[-1]
    if groups is None:
        members = None
    else:
        g = np.asarray(groups)
        if g.shape != (n_items,):
            raise ConfigError(bad_value("groups.shape", g.shape, f"one label per item: ({n_items},)"))
        members = [np.flatnonzero(g == u) for u in np.unique(g)]

    def draw() -> tuple[np.ndarray | None, np.ndarray]:
        rows = rng.integers(0, shape[0], shape[0]) if len(shape) == 2 else None
        if members is None:
            cols = rng.integers(0, n_items, n_items)
        else:
            cols = np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])
        return rows, cols

    return draw


def _values(values: object, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim not in (1, 2) or arr.size == 0:
        raise ConfigError(bad_value(f"{name}.shape", arr.shape, "a non-empty (items,) or (seeds, items) array"))
    return arr


def _check_bootstrap(n_boot: int, level: float) -> None:
    if not isinstance(n_boot, int | np.integer) or n_boot < 1:
        raise ConfigError(bad_value("n_boot", n_boot, "an integer >= 1"))
    if not 0 < level < 1:
        raise ConfigError(bad_value("level", level, "a coverage in (0, 1) such as 0.95"))


def _take(arr: np.ndarray, rows: np.ndarray | None, cols: np.ndarray) -> np.ndarray:
    return arr[..., cols] if rows is None else arr[rows][:, cols]


def _interval(estimate: float, replicates: np.ndarray, level: float) -> ConfidenceInterval:
    """Percentile interval over the finite replicates (a relative change is undefined, not infinite, in a
    replicate whose baseline statistic is 0); NaN bounds if no replicate is finite."""
    finite = replicates[np.isfinite(replicates)]
    if finite.size == 0:
        return ConfidenceInterval(float(estimate), float("nan"), float("nan"))
    low, high = np.quantile(finite, [(1 - level) / 2, (1 + level) / 2])
    return ConfidenceInterval(float(estimate), float(low), float(high))


def bootstrap_ci(
    values: object,
    *,
    groups: object = None,
    n_boot: int = 2000,
    seed: int = 0,
    stat: Stat = np.mean,
    level: float = 0.95,
) -> ConfidenceInterval:
    """Percentile bootstrap interval of ``stat(values)``.

    values: (items,) — items resampled with replacement; or (seeds, items) — seeds and items resampled
    independently (two-way: the interval covers both training-seed and item variation). ``groups``: (items,)
    labels; whole groups (e.g. all questions about one entity) are resampled instead of single items.
    ``stat`` receives an array of the same rank as ``values``."""
    arr = _values(values, "values")
    _check_bootstrap(n_boot, level)
    draw = _resampler(arr.shape, groups, np.random.default_rng(seed))
    replicates = np.array([stat(_take(arr, *draw())) for _ in range(n_boot)], dtype=np.float64)
    return _interval(stat(arr), replicates, level)


def _paired(
    a: object, b: object, groups: object, n_boot: int, seed: int, stat: Stat, level: float,
    effect: Callable[[float, float], float],
) -> ConfidenceInterval:  # fmt: skip
    x, y = _values(a, "a"), _values(b, "b")
    if x.shape != y.shape:
        raise ConfigError(bad_value("b.shape", y.shape, f"the shape of a, {x.shape} (paired items and seeds)"))
    _check_bootstrap(n_boot, level)
    draw = _resampler(x.shape, groups, np.random.default_rng(seed))
    replicates = []
    for _ in range(n_boot):
        rows, cols = draw()
        replicates.append(effect(stat(_take(x, rows, cols)), stat(_take(y, rows, cols))))
    return _interval(effect(stat(x), stat(y)), np.asarray(replicates, dtype=np.float64), level)


def paired_bootstrap_diff(
    a: object,
    b: object,
    *,
    groups: object = None,
    n_boot: int = 2000,
    seed: int = 0,
    stat: Stat = np.mean,
    level: float = 0.95,
) -> ConfidenceInterval:
    """Interval of ``stat(a) - stat(b)`` for two arms scored on the same items (and seeds): each replicate applies
    the same resampled indices to both, so item difficulty cancels. Shapes as in :func:`bootstrap_ci`."""
    return _paired(a, b, groups, n_boot, seed, stat, level, lambda u, v: u - v)


def relative_change_ci(
    a: object,
    b: object,
    *,
    groups: object = None,
    n_boot: int = 2000,
    seed: int = 0,
    stat: Stat = np.mean,
    level: float = 0.95,
) -> ConfidenceInterval:
    """Interval of ``(stat(a) - stat(b)) / stat(b)``, the relative change of arm ``a`` against baseline ``b``
    (-0.15 is a 15% reduction), paired as in :func:`paired_bootstrap_diff`. Replicates with ``stat(b) == 0`` (rare
    events in small samples) are left out of the interval; the baseline's full-data statistic must be non-zero."""
    base = stat(_values(b, "b"))
    if base == 0:
        raise ConfigError(bad_value("stat(b)", float(base), "a non-zero baseline", "use paired_bootstrap_diff"))
    with np.errstate(divide="ignore", invalid="ignore"):
        return _paired(a, b, groups, n_boot, seed, stat, level, lambda u, v: np.float64(u - v) / np.float64(v))
