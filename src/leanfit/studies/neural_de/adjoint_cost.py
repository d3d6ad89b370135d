"""``leanfit bench neural-de-adjoint``: what each gradient of a solve costs when a neural ODE classifier is trained.

Arms are ``method:adjoint`` pairs: the regulariser (``vanilla``, ``global``, a local preset such as ``local_taken``)
and the main solve's sensitivity method (:func:`leanfit.neural_de.solve`'s ``adjoint``): ``direct``
(backpropagation through every stage), ``checkpoint`` (one state per accepted step, each step recomputed in the
backward pass) and ``backsolve`` (the continuous adjoint). ``global:backsolve`` does not exist: the global
regulariser differentiates every accepted step's error estimate, which only the discrete sensitivities of the
solver's own steps define; a continuous adjoint has no such steps to differentiate (the model refuses it).

Protocol, all arms in one process and side by side: every arm starts from the same weights and sees the same
batches; training runs in rounds of one optimiser step per arm, the order rotated every round, so that machine load
falls on every arm alike (the median seconds per step is reported, and the sum). Then each arm's test accuracy and
joint test NFE, and its peak memory: one training step (forward and backward) on a fixed batch of ``batch_size``,
run with the trained weights in a fresh process (:func:`leanfit.core.memory.run_in_fresh_process`) and measured
by :func:`leanfit.core.bench.peak_memory` (the resident-set high-water mark above what the process held before the
step, i.e. the autograd graph, the solver's buffers and the gradients; glibc's mapping threshold fixed at 64 KiB
in that process, so that freed tensors leave the resident set at once, see :func:`_exact_heap`). CPU only, in
float64. Ratios
are to the ``direct`` arm of the same method. Lambdas are fixed per method (``lambdas``), not chosen here.
"""

from __future__ import annotations

import contextlib
import copy
import os
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from leanfit.core.bench import TimingConfig
from leanfit.core.config import option

if TYPE_CHECKING:
    from leanfit.core.report import Report
    from leanfit.core.runner import RunContext
    from leanfit.core.runs import RunDir

__all__ = ["ADJOINTS", "AdjointCostConfig", "measure", "report"]

ADJOINTS = ("direct", "checkpoint", "backsolve")
_ARMS = ["vanilla:direct", "vanilla:checkpoint", "vanilla:backsolve", "global:direct", "global:checkpoint",
         "local_taken:direct", "local_taken:checkpoint", "local_taken:backsolve"]


@dataclass
class AdjointCostConfig(TimingConfig):
    arms: list[str] = option(default_factory=lambda: list(_ARMS), help="method:adjoint pairs; method a regulariser "
                             "preset, adjoint direct, checkpoint or backsolve (not global:backsolve)")
    lambdas: dict[str, float] = option(default_factory=lambda: {"global": 0.1, "local_taken": 1.0},
                                       help="lambda of each regularised method (constant; fixed, not chosen here)")
    dataset: str = option("mnist5k", help="digits or mnist5k (the neural-de experiment's split, split_seed 0)")
    hidden: int = option(100, help="tanh units of the vector field (the paper's MNIST model: 100)")
    batch_size: int = option(512, help="training batch, also the batch whose peak memory is measured (paper: 512)")
    steps: int = option(30, help="optimiser steps per arm")
    lr: float = option(3e-3, help="Adam learning rate")
    rtol: float = option(1e-7, help="solver relative tolerance (float64)")
    atol: float = option(1e-7, help="solver absolute tolerance (float64)")
    eval_batch: int = option(500, help="test batch (joint NFE per batch of this size)")
    memory_tols: list[float] = option(default_factory=lambda: [1e-8], help="also measure the vanilla arms' training "
                                      "step memory with the trained weights at these tolerances (more steps per "
                                      "solve: how the memory ratios grow with the steps; the paper's MNIST: 1e-8)")

    def __post_init__(self) -> None:
        super().__post_init__()
        from leanfit.neural_de.models import REGULARIZER_PRESETS

        if not self.arms:
            raise ValueError("arms=[] is invalid: expected method:adjoint pairs such as vanilla:direct")
        for arm in self.arms:
            method, _, adjoint = arm.partition(":")
            if method not in REGULARIZER_PRESETS or adjoint not in ADJOINTS:
                raise ValueError(f"arms contains {arm!r}: expected method:adjoint with method in "
                                 f"{sorted(REGULARIZER_PRESETS)} and adjoint in {ADJOINTS}")
            if method == "global" and adjoint == "backsolve":
                raise ValueError("arms contains 'global:backsolve': the global regulariser needs discrete "
                                 "sensitivities; use global:checkpoint (or a local method with backsolve)")
            if REGULARIZER_PRESETS[method].kind != "none" and not self.lambdas.get(method, 0.0) > 0:
                raise ValueError(f"lambdas={self.lambdas} has no lambda > 0 for {method!r}: add {method}: <lambda>")
        for name in ("hidden", "batch_size", "steps", "eval_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} is invalid: expected an integer >= 1")
        if not (self.lr > 0 and self.rtol > 0 and self.atol > 0 and all(0 < t < 1 for t in self.memory_tols)):
            raise ValueError(f"lr={self.lr}, rtol={self.rtol}, atol={self.atol}, memory_tols={self.memory_tols} are "
                             "invalid: expected values > 0 (tolerances below 1)")
        if self.dataset not in ("digits", "mnist5k"):
            raise ValueError(f"dataset={self.dataset!r} is invalid: expected digits or mnist5k")


