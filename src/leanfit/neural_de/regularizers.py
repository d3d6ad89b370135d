"""Local and global error regularisers of neural ODEs (Pal, Edelman & Rackauckas, ICML 2023; Pal et al. 2021).

The local regulariser is ``R = EEst(t_r) * |h(t_r)|``: the scaled error estimate of *one* Tsit5 step of size
``h`` from the state ``u(t_r)`` at a random time ``t_r``. The state, ``h`` and the first stage ``k_1`` are
constants, so the term is a separate six-evaluation graph and gradients reach the parameters only through the
stages ``k_2 .. k_7``; the main solve may therefore use any sensitivity method (torchdiffeq's ``odeint_adjoint``
included, or ``solve(adjoint="backsolve")``). The global (ERNODE) regulariser ``sum_j EEst_j |h_j|`` over all
accepted steps needs discrete sensitivities, i.e. backpropagation through this package's own
:func:`~leanfit.neural_de.solver.solve` (``adjoint="direct"``, or ``"checkpoint"`` to store one state per step).

Why hand-written: torchdiffeq has no public single step (its ``_runge_kutta_step`` is private, torchdiffeq #248),
no Tsit5, and its step callbacks report times and ``dt`` but no error; torchode's ``method.step`` returns an
error estimate but hides the accepted-step record that biased and taken-step sampling need. Here the step
(:func:`~leanfit.neural_de.step.rk_step`), its error ratio, the initial-step heuristic and the solver's step
record are all public, so the regulariser is a few lines over them.

Workflow with any solver (the paper's unbiased sampling, ``t_r`` shared by the batch)::

    t_r = sample_times(t0, t1, batch, generator=g)            # before the main solve
    times, keep, r = with_times(t_eval, t_r)                  # t_r joins the evaluation times
    ys = odeint_adjoint(func, y0, times)                      # (T, batch, d); leanfit: solve(...).ys is (batch, T, d)
    reg, info = local_regularizer(f, t_r, ys[r, torch.arange(batch)], rtol=rtol, atol=atol)
    loss = task_loss(ys[keep]) + lam * reg

With this package's solver, :func:`regularize_solution` also offers the biased sampling (uniform over the
solver's own step points) and the step actually taken there; the solve needs ``record_steps=True``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from leanfit.core.errors import bad_value
from leanfit.neural_de.solver import Solution
from leanfit.neural_de.step import (
    VectorField,
    as_batch_time,
    call_vector_field,
    check_callable,
    check_tolerances,
    error_ratio,
    initial_step_size,
    step_unchecked,
)
from leanfit.neural_de.tableaus import ButcherTableau, get_tableau

__all__ = [
    "STABILITY_SIZE",
    "LocalRegularizerInfo",
    "global_regularizer",
    "local_regularizer",
    "regularize_solution",
    "sample_times",
    "with_times",
]

Sampling = Literal["unbiased", "biased"]
Points = Literal["batch", "sample"]
Estimate = Literal["error", "stiffness"]
FirstStage = Literal["constant", "graph"]

# Size of the stability region along the negative real axis (OrdinaryDiffEq.jl's ``alg_stability_size``); the
# paper's code divides the stiffness estimate by it.
STABILITY_SIZE: dict[str, float] = {"tsit5": 3.5068, "dopri5": 3.3066}


@dataclass(frozen=True)
class LocalRegularizerInfo:
    """What one local regulariser evaluation used and cost; all detached.

    t, h: float64 ``(batch,)``, the time each sample stepped from and its step (shared by the batch for
    ``points="batch"``). y: ``(batch, *state)``, the state it stepped from. eest: ``(batch,)``, the scaled error ``EEst`` of that step (the joint value broadcast for
    ``points="batch"``). stiffness: ``(batch,)`` ``rho / stability size``, only for ``estimate="stiffness"``.
    nfe: the extra calls of ``f`` on the batch (every sample pays them): 6 for the step, +1 for ``k_1`` unless
    given, +1 for the initial-step heuristic.
    """

    t: Tensor
    h: Tensor
    y: Tensor
    eest: Tensor
    nfe: int
    stiffness: Tensor | None = None


def _check_choice(name: str, value: object, choices: Sequence[str], fix: str) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(bad_value(name, value, " or ".join(repr(c) for c in choices), fix))


def _check_state(y_r: Tensor) -> Tensor:
    if not isinstance(y_r, Tensor) or y_r.dim() < 1 or not y_r.is_floating_point():
        got = f"{type(y_r).__name__} {tuple(getattr(y_r, 'shape', ()))}"
        raise ValueError(bad_value("y_r", got, "a floating tensor shaped (batch, *state)", "add a batch dimension"))
    if y_r.shape[0] == 0:  # the regulariser is a mean over samples: NaN for none
        raise ValueError(bad_value("y_r", f"<0 samples, shape {tuple(y_r.shape)}>", "at least one sample",
                                   "skip the regulariser for an empty batch"))
    if not torch.isfinite(y_r).all():
        raise ValueError(bad_value("y_r", "<NaN/inf>", "finite states", "check the main solve that produced y_r"))
    return y_r.detach()


def _step_size(f: VectorField, t: Tensor, y: Tensor, k1: Tensor, step: str | float | Tensor, tab: ButcherTableau,
               rtol: float, atol: float, joint: bool) -> Tensor:
    """The regulariser's step: the initial-step heuristic at ``y`` (one call of ``f``) or the given one."""
    if isinstance(step, str):
        _check_choice("step", step, ["initial"], "pass 'initial', a float > 0 or a (batch,) tensor of steps")
        return initial_step_size(f, t, y, rtol, atol, tab.error_exponent, f0=k1, per_sample=not joint)
    if isinstance(step, bool) or not isinstance(step, (int, float, Tensor)):
        raise ValueError(bad_value("step", step, "'initial', a float > 0 or a (batch,) tensor", "pass step='initial'"))
    h = as_batch_time(step, y.shape[0], "step", y.device).detach()
    if not (torch.isfinite(h).all() and (h > 0).all()):
        raise ValueError(bad_value("step", step, "finite steps > 0", "pass step='initial' or e.g. step=0.1"))
    if joint and not (h == h[0]).all():
        raise ValueError(bad_value("step", step, "one step shared by the batch for points='batch'",
                                   "pass a float, or points='sample' for per-sample steps"))
    return h


