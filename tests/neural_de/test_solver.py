"""solve(): accuracy against scipy and exact solutions, per-sample statistics, NFE counts, dense output, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from leanfit.neural_de.solver import Solution, solve
from tests.reference import Counter, linear_ode_reference, solve_ivp_reference

F64 = torch.float64
METHODS = [pytest.param("tsit5", id="tsit5"), pytest.param("dopri5", id="dopri5")]
RTOL, ATOL = 1e-6, 1e-9
A_LIN = np.array([[-0.3, 1.0, 0.2], [-1.0, -0.3, 0.0], [0.1, 0.4, -1.2]])


def _lin(t, y):
    return y @ torch.tensor(A_LIN).T


# name -> (torch field, numpy field for scipy, y0 (batch, n), t_eval, exact reference or None)
PROBLEMS = {
    "decay": (lambda t, y: -torch.tensor([[0.5], [3.0]], dtype=F64) * y, lambda t, y, i: -[0.5, 3.0][i] * y,
              [[1.0], [2.0]], np.linspace(0.0, 4.0, 9),
              lambda ts: np.array([[1.0], [2.0]])[:, None, :] * np.exp(-np.outer([0.5, 3.0], ts))[:, :, None]),
    "oscillator": (lambda t, y: torch.stack([y[:, 1], -4.0 * y[:, 0]], 1), lambda t, y, i: np.array([y[1], -4 * y[0]]),
                   [[1.0, 0.0]], np.linspace(0.0, 10.0, 21),
                   lambda ts: np.stack([np.cos(2 * ts), -2 * np.sin(2 * ts)], -1)[None]),
    "vanderpol": (lambda t, y: torch.stack([y[:, 1], (1 - y[:, 0] ** 2) * y[:, 1] - y[:, 0]], 1),
                  lambda t, y, i: np.array([y[1], (1 - y[0] ** 2) * y[1] - y[0]]),
                  [[2.0, 0.0], [0.5, 1.0]], np.linspace(0.0, 10.0, 21), None),
    "linear-expm": (_lin, lambda t, y, i: A_LIN @ y, [[1.0, 0.0, -1.0], [0.2, 2.0, 0.5]], np.linspace(0.0, 5.0, 11),
                    lambda ts: linear_ode_reference(A_LIN, [[1.0, 0.0, -1.0], [0.2, 2.0, 0.5]], ts)),
}


def reference(name: str) -> np.ndarray:
    _, f_np, y0, ts, exact = PROBLEMS[name]
    return exact(ts) if exact is not None else solve_ivp_reference(f_np, y0, ts, "DOP853", 1e-13, 1e-14)[0]


def scaled_error(ys: np.ndarray, ref: np.ndarray, rtol: float = RTOL, atol: float = ATOL) -> float:
    """max |ys - ref| / (atol + rtol * scale), scale = max |ref| over time per sample and component (the global
    error of an oscillation is a phase error proportional to its amplitude, not to the value at a zero crossing)."""
    return float((np.abs(ys - ref) / (atol + rtol * np.abs(ref).max(1, keepdims=True))).max())




@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(PROBLEMS))
def test_accuracy_against_references(name: str, method: str) -> None:
    """At rtol=1e-6, atol=1e-9 the error at t_eval is within a few tolerances and no worse than scipy's RK45 (a
    Dormand-Prince 5(4) with an I controller) at the same tolerances; the NFE is within 25 % of RK45's."""
    f, f_np, y0, ts, _ = PROBLEMS[name]
    ref = reference(name)
    sol = solve(f, torch.tensor(y0, dtype=F64), torch.tensor(ts), method=method, rtol=RTOL, atol=ATOL)
    rk45, rk45_nfe = solve_ivp_reference(f_np, y0, ts, "RK45", RTOL, ATOL)
    err, err_rk45 = scaled_error(sol.ys.numpy(), ref), scaled_error(rk45, ref)
    assert sol.ys.shape == (len(y0), len(ts), len(y0[0])) and sol.ys.dtype == F64
    assert err < 5.0, f"{name}/{method}: max scaled error {err:.3g} (RK45: {err_rk45:.3g})"
    assert err <= err_rk45 * 1.05, f"{name}/{method}: {err:.3g} vs RK45 {err_rk45:.3g}"
    nfe_ratio = sol.stats.nfe.numpy() / rk45_nfe
    assert np.all(np.abs(nfe_ratio - 1) < 0.25), f"NFE {sol.stats.nfe.tolist()} vs RK45 {rk45_nfe.tolist()}"


