"""One explicit embedded Runge-Kutta step, the error norm, and the automatic initial step size.

Conventions shared by the solver core:

- State ``y`` is batched: ``(batch, *state)``; it keeps its dtype (float32 or float64).
- Time ``t`` and step ``h`` are float64 ``(batch,)`` tensors internally; Python numbers and 0-d tensors are
  broadcast to the batch.
- The vector field is called as ``f(t, y)`` with ``t`` a float64 ``(batch,)`` tensor (one time per sample) and
  must return a tensor of ``y``'s shape. A field that ignores ``t`` needs nothing; one that uses it broadcasts it
  itself (``t[:, None]``) and casts it to the state dtype if it concatenates it to ``y``.
- Everything is plain differentiable torch; nothing is detached here except in :func:`initial_step_size`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from leanfit.core.errors import bad_value
from leanfit.neural_de.tableaus import TSIT5, ButcherTableau, get_tableau

__all__ = ["StepResult", "VectorField", "call_vector_field", "error_ratio", "initial_step_size", "rk_step"]

VectorField = Callable[[Tensor, Tensor], Tensor]
TimeLike = float | Tensor


@dataclass(frozen=True)
class StepResult:
    """Result of :func:`rk_step`.

    y_next: ``(batch, *state)``, the propagated (higher-order) solution at ``t + h``.
    error_estimate: ``(batch, *state)``, ``h * sum_i b_error_i k_i`` = propagated minus embedded solution.
    stages: the ``s`` stage derivatives ``k_i``, each ``(batch, *state)``; for an FSAL tableau ``stages[-1]`` is
        ``f(t + h, y_next)``, i.e. the first stage of the next step.
    """

    y_next: Tensor
    error_estimate: Tensor
    stages: tuple[Tensor, ...]


def check_tolerances(rtol: float, atol: float) -> None:
    for name, value in (("rtol", rtol), ("atol", atol)):
        if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0 < value < math.inf):
            raise ValueError(bad_value(name, value, "a finite float > 0", f"pass e.g. {name}=1e-6"))


def check_callable(name: str, fn: object) -> None:
    """TypeError unless ``fn`` is callable (a vector field ``f(t, y)``, a drift or a diffusion)."""
    if not callable(fn):
        raise TypeError(bad_value(name, fn, f"a callable {name}(t, y) returning a tensor shaped like y",
                                  "pass a function or an nn.Module"))


def check_flag(name: str, value: object) -> None:
    """TypeError unless ``value`` is a bool (a truthy string would silently switch the option on)."""
    if not isinstance(value, bool):
        raise TypeError(bad_value(name, value, "True or False", f"pass {name}=True or {name}=False"))


def check_state(name: str, y: object) -> Tensor:
    """``y`` as a finite floating ``(batch, *state)`` tensor (batch may be 0); TypeError or ValueError otherwise.
    Costs one host synchronisation (the finiteness check)."""
    if not isinstance(y, Tensor):
        raise TypeError(bad_value(name, type(y).__name__, "a floating tensor shaped (batch, *state)",
                                  f"pass {name} as a torch tensor, e.g. torch.tensor(..., dtype=torch.float64)"))
    if y.dim() < 1 or not y.is_floating_point():
        raise ValueError(bad_value(name, f"{y.dtype} tensor of shape {tuple(y.shape)}",
                                   "a floating tensor shaped (batch, *state)",
                                   "add a batch dimension and cast to float32 or float64"))
    if not torch.isfinite(y).all():
        bad = (~torch.isfinite(y)).reshape(y.shape[0], -1).any(1).nonzero()[0, 0].item()
        raise ValueError(bad_value(name, f"<NaN/inf in sample {bad}>", "finite values", f"clean {name}"))
    return y


def finite_times(x: TimeLike, batch: int, name: str, device: torch.device) -> Tensor:
    """:func:`as_batch_time` that also refuses NaN and infinite entries (one host synchronisation)."""
    x_b = as_batch_time(x, batch, name, device)
    if not torch.isfinite(x_b).all():
        shown = x.tolist() if isinstance(x, Tensor) else x
        raise ValueError(bad_value(name, shown, "finite values (a scalar or one per sample)",
                                   f"check how {name} was computed"))
    return x_b


def as_batch_time(x: TimeLike, batch: int, name: str, device: torch.device) -> Tensor:
    """``x`` as a float64 ``(batch,)`` tensor: a Python number or 0-d tensor is broadcast, ``(batch,)`` is kept."""
    if isinstance(x, Tensor):
        x = x.to(device, torch.float64)
    else:
        try:
            x = torch.as_tensor(x, dtype=torch.float64, device=device)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(bad_value(name, x, "a float or a float64 tensor of shape () or (batch,)",
                                      f"pass {name} as a number")) from exc
    if x.dim() == 0:
        return x.expand(batch)
    if x.shape != (batch,):
        raise ValueError(
            bad_value(f"{name}.shape", tuple(x.shape), f"a scalar or ({batch},), one value per sample",
                      f"pass {name} as a float or a 1-D tensor with one entry per row of y")
        )
    return x


def batch_view(x: Tensor, like: Tensor) -> Tensor:
    """``(batch,)`` -> ``(batch, 1, ..., 1)`` in ``like``'s dtype, ready to multiply a ``(batch, *state)`` tensor."""
    return x.to(like.dtype).reshape(x.shape[0], *([1] * (like.dim() - 1)))


