"""Adaptive Milstein (or Euler-Maruyama) for Ito SDEs with diagonal noise: step doubling, Brownian bridge memory.

The equation is ``dy = f(t, y) dt + g(t, y) * dW`` with ``y: (batch, *state)``, ``g(t, y)`` of ``y``'s shape (the
diagonal of the noise matrix) and ``W`` one independent Brownian motion per state entry and sample.

Why hand-written: the local regulariser needs a differentiable error estimate of one step taken from an arbitrary
state (:func:`sde_step`), and the experiments need per-sample statistics and the accepted steps. torchsde 0.2.6
(not a dependency; ``pip install --no-deps torchsde`` installs it as a possible baseline) has no public step, and
its adaptive loop computes the step-doubling error under ``no_grad`` and returns it as a Python float for the whole
batch (``adaptive_stepping.compute_error``); it has no SOSRI either, so the paper's solver is out of reach anyway.

Choices, each the simplest correct one (numbers: geometric Brownian motion ``dY = Y/2 dt + Y dW``, ``Y(0) = 1``,
on the solver's own path; tests/neural_de/test_sde.py):

- **Scheme** ``"milstein"`` (default): derivative-free Milstein (Kloeden & Platen, Numerical Solution of SDEs
  (1992), (11.1.5); StochasticDiffEq.jl's RKMil) ``y + f h + g dW + s (g(t, y_hat) - g) (dW^2 - h) / (2 sqrt(h))``
  with ``y_hat = y + f h + s g sqrt(h)`` and ``s = sign(dW)`` per entry; the textbook has ``s = 1``. Strong order 1
  and weak order 1 when each ``g_i`` depends on ``t`` and ``y_i`` only (diagonal noise in Kloeden & Platen's
  sense, which is commutative: no Levy areas needed); strong order 0.5 when ``g_i`` also reads other entries
  (the neural SDE's dense linear diffusion), as for every scheme without Levy areas. The sign: ``(g(y_hat) - g) /
  sqrt(h)`` is ``g g' + sqrt(h) (g' f + g'' g^2 / 2) + O(h)`` with ``s = 1``, a remainder even in ``dW``; the
  accept/reject decision reads the step's own increments and biases even terms (odd ones keep mean zero, see
  below), so the textbook scheme converges adaptively only like ``h^0.5`` in the mean: ``E Y(1) - e^0.5`` =
  -0.029, -0.037, -0.030, -0.018 at rtol 1e-1, 1e-2, 2e-3, 5e-4, against -0.018, -0.012, -0.005, -0.002 with
  ``s = sign(dW)`` (2000 paths, +-0.005..0.0003), whose remainder is odd like every other ``O(h^1.5)`` term. On a
  2-D problem with a rotation as the diffusion (``g = B y``, not commutative) the textbook scheme's mean stays
  0.05 off as rtol falls to 2e-3 (Euler-Maruyama's 0.04), the signed one's comes within 0.001 (against fixed
  steps of 2^-9 on the same path). One extra diffusion call per step, at ``y_hat``.
  ``"euler"``: Ito Euler-Maruyama (strong order 0.5, 1 for additive noise; weak order 1), correct for fixed steps
  and for additive noise (where both schemes are one formula and Euler-Maruyama saves Milstein's support-point
  calls: pass it when ``g`` does not depend on ``y``) but not adaptively with multiplicative noise: it lacks the
  Milstein term ``g g' (dW^2 - h) / 2`` that the accept/reject decision biases, and converges to a wrong limit
  even on an exact Brownian path (Gaines & Lyons, SIAM J. Appl. Math. 57 (1997); torchsde warns for this case):
  E Y(1) = 1.69, 1.86, 1.93 (+-0.02, 20000 paths) at rtol 1e-1, 1e-2, 3e-3 instead of e^0.5 = 1.65, where
  Milstein gives 1.62, 1.65, 1.64. The paper used SOSRI (strong order 1.5), so NFE at a given tolerance is not
  comparable with its tables, only ratios between runs.
- **Error estimate by step doubling**: one step of ``h`` with ``dW = dW1 + dW2`` against two steps of ``h/2`` with
  ``dW1`` and ``dW2``; the two-half-step value is propagated (like torchsde). All start with ``f, g`` at
  ``(t, y)``: an attempt costs one drift and one diffusion call at the midpoint (Milstein: three more diffusion
  calls, one per support point) plus one of each at the start of a new step, so 7 calls per accepted step for
  Milstein and 4 for Euler-Maruyama (fixed steps: 3 and 2). Leading error term for Milstein ``O(h^1.5)`` with
  diagonal noise (e.g. ``f' g dW1 h/2``, ``g'' g^2 dW1^2 dW2 / 2``), each odd in ``(dW1, dW2)``, so its norm is
  blind to the sign of the increments; ``O(h)`` when ``g_i`` reads other entries; ``O(h^2)`` without noise. For
  Euler-Maruyama ``g g' dW1 dW2 = O(h)`` with multiplicative noise, ``O(h^1.5)`` with additive noise.
- **Brownian path with memory** (:class:`BrownianPath`): every value of ``W`` the solver looked at is kept until
  the solver has passed it; a later query between two known points draws from the Brownian bridge, beyond the last
  one from a fresh increment. A rejected step therefore keeps its noise, and the smaller retry sees increments
  conditioned on it: the path is one Brownian motion whatever the rejections. Redrawing the noise after a rejection
  instead biases the solution (rejection sampling with memory, Rackauckas & Nie, Discrete Contin. Dyn. Syst. B 22
  (2017), the scheme of StochasticDiffEq.jl). Exact (no tolerance as in a virtual Brownian tree), at the cost of
  memory for the points ahead of the current time, which step doubling keeps at a handful.
- **Step control** per sample (``per_sample=True``, the default, as in :func:`~leanfit.neural_de.solver.solve`) or
  with one RMS error norm over the whole batch array (``per_sample=False``, the paper's choice), PI controller with
  OrdinaryDiffEq.jl's generic exponents ``0.7/k``, ``0.4/k`` for an error ``~ h^k``: ``k = 1`` for Euler-Maruyama;
  ``k = 2`` for Milstein, whose error is ``~ h^1.5`` with noise and ``h^2`` without: at equal NFE on GBM and on
  ``dY = Y/2 dt + sqrt(1 + Y^2) dW`` (2000 paths, 100 to 300 calls per path) the mean error is 9-21 % lower with
  ``k = 2`` than with ``k = 1.5`` and 21-37 % lower than with ``k = 1`` (``k = 2.5`` gains 3-8 % more, but
  under-reacts where the noise is small and the error is the ODE's ``h^2``): at a fixed ``h`` the estimate is a
  random variable of spread ``O(1)``, and a lower gain overreacts less to one unlucky draw. Steps land exactly on every
  ``t_eval`` point (no dense output: interpolating between noise samples would not be a solution of the SDE).

Gradients flow through the accepted steps (discretize-then-optimize); the Brownian values are constants and the
step-size decisions are detached. Time, steps and the Brownian path are float64; the state keeps its dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from leanfit.core.errors import bad_value
from leanfit.neural_de.solver import (
    PIController,
    Solution,
    SolveStats,
    _check_inputs,
    _check_options,
    _check_progress,
    _empty_solution,
    _pack_record,
    _warn_precision,
)
from leanfit.neural_de.step import (
    as_batch_time,
    batch_view,
    check_callable,
    check_flag,
    check_state,
    check_tolerances,
    error_ratio,
    finite_times,
    initial_step_size,
)

__all__ = ["SDE_CONTROLLER", "BrownianPath", "SDESolveStats", "SDEStepResult", "sde_solve", "sde_step"]

Field = Callable[[Tensor, Tensor], Tensor]
Scheme = Literal["milstein", "euler"]

# k per scheme, the controller's power of h in the step-doubling error (module docstring: Step control), and
# OrdinaryDiffEq.jl's generic PI exponents 0.7/k, 0.4/k for it.
_ERROR_EXPONENT: dict[str, float] = {"milstein": 2.0, "euler": 1.0}
_CONTROLLERS = {scheme: PIController(beta1=0.7 / k, beta2=0.4 / k) for scheme, k in _ERROR_EXPONENT.items()}
SDE_CONTROLLER = _CONTROLLERS["milstein"]  # the default scheme's: beta1 = 0.35, beta2 = 0.2
# ``order`` of the automatic initial step (step.initial_step_size: the power of h in the error estimate), for the
# drift alone as the heuristic sees no noise. Without noise both schemes step the drift by explicit Euler, whose
# step-doubling error is h^2 y''/4, so the power is 2 for Milstein and Euler-Maruyama alike (the heuristic's
# d2 ~ ||y''|| is exactly that term). This is also the exponent 1/2 the solver used before initial_step_size's
# convention was fixed (it then took order=1 to mean 1/(order + 1)), so SDE solves are unchanged. With
# multiplicative noise Euler-Maruyama's error is O(h) (its controller's k = 1), but the noise is unknown here.
_INITIAL_STEP_ORDER = 2


class BrownianPath:
    """A batch of Brownian motions ``W(t)`` of shape ``(batch, *state)``, revealed lazily at any times per sample.

    ``W(t0) = 0``. Known points are kept per sample; a query at ``s`` between known ``t_a < s < t_b`` draws from the
    bridge ``N(W_a + (s - t_a) / (t_b - t_a) (W_b - W_a), (s - t_a)(t_b - s) / (t_b - t_a))``, beyond the last known
    point from ``N(W_last, s - t_last)``. By the Markov property only the two neighbours matter, so any sequence of
    queries samples one Brownian path; a repeated query returns the stored value. :meth:`forget_before` drops
    points the caller will not look at again (a no-op with ``keep_history=True``).

    t0: scalar or float64 ``(batch,)``. like: a ``(batch, *state)`` tensor giving the shape and device (values are
    float64 whatever its dtype; batch may be 0). generator: ``torch.Generator`` for reproducible paths (the default
    RNG if None); every query draws one ``(batch, *state)`` normal sample, so the path of one sample depends on the
    queries made for the whole batch.

    Storage: per sample, the known times in ascending order in one ``(batch, capacity)`` tensor (``+inf`` beyond the
    last), so a query finds its neighbours by binary search and a new point shifts only the points after it (the
    solver queries at and just behind the end: O(1) points). Forgotten points stay in front until the storage is
    full, then the live ones move to the front; the capacity at least doubles when it grows. A solve of n steps
    with ``keep_history=True`` thus costs O(n log n), not the O(n^2) of scanning every known point per query.
    """

    def __init__(self, t0: float | Tensor, like: Tensor, generator: torch.Generator | None = None,
                 keep_history: bool = False) -> None:
        if not isinstance(like, Tensor) or like.dim() < 1:
            raise ValueError(bad_value("like", type(like).__name__, "a (batch, *state) tensor", "pass y0"))
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(bad_value("generator", generator, "a torch.Generator or None",
                                      "pass torch.Generator().manual_seed(seed)"))
        check_flag("keep_history", keep_history)
        self.shape, self.device = tuple(like.shape), like.device
        self.generator, self.keep_history = generator, keep_history
        t0_b = as_batch_time(t0, like.shape[0], "t0", like.device)
        if not torch.isfinite(t0_b).all():
            raise ValueError(bad_value("t0", t0, "finite times", "pass e.g. t0=0.0"))
        batch, capacity = self.shape[0], 8
        self._rows = torch.arange(batch, device=like.device)
        self._t = torch.full((batch, capacity), float("inf"), dtype=torch.float64, device=like.device)
        self._t[:, 0] = t0_b
        self._w = torch.zeros(batch, capacity, *self.shape[1:], dtype=torch.float64, device=like.device)
        self._lo = torch.zeros(batch, dtype=torch.long, device=like.device)  # first live (not forgotten) point
        self._n = torch.ones(batch, dtype=torch.long, device=like.device)  # end of the stored points

    @property
    def n_known(self) -> Tensor:
        """int64 ``(batch,)``: how many points each sample's path currently stores."""
        return self._n - self._lo

    @torch.no_grad()
    def __call__(self, s: float | Tensor) -> Tensor:
        """``W(s)``: float64 ``(batch, *state)``; s: scalar or float64 ``(batch,)``, one time per sample."""
        s = as_batch_time(s, self.shape[0], "s", self.device)
        if self.shape[0] == 0:
            return torch.zeros(self.shape, dtype=torch.float64, device=self.device)
        if int(self._n.max()) >= self._t.shape[1]:  # some row is full: make room for one more point
            self._make_room()
        t, rows = self._t, self._rows
        li = torch.searchsorted(t, s[:, None].contiguous(), right=True)[:, 0] - 1  # last stored point <= s
        bad = ~torch.isfinite(s) | (li < self._lo)
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            earliest = t[i, self._lo[i]].item() if self._lo[i] < self._n[i] else float("inf")
            raise ValueError(bad_value("s", s[i].item(), f"a finite time >= {earliest!r}, the earliest point "
                                       f"sample {i}'s path still holds", "query times at or after t0; pass "
                                       "keep_history=True to query times the solver has passed"))
        nxt = li + 1  # < capacity after _make_room; +inf padding where li is the last point
        left_t, right_t = t[rows, li], t[rows, nxt]
        w_left = self._w[rows, li]
        new = left_t < s
        bridge = new & torch.isfinite(right_t)
        w_right = torch.where(batch_view(bridge, w_left).bool(), self._w[rows, nxt], w_left)
        span = torch.where(bridge, right_t - left_t, 1.0)
        frac = torch.where(bridge, (s - left_t) / span, 0.0)
        var = torch.where(bridge, (s - left_t) * (right_t - s) / span, s - left_t)
        z = torch.randn(self.shape, generator=self.generator, dtype=torch.float64, device=self.device)
        value = w_left + batch_view(frac, w_left) * (w_right - w_left) + batch_view(var.sqrt(), z) * z
        self._insert(rows[new], nxt[new], s[new], value[new])
        return value

    def _insert(self, rows: Tensor, pos: Tensor, s: Tensor, value: Tensor) -> None:
        """Insert one point per row of ``rows`` at index ``pos``, shifting the points after it by one."""
        if rows.numel() == 0:
            return
        tail = self._n[rows] - pos
        width = int(tail.max())
        if width > 0:  # only the points ahead of s move: O(1) of them for the solver's queries
            j = torch.arange(width, device=self.device)
            keep = j[None] < tail[:, None]
            src = (pos[:, None] + j[None])[keep]
            rr = rows[:, None].expand(-1, width)[keep]
            self._t[rr, src + 1] = self._t[rr, src]
            self._w[rr, src + 1] = self._w[rr, src]
        self._t[rows, pos] = s
        self._w[rows, pos] = value
        self._n[rows] += 1

    def _make_room(self) -> None:
        """Move every row's live points to the front and grow the capacity to at least twice the most live points."""
        live = self._n - self._lo
        old = self._t.shape[1]
        capacity = max(old, 2 * (int(live.max()) + 1))
        k = torch.arange(capacity, device=self.device)
        src = (self._lo[:, None] + k[None]).clamp(max=old - 1)
        keep = k[None] < live[:, None]
        self._t = torch.where(keep, self._t.gather(1, src), float("inf"))
        w = self._w[self._rows[:, None], src]
        self._w = torch.where(keep.reshape(*keep.shape, *([1] * (w.dim() - 2))), w, 0.0)
        self._lo, self._n = torch.zeros_like(self._lo), live

    def forget_before(self, t: float | Tensor) -> None:
        """Drop the points strictly before ``t`` (scalar or ``(batch,)``); keeps everything if ``keep_history``."""
        t_b = finite_times(t, self.shape[0], "t", self.device)
        if not self.keep_history and self.shape[0] > 0:
            first = torch.searchsorted(self._t, t_b[:, None].contiguous())[:, 0]  # first point >= t
            self._lo = torch.maximum(self._lo, first.minimum(self._n))


