"""Local and global error regularisers and solve(record_steps=True): references, gradients, NFE, the sampling
identities, the closed box with torchdiffeq's odeint_adjoint, errors."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from leanfit.neural_de.regularizers import (
    STABILITY_SIZE,
    LocalRegularizerInfo,
    global_regularizer,
    local_regularizer,
    regularize_solution,
    sample_times,
    with_times,
)
from leanfit.neural_de.solver import PIController, Solution, solve
from leanfit.neural_de.step import error_ratio, rk_step
from leanfit.neural_de.tableaus import DOPRI5, TSIT5
from tests.reference import (
    Counter,
    global_regularizer_reference,
    initial_step_reference,
    local_regularizer_reference,
    tsit5_step_reference,
)
from tests.tolerances import assert_close

F64 = torch.float64


def mlp_params(d: int = 3, hidden: int = 8, scale: float = 3.0, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(d, hidden, generator=g, dtype=F64) * scale
    b1 = torch.randn(hidden, generator=g, dtype=F64)
    w2 = torch.randn(hidden, d, generator=g, dtype=F64) * scale / 3
    return [p.requires_grad_() for p in (w1, b1, w2)]


def mlp(params: list[torch.Tensor]):
    """A non-autonomous tanh MLP ``f(t, y)``, ``t`` float64 ``(batch,)``; same field for every sample."""
    w1, b1, w2 = params
    return lambda t, y: torch.tanh(y @ w1 + b1 + torch.sin(t).to(y.dtype)[:, None]) @ w2


def vdp(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Van der Pol, mu = 2: steps shrink near the fast transitions, so step sizes vary along a trajectory."""
    return torch.stack([y[:, 1], 2.0 * (1 - y[:, 0] ** 2) * y[:, 1] - y[:, 0]], 1)


VDP_Y0 = [[2.0, 0.0], [0.5, 0.5], [0.1, 0.0]]


def rel(a: torch.Tensor | float, b: torch.Tensor | float) -> float:
    """Max relative error ``max |a - b| / max |b|``."""
    a, b = torch.as_tensor(a, dtype=F64).detach(), torch.as_tensor(b, dtype=F64).detach()
    return float((a - b).abs().max() / b.abs().max())


def initial_h_reference(f, t: torch.Tensor, y: torch.Tensor, rtol: float, atol: float, joint: bool) -> list[float]:
    """Hairer's initial step at (t_i, y_i) from tests.reference (it takes one t0: pass 0 and shift by t_i). Joint:
    one norm over the whole batch array = the per-sample routine applied to the flattened batch."""

    def flat_batch(tt: float, v: list[float], i: int) -> list[float]:
        return f(t + tt, torch.tensor(v, dtype=F64).reshape(y.shape)).reshape(-1).tolist()

    def one_sample(tt: float, v: list[float], i: int) -> list[float]:
        return f(t[i : i + 1] + tt, torch.tensor([v], dtype=F64)).reshape(-1).tolist()

    if joint:
        return initial_step_reference(flat_batch, 0.0, y.reshape(1, -1).tolist(), rtol, atol, 5) * y.shape[0]
    return initial_step_reference(one_sample, 0.0, y.tolist(), rtol, atol, 5)


# --- local_regularizer against the sample-by-sample reference -------------------------------------------------

# Tolerances of 1e-2 and a field with gain ~3: the error estimate h sum_i b_error_i k_i cancels (sum b_error = 0),
# so two evaluation orders differ by ~eps |h k| / |error|. With the automatic step (h = 0.09 .. 0.13) EEst goes down
# to 8e-4 and the worst relative difference is 1.3e-12 (value and gradient); with the given steps, 8e-14.
LOCAL_TOL = 1e-2
CANCEL_RTOL = 4e-12


@pytest.mark.parametrize("k1", [False, True], ids=["k1-computed", "k1-given"])
@pytest.mark.parametrize("step", ["initial", "float", "tensor"])
@pytest.mark.parametrize("estimate", ["error", "stiffness"])
@pytest.mark.parametrize("points", ["batch", "sample"])
def test_local_regularizer_matches_reference(points: str, estimate: str, step: str, k1: bool) -> None:
    params = mlp_params()
    f = mlp(params)
    g = torch.Generator().manual_seed(1)
    y = torch.randn(4, 3, generator=g, dtype=F64)
    t = torch.rand(4, generator=g, dtype=F64)
    if points == "batch":
        t = t[:1].expand(4)  # the paper's: one t_r for the minibatch
    per_sample_h = torch.tensor([0.2, 0.3, 0.25, 0.35], dtype=F64)
    shared_h = torch.full((4,), 0.25, dtype=F64)
    steps = {"initial": "initial", "float": 0.3, "tensor": shared_h if points == "batch" else per_sample_h}
    given = f(t, y).detach() if k1 else None
    counted = Counter(f)
    reg, info = local_regularizer(counted, t, y, step=steps[step], points=points, estimate=estimate, rtol=LOCAL_TOL,
                                  atol=LOCAL_TOL, k1=given)
    want = local_regularizer_reference(f, t, y, info.h, LOCAL_TOL, LOCAL_TOL, points=points, estimate=estimate)
    assert rel(reg, want) <= CANCEL_RTOL, (reg.item(), want.item())
    grads = torch.autograd.grad(reg, params)
    grads_ref = torch.autograd.grad(want, params)
    for name, a, b in zip(["w1", "b1", "w2"], grads, grads_ref, strict=True):
        assert rel(a, b) <= CANCEL_RTOL, (name, rel(a, b), (a - b).abs().argmax().item())
    assert info.nfe == counted.calls == 6 + (not k1) + (step == "initial")
    if step == "initial":  # Hairer's heuristic at y_r, joint for the batch norm
        h_ref = initial_h_reference(f, t, y, LOCAL_TOL, LOCAL_TOL, joint=points == "batch")
        np.testing.assert_allclose(info.h.numpy(), h_ref, rtol=1e-12)
    else:
        assert info.h.tolist() == (steps[step].tolist() if step == "tensor" else [0.3] * 4)
    assert info.y.requires_grad is False and info.eest.shape == (4,) and torch.isfinite(info.eest).all()
    assert (info.stiffness is None) == (estimate == "error")