def call_vector_field(f: VectorField, t: Tensor, y: Tensor) -> Tensor:
    """``f(t, y)`` with its output shape checked against ``y``."""
    out = f(t, y)
    if not isinstance(out, Tensor) or out.shape != y.shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"f(t, y) returned shape {got}, expected y's shape {tuple(y.shape)} (batch, *state); the vector field "
            "must map a (batch, *state) state and (batch,) times to a derivative of the same shape"
        )
    return out


def _combine(weights: Sequence[float], ks: Sequence[Tensor]) -> Tensor:
    """``sum_i weights[i] * ks[i]``, skipping zero weights."""
    acc = None
    for w, k in zip(weights, ks, strict=True):
        if w != 0.0:
            acc = k * w if acc is None else torch.add(acc, k, alpha=w)
    return torch.zeros_like(ks[0]) if acc is None else acc


def rk_step(f: VectorField, t: TimeLike, y: Tensor, h: TimeLike, tableau: ButcherTableau | str = TSIT5,
            k1: Tensor | None = None) -> StepResult:
    """One step of an explicit embedded Runge-Kutta pair from any state, batched and differentiable.

    f: vector field ``f(t, y)``, ``t`` float64 ``(batch,)``. t, h: scalars or ``(batch,)`` (per-sample times and
    steps; ``h`` may be negative or zero). y: ``(batch, *state)``. k1: ``f(t, y)`` if already known (FSAL), which
    saves one evaluation. Calls ``f`` ``s`` times (``s - 1`` when ``k1`` is given), ``s`` = number of stages.
    """
    tab = get_tableau(tableau)
    check_callable("f", f)
    y = check_state("y", y)
    t_b = finite_times(t, y.shape[0], "t", y.device)
    # A negative h integrates backwards and h = 0 returns y: both valid; NaN/inf would silently give NaN.
    h_b = finite_times(h, y.shape[0], "h", y.device)
    if k1 is not None and (not isinstance(k1, Tensor) or k1.shape != y.shape):
        got = tuple(k1.shape) if isinstance(k1, Tensor) else type(k1).__name__
        raise ValueError(bad_value("k1.shape", got, f"y's shape {tuple(y.shape)}", "pass k1=f(t, y)"))
    return step_unchecked(f, t_b, y, h_b, tab, k1)


def step_unchecked(f: VectorField, t_b: Tensor, y: Tensor, h_b: Tensor, tab: ButcherTableau,
                   k1: Tensor | None = None) -> StepResult:
    """:func:`rk_step` on checked inputs (no host synchronisation), for the solvers' loops and the regularisers.
    t_b, h_b: float64 ``(batch,)``; tab: a tableau, not a name."""
    h_y = batch_view(h_b, y)
    ks = [call_vector_field(f, t_b, y) if k1 is None else k1]
    y_stage = y
    for i in range(1, tab.stages):
        y_stage = y + h_y * _combine(tab.a[i], ks)
        ks.append(call_vector_field(f, t_b + tab.c[i] * h_b, y_stage))
    # FSAL: the last stage is evaluated at y_next itself (a[-1] == b), so y_next is already computed.
    y_next = y_stage if tab.fsal else y + h_y * _combine(tab.b, ks)
    return StepResult(y_next=y_next, error_estimate=h_y * _combine(tab.b_error, ks), stages=tuple(ks))


def _norm(x: Tensor, norm: str, per_sample_norm: bool) -> Tensor:
    """RMS or max norm of ``x: (batch, *state)`` per sample, or over the whole batch broadcast to ``(batch,)``."""
    flat = x.reshape(x.shape[0], -1) if per_sample_norm else x.reshape(1, -1)
    if norm == "rms":  # sqrt with a zero (not NaN) gradient at 0: an exactly zero error must not poison backward
        ms = flat.pow(2).mean(1)
        zero = ms == 0
        out = torch.where(zero, torch.zeros_like(ms), torch.where(zero, torch.ones_like(ms), ms).sqrt())
    else:
        out = flat.abs().amax(1)
    return out if per_sample_norm else out.expand(x.shape[0])