@dataclass(frozen=True)
class SDEStepResult:
    """Result of :func:`sde_step`; every tensor ``(batch, *state)``.

    y_next: two half steps of the scheme (the propagated value). error_estimate: ``y_next`` minus one full step.
    drift0, diffusion0: ``f(t, y)`` and ``g(t, y)``, reusable by a retry from the same state.
    """

    y_next: Tensor
    error_estimate: Tensor
    drift0: Tensor
    diffusion0: Tensor


def _call(fn: Field, name: str, t: Tensor, y: Tensor) -> Tensor:
    out = fn(t, y)
    if not isinstance(out, Tensor) or out.shape != y.shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"{name}(t, y) returned shape {got}, expected y's shape {tuple(y.shape)}: the {name} must "
                         "map a (batch, *state) state and (batch,) times to a tensor of the same shape (diagonal "
                         "noise: the diffusion returns the diagonal of the noise matrix)")
    return out


def _check_generator(generator: object) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(bad_value("generator", generator, "a torch.Generator or None",
                                  "pass torch.Generator().manual_seed(seed)"))


def _check_increments(dw: object, y: Tensor) -> tuple[Tensor, Tensor]:
    """``dw = (dW1, dW2)``: two finite tensors of ``y``'s shape."""
    if not (isinstance(dw, (tuple, list)) and len(dw) == 2 and all(isinstance(d, Tensor) for d in dw)):
        raise TypeError(bad_value("dw", type(dw).__name__, "a pair (dW1, dW2) of tensors", "or pass dw=None"))
    dw1, dw2 = dw
    if dw1.shape != y.shape or dw2.shape != y.shape:
        raise ValueError(bad_value("dw shapes", (tuple(dw1.shape), tuple(dw2.shape)), f"two of y's shape "
                                   f"{tuple(y.shape)}", "pass the increments over the two half steps"))
    if not (torch.isfinite(dw1).all() and torch.isfinite(dw2).all()):
        raise ValueError(bad_value("dw", "<NaN/inf>", "finite Brownian increments", "draw them with BrownianPath"))
    return dw1, dw2


