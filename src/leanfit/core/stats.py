"""Statistics shared by the studies: percentile-bootstrap intervals (one sample, seeds x items two-way, whole
groups), paired effects of two arms (difference or relative change), the slope of a log-log fit with a stratified
bootstrap interval, the Student-t interval of a mean over a few seeds (:func:`t_interval`), and the selection of a
setting on validation (:func:`choose_within_drop`).

Every function reproduces the numbers the studies committed bit for bit: the same random streams, the same
resampling order and the same quantile positions.

- :func:`bootstrap_ci` and :func:`paired_bootstrap_ci` draw from ``np.random.default_rng(seed)``, one replicate
  after another: seed rows first (two-way only), then item columns (or whole groups). Quantiles are read with
  ``np.quantile`` at ``(1 - level) / 2`` and ``(1 + level) / 2`` over the finite replicates.
- :func:`slope_ci` draws from the legacy ``np.random.RandomState(seed)`` with ``choice`` per level, and reads the
  interval with ``np.percentile`` at ``50 (1 - level)`` and ``50 (1 + level)`` rounded to 10 decimals (2.5 and 97.5
  at 0.95; ``(1 - 0.95) / 2`` is not exactly 0.025, so the two conventions differ in the last bits).

Why not ``scipy.stats.bootstrap``: it would change the numbers. Even in the one case it covers, a single (items,)
sample without groups, where ``method="percentile"`` draws the same indices from the same Generator, its bounds
differ from :func:`bootstrap_ci`'s in the last bits (``tests/core/test_stats.py`` shows it), and its default BCa
interval differs outright. It also has no two-way seeds x items resampling, no whole-group resampling, no paired
relative change that leaves out the replicates where the change is undefined, and no stratified resampling for a
slope over levels with the legacy ``RandomState`` stream. So the resampling stays here, in one loop for every shape.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple, TypeVar

import numpy as np

from leanfit.core.errors import ConfigError, bad_value

__all__ = [
    "ConfidenceInterval",
    "bootstrap_ci",
    "choose_within_drop",
    "paired_bootstrap_ci",
    "slope_ci",
    "t_interval",
]

Stat = Callable[[np.ndarray], float]
T = TypeVar("T")


class ConfidenceInterval(NamedTuple):
    """A point estimate on the full data and an interval ``[low, high]`` (percentile bootstrap, or Student t)."""

    estimate: float
    low: float
    high: float


# --- resampling ------------------------------------------------------------------------------------------------------
def _values(values: object, name: str, trailing_axes: int) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim - trailing_axes not in (1, 2) or arr.size == 0:
        shape = "(items, ...) or (seeds, items, ...)" if trailing_axes else "(items,) or (seeds, items)"
        raise ConfigError(bad_value(f"{name}.shape", arr.shape, f"a non-empty {shape} array"))
    return arr


def _check_bootstrap(n_boot: int, level: float, trailing_axes: int) -> None:
    if not isinstance(n_boot, int | np.integer) or n_boot < 1:
        raise ConfigError(bad_value("n_boot", n_boot, "an integer >= 1"))
    if not 0 < level < 1:
        raise ConfigError(bad_value("level", level, "a coverage in (0, 1) such as 0.95"))
    if not isinstance(trailing_axes, int | np.integer) or trailing_axes < 0:
        raise ConfigError(bad_value("trailing_axes", trailing_axes, "an integer >= 0"))


def _resampler(
    shape: tuple[int, ...], groups: object, rng: np.random.Generator
) -> Callable[[], tuple[np.ndarray | None, np.ndarray]]:
    """A function drawing (seed rows or None, item columns) for one replicate; ``shape`` is (items,) or
    (seeds, items)."""
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


def _take(arr: np.ndarray, rows: np.ndarray | None, cols: np.ndarray) -> np.ndarray:
    return arr[cols] if rows is None else arr[rows][:, cols]


def _interval(estimate: float, replicates: np.ndarray, level: float) -> ConfidenceInterval:
    """Percentile interval over the finite replicates (a relative change is undefined, not infinite, in a
    replicate whose baseline statistic is 0); NaN bounds if no replicate is finite."""
    finite = replicates[np.isfinite(replicates)]
    if finite.size == 0:
        return ConfidenceInterval(float(estimate), float("nan"), float("nan"))
    low, high = np.quantile(finite, [(1 - level) / 2, (1 + level) / 2])
    return ConfidenceInterval(float(estimate), float(low), float(high))


# --- intervals -------------------------------------------------------------------------------------------------------
def bootstrap_ci(
    values: object,
    *,
    groups: object = None,
    n_boot: int = 2000,
    seed: int = 0,
    stat: Stat = np.mean,
    level: float = 0.95,
    trailing_axes: int = 0,
) -> ConfidenceInterval:
    """Percentile bootstrap interval of ``stat(values)``.

    values: (items, *record) — items resampled with replacement; or (seeds, items, *record) — seeds and items
    resampled independently (two-way: the interval covers both training-seed and item variation). ``record`` has
    ``trailing_axes`` axes that belong to one item and travel with it (a (confidence, correct) pair: 1).
    ``groups``: (items,) labels; whole groups (e.g. all questions about one entity) are resampled instead of single
    items. ``stat`` receives an array of the same rank as ``values``."""
    _check_bootstrap(n_boot, level, trailing_axes)
    arr = _values(values, "values", trailing_axes)
    draw = _resampler(arr.shape[: arr.ndim - trailing_axes], groups, np.random.default_rng(seed))
    replicates = np.array([stat(_take(arr, *draw())) for _ in range(n_boot)], dtype=np.float64)
    return _interval(stat(arr), replicates, level)


def _difference(u: float, v: float) -> float:
    return u - v


def _relative(u: float, v: float) -> float:
    return np.float64(u - v) / np.float64(v)


def paired_bootstrap_ci(
    a: object,
    b: object,
    *,
    effect: Literal["difference", "relative"] = "difference",
    groups: object = None,
    n_boot: int = 2000,
    seed: int = 0,
    stat: Stat = np.mean,
    level: float = 0.95,
    trailing_axes: int = 0,
) -> ConfidenceInterval:
    """Interval of the effect of arm ``a`` against baseline ``b``, both scored on the same items (and seeds): each
    replicate applies the same resampled indices to both, so item difficulty cancels. Shapes as in
    :func:`bootstrap_ci`.

    effect: ``difference`` is ``stat(a) - stat(b)``; ``relative`` is ``(stat(a) - stat(b)) / stat(b)`` (-0.15 is
    a 15% reduction): replicates with ``stat(b) == 0`` (rare events in small samples) are left out of the interval,
    and the baseline's full-data statistic must be non-zero."""
    if effect not in ("difference", "relative"):
        raise ConfigError(bad_value("effect", effect, "'difference' or 'relative'"))
    _check_bootstrap(n_boot, level, trailing_axes)
    x, y = _values(a, "a", trailing_axes), _values(b, "b", trailing_axes)
    if x.shape != y.shape:
        raise ConfigError(bad_value("b.shape", y.shape, f"the shape of a, {x.shape} (paired items and seeds)"))
    fn = _difference
    if effect == "relative":
        base = stat(y)
        if base == 0:
            raise ConfigError(bad_value("stat(b)", float(base), "a non-zero baseline", "use effect='difference'"))
        fn = _relative
    draw = _resampler(x.shape[: x.ndim - trailing_axes], groups, np.random.default_rng(seed))
    replicates = []
    with np.errstate(divide="ignore", invalid="ignore"):
        for _ in range(n_boot):
            rows, cols = draw()
            replicates.append(fn(stat(_take(x, rows, cols)), stat(_take(y, rows, cols))))
        estimate = fn(stat(x), stat(y))
    return _interval(estimate, np.asarray(replicates, dtype=np.float64), level)