@pytest.mark.parametrize("points", ["batch", "sample"])
def test_first_stage_graph_differentiates_the_error_estimate_itself(points: str) -> None:
    """first_stage='graph': k_1 keeps its graph, so the gradient is the full derivative of the one-step error
    (equal to the reference with k_1 differentiated); 'constant' differs from it, by far more than the value's
    own size, because the dropped b_error_1 dk_1/dtheta term no longer cancels."""
    params = mlp_params()
    f = mlp(params)
    g = torch.Generator().manual_seed(3)
    y = torch.randn(4, 3, generator=g, dtype=F64)
    t = torch.full((4,), 0.4, dtype=F64)
    reg, info = local_regularizer(f, t, y, step=0.3, points=points, rtol=LOCAL_TOL, atol=LOCAL_TOL, first_stage="graph")
    want = local_regularizer_reference(f, t, y, info.h, LOCAL_TOL, LOCAL_TOL, points=points, k1_graph=True)
    assert rel(reg, want) <= 1e-12 and info.nfe == 7
    grads, grads_ref = torch.autograd.grad(reg, params), torch.autograd.grad(want, params)
    for a, b in zip(grads, grads_ref, strict=True):  # the full derivative cancels too: 1e-10 (measured 3e-12)
        assert rel(a, b) <= 1e-10
    const, _ = local_regularizer(f, t, y, step=0.3, points=points, rtol=LOCAL_TOL, atol=LOCAL_TOL)
    assert rel(const, reg) <= 1e-12  # the same value
    grads_const = torch.autograd.grad(const, params)
    assert max(rel(a, b) for a, b in zip(grads_const, grads, strict=True)) > 0.1
    # a given k1 is used as passed: with its graph it gives the 'graph' gradient
    reg2, info2 = local_regularizer(f, t, y, step=0.3, points=points, rtol=LOCAL_TOL, atol=LOCAL_TOL, k1=f(t, y),
                                    first_stage="graph")
    assert info2.nfe == 6
    for a, b in zip(torch.autograd.grad(reg2, params), grads, strict=True):
        assert rel(a, b) <= 1e-10
    with pytest.raises(ValueError, match="first_stage"):
        local_regularizer(f, t, y, step=0.3, first_stage="both")


@pytest.mark.parametrize("points", ["batch", "sample"])
@pytest.mark.parametrize("method", ["tsit5", "dopri5"])
def test_stiffness_of_linear_field_is_its_eigenvalue(method: str, points: str) -> None:
    """For y' = -lam y, k_7 - k_6 = -lam (y_next - g_6) exactly, so Shampine's rho is lam: the regulariser is
    lam / stability size (per-sample lam with points='sample': their mean). Both FSAL pairs are allowed."""
    lam = torch.tensor([4.0, 4.0, 4.0]) if points == "batch" else torch.tensor([1.0, 4.0, 20.0])
    lam = lam.to(F64)
    y = torch.tensor([[1.0, -0.5], [0.3, 2.0], [-1.0, 0.2]], dtype=F64)
    reg, info = local_regularizer(lambda t, z: -lam[:, None] * z, 0.5, y, step=0.1, points=points,
                                  estimate="stiffness", method=method)
    want = lam / STABILITY_SIZE[method]
    np.testing.assert_allclose(info.stiffness.numpy(), want.numpy(), rtol=1e-9)
    assert reg.item() == pytest.approx(want.mean().item(), rel=1e-9)
    assert STABILITY_SIZE == {"tsit5": 3.5068, "dopri5": 3.3066}  # OrdinaryDiffEq.jl's alg_stability_size


# --- gradients: gradcheck, and what is a constant ---------------------------------------------------------------


@pytest.mark.parametrize("estimate", ["error", "stiffness"])
@pytest.mark.parametrize("points", ["batch", "sample"])
def test_gradcheck_local_regularizer(points: str, estimate: str) -> None:
    """float64 gradcheck w.r.t. the field's parameters. The regulariser treats y_r, k_1 and h as constants, so the
    function checked holds them fixed: k_1 from the unperturbed parameters, a given step."""
    params = mlp_params(d=2, hidden=4, scale=1.0, seed=2)
    g = torch.Generator().manual_seed(3)
    y, t = torch.randn(3, 2, generator=g, dtype=F64), torch.rand(3, generator=g, dtype=F64)
    k1 = mlp(params)(t, y).detach()

    def reg(*p: torch.Tensor) -> torch.Tensor:
        return local_regularizer(mlp(list(p)), t, y, step=0.2, points=points, estimate=estimate, rtol=0.5, atol=0.5,
                                 k1=k1)[0]

    assert torch.autograd.gradcheck(reg, tuple(params), eps=1e-6, atol=1e-8)


