"""Butcher tableaus: consistency conditions, quadrature order conditions, interpolants, and the checker's errors."""

from __future__ import annotations

import dataclasses
import math

import pytest

from leanfit.neural_de.tableaus import DOPRI5, TABLEAUS, TSIT5, ButcherTableau, check_tableau, get_tableau

TABS = [pytest.param(TSIT5, id="tsit5"), pytest.param(DOPRI5, id="dopri5")]


@pytest.mark.parametrize("tab", TABS)
def test_row_sums_and_weight_sums(tab: ButcherTableau) -> None:
    check_tableau(tab)
    worst = max(abs(math.fsum(row) - ci) for row, ci in zip(tab.a, tab.c, strict=True))
    assert worst < 2e-15, f"worst |sum_j a_ij - c_i| = {worst}"
    assert abs(math.fsum(tab.b) - 1.0) < 1e-15
    assert abs(math.fsum(tab.b_error)) < 1e-15
    assert (tab.stages, tab.order, tab.error_order, tab.fsal) == (7, 5, 4, True)


@pytest.mark.parametrize("tab", TABS)
def test_quadrature_order_conditions(tab: ButcherTableau) -> None:
    """sum_i b_i c_i^k = 1/(k+1) for k < order; the embedded weights b - b_error satisfy it for k < error_order
    and fail it at k = error_order (otherwise the estimate would be of higher order)."""
    b_hat = [bi - ei for bi, ei in zip(tab.b, tab.b_error, strict=True)]
    for k in range(tab.order):
        got = math.fsum(bi * ci**k for bi, ci in zip(tab.b, tab.c, strict=True))
        assert abs(got - 1 / (k + 1)) < 1e-14, (k, got)
    for k in range(tab.error_order):
        got = math.fsum(bi * ci**k for bi, ci in zip(b_hat, tab.c, strict=True))
        assert abs(got - 1 / (k + 1)) < 1e-14, (k, got)
    defect = math.fsum(bi * ci**tab.error_order for bi, ci in zip(b_hat, tab.c, strict=True)) - 1 / (tab.error_order + 1)
    assert abs(defect) > 1e-4, defect


@pytest.mark.parametrize("tab", TABS)
@pytest.mark.parametrize("theta", [0.0, 0.25, 0.5, 0.9, 1.0], ids=lambda x: f"theta{x}")
def test_interpolant_is_consistent(tab: ButcherTableau, theta: float) -> None:
    """sum_i b_i(theta) = theta (exact for constant derivatives) and b_i(1) = b_i (continuity with y_next)."""
    weights = [math.fsum(c * theta ** (p + 1) for p, c in enumerate(poly)) for poly in tab.interpolant]
    assert abs(math.fsum(weights) - theta) < 1e-13
    if theta == 1.0:
        assert max(abs(w - bi) for w, bi in zip(weights, tab.b, strict=True)) < 1e-13


def _broken(**changes) -> ButcherTableau:
    return dataclasses.replace(TSIT5, name="broken", **changes)


@pytest.mark.parametrize(
    ("tab", "match"),
    [
        pytest.param(_broken(c=(0.0, 0.17, *TSIT5.c[2:])), r"row sum of a\[1\]", id="row-sum"),
        pytest.param(_broken(b=(0.1, *TSIT5.b[1:]), fsal=False), r"sum\(b\)", id="weights-sum"),
        pytest.param(_broken(b_error=(0.1, *TSIT5.b_error[1:])), r"sum\(b_error\)", id="error-weights-sum"),
        pytest.param(_broken(a=TSIT5.a[:-1]), "strictly lower triangular", id="shape"),
        pytest.param(_broken(a=(*TSIT5.a[:-1], (0.0,) * 6), c=(*TSIT5.c[:-1], 0.0)), "fsal", id="fsal"),
    ],
)
def test_check_tableau_rejects(tab: ButcherTableau, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_tableau(tab)


def test_get_tableau() -> None:
    assert get_tableau("tsit5") is TSIT5 and get_tableau(DOPRI5) is DOPRI5 and sorted(TABLEAUS) == ["dopri5", "tsit5"]
    with pytest.raises(ValueError, match=r"method='rk4' is invalid: expected one of \['dopri5', 'tsit5'\]"):
        get_tableau("rk4")