def _check_brownian(brownian: object, y0: Tensor) -> None:
    # Duck-typed: anything with BrownianPath's interface (the shape, a call and forget_before) is a path.
    if not (callable(brownian) and hasattr(brownian, "forget_before") and hasattr(brownian, "shape")):
        raise TypeError(bad_value("brownian", brownian, "a BrownianPath or None", "pass BrownianPath(t0, y0)"))
    if tuple(brownian.shape) != tuple(y0.shape):
        raise ValueError(bad_value("brownian.shape", brownian.shape, f"y0's shape {tuple(y0.shape)}",
                                   "build it with BrownianPath(t0, y0)"))


def _check_scheme(scheme: str) -> None:
    if scheme not in _ERROR_EXPONENT:
        raise ValueError(bad_value("scheme", scheme, "'milstein' or 'euler'", "use scheme='milstein' (strong order "
                                   "1; 'euler' is Euler-Maruyama)"))


def _scheme_step(diffusion: Field, t: Tensor, y: Tensor, h: Tensor, f: Tensor, g: Tensor, dw: Tensor,
                 scheme: str) -> Tensor:
    """One step of ``h`` (float64 ``(batch,)``, ``>= 0`` for Milstein) from ``(t, y)`` with ``f, g`` there.

    Euler-Maruyama: ``y + f h + g dW``. Milstein (derivative-free, Kloeden & Platen (11.1.5), support point on the
    side of the increment, see the module docstring) adds ``s (g(t, y_hat) - g) (dW^2 - h) / (2 sqrt(h))`` with
    ``y_hat = y + f h + s g sqrt(h)``, ``s = sign(dW)`` (+1 at 0): one more diffusion call. The step's part even
    in ``dW`` is the Milstein term ``g g' (dW^2 - h) / 2`` up to ``O(h^2)`` (``O(h^1.5)`` with ``s = 1``).
    """
    y_drift = y + batch_view(h, y) * f
    y_em = y_drift + g * dw
    if scheme == "euler":
        return y_em
    root = h.sqrt()
    side = 1.0 - 2.0 * (dw < 0).to(y.dtype)  # the support point on the side of the increment
    g_hat = _call(diffusion, "diffusion", t, y_drift + side * g * batch_view(root, y))
    # A finished sample steps h = 0 (then dW = 0): a unit denominator keeps 0/0 out of the values and gradients.
    denom = batch_view(torch.where(h > 0, 2 * root, 1.0), y)
    return y_em + side * (g_hat - g) * (dw * dw - batch_view(h, y)) / denom


