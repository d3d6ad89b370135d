"""models: the concat-tanh field, the ODE/SDE classifiers with every regulariser preset, the SDE local regulariser."""

from __future__ import annotations

import pytest
import torch

from leanfit.core.errors import ConfigError
from leanfit.neural_de.models import (
    REGULARIZER_PRESETS,
    ConcatTanhMLP,
    NeuralODEClassifier,
    NeuralSDEClassifier,
    RegularizerSpec,
    sde_local_regularizer,
)
from leanfit.neural_de.regularizers import (
    global_regularizer,
    local_regularizer,
    regularize_solution,
    sample_times,
    with_times,
)
from leanfit.neural_de.sde import sde_solve
from leanfit.neural_de.solver import solve
from tests.reference import sde_local_regularizer_reference

F64 = torch.float64
BATCH, FEATURES, HIDDEN, CLASSES = 8, 16, 8, 3
TOL = 1e-3  # loose tolerances keep every solve at a few steps
PRESETS = [pytest.param(name, id=name) for name in REGULARIZER_PRESETS]
REGULARIZED = [pytest.param(name, id=name) for name in REGULARIZER_PRESETS if name != "vanilla"]
ODE_ONLY = ("local_subset", "local_start", "local_start_k1", "local_taken_const_batch", "local_taken_batch")
SDE_PRESETS = [pytest.param(name, id=name) for name in REGULARIZER_PRESETS if name not in ODE_ONLY]


