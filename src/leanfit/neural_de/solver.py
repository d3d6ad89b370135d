"""Batched adaptive integration with per-sample (or joint) step-size control, dense output and statistics.

Every sample has its own time ``t``, step ``h``, accept/reject decision and PI-controller memory when
``per_sample=True``; a sample that reached ``t_eval[-1]`` is frozen (step 0, counters stop). The vector field is
still evaluated on the whole batch, so one call of ``f`` serves every sample: ``stats.nfe_joint`` counts calls of
``f``, ``stats.nfe[i]`` counts the calls during which sample ``i`` was still being integrated. With
``per_sample=False`` the error norm spans the whole batch array (as in torchdiffeq and the paper) and all samples
share one step sequence.

Gradients flow through the accepted steps and the dense output (discretize-then-optimize); the step-size
decisions themselves (error ratio, controller, initial step) are detached. With ``record_steps=True`` the error
ratio of every accepted step is also kept *with* its graph (``stats.step_error``), together with the state each
step started from (``stats.step_y``): what the global error regulariser and the step-sampling local regulariser
need. Time, step sizes and tolerances are float64; the state keeps its dtype.

The backward pass is chosen by ``solve(adjoint=...)``: ``"direct"`` (autograd keeps every stage of every attempt),
``"checkpoint"`` (the same discrete gradients from one stored state per accepted step, each step recomputed in
the backward pass: memory O(steps x state)) or ``"backsolve"`` (the continuous adjoint integrated backwards with
the same solver: memory independent of the number of steps, gradients to the tolerance). Both are
autograd Functions over the whole solve with the field's parameters as inputs.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Literal, Protocol

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from leanfit.core.errors import bad_value
from leanfit.neural_de.step import (
    VectorField,
    as_batch_time,
    batch_view,
    call_vector_field,
    check_callable,
    check_flag,
    check_tolerances,
    error_ratio,
    initial_step_size,
    step_unchecked,
)
from leanfit.neural_de.tableaus import ButcherTableau, get_tableau

__all__ = ["Adjoint", "PIController", "PrecisionWarning", "Solution", "SolveStats", "solve"]

Adjoint = Literal["direct", "checkpoint", "backsolve"]
_ADJOINTS = ("direct", "checkpoint", "backsolve")


class PrecisionWarning(UserWarning):
    """The tolerances ask for more accuracy than the state's dtype can deliver (see :func:`solve`)."""


# A tolerance below _PRECISION_FACTOR * eps of the state dtype is rounding noise: every step rounds y to eps/2
# relative, and the error estimate h * sum_i b_error_i k_i sums seven rounded stages (sum |b_error_i| ~ 1.2 for
# Tsit5), so its floor is a few eps of |y|. Below it the controller chases noise: Van der Pol (mu = 5) on [0, 10]
# in float32 costs 2978 calls of f at rtol 1e-8 (float64: 1772) and 6728 at 1e-9 (float64: 2180), for no accuracy
# beyond float32's ~1e-7. 8 eps is 9.5e-7 in float32, so the default rtol = 1e-6 stays quiet.
_PRECISION_FACTOR = 8
_WARNED_PRECISION: set[torch.dtype] = set()  # once per process and dtype


def _warn_precision(dtype: torch.dtype, rtol: float, atol: float) -> None:
    """Warn once per dtype when both tolerances are below what ``dtype`` can resolve."""
    floor = _PRECISION_FACTOR * torch.finfo(dtype).eps
    if rtol < floor and atol < floor and dtype not in _WARNED_PRECISION:
        _WARNED_PRECISION.add(dtype)
        name = str(dtype).removeprefix("torch.")
        warnings.warn(f"rtol={rtol!r} and atol={atol!r} are below what a {name} state resolves ({_PRECISION_FACTOR} "
                      f"eps = {floor:.2g}): the error estimate is rounding noise there, so the solver takes many more "
                      f"steps for no accuracy; use a float64 state (y0.double()) or rtol >= {floor:.2g} "
                      "(warned once per dtype)", PrecisionWarning, stacklevel=3)


@dataclass(frozen=True)
class PIController:
    """PI step-size controller (Gustafsson; Hairer & Wanner, Solving ODEs II, IV.2; Hairer's DOPRI5 code).

    After an accepted step with scaled error ``q_n`` (previous accepted ``q_{n-1}``):
    ``h_new = h * clip(safety * q_n**-beta1 * q_{n-1}**beta2, factor_min, factor_max)``;
    after a rejection ``h_new = h * clip(safety * q_n**-beta1, factor_min, 1)`` (no I-memory), and the next
    accepted step may not grow (as in DOPRI5). ``q_{n-1}`` starts at and is floored to ``error_floor``.
    ``safety = 0.9``, factor bounds ``[0.2, 10]`` and the ``1e-4`` floor are DOPRI5's and OrdinaryDiffEq.jl's.
    """

    beta1: float
    beta2: float
    safety: float = 0.9
    factor_min: float = 0.2
    factor_max: float = 10.0
    error_floor: float = 1e-4

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                fix = "use PIController.for_tableau" if f.default is MISSING else f"the default is {f.default}"
                raise ValueError(bad_value(f.name, value, "a finite float", fix))
        checks = (("safety", 0 < self.safety <= 1, "a float in (0, 1]"),
                  ("factor_min", 0 < self.factor_min <= 1, "a float in (0, 1] (the largest shrink per step)"),
                  ("factor_max", self.factor_max >= 1, "a float >= 1 (the largest growth per step)"),
                  ("error_floor", self.error_floor > 0, "a float > 0"))
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(bad_value(name, getattr(self, name), expected, "or use PIController.for_tableau"))

    @classmethod
    def for_tableau(cls, tableau: ButcherTableau, preset: Literal["dopri5", "generic"] = "dopri5") -> PIController:
        """Exponents for a pair whose error estimate scales like ``h**k``, ``k = error_order + 1`` (5 for 5(4)).

        ``"dopri5"`` (default): Hairer's DOPRI5 (``BETA = 0.04``, ``EXPO1 = 1/5 - 0.75 BETA``), also
        OrdinaryDiffEq.jl's ``DP5`` defaults: ``beta2 = 0.04``, ``beta1 = 1/k - 0.75 beta2`` (0.17). ``"generic"``:
        OrdinaryDiffEq.jl's default for other methods (Tsit5 included), ``beta1 = 7/(10k)``, ``beta2 = 2/(5k)``
        (0.14, 0.08). Its steady state sits at ``q = 0.9**(k/0.3) ~ 0.17`` instead of ``~0.44``, so it is more
        conservative: on this package's test problems at rtol 1e-6 it costs 15-30 % more NFE than ``"dopri5"``
        for 3-10x smaller errors, while ``"dopri5"`` matches scipy's RK45 in NFE at a smaller error.
        """
        if not isinstance(tableau, ButcherTableau):
            raise TypeError(bad_value("tableau", tableau, "a ButcherTableau", "pass get_tableau(name)"))
        k = tableau.error_exponent
        if preset == "generic":
            return cls(beta1=0.7 / k, beta2=0.4 / k)
        if preset == "dopri5":
            return cls(beta1=1.0 / k - 0.75 * 0.04, beta2=0.04)
        raise ValueError(bad_value("preset", preset, "'dopri5' or 'generic'", "use the default preset='dopri5'"))

    def factor(self, ratio: Tensor, prev_ratio: Tensor, accepted: Tensor, after_reject: Tensor) -> Tensor:
        """Step-size multiplier per sample. ratio, prev_ratio: float64 ``(batch,)`` (``inf`` for non-finite)."""
        shrink = self.safety * ratio.pow(-self.beta1)
        grow = (shrink * prev_ratio.pow(self.beta2)).clamp(self.factor_min, self.factor_max)
        grow = torch.where(after_reject, grow.clamp(max=1.0), grow)
        return torch.where(accepted, grow, shrink.clamp(self.factor_min, 1.0))