def test_state_step_and_k1_are_constants() -> None:
    """No gradient reaches y_r, a given k1 or a given step tensor; the parameters get theirs only through k_2..k_7."""
    params = mlp_params()
    y = torch.randn(4, 3, generator=torch.Generator().manual_seed(4), dtype=F64, requires_grad=True)
    k1 = mlp(params)(torch.zeros(4, dtype=F64), y)
    h = torch.full((4,), 0.2, dtype=F64, requires_grad=True)
    reg, info = local_regularizer(mlp(params), 0.0, y, step=h, k1=k1, rtol=LOCAL_TOL, atol=LOCAL_TOL)
    grads = torch.autograd.grad(reg, [y, k1, h, *params], allow_unused=True)
    assert grads[0] is None and grads[1] is None and grads[2] is None
    assert all(gr is not None and gr.abs().max() > 0 for gr in grads[3:])
    assert not info.h.requires_grad and not info.y.requires_grad


def test_parameter_seen_only_by_k1_gets_no_gradient() -> None:
    """f(t, y) = -y + p [t == t_r]: p enters k_1 only. Its gradient is exactly 0 (the module detaches k_1), whereas
    the same step with k_1 in the graph gives a clearly non-zero one."""
    p = torch.tensor(0.7, dtype=F64, requires_grad=True)
    t_r = 0.3

    def f(t, y):
        return -y + p * (t == t_r).to(y.dtype)[:, None]

    y = torch.tensor([[1.0, 2.0], [0.5, -1.0]], dtype=F64)
    reg, _ = local_regularizer(f, t_r, y, step=0.5, points="sample", rtol=1e-3, atol=1e-3)
    (grad,) = torch.autograd.grad(reg, p)
    assert grad.item() == 0.0
    attached = []  # the same EEst |h| with k_1 = f(t_r, y) differentiable
    for i in range(2):
        y1, err, _, _ = tsit5_step_reference(f, t_r, y[i : i + 1], 0.5)
        attached.append(error_ratio(err, y[i : i + 1], y1, 1e-3, 1e-3) * 0.5)
    assert reg.item() == pytest.approx(torch.cat(attached).mean().item(), rel=1e-12)
    (grad_attached,) = torch.autograd.grad(torch.cat(attached).mean(), p)
    assert abs(grad_attached.item()) > 1e-3


def equilibrium_field(seed: int = 5) -> tuple[list[torch.Tensor], object]:
    """A bias-free tanh MLP: f(t, 0) = 0, so a sample at y = 0 has all stages, its error estimate and both terms of
    the stiffness ratio exactly 0."""
    w1, _, w2 = mlp_params(d=2, hidden=4, seed=seed)
    return [w1, w2], lambda t, y: torch.tanh(y @ w1) @ w2


@pytest.mark.parametrize("points", ["batch", "sample"])
def test_zero_stiffness_has_zero_gradient(points: str) -> None:
    """A sample at an equilibrium (f = 0 there, so k_7 - k_6 = y_next - g_6 = 0) contributes rho = 0 with a zero,
    not NaN, gradient."""
    params, f = equilibrium_field()
    y = torch.tensor([[1.0, 0.5], [0.0, 0.0]], dtype=F64)
    reg, info = local_regularizer(f, 0.0, y, step=0.1, points=points, estimate="stiffness")
    grads = torch.autograd.grad(reg, params)
    assert all(torch.isfinite(gr).all() and gr.abs().max() > 0 for gr in grads)
    if points == "sample":
        assert info.stiffness[1].item() == 0.0 and info.stiffness[0].item() > 0


@pytest.mark.parametrize("which", ["local", "global"])
def test_zero_error_estimate_has_finite_gradient(which: str) -> None:
    """A sample at an equilibrium has an exactly zero error estimate; it adds nothing to the value or the gradient:
    the mean over [moving sample, equilibrium] is half the moving sample's own value and gradient (not NaN)."""
    params, f = equilibrium_field()
    y = torch.tensor([[1.0, 0.5], [0.0, 0.0]], dtype=F64)

    def reg_of(y0: torch.Tensor) -> torch.Tensor:
        if which == "local":
            return local_regularizer(f, 0.0, y0, step=0.1, points="sample")[0]
        return global_regularizer(solve(f, y0, [0.0, 1.0], rtol=1e-3, atol=1e-3, record_steps=True))

    both, alone = reg_of(y), reg_of(y[:1])
    assert alone.item() > 0
    assert_close(both, alone / 2)
    for got, expected in zip(torch.autograd.grad(both, params), torch.autograd.grad(alone, params), strict=True):
        assert_close(got, expected / 2)


# --- solve(record_steps=True) and the global regulariser ----------------------------------------------------------


@pytest.fixture(scope="module", params=[True, False], ids=["per-sample", "joint"])
def vdp_solves(request: pytest.FixtureRequest) -> tuple[Solution, Solution, bool]:
    y0 = torch.tensor(VDP_Y0, dtype=F64)
    kwargs = {"rtol": 1e-3, "atol": 1e-3, "per_sample": request.param}
    return solve(vdp, y0, [0.0, 3.0], record_steps=True, **kwargs), solve(vdp, y0, [0.0, 3.0], **kwargs), request.param


def test_record_steps_changes_nothing_else(vdp_solves: tuple[Solution, Solution, bool]) -> None:
    rec, plain, per_sample = vdp_solves
    assert torch.equal(rec.ys, plain.ys)
    for key in ("nfe", "n_accepted", "n_rejected"):
        assert torch.equal(getattr(rec.stats, key), getattr(plain.stats, key)), key
    assert rec.stats.nfe_joint == plain.stats.nfe_joint and rec.stats.n_attempts == plain.stats.n_attempts
    for key in ("step_t", "step_h"):
        torch.testing.assert_close(getattr(rec.stats, key), getattr(plain.stats, key), rtol=0, atol=0, equal_nan=True)
    assert plain.stats.step_error is None and plain.stats.step_y is None
    n = rec.stats.n_accepted.tolist()
    assert n == ([9, 8, 6] if per_sample else [10] * 3)  # per-sample counts differ: the padding is exercised


