"""``leanfit bench neural-de``: solver throughput of :func:`leanfit.neural_de.solve` against torchdiffeq and torchode
on the same problems, batches, dtypes and tolerances (``rtol = atol = tol``), forward solves under ``no_grad``.

Methods (all timed side by side in one process per cell: one untimed checked call each, ``warmup`` untimed
rounds, then interleaved rounds of one call per method, the order rotated each round
(:func:`leanfit.core.bench.time_side_by_side`); the median and interquartile range are reported):

- ``leanfit_tsit5`` / ``leanfit_dopri5``: per-sample step-size control (``per_sample=True``, the default PI
  controller); ``leanfit_tsit5_joint`` / ``leanfit_dopri5_joint``: one error norm and step sequence for the batch;
- ``torchdiffeq_dopri5``: ``torchdiffeq.odeint`` (one joint step sequence; torchdiffeq has no Tsit5);
- ``torchode_tsit5`` / ``torchode_dopri5``: ``AutoDiffAdjoint`` with ``IntegralController`` (torchode's README set-up,
  the baseline of ``*_vs_torchode``); ``torchode_tsit5_pi`` / ``torchode_dopri5_pi``: ``PIDController`` with
  ``pcoeff=0.2, icoeff=0.5`` (``torchode.solve_ivp``'s default controller, the baseline of ``*_vs_torchode_pi``).
  The torchode solver objects are built once per cell (as in a training loop); the ``InitialValueProblem`` is
  built inside every timed call. torchode's TorchScript path (``torch.jit.script`` of the adjoint) is not used:
  it needs a scriptable vector field, which the call counter below is not, and torchode itself calls it optional.

NFE: every vector field is wrapped in a counter, so ``nfe_joint`` is the number of calls of ``f`` on the batch that
really happened, for every library; ``nfe_lib`` is what the library reports itself (leanfit ``stats.nfe_joint``,
torchode ``stats["n_f_evals"]``, torchdiffeq nothing). ``nfe_sample`` is the mean over samples of the calls made
while a sample was still integrated: leanfit ``stats.nfe``; torchode ``2 + 6 n_steps`` (two calls for the initial
step, six new stages per attempt of its FSAL 7-stage pairs); a joint solve integrates every sample in every call.
``accepted`` / ``rejected``: mean steps per sample (torchdiffeq does not expose them).

Accuracy: ``max_err`` is the largest absolute error over the first ``ref_samples`` samples, every ``t_eval`` point and
component, against scipy's ``solve_ivp(method="DOP853", rtol=atol=ref_tol)`` of the float64 problem (float32 rows
therefore include the rounding of the inputs, ~1e-7 relative); ``max_err_scaled`` divides each error by
``tol + tol |y_ref|``. Fewer NFE at a worse error is not a win: the ``err_vs_*`` ratios say which it is.

Ratios are ``row / baseline`` of the same cell (below 1: fewer calls, faster, more accurate): ``*_vs_torchode`` and
``*_vs_torchode_pi`` against torchode with the row's tableau, ``*_vs_torchdiffeq`` for dopri5 rows only.

Problems (float64 definitions; float32 cells cast the initial states and parameters): Van der Pol with mu=1
(``vdp``) and with a per-sample mu log-uniform in [0.5, 4] (``vdp-mixed-mu``, where per-sample control pays),
Lotka-Volterra (1.5, 1, 3, 1), all 2-D on [0, 10]; random tanh MLP vector fields of hidden width 64 and 256 on
``mlp_dim`` states over [0, 1] (``mlp-64``, ``mlp-256``; the neural-ODE case, 784 = MNIST-like). A stiff problem
(Robertson) is left out on purpose: explicit pairs need ~1e5 steps there, which measures stiffness, not solvers.
Float32 cells with a tolerance below ``MIN_TOL[dtype]`` are skipped (its step-size control runs into rounding).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from leanfit.core.bench import TimingConfig, add_ratios, median_iqr, time_side_by_side, torch_threads
from leanfit.core.config import option
from leanfit.core.registry import register
from leanfit.studies.neural_de.adjoint_cost import PRESETS as ADJOINT_PRESETS
from leanfit.studies.neural_de.adjoint_cost import AdjointCostConfig
from leanfit.studies.neural_de.adjoint_cost import report as adjoint_report
from leanfit.studies.neural_de.adjoint_cost import run as adjoint_run

if TYPE_CHECKING:
    from leanfit.core.report import Report
    from leanfit.core.runner import RunContext
    from leanfit.core.runs import RunDir

__all__ = ["METHODS", "MIN_TOL", "PROBLEMS", "NeuralDEBenchConfig"]

METHODS = ("leanfit_tsit5", "leanfit_tsit5_joint", "leanfit_dopri5", "leanfit_dopri5_joint", "torchdiffeq_dopri5",
           "torchode_tsit5", "torchode_tsit5_pi", "torchode_dopri5", "torchode_dopri5_pi")
PROBLEMS = ("vdp", "vdp-mixed-mu", "lotka-volterra", "mlp-64", "mlp-256")
DTYPES = ("float64", "float32")
MIN_TOL = {"float64": 1e-12, "float32": 1e-6}  # tighter float32 tolerances only measure rounding noise
BASELINES = {"torchode": "torchode_{tableau}", "torchode_pi": "torchode_{tableau}_pi",
             "torchdiffeq": "torchdiffeq_dopri5"}
_TORCHODE_PI = {"pcoeff": 0.2, "icoeff": 0.5, "dcoeff": 0.0}  # torchode.solve_ivp's default controller
_CELL = ("problem", "dtype", "batch", "tol")


@dataclass
class NeuralDEBenchConfig(TimingConfig):
    problems: list[str] = option(default_factory=lambda: list(PROBLEMS), help=f"problems: {PROBLEMS}")
    dtypes: list[str] = option(default_factory=lambda: list(DTYPES), help=f"state dtypes: {DTYPES}")
    batches: list[int] = option(default_factory=lambda: [1, 64, 512], help="batch sizes (initial states per solve)")
    tols: list[float] = option(default_factory=lambda: [1e-3, 1e-6, 1e-8],
                               help="tolerances, rtol = atol = tol for every library")
    methods: list[str] = option(default_factory=lambda: list(METHODS), help=f"solvers: {METHODS}")
    mlp_dim: int = option(784, help="state dimension of the mlp problems")
    n_eval: int = option(11, help="evaluation times: linspace(0, t_end, n_eval)")
    warmup: int = option(1, help="untimed rounds after the checked call (allocator and dispatch warm-up)")
    repeats: int = option(5, help="timed rounds at least (one call per method each)")
    min_seconds: float = option(1.0, help="keep timing rounds of a cell until this much time (at most 20 x repeats)")
    ref_samples: int = option(16, help="samples compared with the scipy DOP853 reference (the first ones)")
    ref_tol: float = option(1e-12, help="rtol = atol of the scipy DOP853 reference")
    threads: int = option(0, help="torch threads (0: auto, one thread for these small-op workloads)")
    device: str = option("cpu", help="cpu or cuda[:N]: where every library solves (timings name the device)")
    target: list[str] = option(default_factory=lambda: ["leanfit_tsit5", "torchode"],
                               help="headline: [leanfit method, baseline in torchode | torchode_pi | torchdiffeq]")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, allowed in (("problems", PROBLEMS), ("dtypes", DTYPES), ("methods", METHODS)):
            unknown = [x for x in getattr(self, name) if x not in allowed]
            if unknown:
                raise ValueError(f"{name} contains {unknown[0]!r}: expected any of {', '.join(allowed)}")
        for name in ("batches", "problems", "dtypes", "tols", "methods"):
            if not getattr(self, name):
                raise ValueError(f"{name}=[] is invalid: expected at least one entry")
        bad = [x for x in self.batches if x < 1]
        if bad:
            raise ValueError(f"batches contains {bad[0]}: expected positive batch sizes")
        bad_tol = [x for x in self.tols if not 0 < x < 1]
        if bad_tol:
            raise ValueError(f"tols contains {bad_tol[0]}: expected tolerances in (0, 1), e.g. 1e-6")
        for name, low in (("mlp_dim", 1), ("n_eval", 2), ("ref_samples", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"{name}={getattr(self, name)} is invalid: expected an integer >= {low}")
        if not 0 < self.ref_tol < min(self.tols):
            raise ValueError(f"ref_tol={self.ref_tol} is invalid: expected 0 < ref_tol < min(tols)={min(self.tols)}, "
                             "a reference tighter than every tolerance measured")
        if (len(self.target) != 2 or not self.target[0].startswith("leanfit_")
                or self.target[1] not in BASELINES):
            raise ValueError(f"target={self.target} is invalid: expected [leanfit method, one of "
                             f"{', '.join(BASELINES)}], e.g. [leanfit_tsit5, torchode]")


PRESETS = {
    "quick": {
        "problems": ["vdp-mixed-mu", "lotka-volterra", "mlp-64"],
        "dtypes": ["float64", "float32"],
        "batches": [64],
        "tols": [1e-3, 1e-6],
        "mlp_dim": 32,
        "warmup": 1,
        "repeats": 3,
        "min_seconds": 0.0,
    },
    # full: the checked call already warms every method up, and mlp-256 at d=784, batch 512 costs seconds a solve
    "full": {"warmup": 0, "repeats": 3},
}


# --- problems ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Problem:
    """y0: float64 ``(batch, d)``. ``field(dtype, n)`` is the vector field ``f(t, y)`` of the first ``n`` samples
    (all when ``None``) with parameters cast to ``dtype``; every field here is autonomous (``t`` is ignored)."""

    y0: Any
    t_end: float
    field: Callable[[Any, int | None], Callable[[Any, Any], Any]]


def _van_der_pol(batch: int, g: Any, mixed: bool) -> _Problem:
    import torch

    y0 = torch.tensor([2.0, 0.0], dtype=torch.float64) + 0.5 * torch.randn(batch, 2, generator=g, dtype=torch.float64)
    if mixed:
        mu = torch.empty(batch, dtype=torch.float64).uniform_(math.log(0.5), math.log(4.0), generator=g).exp()
    else:
        mu = torch.ones(batch, dtype=torch.float64)

    def field(dtype: Any, n: int | None = None, device: Any = "cpu") -> Callable[[Any, Any], Any]:
        m = mu[:n].to(device, dtype)

        def f(t: Any, y: Any) -> Any:
            x, v = y[:, 0], y[:, 1]
            return torch.stack((v, m * (1 - x * x) * v - x), dim=1)

        return f

    return _Problem(y0, 10.0, field)


def _lotka_volterra(batch: int, g: Any) -> _Problem:
    import torch

    y0 = torch.empty(batch, 2, dtype=torch.float64).uniform_(0.5, 2.0, generator=g)

    def field(dtype: Any, n: int | None = None, device: Any = "cpu") -> Callable[[Any, Any], Any]:
        def f(t: Any, y: Any) -> Any:
            x, z = y[:, 0], y[:, 1]
            return torch.stack((1.5 * x - x * z, x * z - 3.0 * z), dim=1)

        return f

    return _Problem(y0, 10.0, field)


def _tanh_mlp(batch: int, g: Any, dim: int, width: int) -> _Problem:
    """``f(y) = W2 tanh(W1 y + b1)``, ``W1 ~ N(0, 1/dim)``, ``W2 ~ N(0, 4/width)``, ``b1 ~ N(0, 1)``: an untrained
    neural-ODE layer whose flow moves the state by O(1) over [0, 1]."""
    import torch

    y0 = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    w1 = torch.randn(width, dim, generator=g, dtype=torch.float64) / math.sqrt(dim)
    b1 = torch.randn(width, generator=g, dtype=torch.float64)
    w2 = 2.0 * torch.randn(dim, width, generator=g, dtype=torch.float64) / math.sqrt(width)

    def field(dtype: Any, n: int | None = None, device: Any = "cpu") -> Callable[[Any, Any], Any]:
        a, b, c = (w.to(device, dtype) for w in (w1, b1, w2))

        def f(t: Any, y: Any) -> Any:
            return torch.tanh(torch.addmm(b, y, a.t())) @ c.t()

        return f

    return _Problem(y0, 1.0, field)


def make_problem(name: str, batch: int, seed: int, mlp_dim: int) -> _Problem:
    """The named problem with ``batch`` initial states drawn from ``seed`` (float64 on the CPU)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    if name in ("vdp", "vdp-mixed-mu"):
        return _van_der_pol(batch, g, mixed=name == "vdp-mixed-mu")
    if name == "lotka-volterra":
        return _lotka_volterra(batch, g)
    if name in ("mlp-64", "mlp-256"):
        return _tanh_mlp(batch, g, mlp_dim, int(name.split("-")[1]))
    raise ValueError(f"problem={name!r} is invalid: expected any of {', '.join(PROBLEMS)}")