@pytest.mark.parametrize("rtol", [1e-4, 1e-7, 1e-10], ids=lambda r: f"rtol{r:g}")
def test_error_tracks_tolerance(rtol: float) -> None:
    f, _, y0, ts, exact = PROBLEMS["linear-expm"]
    sol = solve(f, torch.tensor(y0, dtype=F64), torch.tensor(ts), rtol=rtol, atol=rtol * 1e-3)
    err = scaled_error(sol.ys.numpy(), exact(ts), rtol, rtol * 1e-3)
    assert err < 2.0, f"max scaled error {err:.3g} at rtol={rtol}"


@pytest.mark.parametrize(("interpolation", "bound"), [("tableau", 1.0), ("hermite", 60.0)])
def test_dense_output_between_steps(interpolation: str, bound: float) -> None:
    """201 output times on the oscillator at rtol=1e-9: the tableau's 4th-order interpolant stays within the
    tolerance (0.55; the error at the step points themselves is 0.52), cubic Hermite (O(h^4) local error) adds
    up to ~35 tolerances; the accepted steps are the same for both."""
    f, _, y0, _, exact = PROBLEMS["oscillator"]
    ts = np.linspace(0.0, 10.0, 201)
    sol = solve(f, torch.tensor(y0, dtype=F64), torch.tensor(ts), rtol=1e-9, atol=1e-12, interpolation=interpolation)
    err = scaled_error(sol.ys.numpy(), exact(ts), 1e-9, 1e-12)
    assert err < bound, f"{interpolation}: max scaled error {err:.3g}"
    assert int(sol.stats.n_accepted[0]) == 375  # Tsit5 at 1e-9 on [0, 10]; dense output adds no steps