@dataclass
class SolveStats:
    """Per-solve statistics. Per-sample entries are int64 ``(batch,)``.

    nfe: calls of ``f`` while the sample was active (initial ``f(t0, y0)`` and the initial-step probe included).
    nfe_joint: calls of ``f`` on the whole batch (what a wall clock pays for). n_attempts: loop iterations.
    step_t, step_h: float64 ``(batch, max_accepted)``, start time and size of every accepted step, padded with
    NaN after ``n_accepted[i]`` entries (a padded tensor rather than lists: one indexable, device-resident object).
    step_error: ``(batch, max_accepted)`` in the state dtype, the scaled error ``EEst`` of every accepted step with
    its autograd graph (differentiable w.r.t. the vector field's parameters), NaN-padded; only with
    ``record_steps=True``, else ``None``.
    step_y: ``(batch, max_accepted, *state)``, the state every accepted step started from (graph kept with
    ``adjoint="direct"``, detached otherwise), zero-padded; only with ``record_steps=True``, else ``None``.
    adjoint: the sensitivity method of the solve (``step_error`` has a graph for ``"direct"`` and ``"checkpoint"``,
    none for ``"backsolve"``). nfe_backward: batched calls of ``f`` by the backward pass of ``"checkpoint"`` (the
    recomputed steps) or ``"backsolve"`` (the adjoint system, each call one evaluation and one vector-Jacobian
    product); 0 until the backward has run, and always 0 for ``"direct"`` (autograd replays no call).
    """

    nfe: Tensor
    n_accepted: Tensor
    n_rejected: Tensor
    nfe_joint: int
    n_attempts: int
    step_t: Tensor
    step_h: Tensor
    step_error: Tensor | None = None
    step_y: Tensor | None = None
    adjoint: str = field(default="direct", kw_only=True)
    nfe_backward: int = field(default=0, kw_only=True)


@dataclass
class Solution:
    """ts: float64 ``(T,)``, the evaluation times. ys: ``(batch, T, *state)``, the state at ``ts``."""

    ts: Tensor
    ys: Tensor
    stats: SolveStats


@dataclass
class _State:
    """Mutable per-sample loop state (all ``(batch,)`` unless noted)."""

    t: Tensor
    h: Tensor
    y: Tensor  # (batch, *state)
    f0: Tensor  # (batch, *state), f(t, y)
    active: Tensor
    prev_ratio: Tensor
    after_reject: Tensor
    last_nonfinite: Tensor
    next_out: Tensor  # index of the first t_eval point not yet written
    nfe: Tensor
    n_accepted: Tensor
    n_rejected: Tensor
    nfe_joint: int = 0
    outputs: list[tuple[Tensor, Tensor, Tensor]] = field(default_factory=list)  # (rows, t_eval idx, values)
    record: list[tuple[Tensor, Tensor, Tensor]] = field(default_factory=list)  # (t, h, accepted) per attempt
    steps: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # (EEst with graph, y) per attempt, if recorded


def _check_inputs(y0: Tensor, t_eval: Sequence[float] | Tensor, max_steps: int) -> Tensor:
    if not isinstance(y0, Tensor):
        raise TypeError(bad_value("y0", type(y0).__name__, "a floating tensor shaped (batch, *state)",
                                  "pass y0 as a torch tensor, e.g. torch.tensor([[1.0, 0.0]], dtype=torch.float64)"))
    if y0.dim() < 1 or not y0.is_floating_point():
        got = f"{type(y0).__name__} {getattr(y0, 'dtype', '')} {tuple(getattr(y0, 'shape', ()))}"
        raise ValueError(bad_value("y0", got, "a floating tensor shaped (batch, *state)", "add a batch dimension"))
    if not torch.isfinite(y0.detach()).all():  # detached: a check must not record a graph (it saves y0)
        bad = (~torch.isfinite(y0.detach())).reshape(y0.shape[0], -1).any(1).nonzero()[0, 0].item()
        raise ValueError(bad_value("y0", f"<NaN/inf in sample {bad}>", "finite values", "clean the initial state"))
    try:
        ts = torch.as_tensor(t_eval, dtype=torch.float64).detach().to(y0.device)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(bad_value("t_eval", t_eval, "a 1-D sequence or tensor of floats", "pass e.g. t_eval=[0.0, 1.0]"
                                  )) from exc
    if ts.dim() != 1 or ts.numel() < 2 or not torch.isfinite(ts).all():
        raise ValueError(bad_value("t_eval", t_eval, "a finite 1-D sequence of at least 2 times [t0, ..., t1]",
                                   "pass e.g. t_eval=[0.0, 1.0]"))
    if not (ts[1:] > ts[:-1]).all():
        raise ValueError(bad_value("t_eval", ts.tolist(), "strictly increasing times (t1 > t0)",
                                   "sort the times and drop duplicates; integrate backwards by negating time"))
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(bad_value("max_steps", max_steps, "an int >= 1", "pass e.g. max_steps=10_000"))
    return ts