def reference_solution(problem: _Problem, ts: Any, n: int, tol: float) -> Any:
    """scipy DOP853 solution of the first ``n`` samples as one system: float64 ``(n, T, d)``."""
    import numpy as np
    import torch
    from scipy.integrate import solve_ivp

    y0 = problem.y0[:n]
    f = problem.field(torch.float64, n)

    def rhs(t: float, y: np.ndarray) -> np.ndarray:
        return f(t, torch.from_numpy(y).view(y0.shape)).numpy().ravel()

    t = ts.numpy()
    sol = solve_ivp(rhs, (t[0], t[-1]), y0.numpy().ravel(), method="DOP853", t_eval=t, rtol=tol, atol=tol)
    if not sol.success:
        raise RuntimeError(f"the scipy DOP853 reference failed: {sol.message}")
    return torch.from_numpy(sol.y.T.copy()).view(len(t), *y0.shape).transpose(0, 1)


# --- solvers ----------------------------------------------------------------------------------------------------
class _Counted:
    """A vector field that counts its calls (every library calls it on the whole batch)."""

    def __init__(self, f: Callable[[Any, Any], Any]) -> None:
        self.f, self.calls = f, 0

    def __call__(self, t: Any, y: Any) -> Any:
        self.calls += 1
        return self.f(t, y)