PRESETS = {
    "quick": {"dataset": "digits", "hidden": 32, "batch_size": 128, "steps": 10, "rtol": 1e-6, "atol": 1e-6,
              "eval_batch": 256},
    "full": {},
}


def _model(cfg: AdjointCostConfig, n_features: int, adjoint: str, seed: int) -> Any:
    import torch

    from leanfit.neural_de.models import NeuralODEClassifier

    torch.manual_seed(seed)
    model = NeuralODEClassifier(n_features, cfg.hidden, 10, rtol=cfg.rtol, atol=cfg.atol, adjoint=adjoint)
    return model.double()


def _train_step(model: Any, method: str, lam: float, xb: Any, yb: Any, gen: Any) -> tuple[Any, Any]:
    """Forward and backward of one training step; returns (loss, output) with the gradients in ``model``."""
    import torch.nn.functional as F

    out = model(xb, regularizer=method, generator=gen)
    loss = F.cross_entropy(out.logits, yb)
    if out.reg is not None:
        loss = loss + lam * out.reg
    loss.backward()
    return loss, out


def _train(cfg: AdjointCostConfig, data: Any, seed: int) -> dict[str, dict[str, Any]]:
    """Train every arm from the same weights on the same batches, one step per arm per round (rotated)."""
    import torch

    X, y = data.train
    init = _model(cfg, data.n_features, "direct", seed).state_dict()
    arms: dict[str, dict[str, Any]] = {}
    for arm in cfg.arms:
        method, _, adjoint = arm.partition(":")
        model = _model(cfg, data.n_features, adjoint, seed)
        model.load_state_dict(copy.deepcopy(init))
        arms[arm] = {"method": method, "adjoint": adjoint, "lambda": cfg.lambdas.get(method, 0.0), "model": model,
                     "opt": torch.optim.Adam(model.parameters(), lr=cfg.lr), "seconds": [], "nfe_forward": [],
                     "nfe_backward": [], "gen": torch.Generator().manual_seed(seed)}
    batches = torch.Generator().manual_seed(seed)
    names = list(arms)
    for step in range(cfg.steps):
        idx = torch.randint(0, len(y), (cfg.batch_size,), generator=batches)
        shift = step % len(names)
        for name in names[shift:] + names[:shift]:
            a = arms[name]
            began = time.perf_counter()
            a["opt"].zero_grad(set_to_none=True)
            _, out = _train_step(a["model"], a["method"], a["lambda"], X[idx], y[idx], a["gen"])
            a["opt"].step()
            a["seconds"].append(time.perf_counter() - began)
            a["nfe_forward"].append(out.nfe_total)
            a["nfe_backward"].append(0 if out.solution is None else out.solution.stats.nfe_backward)
    return arms


def _peak_child(cfg_dict: dict[str, Any], state: dict[str, Any], arm: str, xb: Any, yb: Any) -> dict[str, Any]:
    """One training step of ``arm`` from ``state`` in this (fresh) process, after an unmeasured one; its peak
    memory in MB."""
    import torch

    from leanfit.core.bench import peak_memory
    from leanfit.core.device import configure_threads

    cfg = AdjointCostConfig.from_dict(cfg_dict)
    configure_threads(cfg.threads, small_workload=True)
    method, _, adjoint = arm.partition(":")
    model = _model(cfg, xb.shape[1], adjoint, 0)
    model.load_state_dict(state)
    gen = torch.Generator().manual_seed(0)
    _train_step(model, method, cfg.lambdas.get(method, 0.0), xb, yb, gen)  # warm-up: lazy imports, thread pools
    model.zero_grad(set_to_none=False)  # the gradients stay allocated: the measured step holds only its own memory
    gen.manual_seed(0)
    peak, (_, out) = peak_memory(lambda: _train_step(model, method, cfg.lambdas.get(method, 0.0), xb, yb, gen))
    return {"peak_mb": peak.mb, "memory_source": peak.source, "nfe_forward": out.nfe_total}