def _doubled_step(drift: Field, diffusion: Field, t: Tensor, y: Tensor, h: Tensor, dw1: Tensor, dw2: Tensor,
                  f0: Tensor, g0: Tensor, scheme: str) -> tuple[Tensor, Tensor]:
    """Two half steps and one full step of the scheme, ``f0, g0`` at ``(t, y)`` given: ``(y_next, y_full)``."""
    half = h / 2
    y_full = _scheme_step(diffusion, t, y, h, f0, g0, dw1 + dw2, scheme)
    y_mid = _scheme_step(diffusion, t, y, half, f0, g0, dw1, scheme)
    t_mid = t + half
    f1, g1 = _call(drift, "drift", t_mid, y_mid), _call(diffusion, "diffusion", t_mid, y_mid)
    return _scheme_step(diffusion, t_mid, y_mid, half, f1, g1, dw2, scheme), y_full


def _step_calls(scheme: str, adaptive: bool = True) -> tuple[int, int]:
    """Batched (drift, diffusion) calls of one attempt from a state whose ``f, g`` are known."""
    extra = int(scheme == "milstein")  # the support point of every scheme step
    return (1, 1 + 3 * extra) if adaptive else (0, extra)


def sde_step(drift: Field, diffusion: Field, t: float | Tensor, y: Tensor, h: float | Tensor,
             dw: tuple[Tensor, Tensor] | None = None, *, generator: torch.Generator | None = None,
             drift0: Tensor | None = None, diffusion0: Tensor | None = None,
             scheme: Scheme = "milstein") -> SDEStepResult:
    """One step-doubled Milstein (default) or Euler-Maruyama step from any state, batched and differentiable.

    drift, diffusion: ``f(t, y)``, ``g(t, y)`` with ``t`` float64 ``(batch,)``, returning ``y``'s shape.
    t, h: scalars or ``(batch,)``; ``h >= 0`` unless ``scheme="euler"`` with ``dw`` given. y: ``(batch, *state)``.
    dw: the Brownian increments ``(dW1, dW2)`` over ``[t, t + h/2]`` and ``[t + h/2, t + h]``, each
    ``(batch, *state)``; None draws independent ``N(0, h/2)`` ones from ``generator``. drift0, diffusion0:
    ``f(t, y)``, ``g(t, y)`` if known. scheme: ``"milstein"`` (strong order 1 for diagonal noise) or ``"euler"``
    (Euler-Maruyama; see the module docstring).

    With ``S(t, y, h, dW)`` one step of the scheme (Euler-Maruyama ``y + f h + g dW``; Milstein adds
    ``s (g(t, y + f h + s g sqrt(h)) - g) (dW^2 - h) / (2 sqrt(h))``, ``s = sign(dW)`` per entry): full step
    ``S(t, y, h, dW1 + dW2)``, half steps ``y_m = S(t, y, h/2, dW1)``, ``y_next = S(t + h/2, y_m, h/2, dW2)``;
    ``error_estimate = y_next - full``.
    Euler-Maruyama calls the drift and the diffusion twice each; Milstein calls the diffusion three more times
    (the support points). drift0/diffusion0 save one call each.
    """
    _check_scheme(scheme)
    check_callable("drift", drift)
    check_callable("diffusion", diffusion)
    _check_generator(generator)
    y = check_state("y", y)
    t_b = finite_times(t, y.shape[0], "t", y.device)
    h_b = finite_times(h, y.shape[0], "h", y.device)
    if (dw is None or scheme == "milstein") and not (h_b >= 0).all():
        raise ValueError(bad_value("h", h, "steps >= 0 when dw is drawn here or scheme='milstein' (it takes "
                                   "sqrt(h))", "pass dw and scheme='euler' for negative steps"))
    if dw is None:
        sd = batch_view((h_b / 2).sqrt(), y)
        dw1, dw2 = (sd * torch.randn(y.shape, generator=generator, dtype=y.dtype, device=y.device) for _ in range(2))
    else:
        dw1, dw2 = _check_increments(dw, y)
    for name, given in (("drift0", drift0), ("diffusion0", diffusion0)):
        if given is not None and (not isinstance(given, Tensor) or given.shape != y.shape):
            got = tuple(given.shape) if isinstance(given, Tensor) else type(given).__name__
            raise ValueError(bad_value(f"{name}.shape", got, f"y's shape {tuple(y.shape)}", f"or pass {name}=None"))
    f0 = _call(drift, "drift", t_b, y) if drift0 is None else drift0
    g0 = _call(diffusion, "diffusion", t_b, y) if diffusion0 is None else diffusion0
    y_next, y_full = _doubled_step(drift, diffusion, t_b, y, h_b, dw1, dw2, f0, g0, scheme)
    return SDEStepResult(y_next=y_next, error_estimate=y_next - y_full, drift0=f0, diffusion0=g0)