def _tableau(method: str) -> str:
    return "tsit5" if "tsit5" in method else "dopri5"


def _solver(method: str, f: _Counted, y0: Any, ts: Any, tol: float) -> tuple[Callable[[], Any], Callable[[Any], dict]]:
    """The timed call of one method, and the function turning its output into ``ys`` ``(batch, T, d)`` and stats."""
    tab = _tableau(method)
    if method.startswith("leanfit_"):
        from leanfit.neural_de.solver import solve

        per_sample = not method.endswith("_joint")

        def leanfit_stats(sol: Any) -> dict[str, Any]:
            s = sol.stats
            return {"ys": sol.ys, "nfe_lib": s.nfe_joint, "nfe_sample": s.nfe.double().mean().item(),
                    "accepted": s.n_accepted.double().mean().item(),
                    "rejected": s.n_rejected.double().mean().item()}

        return lambda: solve(f, y0, ts, method=tab, rtol=tol, atol=tol, per_sample=per_sample), leanfit_stats
    if method == "torchdiffeq_dopri5":
        from torchdiffeq import odeint

        def torchdiffeq_stats(ys: Any) -> dict[str, Any]:
            return {"ys": ys.transpose(0, 1), "nfe_lib": None, "nfe_sample": float(f.calls), "accepted": None,
                    "rejected": None}

        return lambda: odeint(f, y0, ts, rtol=tol, atol=tol, method="dopri5"), torchdiffeq_stats
    return _torchode_solver(method, f, y0, ts, tol)


