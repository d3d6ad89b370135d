"""The learnable rational activation of IAPT's prompt generators, with a least-squares initialisation.

``R(x) = P(x) / (1 + |S(x)|)`` with ``P(x) = sum_{j=0..p} a_j x^j`` and ``S(x) = sum_{i=1..q} b_i x^i``: the "safe"
denominator (it is at least 1, so ``R`` has no poles). The coefficients start as a fit of GELU, ReLU or SiLU on a
range (default ``[-3, 3]``) and are trained with the rest of the generator; every instance owns its coefficients,
so each layer learns its own activation.

Outside the fit range a rational function of degree (p, q) grows like ``x^(p-q)`` and a fitted one can swing
far from its target (the 5/4 GELU fit gives R(6) = -2.3). :class:`RationalActivation` therefore continues
``R`` linearly beyond the range: with ``x_c = clamp(x, lo, hi)``,
``R_ext(x) = R(x_c) + R'(x_c) (x - x_c)``. Inside the range this is ``R`` exactly; at the edges it is continuous
with a continuous first derivative; outside it grows at most linearly (``|R_ext(x)| <= C (1 + |x|)``), like the
activations it imitates.

The fit runs once per (name, degrees, range) in float64 and is cached: a linear least-squares solve of
``P(x) - f(x) S(x) = f(x)``, then Levenberg-Marquardt steps on the true residual ``R(x) - f(x)`` (which has
the absolute value in it), reweighted by Lawson's rule to push the maximum error down rather than the mean.

We write the ~100 lines ourselves: the published packages (``rational-activations``, ``pau``) pin an old torch
and pull in plotting libraries.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from leanfit.core.errors import ConfigError, bad_value
from leanfit.iapt.config import RATIONAL_MAX_DEGREE, RATIONAL_MAX_RANGE

__all__ = ["FIT_TARGETS", "RationalActivation", "RationalCoefficients", "coefficients", "rational"]

FIT_TARGETS = ("gelu", "relu", "silu")
_FIT_POINTS = 2001
_LAWSON_ROUNDS = 8
_LM_STEPS = 10


class RationalCoefficients(NamedTuple):
    """Fitted coefficients: ``numerator`` = (a_0..a_p), ``denominator`` = (b_1..b_q), and the largest absolute
    error of the fit on its range (measured on the fit grid)."""

    numerator: tuple[float, ...]
    denominator: tuple[float, ...]
    max_error: float


_CACHE: dict[tuple[str, int, int, float, float], RationalCoefficients] = {}


def _target(name: str, x: Tensor) -> Tensor:
    return {"gelu": nn.functional.gelu, "relu": torch.relu, "silu": nn.functional.silu}[name](x)


def _horner(coeffs: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """``c(x) = sum_j coeffs[j] x^j`` and its derivative ``c'(x)``, elementwise over ``x``."""
    value = coeffs[-1] * torch.ones_like(x)
    deriv = torch.zeros_like(x)
    for j in range(coeffs.shape[0] - 2, -1, -1):
        deriv = deriv * x + value
        value = value * x + coeffs[j]
    return value, deriv


