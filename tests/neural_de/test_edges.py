"""Edge inputs at the boundary of every public neural_de function: one parametrized test per kind of bad input
(the exception type and a message fragment naming the parameter), the reference results of valid edge inputs
(empty batches, negative steps), the float32 precision warning, the Brownian path's values against the naive
algorithm it replaced and its linear cost, and a property test of ``solve`` on ``dy/dt = a y``."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from leanfit.neural_de import solver as solver_module
from leanfit.neural_de.models import ConcatTanhMLP, NeuralODEClassifier, NeuralSDEClassifier, sde_local_regularizer
from leanfit.neural_de.regularizers import (
    global_regularizer,
    local_regularizer,
    regularize_solution,
    sample_times,
    with_times,
)
from leanfit.neural_de.sde import BrownianPath, sde_solve, sde_step
from leanfit.neural_de.solver import PIController, solve
from leanfit.neural_de.step import as_batch_time, batch_view, error_ratio, initial_step_size, rk_step
from leanfit.neural_de.tableaus import TSIT5, check_tableau, get_tableau
from tests.errors import assert_user_error
from tests.reference import tsit5_step_reference
from tests.tolerances import assert_close

F64 = torch.float64
NAN, INF = float("nan"), float("inf")
Y = torch.ones(2, 3, dtype=F64)


def _decay(t: Tensor, y: Tensor) -> Tensor:
    return -y


def _noise(t: Tensor, y: Tensor) -> Tensor:
    return 0.1 * y


def _raises(exc: type[Exception], fragments: str | tuple[str, ...], call: Callable[[], Any]) -> None:
    assert_user_error(exc, fragments, call, expected=True)


# --- bad inputs, one test per function family ---


@pytest.mark.parametrize(
    ("kwargs", "exc", "fragment"),
    [
        pytest.param({"rtol": INF}, ValueError, "rtol=inf", id="rtol-inf"),
        pytest.param({"rtol": -1e-6}, ValueError, "rtol=-1e-06", id="rtol-negative"),
        pytest.param({"rtol": True}, ValueError, "rtol=True", id="rtol-bool"),
        pytest.param({"rtol": "1e-6"}, ValueError, "rtol='1e-6'", id="rtol-str"),
        pytest.param({"atol": NAN}, ValueError, "atol=nan", id="atol-nan"),
        pytest.param({"atol": INF}, ValueError, "atol=inf", id="atol-inf"),
        pytest.param({"t_eval": [NAN, 1.0]}, ValueError, "t_eval=", id="t0-nan"),
        pytest.param({"t_eval": [0.0, INF]}, ValueError, "t_eval=", id="t1-inf"),
        pytest.param({"t_eval": [-INF, 0.0]}, ValueError, "t_eval=", id="t0-minus-inf"),
        pytest.param({"t_eval": "01"}, TypeError, "t_eval='01'", id="t-eval-str"),
        pytest.param({"y0": [[1.0, 2.0]]}, TypeError, "y0=", id="y0-list"),
        pytest.param({"y0": torch.ones(2, 3, dtype=torch.complex128)}, ValueError, "y0=", id="y0-complex"),
        pytest.param({"max_steps": True}, ValueError, "max_steps=True", id="max-steps-bool"),
        pytest.param({"max_steps": 10.5}, ValueError, "max_steps=10.5", id="max-steps-float"),
        pytest.param({"h0": NAN}, ValueError, "h0=nan", id="h0-nan"),
        pytest.param({"h0": 0.0}, ValueError, "h0=0.0", id="h0-zero"),
        pytest.param({"h0": torch.tensor([0.1, 0.1, 0.1])}, ValueError, "h0.shape=(3,)", id="h0-shape"),
        pytest.param({"method": ["tsit5"]}, TypeError, "method=['tsit5']", id="method-list"),
        pytest.param({"f": 3}, TypeError, "f=3", id="f-not-callable"),
        pytest.param({"controller": "pi"}, TypeError, "controller='pi'", id="controller-type"),
        pytest.param({"per_sample": "no"}, TypeError, "per_sample='no'", id="per-sample-str"),
        pytest.param({"record_steps": None}, TypeError, "record_steps=None", id="record-steps-none"),
    ],
)
def test_solve_rejects(kwargs: dict, exc: type[Exception], fragment: str) -> None:
    args = {"f": _decay, "y0": Y, "t_eval": [0.0, 1.0]} | kwargs
    _raises(exc, fragment, lambda: solve(**args))


@pytest.mark.parametrize(
    ("kwargs", "exc", "fragment"),
    [
        pytest.param({"h": NAN}, ValueError, "h=nan", id="h-nan"),
        pytest.param({"h": INF}, ValueError, "h=inf", id="h-inf"),
        pytest.param({"h": -INF}, ValueError, "h=-inf", id="h-minus-inf"),
        pytest.param({"h": torch.tensor([0.1, NAN], dtype=F64)}, ValueError, "h=", id="h-per-sample-nan"),
        pytest.param({"h": "0.1"}, TypeError, "h='0.1'", id="h-str"),
        pytest.param({"t": NAN}, ValueError, "t=nan", id="t-nan"),
        pytest.param({"t": torch.tensor([0.0, INF], dtype=F64)}, ValueError, "t=", id="t-per-sample-inf"),
        pytest.param({"y": torch.tensor([[1.0, NAN]], dtype=F64)}, ValueError, "y=", id="y-nan"),
        pytest.param({"y": torch.ones(2, 3, dtype=torch.long)}, ValueError, "y=", id="y-integer"),
        pytest.param({"y": torch.tensor(1.0)}, ValueError, "y=", id="y-0d"),
        pytest.param({"y": [[1.0]]}, TypeError, "y=", id="y-list"),
        pytest.param({"f": None}, TypeError, "f=None", id="f-none"),
        pytest.param({"tableau": "rk4"}, ValueError, "method='rk4'", id="tableau-name"),
        pytest.param({"k1": torch.ones(2, 1, dtype=F64)}, ValueError, "k1.shape=(2, 1)", id="k1-shape"),
    ],
)
def test_rk_step_rejects(kwargs: dict, exc: type[Exception], fragment: str) -> None:
    args = {"f": _decay, "t": 0.0, "y": Y, "h": 0.1} | kwargs
    _raises(exc, fragment, lambda: rk_step(**args))


@pytest.mark.parametrize(
    ("call", "exc", "fragment"),
    [
        pytest.param(lambda: error_ratio(Y, Y, Y, NAN, 1e-8), ValueError, "rtol=nan", id="error-ratio-rtol-nan"),
        pytest.param(lambda: error_ratio(Y, Y[:, :1], Y, 1e-6, 1e-8), ValueError, "y0.shape=(2, 1)",
                     id="error-ratio-shape"),
        pytest.param(lambda: error_ratio([1.0], Y, Y, 1e-6, 1e-8), TypeError, "error=", id="error-ratio-not-tensor"),
        pytest.param(lambda: error_ratio(Y, Y, Y, 1e-6, 1e-8, norm="l2"), ValueError, "norm='l2'",
                     id="error-ratio-norm"),
        pytest.param(lambda: initial_step_size(_decay, 0.0, Y, 1e-6, 1e-8, order=0), ValueError, "order=0",
                     id="initial-step-order-zero"),
        pytest.param(lambda: initial_step_size(_decay, 0.0, Y, 1e-6, 1e-8, order=4.5), ValueError, "order=4.5",
                     id="initial-step-order-float"),
        pytest.param(lambda: initial_step_size(_decay, NAN, Y, 1e-6, 1e-8, order=5), ValueError, "t0=nan",
                     id="initial-step-t0-nan"),
        pytest.param(lambda: initial_step_size(_decay, 0.0, Y * NAN, 1e-6, 1e-8, order=5), ValueError, "y0=",
                     id="initial-step-y0-nan"),
        pytest.param(lambda: initial_step_size(_decay, 0.0, Y, 1e-6, 1e-8, order=5, f0=Y[:, :1]), ValueError,
                     "f0.shape=(2, 1)", id="initial-step-f0-shape"),
    ],
)
def test_step_helpers_reject(call: Callable[[], Any], exc: type[Exception], fragment: str) -> None:
    _raises(exc, fragment, call)


def _sde_step_args(**kwargs: Any) -> dict[str, Any]:
    return {"drift": _decay, "diffusion": _noise, "t": 0.0, "y": Y, "h": 0.1} | kwargs


@pytest.mark.parametrize(
    ("kwargs", "exc", "fragment"),
    [
        pytest.param({"h": NAN, "dw": (Y * 0, Y * 0), "scheme": "euler"}, ValueError, "h=nan", id="h-nan-euler"),
        pytest.param({"h": INF}, ValueError, "h=inf", id="h-inf"),
        pytest.param({"t": NAN}, ValueError, "t=nan", id="t-nan"),
        pytest.param({"y": Y * NAN}, ValueError, "y=", id="y-nan"),
        pytest.param({"y": torch.ones(2, 3, dtype=torch.long)}, ValueError, "y=", id="y-integer"),
        pytest.param({"dw": (Y * NAN, Y * 0)}, ValueError, "dw=", id="dw-nan"),
        pytest.param({"drift": "f"}, TypeError, "drift='f'", id="drift-not-callable"),
        pytest.param({"generator": 3}, TypeError, "generator=3", id="generator-type"),
    ],
)
def test_sde_step_rejects(kwargs: dict, exc: type[Exception], fragment: str) -> None:
    _raises(exc, fragment, lambda: sde_step(**_sde_step_args(**kwargs)))


@pytest.mark.parametrize(
    ("kwargs", "exc", "fragment"),
    [
        pytest.param({"rtol": NAN}, ValueError, "rtol=nan", id="rtol-nan"),
        pytest.param({"atol": -1.0}, ValueError, "atol=-1.0", id="atol-negative"),
        pytest.param({"dt0": NAN}, ValueError, "dt0=nan", id="dt0-nan"),
        pytest.param({"t_eval": [0.0, NAN]}, ValueError, "t_eval=", id="t1-nan"),
        pytest.param({"generator": 42}, TypeError, "generator=42", id="generator-type"),
        pytest.param({"brownian": "path"}, TypeError, "brownian='path'", id="brownian-type"),
        pytest.param({"diffusion": None}, TypeError, "diffusion=None", id="diffusion-not-callable"),
        pytest.param({"adaptive": "yes"}, TypeError, "adaptive='yes'", id="adaptive-str"),
        pytest.param({"y0": [[1.0]]}, TypeError, "y0=", id="y0-list"),
    ],
)
def test_sde_solve_rejects(kwargs: dict, exc: type[Exception], fragment: str) -> None:
    args = {"drift": _decay, "diffusion": _noise, "y0": Y, "t_eval": [0.0, 1.0]} | kwargs
    _raises(exc, fragment, lambda: sde_solve(**args))


@pytest.mark.parametrize(
    ("call", "exc", "fragment"),
    [
        pytest.param(lambda: BrownianPath(0.0, Y, generator=1), TypeError, "generator=1", id="generator-type"),
        pytest.param(lambda: BrownianPath(0.0, Y, keep_history="yes"), TypeError, "keep_history='yes'",
                     id="keep-history-str"),
        pytest.param(lambda: BrownianPath(INF, Y), ValueError, "t0=inf", id="t0-inf"),
        pytest.param(lambda: BrownianPath(0.0, Y)(INF), ValueError, "s=inf", id="s-inf"),
        pytest.param(lambda: BrownianPath(0.0, Y)("1.0"), TypeError, "s='1.0'", id="s-str"),
        pytest.param(lambda: BrownianPath(0.0, Y).forget_before(NAN), ValueError, "t=nan", id="forget-nan"),
    ],
)
def test_brownian_rejects(call: Callable[[], Any], exc: type[Exception], fragment: str) -> None:
    _raises(exc, fragment, call)


def _recorded() -> Any:
    return solve(_decay, Y, [0.0, 1.0], record_steps=True)


@pytest.mark.parametrize(
    ("call", "exc", "fragment"),
    [
        pytest.param(lambda: local_regularizer(_decay, 0.0, Y, rtol=INF), ValueError, "rtol=inf", id="local-rtol-inf"),
        pytest.param(lambda: local_regularizer(_decay, 0.0, Y, step=NAN), ValueError, "step=nan", id="local-step-nan"),
        pytest.param(lambda: local_regularizer(_decay, NAN, Y), ValueError, "t_r=nan", id="local-t-nan"),
        pytest.param(lambda: local_regularizer(_decay, 0.0, Y[:0]), ValueError, "y_r=", id="local-empty"),
        pytest.param(lambda: local_regularizer(1.0, 0.0, Y), TypeError, "f=1.0", id="local-f-not-callable"),
        pytest.param(lambda: sample_times(-INF, INF, 2), ValueError, "(t0, t1)=(-inf, inf)", id="sample-infinite"),
        pytest.param(lambda: sample_times(NAN, 1.0, 2), ValueError, "(t0, t1)=(nan, 1.0)", id="sample-nan"),
        pytest.param(lambda: sample_times(0.0, 1.0, 2, generator="g"), TypeError, "generator='g'",
                     id="sample-generator"),
        pytest.param(lambda: with_times([0.0, 1.0], torch.tensor([NAN])), ValueError, "t_r=", id="with-times-nan"),
        pytest.param(lambda: with_times([0.0, NAN, 1.0], torch.tensor([0.5])), ValueError, "t_eval=",
                     id="with-times-t-eval-nan"),
        pytest.param(lambda: global_regularizer("sol"), TypeError, "sol='sol'", id="global-not-solution"),
        pytest.param(lambda: regularize_solution(_decay, None), TypeError, "sol=None", id="regularize-not-solution"),
        pytest.param(lambda: regularize_solution(_decay, _recorded(), rtol=NAN, step="taken", points="sample"),
                     ValueError, "rtol=nan", id="regularize-rtol-nan"),
    ],
)
def test_regularizers_reject(call: Callable[[], Any], exc: type[Exception], fragment: str) -> None:
    _raises(exc, fragment, call)


def _ode() -> NeuralODEClassifier:
    torch.manual_seed(0)
    return NeuralODEClassifier(4, 3, 2)


def _sde() -> NeuralSDEClassifier:
    torch.manual_seed(0)
    return NeuralSDEClassifier(4, latent=3, hidden=3, n_classes=2)


@pytest.mark.parametrize(
    ("call", "exc", "fragment"),
    [
        pytest.param(lambda: ConcatTanhMLP(4, 3)(0.0, torch.ones(2, 4, dtype=torch.long)), ValueError, "y=",
                     id="mlp-y-integer"),
        pytest.param(lambda: ConcatTanhMLP(4, 3, time_dependent="no"), TypeError, "time_dependent='no'",
                     id="mlp-time-dependent-str"),
        pytest.param(lambda: NeuralODEClassifier(4, 3, 2, rtol=NAN), ValueError, "rtol=nan", id="ode-rtol-nan"),
        pytest.param(lambda: NeuralODEClassifier(4, 3, 2, t1=INF), ValueError, "t1=inf", id="ode-t1-inf"),
        pytest.param(lambda: _ode()(torch.full((2, 4), NAN)), ValueError, "x=", id="ode-x-nan"),
        pytest.param(lambda: _ode()(torch.ones(2, 4, dtype=torch.long)), ValueError, "x.shape=", id="ode-x-integer"),
        pytest.param(lambda: _ode()(torch.ones(0, 4), "local"), ValueError, "x=", id="ode-empty-with-regularizer"),
        pytest.param(lambda: _sde()(torch.full((2, 4), INF)), ValueError, "x=", id="sde-x-inf"),
        pytest.param(lambda: NeuralSDEClassifier(4, rtol=0.0), ValueError, "rtol=0.0", id="sde-rtol-zero"),
        pytest.param(lambda: sde_local_regularizer(_decay, _noise, "sol"), TypeError, "sol='sol'",
                     id="sde-regularizer-not-solution"),
    ],
)
def test_models_reject(call: Callable[[], Any], exc: type[Exception], fragment: str) -> None:
    _raises(exc, fragment, call)


@pytest.mark.parametrize(
    ("call", "exc", "fragment"),
    [
        pytest.param(lambda: get_tableau(["tsit5"]), TypeError, "method=['tsit5']", id="get-unhashable"),
        pytest.param(lambda: get_tableau("rk4"), ValueError, "method='rk4'", id="get-unknown"),
        pytest.param(lambda: check_tableau("tsit5"), TypeError, "tableau='tsit5'", id="check-not-tableau"),
        pytest.param(lambda: check_tableau(TSIT5, tol=NAN), ValueError, "tol=nan", id="check-tol-nan"),
        pytest.param(lambda: check_tableau(TSIT5, tol=-1.0), ValueError, "tol=-1.0", id="check-tol-negative"),
        pytest.param(lambda: PIController(beta1=NAN, beta2=0.04), ValueError, "beta1=nan", id="pi-beta1-nan"),
        pytest.param(lambda: PIController(0.17, 0.04, safety=0.0), ValueError, "safety=0.0", id="pi-safety-zero"),
        pytest.param(lambda: PIController(0.17, 0.04, factor_min=2.0), ValueError, "factor_min=2.0",
                     id="pi-factor-min-above-1"),
        pytest.param(lambda: PIController.for_tableau("tsit5"), TypeError, "tableau='tsit5'", id="pi-for-name"),
    ],
)
def test_tableaus_and_controller_reject(call: Callable[[], Any], exc: type[Exception], fragment: str) -> None:
    _raises(exc, fragment, call)


# --- valid edge inputs give the reference result ---


@pytest.mark.parametrize("record_steps", [False, True], ids=["plain", "recorded"])
@pytest.mark.parametrize("per_sample", [True, False], ids=["per-sample", "joint"])
def test_solve_empty_batch(per_sample: bool, record_steps: bool) -> None:
    """0 rows: an empty result shaped (0, T, *state), f never called, every count 0."""
    calls = []

    def f(t: Tensor, y: Tensor) -> Tensor:
        calls.append(1)
        return -y

    y0 = torch.ones(0, 2, 3, dtype=torch.float32)
    sol = solve(f, y0, [0.0, 0.5, 1.0], per_sample=per_sample, record_steps=record_steps)
    assert sol.ys.shape == (0, 3, 2, 3) and sol.ys.dtype == torch.float32
    assert sol.ts.tolist() == [0.0, 0.5, 1.0] and not calls
    st_ = sol.stats
    assert (st_.nfe_joint, st_.n_attempts) == (0, 0)
    for counts in (st_.nfe, st_.n_accepted, st_.n_rejected):
        assert counts.shape == (0,) and counts.dtype == torch.int64
    assert st_.step_t.shape == st_.step_h.shape == (0, 0) and st_.step_t.dtype == F64
    if record_steps:
        assert st_.step_error is not None and st_.step_error.shape == (0, 0)
        assert st_.step_y is not None and st_.step_y.shape == (0, 0, 2, 3)
    else:
        assert st_.step_error is None and st_.step_y is None


@pytest.mark.parametrize("adaptive", [True, False], ids=["adaptive", "fixed"])
def test_sde_solve_empty_batch(adaptive: bool) -> None:
    sol = sde_solve(_decay, _noise, torch.ones(0, 3, dtype=F64), [0.0, 1.0], dt0=0.1, adaptive=adaptive)
    assert sol.ys.shape == (0, 2, 3) and sol.stats.nfe.shape == (0,) and sol.stats.nfe_joint == 0
    assert sol.stats.step_t.shape == (0, 0)


def test_ode_classifier_empty_batch_without_regularizer() -> None:
    out = _ode()(torch.ones(0, 4))
    assert out.logits.shape == (0, 2) and out.nfe.shape == (0,) and out.nfe_joint == 0


@pytest.mark.parametrize("h", [-0.1, -0.3, 0.2], ids=["back-0.1", "back-0.3", "forward-0.2"])
def test_rk_step_negative_h_is_backward_integration(h: float) -> None:
    """A negative step integrates backwards: the same arithmetic as the naive reference, and y0 exp(a h) to the
    method's local error (|a h|^6 / 720 for a 5th-order step)."""
    a = torch.tensor([[-0.7], [1.3]], dtype=F64)

    def f(t: Tensor, y: Tensor) -> Tensor:
        return a * y

    y = torch.tensor([[1.0], [2.0]], dtype=F64)
    res = rk_step(f, 1.0, y, h)
    for i in range(2):
        ref_y, ref_err, _, _ = tsit5_step_reference(lambda t, yi, i=i: a[i : i + 1] * yi, 1.0, y[i : i + 1], h)
        assert_close(res.y_next[i : i + 1], ref_y)
        assert_close(res.error_estimate[i : i + 1], ref_err)
    exact = y * torch.exp(a * h)
    assert float((res.y_next - exact).abs().max()) <= float((a * h).abs().max()) ** 6