def test_step_record_padding_and_contents(vdp_solves: tuple[Solution, Solution, bool]) -> None:
    """step_error / step_y hold the accepted steps' EEst and start states, NaN / zero padded beyond n_accepted;
    re-stepping from step_y[i, j] with step_h[i, j] gives step_y[i, j + 1] and that EEst."""
    sol, _, per_sample = vdp_solves
    st = sol.stats
    width = int(st.n_accepted.max())
    assert st.step_error.shape == (3, width) and st.step_y.shape == (3, width, 2)
    assert st.step_error.requires_grad is False  # vdp has no parameters; the graph test is the gradcheck below
    for i, n in enumerate(st.n_accepted.tolist()):
        assert torch.isnan(st.step_error[i, n:]).all() and (st.step_y[i, n:] == 0).all()
        assert torch.isfinite(st.step_error[i, :n]).all() and (st.step_error[i, :n] <= 1.0).all()
        assert torch.equal(st.step_y[i, 0], torch.tensor(VDP_Y0[i], dtype=F64))
    for j in range(width - 1):  # step j of every sample that took a step j + 1 (padding rows are re-stepped too)
        live = st.n_accepted > j + 1
        y = st.step_y[:, j]
        res = rk_step(vdp, st.step_t[:, j].nan_to_num(0.0), y, st.step_h[:, j].nan_to_num(0.0))
        torch.testing.assert_close(res.y_next[live], st.step_y[live, j + 1], rtol=1e-14, atol=1e-14)
        if per_sample or live.all():  # a joint norm spans the batch, so compare it only where all samples step
            eest = error_ratio(res.error_estimate, y, res.y_next, 1e-3, 1e-3, per_sample=per_sample)
            np.testing.assert_allclose(st.step_error[live, j], eest[live], rtol=1e-11)


def test_global_regularizer_matches_reference(vdp_solves: tuple[Solution, Solution, bool]) -> None:
    sol, _, per_sample = vdp_solves
    st = sol.stats
    got = global_regularizer(sol)
    want = global_regularizer_reference(vdp, st.step_t, st.step_h, st.step_y, st.n_accepted, 1e-3, 1e-3,
                                        per_sample=per_sample)
    assert rel(got, want) <= 1e-12, (got.item(), want)
    per_row = (st.step_error.nan_to_num(0.0) * st.step_h.nan_to_num(0.0)).sum(1)
    assert got.item() == pytest.approx(per_row.mean().item(), rel=1e-15)
    if not per_sample:  # every row holds the joint value
        assert torch.all(per_row == per_row[0])


@pytest.mark.parametrize("per_sample", [True, False], ids=["per-sample", "joint"])
def test_gradcheck_global_regularizer_through_solver(per_sample: bool) -> None:
    """float64 gradcheck of sum_j EEst_j h_j w.r.t. y0 and the field's parameters, differentiating through the solve.
    The step sizes are constants of the gradient, so the check needs steps that do not move with the parameters: a
    fixed-step controller (factor 1) at h0 = 0.25 on [0, 1], tolerances loose enough that no step is rejected.
    (With the default PI controller h_{n+1} depends on EEst_n and the finite differences see it.) The two samples
    stop at different attempts per_sample (h0 = 0.25, 0.2), so finished samples' h = 0 attempts are exercised."""
    params = mlp_params(d=2, hidden=4, scale=1.0, seed=6)
    y0 = torch.randn(2, 2, generator=torch.Generator().manual_seed(7), dtype=F64, requires_grad=True)
    fixed = PIController(beta1=0.0, beta2=0.0, safety=1.0)
    h0 = torch.tensor([0.25, 0.2], dtype=F64) if per_sample else 0.25
    counts = []

    def reg(y0: torch.Tensor, *p: torch.Tensor) -> torch.Tensor:
        sol = solve(mlp(list(p)), y0, [0.0, 1.0], rtol=0.1, atol=0.1, h0=h0, controller=fixed,
                    per_sample=per_sample, record_steps=True)
        counts.append((sol.stats.n_accepted.tolist(), sol.stats.n_rejected.tolist()))
        return global_regularizer(sol)

    assert torch.autograd.gradcheck(reg, (y0, *params), eps=1e-6, atol=1e-8)
    assert set(map(str, counts)) == {str(([4, 5], [0, 0]) if per_sample else ([4, 4], [0, 0]))}


# --- regularize_solution: biased and unbiased picks, taken and initial steps --------------------------------------

T1 = 3.0


@pytest.fixture(scope="module")
def copies() -> tuple[Solution, int]:
    """Each of the three vdp samples repeated K times (per-sample control, so each copy takes its sample's steps):
    one call of regularize_solution(points='sample') then makes K independent draws per sample."""
    k = 2000
    y0 = torch.tensor(VDP_Y0, dtype=F64).repeat_interleave(k, 0)
    return solve(vdp, y0, [0.0, T1], rtol=1e-3, atol=1e-3, record_steps=True), k


def picked_steps(sol: Solution, info_t: torch.Tensor) -> torch.Tensor:
    """Index j of the recorded step each sample stepped from (its start time equals info.t)."""
    hits = sol.stats.step_t == info_t[:, None]
    assert torch.all(hits.sum(1) == 1)
    return hits.long().argmax(1)