def _x(dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(BATCH, FEATURES, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _ode(seed: int = 0, **kw) -> NeuralODEClassifier:
    torch.manual_seed(seed)
    return NeuralODEClassifier(FEATURES, HIDDEN, CLASSES, **{"rtol": TOL, "atol": TOL, **kw})


def _sde(seed: int = 0, **kw) -> NeuralSDEClassifier:
    torch.manual_seed(seed)
    return NeuralSDEClassifier(FEATURES, **{"latent": 6, "hidden": 12, "n_classes": CLASSES, **kw})


def _gen(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- ConcatTanhMLP ---


def test_concat_tanh_mlp_matches_formula() -> None:
    """f(t, y) = W2 tanh(W1 [y, t] + b1) + b2 with each sample's own float64 time cast to y's dtype."""
    torch.manual_seed(0)
    f = ConcatTanhMLP(5, 7)
    y, t = torch.randn(4, 5), torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=F64)
    w1, b1, w2, b2 = f.linear_in.weight, f.linear_in.bias, f.linear_out.weight, f.linear_out.bias
    ref = torch.tanh(torch.cat([y, t.float()[:, None]], 1) @ w1.T + b1) @ w2.T + b2
    out = f(t, y)
    assert out.shape == (4, 5) and out.dtype == torch.float32
    assert torch.allclose(out, ref, atol=1e-6, rtol=0), f"max diff {(out - ref).abs().max().item():.3g}"


def test_concat_tanh_mlp_mnist_shapes() -> None:
    """The paper's MNIST field is 785 -> 100 -> 784; without time it is 784 -> 100 -> 784."""
    assert ConcatTanhMLP(784, 100).linear_in.weight.shape == (100, 785)
    assert ConcatTanhMLP(784, 100).linear_out.weight.shape == (784, 100)
    assert ConcatTanhMLP(784, 100, time_dependent=False).linear_in.weight.shape == (100, 784)


def test_concat_tanh_mlp_time_dependence() -> None:
    """The output moves with t exactly by the time column's contribution; a time-independent field does not move."""
    torch.manual_seed(1)
    y = torch.randn(3, 4, dtype=F64)
    f, g = ConcatTanhMLP(4, 6).double(), ConcatTanhMLP(4, 6, time_dependent=False).double()
    pre = y @ f.linear_in.weight[:, :4].T + f.linear_in.bias
    col = f.linear_in.weight[:, 4]
    expected = (torch.tanh(pre + 0.8 * col) - torch.tanh(pre)) @ f.linear_out.weight.T
    moved = f(torch.full((3,), 0.8, dtype=F64), y) - f(torch.zeros(3, dtype=F64), y)
    assert moved.abs().max() > 1e-3
    assert torch.allclose(moved, expected, atol=1e-14, rtol=0)
    assert torch.equal(g(torch.zeros(3, dtype=F64), y), g(torch.ones(3, dtype=F64), y))


@pytest.mark.parametrize(
    "t", [0.3, torch.tensor(0.3, dtype=F64), torch.tensor(0.3)], ids=["float", "0d-f64", "0d-f32"]
)
def test_concat_tanh_mlp_scalar_time(t) -> None:
    """A scalar or 0-d time (torchdiffeq's convention) is broadcast: same values as a (batch,) time."""
    torch.manual_seed(2)
    f, y = ConcatTanhMLP(4, 6), torch.randn(5, 4)
    ref = f(torch.full((5,), 0.3, dtype=F64), y)
    assert torch.allclose(f(t, y), ref, atol=1e-7, rtol=0)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        pytest.param(lambda: ConcatTanhMLP(0, 4), r"dim=0 is invalid", id="dim"),
        pytest.param(lambda: ConcatTanhMLP(4, 2.5), r"hidden=2.5 is invalid", id="hidden"),
        pytest.param(lambda: ConcatTanhMLP(4, 4)(0.0, torch.zeros(2, 3)), r"y.shape=\(2, 3\).*\(batch, 4\)", id="y"),
        pytest.param(lambda: ConcatTanhMLP(4, 4)(torch.zeros(3), torch.zeros(2, 4)), r"t.shape=\(3,\)", id="t"),
    ],
)
def test_concat_tanh_mlp_errors(build, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()


# --- RegularizerSpec ---


def test_presets_are_the_documented_configurations() -> None:
    expected = {
        "vanilla": ("none", False, False),
        "global": ("global", True, False),
        "local_unbiased": (("local", "unbiased", "initial", "batch"), False, True),
        "local_biased": (("local", "biased", "initial", "batch"), True, False),
        "local_taken": (("local", "unbiased", "taken", "sample", "error", "graph"), True, False),
        "local_sample": (("local", "unbiased", "initial", "sample"), False, True),
        "local_subset": (("local", "unbiased", "taken", "sample", "error", "graph", 0.125), True, False),
    }
    for name, (fields, record, t_r) in expected.items():
        spec = RegularizerSpec.preset(name)
        args = fields if isinstance(fields, tuple) else (fields,)
        assert spec == RegularizerSpec(*args), name
        assert (spec.needs_record, spec.needs_t_r) == (record, t_r), name
    assert RegularizerSpec.from_arg(None) == RegularizerSpec("none")
    assert RegularizerSpec.from_arg("local") == RegularizerSpec.preset("local_unbiased")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"kind": "ernode"}, r"RegularizerSpec.kind='ernode' is invalid.*'global'.*preset", id="kind"),
        pytest.param({"sampling": "uniform"}, r"RegularizerSpec.sampling='uniform'.*'biased'", id="sampling"),
        pytest.param({"step": 0.1}, r"RegularizerSpec.step=0.1.*'taken'", id="step"),
        pytest.param({"points": "all"}, r"RegularizerSpec.points='all'.*'sample'", id="points"),
        pytest.param({"estimate": "taylor"}, r"RegularizerSpec.estimate='taylor'", id="estimate"),
        pytest.param({"kind": "global", "sampling": "biased"},
                     r"RegularizerSpec.sampling='biased'.*kind='global'.*drop it", id="global-with-sampling"),
        pytest.param({"kind": "none", "points": "sample"}, r"RegularizerSpec.points='sample'.*kind='none'",
                     id="none-with-points"),
    ],
)
def test_spec_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RegularizerSpec(**kwargs)


def test_unknown_preset_lists_the_names() -> None:
    with pytest.raises(ValueError, match=r"regularizer='ernode' is invalid.*'local_biased'.*RegularizerSpec"):
        RegularizerSpec.preset("ernode")


# --- NeuralODEClassifier ---


@pytest.mark.parametrize("name", PRESETS)
def test_ode_preset_forward_and_regularizer_gradient(name: str) -> None:
    """Finite logits; a finite positive regulariser whose gradient alone reaches the vector field (not the head)."""
    model = _ode()
    out = model(_x(), name, generator=_gen())
    assert out.logits.shape == (BATCH, CLASSES) and torch.isfinite(out.logits).all()
    assert out.solution is not None and out.solution.ys.shape == (BATCH, 2, FEATURES)
    if name == "vanilla":
        assert out.reg is None and out.reg_nfe == 0
        return
    assert out.reg is not None and out.reg.dim() == 0
    assert torch.isfinite(out.reg) and out.reg.item() > 0, f"{name}: reg={out.reg.item()!r}"
    out.reg.backward()
    for p in model.func.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name
    assert model.head.weight.grad is None