def _rms(x: Tensor, joint: bool) -> Tensor:
    """RMS per sample ``(batch,)``, or over the whole batch array broadcast to ``(batch,)``; its gradient at a zero
    RMS is 0, not sqrt's 0/0 = NaN (a sample at an equilibrium would poison every parameter's gradient)."""
    ms = x.reshape(1 if joint else x.shape[0], -1).pow(2).mean(1)
    pos = ms > 0
    return torch.where(pos, torch.where(pos, ms, torch.ones_like(ms)).sqrt(), torch.zeros_like(ms)).expand(x.shape[0])


def _stiffness(tab: ButcherTableau, y: Tensor, h: Tensor, stages: Sequence[Tensor], y_next: Tensor,
               joint: bool) -> Tensor:
    """Shampine's estimate ``rho = ||k_7 - k_6|| / ||g_7 - g_6||`` (both stages at node ``c = 1``; ``g_7 = y_next``
    for an FSAL pair), divided by the stability size as in the paper's code; 0 where the denominator vanishes."""
    hy = h.to(y.dtype).reshape(-1, *([1] * (y.dim() - 1)))
    g6 = y + hy * sum(w * k for w, k in zip(tab.a[-2], stages, strict=False) if w != 0.0)
    num, den = _rms(stages[-1] - stages[-2], joint), _rms(y_next - g6, joint)
    rho = torch.where(den == 0, torch.zeros_like(num), num / (den + torch.finfo(y.dtype).eps))
    return rho / STABILITY_SIZE[tab.name]