def chi_square(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic and degrees of freedom, adjacent cells merged until each expects >= 5 draws."""
    draws, cells, acc_c, acc_p = counts.sum(), [], 0, 0.0
    for c, p in zip(counts, probs, strict=True):
        acc_c, acc_p = acc_c + c, acc_p + p
        if acc_p * draws >= 5:
            cells.append((acc_c, acc_p))
            acc_c, acc_p = 0, 0.0
    if acc_p > 0:  # a small tail joins the last cell
        cells[-1] = (cells[-1][0] + acc_c, cells[-1][1] + acc_p)
    stat = sum((c - draws * p) ** 2 / (draws * p) for c, p in cells)
    return float(stat), len(cells) - 1


def test_unbiased_taken_step_enumerated_exactly() -> None:
    """With t_r in step j (at its start, middle and just before its end; t1 for the last step) the unbiased
    taken-step regulariser steps from (t_j, y_j) with h_j and gives EEst_j h_j; weighting each step by its
    probability h_j / T gives T E[EEst_j(t)] = sum_j EEst_j h_j, the per-sample global regulariser."""
    sol = solve(vdp, torch.tensor(VDP_Y0, dtype=F64), [0.0, T1], rtol=1e-3, atol=1e-3, record_steps=True)
    st, n = sol.stats, sol.stats.n_accepted
    expectation = torch.zeros(3, dtype=F64)
    for j in range(int(n.max())):
        jj = torch.minimum(torch.tensor(j), n - 1)
        t_j, h_j = st.step_t[torch.arange(3), jj], st.step_h[torch.arange(3), jj]
        for where in (0.0, 0.5, 1.0):
            t_r = t_j + where * h_j if where < 1.0 else torch.where(jj == n - 1, T1, t_j + 0.999 * h_j)
            reg, info = regularize_solution(vdp, sol, sampling="unbiased", step="taken", points="sample", t_r=t_r,
                                            rtol=1e-3, atol=1e-3)
            assert torch.equal(info.t, t_j) and torch.equal(info.h, h_j)
            eest = st.step_error[torch.arange(3), jj]
            np.testing.assert_allclose(info.eest.numpy(), eest.numpy(), rtol=1e-11)
            assert reg.item() == pytest.approx((info.eest * h_j).mean().item(), rel=1e-15)
        expectation += torch.where(j < n, h_j / T1 * info.eest, 0.0)
    global_per_sample = (st.step_error.nan_to_num(0.0) * st.step_h.nan_to_num(0.0)).sum(1)
    np.testing.assert_allclose((T1 * expectation).numpy(), global_per_sample.numpy(), rtol=1e-11)
    assert global_regularizer(sol).item() == pytest.approx(global_per_sample.mean().item(), rel=1e-15)


def test_unbiased_sampler_draws_steps_with_probability_h_over_T(copies: tuple[Solution, int]) -> None:
    """K seeded draws per sample: step j is picked with frequency h_j / T (chi-square at p = 0.001), and
    T mean(EEst) estimates sum_j EEst_j h_j within 4 standard errors."""
    from scipy.stats import chi2

    sol, k = copies
    _, info = regularize_solution(vdp, sol, sampling="unbiased", step="taken", points="sample", rtol=1e-3, atol=1e-3,
                                  generator=torch.Generator().manual_seed(8))
    j = picked_steps(sol, info.t)
    st = sol.stats
    for s in range(3):
        rows = slice(s * k, (s + 1) * k)
        n = int(st.n_accepted[s * k])
        probs = (st.step_h[s * k, :n] / T1).numpy()
        assert probs.sum() == pytest.approx(1.0, abs=1e-14)
        stat, dof = chi_square(np.bincount(j[rows].numpy(), minlength=n), probs)
        assert stat < chi2.ppf(0.999, dof), (s, stat, dof)
        estimate = T1 * info.eest[rows]
        exact = float((st.step_error[s * k, :n] * st.step_h[s * k, :n]).sum())
        assert abs(estimate.mean().item() - exact) < 4 * estimate.std().item() / k**0.5, (estimate.mean(), exact)


def test_biased_sampler_is_uniform_over_solver_points_but_the_last(copies: tuple[Solution, int]) -> None:
    """Biased: j uniform over 0..n-1 (the solver's points t_0..t_{n-1}; the final point t_n = t1 never), each
    one of them drawn, frequencies uniform by chi-square at p = 0.001."""
    from scipy.stats import chi2

    sol, k = copies
    reg, info = regularize_solution(vdp, sol, sampling="biased", step="taken", points="sample", rtol=1e-3,
                                    atol=1e-3, generator=torch.Generator().manual_seed(9))
    j = picked_steps(sol, info.t)
    assert (info.t < T1).all()
    for s in range(3):
        rows = slice(s * k, (s + 1) * k)
        n = int(sol.stats.n_accepted[s * k])
        counts = np.bincount(j[rows].numpy(), minlength=n)
        assert len(counts) == n and counts.min() > 0
        stat, dof = chi_square(counts, np.full(n, 1.0 / n))
        assert stat < chi2.ppf(0.999, dof), (s, stat, dof, counts)
    want = (sol.stats.step_error.gather(1, j[:, None])[:, 0] * info.h).mean()
    assert reg.item() == pytest.approx(want.item(), rel=1e-10)


def test_sampling_is_seeded_and_batch_points_share_one_draw() -> None:
    sol = solve(vdp, torch.tensor(VDP_Y0, dtype=F64), [0.0, T1], rtol=1e-3, atol=1e-3, per_sample=False,
                record_steps=True)
    runs = [regularize_solution(vdp, sol, sampling=s, step="taken", points="batch", rtol=1e-3, atol=1e-3,
                                generator=torch.Generator().manual_seed(seed))
            for s, seed in [("biased", 10), ("biased", 10), ("unbiased", 10)]]
    for reg, info in runs:
        assert (info.t == info.t[0]).all() and (info.eest == info.eest[0]).all()
        j = picked_steps(sol, info.t)[0]
        np.testing.assert_allclose(info.eest[0].item(), sol.stats.step_error[0, j].item(), rtol=1e-11)
        assert reg.item() == pytest.approx((info.eest[0] * info.h[0]).item(), rel=1e-15)
    assert runs[0][0].item() == runs[1][0].item() and torch.equal(runs[0][1].t, runs[1][1].t)
    u = torch.rand(1, generator=torch.Generator().manual_seed(10), dtype=F64).item()
    assert runs[0][1].t[0] == sol.stats.step_t[0, int(u * int(sol.stats.n_accepted[0]))]
    assert runs[2][1].t[0] <= u * T1 < runs[2][1].t[0] + runs[2][1].h[0]


def test_unbiased_initial_from_saved_state_equals_local_regularizer() -> None:
    """Unbiased with step='initial': u(t_r) comes from the solution at the t_r added by with_times."""
    y0 = torch.tensor(VDP_Y0, dtype=F64)
    t_r = sample_times(0.0, T1, 3, points="sample", generator=torch.Generator().manual_seed(12))
    times, keep, r = with_times(torch.linspace(0.0, T1, 4, dtype=F64), t_r)
    sol = solve(vdp, y0, times, rtol=1e-6, atol=1e-8)  # no step record needed
    counted = Counter(vdp)
    reg, info = regularize_solution(counted, sol, step="initial", points="sample", t_r=t_r, rtol=1e-6, atol=1e-8)
    want, _ = local_regularizer(vdp, t_r, sol.ys[torch.arange(3), r], points="sample", rtol=1e-6, atol=1e-8)
    assert reg.item() == want.item() and torch.equal(info.t, t_r) and counted.calls == info.nfe == 8


@pytest.mark.parametrize("first_stage", ["constant", "graph"])
def test_initial_step_from_step_start_equals_local_regularizer_there(first_stage: str) -> None:
    """from_step_start: t_r in step j (start, middle) -> the initial-step regulariser at (t_j, y_j), the recorded
    start, not at u(t_r); the same value as local_regularizer called there, and a different one from u(t_r)."""
    y0 = torch.tensor(VDP_Y0, dtype=F64)
    sol = solve(vdp, y0, [0.0, T1], rtol=1e-3, atol=1e-3, record_steps=True)
    st, rows = sol.stats, torch.arange(3)
    jj = torch.minimum(torch.tensor(2), sol.stats.n_accepted - 1)
    t_j, h_j, y_j = st.step_t[rows, jj], st.step_h[rows, jj], st.step_y[rows, jj]
    for where in (0.0, 0.5):
        t_r = t_j + where * h_j
        reg, info = regularize_solution(vdp, sol, step="initial", points="sample", t_r=t_r, rtol=1e-3, atol=1e-3,
                                        from_step_start=True, first_stage=first_stage)
        want, want_info = local_regularizer(vdp, t_j, y_j, points="sample", rtol=1e-3, atol=1e-3,
                                            first_stage=first_stage)
        assert torch.equal(info.t, t_j) and torch.equal(info.y, y_j) and torch.equal(info.h, want_info.h)
        assert reg.item() == want.item() and info.nfe == 8
    times, _, r = with_times([0.0, T1], t_r)  # the paper's: from u(t_r) at the middle of step j
    mid = solve(vdp, y0, times, rtol=1e-3, atol=1e-3)
    paper, _ = regularize_solution(vdp, mid, step="initial", points="sample", t_r=t_r, rtol=1e-3, atol=1e-3)
    assert abs(paper.item() - reg.item()) > 1e-6 * abs(reg.item())


@pytest.mark.parametrize("kwargs", [{"step": "taken"}, {"sampling": "biased"}], ids=["taken", "biased"])
def test_from_step_start_refused_where_it_changes_nothing(small_solves: dict[str, Solution], kwargs: dict) -> None:
    with pytest.raises(ValueError, match=r"from_step_start=True is invalid: expected False.*drop from_step_start"):
        regularize_solution(vdp, small_solves["record"], points="sample", from_step_start=True, **kwargs)


# --- with_times and sample_times ----------------------------------------------------------------------------------


def test_with_times_merges_and_indexes() -> None:
    t_eval = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    t_r = torch.tensor([0.25, 0.5, 0.75, 0.25, 1.0], dtype=F64)  # duplicates, a shared point and an endpoint
    times, keep, r = with_times(t_eval, t_r)
    assert times.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0] and times.dtype == F64
    assert keep.tolist() == [0, 2, 4] and r.tolist() == [1, 2, 3, 1, 4]
    assert torch.equal(times[keep], t_eval) and torch.equal(times[r], t_r)
    times, keep, r = with_times([0.0, 2.0], torch.tensor(0.0, dtype=F64))  # scalar t_r, at t0
    assert times.tolist() == [0.0, 2.0] and keep.tolist() == [0, 1] and r.tolist() == [0]


@pytest.mark.parametrize("points", ["batch", "sample"])
def test_sample_times_seeded_and_shared(points: str) -> None:
    def draw(seed: int) -> torch.Tensor:
        return sample_times(1.0, 3.0, 5, points=points, generator=torch.Generator().manual_seed(seed))

    a, b, c = draw(13), draw(13), draw(14)
    assert a.shape == (5,) and a.dtype == F64 and torch.equal(a, b) and not torch.equal(a, c)
    u = torch.rand(1 if points == "batch" else 5, generator=torch.Generator().manual_seed(13), dtype=F64)
    torch.testing.assert_close(a, (1.0 + 2.0 * u).expand(5), rtol=0, atol=0)
    assert len(set(a.tolist())) == (1 if points == "batch" else 5)
    many = sample_times(1.0, 3.0, 20_000, points="sample", generator=torch.Generator().manual_seed(15))
    assert many.min() >= 1.0 and many.max() <= 3.0
    assert abs(many.mean().item() - 2.0) < 4 * (2.0 / 12**0.5) / 20_000**0.5  # U[1, 3]: mean 2, sd 2/sqrt(12)


# --- the closed box: main solve by torchdiffeq's odeint_adjoint, the regulariser from leanfit's step ---------------


class Field(torch.nn.Module):
    """f(t, y) with per-sample float64 times t: (batch,), as leanfit calls it."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(16)
        self.l1, self.l2 = torch.nn.Linear(3, 16, dtype=F64), torch.nn.Linear(16, 3, dtype=F64)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=F64) * 0.7)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(y) + torch.sin(t)[:, None]))