def test_dense_output_with_many_points_per_step_and_sample() -> None:
    """Oscillators of three frequencies, per-sample control, 101 output times at a loose tolerance: each step
    passes several points, a different number per sample; every value stays within ten tolerances of the exact
    solution, and equals the sample solved alone."""
    omega = torch.tensor([1.0, 3.0, 7.0], dtype=F64)

    def f(t, y):
        return torch.stack([y[:, 1], -(omega[: y.shape[0]] ** 2) * y[:, 0]], 1)

    y0 = torch.tensor([[1.0, 0.0]] * 3, dtype=F64)
    ts = torch.linspace(0.0, 2.0, 101, dtype=F64)
    sol = solve(f, y0, ts, rtol=1e-5, atol=1e-8)
    assert int(sol.stats.n_accepted.min()) < 30  # far fewer steps than output points
    exact = torch.cos(omega[:, None] * ts[None, :])
    assert (sol.ys[..., 0] - exact).abs().max() < 1e-4  # global error ~1e-5; a wrong slot would be O(0.1)
    alone = solve(lambda t, y: f(t, y), y0[:1], ts, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(sol.ys[:1], alone.ys, rtol=1e-12, atol=1e-14)


# --- per-sample control on a batch of problems with different stiffness --------------------------------------

MUS = [0.5, 2.0, 5.0, 10.0]


def vdp_mu(mu: torch.Tensor):
    return lambda t, y: torch.stack([y[:, 1], mu * (1 - y[:, 0] ** 2) * y[:, 1] - y[:, 0]], 1)


def solve_vdp(mus: list[float], per_sample: bool = True) -> tuple[Solution, Counter]:
    f = Counter(vdp_mu(torch.tensor(mus, dtype=F64)))
    y0 = torch.tensor([[2.0, 0.0]] * len(mus), dtype=F64)
    return solve(f, y0, torch.linspace(0.0, 6.0, 13, dtype=F64), rtol=1e-6, atol=1e-8, per_sample=per_sample), f


@pytest.fixture(scope="module")
def vdp_batch() -> tuple[Solution, Counter]:
    return solve_vdp(MUS)


def test_per_sample_stats_differ_with_stiffness(vdp_batch: tuple[Solution, Counter]) -> None:
    sol, f = vdp_batch
    nfe, acc = sol.stats.nfe.tolist(), sol.stats.n_accepted.tolist()
    assert len(set(nfe)) == len(MUS) and max(acc) > 2 * acc[0], (nfe, acc)  # mu=0.5 is the easiest
    assert sol.stats.nfe_joint == f.calls == max(nfe) == 2 + 6 * sol.stats.n_attempts
    ref = solve_ivp_reference(lambda t, y, i: np.array([y[1], MUS[i] * (1 - y[0] ** 2) * y[1] - y[0]]),
                              [[2.0, 0.0]] * len(MUS), np.linspace(0.0, 6.0, 13), "DOP853", 1e-13, 1e-14)[0]
    err = scaled_error(sol.ys.numpy(), ref, 1e-6, 1e-8)
    assert err < 5.0, err


@pytest.mark.parametrize("i", range(len(MUS)), ids=[f"mu{m}" for m in MUS])
def test_batched_equals_batch_of_one(vdp_batch: tuple[Solution, Counter], i: int) -> None:
    sol, _ = vdp_batch
    alone, f = solve_vdp([MUS[i]])
    torch.testing.assert_close(sol.ys[i], alone.ys[0], rtol=0, atol=1e-12)
    for key in ("nfe", "n_accepted", "n_rejected"):
        assert int(getattr(sol.stats, key)[i]) == int(getattr(alone.stats, key)[0]), key
    assert alone.stats.nfe_joint == f.calls == int(alone.stats.nfe[0])
    n = int(alone.stats.n_accepted[0])
    torch.testing.assert_close(sol.stats.step_h[i, :n], alone.stats.step_h[0], rtol=0, atol=0)


def test_joint_mode_shares_steps(vdp_batch: tuple[Solution, Counter]) -> None:
    """per_sample=False: one norm over the batch, so every sample takes the stiffest sample's steps; the joint
    NFE is at least the per-sample maximum and everyone pays it."""
    joint, f = solve_vdp(MUS, per_sample=False)
    per_sample_sol, _ = vdp_batch
    assert joint.stats.nfe.tolist() == [joint.stats.nfe_joint] * len(MUS) and f.calls == joint.stats.nfe_joint
    assert joint.stats.nfe_joint >= per_sample_sol.stats.nfe_joint
    assert torch.all(joint.stats.step_h == joint.stats.step_h[:1])
    torch.testing.assert_close(joint.ys, per_sample_sol.ys, rtol=1e-4, atol=1e-5)


def test_step_record(vdp_batch: tuple[Solution, Counter]) -> None:
    sol, _ = vdp_batch
    for i, n in enumerate(sol.stats.n_accepted.tolist()):
        t, h = sol.stats.step_t[i], sol.stats.step_h[i]
        assert int(torch.isfinite(t).sum()) == n and torch.isnan(t[n:]).all() and torch.isnan(h[n:]).all()
        assert t[0] == 0.0 and (h[:n] > 0).all()
        torch.testing.assert_close(t[1:n], t[: n - 1] + h[: n - 1], rtol=0, atol=1e-14)
        assert t[n - 1] + h[n - 1] == pytest.approx(6.0, abs=1e-14)


def test_nfe_counts_with_given_h0() -> None:
    f = Counter(PROBLEMS["decay"][0])
    sol = solve(f, torch.tensor([[1.0], [2.0]], dtype=F64), [0.0, 1.0], h0=0.01)
    assert f.calls == sol.stats.nfe_joint == 1 + 6 * sol.stats.n_attempts
    assert sol.stats.step_h[:, 0].tolist() == [0.01, 0.01]
    np.testing.assert_allclose(sol.ys[:, -1, 0].numpy(), [math.exp(-0.5), 2 * math.exp(-3.0)], rtol=1e-6)


# --- vector-field signature, dtypes, gradients ------------------------------------------------------------------


def test_field_receives_per_sample_float64_time() -> None:
    """f(t, y) always gets t as float64 (batch,), each sample's own time; y' = a cos(t) has y = y0 + a sin(t)."""
    a = torch.tensor([1.0, 4.0, 0.25], dtype=torch.float32)
    seen = []

    def f(t, y):
        seen.append((tuple(t.shape), t.dtype))
        return a[:, None] * torch.cos(t).to(y.dtype)[:, None]

    ts = np.linspace(0.0, 3.0, 7)
    sol = solve(f, torch.zeros(3, 1), torch.tensor(ts), rtol=1e-5, atol=1e-7)
    assert set(seen) == {((3,), F64)}
    assert sol.ys.dtype == torch.float32 and sol.stats.step_t.dtype == F64
    exact = a.double().numpy()[:, None] * np.sin(ts)[None]
    err = scaled_error(sol.ys[..., 0].double().numpy(), exact, 1e-5, 1e-7)
    assert err < 5.0, err


def test_gradient_through_solve_matches_analytic() -> None:
    """y(T) = y0 exp(-lam T): dy/dy0 = exp(-lam T), dy/dlam = -T y0 exp(-lam T) (discretize-then-optimize)."""
    lam = torch.tensor([0.5, 2.0], dtype=F64, requires_grad=True)
    y0 = torch.tensor([[1.0], [3.0]], dtype=F64, requires_grad=True)
    sol = solve(lambda t, y: -lam[:, None] * y, y0, [0.0, 1.5], rtol=1e-9, atol=1e-12)
    g_y0, g_lam = torch.autograd.grad(sol.ys[:, -1].sum(), (y0, lam))
    decay = torch.exp(-lam.detach() * 1.5)
    torch.testing.assert_close(g_y0[:, 0], decay, rtol=1e-8, atol=0)
    torch.testing.assert_close(g_lam, -1.5 * y0.detach()[:, 0] * decay, rtol=1e-8, atol=0)


# --- errors -------------------------------------------------------------------------------------------------------


def _decay(t, y):
    return -y


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"rtol": 0.0}, r"rtol=0.0 is invalid: expected a finite float > 0", id="rtol-zero"),
        pytest.param({"atol": -1e-9}, r"atol=-1e-09 is invalid", id="atol-negative"),
        pytest.param({"rtol": float("nan")}, r"rtol=nan is invalid", id="rtol-nan"),
        pytest.param({"t_eval": [0.0]}, r"t_eval=\[0.0\] is invalid: expected .* at least 2", id="t-eval-one-point"),
        pytest.param({"t_eval": [0.0, 1.0, 1.0]}, r"strictly increasing", id="t-eval-duplicate"),
        pytest.param({"t_eval": [1.0, 0.0]}, r"strictly increasing times \(t1 > t0\)", id="t-eval-decreasing"),
        pytest.param({"t_eval": [[0.0, 1.0]]}, r"1-D sequence", id="t-eval-2d"),
        pytest.param({"y0": torch.tensor([[1.0], [float("nan")]])}, r"NaN/inf in sample 1", id="y0-nan"),
        pytest.param({"y0": torch.tensor([[float("inf")]])}, r"NaN/inf in sample 0", id="y0-inf"),
        pytest.param({"y0": torch.tensor(1.0)}, r"shaped \(batch, \*state\)", id="y0-no-batch"),
        pytest.param({"y0": torch.ones(2, 1, dtype=torch.long)}, r"floating tensor", id="y0-integer"),
        pytest.param({"f": lambda t, y: -y[:, :1]}, r"returned shape \(2, 1\), expected y's shape \(2, 3\)",
                     id="f-wrong-shape"),
        pytest.param({"method": "euler"}, r"method='euler' is invalid", id="method"),
        pytest.param({"h0": -0.1}, r"h0=-0.1 is invalid", id="h0-negative"),
        pytest.param({"max_steps": 0}, r"max_steps=0 is invalid", id="max-steps-zero"),
        pytest.param({"interpolation": "linear"}, r"interpolation='linear' is invalid", id="interpolation"),
        pytest.param({"norm": "l1"}, r"norm='l1' is invalid", id="norm"),
    ],
)
def test_bad_input_raises_value_error(kwargs: dict, match: str) -> None:
    args = {"f": _decay, "y0": torch.ones(2, 3, dtype=F64), "t_eval": [0.0, 1.0]} | kwargs
    with pytest.raises(ValueError, match=match):
        solve(**args)