@dataclass(kw_only=True)
class SDESolveStats(SolveStats):
    """:class:`~leanfit.neural_de.solver.SolveStats` of an SDE solve: ``nfe`` and ``nfe_joint`` count drift *and*
    diffusion calls; nfe_drift_joint, nfe_diffusion_joint: the batched calls of each (the paper's Julia code logs
    the two separately; the default initial step costs one extra drift call, Milstein's support points three more
    diffusion calls per attempt). ``nfe[i]`` counts only the calls that evaluated sample ``i`` at a new point: a
    retry after a rejection reuses ``f, g`` at its start."""

    nfe_drift_joint: int
    nfe_diffusion_joint: int


@dataclass
class _SDEState:
    """Mutable per-sample loop state (all ``(batch,)`` unless noted); field names shared with the ODE loop's."""

    t: Tensor
    h: Tensor
    y: Tensor  # (batch, *state)
    w: Tensor  # (batch, *state) float64, W(t)
    f0: Tensor  # (batch, *state), f(t, y) where not stale
    g0: Tensor
    stale: Tensor  # f0/g0 belong to an earlier state
    active: Tensor
    prev_ratio: Tensor
    after_reject: Tensor
    last_nonfinite: Tensor
    next_out: Tensor
    nfe: Tensor
    n_accepted: Tensor
    n_rejected: Tensor
    n_drift: int = 0
    n_diffusion: int = 0
    outputs: list[tuple[Tensor, Tensor, Tensor]] = field(default_factory=list)
    record: list[tuple[Tensor, Tensor, Tensor]] = field(default_factory=list)
    steps: list[tuple[Tensor, Tensor]] = field(default_factory=list)


