"""Voronoi cells and losses: hand-computed values, invariances, and the over-specified exponents."""

from __future__ import annotations

import math

import numpy as np
import pytest

from leanfit.moe.voronoi import MixingMeasure, per_parameter_errors, voronoi_cells, voronoi_loss

TRUE = {"gate_intercept": [0.5, 0.0], "gate_coef": [[2.0], [0.0]], "coef": [[1.0], [-1.0]], "intercept": [0.0, 1.0],
        "var": [0.1, 0.2]}


def _shift(p, c0, c1):
    return {**p, "gate_intercept": np.asarray(p["gate_intercept"]) + c0, "gate_coef": np.asarray(p["gate_coef"]) + c1}


def test_zero_at_the_truth_and_invariant_to_translation_and_order():
    assert voronoi_loss(TRUE, TRUE) == 0.0
    fitted = {"gate_intercept": [0.4, 0.0], "gate_coef": [[2.1], [0.0]], "coef": [[1.05], [-1.0]],
              "intercept": [0.0, 1.02], "var": [0.1, 0.25]}
    base = voronoi_loss(fitted, TRUE)
    assert voronoi_loss(_shift(fitted, 3.0, -1.5), TRUE) == pytest.approx(base, rel=1e-12)
    assert voronoi_loss(_shift(TRUE, -2.0, 0.7), TRUE) == pytest.approx(0.0, abs=1e-12)
    flipped = {key: np.asarray(v)[::-1] for key, v in fitted.items()}
    assert voronoi_loss(flipped, TRUE) == pytest.approx(base, rel=1e-12)


def test_exact_loss_by_hand():
    fitted = {"gate_intercept": [0.4, 0.0], "gate_coef": [[2.1], [0.0]], "coef": [[1.05], [-1.0]],
              "intercept": [0.0, 1.02], "var": [0.1, 0.25]}
    # cell 0: weight e^0.4, |d beta_1| 0.1 + |d a| 0.05; cell 1: weight 1, |d b| 0.02 + |d var| 0.05
    expected = math.exp(0.4) * (0.1 + 0.05) + abs(math.exp(0.4) - math.exp(0.5)) + 1.0 * (0.02 + 0.05) + 0.0
    assert voronoi_loss(fitted, TRUE, kind="exact") == pytest.approx(expected, rel=1e-12)


def test_over_specified_loss_uses_rbar_of_the_cell_size():
    # expert 0 split in two atoms of weights e^0.5 / 2 each, perturbed
    w = math.log(math.exp(0.5) / 2)
    fitted = {"gate_intercept": [w, w, 0.0], "gate_coef": [[2.2], [1.8], [0.0]], "coef": [[1.1], [0.9], [-1.0]],
              "intercept": [0.1, -0.1], "var": [0.1, 0.1, 0.2]}
    fitted["intercept"] = [0.1, -0.1, 1.0]
    assert [c.tolist() for c in voronoi_cells(fitted, TRUE)] == [[0, 1], [2]]
    half = math.exp(0.5) / 2
    # rbar(2) = 4: |d beta_1|^4 + |d b|^4 + |d a|^2 + |d var|^2 per atom
    expected = 2 * half * (0.2**4 + 0.1**4 + 0.1**2 + 0.0)
    assert voronoi_loss(fitted, TRUE, kind="over") == pytest.approx(expected, rel=1e-10)
    # D1 on the same measure is first order in the differences
    assert voronoi_loss(fitted, TRUE, kind="exact") == pytest.approx(2 * half * (0.2 + 0.1 + 0.1), rel=1e-10)
    errors = per_parameter_errors(fitted, TRUE)
    assert errors[0]["cell_size"] == 2 and errors[0]["gate_coef"] == pytest.approx(0.2)
    assert errors[0]["weight"] == pytest.approx(0.0, abs=1e-12) and errors[1]["cell_size"] == 1


def test_cells_larger_than_known_rbar_are_refused():
    k = 5
    fitted = {"gate_intercept": [0.0] * k, "gate_coef": [[2.0]] * (k - 1) + [[0.0]], "coef": [[1.0]] * (k - 1) + [[-1.0]],
              "intercept": [0.0] * (k - 1) + [1.0], "var": [0.1] * (k - 1) + [0.2]}
    with pytest.raises(ValueError, match=r"rbar\(4\) is unknown"):
        voronoi_loss(fitted, TRUE, kind="over")
    with pytest.raises(ValueError, match="kind='d3'"):
        voronoi_loss(TRUE, TRUE, kind="d3")


def test_mixing_measure_from_dict_round_trip():
    m = MixingMeasure.of(TRUE)
    np.testing.assert_array_equal(m.atoms, [[2.0, 1.0, 0.0, 0.1], [0.0, -1.0, 1.0, 0.2]])
    np.testing.assert_array_equal(m.expert_part, m.atoms[:, 1:])