def _rational_and_slope(numerator: Tensor, denominator: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """``R(x)`` and ``R'(x)`` of the safe rational function."""
    p, dp = _horner(numerator, x)
    c, dc = _horner(denominator, x)  # S(x) = x c(x): denominator holds b_1..b_q
    s, ds = x * c, c + x * dc
    q = 1.0 + s.abs()
    dq = torch.sign(s) * ds
    return p / q, (dp * q - p * dq) / (q * q)


def rational(x: Tensor, numerator: Tensor, denominator: Tensor, fit_range: tuple[float, float]) -> Tensor:
    """The safe rational function, continued linearly outside ``fit_range``; any shape, elementwise.

    ``numerator``: (p + 1,) = a_0..a_p; ``denominator``: (q,) = b_1..b_q. NaN and infinities in ``x`` propagate
    elementwise, as in torch's activations (NaN stays NaN; +-inf gives the continuation's limit, or NaN where
    the slope at the edge is 0)."""
    _check_input(x)
    for name, coeffs in (("numerator", numerator), ("denominator", denominator)):
        if not isinstance(coeffs, Tensor):
            raise TypeError(bad_value(name, coeffs, f"a tensor, got {type(coeffs).__name__}",
                                      "pass the tensor of a RationalActivation or of coefficients()"))
        if coeffs.ndim != 1 or coeffs.shape[0] < 1 or not coeffs.is_floating_point():
            raise ConfigError(bad_value(f"{name}.shape", tuple(coeffs.shape), "a non-empty 1-D floating tensor "
                                        f"(got dtype {coeffs.dtype})", "numerator holds a_0..a_p, denominator "
                                        "b_1..b_q"))
    return _rational(x, numerator, denominator, _check_fit_range(fit_range))


def _rational(x: Tensor, numerator: Tensor, denominator: Tensor, fit_range: tuple[float, float]) -> Tensor:
    lo, hi = fit_range
    xc = x.clamp(lo, hi)
    value, slope = _rational_and_slope(numerator, denominator, xc)
    return value + slope * (x - xc)


def _check_input(x: Any) -> None:
    """``x`` is a real tensor (floating or integer; integers are promoted by the coefficients)."""
    if not isinstance(x, Tensor):
        raise TypeError(bad_value("x", x, f"a tensor, got {type(x).__name__}", "convert it with torch.as_tensor(x)"))
    if x.dtype == torch.bool or x.is_complex():
        raise ConfigError(bad_value("x.dtype", x.dtype, "a real dtype such as torch.float32", "convert it with "
                                    "x.float()"))


def _check_fit_range(fit_range: Any) -> tuple[float, float]:
    """``fit_range`` as two floats: a (lo, hi) pair of finite numbers, lo < hi, inside the fit's domain."""
    expected = f"(lo, hi): finite numbers with lo < hi inside [-{RATIONAL_MAX_RANGE:g}, {RATIONAL_MAX_RANGE:g}]"
    if not isinstance(fit_range, tuple | list):
        raise TypeError(bad_value("fit_range", fit_range, expected, "for example (-3, 3)"))
    if len(fit_range) != 2:
        raise ConfigError(bad_value("fit_range", fit_range, expected, "for example (-3, 3)"))
    if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in fit_range):
        raise TypeError(bad_value("fit_range", fit_range, expected, "for example (-3, 3)"))
    lo, hi = float(fit_range[0]), float(fit_range[1])
    if not (math.isfinite(lo) and math.isfinite(hi) and -RATIONAL_MAX_RANGE <= lo < hi <= RATIONAL_MAX_RANGE):
        raise ConfigError(bad_value("fit_range", fit_range, expected, "for example (-3, 3)"))
    return lo, hi


def _check_degree(param: str, value: Any, usual: str) -> int:
    expected = f"an integer in [1, {RATIONAL_MAX_DEGREE}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(bad_value(param, value, f"{expected}, got {type(value).__name__}", f"{usual} are usual"))
    if not 1 <= int(value) <= RATIONAL_MAX_DEGREE:
        raise ConfigError(bad_value(param, value, expected, f"{usual} are usual"))
    return int(value)


def _check_target(name: Any) -> str:
    if not isinstance(name, str):
        raise TypeError(bad_value("init", name, "one of " + ", ".join(FIT_TARGETS)))
    if name not in FIT_TARGETS:
        raise ConfigError(bad_value("init", name, "one of " + ", ".join(FIT_TARGETS)))
    return name