def local_regularizer(f: VectorField, t_r: float | Tensor, y_r: Tensor, *, step: str | float | Tensor = "initial",
                      points: Points = "batch", estimate: Estimate = "error", rtol: float = 1e-6,
                      atol: float = 1e-8, method: str | ButcherTableau = "tsit5",
                      k1: Tensor | None = None,
                      first_stage: FirstStage = "constant") -> tuple[Tensor, LocalRegularizerInfo]:
    """The local regulariser from a given state: one step of ``method`` from ``(t_r, y_r)``.

    f: ``f(t, y)``, ``t`` float64 ``(batch,)``. t_r: scalar or float64 ``(batch,)``. y_r: ``(batch, *state)``,
    ``u(t_r)`` from the main solve (any solver); it is detached. step: ``"initial"`` (the paper's: Hairer's
    automatic initial step at ``y_r`` with ``rtol``/``atol``, one call of ``f``), a float, or a ``(batch,)`` tensor
    (e.g. the step the main solve took there); always a constant. points: ``"batch"`` (the paper's: one error norm
    over the whole batch array and one shared step) or ``"sample"`` (per-sample norms and steps, then the mean over
    samples; pairs with one ``t_r`` per sample). estimate: ``"error"`` gives ``EEst * |h|``; ``"stiffness"`` gives
    Shampine's ``rho / stability size`` without an ``|h|`` factor, as the paper's code does (``tsit5``/``dopri5``).
    k1: ``f(t_r, y_r)`` if known (saves one call). first_stage: ``"constant"`` (the paper's: ``k_1`` comes from
    the integrator's set-up and is not differentiated, so gradients reach ``f``'s parameters through ``k_2 .. k_s``
    only) or ``"graph"`` (``k_1 = f(t_r, y_r)`` keeps its graph w.r.t. the parameters, the state still a constant;
    a given ``k1`` is then used as passed). With ``"constant"`` the error weights no longer cancel in the gradient
    (``sum_i b_error_i = 0`` holds for the value, but the dropped ``b_error_1 dk_1/dtheta`` term leaves an
    ``O(h)`` gradient of an ``O(h^5)`` quantity), so the gradient mostly pushes the stages apart rather than
    towards an easier field; ``"graph"`` differentiates the error estimate itself. Returns the scalar value, in
    ``y_r``'s dtype, differentiable w.r.t. ``f``'s parameters, and :class:`LocalRegularizerInfo`.
    """
    tab = get_tableau(method)
    check_callable("f", f)
    check_tolerances(rtol, atol)
    _check_choice("points", points, ["batch", "sample"], "use points='batch' (the paper's joint norm)")
    _check_choice("estimate", estimate, ["error", "stiffness"], "use estimate='error' (the paper's)")
    _check_choice("first_stage", first_stage, ["constant", "graph"], "use first_stage='constant' (the paper's)")
    if estimate == "stiffness" and (tab.name not in STABILITY_SIZE or not tab.fsal):
        raise ValueError(bad_value("method", tab.name, f"one of {sorted(STABILITY_SIZE)} for estimate='stiffness'",
                                   "use method='tsit5' or estimate='error'"))
    y = _check_state(y_r)
    t = as_batch_time(t_r, y.shape[0], "t_r", y.device).detach()
    if not torch.isfinite(t).all():
        raise ValueError(bad_value("t_r", t_r, "finite times", "draw them with sample_times()"))
    if k1 is not None and (not isinstance(k1, Tensor) or k1.shape != y.shape):
        got = tuple(k1.shape) if isinstance(k1, Tensor) else type(k1).__name__
        raise ValueError(bad_value("k1", got, f"f(t_r, y_r) shaped like y_r {tuple(y.shape)}", "or pass k1=None"))
    joint, nfe, keep = points == "batch", tab.stages - 1, first_stage == "graph"
    if k1 is None:
        with torch.set_grad_enabled(keep and torch.is_grad_enabled()):
            k1, nfe = call_vector_field(f, t, y), nfe + 1
    with torch.no_grad():
        h = _step_size(f, t, y, k1.detach(), step, tab, rtol, atol, joint)
    nfe += isinstance(step, str)
    res = step_unchecked(f, t, y, h, tab, k1=k1 if keep else k1.detach())  # t, y, h checked above
    eest = error_ratio(res.error_estimate, y, res.y_next, rtol, atol, "rms", per_sample=not joint)
    stiff = _stiffness(tab, y, h, res.stages, res.y_next, joint) if estimate == "stiffness" else None
    per_sample = eest * h.abs().to(eest.dtype) if stiff is None else stiff
    info = LocalRegularizerInfo(t=t, h=h, y=y, eest=eest.detach(), nfe=nfe,
                                stiffness=None if stiff is None else stiff.detach())
    return per_sample.mean(), info