class ScalarTime(torch.nn.Module):
    """torchdiffeq calls f(t, y) with a 0-d t: broadcast it to the batch."""

    def __init__(self, field: Field) -> None:
        super().__init__()
        self.field = field

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.field(t.expand(y.shape[0]), y)


@pytest.mark.parametrize("points", ["batch", "sample"])
def test_closed_box_with_torchdiffeq_adjoint(points: str) -> None:
    """task(odeint_adjoint) + lam * local_regularizer: the backward works, the parameter gradient is the adjoint
    task gradient plus lam times the regulariser's, and u(t_r) and the regulariser agree with leanfit's own solve."""
    torchdiffeq = pytest.importorskip("torchdiffeq")
    field, batch, lam, tol = Field(), 4, 10.0, 1e-9
    params = list(field.parameters())
    y0 = torch.randn(batch, 3, generator=torch.Generator().manual_seed(17), dtype=F64)
    t_eval = torch.linspace(0.0, 2.0, 5, dtype=F64)
    target = torch.zeros(5, batch, 3, dtype=F64)
    t_r = sample_times(0.0, 2.0, batch, points=points, generator=torch.Generator().manual_seed(18))
    times, keep, r = with_times(t_eval, t_r)

    def task_and_state() -> tuple[torch.Tensor, torch.Tensor]:
        ys = torchdiffeq.odeint_adjoint(ScalarTime(field), y0, times, rtol=tol, atol=tol, method="dopri5")
        return ((ys[keep] - target) ** 2).mean(), ys[r, torch.arange(batch)]

    def reg_of(y_r: torch.Tensor) -> tuple[torch.Tensor, LocalRegularizerInfo]:
        return local_regularizer(field, t_r, y_r, points=points, rtol=1e-6, atol=1e-6)

    task, y_r = task_and_state()
    reg, info = reg_of(y_r)
    (task + lam * reg).backward()
    total = [p.grad.clone() for p in params]
    task_grads = torch.autograd.grad(task_and_state()[0], params)
    reg_grads = torch.autograd.grad(reg_of(y_r)[0], params)
    for g_total, g_task, g_reg in zip(total, task_grads, reg_grads, strict=True):
        assert rel(g_total, g_task + lam * g_reg) <= 1e-12  # max-norm relative: summation order differs
    assert rel(lam * torch.cat([g.reshape(-1) for g in reg_grads]), torch.cat([g.reshape(-1) for g in total])) > 1e-2
    # leanfit's own solve at the same times: same u(t_r), same regulariser, same task gradient (dtO vs adjoint)
    sol = solve(field, y0, times, rtol=tol, atol=tol)
    assert rel(sol.ys[torch.arange(batch), r], y_r) < 1e-8  # measured 8e-10
    reg_leanfit, info_leanfit = regularize_solution(field, sol, step="initial", points=points, t_r=t_r, rtol=1e-6,
                                                    atol=1e-6)
    assert rel(reg_leanfit, reg) < 1e-7 and torch.equal(info_leanfit.t, info.t)  # measured 1.2e-8
    task_leanfit = ((sol.ys[:, keep].transpose(0, 1) - target) ** 2).mean()
    for a, b in zip(torch.autograd.grad(task_leanfit, params), task_grads, strict=True):
        assert rel(a, b) < 1e-6  # measured 4e-8