def _lm_steps(theta: Tensor, p: int, x: Tensor, y: Tensor, w: Tensor, steps: int) -> Tensor:
    """Levenberg-Marquardt on ``sum w (R(x) - y)^2`` over ``theta = (a_0..a_p, b_1..b_q)``; float64."""
    powers_a = x[:, None] ** torch.arange(p + 1, dtype=x.dtype)
    powers_b = x[:, None] ** torch.arange(1, theta.shape[0] - p, dtype=x.dtype)
    sw = w.sqrt()

    def residual(t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        num, s = powers_a @ t[: p + 1], powers_b @ t[p + 1 :]
        return num, s, (num / (1 + s.abs()) - y) * sw

    damping = 1e-3
    for _ in range(steps):
        num, s, r = residual(theta)
        q = 1 + s.abs()
        jac = torch.cat([powers_a / q[:, None], -(num * torch.sign(s) / q**2)[:, None] * powers_b], 1) * sw[:, None]
        jtj, grad, loss = jac.T @ jac, jac.T @ r, r.square().sum()
        while damping < 1e12:
            step = torch.linalg.solve(jtj + damping * torch.diag(jtj.diagonal()), -grad)
            if residual(theta + step)[2].square().sum() < loss:
                theta, damping = theta + step, damping * 0.3
                break
            damping *= 10
    return theta


def _fit(name: str, p: int, q: int, lo: float, hi: float) -> RationalCoefficients:
    x = torch.linspace(lo, hi, _FIT_POINTS, dtype=torch.float64)
    y = _target(name, x)
    design = torch.cat([x[:, None] ** torch.arange(p + 1), -y[:, None] * x[:, None] ** torch.arange(1, q + 1)], 1)
    theta = torch.linalg.lstsq(design, y[:, None], driver="gelsd").solution[:, 0]
    weights = torch.full_like(x, 1.0 / x.numel())
    best, best_err = theta, math.inf
    for _ in range(_LAWSON_ROUNDS):
        theta = _lm_steps(theta, p, x, y, weights, _LM_STEPS)
        err = (_rational(x, theta[: p + 1], theta[p + 1 :], (lo, hi)) - y).abs()
        if err.max().item() < best_err:
            best, best_err = theta, err.max().item()
        weights = weights * err  # Lawson: weight the points where the error is large
        weights = weights / weights.sum()
    return RationalCoefficients(tuple(best[: p + 1].tolist()), tuple(best[p + 1 :].tolist()), best_err)


def coefficients(name: str = "gelu", num_degree: int = 5, den_degree: int = 4,
                 fit_range: tuple[float, float] = (-3.0, 3.0)) -> RationalCoefficients:
    """Coefficients of the safe rational function fitted to ``name`` ("gelu" | "relu" | "silu") on ``fit_range``.

    Computed in float64 on the first call and cached per (name, degrees, range). Degrees are at most
    ``RATIONAL_MAX_DEGREE`` and the range inside ``[-RATIONAL_MAX_RANGE, RATIONAL_MAX_RANGE]``; a range on which
    the fit is singular (e.g. narrower than float64 resolves) is a ValueError."""
    name = _check_target(name)
    num_degree = _check_degree("num_degree", num_degree, "5 (PAU) or 6 (MiLoRA)")
    den_degree = _check_degree("den_degree", den_degree, "4 (PAU) or 5 (MiLoRA)")
    lo, hi = _check_fit_range(fit_range)
    key = (name, num_degree, den_degree, lo, hi)
    if key not in _CACHE:
        try:
            fit = _fit(name, num_degree, den_degree, lo, hi)
        except torch.linalg.LinAlgError as exc:
            raise ConfigError(bad_value("fit_range", fit_range, "a range on which the least-squares fit is "
                                        f"well posed (it is singular: {str(exc).splitlines()[0]})",
                                        "use a wider range such as (-3, 3), or lower degrees")) from None
        if not all(math.isfinite(v) for v in (*fit.numerator, *fit.denominator, fit.max_error)):
            raise ConfigError(bad_value("fit_range", fit_range, "a range on which the fit is finite",
                                        "use a range such as (-3, 3), or lower degrees"))
        _CACHE[key] = fit
    return _CACHE[key]


class RationalActivation(nn.Module):
    """Learnable rational activation ``P(x) / (1 + |S(x)|)``, linear beyond ``fit_range``; elementwise.

    ``numerator`` (num_degree + 1,) and ``denominator`` (den_degree,) are this instance's own parameters,
    initialised from :func:`coefficients`."""

    def __init__(self, num_degree: int = 5, den_degree: int = 4, init: str = "gelu",
                 fit_range: tuple[float, float] = (-3.0, 3.0), *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(bad_value("dtype", dtype, "a torch.dtype such as torch.float32"))
        if dtype is not None and not dtype.is_floating_point:
            raise ConfigError(bad_value("dtype", dtype, "a floating dtype", "use torch.float32 or torch.float64"))
        fit = coefficients(init, num_degree, den_degree, fit_range)
        self.init, self.fit_range = init, _check_fit_range(fit_range)
        kw: dict[str, Any] = {"dtype": dtype or torch.get_default_dtype(), "device": device}
        largest = max(map(abs, (*fit.numerator, *fit.denominator)))
        if largest >= torch.finfo(kw["dtype"]).max:  # checked on the floats: no device sync, works on "meta"
            raise ConfigError(bad_value("dtype", kw["dtype"], f"a dtype that holds the fitted coefficients (the "
                                        f"largest is {largest:.3g})", "use torch.float32 or torch.float64, or a "
                                        "wider fit_range"))
        self.numerator = nn.Parameter(torch.tensor(fit.numerator, **kw))
        self.denominator = nn.Parameter(torch.tensor(fit.denominator, **kw))

    @property
    def degrees(self) -> tuple[int, int]:
        return self.numerator.shape[0] - 1, self.denominator.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        """``R_ext(x)`` elementwise, any shape; NaN and infinities propagate as in :func:`rational`."""
        _check_input(x)
        return _rational(x, self.numerator, self.denominator, self.fit_range)

    def extra_repr(self) -> str:
        p, q = self.degrees
        return f"degrees=({p}, {q}), init={self.init!r}, fit_range={self.fit_range}"