def _initial_state(f: VectorField, y0: Tensor, ts: Tensor, tab: ButcherTableau, rtol: float, atol: float,
                   per_sample: bool, h0: float | Tensor | None) -> _State:
    batch, dev = y0.shape[0], y0.device
    t = ts[0].expand(batch).clone()
    f0 = call_vector_field(f, t, y0)
    if not torch.isfinite(f0).all():
        bad = (~torch.isfinite(f0)).reshape(batch, -1).any(1).nonzero()[0, 0].item()
        raise RuntimeError(f"f(t0, y0) returned NaN/inf at t0={ts[0].item()!r} for sample {bad}; check the vector "
                           "field and its parameters at the initial state")
    nfe = 1
    if h0 is None:
        h = initial_step_size(f, t, y0, rtol, atol, tab.error_exponent, f0=f0, per_sample=per_sample)
        nfe += 1
    else:
        h = as_batch_time(h0, batch, "h0", dev).detach().clone()
        if not (torch.isfinite(h).all() and (h > 0).all()):
            raise ValueError(bad_value("h0", h0, "a finite step > 0 (scalar or per sample)", "or pass h0=None"))
        if not per_sample:  # one step sequence for the whole batch
            h = h.min().expand(batch).clone()
    long = torch.full((batch,), nfe, dtype=torch.long, device=dev)
    state = _State(t=t, h=h, y=y0, f0=f0, active=torch.ones(batch, dtype=torch.bool, device=dev),
                   prev_ratio=torch.full((batch,), 1e-4, dtype=torch.float64, device=dev),
                   after_reject=torch.zeros(batch, dtype=torch.bool, device=dev),
                   last_nonfinite=torch.zeros(batch, dtype=torch.bool, device=dev),
                   next_out=torch.ones(batch, dtype=torch.long, device=dev), nfe=long,
                   n_accepted=torch.zeros_like(long), n_rejected=torch.zeros_like(long), nfe_joint=nfe)
    state.outputs.append((torch.arange(batch, device=dev), torch.zeros(batch, dtype=torch.long, device=dev), y0))
    return state


def _interpolate(tab: ButcherTableau, how: str, rows: Tensor, y: Tensor, y1: Tensor, ks: Sequence[Tensor],
                 f1: Tensor, h: Tensor, theta: Tensor, slots_per_row: int) -> Tensor:
    """Dense output inside one step for the batch rows ``rows`` (``(P,)``, ascending, repeats allowed: one per
    output time; ``slots_per_row`` is the largest number of repeats).

    y, y1, ks[i], f1: ``(batch, *state)``; h, theta: ``(P,)``. Returns ``(P, *state)``.
    ``"hermite"``: cubic Hermite through ``y, y1, f0 = ks[0], f1 = f(t + h, y1)`` (local error O(h^4)).
    ``"tableau"``: the tableau's own 4th-order continuous extension ``y + h sum_i b_i(theta) k_i`` (error O(h^5)).
    """
    y = y[rows]
    th = batch_view(theta, y)
    hy = batch_view(h, y)
    if how == "hermite":
        th2, th3 = th * th, th * th * th
        return ((2 * th3 - 3 * th2 + 1) * y + (th3 - 2 * th2 + th) * hy * ks[0][rows]
                + (3 * th2 - 2 * th3) * y1[rows] + (th3 - th2) * hy * f1[rows])
    # One small GEMM for the stage weights b_i(theta) and one batched contraction per sample over its output slots
    # (a sample passes several t_eval points in one step: its stages are read once, not once per point).
    interpolant = tab.interpolant
    assert interpolant is not None, "how='tableau' is chosen only for tableaus with an interpolant"
    coeffs = _interpolant_matrix(tab, y.dtype, y.device)  # (stages, degree)
    powers = theta.to(y.dtype)[:, None] ** torch.arange(1, coeffs.shape[1] + 1, device=y.device)
    used = [i for i, row in enumerate(interpolant) if any(row)]
    weights = (powers @ coeffs.T)[:, used]  # (P, used stages)
    if slots_per_row == 1:  # each sample passes at most one point: gather its stages and contract
        stacked = torch.stack([ks[i][rows] for i in used], 1).reshape(rows.numel(), len(used), -1)
        return y + hy * torch.bmm(weights[:, None, :], stacked).reshape(y.shape)
    unique, inverse, counts = torch.unique_consecutive(rows, return_inverse=True, return_counts=True)  # rows sorted
    slot = torch.arange(rows.numel(), device=rows.device) - (torch.cumsum(counts, 0) - counts)[inverse]
    slots = weights.new_zeros(unique.numel(), slots_per_row, len(used)).index_put((inverse, slot), weights)
    stacked = torch.stack([ks[i][unique] for i in used], 1).reshape(unique.numel(), len(used), -1)
    combined = torch.bmm(slots, stacked)[inverse, slot]  # (P, state size)
    return y + hy * combined.reshape(y.shape)


_INTERPOLANTS: dict[tuple[tuple[tuple[float, ...], ...], torch.dtype, torch.device], Tensor] = {}