def _torchode_solver(method: str, f: _Counted, y0: Any, ts: Any, tol: float) -> tuple[Callable[[], Any], Callable]:
    import torchode as to

    term = to.ODETerm(f)
    step = to.Tsit5(term=term) if _tableau(method) == "tsit5" else to.Dopri5(term=term)
    if method.endswith("_pi"):
        ctrl = to.PIDController(atol=tol, rtol=tol, term=term, **_TORCHODE_PI)
    else:
        ctrl = to.IntegralController(atol=tol, rtol=tol, term=term)
    adjoint = to.AutoDiffAdjoint(step, ctrl)
    t_eval = ts.expand(y0.shape[0], -1)

    def torchode_stats(sol: Any) -> dict[str, Any]:
        if not bool((sol.status == 0).all()):
            raise RuntimeError(f"{method} did not finish: status {sol.status.unique().tolist()}")
        steps, accepted = sol.stats["n_steps"].double(), sol.stats["n_accepted"].double()
        return {"ys": sol.ys, "nfe_lib": int(sol.stats["n_f_evals"].max()),
                "nfe_sample": (2 + 6 * steps).mean().item(), "accepted": accepted.mean().item(),
                "rejected": (steps - accepted).mean().item()}

    return lambda: adjoint.solve(to.InitialValueProblem(y0=y0, t_eval=t_eval)), torchode_stats


