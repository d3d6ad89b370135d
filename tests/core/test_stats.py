"""core.stats against naive references and closed forms: bootstrap intervals redrawn by a seeded numpy loop (and by
scipy where it applies), paired effects, the stratified slope against a loop with the legacy RandomState stream and
against linregress and the delta method, and choose_within_drop on hand-made records."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from leanfit.core.errors import ConfigError
from leanfit.core.stats import bootstrap_ci, choose_within_drop, paired_bootstrap_ci, slope_ci, t_interval


# --- naive references ------------------------------------------------------------------------------------------------
def bootstrap_reference(values, n_boot, seed, level, groups=None, stat=np.mean):
    """Replicates drawn exactly as documented: seed rows (two-way only), then items or whole groups."""
    rng = np.random.default_rng(seed)
    values = np.asarray(values, dtype=np.float64)
    reps = []
    for _ in range(n_boot):
        v = values
        if v.ndim == 2:
            v = v[rng.integers(0, v.shape[0], v.shape[0])]
        if groups is None:
            cols = rng.integers(0, v.shape[-1], v.shape[-1])
        else:
            labels = sorted(set(groups))
            picked = rng.integers(0, len(labels), len(labels))
            cols = [i for g in picked for i, lab in enumerate(groups) if lab == labels[g]]
        reps.append(stat(v[..., cols]))
    lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    return stat(values), lo, hi


def slope_reference(x, samples, n_boot, seed):
    """polyfit slope of log means; replicates from RandomState(seed).choice level by level; 2.5/97.5 percentiles."""
    rng = np.random.RandomState(seed)
    lx = np.log(np.asarray(x, dtype=float))
    fit = lambda means: np.polyfit(lx, np.log(means), 1)[0]  # noqa: E731
    boots = []
    for _ in range(n_boot):
        boots.append(fit([np.mean(rng.choice(s, len(s))) for s in samples]))
    return fit([np.mean(s) for s in samples]), *np.percentile(boots, [2.5, 97.5])


def _ece(pairs):
    """10-bin ECE of (confidence, correct) pairs of any leading shape."""
    conf, correct = pairs[..., 0].ravel(), pairs[..., 1].ravel()
    idx = np.minimum((conf * 10).astype(int), 9)
    return sum(abs(correct[idx == b].mean() - conf[idx == b].mean()) * (idx == b).mean() for b in range(10)
               if (idx == b).any())


# --- bootstrap_ci ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(40,), (5, 30)], ids=["items", "seeds-x-items"])
def test_bootstrap_equals_the_reference_draws_bit_for_bit(shape):
    values = np.random.default_rng(1).normal(size=shape)
    got = bootstrap_ci(values, n_boot=300, seed=7, level=0.9)
    assert tuple(got) == tuple(float(v) for v in bootstrap_reference(values, 300, 7, 0.9))


@pytest.mark.parametrize("n", [7, 150, 1000], ids=["n7", "n150", "n1000"])
def test_one_sample_interval_equals_one_vectorised_draw_and_scipy_up_to_rounding(n):
    """Bit for bit the numbers of drawing all (n_boot, n) indices at once (how the iapt report's decoder intervals
    were computed); scipy.stats.bootstrap's percentile interval draws the same indices but agrees only to rounding
    (why core.stats does not use it)."""
    x = np.random.default_rng(n).random(n)
    got = bootstrap_ci(x, n_boot=2000, seed=0)
    ref = sps.bootstrap((x,), np.mean, n_resamples=2000, method="percentile", rng=np.random.default_rng(0))
    np.testing.assert_allclose((got.low, got.high), ref.confidence_interval, rtol=0, atol=1e-15)
    means = x[np.random.default_rng(0).integers(0, n, (2000, n))].mean(1)
    assert (got.low, got.high) == (np.quantile(means, 0.025000000000000022), np.quantile(means, 0.975))


def test_bootstrap_of_a_constant_is_that_constant():
    assert bootstrap_ci([0.3] * 50, n_boot=500) == pytest.approx((0.3, 0.3, 0.3), abs=1e-15)


def test_bootstrap_groups_resample_whole_groups():
    base = np.random.default_rng(2).normal(size=30)
    dup, groups = np.repeat(base, 4), np.repeat(np.arange(30), 4)
    grouped = bootstrap_ci(dup, groups=groups, n_boot=400, seed=3)
    np.testing.assert_allclose(grouped, bootstrap_reference(dup, 400, 3, 0.95, groups.tolist()), rtol=1e-12)
    # 4 copies of each value: resampling groups equals resampling the 30 distinct values, not 120 independent items
    np.testing.assert_allclose(grouped, bootstrap_ci(base, n_boot=400, seed=3), rtol=1e-12)
    single = bootstrap_ci(dup, n_boot=400, seed=3)
    assert single.high - single.low < 0.7 * (grouped.high - grouped.low)


def test_two_way_interval_covers_seed_variation():
    rng = np.random.default_rng(4)
    values = rng.normal(size=(5, 200)) * 0.1 + rng.normal(size=(5, 1))  # the seed effect dominates
    two_way = bootstrap_ci(values, n_boot=500, seed=0)
    flat = bootstrap_ci(values.ravel(), n_boot=500, seed=0)
    assert two_way.estimate == pytest.approx(flat.estimate, abs=1e-15)
    assert two_way.high - two_way.low > 5 * (flat.high - flat.low)


def test_coverage_is_near_nominal():
    rng = np.random.default_rng(11)
    reps, hits = 120, 0
    for r in range(reps):
        sample = rng.exponential(1.0, size=80)  # true mean 1
        ci = bootstrap_ci(sample, n_boot=400, seed=r)
        hits += ci.low <= 1.0 <= ci.high
    assert 0.85 <= hits / reps <= 0.995


def test_records_on_a_trailing_axis_equal_resampling_an_index_table():
    """(seeds, items, 2) pairs with trailing_axes=1 give the numbers of resampling (seeds, items) indices into a
    flat table of pairs (how the noisefit study computed its ECE intervals)."""
    rng = np.random.default_rng(0)
    conf = rng.uniform(size=(3, 40))
    pairs = np.stack([conf, (rng.uniform(size=(3, 40)) < conf).astype(float)], -1)
    table, idx = pairs.reshape(-1, 2), np.arange(120, dtype=float).reshape(3, 40)
    by_index = bootstrap_ci(idx, n_boot=200, stat=lambda i: _ece(table[i.astype(int)]))
    assert bootstrap_ci(pairs, n_boot=200, stat=_ece, trailing_axes=1) == by_index
    assert by_index.estimate == pytest.approx(_ece(pairs), abs=1e-15)
    other = np.stack([conf * 0.5, pairs[..., 1]], -1)
    both = np.concatenate([other, pairs]).reshape(-1, 2)
    rel_by_index = paired_bootstrap_ci(idx, idx + 120, effect="relative", n_boot=200,
                                       stat=lambda i: _ece(both[i.astype(int)]))
    rel = paired_bootstrap_ci(other, pairs, effect="relative", n_boot=200, stat=_ece, trailing_axes=1)
    assert rel == rel_by_index
    assert rel.estimate == pytest.approx(_ece(other) / _ece(pairs) - 1, abs=1e-12)


# --- paired effects ---------------------------------------------------------------------------------------------------
def test_paired_difference_of_identical_arrays_is_exactly_zero():
    a = np.random.default_rng(5).random((3, 50))
    assert tuple(paired_bootstrap_ci(a, a.copy(), n_boot=200)) == (0.0, 0.0, 0.0)


def test_paired_difference_cancels_item_difficulty():
    rng = np.random.default_rng(6)
    difficulty = rng.normal(size=300) * 3
    a, b = difficulty + 0.5 + rng.normal(size=300) * 0.1, difficulty + rng.normal(size=300) * 0.1
    paired = paired_bootstrap_ci(a, b, n_boot=500, seed=1)
    np.testing.assert_allclose(paired, bootstrap_reference(a - b, 500, 1, 0.95), rtol=1e-12)
    assert paired.low < 0.5 < paired.high and paired.high - paired.low < 0.05


def test_relative_change_of_a_scaled_arm_is_the_scale():
    b = np.random.default_rng(8).random((4, 60)) + 0.1
    np.testing.assert_allclose(paired_bootstrap_ci(0.8 * b, b, effect="relative", n_boot=200), (-0.2,) * 3,
                               rtol=1e-12)


def test_relative_change_leaves_out_replicates_with_a_zero_baseline():
    """A rare baseline event (1 of 40 items) is absent from many replicates: the interval is taken over the
    replicates where the change is defined instead of turning NaN."""
    base, arm = np.zeros(40), np.zeros(40)
    base[3] = arm[3] = arm[7] = 1.0
    ci = paired_bootstrap_ci(arm, base, effect="relative", n_boot=400, seed=0)
    assert ci.estimate == pytest.approx(1.0)
    assert np.isfinite(ci.low) and np.isfinite(ci.high) and ci.low <= ci.estimate <= ci.high


# --- slope -----------------------------------------------------------------------------------------------------------
def _power_law(m: int, seed: int) -> tuple[list[float], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    x = [100.0, 1000.0, 10000.0, 100000.0]
    return x, [3.0 * n**-0.5 * (1 + 0.1 * rng.standard_normal(m)) for n in x]


def test_slope_equals_the_reference_loop_bit_for_bit():
    x, samples = _power_law(6, 0)
    assert tuple(slope_ci(x, samples, n_boot=300, seed=4)) == tuple(float(v) for v in slope_reference(x, samples, 300, 4))


def test_slope_estimate_is_linregress_and_the_interval_the_delta_method():
    """Point: linregress of log means on log x. Interval: with 400 replications per level the bootstrap half-width
    is close to 1.96 x the delta-method standard error sqrt(sum_i w_i^2 s_i^2 / (m mean_i^2))."""
    x, samples = _power_law(400, 1)
    got = slope_ci(x, samples, n_boot=2000, seed=0)
    lx, means = np.log(x), np.array([s.mean() for s in samples])
    assert got.estimate == pytest.approx(sps.linregress(lx, np.log(means)).slope, abs=1e-12)
    w = (lx - lx.mean()) / ((lx - lx.mean()) ** 2).sum()
    se = np.sqrt(sum(wi**2 * s.var(ddof=1) / (len(s) * s.mean() ** 2) for wi, s in zip(w, samples, strict=True)))
    assert (got.high - got.low) / 2 == pytest.approx(1.96 * se, rel=0.15)
    assert got.low < -0.5 < got.high


def test_slope_of_identical_replications_has_a_zero_width_interval():
    x = [10.0, 100.0, 1000.0]
    got = slope_ci(x, [np.full(5, 2.0 * n**-0.25) for n in x], n_boot=100)
    assert got.estimate == pytest.approx(-0.25, abs=1e-12) and got.low == got.high == pytest.approx(got.estimate)


# --- choose_within_drop ------------------------------------------------------------------------------------------------
def _setting(em: float, cw: float, name: str) -> dict:
    return {"name": name, "em": em, "cw": cw}


@pytest.mark.parametrize(("records", "expected"), [
    pytest.param([_setting(0.80, 0.2, "a"), _setting(0.795, 0.1, "b"), _setting(0.70, 0.0, "c")], "b",
                 id="lowest-cost-within-the-drop"),
    pytest.param([_setting(0.70, 0.1, "a"), _setting(0.75, 0.3, "b")], "b", id="none-within-best-score"),
    pytest.param([_setting(0.70, 0.1, "a"), _setting(0.70, 0.3, "b")], "a", id="none-within-tie-lower-cost"),
    pytest.param([_setting(0.80, 0.1, "a"), _setting(0.81, 0.1, "b")], "b", id="tie-on-cost-higher-score"),
    pytest.param([_setting(0.79, 0.1, "a")], "a", id="exactly-at-the-drop"),
])
def test_choose_within_drop_on_settings(records, expected):
    got = choose_within_drop(records, score=lambda r: r["em"], cost=lambda r: r["cw"], baseline=0.80,
                             max_drop_points=1.0)
    assert got["name"] == expected


@pytest.mark.parametrize(("baseline", "drop", "expected"), [
    (0.950, 0.3, 1.0), (0.950, 0.1, 0.1), (0.990, 0.3, 0.1), (0.950, 10.0, 10.0),
], ids=["fewest-nfe-in-band", "narrow-band", "none-in-band-most-accurate", "wide-band"])
def test_choose_within_drop_on_a_lambda_sweep(baseline, drop, expected):
    sweep = [{"lambda": 0.1, "acc": 0.950, "nfe": 80.0}, {"lambda": 1.0, "acc": 0.948, "nfe": 50.0},
             {"lambda": 10.0, "acc": 0.900, "nfe": 20.0}]
    got = choose_within_drop(sweep, score=lambda r: r["acc"], cost=lambda r: r["nfe"], baseline=baseline,
                             max_drop_points=drop, tiebreak=lambda r: r["lambda"])
    assert got["lambda"] == expected


def test_choose_within_drop_breaks_full_ties_with_tiebreak_then_order():
    sweep = [{"lambda": 2.0, "acc": 0.9, "nfe": 10.0}, {"lambda": 1.0, "acc": 0.9, "nfe": 10.0}]
    pick = lambda **kw: choose_within_drop(sweep, score=lambda r: r["acc"], cost=lambda r: r["nfe"],  # noqa: E731
                                           baseline=0.9, max_drop_points=0.0, **kw)
    assert pick(tiebreak=lambda r: r["lambda"])["lambda"] == 1.0
    assert pick()["lambda"] == 2.0


# --- Student-t interval ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("values", [[-1.91, -1.11, -0.10], [0.5, 2.0, 1.0, 4.0, -1.0]], ids=["3-seeds", "5-seeds"])
def test_t_interval_equals_scipy(values):
    mean, low, high = t_interval(values)
    ref = sps.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=sps.sem(values))
    assert mean == pytest.approx(np.mean(values), abs=1e-12)
    assert (low, high) == pytest.approx(ref, abs=1e-12)


def test_t_interval_of_equal_values_has_zero_width():
    assert tuple(t_interval([2.5, 2.5, 2.5])) == (2.5, 2.5, 2.5)


# --- bad input -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("call", "param"), [
    (lambda: bootstrap_ci([1.0, 2.0], n_boot=0), "n_boot=0"),
    (lambda: bootstrap_ci([1.0, 2.0], level=1.0), "level=1.0"),
    (lambda: bootstrap_ci([1.0, 2.0], groups=[0]), "groups.shape"),
    (lambda: bootstrap_ci(np.zeros((2, 2, 2))), "values.shape"),
    (lambda: bootstrap_ci(np.zeros((2, 2, 2)), trailing_axes=3), "values.shape"),
    (lambda: paired_bootstrap_ci([1.0, 2.0], [1.0]), "b.shape"),
    (lambda: paired_bootstrap_ci([1.0, 2.0], [1.0, 2.0], effect="ratio"), "effect='ratio'"),
    (lambda: paired_bootstrap_ci([1.0], [0.0], effect="relative"), "stat\\(b\\)"),
    (lambda: slope_ci([1.0, 2.0], [[1.0]]), "samples"),
    (lambda: choose_within_drop([], score=len, cost=len, baseline=0.0, max_drop_points=1.0), "records"),
    (lambda: t_interval([1.0]), "values"),
    (lambda: t_interval([1.0, float("nan")]), "values"),
    (lambda: t_interval([1.0, 2.0], level=0.0), "level=0.0"),
], ids=["n-boot", "level", "groups", "rank-3", "trailing-rank", "paired-shape", "effect", "zero-baseline",
        "slope-levels", "no-records", "t-one-value", "t-nan", "t-level"])
def test_bad_input_names_the_parameter(call, param):
    with pytest.raises(ConfigError, match=param):
        call()
