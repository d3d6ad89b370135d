"""The paper's neural DE classifiers: a time-concatenated tanh vector field, a neural ODE and a neural SDE classifier.

MNIST NODE (Pal, Edelman & Rackauckas, ICML 2023, section 3): the input image is the initial state, a
time-concatenated tanh MLP ``[y, t] -> hidden -> y`` (785 -> 100 -> 784) is integrated over ``[0, 1]`` with Tsit5,
and a linear head classifies ``y(1)``. MNIST NSDE: a linear encoder to a 32-dimensional latent state, a
``32 -> 64 -> 32`` tanh drift, a linear diagonal diffusion and a linear head.

Both models take a regulariser in ``forward`` (:class:`RegularizerSpec`, or a preset name) and return a
:class:`DEClassifierOutput` with the logits, the solution, the per-sample and joint NFE of the main solve, the
regulariser value and the extra NFE it cost, so that training loops log the paper's joint NFE and the per-sample
NFE side by side.

The SDE local regulariser (:func:`sde_local_regularizer`) is the ODE one carried over to this package's adaptive
SDE solver (Milstein by default, or Euler-Maruyama): one step-doubled step from a recorded step start, with fresh
Brownian increments.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Literal

import torch
from torch import Tensor, nn

from leanfit.core.config import option
from leanfit.core.errors import ConfigError, MissingDependencyError, bad_value
from leanfit.neural_de.regularizers import (
    LocalRegularizerInfo,
    _pick_steps,
    _step_record,
    global_regularizer,
    local_regularizer,
    regularize_solution,
    sample_times,
    with_times,
)
from leanfit.neural_de.sde import _INITIAL_STEP_ORDER, Scheme, sde_solve, sde_step
from leanfit.neural_de.solver import Adjoint, Solution, solve
from leanfit.neural_de.step import (
    as_batch_time,
    batch_view,
    check_callable,
    check_flag,
    check_tolerances,
    error_ratio,
    initial_step_size,
)
from leanfit.neural_de.tableaus import get_tableau

__all__ = [
    "REGULARIZER_PRESETS",
    "ConcatTanhMLP",
    "DEClassifierOutput",
    "NeuralODEClassifier",
    "NeuralSDEClassifier",
    "RegularizerSpec",
    "sde_local_regularizer",
]

Field = Callable[[Tensor, Tensor], Tensor]
_CHOICES: dict[str, tuple[str, ...]] = {
    "kind": ("none", "local", "global"),
    "sampling": ("unbiased", "biased"),
    "step": ("initial", "taken"),
    "points": ("batch", "sample"),
    "estimate": ("error", "stiffness"),
    "first_stage": ("constant", "graph"),
}
_SCHEMES = ("milstein", "euler")
# Batched (drift, diffusion) calls of one step-doubled SDE step from a fresh state (sde.sde_step's docstring).
_SDE_STEP_CALLS = {"milstein": (2, 5), "euler": (2, 2)}


def _check_int(name: str, value: object, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(bad_value(name, value, f"an int >= {minimum}", f"pass e.g. {name}=32"))


def _check_choice(name: str, value: object, choices: Sequence[str], fix: str) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(bad_value(name, value, " or ".join(repr(c) for c in choices), fix))


@dataclass(frozen=True)
class RegularizerSpec:
    """Which regulariser a classifier's ``forward`` computes; frozen, validated on construction.

    ``kind="none"`` and ``"global"`` use no other field (a non-default one is an error, not silently ignored).
    Named presets (:meth:`preset`, :data:`REGULARIZER_PRESETS`): ``vanilla``, ``global``, ``local_unbiased`` (the
    paper's: unbiased, initial step, one point per batch; alias ``local``), ``local_biased`` (the paper's biased
    variant), ``local_taken`` (leanfit's: the step actually taken at one point per sample, with a differentiated
    first stage, so its gradient is the error estimate's own; ``T * EEst`` of the taken step is an unbiased estimate
    of the global sum), ``local_sample`` (the paper's regulariser at one point per sample) and ``local_subset``
    (``local_taken`` stepping from a random eighth of the batch: the mean over the subset is an unbiased estimate
    of the batch mean at an eighth of the regulariser's arithmetic; ODE models only). The ablation between
    ``local_unbiased`` and ``local_taken``, one change at a time (ODE models, per_sample=False): ``local_start``
    (the paper's, stepping from the start of the solver's step containing ``t_r`` instead of ``u(t_r)``),
    ``local_start_k1`` (that with ``k_1`` differentiated), ``local_taken_const_batch`` (the taken step, ``k_1``
    constant, one point per batch) and ``local_taken_batch`` (``local_taken`` at one point per batch).
    """

    kind: Literal["none", "local", "global"] = option("local", help="none, local (one step) or global (all steps)")
    sampling: Literal["unbiased", "biased"] = option(
        "unbiased", help="local: t_r ~ U[t0, t1] (unbiased) or uniform over the solver's step points (biased)"
    )
    step: Literal["initial", "taken"] = option(
        "initial", help="local: the automatic initial step at the point (paper) or the step the solver took there"
    )
    points: Literal["batch", "sample"] = option(
        "batch", help="local: one point and joint error norm per batch (paper) or one point and norm per sample"
    )
    estimate: Literal["error", "stiffness"] = option(
        "error", help="local: EEst * |h| (paper) or Shampine's stiffness estimate (ODEs only)"
    )
    first_stage: Literal["constant", "graph"] = option(
        "constant", help="local ODE: k_1 a constant (paper) or differentiated (leanfit; the SDE step always is)"
    )
    rows: float = option(1.0, help="local ODE: share of the batch's samples the regulariser steps from, a random "
                         "subset redrawn every call (leanfit; 1 = all, the paper's)")
    from_step_start: bool = option(False, help="local ODE, unbiased sampling with the initial step: step from the "
                                   "start of the solver's step containing t_r instead of u(t_r) (an ablation; the "
                                   "taken step and biased sampling always step from a step start)")

    def __post_init__(self) -> None:
        rows = self.rows
        if isinstance(rows, bool) or not isinstance(rows, (int, float)) or not 0 < rows <= 1:
            raise ConfigError(bad_value("RegularizerSpec.rows", rows, "a share in (0, 1]", "pass e.g. rows=0.125"))
        if not isinstance(self.from_step_start, bool):
            raise ConfigError(bad_value("RegularizerSpec.from_step_start", self.from_step_start, "a bool",
                                        "pass True or False"))
        if self.from_step_start and (self.sampling == "biased" or self.step == "taken"):
            raise ConfigError(bad_value("RegularizerSpec.from_step_start", True, f"False for sampling="
                                        f"{self.sampling!r}, step={self.step!r} (it steps from a step start already)",
                                        "drop from_step_start"))
        for f in fields(self):
            if f.name in ("rows", "from_step_start"):
                continue
            value = getattr(self, f.name)
            if not isinstance(value, str) or value not in _CHOICES[f.name]:
                raise ConfigError(bad_value(f"RegularizerSpec.{f.name}", value, " or ".join(map(repr, _CHOICES[f.name])),
                                            f"or use RegularizerSpec.preset(name), name in {sorted(REGULARIZER_PRESETS)}"))
        if self.kind != "local":
            for f in fields(self)[1:]:
                if getattr(self, f.name) != f.default:
                    raise ConfigError(bad_value(f"RegularizerSpec.{f.name}", getattr(self, f.name),
                                                f"the default {f.default!r} for kind={self.kind!r} (it has no effect)",
                                                "drop it, or use kind='local'"))

    @property
    def needs_record(self) -> bool:
        """Whether the main solve must keep its step record (``record_steps=True``)."""
        return self.kind == "global" or (self.kind == "local" and (self.sampling == "biased" or self.step == "taken"
                                                                   or self.from_step_start))

    @property
    def needs_t_r(self) -> bool:
        """Whether ``t_r`` is drawn before the solve and added to its evaluation times (unbiased, initial step)."""
        return self.kind == "local" and not self.needs_record

    @classmethod
    def preset(cls, name: str) -> RegularizerSpec:
        """The named preset (see the class docstring)."""
        if not isinstance(name, str) or name not in REGULARIZER_PRESETS:
            raise ConfigError(bad_value("regularizer", name, f"one of {sorted(REGULARIZER_PRESETS)}",
                                        "or pass a RegularizerSpec(kind=..., sampling=..., step=..., points=...)"))
        return REGULARIZER_PRESETS[name]

    @classmethod
    def from_arg(cls, value: RegularizerSpec | str | None) -> RegularizerSpec:
        """``forward``'s ``regularizer`` argument as a spec: None is ``vanilla``, a string a preset name."""
        if value is None:
            return REGULARIZER_PRESETS["vanilla"]
        return value if isinstance(value, RegularizerSpec) else cls.preset(value)


REGULARIZER_PRESETS: dict[str, RegularizerSpec] = {
    "vanilla": RegularizerSpec("none"),
    "global": RegularizerSpec("global"),
    "local": RegularizerSpec("local", "unbiased", "initial", "batch"),
    "local_unbiased": RegularizerSpec("local", "unbiased", "initial", "batch"),
    "local_biased": RegularizerSpec("local", "biased", "initial", "batch"),
    "local_taken": RegularizerSpec("local", "unbiased", "taken", "sample", first_stage="graph"),
    "local_sample": RegularizerSpec("local", "unbiased", "initial", "sample"),
    "local_subset": RegularizerSpec("local", "unbiased", "taken", "sample", first_stage="graph", rows=0.125),
    # the ablation between the paper's local_unbiased and leanfit's local_taken, one change at a time
    "local_start": RegularizerSpec("local", "unbiased", "initial", "batch", from_step_start=True),
    "local_start_k1": RegularizerSpec("local", "unbiased", "initial", "batch", first_stage="graph",
                                      from_step_start=True),
    "local_taken_const_batch": RegularizerSpec("local", "unbiased", "taken", "batch"),
    "local_taken_batch": RegularizerSpec("local", "unbiased", "taken", "batch", first_stage="graph"),
}


def subset_rows(batch: int, share: float, generator: torch.Generator | None, device: torch.device) -> Tensor | None:
    """``max(1, round(share * batch))`` distinct sample indices drawn from ``generator`` (None for ``share=1``)."""
    if share >= 1:
        return None
    k = max(1, round(share * batch))
    gen_device = generator.device if generator is not None else device
    return torch.randperm(batch, generator=generator, device=gen_device)[:k].to(device)


@dataclass
class DEClassifierOutput:
    """What a classifier's ``forward`` returns.

    logits: ``(batch, n_classes)``. state: ``(batch, dim)``, the final state ``y(t1)``. nfe: int64 ``(batch,)``,
    calls of the vector field (drift plus diffusion for an SDE) while each sample was integrated; nfe_joint: the
    batched calls of the main solve (the paper's NFE). reg: the regulariser value (0-d, differentiable) or None;
    reg_nfe: its extra batched calls (0 for none and global). solution: the main solve, evaluation times only
    (``t_r`` stripped), None for the torchdiffeq backend. reg_info: the local regulariser's point and step.
    """

    logits: Tensor
    state: Tensor
    nfe: Tensor
    nfe_joint: int
    reg: Tensor | None = None
    reg_nfe: int = 0
    solution: Solution | None = None
    reg_info: LocalRegularizerInfo | None = None

    @property
    def nfe_total(self) -> int:
        """Batched calls of the main solve and the regulariser together (what a wall clock pays for)."""
        return self.nfe_joint + self.reg_nfe


class ConcatTanhMLP(nn.Module):
    """The paper's vector field ``f(t, y) = W2 tanh(W1 [y, t] + b1) + b2`` (MNIST: 785 -> 100 -> 784).

    dim: state size; hidden: tanh units; time_dependent: concatenate ``t`` to the input (else ``f(y)``).
    ``forward(t, y)``: y ``(batch, dim)``; t a scalar, a 0-d tensor (torchdiffeq) or ``(batch,)`` (this package's
    solvers, float64), cast to ``y``'s dtype. Returns ``(batch, dim)``.
    """

    def __init__(self, dim: int, hidden: int, time_dependent: bool = True) -> None:
        super().__init__()
        _check_int("dim", dim)
        _check_int("hidden", hidden)
        check_flag("time_dependent", time_dependent)
        self.dim, self.time_dependent = dim, bool(time_dependent)
        self.linear_in = nn.Linear(dim + int(self.time_dependent), hidden)
        self.linear_out = nn.Linear(hidden, dim)

    def forward(self, t: float | Tensor, y: Tensor) -> Tensor:
        # Shapes and dtypes only: a finiteness check here would synchronise every solver stage (the solvers
        # check the state and report a NaN/inf vector field with the time it happened).
        if not isinstance(y, Tensor) or not y.is_floating_point():
            got = f"{y.dtype} tensor" if isinstance(y, Tensor) else type(y).__name__
            raise ValueError(bad_value("y", got, "a floating tensor (batch, dim)", "cast with y.float()"))
        if y.dim() != 2 or y.shape[1] != self.dim:
            raise ValueError(bad_value("y.shape", tuple(y.shape), f"(batch, {self.dim})", "flatten the state"))
        if self.time_dependent:
            t_b = torch.as_tensor(t, device=y.device).to(y.dtype)
            if t_b.dim() == 0:
                t_b = t_b.expand(y.shape[0])
            elif t_b.shape != (y.shape[0],):
                raise ValueError(
                    bad_value("t.shape", tuple(t_b.shape), f"() or ({y.shape[0]},)", "one time per sample")
                )
            y = torch.cat([y, t_b[:, None]], 1)
        return self.linear_out(torch.tanh(self.linear_in(y)))


def _flatten_input(x: Tensor, in_features: int, spec: RegularizerSpec) -> Tensor:
    """x as ``(batch, in_features)``: floating, finite; an empty batch only without a regulariser."""
    if (not isinstance(x, Tensor) or x.dim() < 2 or not x.is_floating_point()
            or math.prod(x.shape[1:]) != in_features):
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(bad_value("x.shape", got, f"a floating (batch, ...) tensor with {in_features} features "
                                   "per sample", "pass a batch of inputs of the model's in_features"))
    flat = x.reshape(x.shape[0], in_features)
    if not torch.isfinite(flat).all():
        i = int((~torch.isfinite(flat)).any(1).nonzero()[0, 0])
        raise ValueError(bad_value("x", f"<NaN/inf in sample {i}>", "finite inputs", "clean or drop that sample"))
    if flat.shape[0] == 0 and spec.kind != "none":
        raise ValueError(bad_value("x", f"<0 samples, shape {tuple(x.shape)}>", f"at least one sample for the "
                                   f"{spec.kind} regulariser (a mean over samples)",
                                   "skip empty batches or pass regularizer=None"))
    return flat


def _check_points(spec: RegularizerSpec, per_sample: bool, needs_record: bool) -> None:
    """A record-based local regulariser with one point per batch needs the shared (joint-norm) step sequence."""
    if spec.kind == "local" and needs_record and spec.points == "batch" and per_sample:
        raise ValueError(bad_value("regularizer.points", "batch", "a model built with per_sample=False for "
                                   f"sampling={spec.sampling!r}, step={spec.step!r}",
                                   "build the model with per_sample=False or use points='sample'"))


def _check_span(t1: float, rtol: float, atol: float) -> None:
    if isinstance(t1, bool) or not isinstance(t1, (int, float)) or not (0 < t1 < math.inf):
        raise ValueError(bad_value("t1", t1, "a finite float > 0", "pass e.g. t1=1.0"))
    check_tolerances(rtol, atol)


class _CountingField(nn.Module):
    """Counts calls of a vector field (torchdiffeq reports no NFE); a module, so ``odeint_adjoint`` finds the
    parameters."""

    def __init__(self, func: nn.Module) -> None:
        super().__init__()
        self.func, self.calls = func, 0

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        self.calls += 1
        return self.func(t, y)


class NeuralODEClassifier(nn.Module):
    """MNIST NODE of the paper: ``y0 = x``, ``dy/dt = ConcatTanhMLP(y, t)`` over ``[0, t1]``, linear head on ``y(t1)``.

    in_features: input size (state size); hidden: the field's tanh units; n_classes: head outputs.
    method, rtol, atol: the solver's (the paper: Tsit5 at ``1.4e-8`` in float64; the default ``1e-6`` suits
    float32). per_sample: per-sample step control, or one joint norm and step sequence for the batch (the paper's
    and torchdiffeq's; default). backend: ``"leanfit"`` (:func:`~leanfit.neural_de.solver.solve`; every
    regulariser) or ``"torchdiffeq"`` (the closed box: ``odeint``, or ``odeint_adjoint`` with
    ``adjoint="backsolve"``; ``method="dopri5"`` only, it has no Tsit5; only the ``none`` and unbiased
    initial-step local regularisers, which need no step record). adjoint: the main solve's sensitivity method
    (:func:`~leanfit.neural_de.solver.solve`): ``"direct"`` (default; backpropagation through every stage),
    ``"checkpoint"`` (the same gradients, memory ``O(steps x state)``; leanfit backend only) or ``"backsolve"``
    (the continuous adjoint, memory independent of the steps; not with the global regulariser).
    time_dependent: concatenate ``t`` to the field's input.
    """

    def __init__(self, in_features: int, hidden: int, n_classes: int, t1: float = 1.0, method: str = "tsit5",
                 rtol: float = 1e-6, atol: float = 1e-6, per_sample: bool = False,
                 backend: Literal["leanfit", "torchdiffeq"] = "leanfit", adjoint: Adjoint = "direct",
                 time_dependent: bool = True) -> None:
        super().__init__()
        _check_int("in_features", in_features)
        _check_int("n_classes", n_classes)
        _check_span(t1, rtol, atol)
        _check_choice("backend", backend, ["leanfit", "torchdiffeq"], "use backend='leanfit'")
        get_tableau(method)
        if backend == "torchdiffeq" and method != "dopri5":
            raise ValueError(bad_value("method", method, "'dopri5' for backend='torchdiffeq' (the only embedded pair "
                                       "both libraries have)", "pass method='dopri5'"))
        if isinstance(adjoint, bool):
            raise TypeError(bad_value("adjoint", adjoint, "'direct', 'checkpoint' or 'backsolve'",
                                      f"pass adjoint={'backsolve' if adjoint else 'direct'!r} (torchdiffeq's "
                                      f"{'odeint_adjoint' if adjoint else 'odeint'})"))
        _check_choice("adjoint", adjoint, ["direct", "checkpoint", "backsolve"], "use adjoint='direct'")
        if adjoint == "checkpoint" and backend != "leanfit":
            raise ValueError(bad_value("adjoint", adjoint, "'direct' or 'backsolve' for backend='torchdiffeq' (it "
                                       "has no checkpointed solve)", "pass backend='leanfit' for adjoint='checkpoint'"))
        self.in_features, self.t1, self.method, self.rtol, self.atol = in_features, float(t1), method, rtol, atol
        self.per_sample, self.backend, self.adjoint = bool(per_sample), backend, adjoint
        self.func = ConcatTanhMLP(in_features, hidden, time_dependent)
        self.head = nn.Linear(in_features, n_classes)

    def forward(self, x: Tensor, regularizer: RegularizerSpec | str | None = None, *,
                generator: torch.Generator | None = None) -> DEClassifierOutput:
        """x: ``(batch, ...)`` with ``in_features`` entries per sample. regularizer: None (vanilla), a preset name
        or a :class:`RegularizerSpec`. generator: for the regulariser's random point. Returns
        :class:`DEClassifierOutput`."""
        spec = RegularizerSpec.from_arg(regularizer)
        y0 = _flatten_input(x, self.in_features, spec)
        _check_points(spec, self.per_sample, spec.needs_record)
        if spec.kind == "global" and self.adjoint == "backsolve":
            raise ValueError(bad_value("adjoint", self.adjoint, "'direct' or 'checkpoint' for the global regulariser "
                                       "(it differentiates every step's error estimate)",
                                       "build the model with adjoint='checkpoint', or use a local regulariser"))
        t_eval = torch.tensor([0.0, self.t1], dtype=torch.float64, device=y0.device)
        t_r = times = keep = r_index = None
        if spec.needs_t_r:
            t_r = sample_times(0.0, self.t1, y0.shape[0], points=spec.points, generator=generator, device=y0.device)
            times, keep, r_index = with_times(t_eval, t_r)
        if self.backend == "torchdiffeq":
            return self._forward_torchdiffeq(y0, spec, t_eval if times is None else times, t_r, r_index, generator)
        sol = solve(self.func, y0, t_eval if times is None else times, method=self.method, rtol=self.rtol,
                    atol=self.atol, per_sample=self.per_sample, record_steps=spec.needs_record, adjoint=self.adjoint)
        reg, info = None, None
        if spec.kind == "global":
            reg = global_regularizer(sol)
        elif spec.kind == "local":
            rows = subset_rows(y0.shape[0], spec.rows, generator, y0.device)
            reg, info = regularize_solution(self.func, sol, sampling=spec.sampling, step=spec.step, points=spec.points,
                                            estimate=spec.estimate, first_stage=spec.first_stage, rtol=self.rtol,
                                            atol=self.atol, method=self.method, t_r=t_r, generator=generator,
                                            rows=rows, from_step_start=spec.from_step_start)
        if keep is not None:
            sol = Solution(ts=sol.ts[keep], ys=sol.ys[:, keep], stats=sol.stats)
        state = sol.ys[:, -1]
        return DEClassifierOutput(logits=self.head(state), state=state, nfe=sol.stats.nfe,
                                  nfe_joint=sol.stats.nfe_joint, reg=reg, reg_nfe=0 if info is None else info.nfe,
                                  solution=sol, reg_info=info)

    def _forward_torchdiffeq(self, y0: Tensor, spec: RegularizerSpec, times: Tensor, t_r: Tensor | None,
                             r_index: Tensor | None, generator: torch.Generator | None) -> DEClassifierOutput:
        """The closed box: torchdiffeq's solve, then the regulariser at ``ys[r_index[i], i] = u_i(t_r)``."""
        if spec.needs_record:
            raise ValueError(bad_value("regularizer", spec, "none or local with sampling='unbiased', step='initial' "
                                       "for backend='torchdiffeq' (it keeps no step record)",
                                       "use backend='leanfit' for global, biased or taken-step regularisers"))
        try:
            from torchdiffeq import odeint, odeint_adjoint
        except ImportError as exc:
            raise MissingDependencyError("backend='torchdiffeq' needs torchdiffeq: pip install torchdiffeq") from exc
        counted = _CountingField(self.func)
        integrate = odeint_adjoint if self.adjoint == "backsolve" else odeint
        ys = integrate(counted, y0, times, rtol=self.rtol, atol=self.atol, method=self.method)  # (T, batch, dim)
        nfe_joint, reg, info = counted.calls, None, None
        if t_r is not None and r_index is not None:
            y_r = ys[r_index, torch.arange(y0.shape[0], device=y0.device)]
            rows = subset_rows(y0.shape[0], spec.rows, generator, y0.device)
            if rows is not None:
                t_r, y_r = t_r[rows], y_r[rows]
            reg, info = local_regularizer(self.func, t_r, y_r,
                                          step="initial", points=spec.points, estimate=spec.estimate,
                                          first_stage=spec.first_stage, rtol=self.rtol,
                                          atol=self.atol, method=self.method)
        state = ys[-1]
        nfe = torch.full((y0.shape[0],), nfe_joint, dtype=torch.long, device=y0.device)
        return DEClassifierOutput(logits=self.head(state), state=state, nfe=nfe, nfe_joint=nfe_joint, reg=reg,
                                  reg_nfe=0 if info is None else info.nfe, reg_info=info)


def sde_local_regularizer(drift: Field, diffusion: Field, sol: Solution, *, sampling: str = "unbiased",
                          step: str | float = "taken", points: str = "batch", rtol: float = 0.1, atol: float = 0.1,
                          t_r: float | Tensor | None = None, dw: tuple[Tensor, Tensor] | None = None,
                          generator: torch.Generator | None = None,
                          scheme: Scheme = "milstein") -> tuple[Tensor, LocalRegularizerInfo]:
    """The local error regulariser of an SDE solve: ``EEst * |h|`` of one step-doubled step of the solve's scheme.

    sol: an :func:`~leanfit.neural_de.sde.sde_solve` result with ``record_steps=True``. A recorded step ``j`` is
    picked as for ODEs (:func:`~leanfit.neural_de.regularizers.regularize_solution`): ``"unbiased"`` takes the step
    containing ``t_r ~ U[t0, t1]`` (or the given ``t_r``), ``"biased"`` a uniform one of the accepted steps. The
    regulariser steps from that step's start ``(t_j, y_j)`` (detached): an SDE solution has no dense output, so
    unlike the ODE case the state at ``t_r`` itself is not available. step: ``"taken"`` (``h_j``, default),
    ``"initial"`` (Hairer's initial step for the drift, error ~ h^2, as :func:`~leanfit.neural_de.sde.sde_solve`
    starts; two drift calls) or a float. The Brownian increments are fresh ``N(0, h/2)`` draws from ``generator``
    (or ``dw = (dW1, dW2)``, each ``(batch, *state)``): the main solve's path is conditioned on its accepted steps,
    and a new draw gives an unbiased sample of the step's error over the noise.

    Unlike the paper's ODE regulariser (constant ``k_1``), the drift and diffusion at the start point keep their
    graph: the step has only two drift evaluations, and ``g`` at the start enters every other evaluation (the
    midpoint, Milstein's support points), so dropping it would cut most of the diffusion's gradient. points:
    ``"batch"`` (one point and joint norm; the record must be shared, i.e. a ``per_sample=False`` solve) or
    ``"sample"``. rtol, atol, scheme: the main solve's (``"milstein"`` or ``"euler"``, see
    :func:`~leanfit.neural_de.sde.sde_step`). Returns the scalar value and
    :class:`~leanfit.neural_de.regularizers.LocalRegularizerInfo` (``nfe`` counts drift and diffusion calls: 7 for
    Milstein, 4 for Euler-Maruyama, +2 for ``"initial"``).
    """
    _check_choice("sampling", sampling, _CHOICES["sampling"], "use sampling='unbiased'")
    _check_choice("points", points, _CHOICES["points"], "use points='batch' (the paper's joint norm)")
    _check_choice("scheme", scheme, _SCHEMES, "use the main solve's scheme (sde_solve's default: 'milstein')")
    check_tolerances(rtol, atol)
    check_callable("drift", drift)
    check_callable("diffusion", diffusion)
    if isinstance(step, str):
        _check_choice("step", step, _CHOICES["step"], "pass 'taken', 'initial' or a float > 0")
    elif isinstance(step, bool) or not isinstance(step, (int, float)) or not (0 < step < math.inf):
        raise ValueError(bad_value("step", step, "'taken', 'initial' or a finite float > 0", "pass step='taken'"))
    if sampling == "biased" and t_r is not None:
        raise ValueError(bad_value("t_r", t_r, "None for sampling='biased' (it draws solver points)", "drop t_r"))
    j = _pick_steps(sol, sampling, points, t_r, generator)
    step_t, step_h, step_y, _ = _step_record(sol, "the SDE local regulariser")
    rows = torch.arange(j.numel(), device=j.device)
    t, y, joint, nfe = step_t[rows, j], step_y[rows, j].detach(), points == "batch", sum(_SDE_STEP_CALLS[scheme])
    if step == "taken":
        h = step_h[rows, j]
    elif step == "initial":
        h = initial_step_size(drift, t, y, rtol, atol, _INITIAL_STEP_ORDER, per_sample=not joint)
        nfe += 2
    else:
        h = as_batch_time(float(step), y.shape[0], "step", y.device)
    if dw is None:
        sd = batch_view((h / 2).sqrt(), y)
        gen_device = generator.device if generator is not None else y.device
        draw = [torch.randn(y.shape, generator=generator, dtype=y.dtype, device=gen_device) for _ in range(2)]
        dw = (sd * draw[0].to(y.device), sd * draw[1].to(y.device))
    res = sde_step(drift, diffusion, t, y, h, dw, scheme=scheme)
    eest = error_ratio(res.error_estimate, y, res.y_next, rtol, atol, "rms", per_sample=not joint)
    info = LocalRegularizerInfo(t=t, h=h, y=y, eest=eest.detach(), nfe=nfe)
    return (eest * h.abs().to(eest.dtype)).mean(), info


class _DiagonalDiffusion(nn.Module):
    """``g(t, y) = W y + b``, read as the diagonal of the noise matrix (the paper's code: ``Dense(32, 32)``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        return self.linear(y)


class NeuralSDEClassifier(nn.Module):
    """MNIST NSDE of the paper, scaled: linear encoder ``in -> latent``, Ito SDE ``dz = f(z) dt + g(z) dW`` over
    ``[0, t1]``, linear head on ``z(t1)``.

    drift ``f``: :class:`ConcatTanhMLP` ``latent -> hidden -> latent`` (time_dependent=False by default, as the
    paper's ``32 -> 64 -> 32``); diffusion ``g``: a linear map ``latent -> latent`` used as the diagonal noise.
    Solver: :func:`~leanfit.neural_de.sde.sde_solve` with step doubling (the paper: SOSRI at 0.14), scheme
    ``"milstein"`` (default) or ``"euler"`` (Euler-Maruyama: cheaper per step, but its adaptive steps are biased
    with multiplicative noise such as this diffusion's; see :mod:`leanfit.neural_de.sde`). The diffusion mixes the
    latent entries, so the noise is not commutative and both schemes have strong order 0.5 here. rtol = atol = 0.1
    by default, near the paper's: at initialisation (32-entry latent state, batch 256, joint norm) Milstein takes
    11 steps (78 drift and diffusion calls), Euler-Maruyama 7 (29 calls). NFE are comparable between runs here,
    not with the paper's. What 0.1 costs in accuracy, measured on geometric Brownian motion ``dY = Y/2 dt + Y/2 dW``
    (20000 paths, paired with the exact solution on the same Brownian paths, per-sample or joint norm): Var Y(1)
    -7.5%, E Y(1) -1.1%, in 7 steps; the bias falls like the step (-4.5% at 0.01 in 13 steps, -1.7% at 1e-3 in 33)
    and fixed steps do no better per step, so it is the scheme's weak error. per_sample: per-sample step control, or the paper's joint norm (default). Regularisers:
    ``global`` (``sum_j EEst_j |h_j|`` over the recorded steps) and ``local`` (:func:`sde_local_regularizer` with
    the same scheme; ``step="initial"`` or ``"taken"``; ``estimate="error"`` only).
    """

    def __init__(self, in_features: int, latent: int = 32, hidden: int = 64, n_classes: int = 10, t1: float = 1.0,
                 rtol: float = 0.1, atol: float = 0.1, per_sample: bool = False, time_dependent: bool = False,
                 scheme: Scheme = "milstein") -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("latent", latent), ("n_classes", n_classes)):
            _check_int(name, value)
        _check_span(t1, rtol, atol)
        _check_choice("scheme", scheme, _SCHEMES, "use scheme='milstein' (or 'euler' for Euler-Maruyama)")
        self.in_features, self.t1, self.rtol, self.atol = in_features, float(t1), rtol, atol
        self.per_sample, self.scheme = bool(per_sample), scheme
        self.encoder = nn.Linear(in_features, latent)
        self.drift = ConcatTanhMLP(latent, hidden, time_dependent)
        self.diffusion = _DiagonalDiffusion(latent)
        self.head = nn.Linear(latent, n_classes)

    def forward(self, x: Tensor, regularizer: RegularizerSpec | str | None = None, *,
                generator: torch.Generator | None = None) -> DEClassifierOutput:
        """x: ``(batch, ...)`` with ``in_features`` entries per sample. regularizer: None, a preset name or a
        :class:`RegularizerSpec`. generator: the Brownian path and the regulariser's draws (seeded: reproducible).
        Returns :class:`DEClassifierOutput` (NFE count drift plus diffusion calls)."""
        spec = RegularizerSpec.from_arg(regularizer)
        z0 = self.encoder(_flatten_input(x, self.in_features, spec))
        if spec.estimate != "error":
            raise ValueError(bad_value("regularizer.estimate", spec.estimate, "'error' for an SDE (Shampine's "
                                       "estimate is for Runge-Kutta stages)", "use estimate='error'"))
        if spec.from_step_start:
            raise ValueError(bad_value("regularizer.from_step_start", True, "False for an SDE (its local regulariser "
                                       "always steps from a recorded step start: no dense output)",
                                       "drop from_step_start"))
        if spec.rows != 1:
            raise ValueError(bad_value("regularizer.rows", spec.rows, "1 for an SDE (the subset is an ODE option)",
                                       "use rows=1"))
        _check_points(spec, self.per_sample, needs_record=True)  # every SDE local regulariser uses the record
        sol = sde_solve(self.drift, self.diffusion, z0, [0.0, self.t1], rtol=self.rtol, atol=self.atol,
                        per_sample=self.per_sample, generator=generator, record_steps=spec.kind != "none",
                        scheme=self.scheme)
        reg, info = None, None
        if spec.kind == "global":
            reg = global_regularizer(sol)
        elif spec.kind == "local":
            reg, info = sde_local_regularizer(self.drift, self.diffusion, sol, sampling=spec.sampling, step=spec.step,
                                              points=spec.points, rtol=self.rtol, atol=self.atol,
                                              generator=generator, scheme=self.scheme)
        state = sol.ys[:, -1]
        return DEClassifierOutput(logits=self.head(state), state=state, nfe=sol.stats.nfe,
                                  nfe_joint=sol.stats.nfe_joint, reg=reg, reg_nfe=0 if info is None else info.nfe,
                                  solution=sol, reg_info=info)