def _initial_state(drift: Field, diffusion: Field, y0: Tensor, ts: Tensor, path: BrownianPath, rtol: float,
                   atol: float, per_sample: bool, dt0: float | Tensor | None, adaptive: bool) -> _SDEState:
    batch, dev = y0.shape[0], y0.device
    t = ts[0].expand(batch).clone()
    f0, g0 = _call(drift, "drift", t, y0), _call(diffusion, "diffusion", t, y0)
    n_drift = 1
    if dt0 is None:
        h = initial_step_size(drift, t, y0, rtol, atol, _INITIAL_STEP_ORDER, f0=f0, per_sample=per_sample)
        n_drift += 1
    else:
        h = as_batch_time(dt0, batch, "dt0", dev).detach().clone()
        if not (torch.isfinite(h).all() and (h > 0).all()):
            raise ValueError(bad_value("dt0", dt0, "a finite step > 0 (scalar or per sample)",
                                       "pass e.g. dt0=0.01, or dt0=None for the automatic initial step"))
        if not per_sample and adaptive:
            h = h.min().expand(batch).clone()
    long = torch.full((batch,), n_drift + 1, dtype=torch.long, device=dev)
    flags = torch.zeros(batch, dtype=torch.bool, device=dev)
    state = _SDEState(t=t, h=h, y=y0, w=path(t), f0=f0, g0=g0, stale=flags.clone(), active=~flags,
                      prev_ratio=torch.full((batch,), 1e-4, dtype=torch.float64, device=dev),
                      after_reject=flags.clone(), last_nonfinite=flags.clone(),
                      next_out=torch.ones(batch, dtype=torch.long, device=dev), nfe=long,
                      n_accepted=torch.zeros_like(long), n_rejected=torch.zeros_like(long), n_drift=n_drift,
                      n_diffusion=1)
    state.outputs.append((torch.arange(batch, device=dev), torch.zeros(batch, dtype=torch.long, device=dev), y0))
    return state