def _evaluate(model: Any, X: Any, y: Any, batch: int) -> tuple[float, float]:
    """Test accuracy and joint NFE per batch."""
    import torch

    correct, nfes = 0, []
    with torch.no_grad():
        for i in range(0, len(y), batch):
            out = model(X[i : i + batch])
            correct += int((out.logits.argmax(1) == y[i : i + batch]).sum())
            nfes.append(out.nfe_joint)
    return correct / len(y), statistics.fmean(nfes)


@contextlib.contextmanager
def _exact_heap() -> Iterator[None]:
    """Fresh processes started inside serve every allocation of 64 KiB or more (a (512, 784) float64 state is 3.2
    MB) from its own mapping, returned at once when freed: the resident-set high-water mark is then the peak of
    live memory. glibc's default moves its mapping threshold up as large blocks are freed and then keeps freed
    blocks in the heap, so that the same step measured 359 and 421 MB in two fresh processes (with the fixed
    threshold: 169.5 and 169.3 MB)."""
    before = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    try:
        yield
    finally:
        if before is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = before


def measure(cfg: AdjointCostConfig, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Train every arm side by side, then score each and measure its training step's peak memory; one row per
    arm (ratios added by :func:`add_ratios`), and the rows of :func:`measure_memory_at_tols`."""
    from leanfit.core.memory import run_in_fresh_process
    from leanfit.studies.neural_de.config import NeuralDEExperimentConfig
    from leanfit.studies.neural_de.experiment import load_data

    data = load_data(NeuralDEExperimentConfig(dataset=cfg.dataset))
    arms = _train(cfg, data, seed)
    X, y = data.train
    xb, yb = X[: cfg.batch_size], y[: cfg.batch_size]  # one fixed batch for every arm's memory
    rows, states = [], {}
    for name, a in arms.items():
        acc, nfe = _evaluate(a["model"], *data.test, cfg.eval_batch)
        states[name] = {k: v.detach().clone() for k, v in a["model"].state_dict().items()}
        with _exact_heap():
            mem = run_in_fresh_process(_peak_child, cfg.to_dict(), states[name], name, xb, yb)
        rows.append({"arm": name, "method": a["method"], "adjoint": a["adjoint"], "lambda": a["lambda"],
                     "train_seconds": sum(a["seconds"]), "step_seconds": statistics.median(a["seconds"]),
                     "train_nfe_forward": statistics.fmean(a["nfe_forward"]),
                     "train_nfe_backward": statistics.fmean(a["nfe_backward"]), "test_accuracy": acc,
                     "test_nfe_joint": nfe, "peak_mb": mem["peak_mb"], "memory_source": mem["memory_source"],
                     "memory_nfe_forward": mem["nfe_forward"]})
    add_ratios(rows)
    return rows, measure_memory_at_tols(cfg, rows, states, xb, yb)


def measure_memory_at_tols(cfg: AdjointCostConfig, rows: list[dict[str, Any]], states: dict[str, Any], xb: Any,
                           yb: Any) -> list[dict[str, Any]]:
    """The vanilla arms' training-step memory at each of ``cfg.memory_tols`` (trained weights, fixed batch)."""
    from leanfit.core.memory import run_in_fresh_process

    out = []
    for tol in cfg.memory_tols:
        child_cfg = {**cfg.to_dict(), "rtol": tol, "atol": tol}
        for r in rows:
            if r["method"] == "vanilla":
                with _exact_heap():
                    mem = run_in_fresh_process(_peak_child, child_cfg, states[r["arm"]], r["arm"], xb, yb)
                out.append({"arm": r["arm"], "method": "vanilla", "adjoint": r["adjoint"], "tol": tol,
                            "nfe_forward": mem["nfe_forward"], "peak_mb": mem["peak_mb"]})
    from leanfit.core.bench import add_ratios as ratios

    ratios(out, match=["method", "tol"], baseline={"adjoint": "direct"}, columns={"memory_vs_direct": "peak_mb"})
    return out


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Memory and time ratios to the ``direct`` arm of the same method; accuracy difference in points."""
    from leanfit.core.bench import add_ratios as ratios

    ratios(rows, match=["method"], baseline={"adjoint": "direct"},
           columns={"memory_vs_direct": "peak_mb", "time_vs_direct": "train_seconds",
                    "step_time_vs_direct": "step_seconds"})
    base = {r["method"]: r for r in rows if r["adjoint"] == "direct"}
    for r in rows:
        if r["method"] in base:
            r["accuracy_vs_direct_points"] = 100 * (r["test_accuracy"] - base[r["method"]]["test_accuracy"])


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Checkpoint memory <= 1/4 and backsolve <= 1/10 of direct; a local method under an adjoint trains no slower
    than global under its cheapest (direct or checkpoint) solve."""
    out = []
    for r in rows:
        limit = {"checkpoint": 0.25, "backsolve": 0.10}.get(r["adjoint"])
        if limit is not None and r.get("memory_vs_direct") is not None:
            out.append({"check": f"{r['arm']} memory <= {limit:g} x direct", "measured": r["memory_vs_direct"],
                        "met": r["memory_vs_direct"] <= limit})
    glob = [r for r in rows if r["method"] == "global"]
    if glob:
        best = min(glob, key=lambda r: r["train_seconds"])
        for r in rows:
            if r["method"].startswith("local") and r["adjoint"] != "direct":
                ratio = r["train_seconds"] / best["train_seconds"]
                out.append({"check": f"{r['arm']} training time <= {best['arm']}", "measured": ratio,
                            "met": ratio <= 1.0})
    return out


_COLUMNS = ["arm", "lambda", "train_seconds", "step_seconds", "time_vs_direct", "train_nfe_forward",
            "train_nfe_backward", "test_accuracy", "accuracy_vs_direct_points", "test_nfe_joint", "peak_mb",
            "memory_vs_direct"]


def report(run: RunDir, results: dict[str, Any]) -> Report:
    from leanfit.core.report import Report, bar_chart

    rows = results["rows"]
    rep = Report("neural-de: training cost of each adjoint (direct, checkpoint, backsolve)")
    rep.text(results.get("headline", ""))
    rep.text(f"Device {results['device']}, {results['threads']} torch thread(s); {results['steps']} optimiser steps "
             f"of {results['batch_size']} per arm, trained side by side (one step per arm per round, rotated). "
             "train_seconds: all steps; step_seconds: their median; NFE per training step (forward: main solve and "
             "regulariser; backward: calls of f in the backward pass, 0 for direct, where autograd replays none); "
             "peak_mb: one training step's peak memory above what its fresh process held before the step "
             f"({rows[0]['memory_source']}). Ratios are to the direct arm of the same method.")
    rep.section("Arms").table(rows, _COLUMNS)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by = {(r["method"], r["adjoint"]): r for r in rows}
    panels = {title: {adj: [by[(m, adj)][key] if (m, adj) in by else None for m in methods] for adj in ADJOINTS}
              for title, key in (("peak memory of a training step (MB)", "peak_mb"),
                                 ("training time (s)", "train_seconds"))}
    bar_chart(run.plots_dir / "adjoint_cost.png", methods, panels, ylabel=["MB", "seconds"], value_labels=True)
    rep.figure("plots/adjoint_cost.png", "Peak memory and training time per method and adjoint")
    if results.get("memory_at_tols"):
        rep.section("Vanilla training-step memory at other tolerances (trained weights, same batch)")
        rep.table(results["memory_at_tols"], ["arm", "tol", "nfe_forward", "peak_mb", "memory_vs_direct"])
    rep.section("Targets").table(results["targets"])
    return rep


def headline(rows: list[dict[str, Any]]) -> str:
    parts = []
    for r in rows:
        if r["adjoint"] != "direct" and r.get("memory_vs_direct") is not None:
            parts.append(f"{r['arm']}: memory x{r['memory_vs_direct']:.3f}, time x{r['time_vs_direct']:.2f}, "
                         f"accuracy {r['accuracy_vs_direct_points']:+.2f} pts vs direct")
    return "; ".join(parts)


def run(ctx: RunContext[AdjointCostConfig]) -> dict[str, Any]:
    import torch

    from leanfit.core.bench import torch_threads
    from leanfit.core.device import device_name

    cfg = ctx.config
    with torch_threads(cfg.threads, small_workload=True) as threads:
        rows, memory_rows = measure(cfg, ctx.seed)
    return {"rows": rows, "memory_at_tols": memory_rows, "targets": targets(rows), "headline": headline(rows), "threads": threads,
            "device": device_name(torch.device("cpu")), "steps": cfg.steps, "batch_size": cfg.batch_size}