# --- measurement ------------------------------------------------------------------------------------------------
def _time_counted(calls: dict[str, Callable[[], Any]], counters: dict[str, _Counted], cfg: NeuralDEBenchConfig,
                  device: Any = None) -> tuple[dict[str, list[float]], dict[str, set[int]]]:
    """Seconds of every timed call per method (:func:`~leanfit.core.bench.time_side_by_side`), and the set of call
    counts of ``f`` seen per method over the timed calls (one value when the solver is deterministic)."""

    def counted(name: str) -> Callable[[], int]:
        def call() -> int:
            counters[name].calls = 0
            calls[name]()
            return counters[name].calls

        return call

    counts: dict[str, set[int]] = {name: set() for name in calls}

    def record(name: str, seconds: float | None, calls_of_f: int) -> None:
        if seconds is not None:
            counts[name].add(calls_of_f)

    times = time_side_by_side({m: counted(m) for m in calls}, **cfg.timing(), device=device, on_call=record)
    return times, counts


def _errors(ys: Any, ref: Any, tol: float) -> dict[str, float]:
    n = ref.shape[0]
    err = (ys[:n].double().cpu() - ref).abs()
    return {"max_err": err.max().item(), "max_err_scaled": (err / (tol + tol * ref.abs())).max().item()}


def _cell(problem: _Problem, ref: Any, name: str, dtype_name: str, tol: float, cfg: NeuralDEBenchConfig,
          threads: int) -> list[dict[str, Any]]:
    """Every method at one (problem, dtype, batch, tol): checked call, then interleaved timed rounds."""
    import torch

    dtype, device = getattr(torch, dtype_name), torch.device(cfg.device)
    y0 = problem.y0.to(device, dtype)
    ts = torch.linspace(0.0, problem.t_end, cfg.n_eval, dtype=torch.float64, device=device)
    counters = {m: _Counted(problem.field(dtype, None, device)) for m in cfg.methods}
    solvers = {m: _solver(m, counters[m], y0, ts, tol) for m in cfg.methods}
    calls = {m: call for m, (call, _) in solvers.items()}
    checked = {}
    with torch.no_grad():
        for m, (call, stats) in solvers.items():
            counters[m].calls = 0
            checked[m] = {**stats(call()), "nfe_joint": counters[m].calls}
        times, counts = _time_counted(calls, counters, cfg, device)
    rows = []
    for m in cfg.methods:
        out, (median, iqr) = checked[m], median_iqr(times[m])
        rows.append({"problem": name, "dtype": dtype_name, "batch": y0.shape[0], "dim": y0.shape[1], "tol": tol,
                     "method": m, "wall_ms": 1e3 * median, "wall_iqr_ms": 1e3 * iqr, "timed_calls": len(times[m]),
                     "nfe_joint": out["nfe_joint"], "nfe_lib": out["nfe_lib"], "nfe_sample": out["nfe_sample"],
                     "accepted": out["accepted"], "rejected": out["rejected"],
                     "nfe_deterministic": counts[m] == {out["nfe_joint"]}, **_errors(out["ys"], ref, tol),
                     "threads": threads, "device": cfg.device})
    return rows


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """``row / baseline`` of the same cell for wall time, NFE and error, against each baseline with the row's
    tableau (torchdiffeq: dopri5 rows only)."""
    for base, pattern in BASELINES.items():

        def baseline(r: dict[str, Any], base: str = base, pattern: str = pattern) -> dict[str, str] | None:
            tab = _tableau(r["method"])
            return None if base == "torchdiffeq" and tab != "dopri5" else {"method": pattern.format(tableau=tab)}

        add_ratios(rows, match=_CELL, baseline=baseline, columns={f"{key}_vs_{base}": col for key, col in (
            ("wall", "wall_ms"), ("nfe", "nfe_joint"), ("sample_nfe", "nfe_sample"), ("err", "max_err"))})