def _refresh(drift: Field, diffusion: Field, state: _SDEState) -> None:
    """Evaluate ``f, g`` at the current state of the samples that moved since their last evaluation."""
    need = state.stale & state.active
    if need.any():
        keep = batch_view(need, state.y).bool()
        state.f0 = torch.where(keep, _call(drift, "drift", state.t, state.y), state.f0)
        state.g0 = torch.where(keep, _call(diffusion, "diffusion", state.t, state.y), state.g0)
        state.n_drift, state.n_diffusion = state.n_drift + 1, state.n_diffusion + 1
        state.nfe += 2 * need
    state.stale = state.stale & ~need


def _attempt(drift: Field, diffusion: Field, state: _SDEState, path: BrownianPath, ctrl: PIController, ts: Tensor,
             rtol: float, atol: float, norm: Literal["rms", "max"], per_sample: bool, adaptive: bool,
             record_steps: bool, scheme: str) -> None:
    """One batched attempt: every active sample tries its own ``h``, clipped to land on its next output time."""
    _refresh(drift, diffusion, state)
    t_out = ts[state.next_out.clamp(max=ts.numel() - 1)]
    land = state.t + 1.01 * state.h >= t_out  # stretch by up to 1 % rather than leave a sliver (DOPRI5)
    t_new = torch.where(state.active, torch.where(land, t_out, state.t + state.h), state.t)
    h_try = t_new - state.t
    w_new = path(t_new)
    if adaptive:
        w_mid = path(state.t + h_try / 2)
        dw1, dw2 = (w_mid - state.w).to(state.y.dtype), (w_new - w_mid).to(state.y.dtype)
        y_next, y_full = _doubled_step(drift, diffusion, state.t, state.y, h_try, dw1, dw2, state.f0, state.g0,
                                       scheme)
        error = y_next - y_full
        kept = None
        if record_steps:  # a finished sample tries h = 0: its norm's sqrt(0) would backpropagate 0/0 = NaN
            err = torch.where(batch_view(state.active, y_next).bool(), error, 1.0)
            kept = error_ratio(err, state.y, y_next, rtol, atol, norm, per_sample)
            state.steps.append((kept, state.y))
        with torch.no_grad():
            ratio = (error_ratio(error, state.y, y_next, rtol, atol, norm, per_sample)
                     if kept is None else kept.detach()).double()
            finite = torch.isfinite(ratio)
            ratio = torch.where(finite, ratio, torch.full_like(ratio, float("inf")))
    else:  # fixed steps: one step of the scheme, every step accepted
        dw = (w_new - state.w).to(state.y.dtype)
        y_next = _scheme_step(diffusion, state.t, state.y, h_try, state.f0, state.g0, dw, scheme)
        ratio = torch.zeros_like(h_try)
        finite = torch.isfinite(y_next.detach().reshape(y_next.shape[0], -1)).all(1)
    n_drift, n_diffusion = _step_calls(scheme, adaptive)
    state.n_drift, state.n_diffusion = state.n_drift + n_drift, state.n_diffusion + n_diffusion
    state.nfe += (n_drift + n_diffusion) * state.active
    accepted = state.active & (ratio <= 1.0)
    rejected = state.active & ~accepted
    state.record.append((state.t, h_try, accepted))
    keep = batch_view(accepted, state.y).bool()
    state.y = torch.where(keep, y_next, state.y)
    state.w = torch.where(batch_view(accepted, state.w).bool(), w_new, state.w)
    state.t = torch.where(accepted, t_new, state.t)
    state.stale = state.stale | accepted
    path.forget_before(state.t)
    out = accepted & land
    if out.any():
        rows = out.nonzero().squeeze(1)
        state.outputs.append((rows, state.next_out[rows], state.y[rows]))
        state.next_out = state.next_out + out
    if adaptive:
        h_new = h_try * ctrl.factor(ratio, state.prev_ratio, accepted, state.after_reject)
        # An accepted step shortened to land on an output time says nothing against the proposed h.
        h_new = torch.where(accepted & land & (h_try < state.h), state.h, h_new)
        state.h = torch.where(state.active, h_new, state.h)
        state.prev_ratio = torch.where(accepted, ratio.clamp(min=ctrl.error_floor), state.prev_ratio)
        state.after_reject = torch.where(state.active, rejected, state.after_reject)
    state.last_nonfinite = state.active & ~finite
    state.n_accepted += accepted
    state.n_rejected += rejected
    state.active = state.active & (state.t < ts[-1])