def test_rk_step_zero_h_and_empty_batch() -> None:
    res = rk_step(_decay, 0.0, Y, 0.0)
    assert torch.equal(res.y_next, Y) and float(res.error_estimate.abs().max()) == 0.0
    empty = rk_step(_decay, 0.0, Y[:0], 0.1)
    assert empty.y_next.shape == (0, 3) and len(empty.stages) == TSIT5.stages


def test_brownian_empty_batch() -> None:
    path = BrownianPath(0.0, torch.zeros(0, 2))
    assert path(1.0).shape == (0, 2) and path.n_known.shape == (0,)
    path.forget_before(0.5)


def test_float32_tiny_rtol_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """rtol below 8 float32 eps (~9.5e-7) warns once per process and dtype; float64, the default rtol=1e-6 and a
    large atol do not warn. The numbers are those of a solve without the warning."""
    monkeypatch.setattr(solver_module, "_WARNED_PRECISION", set())
    y0 = torch.ones(1, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        solve(_decay, y0, [0.0, 1.0])  # default rtol=1e-6: fine in float32
        solve(_decay, y0.double(), [0.0, 1.0], rtol=1e-9)
        solve(_decay, y0, [0.0, 1.0], rtol=1e-9, atol=1e-3)  # atol dominates the tolerance
    with pytest.warns(solver_module.PrecisionWarning, match=r"rtol=1e-09 .*float32.*float64.*rtol >= 9\.5"):
        first = solve(_decay, y0, [0.0, 1.0], rtol=1e-9, atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = solve(_decay, y0, [0.0, 1.0], rtol=1e-9, atol=1e-12)
    assert torch.equal(first.ys, again.ys) and issubclass(solver_module.PrecisionWarning, UserWarning)


# --- BrownianPath: the naive algorithm it replaced, and linear cost ---


class NaiveBrownianPath:
    """The previous BrownianPath, verbatim in its algorithm: every query scans all known points of every sample
    (O(K) per query, so O(n^2) over a solve with keep_history=True); free slots are reused after forget_before."""

    def __init__(self, t0: float | Tensor, like: Tensor, generator: torch.Generator | None = None,
                 keep_history: bool = False) -> None:
        self.shape, self.device = tuple(like.shape), like.device
        self.generator, self.keep_history = generator, keep_history
        self._t = as_batch_time(t0, like.shape[0], "t0", like.device).clone()[:, None]
        self._w = torch.zeros(self.shape[0], 1, *self.shape[1:], dtype=F64, device=like.device)

    @property
    def n_known(self) -> Tensor:
        return torch.isfinite(self._t).sum(1)

    @torch.no_grad()
    def __call__(self, s: float | Tensor) -> Tensor:
        s = as_batch_time(s, self.shape[0], "s", self.device)
        t, rows = self._t, torch.arange(self.shape[0], device=self.device)
        left_t, li = torch.where(t <= s[:, None], t, float("-inf")).max(1)
        assert torch.isfinite(left_t).all() and torch.isfinite(s).all()
        right_t, ri = torch.where(t >= s[:, None], t, float("inf")).min(1)
        w_left, w_right = self._w[rows, li], self._w[rows, ri]
        new = left_t < s
        bridge = new & torch.isfinite(right_t)
        span = torch.where(bridge, right_t - left_t, 1.0)
        frac = torch.where(bridge, (s - left_t) / span, 0.0)
        var = torch.where(bridge, (s - left_t) * (right_t - s) / span, s - left_t)
        z = torch.randn(self.shape, generator=self.generator, dtype=F64, device=self.device)
        value = w_left + batch_view(frac, w_left) * (w_right - w_left) + batch_view(var.sqrt(), z) * z
        free = torch.isinf(self._t)
        if (new & ~free.any(1)).any():
            k = self._t.shape[1]
            self._t = torch.cat([self._t, self._t.new_full((self.shape[0], k), float("inf"))], 1)
            self._w = torch.cat([self._w, torch.zeros_like(self._w)], 1)
            free = torch.isinf(self._t)
        rows = new.nonzero().squeeze(1)
        slot = free.to(torch.int8).argmax(1)[rows]
        self._t[rows, slot] = s[rows]
        self._w[rows, slot] = value[rows]
        return value

    def forget_before(self, t: float | Tensor) -> None:
        if not self.keep_history:
            t_b = as_batch_time(t, self.shape[0], "t", self.device)
            self._t = torch.where(self._t < t_b[:, None], float("inf"), self._t)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _queries(keep: bool) -> list[tuple[str, Any]]:
    """Forward increments, bridges, repeats, per-sample times and (with history) queries far in the past."""
    per = torch.tensor([0.3, 2.5, 0.7], dtype=F64)
    out: list[tuple[str, Any]] = [("q", 1.0), ("q", 0.5), ("q", per), ("q", 0.5), ("q", 0.75), ("q", 3.0)]
    out += [("forget", 0.7), ("q", 0.9), ("q", torch.tensor([0.95, 2.9, 0.8], dtype=F64)), ("q", 2.75)]
    out += [("forget", torch.tensor([1.0, 2.6, 0.9], dtype=F64)), ("q", torch.tensor([1.5, 2.8, 1.5], dtype=F64))]
    out += [("q", 4.0)]
    if keep:
        out += [("q", 0.1), ("q", 0.05), ("q", per / 2), ("q", 0.5), ("q", 3.5)]
    return out + [("q", 0.25 * k + 4.0) for k in range(40)] + [("q", 0.125 * k + 4.0) for k in range(1, 60, 2)]


@pytest.mark.parametrize("keep", [False, True], ids=["forgetting", "keep-history"])
def test_brownian_values_match_naive_reference(keep: bool) -> None:
    """Bit for bit the values of the naive algorithm for a fixed seed, and the same number of stored points."""
    like = torch.zeros(3, 2)
    fast, naive = BrownianPath(0.0, like, _gen(7), keep_history=keep), NaiveBrownianPath(0.0, like, _gen(7), keep)
    for i, (op, arg) in enumerate(_queries(keep)):
        if op == "forget":
            fast.forget_before(arg)
            naive.forget_before(arg)
        else:
            a, b = fast(arg), naive(arg)
            assert torch.equal(a, b), f"query {i} at {arg}: worst {float((a - b).abs().max())}"
        assert torch.equal(fast.n_known, naive.n_known), f"after step {i}: {fast.n_known} != {naive.n_known}"


@pytest.mark.parametrize("per_sample", [True, False], ids=["per-sample", "joint"])
def test_sde_solve_with_history_matches_naive_path(per_sample: bool) -> None:
    """A solve on the new path equals the one on the naive path bit for bit; afterwards both give the same values
    at times the solver passed (history) and at fresh ones."""
    y0 = torch.tensor([[1.0, 0.5], [0.2, -1.0], [2.0, 0.0]], dtype=F64)
    paths = [BrownianPath(0.0, y0, _gen(3), keep_history=True), NaiveBrownianPath(0.0, y0, _gen(3), True)]
    sols = [sde_solve(_decay, _noise, y0, [0.0, 0.5, 1.0], brownian=p, rtol=1e-3, atol=1e-3,
                      per_sample=per_sample) for p in paths]
    assert torch.equal(sols[0].ys, sols[1].ys) and torch.equal(sols[0].stats.nfe, sols[1].stats.nfe)
    assert sols[0].stats.n_accepted.min() > 10
    for s in (0.123, 0.5, 0.77, 1.5, 0.0):
        assert torch.equal(paths[0](s), paths[1](s))


class _OutputElements(TorchDispatchMode):
    """Counts the elements every non-aliasing ATen op writes: a deterministic measure of work (no timing)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if not any(r.alias_info is not None for r in func._schema.returns):  # views and in-place writes excluded
            self.count += sum(x.numel() for x in tree_leaves(out) if isinstance(x, Tensor))
        return out


def _solver_pattern_work(n_steps: int, forget: bool) -> int:
    """Work of ``n_steps`` steps of the SDE solver's query pattern (end point, midpoint) with keep_history=True."""
    path = BrownianPath(0.0, torch.zeros(4, 2), _gen(0), keep_history=True)
    with _OutputElements() as counter:
        t = 0.0
        for _ in range(n_steps):
            path(t + 0.01)
            path(t + 0.005)
            t += 0.01
            if forget:
                path.forget_before(t)
    assert path.n_known.tolist() == [2 * n_steps + 1] * 4  # everything kept
    return counter.count


@pytest.mark.parametrize("forget", [True, False], ids=["solver", "no-forget"])
def test_brownian_history_work_is_linear(forget: bool) -> None:
    """Doubling the steps about doubles the work (2.0; the naive path's per-query scan of every point gives 3.7 at
    these sizes); the bound 3 leaves room for a capacity doubling landing in one run and not the other."""
    small, large = _solver_pattern_work(50, forget), _solver_pattern_work(100, forget)
    assert large / small < 3.0, f"work {small} -> {large} (ratio {large / small:.2f}) for 50 -> 100 steps"


# --- property test: solve on dy/dt = a y ---

_BAD = st.sampled_from([NAN, INF, -INF, -1e-6, 0.0])


@settings(max_examples=30, deadline=None)
@given(a=st.floats(-2.0, 2.0), y0=st.one_of(st.floats(-10.0, 10.0), st.sampled_from([NAN, INF])),
       t0=st.one_of(st.floats(-5.0, 5.0), st.sampled_from([NAN, -INF])),
       span=st.one_of(st.floats(0.01, 3.0), st.sampled_from([0.0, -1.0, INF, NAN])),
       rtol=st.one_of(st.floats(1e-10, 1e-3), _BAD))
def test_solve_linear_ode_property(a: float, y0: float, t0: float, span: float, rtol: float) -> None:
    """Either a ValueError/TypeError (exactly when an input is invalid) or a finite result matching
    y0 exp(a (t1 - t0)) within 50 (rtol |y| + atol): the global error of a linear problem over |a (t1 - t0)| <= 6."""
    t1 = t0 + span
    valid = all(math.isfinite(v) for v in (y0, t0, t1, rtol)) and rtol > 0 and t1 > t0
    atol = 1e-12
    try:
        sol = solve(lambda t, v: a * v, torch.tensor([[y0]], dtype=F64), [t0, t1], rtol=rtol, atol=atol)
    except (ValueError, TypeError) as err:
        assert not valid, f"valid input refused: {err}"
        return
    assert valid, "invalid input accepted"
    got, exact = sol.ys[0, -1, 0].item(), y0 * math.exp(a * (t1 - t0))
    assert math.isfinite(got)
    assert abs(got - exact) <= 50 * (rtol * max(abs(exact), abs(y0)) + atol), (got, exact)
