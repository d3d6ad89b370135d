"""solve(adjoint=...): checkpoint and backsolve gradients against direct backpropagation, torchdiffeq's
odeint_adjoint, an analytic gradient and finite differences (gradcheck); saved-tensor memory; the regularisers with
each; errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from leanfit.neural_de.models import ConcatTanhMLP
from leanfit.neural_de.regularizers import global_regularizer, regularize_solution, sample_times, with_times
from leanfit.neural_de.solver import PIController, Solution, solve
from leanfit.neural_de.tableaus import get_tableau

F64 = torch.float64
T_EVAL = [0.0, 0.4, 1.1, 1.5, 2.0]
PER_SAMPLE = [pytest.param(True, id="per-sample"), pytest.param(False, id="joint")]


def field(seed: int = 0, dim: int = 3, hidden: int = 8) -> ConcatTanhMLP:
    """The paper's time-concatenated tanh MLP with weights doubled (gain ~2: steps vary along the trajectory)."""
    torch.manual_seed(seed)
    f = ConcatTanhMLP(dim, hidden).double()
    with torch.no_grad():
        for p in f.parameters():
            p.mul_(2.0)
    return f


Y0 = torch.randn(3, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
W = torch.randn(3, len(T_EVAL), 3, generator=torch.Generator().manual_seed(2), dtype=F64)  # weights of ys in the loss


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max relative error ``max |a - b| / max |b|``."""
    return float((a - b).abs().max() / b.abs().max())


def loss_grads(f: nn.Module, adjoint: str, tol: float, per_sample: bool, method: str = "tsit5",
               with_global: bool = False) -> tuple[Solution, torch.Tensor, torch.Tensor]:
    """``sum(W * ys)`` (plus the global regulariser) and its gradient w.r.t. ``y0`` and ``f``'s parameters,
    concatenated."""
    y0 = Y0.clone().requires_grad_()
    sol = solve(f, y0, T_EVAL, method=method, rtol=tol, atol=tol, per_sample=per_sample, adjoint=adjoint,
                record_steps=with_global)
    loss = (W * sol.ys).sum() + (global_regularizer(sol) if with_global else 0.0)
    grads = torch.autograd.grad(loss, [y0, *f.parameters()])
    return sol, loss.detach(), torch.cat([g.flatten() for g in grads])


# --- checkpoint: the discrete gradients of direct backpropagation ----------------------------------------------


@pytest.mark.parametrize(
    ("method", "per_sample", "with_global"),
    [pytest.param(m, ps, g, id=f"{m}-{'per-sample' if ps else 'joint'}-{'ys+global' if g else 'ys'}")
     for m, ps, g in [("tsit5", True, False), ("tsit5", True, True), ("tsit5", False, True), ("dopri5", False, False),
                      ("dopri5", True, True)]],
)
def test_checkpoint_equals_direct(method: str, per_sample: bool, with_global: bool) -> None:
    """Same forward (ys, step record, statistics bitwise), same gradient up to rounding (measured <= 1.2e-15
    relative), five t_eval points, a batch of 3; the backward recomputes every kept step: stages x kept attempts
    calls of f (kept = attempts in which some sample accepted: n_accepted for the joint step sequence)."""
    f = field()
    direct, loss_d, g_d = loss_grads(f, "direct", 1e-8, per_sample, method, with_global)
    ckpt, loss_c, g_c = loss_grads(f, "checkpoint", 1e-8, per_sample, method, with_global)
    assert torch.equal(direct.ys, ckpt.ys) and torch.equal(loss_d, loss_c)
    for key in ("nfe", "n_accepted", "n_rejected", "step_t", "step_h"):
        torch.testing.assert_close(getattr(ckpt.stats, key), getattr(direct.stats, key), rtol=0, atol=0,
                                   equal_nan=True, msg=key)
    assert rel(g_c, g_d) <= 1e-10, rel(g_c, g_d)
    stages, n_acc = get_tableau(method).stages, ckpt.stats.n_accepted
    assert ckpt.stats.adjoint == "checkpoint" and direct.stats.nfe_backward == 0
    if per_sample:  # kept attempts: at least the busiest sample's steps, at most all attempts
        assert ckpt.stats.nfe_backward % stages == 0
        assert int(n_acc.max()) <= ckpt.stats.nfe_backward // stages <= ckpt.stats.n_attempts
    else:
        assert ckpt.stats.nfe_backward == stages * int(n_acc[0])


@pytest.mark.parametrize("adjoint", ["checkpoint", "backsolve"])
def test_closure_parameter_by_adjoint_params_matches_analytic(adjoint: str) -> None:
    """y' = -lam y: dy(T)/dy0 = exp(-lam T), dy(T)/dlam = -T y0 exp(-lam T); the field is a closure, so lam is
    passed as adjoint_params. Both agree with the exact derivative to the solve's accuracy (rtol 1e-10)."""
    lam = torch.tensor([0.5, 2.0], dtype=F64, requires_grad=True)
    y0 = torch.tensor([[1.0], [3.0]], dtype=F64, requires_grad=True)
    sol = solve(lambda t, y: -lam[:, None] * y, y0, [0.0, 1.5], rtol=1e-10, atol=1e-12, adjoint=adjoint,
                adjoint_params=[lam])
    g_y0, g_lam = torch.autograd.grad(sol.ys[:, -1].sum(), (y0, lam))
    decay = torch.exp(-lam.detach() * 1.5)
    torch.testing.assert_close(g_y0[:, 0], decay, rtol=1e-8, atol=0)
    torch.testing.assert_close(g_lam, -1.5 * y0.detach()[:, 0] * decay, rtol=1e-8, atol=0)


# --- backsolve: the continuous adjoint, to the solver tolerance -------------------------------------------------


@pytest.mark.parametrize(
    ("tol", "low", "high"),
    [pytest.param(1e-4, 1e-6, 1e-4, id="tol1e-4"), pytest.param(1e-7, 1e-9, 1e-6, id="tol1e-7"),
     pytest.param(1e-10, 1e-12, 1e-8, id="tol1e-10")],
)
def test_backsolve_matches_direct_to_the_tolerance(tol: float, low: float, high: float) -> None:
    """Per-sample steps: the relative gradient difference follows the tolerance (measured 2.1e-5, 3.3e-7, 7.7e-10;
    direct's own error against a 1e-12 solve is of the same size), so a looser tolerance gives a looser match: the
    band's lower end says the difference is really the tolerance's, not rounding."""
    f = field()
    _, loss_d, g_d = loss_grads(f, "direct", tol, True)
    sol, loss_b, g_b = loss_grads(f, "backsolve", tol, True)
    assert torch.equal(loss_d, loss_b) and sol.stats.adjoint == "backsolve" and sol.stats.nfe_backward > 0
    assert low < rel(g_b, g_d) < high, rel(g_b, g_d)


def test_backsolve_joint_matches_direct() -> None:
    """The shared step sequence (one error norm over the batch, in the backward pass too): 2.6e-10 at 1e-10."""
    f = field()
    _, _, g_d = loss_grads(f, "direct", 1e-10, False)
    _, _, g_b = loss_grads(f, "backsolve", 1e-10, False)
    assert rel(g_b, g_d) < 1e-8, rel(g_b, g_d)


def test_backsolve_joint_parameter_products_equal_the_stage_graph_quadrature(monkeypatch) -> None:
    """A joint step takes a^T df/dtheta in each call's own backward pass (no stage graph kept); the same solve with
    the per-sample quadrature (every stage graph kept until the attempt is decided) gives the same gradients to
    rounding, and the same backward NFE."""
    from leanfit.neural_de import solver

    f = field()
    sol_fast, _, g_fast = loss_grads(f, "backsolve", 1e-6, False)

    class GraphKeeping(solver._AdjointField):
        def __init__(self, f, params, joint=False) -> None:
            super().__init__(f, params, joint=False)

    monkeypatch.setattr(solver, "_AdjointField", GraphKeeping)
    sol_slow, _, g_slow = loss_grads(f, "backsolve", 1e-6, False)
    assert rel(g_fast, g_slow) < 1e-13, rel(g_fast, g_slow)
    assert sol_fast.stats.nfe_backward == sol_slow.stats.nfe_backward > 0


def test_backsolve_matches_torchdiffeq_odeint_adjoint() -> None:
    """torchdiffeq's continuous adjoint on the same problem (dopri5, rtol = atol = 1e-10, one norm over the batch):
    3.5e-10 relative. Its error norm also covers the parameter integral (leanfit's leaves it out, like torchdiffeq's
    seminorm option), so the two take different backward steps and agree to the tolerance, not to rounding."""
    torchdiffeq = pytest.importorskip("torchdiffeq")
    f = field()
    _, _, ours = loss_grads(f, "backsolve", 1e-10, False, method="dopri5")
    y0 = Y0.clone().requires_grad_()
    ys = torchdiffeq.odeint_adjoint(f, y0, torch.tensor(T_EVAL, dtype=F64), rtol=1e-10, atol=1e-10,
                                    method="dopri5")  # (T, batch, dim)
    theirs = torch.autograd.grad((W * ys.transpose(0, 1)).sum(), [y0, *f.parameters()])
    assert rel(ours, torch.cat([g.flatten() for g in theirs])) < 1e-8


# --- gradcheck (float64) ------------------------------------------------------------------------------------------


def _mlp_params(seed: int, hidden: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=F64).requires_grad_() for shape in ((2, hidden), (hidden,),
                                                                                        (hidden, 2))]