def sde_solve(drift: Field, diffusion: Field, y0: Tensor, t_eval: Sequence[float] | Tensor, *, rtol: float = 1e-2,
              atol: float = 1e-2, dt0: float | Tensor | None = None, adaptive: bool = True, per_sample: bool = True,
              brownian: BrownianPath | None = None, generator: torch.Generator | None = None,
              max_steps: int = 10_000, norm: Literal["rms", "max"] = "rms", controller: PIController | None = None,
              record_steps: bool = False, scheme: Scheme = "milstein") -> Solution:
    """Integrate the Ito SDE ``dy = f(t, y) dt + g(t, y) dW`` (diagonal noise) over ``t_eval`` for a batch.

    drift, diffusion: ``f(t, y)``, ``g(t, y)``, ``t`` float64 ``(batch,)``, each returning ``y``'s shape.
    y0: ``(batch, *state)``. t_eval: shared strictly increasing times, ``t_eval[0] = t0``; every step lands on them.
    rtol, atol: tolerances of the step-doubling error (the paper: 0.14 with SOSRI, a higher-order method).
    dt0: first step (scalar or ``(batch,)``); None: Hairer's initial step for the drift alone, error ~ h^2 (noise
    ignored, the controller shrinks it if needed). adaptive=False: fixed steps of ``dt0`` (required), clipped to land
    on ``t_eval``; no error estimate, one drift call and one diffusion call per step (two for Milstein). per_sample:
    per-sample step control (True) or one joint error norm and step sequence for the batch (the paper's).
    brownian: the :class:`BrownianPath` to use (its ``t0`` at or before ``t_eval[0]``), e.g. to reuse one path
    across solves; else a fresh one from ``generator``. max_steps: limit on batched attempts. controller: default
    :data:`SDE_CONTROLLER` for Milstein, ``beta1 = 0.7``, ``beta2 = 0.4`` for Euler-Maruyama. record_steps: keep,
    per accepted step, the error ratio with its graph and the start state (``stats.step_error``, ``stats.step_y``),
    as in :func:`~leanfit.neural_de.solver.solve`. scheme: ``"milstein"`` (default) or ``"euler"``
    (Euler-Maruyama: adaptive steps are biased with multiplicative noise; see the module docstring).
    Returns :class:`~leanfit.neural_de.solver.Solution` with ``ys (batch, len(t_eval), *state)`` and
    :class:`SDESolveStats` (a batch of 0 samples: ``ys (0, len(t_eval), *state)``, zero counts, no call).
    """
    check_tolerances(rtol, atol)
    _check_scheme(scheme)
    check_callable("drift", drift)
    check_callable("diffusion", diffusion)
    _check_options(controller, {"adaptive": adaptive, "per_sample": per_sample, "record_steps": record_steps})
    _check_generator(generator)
    if norm not in ("rms", "max"):
        raise ValueError(bad_value("norm", norm, "'rms' or 'max'", "use norm='rms' (Hairer's and the paper's)"))
    if not adaptive and dt0 is None:
        raise ValueError(bad_value("dt0", dt0, "a step > 0 when adaptive=False", "pass e.g. dt0=0.01"))
    ts = _check_inputs(y0, t_eval, max_steps)
    if brownian is not None and generator is not None:
        raise ValueError(bad_value("generator", generator, "None when brownian is given (the path owns its RNG)",
                                   "pass the generator to BrownianPath(...) instead"))
    if brownian is not None:
        _check_brownian(brownian, y0)
    _warn_precision(y0.dtype, rtol, atol)
    if y0.shape[0] == 0:
        return _empty_solution(y0, ts, record_steps and adaptive, SDESolveStats, nfe_drift_joint=0,
                               nfe_diffusion_joint=0)
    path = BrownianPath(ts[0], y0, generator) if brownian is None else brownian
    ctrl = _CONTROLLERS[scheme] if controller is None else controller
    state = _initial_state(drift, diffusion, y0, ts, path, rtol, atol, per_sample, dt0, adaptive)
    n_attempts = 0
    while _check_progress(state, ts, max_steps, n_attempts):
        _attempt(drift, diffusion, state, path, ctrl, ts, rtol, atol, norm, per_sample, adaptive,
                 record_steps and adaptive, scheme)
        n_attempts += 1
    rows, cols, values = (torch.cat(x) for x in zip(*state.outputs, strict=True))
    ys = y0.new_zeros(y0.shape[0], ts.numel(), *y0.shape[1:]).index_put((rows, cols), values)
    packed = _pack_record(state.record, state.n_accepted, state.steps)
    stats = SDESolveStats(state.nfe, state.n_accepted, state.n_rejected, state.n_drift + state.n_diffusion,
                          n_attempts, *packed, nfe_drift_joint=state.n_drift,
                          nfe_diffusion_joint=state.n_diffusion)
    return Solution(ts=ts, ys=ys, stats=stats)