# one recorded point per batch needs the shared step sequence of per_sample=False (its error is tested below)
NFE_CASES = [pytest.param(name, ps, id=f"{name}-{'per-sample' if ps else 'joint'}")
             for ps in (False, True) for name, spec in REGULARIZER_PRESETS.items()
             if not (ps and spec.needs_record and spec.kind == "local" and spec.points == "batch")]


@pytest.mark.parametrize(("name", "per_sample"), NFE_CASES)
def test_ode_nfe_equals_counted_calls(name: str, per_sample: bool) -> None:
    """nfe_joint + reg_nfe equals the calls of the vector field counted by a hook; nfe <= nfe_joint per sample."""
    model, calls = _ode(per_sample=per_sample), [0]
    model.func.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    out = model(_x(), name, generator=_gen())
    spec = REGULARIZER_PRESETS[name]  # 6 stages + k1 (+ the initial-step heuristic)
    expected_reg = 0 if spec.kind != "local" else 7 + (spec.step == "initial")
    assert out.nfe_total == calls[0] and out.reg_nfe == expected_reg
    assert int(out.nfe.max()) <= out.nfe_joint and (per_sample or (out.nfe == out.nfe_joint).all())


def test_vanilla_equals_direct_solve_and_head() -> None:
    model, x = _ode(), _x()
    out = model(x)
    sol = solve(model.func, x, [0.0, 1.0], rtol=TOL, atol=TOL, per_sample=False)
    assert torch.equal(out.logits, model.head(sol.ys[:, -1]))
    assert torch.equal(out.nfe, sol.stats.nfe) and out.nfe_joint == sol.stats.nfe_joint


def test_global_equals_direct_record_steps_solve() -> None:
    model, x = _ode(), _x()
    out = model(x, "global")
    sol = solve(model.func, x, [0.0, 1.0], rtol=TOL, atol=TOL, per_sample=False, record_steps=True)
    assert out.reg is not None and torch.equal(out.reg, global_regularizer(sol))


@pytest.mark.parametrize("name", ["local_unbiased", "local_sample"])
def test_unbiased_initial_strips_t_r_and_matches_reference(name: str) -> None:
    """t_r joins the solve's times but not the outputs: logits equal vanilla's (dense output leaves the steps
    alone), and the value equals local_regularizer at u(t_r) of a direct solve with the same draw."""
    model, x = _ode(), _x()
    vanilla, out = model(x), model(x, name, generator=_gen(5))
    assert out.solution is not None and out.solution.ts.tolist() == [0.0, 1.0]
    assert (out.logits - vanilla.logits).abs().max().item() <= TOL
    points = RegularizerSpec.preset(name).points
    t_r = sample_times(0.0, 1.0, BATCH, points=points, generator=_gen(5))
    times, _, r = with_times([0.0, 1.0], t_r)
    sol = solve(model.func, x, times, rtol=TOL, atol=TOL, per_sample=False)
    ref, _ = local_regularizer(model.func, t_r, sol.ys[torch.arange(BATCH), r], points=points, rtol=TOL, atol=TOL)
    assert out.reg is not None and torch.allclose(out.reg, ref, rtol=1e-6, atol=0)
    assert out.reg_info is not None and torch.equal(out.reg_info.t, t_r)


def test_taken_step_comes_from_the_step_record() -> None:
    """local_taken steps from a recorded accepted step start with that step's own size, for every sample."""
    out = _ode(per_sample=True)(_x(), "local_taken", generator=_gen())
    info, stats = out.reg_info, out.solution.stats
    assert info is not None
    hit = (stats.step_t == info.t[:, None]) & (stats.step_h == info.h[:, None])
    assert hit.any(1).all(), f"samples without a matching step: {(~hit.any(1)).nonzero().flatten().tolist()}"


def test_points_batch_needs_a_shared_step_record() -> None:
    with pytest.raises(ValueError, match=r"regularizer.points='batch'.*per_sample=False.*points='sample'"):
        _ode(per_sample=True)(_x(), "local_biased")