def _interpolant_matrix(tab: ButcherTableau, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``tab.interpolant`` as a ``(stages, degree)`` tensor, cached per tableau, dtype and device."""
    assert tab.interpolant is not None, "how='tableau' is chosen only for tableaus with an interpolant"
    key = (tab.interpolant, dtype, device)
    if key not in _INTERPOLANTS:
        _INTERPOLANTS[key] = torch.tensor(tab.interpolant, dtype=dtype, device=device)
    return _INTERPOLANTS[key]


def _write_outputs(state: _State, tab: ButcherTableau, how: str, ts: Tensor, accepted: Tensor, t_old: Tensor,
                   h: Tensor, y_old: Tensor, y_new: Tensor, ks: Sequence[Tensor], f1: Tensor) -> None:
    """Dense output at every ``t_eval`` point in ``(t_old, t_new]`` of each accepted sample."""
    new_out = torch.searchsorted(ts, state.t, right=True)
    j = torch.arange(ts.numel(), device=ts.device)
    mask = accepted[:, None] & (j >= state.next_out[:, None]) & (j < new_out[:, None])
    state.next_out = torch.where(accepted, new_out, state.next_out)
    rows, cols = mask.nonzero(as_tuple=True)  # one host sync; most attempts pass no t_eval point (rows ascending)
    if rows.numel() == 0:
        return
    slots = int(mask.sum(1).max())  # t_eval points the busiest sample passed in this step
    theta = ((ts[cols] - t_old[rows]) / h[rows]).clamp(0.0, 1.0)
    values = _interpolate(tab, how, rows, y_old, y_new, ks, f1, h[rows], theta, slots)
    at_end = (theta == 1.0).reshape(-1, *([1] * (values.dim() - 1)))
    values = torch.where(at_end, y_new[rows], values)  # exactly y_next at a step's end
    state.outputs.append((rows, cols, values))


def _attempt(f: VectorField, state: _State, tab: ButcherTableau, ctrl: PIController, ts: Tensor, rtol: float,
             atol: float, norm: Literal["rms", "max"], per_sample: bool, how: str,
             record_steps: bool) -> None:
    """One batched step attempt: every active sample tries its own ``h``; accepted ones advance."""
    t_end = ts[-1]
    remaining = t_end - state.t
    # Stretch the step by up to 1 % to land on t_end instead of leaving a sliver (Hairer's DOPRI5).
    h_try = torch.where(state.t + 1.01 * state.h >= t_end, remaining, state.h)
    h_try = torch.where(state.active, h_try, torch.zeros_like(h_try))
    res = step_unchecked(f, state.t, state.y, h_try, tab, k1=state.f0)
    calls = tab.stages - 1
    # Recording computes the ratio once with its graph (for the global regulariser); the controller sees it detached.
    # A finished sample tries h = 0, and the backward of its norm sqrt(0) is 0/0 = NaN even though the record drops
    # that attempt: give those rows a constant error (they are never accepted, their ratio is unused).
    kept = None
    if record_steps:
        live = state.active.reshape(-1, *([1] * (state.y.dim() - 1)))
        err = torch.where(live, res.error_estimate, torch.ones_like(res.error_estimate))
        kept = error_ratio(err, state.y, res.y_next, rtol, atol, norm, per_sample)
        state.steps.append((kept, state.y))
    with torch.no_grad():
        ratio = (error_ratio(res.error_estimate, state.y, res.y_next, rtol, atol, norm, per_sample)
                 if kept is None else kept.detach()).double()
        finite = torch.isfinite(ratio)
        ratio = torch.where(finite, ratio, torch.full_like(ratio, float("inf")))
    accepted = state.active & (ratio <= 1.0)
    rejected = state.active & ~accepted
    f1 = res.stages[-1]
    if not tab.fsal:  # the next step's first stage, at the accepted state
        f1 = call_vector_field(f, state.t + h_try, res.y_next)
        calls += 1
    state.nfe_joint += calls
    state.nfe += calls * state.active
    state.record.append((state.t, h_try, accepted))
    t_old, y_old, keep = state.t, state.y, accepted.reshape(-1, *([1] * (state.y.dim() - 1)))
    state.t = torch.where(accepted, torch.where(h_try == remaining, t_end, state.t + h_try), state.t)
    state.y = torch.where(keep, res.y_next, state.y)
    state.f0 = torch.where(keep, f1, state.f0)
    _write_outputs(state, tab, how, ts, accepted, t_old, h_try, y_old, res.y_next, res.stages, f1)
    factor = ctrl.factor(ratio, state.prev_ratio, accepted, state.after_reject)
    state.h = torch.where(state.active, h_try * factor, state.h)
    state.prev_ratio = torch.where(accepted, ratio.clamp(min=ctrl.error_floor), state.prev_ratio)
    state.after_reject = torch.where(state.active, rejected, state.after_reject)
    state.last_nonfinite = state.active & ~finite
    state.n_accepted += accepted
    state.n_rejected += rejected
    state.active = state.active & (state.t < t_end)


class _LoopState(Protocol):
    """The per-sample loop state that the progress check reads: the ODE loop's ``_State`` and the SDE loop's."""

    t: Tensor
    h: Tensor
    active: Tensor
    last_nonfinite: Tensor
    n_accepted: Tensor
    n_rejected: Tensor


def _check_progress(state: _LoopState, ts: Tensor, max_steps: int, n_attempts: int) -> bool:
    """Whether any sample is still integrating; raise on step-size underflow or an exhausted step budget, naming
    the sample, the time reached and a fix. One host synchronisation per call."""
    spacing = torch.nextafter(state.t, torch.full_like(state.t, float("inf"))) - state.t
    under = state.active & (state.h < 10 * spacing)
    any_active, any_under = torch.stack((state.active.any(), under.any())).tolist()
    if not any_active:
        return False
    if any_under or n_attempts >= max_steps:
        _raise_no_progress(state, ts[-1].item(), under if any_under else None, max_steps)
    return True


def _raise_no_progress(state: _LoopState, t_end: float, under: Tensor | None, max_steps: int) -> None:
    """The error for step-size underflow (``under``: the samples concerned) or for ``max_steps`` exhausted."""
    if under is not None:
        i = int(under.nonzero()[0, 0])
        where = f"step size underflow at t={state.t[i].item()!r} (t1={t_end!r}) for sample {i}, h={state.h[i].item()!r}"
        if state.last_nonfinite[i]:
            raise RuntimeError(f"{where}: the state or f(t, y) became NaN/inf there; check the vector field and its "
                               "parameters near that time")
        raise RuntimeError(f"{where}: the solution may blow up near that time, or the problem is too stiff for an "
                           "explicit method; check the vector field, loosen rtol/atol, or end t_eval earlier")
    else:
        t_min = state.t.masked_fill(~state.active, float("inf")).min()
        i = int((state.t == t_min).logical_and(state.active).nonzero()[0, 0])
        raise RuntimeError(
            f"max_steps={max_steps} exceeded at t={t_min.item()!r} (t1={t_end!r}; sample {i} is furthest behind, "
            f"h={state.h[i].item()!r}, {int(state.n_accepted[i])} accepted and {int(state.n_rejected[i])} rejected "
            "steps). Increase max_steps, loosen rtol/atol or end t_eval earlier; tiny steps on a smooth solution "
            "mean the problem is stiff and needs an implicit solver"
        )


def _pack_record(record: list[tuple[Tensor, Tensor, Tensor]], n_accepted: Tensor,
                 steps: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, ...]:
    """Per-attempt records -> per-sample padded ``(batch, max_accepted, ...)`` tensors of the accepted steps.

    Returns ``step_t, step_h`` (NaN-padded float64) and, if ``steps`` were recorded, ``step_error`` (NaN-padded)
    and ``step_y`` (zero-padded), written with the differentiable ``index_put`` so their graphs are kept.
    """
    t_all, h_all, acc = (torch.stack(x) for x in zip(*record, strict=True))  # (attempts, batch)
    width = int(n_accepted.max()) if n_accepted.numel() else 0
    i, b = acc.nonzero(as_tuple=True)
    where = (b, (acc.long().cumsum(0) - 1)[i, b])

    def pack(values: Tensor, fill: float) -> Tensor:  # values: (attempts, batch, *rest)
        return values.new_full((acc.shape[1], width, *values.shape[2:]), fill).index_put(where, values[i, b])

    out = (pack(t_all, float("nan")), pack(h_all, float("nan")))
    if not steps:
        return out
    err_all, y_all = (torch.stack(x) for x in zip(*steps, strict=True))
    return (*out, pack(err_all, float("nan")), pack(y_all, 0.0))


def _check_options(controller: PIController | None, flags: dict[str, object]) -> None:
    if controller is not None and not isinstance(controller, PIController):
        raise TypeError(bad_value("controller", controller, "a PIController or None",
                                  "pass PIController.for_tableau(get_tableau(method)) or None"))
    for name, value in flags.items():
        check_flag(name, value)


def _empty_solution(y0: Tensor, ts: Tensor, record_steps: bool, stats_type: type[SolveStats] = SolveStats,
                    adjoint: str = "direct", **extra: int) -> Solution:
    """The result for a batch of 0 samples: nothing to integrate, so ``f`` is never called and every count is 0."""
    counts = torch.zeros(0, dtype=torch.long, device=y0.device)
    grid = torch.zeros(0, 0, dtype=torch.float64, device=y0.device)
    rows = y0.unsqueeze(1)  # (0, 1, *state): keeps y0's graph, if any
    step_error = y0.new_zeros(0, 0) if record_steps else None
    step_y = rows[:, :0].clone() if record_steps else None
    stats = stats_type(counts, counts.clone(), counts.clone(), 0, 0, grid, grid.clone(), step_error, step_y,
                       adjoint=adjoint, **extra)
    return Solution(ts=ts, ys=rows.expand(0, ts.numel(), *y0.shape[1:]).clone(), stats=stats)


def solve(f: VectorField, y0: Tensor, t_eval: Sequence[float] | Tensor, method: str | ButcherTableau = "tsit5",
          rtol: float = 1e-6, atol: float = 1e-8, max_steps: int = 10_000, per_sample: bool = True,
          h0: float | Tensor | None = None, norm: Literal["rms", "max"] = "rms",
          interpolation: Literal["tableau", "hermite"] = "tableau", controller: PIController | None = None,
          record_steps: bool = False, adjoint: Adjoint = "direct",
          adjoint_params: Sequence[Tensor] | None = None) -> Solution:
    """Integrate ``dy/dt = f(t, y)`` from ``t_eval[0]`` to ``t_eval[-1]`` for a batch of initial states.

    f: ``f(t, y)`` with ``t`` float64 ``(batch,)`` (each sample's own time) and ``y`` ``(batch, *state)``.
    y0: ``(batch, *state)``. t_eval: shared 1-D strictly increasing times, ``t_eval[0]`` is ``t0``.
    method: ``"tsit5"``, ``"dopri5"`` or a :class:`ButcherTableau`. per_sample: per-sample step sizes and error
    norms (True) or one joint norm and step sequence for the batch. h0: initial step (scalar or ``(batch,)``);
    ``None`` uses :func:`initial_step_size`. max_steps: limit on batched step attempts (accepted + rejected).
    interpolation: dense output by the tableau's free 4th-order interpolant (default; falls back to
    ``"hermite"`` when the tableau has none) or cubic Hermite from ``y, y1, f0, f1``.
    controller: step-size controller; default :meth:`PIController.for_tableau`.
    record_steps: also keep, for every accepted step, its error ratio with the autograd graph and its start
    state (``stats.step_error``, ``stats.step_y``), as the global and local regularisers need; costs no extra
    evaluation of ``f``, only the memory of one ``(batch,)`` ratio and one state per step attempt.
    adjoint: how gradients of ``ys`` (and of ``stats.step_error``) are computed; the forward values are the same.

    - ``"direct"`` (default): autograd through every stage of every attempt; memory ``O(stages x attempts x
      state)`` plus what ``f`` saves per call.
    - ``"checkpoint"``: the forward pass runs without a graph and keeps only the start ``(t_j, y_j, h_j)`` of each
      attempt in which some sample accepted its step; the backward pass recomputes those steps one at a time,
      last to first, and backpropagates through each (the rejected attempts are not recomputed). Gradients are
      the discrete ones of ``"direct"`` up to rounding; memory ``O(steps x state)``; one extra call of ``f`` per
      step in the backward pass (the first stage). The global regulariser works (its terms are recomputed too).
    - ``"backsolve"``: the continuous adjoint. The backward pass integrates ``y``, ``a = dL/dy`` and
      ``dL/dtheta = int a^T df/dtheta dt`` from ``t_eval[-1]`` back to ``t_eval[0]`` with the same method,
      tolerances, controller and ``per_sample`` choice, restarting from the forward ``ys`` at each ``t_eval``
      point and adding the cotangent of ``ys`` there (as torchdiffeq's ``odeint_adjoint``). The error norm covers
      ``y`` and ``a``; the parameter integral is a quadrature with the method's weights ``b`` over each accepted
      step, kept out of the norm (torchdiffeq's ``seminorm``). Gradients agree with ``"direct"`` to the solver
      tolerance; memory ``O(len(t_eval) x state)``, independent of the number of steps. ``stats.step_error`` has no
      graph, so the global regulariser refuses it.

    With ``"checkpoint"`` and ``"backsolve"`` gradients reach ``y0`` and the parameters: ``f.parameters()`` when
    ``f`` is an ``nn.Module``, else ``adjoint_params`` (required then: a tensor that ``f`` closes over and that is
    not listed gets no gradient). ``f`` runs without grad in the forward pass; the rows of the batch must not
    interact in ``f`` (as the per-sample step control already assumes); the backward pass itself is not
    differentiable (no double backward).
    Returns :class:`Solution` with ``ys`` ``(batch, len(t_eval), *state)`` and :class:`SolveStats`; a batch of 0
    samples gives ``ys`` ``(0, len(t_eval), *state)`` and zero counts without calling ``f``.

    Inputs are checked first (ValueError or TypeError naming the argument). Tolerances below what the state's dtype
    resolves (both under 8 eps, e.g. rtol < 9.5e-7 in float32) cost many steps for no accuracy: a
    :class:`PrecisionWarning` says so, once per process and dtype.
    """
    tab = get_tableau(method)
    check_callable("f", f)
    check_tolerances(rtol, atol)
    _check_options(controller, {"per_sample": per_sample, "record_steps": record_steps})
    if interpolation not in ("tableau", "hermite"):
        raise ValueError(bad_value("interpolation", interpolation, "'tableau' or 'hermite'", "use the default"))
    if norm not in ("rms", "max"):
        raise ValueError(bad_value("norm", norm, "'rms' or 'max'", "use norm='rms' (Hairer's and the paper's)"))
    params = _adjoint_params(f, adjoint, adjoint_params)
    how = interpolation if tab.interpolant is not None else "hermite"
    ts = _check_inputs(y0, t_eval, max_steps)
    _warn_precision(y0.dtype, rtol, atol)
    if y0.shape[0] == 0:
        return _empty_solution(y0, ts, record_steps, adjoint=adjoint)
    ctrl = PIController.for_tableau(tab) if controller is None else controller
    run = _Run(f, tab, ctrl, ts, rtol, atol, norm, per_sample, how, record_steps, max_steps, h0)
    if adjoint == "direct":
        ys, stats = _integrate(run, y0)
        return Solution(ts=ts, ys=ys, stats=stats)
    function = _CheckpointSolve if adjoint == "checkpoint" else _BacksolveSolve
    ys, step_error = function.apply(run, y0, *params)
    assert run.stats is not None, "set by the forward pass"
    if record_steps and adjoint == "checkpoint":
        run.stats.step_error = step_error  # the output of the Function: its gradient is the recomputed steps'
    return Solution(ts=ts, ys=ys, stats=run.stats)


def _adjoint_params(f: VectorField, adjoint: object, adjoint_params: Sequence[Tensor] | None) -> tuple[Tensor, ...]:
    """The tensors the checkpoint and backsolve backward passes differentiate ``f`` by (those requiring grad, each
    once); ``()`` for ``"direct"``, which differentiates whatever ``f`` uses."""
    if not isinstance(adjoint, str) or adjoint not in _ADJOINTS:
        raise ValueError(bad_value("adjoint", adjoint, " or ".join(map(repr, _ADJOINTS)),
                                   "use adjoint='direct' (the default), 'checkpoint' or 'backsolve'"))
    if adjoint == "direct":
        if adjoint_params is not None:
            raise ValueError(bad_value("adjoint_params", "<given>", "None for adjoint='direct' (autograd finds every "
                                       "tensor f uses)", "drop adjoint_params or pass adjoint='checkpoint'"))
        return ()
    if adjoint_params is None:
        if not isinstance(f, torch.nn.Module):
            raise ValueError(bad_value("adjoint_params", None, f"the tensors f depends on for adjoint={adjoint!r} "
                                       "(f is not an nn.Module, so its parameters cannot be found)",
                                       "pass adjoint_params=[w, b, ...] (or [] if f has none), or make f an nn.Module"))
        candidates: Sequence[object] = list(f.parameters())
    elif isinstance(adjoint_params, Tensor) or not isinstance(adjoint_params, (list, tuple)):
        raise TypeError(bad_value("adjoint_params", type(adjoint_params).__name__, "a list or tuple of tensors",
                                  "pass adjoint_params=[w, b] (or list(module.parameters()))"))
    else:
        candidates = adjoint_params
    params: dict[int, Tensor] = {}
    for i, p in enumerate(candidates):
        if not isinstance(p, Tensor):
            raise TypeError(bad_value(f"adjoint_params[{i}]", type(p).__name__, "a tensor", "pass tensors only"))
        if p.requires_grad:
            params.setdefault(id(p), p)
    return tuple(params.values())


@dataclass
class _Run:
    """One solve's field and options (checked), shared by the forward loop and the backward passes."""

    f: VectorField
    tab: ButcherTableau
    ctrl: PIController
    ts: Tensor
    rtol: float
    atol: float
    norm: Literal["rms", "max"]
    per_sample: bool
    how: str
    record_steps: bool
    max_steps: int
    h0: float | Tensor | None
    stats: SolveStats | None = None  # set by the forward pass of a Function


@dataclass
class _Checkpoints:
    """What ``adjoint="checkpoint"`` keeps of the forward loop: one entry per attempt in which some sample accepted
    its step (``t``, ``h``: float64 ``(batch,)``, ``accepted``: bool ``(batch,)``, ``y``: ``(batch, *state)``, the
    attempt's start), and the ``t_eval`` slots each of them wrote (``(kept index, rows, cols)``)."""

    t: list[Tensor] = field(default_factory=list)
    h: list[Tensor] = field(default_factory=list)
    accepted: list[Tensor] = field(default_factory=list)
    y: list[Tensor] = field(default_factory=list)
    outputs: list[tuple[Tensor, Tensor, Tensor]] = field(default_factory=list)

    def add(self, state: _State, y_old: Tensor, n_outputs: int) -> None:
        """Keep the attempt just made by ``_attempt`` if any sample accepted (one host synchronisation)."""
        t_old, h_try, accepted = state.record[-1]
        written = state.outputs[n_outputs:]
        if not written and not bool(accepted.any()):
            return  # every sample rejected (or had finished): the state did not move, nothing to recompute
        k = len(self.t)
        self.t.append(t_old)
        self.h.append(h_try)
        self.accepted.append(accepted)
        self.y.append(y_old)
        self.outputs.extend((torch.full_like(rows, k), rows, cols) for rows, cols, _ in written)

    def stacked(self) -> tuple[Tensor, ...]:
        """``(t, h, accepted, y)`` stacked to ``(kept, batch, ...)``, then ``(kept index, rows, cols)`` of the
        outputs, each ``(P,)``. A finished solve accepted at least one step (its last one), so none is empty."""
        assert self.t and self.outputs, "the last accepted step writes t_eval[-1]"
        tensors = tuple(torch.stack(x) for x in (self.t, self.h, self.accepted, self.y))
        return tensors + tuple(torch.cat(x) for x in zip(*self.outputs, strict=True))


def _integrate(run: _Run, y0: Tensor, keep: _Checkpoints | None = None) -> tuple[Tensor, SolveStats]:
    """The solver loop: ``ys`` ``(batch, T, *state)`` and the statistics. Differentiable as it runs (``"direct"``);
    ``keep`` collects the checkpoints (run it under no_grad then)."""
    state = _initial_state(run.f, y0, run.ts, run.tab, run.rtol, run.atol, run.per_sample, run.h0)
    n_attempts = 0
    while _check_progress(state, run.ts, run.max_steps, n_attempts):
        y_old, n_outputs = state.y, len(state.outputs)
        _attempt(run.f, state, run.tab, run.ctrl, run.ts, run.rtol, run.atol, run.norm, run.per_sample, run.how,
                 run.record_steps)
        n_attempts += 1
        if keep is not None:
            keep.add(state, y_old, n_outputs)
    rows, cols, values = (torch.cat(x) for x in zip(*state.outputs, strict=True))
    ys = y0.new_zeros(y0.shape[0], run.ts.numel(), *y0.shape[1:]).index_put((rows, cols), values)
    packed = _pack_record(state.record, state.n_accepted, state.steps)
    stats = SolveStats(state.nfe, state.n_accepted, state.n_rejected, state.nfe_joint, n_attempts, *packed)
    return ys, stats


# --- adjoint="checkpoint": discrete gradients, recomputing one accepted step at a time ----------------------------


class _CheckpointSolve(torch.autograd.Function):
    """``(run, y0, *params) -> (ys, step_error)``: the solve without a graph, then a backward pass over the kept
    steps. ``step_error`` is ``(batch, 0)`` unless ``run.record_steps``."""

    @staticmethod
    def forward(ctx: FunctionCtx, run: _Run, y0: Tensor, *params: Tensor) -> tuple[Tensor, Tensor]:
        keep = _Checkpoints()
        ys, stats = _integrate(run, y0, keep)
        if stats.step_y is not None:
            stats.step_y = stats.step_y.detach()
        stats.adjoint = "checkpoint"
        run.stats = stats
        ctx.run, ctx.params = run, params  # type: ignore[attr-defined]
        ctx.save_for_backward(*keep.stacked())
        ctx.set_materialize_grads(False)
        error = stats.step_error if stats.step_error is not None else ys.new_zeros(ys.shape[0], 0)
        return ys, error

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, g_ys: Tensor | None, g_error: Tensor | None) -> tuple[Tensor | None, ...]:
        run, params = ctx.run, ctx.params  # type: ignore[attr-defined]
        t_k, h_k, acc_k, y_k, out_k, out_rows, out_cols = ctx.saved_tensors  # type: ignore[attr-defined]
        wrt = [p for p, need in zip(params, ctx.needs_input_grad[2:], strict=True) if need]  # type: ignore[attr-defined]
        grads = [torch.zeros_like(p) for p in wrt]
        slot = acc_k.long().cumsum(0) - 1  # index j of each kept attempt's accepted step in stats.step_error
        per_attempt = torch.bincount(out_k, minlength=t_k.shape[0]).tolist()
        firsts = [0, *torch.tensor(per_attempt).cumsum(0).tolist()]
        adj = y_k.new_zeros(y_k.shape[1:])  # dL/dy at the end of the attempt being recomputed
        for k in range(t_k.shape[0] - 1, -1, -1):
            out = slice(firsts[k], firsts[k + 1])
            with torch.enable_grad():
                y = y_k[k].detach().requires_grad_()
                outs, cots = _recompute_step(run, t_k[k], h_k[k], acc_k[k], y, adj, out_rows[out], out_cols[out],
                                             g_ys, g_error, slot[k])
                got = torch.autograd.grad(outs, [y, *wrt], cots, allow_unused=True)
            adj = torch.zeros_like(y) if got[0] is None else got[0]
            for acc, g in zip(grads, got[1:], strict=True):
                if g is not None:
                    acc += g
        if g_ys is not None:
            adj = adj + g_ys[:, 0]
        it = iter(grads)
        g_params = [next(it) if need else None for need in ctx.needs_input_grad[2:]]  # type: ignore[attr-defined]
        return None, adj, *g_params


def _recompute_step(run: _Run, t: Tensor, h_try: Tensor, accepted: Tensor, y: Tensor, adj: Tensor, rows: Tensor,
                    cols: Tensor, g_ys: Tensor | None, g_error: Tensor | None,
                    slot: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """One kept attempt with its graph, as ``_attempt`` computed it for the accepted samples (the others step by
    ``h = 0``: their state carries over, and a rejected non-finite attempt cannot poison the gradient): the next
    state, the dense output it wrote and its error ratios, each with its cotangent."""
    tab = run.tab
    keep = accepted.reshape(-1, *([1] * (y.dim() - 1)))
    h = torch.where(accepted, h_try, torch.zeros_like(h_try))
    res = step_unchecked(run.f, t, y, h, tab)  # k1 = f(t, y) recomputed: the FSAL stage of the step before
    assert run.stats is not None
    run.stats.nfe_backward += tab.stages
    outs, cots = [torch.where(keep, res.y_next, y)], [adj]
    if rows.numel() and g_ys is not None:
        f1 = res.stages[-1]
        if not tab.fsal:
            f1 = call_vector_field(run.f, t + h, res.y_next)
            run.stats.nfe_backward += 1
        theta = ((run.ts[cols] - t[rows]) / h[rows]).clamp(0.0, 1.0)
        slots = int(torch.bincount(rows).max())
        values = _interpolate(tab, run.how, rows, y, res.y_next, res.stages, f1, h[rows], theta, slots)
        at_end = (theta == 1.0).reshape(-1, *([1] * (values.dim() - 1)))
        outs.append(torch.where(at_end, res.y_next[rows], values))
        cots.append(g_ys[rows, cols])
    if g_error is not None and run.record_steps:
        err = torch.where(keep, res.error_estimate, torch.ones_like(res.error_estimate))
        outs.append(error_ratio(err, y, res.y_next, run.rtol, run.atol, run.norm, run.per_sample))
        picked = g_error.gather(1, slot.clamp(min=0)[:, None])[:, 0]
        cots.append(torch.where(accepted, picked, torch.zeros_like(picked)))
    return outs, cots


# --- adjoint="backsolve": the continuous adjoint, integrated backwards with the same solver --------------------


class _AdjointField:
    """The adjoint system in reversed time ``s = -t`` on ``z = (y, a)`` stacked on dim 1, ``(batch, 2, *state)``:
    ``dy/ds = -f(t, y)``, ``da/ds = a^T df/dy``. Each call evaluates ``f`` and one vector-Jacobian product. While
    ``stages`` is a list (one step attempt), each call also records what :meth:`quadrature` needs for
    ``a^T df/dtheta`` once the accepted samples are known. Per-sample control (``joint=False``) keeps
    ``(f(t, y), a)`` with the graph of ``f``: each sample's stages are weighted by its own step and acceptance
    before the sum over the batch. With one joint step (``joint=True``) the weight is the same for every sample,
    so each call takes ``a^T df/dtheta`` at once, in the same backward pass as ``a^T df/dy``, and keeps only those
    parameter-sized sums: no stage graph outlives its call (memory: one call's graph instead of an attempt's)."""

    def __init__(self, f: VectorField, params: Sequence[Tensor], joint: bool = False) -> None:
        self.f, self.params, self.joint = f, list(params), joint
        self.stages: list[tuple[Tensor, Tensor]] | list[list[Tensor | None]] | None = None
        self.calls = 0

    def __call__(self, s: Tensor, z: Tensor) -> Tensor:
        a = z[:, 1]
        record = self.stages is not None and bool(self.params)
        with torch.enable_grad():
            y = z[:, 0].detach().requires_grad_()
            fy = call_vector_field(self.f, -s, y)
            vjp, param_vjps = None, None
            if fy.requires_grad:  # else f depends on neither y nor the parameters
                wrt = [y, *self.params] if record and self.joint else [y]
                vjp, *param_vjps = torch.autograd.grad(fy, wrt, a, retain_graph=record and not self.joint,
                                                       allow_unused=True)
        self.calls += 1
        if record and self.stages is not None and fy.requires_grad:
            self.stages.append(param_vjps if self.joint else (fy, a))  # type: ignore[arg-type]
        return torch.stack([-fy.detach(), torch.zeros_like(a) if vjp is None else vjp], 1)

    def quadrature(self, run: _Run, t_old: Tensor, z_old: Tensor, h: Tensor, accepted: Tensor,
                   grads: list[Tensor]) -> None:
        """Add ``h sum_i b_i a_i^T df/dtheta(t_i, y_i)`` over the stages of the attempt just made, for the accepted
        samples, to ``grads`` (the stages' own graphs; the first stage is re-evaluated at the attempt's start)."""
        stages, self.stages = self.stages, None
        if not self.params or stages is None or not bool(accepted.any()):
            return
        with torch.enable_grad():
            first = call_vector_field(self.f, -t_old, z_old[:, 0].detach())
        self.calls += 1
        weight = torch.where(accepted, h, torch.zeros_like(h))
        if len(stages) < run.tab.stages - 1 or not first.requires_grad:
            return  # f did not depend on the parameters in some stage: then it does in none (same f)
        if self.joint:
            self._joint_quadrature(run, first, z_old[:, 1], stages, weight, grads)  # type: ignore[arg-type]
            return
        outs, cots = [], []
        calls = [(first, z_old[:, 1]), *stages[: run.tab.stages - 1]]
        for b, (fy, a) in zip(run.tab.b, calls, strict=True):
            if b != 0.0:
                outs.append(fy)
                cots.append(a * batch_view(weight * b, a))
        got = torch.autograd.grad(outs, self.params, cots, allow_unused=True)
        for acc, g in zip(grads, got, strict=True):
            if g is not None:
                acc += g

    def _joint_quadrature(self, run: _Run, first: Tensor, a_old: Tensor, stages: list[list[Tensor | None]],
                          weight: Tensor, grads: list[Tensor]) -> None:
        """:meth:`quadrature` for one joint step: ``h sum_i b_i`` over the stages' parameter products."""
        assert bool((weight == weight[0]).all()), "a joint step shares its size and acceptance"
        first_vjps = torch.autograd.grad(first, self.params, a_old, allow_unused=True)
        per_stage: list[Sequence[Tensor | None]] = [first_vjps, *stages[: run.tab.stages - 1]]
        h = float(weight[0])
        for b, vjps in zip(run.tab.b, per_stage, strict=True):
            if b == 0.0:
                continue
            for acc, g in zip(grads, vjps, strict=True):
                if g is not None:
                    acc.add_(g, alpha=h * b)


class _BacksolveSolve(torch.autograd.Function):
    """``(run, y0, *params) -> (ys, unused)``: the solve without a graph; the backward pass integrates the adjoint
    system from ``t_eval[-1]`` to ``t_eval[0]``. Saves ``ys`` only."""

    @staticmethod
    def forward(ctx: FunctionCtx, run: _Run, y0: Tensor, *params: Tensor) -> tuple[Tensor, Tensor]:
        ys, stats = _integrate(run, y0)
        if stats.step_y is not None:
            stats.step_y = stats.step_y.detach()
        stats.adjoint = "backsolve"
        run.stats = stats
        ctx.run, ctx.params = run, params  # type: ignore[attr-defined]
        ctx.save_for_backward(ys)
        ctx.set_materialize_grads(False)
        return ys, ys.new_zeros(ys.shape[0], 0)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, g_ys: Tensor | None, g_unused: Tensor | None) -> tuple[Tensor | None, ...]:
        run, params = ctx.run, ctx.params  # type: ignore[attr-defined]
        (ys,) = ctx.saved_tensors  # type: ignore[attr-defined]
        wrt = [p for p, need in zip(params, ctx.needs_input_grad[2:], strict=True) if need]  # type: ignore[attr-defined]
        grads = [torch.zeros_like(p) for p in wrt]
        field = _AdjointField(run.f, wrt, joint=not run.per_sample)
        g = torch.zeros_like(ys) if g_ys is None else g_ys
        adj = g[:, -1]
        for i in range(run.ts.numel() - 1, 0, -1):  # t_eval[i] -> t_eval[i - 1], restarting from the forward ys
            z = _adjoint_segment(run, field, torch.stack([ys[:, i], adj], 1), run.ts[i], run.ts[i - 1], grads)
            adj = z[:, 1] + g[:, i - 1]
        assert run.stats is not None
        run.stats.nfe_backward += field.calls
        it = iter(grads)
        g_params = [next(it) if need else None for need in ctx.needs_input_grad[2:]]  # type: ignore[attr-defined]
        return None, adj, *g_params


def _adjoint_segment(run: _Run, field: _AdjointField, z0: Tensor, t_from: Tensor, t_to: Tensor,
                     grads: list[Tensor]) -> Tensor:
    """Integrate the adjoint system from ``t_from`` back to ``t_to < t_from`` (``s`` from ``-t_from`` to ``-t_to``)
    with the forward solve's method, tolerances, controller and step-control mode; returns ``z`` at ``t_to``."""
    seg = torch.stack([-t_from, -t_to])
    state = _initial_state(field, z0, seg, run.tab, run.rtol, run.atol, run.per_sample, None)
    n_attempts = 0
    while _check_progress(state, seg, run.max_steps, n_attempts):
        t_old, z_old = state.t, state.y
        field.stages = []
        _attempt(field, state, run.tab, run.ctrl, seg, run.rtol, run.atol, run.norm, run.per_sample, run.how, False)
        n_attempts += 1
        _, h_try, accepted = state.record[-1]
        field.quadrature(run, t_old, z_old, h_try, accepted, grads)
    return state.y