# --- bad input ------------------------------------------------------------------------------------------------------


def _local(**kwargs):
    args = {"f": vdp, "t_r": 0.5, "y_r": torch.ones(2, 2, dtype=F64)} | kwargs
    return local_regularizer(**args)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"points": "all"}, r"points='all' is invalid: expected 'batch' or 'sample'", id="points"),
        pytest.param({"estimate": "l2"}, r"estimate='l2' is invalid: expected 'error' or 'stiffness'", id="estimate"),
        pytest.param({"step": "taken"}, r"step='taken' is invalid: expected 'initial'", id="step-string"),
        pytest.param({"step": 0.0}, r"step=0.0 is invalid: expected finite steps > 0", id="step-zero"),
        pytest.param({"step": -0.1}, r"step=-0.1 is invalid", id="step-negative"),
        pytest.param({"step": True}, r"step=True is invalid", id="step-bool"),
        pytest.param(
            {"step": torch.tensor([0.1, 0.2], dtype=F64)},
            r"step=.* one step shared by the batch",
            id="step-not-shared-batch",
        ),
        pytest.param({"step": torch.tensor([0.1, 0.2, 0.3])}, r"step\.shape=\(3,\) is invalid", id="step-shape"),
        pytest.param({"y_r": torch.tensor([[1.0, float("nan")]])}, r"y_r='<NaN/inf>' is invalid", id="y-nan"),
        pytest.param({"y_r": torch.tensor(1.0)}, r"y_r=.* shaped \(batch, \*state\)", id="y-no-batch"),
        pytest.param({"t_r": float("inf")}, r"t_r=inf is invalid: expected finite times", id="t-inf"),
        pytest.param({"k1": torch.ones(2, 3)}, r"k1=\(2, 3\) is invalid", id="k1-shape"),
        pytest.param({"rtol": 0.0}, r"rtol=0.0 is invalid", id="rtol"),
        pytest.param({"method": "euler"}, r"method='euler' is invalid", id="method"),
        pytest.param(
            {"estimate": "stiffness", "method": replace(TSIT5, name="mine")},
            r"method='mine' is invalid: expected one of \['dopri5', 'tsit5'\]",
            id="stiffness-unknown",
        ),
        pytest.param(
            {"estimate": "stiffness", "method": replace(TSIT5, fsal=False)},
            r"method='tsit5' is invalid",
            id="stiffness-not-fsal",
        ),
    ],
)
def test_local_regularizer_bad_input(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _local(**kwargs)


def test_stiffness_allows_dopri5() -> None:
    """Dopri5 is FSAL too: its stiffness estimate is the step-by-step reference with the Dopri5 tableau and
    stability size, value and gradient."""
    params = mlp_params(d=2, hidden=4, seed=3)
    f = mlp(params)
    y, t = torch.tensor([[1.0, 0.5], [-0.3, 2.0]], dtype=F64), torch.full((2,), 0.5, dtype=F64)
    reg, info = _local(f=f, y_r=y, estimate="stiffness", method="dopri5", step=0.1, points="sample")
    want = local_regularizer_reference(f, t, y, info.h, 1e-6, 1e-8, points="sample", estimate="stiffness",
                                       stability=3.3066, tab=DOPRI5)
    assert info.nfe == 7 and want.item() > 0
    # local rtol: k7 - k6 and y1 - g6 are differences of nearly equal stages (measured 3e-12 on the value)
    torch.testing.assert_close(reg, want, rtol=1e-10, atol=0)
    for got, expected in zip(torch.autograd.grad(reg, params), torch.autograd.grad(want, params), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.fixture(scope="module")
def small_solves() -> dict[str, Solution]:
    y0 = torch.tensor(VDP_Y0, dtype=F64)
    return {"plain": solve(vdp, y0, [0.0, 1.0], rtol=1e-3, atol=1e-3),
            "record": solve(vdp, y0, [0.0, 1.0], rtol=1e-3, atol=1e-3, record_steps=True)}


@pytest.mark.parametrize(
    ("which", "kwargs", "match"),
    [
        pytest.param(
            "plain",
            {"sampling": "biased"},
            r"sol\.stats\.step_y=None is invalid.*record_steps=True",
            id="biased-no-record",
        ),
        pytest.param(
            "plain",
            {"step": "taken"},
            r"step_y=None is invalid.*sampling='unbiased'.*record_steps=True",
            id="taken-no-record",
        ),
        pytest.param(
            "record", {"sampling": "biased", "t_r": 0.5}, r"t_r=0\.5 is invalid: expected None", id="biased-with-t_r"
        ),
        pytest.param(
            "record",
            {"sampling": "biased", "points": "batch"},
            r"points='batch' is invalid: expected a step sequence shared",
            id="batch-on-per-sample",
        ),
        pytest.param("record", {"step": "initial"}, r"t_r=None is invalid.*with_times", id="initial-without-t_r"),
        pytest.param(
            "record",
            {"step": 0.1, "t_r": 0.3},
            r"t_r=\[0\.3, 0\.3, 0\.3\] is invalid.*among sol\.ts",
            id="t_r-not-saved",
        ),
        pytest.param("record", {"sampling": "always"}, r"sampling='always' is invalid", id="sampling"),
        pytest.param("record", {"step": "last"}, r"step='last' is invalid: expected 'initial' or 'taken'", id="step"),
        pytest.param("record", {"points": "one"}, r"points='one' is invalid", id="points"),
    ],
)
def test_regularize_solution_bad_input(small_solves: dict[str, Solution], which: str, kwargs: dict,
                                       match: str) -> None:
    with pytest.raises(ValueError, match=match):
        regularize_solution(vdp, small_solves[which], **({"points": "sample"} | kwargs))


def test_global_regularizer_needs_record(small_solves: dict[str, Solution]) -> None:
    with pytest.raises(ValueError, match=r"step_y=None is invalid.*global regulariser.*record_steps=True"):
        global_regularizer(small_solves["plain"])


@pytest.mark.parametrize(
    ("call", "match"),
    [
        pytest.param(
            lambda: with_times([0.0, 1.0], torch.tensor([0.5, 1.5])),
            r"t_r=\[0\.5, 1\.5\] is invalid: expected times in \[0\.0, 1\.0\]",
            id="with-times-outside",
        ),
        pytest.param(
            lambda: with_times([0.0, 1.0], torch.tensor([-0.1], dtype=F64)),
            r"t_r=\[-0\.1\] is invalid",
            id="with-times-before",
        ),
        pytest.param(
            lambda: with_times([1.0, 0.0], torch.tensor([0.5])),
            r"t_eval=.* strictly increasing",
            id="with-times-decreasing",
        ),
        pytest.param(lambda: sample_times(1.0, 1.0, 2), r"\(t0, t1\)=\(1\.0, 1\.0\) is invalid", id="span-empty"),
        pytest.param(lambda: sample_times(0.0, 1.0, 0), r"batch=0 is invalid", id="batch-zero"),
        pytest.param(lambda: sample_times(0.0, 1.0, 2, points="each"), r"points='each' is invalid", id="points"),
    ],
)
def test_time_helpers_bad_input(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()