def slope_ci(
    x: Sequence[float], samples: Sequence[object], *, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> ConfidenceInterval:
    """Least-squares slope of log(mean of ``samples[i]``) against log(``x[i]``), with a percentile interval from a
    stratified bootstrap: each level's samples are resampled with replacement on their own.

    x: (levels,) positive; samples: one 1-D array of positive values per level (at least 2 levels). Replicates
    come from ``np.random.RandomState(seed)``, level after level within a replicate (see the module docstring)."""
    _check_bootstrap(n_boot, level, 0)
    values = [np.asarray(v, dtype=float) for v in samples]
    if len(values) != len(x) or len(values) < 2 or any(v.ndim != 1 or v.size == 0 for v in values):
        raise ConfigError(bad_value("samples", [v.shape for v in values], f"{len(x)} non-empty 1-D arrays, one "
                                    "per x (at least 2)"))
    logx = np.log(np.asarray(x, dtype=float))

    def slope(means: np.ndarray) -> float:
        return float(np.polyfit(logx, np.log(means), 1)[0])

    rng = np.random.RandomState(seed)
    point = slope(np.asarray([v.mean() for v in values]))
    boots = [slope(np.asarray([rng.choice(v, len(v)).mean() for v in values])) for _ in range(n_boot)]
    # 2.5 and 97.5 exactly at level 0.95: the committed slope intervals were read at those percentiles
    low, high = np.percentile(boots, [round(50 * (1 - level), 10), round(50 * (1 + level), 10)])
    return ConfidenceInterval(point, float(low), float(high))


def t_interval(values: Sequence[float], *, level: float = 0.95) -> ConfidenceInterval:
    """Mean of ``values`` with its Student-t interval ``mean -/+ t_(n-1) sd / sqrt(n)``.

    For a handful of seeds (paired per-seed differences of two arms, say), where a bootstrap over 3 values has only
    10 distinct resamples. values: (n,) finite, n >= 2; sd with n - 1 degrees of freedom."""
    from scipy import stats as sps

    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size < 2 or not np.isfinite(x).all():
        raise ConfigError(bad_value("values", values, "a 1-D sequence of at least 2 finite numbers"))
    if not 0 < level < 1:
        raise ConfigError(bad_value("level", level, "a coverage in (0, 1) such as 0.95"))
    mean = float(x.mean())
    half = float(sps.t.ppf((1 + level) / 2, x.size - 1) * x.std(ddof=1) / np.sqrt(x.size))
    return ConfidenceInterval(mean, mean - half, mean + half)


# --- selection on validation -----------------------------------------------------------------------------------------
def choose_within_drop(
    records: Sequence[T],
    *,
    score: Callable[[T], float],
    cost: Callable[[T], float],
    baseline: float,
    max_drop_points: float,
    tiebreak: Callable[[T], Any] | None = None,
) -> T:
    """The cheapest record among those whose validation score stays within ``max_drop_points`` of ``baseline``.

    score: a fraction in [0, 1], higher is better (e.g. accuracy), compared in points (100 x the fraction) with
    ``1e-9`` of slack; cost: lower is better (NFE, confident-wrong rate). Among the records in the band the lowest
    cost wins, ties go to the higher score, then to the lower ``tiebreak``. If no record is in the band, the
    highest score wins (ties: the lower cost). Records tied on every key: the first one."""
    if not records:
        raise ConfigError(bad_value("records", records, "at least one record to choose from"))
    ok = [r for r in records if 100 * (baseline - score(r)) <= max_drop_points + 1e-9]
    if ok:
        return min(ok, key=lambda r: (cost(r), -score(r), tiebreak(r) if tiebreak else 0))
    return max(records, key=lambda r: (score(r), -cost(r)))