def sample_times(t0: float, t1: float, batch: int, *, points: Points = "batch",
                 generator: torch.Generator | None = None, device: torch.device | str | None = None) -> Tensor:
    """Unbiased regularisation times ``t_r ~ U[t0, t1]``: float64 ``(batch,)``, one draw shared by the batch
    (``points="batch"``, the paper's) or one per sample (``points="sample"``). Draw them before the main solve and
    add them to its evaluation times with :func:`with_times`."""
    _check_choice("points", points, ["batch", "sample"], "use points='batch' (one t_r per batch, the paper's)")
    if not (isinstance(t0, (int, float)) and isinstance(t1, (int, float)) and math.isfinite(t0)
            and math.isfinite(t1) and t1 > t0):
        raise ValueError(bad_value("(t0, t1)", (t0, t1), "finite floats with t1 > t0",
                                   "pass the main solve's time span"))
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(bad_value("batch", batch, "an int >= 1", "pass y0.shape[0]"))
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(bad_value("generator", generator, "a torch.Generator or None",
                                  "pass torch.Generator().manual_seed(seed)"))
    gen_device = generator.device if generator is not None else "cpu"
    u = torch.rand(1 if points == "batch" else batch, generator=generator, dtype=torch.float64, device=gen_device)
    return (t0 + (t1 - t0) * u).expand(batch).to(device or gen_device)