def _nan_after_half(t, y):
    return torch.where((t > 0.5)[:, None], torch.full_like(y, float("nan")), -y)


@pytest.mark.parametrize(
    ("f", "kwargs", "match", "t_reached"),
    [
        pytest.param(_nan_after_half, {}, r"underflow at t=0\.(4999|5 ).*became NaN/inf", 0.5, id="nan-during-solve"),
        pytest.param(lambda t, y: y**2, {}, r"underflow at t=1\.0000.*may blow up", 1.0, id="blow-up"),
        pytest.param(lambda t, y: -1e5 * y, {"max_steps": 100}, r"max_steps=100 exceeded at t=0\.00.*stiff", 0.0018,
                     id="max-steps-stiff"),
        pytest.param(lambda t, y: y / 0.0, {}, r"f\(t0, y0\) returned NaN/inf at t0=0\.0", 0.0, id="nan-at-t0"),
    ],
)
def test_runtime_failures_raise_with_time_reached(f, kwargs: dict, match: str, t_reached: float) -> None:
    with pytest.raises(RuntimeError, match=match) as info:
        solve(f, torch.ones(2, 1, dtype=F64), [0.0, 2.0], **kwargs)
    t_msg = float(str(info.value).split("t=" if "t0=" not in str(info.value) else "t0=")[1].split(" ")[0])
    assert t_msg == pytest.approx(t_reached, abs=1e-3)