def error_ratio(error: Tensor, y0: Tensor, y1: Tensor, rtol: float, atol: float,
                norm: Literal["rms", "max"] = "rms", per_sample: bool = True) -> Tensor:
    """Scaled error ``EEst``: ``|| error / (atol + rtol * max(|y0|, |y1|)) ||``; a step is acceptable if ``<= 1``.

    error, y0, y1: ``(batch, *state)``. norm: ``"rms"`` (Hairer's, the paper's) or ``"max"``. per_sample: one
    norm per sample, or one over the whole batch array (the paper's joint norm) broadcast to every sample.
    Returns ``(batch,)`` in the state dtype; differentiable (through ``y0``/``y1`` too, detach them if unwanted).
    """
    check_tolerances(rtol, atol)
    if norm not in ("rms", "max"):
        raise ValueError(bad_value("norm", norm, "'rms' or 'max'", "use norm='rms' (Hairer's and the paper's)"))
    for name, x in (("error", error), ("y0", y0), ("y1", y1)):
        if not isinstance(x, Tensor):
            raise TypeError(bad_value(name, type(x).__name__, "a tensor shaped (batch, *state)", "pass tensors"))
        if x.shape != error.shape or x.dim() < 1:
            raise ValueError(bad_value(f"{name}.shape", tuple(x.shape), f"error's shape {tuple(error.shape)}, "
                                       "(batch, *state)", "pass the error estimate and the states of one step"))
    scale = atol + rtol * torch.maximum(y0.abs(), y1.abs())
    return _norm(error / scale, norm, per_sample)


@torch.no_grad()
def initial_step_size(f: VectorField, t0: TimeLike, y0: Tensor, rtol: float, atol: float, order: int,
                      f0: Tensor | None = None, per_sample: bool = True) -> Tensor:
    """Automatic initial step of Hairer, Norsett & Wanner, Solving ODEs I, II.4 (the ``HINIT`` routine).

    With ``sc = atol + rtol |y0|`` and RMS norms: ``d0 = ||y0/sc||``, ``d1 = ||f0/sc||``; ``h0 = 0.01 d0/d1``
    (``1e-6`` if either is below ``1e-5``); one explicit Euler step gives ``f1 = f(t0 + h0, y0 + h0 f0)`` and
    ``d2 = ||(f1 - f0)/sc|| / h0``; ``h1 = (0.01 / max(d1, d2))**(1/order)`` (``max(1e-6, 1e-3 h0)`` if
    ``max(d1, d2) <= 1e-15``); the result is ``min(100 h0, h1)``. Calls ``f`` once, twice when ``f0`` is not given.

    order: the power of ``h`` in the local error estimate the step will be controlled by, so that ``h1`` makes
    ``h1**order * max(d1, d2) = 0.01``: Hairer's ``IORD`` (``H1=(0.01/DER12)**(1/IORD)``, 5 in DOPRI5, 8 in
    DOP853) and OrdinaryDiffEq.jl's ``alg_order``; for an embedded ``p(p-1)`` pair it is the method's order ``p``,
    ``tableau.error_exponent`` (5 for Tsit5 and Dopri5). scipy and torchdiffeq reach the same ``1/5`` by passing
    the estimator's order 4 to a ``1/(order + 1)`` formula. The norms are RMS norms as in the book (its (4.11)),
    scipy, torchdiffeq and OrdinaryDiffEq.jl; Hairer's Fortran HINIT uses unnormalised Euclidean sums instead
    (the same for a scalar state).

    Returns float64 ``(batch,)``, detached (the paper treats this step size as a constant). per_sample=False
    uses norms over the whole batch, so every sample gets the same step.
    """
    check_tolerances(rtol, atol)
    check_callable("f", f)
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise ValueError(bad_value("order", order, "the power of h in the error estimate, an int >= 1",
                                   "pass tableau.error_exponent (5 for Tsit5 and Dopri5)"))
    y0 = check_state("y0", y0)
    t0_b = finite_times(t0, y0.shape[0], "t0", y0.device)
    if f0 is not None and (not isinstance(f0, Tensor) or f0.shape != y0.shape):
        got = tuple(f0.shape) if isinstance(f0, Tensor) else type(f0).__name__
        raise ValueError(bad_value("f0.shape", got, f"y0's shape {tuple(y0.shape)}", "pass f0=f(t0, y0) or None"))
    f0 = call_vector_field(f, t0_b, y0) if f0 is None else f0
    scale = atol + rtol * y0.abs()
    d0 = _norm(y0 / scale, "rms", per_sample).double()
    d1 = _norm(f0 / scale, "rms", per_sample).double()
    small = (d0 < 1e-5) | (d1 < 1e-5)
    h0 = torch.where(small, torch.full_like(d0, 1e-6), 0.01 * d0 / torch.where(small, torch.ones_like(d1), d1))
    f1 = call_vector_field(f, t0_b + h0, y0 + batch_view(h0, y0) * f0)
    d2 = _norm((f1 - f0) / scale, "rms", per_sample).double() / h0
    dmax = torch.maximum(d1, d2)
    tiny = dmax <= 1e-15
    h1 = torch.where(tiny, torch.clamp(h0 * 1e-3, min=1e-6), (0.01 / torch.where(tiny, 1.0, dmax)) ** (1.0 / order))
    return torch.minimum(100 * h0, h1)
