"""RationalActivation and coefficients: fit accuracy against GELU/SiLU/ReLU, the naive power-sum formula, linear
continuation and boundedness outside the fit range, gradcheck, caching, per-instance coefficients, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from leanfit.core.errors import ConfigError
from leanfit.iapt.rational import RationalActivation, coefficients, rational
from tests.reference import rational_reference
from tests.tolerances import assert_close

TARGETS = {"gelu": F.gelu, "silu": F.silu, "relu": torch.relu}


@pytest.mark.parametrize(
    "name, degrees, tol",
    [
        pytest.param("gelu", (5, 4), 1e-3, id="gelu-5-4"),
        pytest.param("gelu", (6, 5), 1e-4, id="gelu-6-5"),
        pytest.param("silu", (5, 4), 1e-5, id="silu-5-4"),
        pytest.param("relu", (5, 4), 2e-2, id="relu-5-4"),  # a kink: rational fits are coarse there
        pytest.param("relu", (6, 5), 1e-2, id="relu-6-5"),
    ],
)
def test_fit_matches_target_on_range(name: str, degrees: tuple[int, int], tol: float) -> None:
    act = RationalActivation(*degrees, init=name, dtype=torch.float64)
    x = torch.linspace(-3, 3, 20001, dtype=torch.float64)  # 10x finer than the fit grid
    with torch.no_grad():
        err = (act(x) - TARGETS[name](x)).abs()
    worst = err.argmax()
    assert err.max() <= tol, f"max error {err.max():.3e} at x={x[worst]:.4f}"
    assert abs(err.max().item() - coefficients(name, *degrees).max_error) < 0.1 * tol  # the reported error is honest


def test_float32_gelu_within_1e3() -> None:
    act = RationalActivation()  # float32, the default 5/4 GELU fit
    x = torch.linspace(-3, 3, 20001)
    with torch.no_grad():
        err = (act(x).double() - F.gelu(x.double())).abs().max().item()
    assert err <= 1e-3, err


@pytest.mark.parametrize("degrees", [pytest.param((5, 4), id="5-4"), pytest.param((6, 5), id="6-5")])
def test_inside_range_equals_naive_formula(degrees: tuple[int, int]) -> None:
    act = RationalActivation(*degrees, dtype=torch.float64)
    x = torch.linspace(-3, 3, 1001, dtype=torch.float64)
    with torch.no_grad():
        ref = rational_reference(x, act.numerator, act.denominator)
        assert_close(act(x), ref)


def test_linear_continuation_outside_range() -> None:
    """Beyond [lo, hi] the value is R(edge) + R'(edge) (x - edge), R' taken by autograd of the naive formula."""
    act = RationalActivation(dtype=torch.float64)
    for edge, xs in ((3.0, [3.5, 10.0, 1e3]), (-3.0, [-3.5, -10.0, -1e3])):
        e = torch.tensor(edge, dtype=torch.float64, requires_grad=True)
        r_edge = rational_reference(e, act.numerator.detach(), act.denominator.detach())
        (slope,) = torch.autograd.grad(r_edge, e)
        x = torch.tensor(xs, dtype=torch.float64)
        expected = r_edge.detach() + slope * (x - edge)
        with torch.no_grad():
            assert_close(act(x), expected)


def test_continuous_with_continuous_slope_at_edges() -> None:
    act = RationalActivation(dtype=torch.float64)
    h = 1e-7
    x = torch.tensor([3 - h, 3.0, 3 + h, -3 - h, -3.0, -3 + h], dtype=torch.float64, requires_grad=True)
    y = act(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert abs(y[0] - y[2]).item() < 1e-6 and abs(y[3] - y[5]).item() < 1e-6
    assert abs(g[0] - g[2]).item() < 1e-5 and abs(g[3] - g[5]).item() < 1e-5


@pytest.mark.parametrize("perturb", [pytest.param(0.0, id="fitted"), pytest.param(0.3, id="perturbed")])
def test_bounded_far_outside_range(perturb: float) -> None:
    """|R(x)| <= C (1 + |x|) on [-1e4, 1e4], C = max |R| + max |R'| over the range; finite everywhere."""
    torch.manual_seed(0)
    act = RationalActivation(dtype=torch.float64)
    with torch.no_grad():
        act.numerator.add_(perturb * torch.randn_like(act.numerator))
        act.denominator.add_(perturb * torch.randn_like(act.denominator))
    inside = torch.linspace(-3, 3, 6001, dtype=torch.float64, requires_grad=True)
    r = act(inside)
    (slope,) = torch.autograd.grad(r.sum(), inside)
    c = r.abs().max().item() + slope.abs().max().item()
    x = torch.linspace(-1e4, 1e4, 200001, dtype=torch.float64)
    with torch.no_grad():
        y = act(x)
    assert torch.isfinite(y).all()
    ratio = (y.abs() / (1 + x.abs())).max().item()
    assert ratio <= c, f"|R(x)|/(1+|x|) reaches {ratio:.3f} > C={c:.3f}"
    if perturb == 0.0:  # the GELU fit grows like GELU: slope ~1 on the right, ~0 on the left
        assert 0.95 < (y[-1] / x[-1]).item() < 1.05 and abs(y[0].item()) < 0.03 * 1e4


def test_gradcheck_input_and_coefficients() -> None:
    torch.manual_seed(0)
    x = torch.cat([torch.empty(12).uniform_(-2.9, 2.9), torch.tensor([-7.0, -3.4, 4.2, 50.0])])
    x = x.double().requires_grad_(True)
    fit = coefficients("gelu", 5, 4)
    a = torch.tensor(fit.numerator, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(fit.denominator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a, b: rational(x, a, b, (-3.0, 3.0)), (x, a, b), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradgradcheck(lambda x, a, b: rational(x, a, b, (-3.0, 3.0)), (x, a, b), eps=1e-6, atol=1e-6)


def test_coefficients_are_cached_and_instances_own_theirs() -> None:
    first = coefficients("silu", 5, 4, (-3, 3))
    assert coefficients("silu", 5, 4, (-3.0, 3.0)) is first
    a, b = RationalActivation(init="silu"), RationalActivation(init="silu")
    assert a.numerator.data_ptr() != b.numerator.data_ptr()
    with torch.no_grad():
        a.numerator.add_(1.0)
    assert torch.equal(b.numerator, torch.tensor(first.numerator, dtype=torch.float32))
    assert coefficients("silu", 5, 4) == first
    assert len(first.numerator) == 6 and len(first.denominator) == 4


def test_wider_fit_range_is_used() -> None:
    act = RationalActivation(6, 5, fit_range=(-6.0, 6.0), dtype=torch.float64)
    x = torch.linspace(-6, 6, 4001, dtype=torch.float64)
    with torch.no_grad():
        err = (act(x) - F.gelu(x)).abs().max().item()
    assert err < 5e-3 and act.fit_range == (-6.0, 6.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        pytest.param({"name": "tanh"}, "init='tanh'", id="unknown-target"),
        pytest.param({"num_degree": 0}, "num_degree=0", id="num-degree"),
        pytest.param({"den_degree": 0}, "den_degree=0", id="den-degree"),
        pytest.param({"fit_range": (3.0, -3.0)}, "fit_range", id="range-order"),
        pytest.param({"fit_range": (-float("inf"), 3.0)}, "fit_range", id="range-inf"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        coefficients(**kwargs)