def _mlp(params: tuple[torch.Tensor, ...]):
    w1, b1, w2 = params
    return lambda t, y: torch.tanh(y @ w1 + b1 + torch.sin(t).to(y.dtype)[:, None]) @ w2


@pytest.mark.parametrize("per_sample", PER_SAMPLE)
def test_gradcheck_checkpoint(per_sample: bool) -> None:
    """ys at four times and the global regulariser w.r.t. y0 and the parameters. As for direct (test_regularizers),
    the steps must not move with the inputs: a fixed-step controller at h0 = 0.25 (0.2 for the second sample
    per_sample, so samples finish at different attempts) with tolerances that reject nothing."""
    params = _mlp_params(6, 4)
    y0 = torch.randn(2, 2, generator=torch.Generator().manual_seed(7), dtype=F64, requires_grad=True)
    fixed = PIController(beta1=0.0, beta2=0.0, safety=1.0)
    h0 = torch.tensor([0.25, 0.2], dtype=F64) if per_sample else 0.25

    def fn(y0: torch.Tensor, *p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sol = solve(_mlp(p), y0, [0.0, 0.3, 0.6, 1.0], rtol=0.1, atol=0.1, h0=h0, controller=fixed,
                    per_sample=per_sample, record_steps=True, adjoint="checkpoint", adjoint_params=list(p))
        assert sol.stats.n_rejected.sum() == 0
        return sol.ys, global_regularizer(sol)

    assert torch.autograd.gradcheck(fn, (y0, *params), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("per_sample", PER_SAMPLE)
def test_gradcheck_backsolve(per_sample: bool) -> None:
    """A weighted sum of ys at three times w.r.t. y0 and the parameters, adaptive steps at rtol = atol = 1e-10: the
    continuous adjoint agrees with the finite differences of the discrete solve to ~1e-9, inside atol = 1e-7."""
    params = _mlp_params(6, 2)
    y0 = torch.randn(2, 2, generator=torch.Generator().manual_seed(7), dtype=F64, requires_grad=True)
    weights = torch.randn(2, 3, 2, generator=torch.Generator().manual_seed(8), dtype=F64)

    def fn(y0: torch.Tensor, *p: torch.Tensor) -> torch.Tensor:
        sol = solve(_mlp(p), y0, [0.0, 0.4, 1.0], rtol=1e-10, atol=1e-10, per_sample=per_sample,
                    adjoint="backsolve", adjoint_params=list(p))
        return (weights * sol.ys).sum()

    assert torch.autograd.gradcheck(fn, (y0, *params), eps=1e-6, atol=1e-7, rtol=1e-6)


# --- memory: bytes held by the autograd graph -------------------------------------------------------------------


class Rotating(nn.Module):
    """``f(t, y) = S y + 0.1 mlp(t, y)`` with ``S`` a fixed block rotation at angular speed 2 pi: the solution keeps
    oscillating, so the number of steps grows in proportion to the time span."""

    def __init__(self, dim: int = 8, hidden: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mlp = ConcatTanhMLP(dim, hidden).double()
        rot = torch.zeros(dim, dim, dtype=F64)
        for i in range(0, dim, 2):
            rot[i, i + 1], rot[i + 1, i] = 2 * math.pi, -2 * math.pi
        self.register_buffer("rot", rot)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y @ self.rot.T + 0.1 * self.mlp(t, y)


def saved_bytes(adjoint: str, span: float) -> tuple[int, Solution]:
    """Bytes of the distinct storages the graph of one solve saves (``saved_tensors_hooks``; a tensor saved by
    several operations, e.g. a weight, counts once), for batch 4, state 8, five t_eval points over ``span``."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    f = Rotating()
    y0 = torch.randn(4, 8, generator=torch.Generator().manual_seed(1), dtype=F64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sol = solve(f, y0, torch.linspace(0.0, span, 5, dtype=F64), rtol=1e-4, atol=1e-4, per_sample=False,
                    adjoint=adjoint)
    assert sol.ys.requires_grad  # forward only: the gradients are the other tests' subject
    return sum(storages.values()), sol


@pytest.fixture(scope="module")
def memory() -> dict[tuple[str, float], tuple[int, Solution]]:
    """Short (1) and long (13) spans: 10x the steps (measured 11 and 112 accepted, none rejected)."""
    return {(a, s): saved_bytes(a, s) for a in ("direct", "checkpoint", "backsolve") for s in (1.0, 13.0)}


@pytest.mark.parametrize("span", [1.0, 13.0], ids=["short", "long"])
def test_checkpoint_saves_one_state_per_step(memory: dict, span: float) -> None:
    """Exactly (t, h, accepted, y) per accepted step plus three int64 indices per output, well under a quarter of
    direct's (stages, stage states and the field's activations per attempt): measured 3948 against 58556 bytes
    (short) and 36672 against 546992 (long), 1/15."""
    ckpt_bytes, sol = memory["checkpoint", span]
    direct_bytes, _ = memory["direct", span]
    steps, batch, n_out = int(sol.stats.n_accepted[0]), 4, 4 * 4  # joint steps: one kept attempt per accepted step
    assert ckpt_bytes == steps * batch * (8 + 8 + 1 + 8 * 8) + 3 * 8 * n_out  # t, h, accepted, y; outputs
    assert ckpt_bytes <= direct_bytes / 4, (ckpt_bytes, direct_bytes)


def test_backsolve_memory_independent_of_steps(memory: dict) -> None:
    """10x the steps, the same bytes: ys only (batch 4 x 5 times x 8 x float64); direct and checkpoint grow ~10x."""
    short, long = memory["backsolve", 1.0], memory["backsolve", 13.0]
    assert long[1].stats.n_accepted[0] >= 10 * short[1].stats.n_accepted[0]
    assert short[0] == long[0] == 4 * 5 * 8 * 8
    for adjoint in ("direct", "checkpoint"):
        assert memory[adjoint, 13.0][0] >= 9 * memory[adjoint, 1.0][0], adjoint


# --- the regularisers with each adjoint ---------------------------------------------------------------------------


@pytest.mark.parametrize("adjoint", ["checkpoint", "backsolve"])
def test_local_regularizer_composes(adjoint: str) -> None:
    """task(ys) + lam * local regulariser (the paper's: t_r added to the evaluation times, the initial step there).
    The regulariser's step is a separate graph from a detached u(t_r): its value and its gradient are bitwise the
    same whatever the main solve's adjoint; the total gradient is direct's to rounding (checkpoint) or to the
    tolerance (backsolve, 1e-8 at rtol 1e-10)."""
    f = field()
    t_r = sample_times(0.0, 2.0, 3, generator=torch.Generator().manual_seed(5))
    times, keep, r = with_times(T_EVAL, t_r)
    out = {}
    for mode in ("direct", adjoint):
        y0 = Y0.clone().requires_grad_()
        sol = solve(f, y0, times, rtol=1e-10, atol=1e-10, per_sample=False, adjoint=mode)
        reg, _ = regularize_solution(f, sol, t_r=t_r, rtol=1e-10, atol=1e-10)
        task = (W * sol.ys[:, keep]).sum()
        g_reg = torch.autograd.grad(reg, list(f.parameters()), retain_graph=True)
        g_all = torch.autograd.grad(task + 10.0 * reg, [y0, *f.parameters()])
        out[mode] = reg.detach(), torch.cat([g.flatten() for g in g_reg]), torch.cat([g.flatten() for g in g_all])
        assert r.numel() == 3
    (reg_d, g_reg_d, g_d), (reg_a, g_reg_a, g_a) = out["direct"], out[adjoint]
    assert torch.equal(reg_d, reg_a) and torch.equal(g_reg_d, g_reg_a)
    assert rel(g_a, g_d) <= (1e-10 if adjoint == "checkpoint" else 1e-8), rel(g_a, g_d)


def test_taken_step_regularizer_with_checkpoint() -> None:
    """The taken-step local regulariser reads the step record (stats.step_y, detached with checkpoint): the same
    value and total gradient as with direct."""
    f = field()
    out = {}
    for mode in ("direct", "checkpoint"):
        sol = solve(f, Y0, T_EVAL, rtol=1e-8, atol=1e-8, record_steps=True, adjoint=mode)
        reg, _ = regularize_solution(f, sol, step="taken", points="sample", first_stage="graph", rtol=1e-8,
                                     atol=1e-8, generator=torch.Generator().manual_seed(3))
        grads = torch.autograd.grad((W * sol.ys).sum() + reg, list(f.parameters()))
        out[mode] = reg.detach(), torch.cat([g.flatten() for g in grads])
    assert torch.equal(out["direct"][0], out["checkpoint"][0])
    assert rel(out["checkpoint"][1], out["direct"][1]) <= 1e-10


# --- errors and edges ---------------------------------------------------------------------------------------------


def _decay(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -y


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        pytest.param({"adjoint": "adjoint"}, ValueError, r"adjoint='adjoint' is invalid.*'direct' or 'checkpoint' or "
                     "'backsolve'", id="adjoint-name"),
        pytest.param({"adjoint": True}, ValueError, r"adjoint=True is invalid", id="adjoint-bool"),
        pytest.param({"adjoint_params": []}, ValueError, r"adjoint_params=.*None for adjoint='direct'",
                     id="params-with-direct"),
        pytest.param({"adjoint": "checkpoint"}, ValueError, r"adjoint_params=None.*not an nn.Module.*"
                     r"adjoint_params=\[w, b, ...\]", id="closure-without-params"),
        pytest.param({"adjoint": "backsolve", "adjoint_params": torch.ones(2)}, TypeError,
                     r"adjoint_params='Tensor'.*list or tuple", id="params-tensor"),
        pytest.param({"adjoint": "backsolve", "adjoint_params": [1.0]}, TypeError, r"adjoint_params\[0\]='float'",
                     id="params-not-tensors"),
    ],
)
def test_bad_adjoint_arguments(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        solve(_decay, torch.ones(2, 3, dtype=F64), [0.0, 1.0], **kwargs)


def test_global_regularizer_refuses_backsolve() -> None:
    sol = solve(field(), Y0, T_EVAL, record_steps=True, adjoint="backsolve")
    assert sol.stats.step_error is not None and not sol.stats.step_error.requires_grad
    with pytest.raises(ValueError, match=r"adjoint='backsolve' is invalid.*discrete.*adjoint='checkpoint'"):
        global_regularizer(sol)


@pytest.mark.parametrize("adjoint", ["checkpoint", "backsolve"])
def test_empty_batch_and_no_parameters(adjoint: str) -> None:
    """A batch of 0 calls nothing; a field without parameters (adjoint_params=[]) still gives y0 its gradient:
    y' = -y, dy(1)/dy0 = exp(-1)."""
    empty = solve(_decay, torch.zeros(0, 2, dtype=F64), [0.0, 1.0], adjoint=adjoint, adjoint_params=[])
    assert empty.ys.shape == (0, 2, 2) and empty.stats.adjoint == adjoint
    y0 = torch.ones(2, 1, dtype=F64, requires_grad=True)
    sol = solve(_decay, y0, [0.0, 1.0], rtol=1e-10, atol=1e-10, adjoint=adjoint, adjoint_params=[])
    (g,) = torch.autograd.grad(sol.ys[:, -1].sum(), y0)
    torch.testing.assert_close(g, torch.full_like(g, math.exp(-1.0)), rtol=1e-8, atol=0)