@pytest.mark.parametrize(
    ("build", "match"),
    [
        pytest.param(lambda: _ode(backend="torchdiffeq"), r"method='tsit5'.*'dopri5'", id="td-method"),
        pytest.param(lambda: _ode(adjoint="adjoint"), r"adjoint='adjoint'.*'direct' or 'checkpoint' or 'backsolve'",
                     id="adjoint"),
        pytest.param(lambda: _ode(method="dopri5", backend="torchdiffeq", adjoint="checkpoint"),
                     r"adjoint='checkpoint'.*backend='torchdiffeq'.*backend='leanfit'", id="adjoint-torchdiffeq"),
        pytest.param(lambda: _ode(adjoint="backsolve")(torch.zeros(4, 16), "global"),
                     r"adjoint='backsolve'.*global regulariser.*adjoint='checkpoint'", id="adjoint-global"),
        pytest.param(lambda: _ode(backend="jax"), r"backend='jax'", id="backend"),
        pytest.param(lambda: _ode(t1=0.0), r"t1=0.0 is invalid", id="t1"),
        pytest.param(lambda: _ode(rtol=-1.0), r"rtol=-1.0 is invalid", id="rtol"),
        pytest.param(lambda: _ode()(torch.zeros(4, 15)), r"x.shape=\(4, 15\).*16 features", id="x"),
        pytest.param(lambda: _ode()(torch.zeros(4, 16), "ernode"), r"regularizer='ernode'", id="regularizer"),
    ],
)
def test_ode_classifier_errors(build, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize("adjoint", ["direct", "backsolve"], ids=["odeint", "odeint_adjoint"])
def test_torchdiffeq_backend_matches_leanfit(adjoint: str) -> None:
    """The closed box: torchdiffeq's dopri5 (optionally with the continuous adjoint) and leanfit's dopri5 agree on
    logits, the local regulariser at the same t_r and the gradient of logits + regulariser, within the tolerance."""
    pytest.importorskip("torchdiffeq")
    x = _x(F64)
    ours = _ode(method="dopri5", rtol=1e-8, atol=1e-8).double()
    theirs = _ode(method="dopri5", rtol=1e-8, atol=1e-8, backend="torchdiffeq", adjoint=adjoint).double()
    theirs.load_state_dict(ours.state_dict())
    outs, grads = [], []
    for model in (ours, theirs):
        outs.append(model(x, "local_unbiased", generator=_gen(3)))
        (outs[-1].logits.square().sum() + outs[-1].reg).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    a, b = outs
    assert (a.logits - b.logits).abs().max().item() < 1e-6
    assert b.reg is not None and torch.allclose(a.reg, b.reg, rtol=1e-4, atol=0)
    assert b.nfe_joint > 0 and (b.nfe == b.nfe_joint).all() and b.reg_nfe == 8
    rel = ((grads[0] - grads[1]).abs().max() / grads[0].abs().max()).item()
    assert rel < 1e-5, f"relative gradient difference {rel:.3g}"


@pytest.mark.parametrize(
    ("adjoint", "name", "per_sample", "tol", "bound"),
    [
        pytest.param("checkpoint", "global", False, 1e-6, 1e-10, id="checkpoint-global"),
        pytest.param("checkpoint", "local_taken", True, 1e-6, 1e-10, id="checkpoint-local_taken"),
        pytest.param("backsolve", "local_unbiased", False, 1e-8, 1e-6, id="backsolve-local_unbiased"),
    ],
)
def test_ode_classifier_adjoint_matches_direct(adjoint: str, name: str, per_sample: bool, tol: float,
                                               bound: float) -> None:
    """adjoint= changes only how the gradient is computed: the same logits, regulariser and NFE (bitwise), and the
    gradient of logits + regulariser of the default adjoint='direct': checkpoint to rounding (at any tolerance),
    backsolve to the tolerance (rtol = atol = 1e-8)."""
    x = _x(F64)
    direct = _ode(rtol=tol, atol=tol, per_sample=per_sample).double()
    other = _ode(rtol=tol, atol=tol, per_sample=per_sample, adjoint=adjoint).double()
    other.load_state_dict(direct.state_dict())
    assert direct.adjoint == "direct"
    outs, grads = [], []
    for model in (direct, other):
        outs.append(model(x, name, generator=_gen(3)))
        (outs[-1].logits.square().sum() + (0.0 if outs[-1].reg is None else outs[-1].reg)).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    a, b = outs
    assert torch.equal(a.logits, b.logits) and torch.equal(a.nfe, b.nfe) and a.reg_nfe == b.reg_nfe
    assert (a.reg is None and b.reg is None) or (a.reg is not None and b.reg is not None and torch.equal(a.reg, b.reg))
    rel = ((grads[0] - grads[1]).abs().max() / grads[0].abs().max()).item()
    assert rel <= bound, f"relative gradient difference {rel:.3g}"


def test_ode_classifier_refuses_a_boolean_adjoint() -> None:
    with pytest.raises(TypeError, match=r"adjoint=True is invalid.*adjoint='backsolve'.*odeint_adjoint"):
        _ode(adjoint=True)


def test_torchdiffeq_backend_rejects_record_based_regularizers() -> None:
    pytest.importorskip("torchdiffeq")
    with pytest.raises(ValueError, match=r"regularizer=.*backend='torchdiffeq'.*backend='leanfit'"):
        _ode(method="dopri5", backend="torchdiffeq")(_x(), "global")


# --- NeuralSDEClassifier and sde_local_regularizer ---


def test_sde_seeded_reproducibility() -> None:
    model, x = _sde(), _x()
    a, b, c = (model(x, "local_unbiased", generator=_gen(s)) for s in (7, 7, 8))
    assert torch.equal(a.logits, b.logits) and torch.equal(a.reg, b.reg) and torch.equal(a.nfe, b.nfe)
    assert (a.logits - c.logits).abs().max().item() > 1e-4


def test_sde_refuses_the_subset_regulariser() -> None:
    with pytest.raises(ValueError, match=r"regularizer.rows=0.125 is invalid.*rows=1"):
        _sde()(_x(), "local_subset", generator=_gen())


@pytest.mark.parametrize("name", SDE_PRESETS)
def test_sde_preset_forward_and_gradients(name: str) -> None:
    """Logits are the head of a direct seeded solve (the regulariser leaves the forward alone); the regulariser is
    the one computed directly from that solve with the model's tolerances and the same generator, positive, and its
    gradient alone reaches drift and diffusion."""
    model, x = _sde(), _x()
    out = model(x, name, generator=_gen())
    spec, gen = REGULARIZER_PRESETS[name], _gen()
    with torch.no_grad():
        sol = sde_solve(model.drift, model.diffusion, model.encoder(x), [0.0, 1.0], rtol=model.rtol, atol=model.atol,
                        per_sample=model.per_sample, generator=gen, record_steps=spec.kind != "none")
        assert torch.equal(out.logits, model.head(sol.ys[:, -1]))
        if spec.kind == "global":
            assert torch.equal(out.reg, global_regularizer(sol))
        elif spec.kind == "local":
            direct, _ = sde_local_regularizer(model.drift, model.diffusion, sol, sampling=spec.sampling, step=spec.step,
                                              points=spec.points, rtol=model.rtol, atol=model.atol, generator=gen)
            assert torch.equal(out.reg, direct)
    # Milstein's step-doubled step: 2 drift + 5 diffusion calls; "initial" adds the 2 drift calls of the step guess
    assert out.nfe_joint > 0 and out.reg_nfe == {"vanilla": 0, "global": 0, "local_taken": 7}.get(name, 9)
    if name == "vanilla":
        out.logits.square().sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        return
    assert out.reg is not None and torch.isfinite(out.reg) and out.reg.item() > 0, name
    out.reg.backward()
    for module in (model.drift, model.diffusion):
        for p in module.parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name


@pytest.mark.parametrize("scheme", ["milstein", "euler"])
def test_sde_global_equals_direct_record_steps_solve(scheme: str) -> None:
    model, x = _sde(scheme=scheme), _x()
    out = model(x, "global", generator=_gen(4))
    sol = sde_solve(model.drift, model.diffusion, model.encoder(x), [0.0, 1.0], rtol=0.1, atol=0.1,
                    per_sample=False, generator=_gen(4), record_steps=True, scheme=scheme)
    assert torch.equal(out.logits, model.head(sol.ys[:, -1]))
    assert out.reg is not None and torch.equal(out.reg, global_regularizer(sol))


def test_sde_zero_diffusion_is_step_doubled_euler_of_the_drift() -> None:
    """With g = 0 the solve is explicit Euler in half steps over the recorded steps (to rounding) and tracks the
    exact ODE solution of the drift within the loose accuracy of a first-order method at rtol = atol = 1e-3."""
    model, x = _sde(rtol=1e-3, atol=1e-3).double(), _x(F64)
    with torch.no_grad():
        model.diffusion.linear.weight.zero_()
        model.diffusion.linear.bias.zero_()
        out = model(x, generator=_gen())
        z = z0 = model.encoder(x)
        stats = out.solution.stats
        for k in range(int(stats.n_accepted[0])):  # joint norm: one step sequence for the batch
            t, h = stats.step_t[:, k], stats.step_h[:, k]
            z = z + (h / 2)[:, None] * model.drift(t, z)
            z = z + (h / 2)[:, None] * model.drift(t + h / 2, z)
        exact = solve(model.drift, z0, [0.0, 1.0], rtol=1e-10, atol=1e-10).ys[:, -1]
    assert (out.state - z).abs().max().item() < 1e-12
    err = (out.state - exact).abs().max().item()
    assert 1e-5 < err < 0.03, f"Euler error {err:.3g}"


@pytest.mark.parametrize("scheme", ["milstein", "euler"])
@pytest.mark.parametrize("sampling", ["unbiased", "biased"])
@pytest.mark.parametrize("step", ["taken", "initial"])
def test_sde_local_regularizer_matches_naive_reference(sampling: str, step: str, scheme: str) -> None:
    model, x = _sde(per_sample=True).double(), _x(F64)
    with torch.no_grad():
        sol = sde_solve(model.drift, model.diffusion, model.encoder(x), [0.0, 1.0], rtol=0.1, atol=0.1,
                        generator=_gen(2), record_steps=True, scheme=scheme)
    dw = tuple(0.1 * torch.randn(BATCH, 6, generator=_gen(s), dtype=F64) for s in (10, 11))
    value, info = sde_local_regularizer(model.drift, model.diffusion, sol, sampling=sampling, step=step,
                                        points="sample", dw=dw, generator=_gen(3), scheme=scheme)
    stats = sol.stats
    hit = (stats.step_t == info.t[:, None]) & (stats.step_y == info.y[:, None]).all(-1)
    assert hit.any(1).all(), "every sample steps from a recorded step start"
    if step == "taken":
        assert ((stats.step_h == info.h[:, None]) & hit).any(1).all()
    ref = sde_local_regularizer_reference(scheme, model.drift, model.diffusion, info.t, info.y, info.h, *dw, 0.1, 0.1)
    assert torch.allclose(value, ref, rtol=1e-12, atol=0), f"{value.item()!r} vs {ref.item()!r}"
    assert info.nfe == {"milstein": 7, "euler": 4}[scheme] + (step == "initial") * 2


@pytest.mark.parametrize("scheme", ["milstein", "euler"])
def test_sde_local_regularizer_gradcheck(scheme: str) -> None:
    """float64 gradcheck w.r.t. a drift matrix and a diffusion scale, at a fixed point, step and increments."""
    y0 = torch.randn(3, 2, generator=_gen(0), dtype=F64)
    with torch.no_grad():
        sol = sde_solve(lambda t, y: -y, lambda t, y: 0.3 * y, y0, [0.0, 1.0], generator=_gen(1), record_steps=True,
                        scheme=scheme)
    dw = tuple(0.2 * torch.randn(3, 2, generator=_gen(s), dtype=F64) for s in (5, 6))

    def value(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        drift, diffusion = (lambda t, y: torch.tanh(y @ w)), (lambda t, y: s * y)
        return sde_local_regularizer(drift, diffusion, sol, t_r=0.4, points="sample", dw=dw, scheme=scheme)[0]

    w = torch.tensor([[-1.0, 0.5], [0.2, -0.7]], dtype=F64, requires_grad=True)
    s = torch.tensor([0.3, 0.6], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(value, (w, s))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        pytest.param(lambda m, x: m(x, RegularizerSpec(estimate="stiffness")), r"regularizer.estimate='stiffness'",
                     id="stiffness"),
        pytest.param(lambda m, x: _sde(per_sample=True)(x, "local_unbiased"), r"regularizer.points='batch'",
                     id="points"),
        pytest.param(lambda m, x: sde_local_regularizer(m.drift, m.diffusion, m(x).solution), r"record_steps=True",
                     id="no-record"),
        pytest.param(lambda m, x: sde_local_regularizer(m.drift, m.diffusion, None, step=-1.0), r"step=-1.0",
                     id="step"),
        pytest.param(lambda m, x: _sde(latent=0), r"latent=0 is invalid", id="latent"),
        pytest.param(lambda m, x: _sde(scheme="heun"), r"scheme='heun' is invalid: expected 'milstein' or 'euler'",
                     id="scheme"),
        pytest.param(lambda m, x: sde_local_regularizer(m.drift, m.diffusion, None, scheme="sri"),
                     r"scheme='sri' is invalid.*main solve's scheme", id="regularizer-scheme"),
    ],
)
def test_sde_errors(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call(_sde(), _x())


# --- the subset regulariser ---


def test_subset_regulariser_is_the_taken_step_regulariser_on_the_drawn_rows() -> None:
    """Over every 2-sample subset of the batch the subset values average to the full value exactly (unbiased), and
    each subset's value is the mean of the full per-sample values on its rows."""
    import itertools

    model, x = _ode(), _x(torch.float64)
    model = model.double()
    sol = solve(model.func, x, [0.0, 1.0], rtol=TOL, atol=TOL, per_sample=True, record_steps=True)
    t_r = sample_times(0.0, 1.0, BATCH, points="sample", generator=_gen(3))
    kw = {"sampling": "unbiased", "step": "taken", "points": "sample", "first_stage": "graph", "rtol": TOL,
          "atol": TOL, "t_r": t_r}
    full, info = regularize_solution(model.func, sol, **kw)
    per_sample = info.eest * info.h
    subsets = [torch.tensor(c) for c in itertools.combinations(range(BATCH), 2)]
    values = []
    for rows in subsets:
        value, sub = regularize_solution(model.func, sol, rows=rows, **kw)
        torch.testing.assert_close(value, per_sample[rows].mean(), rtol=1e-6, atol=1e-14)  # EEst cancels: rounding
        assert torch.equal(sub.t, info.t[rows]) and torch.equal(sub.h, info.h[rows])
        values.append(value)
    torch.testing.assert_close(torch.stack(values).mean(), full, rtol=1e-6, atol=1e-14)


def test_subset_preset_steps_from_an_eighth_of_the_batch_at_the_same_call_count() -> None:
    model, x = _ode(), _x()
    taken, subset = model(x, "local_taken", generator=_gen()), model(x, "local_subset", generator=_gen())
    assert subset.reg_info is not None and subset.reg_info.t.shape == (1,)  # round(8 / 8)
    assert subset.reg_nfe == taken.reg_nfe and subset.reg is not None and subset.reg.requires_grad
    subset.reg.backward()
    assert model.func.linear_in.weight.grad is not None and model.func.linear_in.weight.grad.abs().sum() > 0
    half = RegularizerSpec("local", "unbiased", "taken", "sample", first_stage="graph", rows=0.5)
    assert model(x, half, generator=_gen()).reg_info.t.shape == (4,)


@pytest.mark.parametrize("rows", [0.0, 1.5, True, "half"])
def test_subset_share_outside_0_1_is_refused(rows) -> None:
    with pytest.raises(ConfigError, match=r"RegularizerSpec.rows=.* is invalid.*\(0, 1\]"):
        RegularizerSpec("local", rows=rows)
    with pytest.raises(ConfigError, match=r"RegularizerSpec.rows=0.5.*kind='global'"):
        RegularizerSpec("global", rows=0.5)


@pytest.mark.parametrize(("kw", "match"), [
    ({"step": "taken"}, r"from_step_start=True is invalid.*step='taken'"),
    ({"sampling": "biased"}, r"from_step_start=True is invalid.*sampling='biased'"),
    ({"from_step_start": 1}, None),
])
def test_from_step_start_spec_is_checked(kw: dict, match: str | None) -> None:
    with pytest.raises(ConfigError, match=match or r"from_step_start=1 is invalid: expected a bool"):
        RegularizerSpec("local", **{"from_step_start": True, **kw})


def test_sde_refuses_from_step_start() -> None:
    with pytest.raises(ValueError, match=r"regularizer.from_step_start=True is invalid.*drop from_step_start"):
        _sde()(_x(), "local_start", generator=_gen())