def _geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else math.nan


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per leanfit method and baseline: geometric-mean and worst ratios over the cells, and cells no worse."""
    out: dict[str, Any] = {}
    for method in sorted({r["method"] for r in rows if r["method"].startswith("leanfit_")}):
        for base in BASELINES:
            got = [r for r in rows if r["method"] == method and f"wall_vs_{base}" in r]
            if not got:
                continue
            entry: dict[str, Any] = {"cells": len(got)}
            for key in ("wall", "nfe", "sample_nfe", "err"):
                xs = [r[f"{key}_vs_{base}"] for r in got if r.get(f"{key}_vs_{base}")]
                entry[f"{key}_geomean"], entry[f"{key}_worst"] = _geomean(xs), max(xs, default=math.nan)
                entry[f"{key}_no_worse"] = sum(x <= 1.0 for x in xs)
            out[f"{method}_vs_{base}"] = entry
    return out


def _headline(summary: dict[str, Any], target: list[str]) -> str:
    s = summary.get(f"{target[0]}_vs_{target[1]}")
    if s is None:
        return ""
    return (f"{target[0]} against {target[1]} over {s['cells']} cells (geometric mean, worst cell): NFE x"
            f"{s['nfe_geomean']:.2f} (worst x{s['nfe_worst']:.2f}, no worse in {s['nfe_no_worse']}/{s['cells']}), wall time x"
            f"{s['wall_geomean']:.2f} (worst x{s['wall_worst']:.2f}, no worse in {s['wall_no_worse']}/{s['cells']}), error x"
            f"{s['err_geomean']:.2f} at the same tolerance")


def _measure(cfg: NeuralDEBenchConfig, seed: int, threads: int) -> tuple[list[dict[str, Any]], list[list[Any]]]:
    """Rows of every measured cell, and the cells skipped by ``MIN_TOL``."""
    import torch

    from leanfit.core.progress import progress_bar

    cells = [(p, b, d, tol) for p in cfg.problems for b in cfg.batches for d in cfg.dtypes for tol in cfg.tols]
    skipped = [[p, d, b, tol] for p, b, d, tol in cells if tol < MIN_TOL[d]]
    rows: list[dict[str, Any]] = []
    refs: dict[tuple[str, int], tuple[_Problem, Any]] = {}
    with progress_bar(len(cells) - len(skipped), "neural-de bench") as bar:
        for p, b, d, tol in cells:
            if tol < MIN_TOL[d]:
                continue
            if (p, b) not in refs:  # one problem and reference per (problem, batch), shared by dtypes and tols
                problem = make_problem(p, b, seed, cfg.mlp_dim)
                ts = torch.linspace(0.0, problem.t_end, cfg.n_eval, dtype=torch.float64)
                refs[(p, b)] = problem, reference_solution(problem, ts, min(b, cfg.ref_samples), cfg.ref_tol)
            problem, ref = refs[(p, b)]
            rows += _cell(problem, ref, p, d, tol, cfg, threads)
            bar.advance(1, problem=p, dtype=d, batch=b, tol=tol)
    return rows, skipped


def _require_baselines(methods: list[str]) -> None:
    import importlib.util

    from leanfit.core.errors import MissingDependencyError

    for lib in ("torchdiffeq", "torchode"):
        if any(m.startswith(lib) for m in methods) and importlib.util.find_spec(lib) is None:
            raise MissingDependencyError(f"methods include {lib} but it is not installed; install the baselines with "
                                         "pip install 'leanfit[ode]', or leave them out of methods=[...]")


# --- report -----------------------------------------------------------------------------------------------------
def _ratio_bars(path: Any, rows: list[dict[str, Any]], base: str) -> bool:
    """Geometric mean over each problem's cells of the wall, NFE and error ratios of every method against ``base``:
    one bar group per problem, one panel per ratio. Returns False when nothing has that baseline."""
    from leanfit.core.report import bar_chart

    baselines = {BASELINES[base].format(tableau=t) for t in ("tsit5", "dopri5")}
    methods = [m for m in METHODS if m not in baselines and any(m == r["method"] and f"wall_vs_{base}" in r
                                                                  for r in rows)]
    problems = [p for p in PROBLEMS if any(r["problem"] == p for r in rows)]
    if not methods:
        return False
    def geomeans(key: str, method: str) -> list[float]:
        col = f"{key}_vs_{base}"
        return [_geomean([r[col] for r in rows if r["method"] == method and r["problem"] == p and r.get(col)])
                for p in problems]

    labels = {"wall": "wall time", "nfe": "NFE (calls of f)", "err": "max error"}
    panels = {f"{label} / {base} (below 1: better)": {m: geomeans(key, m) for m in methods}
              for key, label in labels.items()}
    bar_chart(path, problems, panels, ylabel="ratio, geometric mean over cells", logy=True, baseline=1.0)
    return True


def report(run: RunDir, results: dict[str, Any]) -> Report:
    from leanfit.core.report import Report

    rows = results["rows"]
    rep = Report("Results").text(results.get("headline", ""))
    rep.text(f"device: {results.get('device', 'cpu')}; torch threads: {results.get('threads')}; baselines: "
             + ", ".join(f"{k} {v}" for k, v in results.get("versions", {}).items()))
    summary = [{"comparison": k, **v} for k, v in results.get("summary", {}).items()]
    rep.section("Summary").text(
        "Ratios are row / baseline in the same cell (below 1: fewer calls of f, faster, smaller error); geometric "
        "means and worst cells over all measured cells; `*_no_worse` counts cells with a ratio <= 1."
    )
    rep.table(summary, ["comparison", "cells", "nfe_geomean", "nfe_worst", "nfe_no_worse", "sample_nfe_geomean",
                        "wall_geomean", "wall_worst", "wall_no_worse", "err_geomean", "err_worst"])
    for base in BASELINES:
        if _ratio_bars(run.plots_dir / f"ratios_vs_{base}.png", rows, base):
            rep.figure(f"plots/ratios_vs_{base}.png", f"Wall time, NFE and error against {base}, per problem")
    cols = ["problem", "dtype", "batch", "tol", "method", "wall_ms", "wall_iqr_ms", "nfe_joint", "nfe_sample",
            "accepted", "rejected", "max_err", "max_err_scaled", "wall_vs_torchode", "nfe_vs_torchode",
            "err_vs_torchode", "wall_vs_torchode_pi", "nfe_vs_torchode_pi", "wall_vs_torchdiffeq",
            "nfe_vs_torchdiffeq", "err_vs_torchdiffeq"]
    rep.section("All cells").table(rows, cols)
    if results.get("skipped"):
        rep.text("Skipped (tolerance below `MIN_TOL` of the dtype): "
                 + "; ".join(" ".join(str(x) for x in cell) for cell in results["skipped"]))
    return rep


@register("neural-de", kind="benchmark", description="adaptive ODE solver vs torchdiffeq and torchode: NFE, wall "
          "time and error on the same problems and tolerances", config_cls=NeuralDEBenchConfig, presets=PRESETS,
          report=report)
def run(ctx: RunContext[NeuralDEBenchConfig]) -> dict[str, Any]:
    import importlib.metadata

    from leanfit.core.device import device_name, resolve_device

    cfg = ctx.config
    device = resolve_device(cfg.device)  # refuses an absent device before any solve
    _require_baselines(cfg.methods)
    with torch_threads(cfg.threads, small_workload=True) as threads:
        rows, skipped = _measure(cfg, ctx.seed, threads)
    _add_ratios(rows)
    summary = _summary(rows)
    versions = {}
    for lib in ("torchdiffeq", "torchode", "scipy"):
        try:
            versions[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            versions[lib] = None
    return {"rows": rows, "summary": summary, "headline": _headline(summary, cfg.target), "skipped": skipped,
            "threads": threads, "versions": versions,
            "device": device_name(device)}


register("neural-de-adjoint", kind="benchmark", description="training cost of a neural ODE classifier under each "
         "adjoint (direct, checkpoint, backsolve): time, NFE, accuracy, peak memory",
         config_cls=AdjointCostConfig, presets=ADJOINT_PRESETS, report=adjoint_report)(adjoint_run)
