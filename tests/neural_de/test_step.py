"""rk_step, error_ratio and initial_step_size: observed order, batching, NFE, gradients, references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from leanfit.neural_de.step import error_ratio, initial_step_size, rk_step
from leanfit.neural_de.tableaus import DOPRI5, TSIT5, ButcherTableau
from tests.reference import Counter, error_ratio_reference, initial_step_reference, solve_ivp_reference

TABS = [pytest.param(TSIT5, id="tsit5"), pytest.param(DOPRI5, id="dopri5")]
Y0 = np.array([[1.0, 0.0], [0.5, 0.5]])


def duffing(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Forced damped Duffing oscillator: nonlinear and non-autonomous, so it exercises every stage node c_i."""
    x, v = y[:, 0], y[:, 1]
    return torch.stack([v, -x - x**3 - 0.1 * v + 0.3 * torch.cos(t)], 1)


def duffing_np(t: float, y: np.ndarray, i: int) -> np.ndarray:
    return np.array([y[1], -y[0] - y[0] ** 3 - 0.1 * y[1] + 0.3 * np.cos(t)])




def fixed_step_errors(tab: ButcherTableau, ns: list[int], span: float = 6.0) -> tuple[list[float], list[float]]:
    """Max error over the trajectory of n fixed steps, for y_next (order p) and for the embedded solution
    y_next - error_estimate (order p - 1), against DOP853 at 1e-13 on the finest grid."""
    ref, _ = solve_ivp_reference(duffing_np, Y0, np.linspace(0.0, span, ns[-1] + 1), rtol=1e-13, atol=1e-14)
    errs, errs_embedded = [], []
    for n in ns:
        h, y, y_emb, e, e_emb = span / n, torch.tensor(Y0), torch.tensor(Y0), 0.0, 0.0
        for i in range(n):
            y = rk_step(duffing, i * h, y, h, tab).y_next
            r = rk_step(duffing, i * h, y_emb, h, tab)
            y_emb = r.y_next - r.error_estimate
            exact = ref[:, (i + 1) * (ns[-1] // n)]
            e, e_emb = max(e, np.abs(y.numpy() - exact).max()), max(e_emb, np.abs(y_emb.numpy() - exact).max())
        errs.append(e)
        errs_embedded.append(e_emb)
    return errs, errs_embedded


@pytest.mark.parametrize("tab", TABS)
def test_observed_order_fixed_steps(tab: ButcherTableau) -> None:
    ns = [60, 120, 240]  # h = 0.1, 0.05, 0.025: asymptotic regime, errors 1e-7 .. 1e-11, far above round-off
    errs, errs_embedded = fixed_step_errors(tab, ns)
    log_h = np.log(6.0 / np.array(ns))
    order = np.polyfit(log_h, np.log(errs), 1)[0]
    order_embedded = np.polyfit(log_h, np.log(errs_embedded), 1)[0]
    assert abs(order - tab.order) < 0.3, f"observed order {order:.3f}, errors {errs}"
    assert abs(order_embedded - tab.error_order) < 0.3, f"embedded order {order_embedded:.3f}, {errs_embedded}"


@pytest.mark.parametrize("tab", TABS)
def test_local_error_estimate_order(tab: ButcherTableau) -> None:
    """The estimate h sum b_error_i k_i of one step from a fixed state scales like h^(error_order + 1)."""
    hs = np.array([0.2, 0.1, 0.05, 0.025])
    est = [rk_step(duffing, 0.3, torch.tensor(Y0), h, tab).error_estimate.abs().max().item() for h in hs]
    slope = np.polyfit(np.log(hs), np.log(est), 1)[0]
    assert abs(slope - tab.error_exponent) < 0.3, f"slope {slope:.3f}, estimates {est}"


@pytest.mark.parametrize("tab", TABS)
def test_per_sample_time_and_step_equal_rows_alone(tab: ButcherTableau) -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.randn(5, 2, generator=g, dtype=torch.float64)
    t = torch.rand(5, generator=g, dtype=torch.float64)
    h = 0.05 + 0.2 * torch.rand(5, generator=g, dtype=torch.float64)
    batched = rk_step(duffing, t, y, h, tab)
    for i in range(5):
        alone = rk_step(duffing, t[i].item(), y[i : i + 1], h[i].item(), tab)
        torch.testing.assert_close(batched.y_next[i : i + 1], alone.y_next, rtol=0, atol=1e-15)
        torch.testing.assert_close(batched.error_estimate[i : i + 1], alone.error_estimate, rtol=0, atol=1e-15)


@pytest.mark.parametrize("tab", TABS)
def test_nfe_and_fsal_stage(tab: ButcherTableau) -> None:
    y = torch.tensor(Y0)
    f = Counter(duffing)
    first = rk_step(f, 0.0, y, 0.1, tab)
    assert f.calls == tab.stages == len(first.stages) == 7
    # FSAL: the last stage is f(t + h, y_next), so the next step may reuse it and calls f 6 times.
    torch.testing.assert_close(first.stages[-1], duffing(torch.full((2,), 0.1, dtype=torch.float64), first.y_next))
    second = rk_step(f, 0.1, first.y_next, 0.1, tab, k1=first.stages[-1])
    assert f.calls == 7 + 6
    torch.testing.assert_close(second.y_next, rk_step(duffing, 0.1, first.y_next, 0.1, tab).y_next, rtol=0, atol=0)


@pytest.mark.parametrize("tab", TABS)
def test_one_step_matches_scipy_dense_free_step(tab: ButcherTableau) -> None:
    """A single step of h = 0.01 is within its own error estimate's order of the DOP853 reference."""
    y = torch.tensor(Y0)
    res = rk_step(duffing, 0.0, y, 0.01, tab)
    ref, _ = solve_ivp_reference(duffing_np, Y0, [0.0, 0.01], rtol=1e-13, atol=1e-15)
    err = np.abs(res.y_next.numpy() - ref[:, -1]).max()
    assert err < 1e-13, err
    assert 1e-15 < res.error_estimate.abs().max().item() < 1e-10


@pytest.mark.parametrize("wrt_h", [False, True], ids=["y-params", "y-params-h"])
def test_gradcheck_rk_step(wrt_h: bool) -> None:
    """float64 gradcheck of the step, its error estimate and the scaled error norm w.r.t. y, parameters of f and h."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    h = torch.tensor([0.1, 0.2, 0.05, 0.3], dtype=torch.float64, requires_grad=wrt_h)

    def step(y, w, b, h):
        field = lambda t, z: torch.tanh(z @ w + b) * torch.cos(t)[:, None]  # noqa: E731
        res = rk_step(field, 0.2, y, h, TSIT5)
        # tolerances of order one keep the finite-difference noise of the tiny error estimate below gradcheck's atol
        return res.y_next, res.error_estimate, error_ratio(res.error_estimate, y, res.y_next, 0.5, 0.5)

    assert torch.autograd.gradcheck(step, (y, w, b, h), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("norm", ["rms", "max"])
@pytest.mark.parametrize("per_sample", [True, False], ids=["per-sample", "joint"])
def test_error_ratio_matches_reference(norm: str, per_sample: bool) -> None:
    g = torch.Generator().manual_seed(2)
    err, y0, y1 = (torch.randn(6, 5, generator=g, dtype=torch.float64) for _ in range(3))
    got = error_ratio(err * 1e-6, y0, y1, 1e-5, 1e-7, norm=norm, per_sample=per_sample)
    want = error_ratio_reference(err.numpy() * 1e-6, y0.numpy(), y1.numpy(), 1e-5, 1e-7, norm, per_sample)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-13)
    assert got.shape == (6,)


@pytest.mark.parametrize("per_sample", [True, False], ids=["per-sample", "joint"])
def test_initial_step_size_matches_reference(per_sample: bool) -> None:
    lam = torch.tensor([0.5, 5.0, 50.0, 0.0], dtype=torch.float64)
    y0 = torch.tensor([[1.0, 2.0], [1.0, -1.0], [0.3, 0.1], [0.0, 0.0]], dtype=torch.float64)
    field = Counter(lambda t, y: -lam[:, None] * y + torch.sin(t)[:, None])
    h = initial_step_size(field, 0.1, y0, 1e-6, 1e-8, order=5, per_sample=per_sample)
    assert field.calls == 2 and h.dtype == torch.float64 and h.shape == (4,)
    if per_sample:
        want = initial_step_reference(lambda t, y, i: [-lam[i].item() * v + np.sin(t) for v in y], 0.1, y0.numpy(),
                                      1e-6, 1e-8, 5)
        assert h[0] > h[1] > h[2]  # stiffer samples start with smaller steps
    else:  # one norm over the whole batch = the per-sample routine applied to the flattened batch
        lam_flat = lam.repeat_interleave(2).numpy()
        want = initial_step_reference(lambda t, y, i: [-lam_flat[j] * v + np.sin(t) for j, v in enumerate(y)], 0.1,
                                      y0.reshape(1, -1).numpy(), 1e-6, 1e-8, 5) * 4
    np.testing.assert_allclose(h.numpy(), want, rtol=1e-12)


# --- the initial step against scipy's and torchdiffeq's implementations of the same heuristic -------------------

_A10 = torch.tensor(np.random.default_rng(0).standard_normal((10, 10))) * 0.3 - 0.5 * torch.eye(10, dtype=torch.float64)
# name -> (field on (..., n) tensors, ignoring t; two initial states; rtol; atol). The fields accept torchdiffeq's
# single unbatched state (n,) and 0-d time as well as leanfit's (batch, n) and (batch,).
INIT_PROBLEMS = {
    "oscillator": (lambda t, y: torch.stack([y[..., 1], -y[..., 0]], -1), [[1.0, 0.0], [0.3, -0.7]], 1e-6, 1e-6),
    "vanderpol": (lambda t, y: torch.stack([y[..., 1], 2 * (1 - y[..., 0] ** 2) * y[..., 1] - y[..., 0]], -1),
                  [[2.0, 0.0], [0.5, 0.5]], 1e-6, 1e-9),
    "decay": (lambda t, y: -0.5 * y, [[1.0], [3.0]], 1e-3, 1e-6),
    "linear10": (lambda t, y: y @ _A10.T, np.random.default_rng(1).standard_normal((2, 10)).tolist(), 1e-5, 1e-8),
}
INIT_IDS = list(INIT_PROBLEMS)


@pytest.mark.parametrize("name", INIT_IDS)
def test_initial_step_matches_scipy(name: str) -> None:
    """Row by row against scipy's select_initial_step, which RK45 calls with its error estimator's order (4) in a
    1/(order + 1) formula: the same exponent 1/5 as order=5 here. scipy also clips h0 and the result to the
    interval |t_bound - t0| and to max_step (inputs chosen so neither binds: t_bound = t0 + 1000, max_step = inf)
    and takes a direction (+1); its norm is the RMS norm, as here. The old exponent 1/6 would be 1.4-1.8x larger
    wherever the second-derivative branch decides (the oscillator: 0.0492 instead of 0.0269)."""
    from scipy.integrate import RK45
    from scipy.integrate._ivp.common import select_initial_step

    f, y0, rtol, atol = INIT_PROBLEMS[name]
    y = torch.tensor(y0, dtype=torch.float64)
    got = initial_step_size(f, 0.0, y, rtol, atol, TSIT5.error_exponent).numpy()

    def f_np(t: float, v: np.ndarray) -> np.ndarray:
        return f(torch.tensor(t, dtype=torch.float64), torch.from_numpy(v)).numpy()

    want = [select_initial_step(f_np, 0.0, row, 1e3, np.inf, f_np(0.0, row), 1.0, RK45.error_estimator_order,
                                rtol, atol) for row in y.numpy()]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)
    old = [select_initial_step(f_np, 0.0, row, 1e3, np.inf, f_np(0.0, row), 1.0, 5, rtol, atol) for row in y.numpy()]
    assert np.max(np.asarray(old) / got) > 1.4  # the comparison sees the exponent (some row uses it)


@pytest.mark.parametrize("per_sample", [True, False], ids=["per-sample", "joint"])
@pytest.mark.parametrize("name", INIT_IDS)
def test_initial_step_matches_torchdiffeq(name: str, per_sample: bool) -> None:
    """Against torchdiffeq's _select_initial_step, which its dopri5 calls with order - 1 = 4 in a 1/(order + 1)
    formula. Its norm is a callable: its default for a single tensor state is the RMS norm over the whole tensor,
    so per_sample=True compares one row at a time and per_sample=False the whole (batch, n) array at once (the
    joint norm). torchdiffeq computes in the state's dtype (float64 here) and does not clip."""
    from torchdiffeq._impl.dopri5 import Dopri5Solver
    from torchdiffeq._impl.misc import _rms_norm, _select_initial_step

    f, y0, rtol, atol = INIT_PROBLEMS[name]
    y = torch.tensor(y0, dtype=torch.float64)
    t0 = torch.tensor(0.0, dtype=torch.float64)
    got = initial_step_size(f, 0.0, y, rtol, atol, DOPRI5.error_exponent, per_sample=per_sample)
    rows = list(y) if per_sample else [y] * y.shape[0]
    want = [_select_initial_step(f, t0, row, Dopri5Solver.order - 1, rtol, atol, _rms_norm).item() for row in rows]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=0)