def with_times(t_eval: Sequence[float] | Tensor, t_r: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Merge regularisation times into the evaluation times of the main solve.

    t_eval: increasing ``(T,)``. t_r: ``(batch,)`` inside ``[t_eval[0], t_eval[-1]]``. Returns ``times`` (float64,
    sorted, duplicates merged: pass them to the solver), ``keep`` ``(T,)`` (``times[keep] == t_eval``) and
    ``r_index`` ``(batch,)`` (``times[r_index] == t_r``): sample ``i``'s state at ``t_r`` is ``ys[r_index[i], i]``
    for torchdiffeq's ``(T, batch, ...)`` output and ``sol.ys[i, r_index[i]]`` for leanfit's.
    """
    ts = torch.as_tensor(t_eval, dtype=torch.float64).detach()
    t_r = torch.as_tensor(t_r, dtype=torch.float64).detach().to(ts.device).reshape(-1)
    if ts.dim() != 1 or ts.numel() < 2 or not (ts[1:] > ts[:-1]).all():
        raise ValueError(bad_value("t_eval", t_eval, "a strictly increasing 1-D sequence of >= 2 times",
                                   "pass the main solve's evaluation times"))
    if not ((t_r >= ts[0]) & (t_r <= ts[-1])).all():
        raise ValueError(bad_value("t_r", t_r.tolist(), f"times in [{ts[0].item()}, {ts[-1].item()}]",
                                   "draw them with sample_times(t_eval[0], t_eval[-1], batch)"))
    times, inverse = torch.unique(torch.cat([ts, t_r]), sorted=True, return_inverse=True)
    return times, inverse[: ts.numel()], inverse[ts.numel() :]


def _check_solution(sol: object) -> None:
    if not isinstance(sol, Solution):
        raise TypeError(bad_value("sol", sol if isinstance(sol, (str, type(None))) else type(sol).__name__,
                                  "a Solution returned by solve or sde_solve", "pass the main solve's result"))


def _step_record(sol: Solution, need: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(step_t, step_h, step_y, n_accepted)`` of a solve run with ``record_steps=True``."""
    _check_solution(sol)
    if sol.stats.step_y is None or sol.stats.step_error is None:
        raise ValueError(bad_value("sol.stats.step_y", None, f"a recorded step record for {need}",
                                   "solve with record_steps=True"))
    return sol.stats.step_t, sol.stats.step_h, sol.stats.step_y, sol.stats.n_accepted


def _pick_steps(sol: Solution, sampling: str, points: str, t_r: float | Tensor | None,
                generator: torch.Generator | None) -> Tensor:
    """Index ``(batch,)`` of the accepted step each sample regularises: uniform over the solver's step points
    (biased) or the step containing ``t ~ U[t0, t1]`` (unbiased: probability ``h_j / T``)."""
    step_t, _, _, n = _step_record(sol, f"sampling={sampling!r}")
    batch, dev = step_t.shape[0], step_t.device
    padded = step_t.nan_to_num(nan=-1.0)  # NaN padding compares unequal to itself
    if points == "batch" and not (padded == padded[:1]).all():
        raise ValueError(bad_value("points", points, "a step sequence shared by the batch (solve per_sample=False)",
                                   "solve with per_sample=False (the paper's joint norm) or use points='sample'"))
    draws = 1 if points == "batch" else batch
    u = torch.rand(draws, generator=generator, dtype=torch.float64, device=generator.device if generator else "cpu")
    u = u.to(dev).expand(batch)
    if sampling == "biased":  # the final solver point is excluded: the paper's code found sampling it unstable
        return (u * n).long().clamp(max=n - 1)
    t0, t1 = sol.ts[0], sol.ts[-1]
    t = t0 + (t1 - t0) * u if t_r is None else as_batch_time(t_r, batch, "t_r", dev)
    starts = step_t.nan_to_num(nan=float("inf")).contiguous()  # padding sorts last
    j = torch.searchsorted(starts, t[:, None].contiguous(), right=True)[:, 0] - 1
    return j.clamp(min=0).minimum(n - 1)


def _state_at(sol: Solution, t_r: float | Tensor | None, step: str | float | Tensor) -> tuple[Tensor, Tensor]:
    """``(t_r, u(t_r))`` for unbiased sampling from the state itself: ``t_r`` must be one of ``sol.ts``."""
    if t_r is None:
        raise ValueError(bad_value("t_r", None, f"the times of u(t_r) in sol.ts for sampling='unbiased', step={step!r}",
                                   "draw t_r = sample_times(...) before the solve, solve on with_times(t_eval, t_r)[0] "
                                   "and pass t_r, or use step='taken' (no extra times needed)"))
    batch = sol.ys.shape[0]
    t = as_batch_time(t_r, batch, "t_r", sol.ts.device)
    idx = torch.searchsorted(sol.ts, t.contiguous()).clamp(max=sol.ts.numel() - 1)
    if not (sol.ts[idx] == t).all():
        raise ValueError(bad_value("t_r", t.tolist(), "times that are among sol.ts",
                                   "solve on with_times(t_eval, t_r)[0] so that u(t_r) is saved"))
    return t, sol.ys[torch.arange(batch, device=idx.device), idx]


def regularize_solution(f: VectorField, sol: Solution, *, sampling: Sampling = "unbiased",
                        step: Literal["initial", "taken"] | float = "initial", points: Points = "batch",
                        estimate: Estimate = "error", rtol: float = 1e-6, atol: float = 1e-8,
                        method: str | ButcherTableau = "tsit5", t_r: float | Tensor | None = None,
                        generator: torch.Generator | None = None, first_stage: FirstStage = "constant",
                        rows: Tensor | None = None,
                        from_step_start: bool = False) -> tuple[Tensor, LocalRegularizerInfo]:
    """The local regulariser of a leanfit :func:`~leanfit.neural_de.solver.solve` result.

    sampling: ``"unbiased"`` (``t_r ~ U[t0, t1]``) or ``"biased"`` (uniform over the solver's accepted step points
    except the final one, the paper's ``sol.t``). step: ``"initial"`` (the paper's automatic initial step),
    ``"taken"`` (the step the main solve took at that point), or a float. With ``"biased"`` or ``"taken"`` the
    regulariser steps from the start ``(t_j, y_j)`` of a recorded step ``j`` (solve with ``record_steps=True``);
    unbiased ``"taken"`` picks the step containing ``t_r``, so ``T * EEst_j`` is an unbiased estimate of the
    per-sample global sum ``sum_j EEst_j h_j`` (the returned ``EEst_j h_j`` weights it by ``h_j``). Unbiased with
    ``"initial"`` or a float steps from ``u(t_r)`` itself, which the solution holds only at its evaluation times:
    pass the ``t_r`` added with :func:`with_times`. points: ``"batch"`` (one point, joint norm; the record must be
    shared, i.e. ``per_sample=False``) or ``"sample"`` (one point per sample). rtol, atol: the main solve's.
    generator: for the draws. first_stage: as in :func:`local_regularizer`. rows: indices of the samples to step
    from (a random subset makes the mean over it an unbiased estimate of the batch mean with ``points="sample"``,
    at a fraction of the arithmetic; None: every sample). from_step_start: unbiased sampling with ``"initial"`` or a
    float step only: step from the start ``(t_j, y_j)`` of the recorded step containing ``t_r`` (drawn here when
    ``t_r`` is None) instead of from ``u(t_r)``, as ``"taken"`` and biased sampling always do (an ablation of that
    difference; needs ``record_steps=True``). Returns the value and :class:`LocalRegularizerInfo` of
    :func:`local_regularizer` (over the chosen samples).
    """
    _check_choice("sampling", sampling, ["unbiased", "biased"], "use sampling='unbiased' (the paper's default)")
    _check_choice("points", points, ["batch", "sample"], "use points='batch' (the paper's joint norm)")
    if isinstance(step, str):
        _check_choice("step", step, ["initial", "taken"], "pass 'initial', 'taken' or a float > 0")
    if sampling == "biased" and t_r is not None:
        raise ValueError(bad_value("t_r", t_r, "None for sampling='biased' (it draws solver points)", "drop t_r"))
    if not isinstance(from_step_start, bool):
        raise TypeError(bad_value("from_step_start", from_step_start, "a bool", "pass True or False"))
    if from_step_start and (sampling == "biased" or step == "taken"):
        raise ValueError(bad_value("from_step_start", True, f"False for sampling={sampling!r}, step={step!r} (it "
                                   "steps from a recorded step start already)", "drop from_step_start"))
    check_callable("f", f)
    check_tolerances(rtol, atol)
    _check_solution(sol)
    if sampling == "unbiased" and step != "taken" and not from_step_start:
        t, y = _state_at(sol, t_r, step)
        h: str | float | Tensor = step
    else:
        j = _pick_steps(sol, sampling, points, t_r, generator)
        step_t, step_h, step_y, _ = _step_record(sol, f"step={step!r}")
        every = torch.arange(j.numel(), device=j.device)
        t, y, h = step_t[every, j], step_y[every, j], step_h[every, j] if step == "taken" else step
    if rows is not None:
        t, y = t[rows], y[rows]
        h = h[rows] if isinstance(h, Tensor) else h  # a recorded step is per sample; a float stays
    return local_regularizer(f, t, y, step=h, points=points, estimate=estimate, rtol=rtol, atol=atol, method=method,
                             first_stage=first_stage)


def global_regularizer(sol: Solution) -> Tensor:
    """The global error regulariser (ERNODE, Pal et al. 2021): ``sum_j EEst_j |h_j|`` over the accepted steps.

    sol: a :func:`~leanfit.neural_de.solver.solve` result with ``record_steps=True``; its ``step_error`` carries
    the graph, so backpropagating the value differentiates through the solver (discrete sensitivities; the step
    sizes are constants): ``adjoint="direct"`` or ``"checkpoint"`` (which recomputes the terms in its backward
    pass); ``"backsolve"`` is refused (ValueError): a continuous adjoint has no discrete error estimates to
    differentiate. Returns the scalar mean over samples of each sample's sum (for a ``per_sample=False`` solve
    every row holds the joint value, so this is the paper's batch regulariser).
    """
    _, step_h, _, _ = _step_record(sol, "the global regulariser")
    if sol.stats.adjoint == "backsolve":
        raise ValueError(bad_value("adjoint", "backsolve", "'direct' or 'checkpoint' in the solve behind the global "
                                   "regulariser (it differentiates every step's error estimate: discrete "
                                   "sensitivities, which the continuous adjoint does not have)",
                                   "solve with adjoint='checkpoint' (memory O(steps x state)) or use a local "
                                   "regulariser, which works with any adjoint"))
    err = sol.stats.step_error
    assert err is not None  # checked by _step_record
    taken = torch.isfinite(step_h)
    terms = torch.where(taken, err, torch.zeros_like(err)) * step_h.nan_to_num(0.0).abs().to(err.dtype)
    return terms.sum(1).mean()
