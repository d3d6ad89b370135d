"""``leanfit run neural-de``: local vs global vs no error regularisation of neural ODE and SDE classifiers.

Arms (:data:`~leanfit.neural_de.models.REGULARIZER_PRESETS`): ``vanilla``; ``global`` (ERNODE: the error estimates
of every accepted step, backpropagated through the solver); the paper's local regulariser, ``local_unbiased``
(``t_r ~ U[0, t1]``, one point per batch, the automatic initial step) and ``local_biased`` (a uniformly drawn step
point of the solve), both with the first stage ``k_1`` a constant as in the paper's code; and leanfit's variants
``local_taken`` (the step the solver actually took at ``t_r``, one point per sample, ``k_1`` differentiated: its
gradient is the error estimate's own, and ``T * EEst`` is an unbiased estimate of the global sum) and
``local_sample`` (the paper's regulariser at one point and error norm per sample), and ``local_subset``
(``local_taken`` from a random eighth of the batch's samples, redrawn every step: the same expected value at an
eighth of the regulariser's arithmetic, so its extra cost can undercut the global regulariser's). The loss is
``cross-entropy + lambda_t * R`` with the paper's exponential decay of ``lambda_t`` from ``lambda_decay * lambda``
to ``lambda``.

Protocol: the data are split once (stratified, fixed seed) into train / validation / test. For every regularised arm
a short sweep over ``lambdas`` runs on the first seed and picks, on validation, the lambda with the fewest NFE among
those whose accuracy is within ``max_acc_drop`` points of vanilla's (the most accurate one if none is); that lambda
is then trained on every seed and the test set is scored once per trained model. All arms of one seed start from
the same initial weights and see the same batches. Reported per arm (mean ± sd over seeds): test accuracy, test
NFE with the paper's joint definition (calls of the vector field per batch of ``eval_batch`` test samples solved
with one joint error norm) and per sample (each sample's own step control), prediction time (median of warm
repeats, all trained models timed interleaved in one process at the end) and training time (the training steps
only, without evaluations), each also as a ratio to vanilla of the same seed.

ODE model: :class:`~leanfit.neural_de.models.NeuralODEClassifier` (``y0 = x``, time-concatenated tanh MLP field,
linear head; the paper's MNIST NODE is 784 -> 100 -> 784, Tsit5). SDE model:
:class:`~leanfit.neural_de.models.NeuralSDEClassifier` (linear encoder, tanh drift, diagonal linear diffusion,
adaptive Milstein with step doubling), arms ``vanilla``, ``global``, ``local_unbiased`` and ``local_biased``.

Every trained model has a folder under ``runs/`` (metrics, weights, result); ``--resume`` skips finished ones.
Training runs through ``accelerate``'s ``Accelerator`` (one process here; launched with ``torchrun`` it is data
parallel, each process solving its shard of every batch; scoring and timing run on the main process only).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from leanfit.core.device import device_name, synchronize
from leanfit.core.registry import register
from leanfit.studies.neural_de.ablation import ABLATION_METHODS, contrasts, report_section
from leanfit.studies.neural_de.config import DEArmConfig, NeuralDEExperimentConfig

if TYPE_CHECKING:
    from leanfit.core.report import Report
    from leanfit.core.runner import RunContext
    from leanfit.core.runs import RunDir

__all__ = ["PRESETS", "DEData", "load_data", "run", "train_one"]

PRESETS = {
    "quick": {"seeds": [0, 1, 2], "timing_repeats": 3,
              "ode": {"hidden": 32, "steps": 120, "lambdas": [0.1, 1.0, 10.0], "rtol": 1e-6, "atol": 1e-6, "lr": 3e-3,
                      "eval_every": 60},
              "sde": {"steps": 120, "lambdas": [1.0, 10.0], "eval_every": 60}},
    # one change at a time between the paper's local regulariser and local_taken (studies.neural_de.ablation),
    # the quick preset's model and training with lambda over 1e-3 .. 1e3
    "ablation": {"seeds": [0, 1, 2], "timing_repeats": 3, "sde": {"enabled": False},
                 "ode": {"methods": list(ABLATION_METHODS), "hidden": 32, "steps": 120, "lr": 3e-3, "eval_every": 60,
                         "lambdas": [1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0], "rtol": 1e-6, "atol": 1e-6}},
    # the same arms on MNIST-5k at the lambdas the digits ablation chose on validation
    # (benchmarks/results/neural-de-ablation/): a 7 x 7 grid there would take about two hours on two CPU cores
    "ablation-mnist": {"dataset": "mnist5k", "seeds": [0, 1, 2], "timing_repeats": 2, "eval_batch": 500,
                       "sde": {"enabled": False},
                       "ode": {"methods": list(ABLATION_METHODS), "hidden": 100, "steps": 120, "batch_size": 128,
                               "lr": 3e-3, "eval_every": 60, "rtol": 1e-6, "atol": 1e-6,
                               "method_lambdas": {"global": 1.0, "local_unbiased": 0.01, "local_start": 0.1,
                                                  "local_start_k1": 0.001, "local_taken_const_batch": 0.001,
                                                  "local_taken_batch": 1.0, "local_taken": 10.0}}},
    "full": {"dataset": "mnist5k", "eval_batch": 512,
             "ode": {"hidden": 100, "steps": 600, "batch_size": 256, "eval_every": 200},
             "sde": {"steps": 600, "batch_size": 256, "eval_every": 200}},
}


# --- device -------------------------------------------------------------------------------------------------------
def resolve_device(name: str) -> Any:
    """``auto`` is CUDA when present, else CPU (never MPS: no float64 there)."""
    import torch

    from leanfit.core.device import resolve_device as resolve

    if name.strip().lower() == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return resolve(name)


# --- data ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DEData:
    """The images scaled to [0, 1] (tensors of ``cfg.dtype``), split once; each split is (X (n, n_features),
    y (n,))."""

    n_features: int
    n_classes: int
    train: tuple[Any, Any]
    val: tuple[Any, Any]
    test: tuple[Any, Any]

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train[1]), "val": len(self.val[1]), "test": len(self.test[1])}


def load_data(cfg: NeuralDEExperimentConfig) -> DEData:
    """Stratified train/val/test split of the images scaled to [0, 1], as tensors of ``cfg.dtype``."""
    import numpy as np
    import torch
    from sklearn.model_selection import train_test_split

    from leanfit.studies.data.images import digits, mnist5k

    X, y = digits() if cfg.dataset == "digits" else mnist5k()
    X = X / float(X.max())
    idx = np.arange(len(y))
    rest, test = train_test_split(idx, test_size=cfg.test_fraction, stratify=y, random_state=cfg.split_seed)
    val_share = cfg.val_fraction / (1 - cfg.test_fraction)
    train, val = train_test_split(rest, test_size=val_share, stratify=y[rest], random_state=cfg.split_seed)
    dtype = getattr(torch, cfg.dtype)
    parts = {name: (torch.as_tensor(X[part], dtype=dtype), torch.as_tensor(y[part]))
             for name, part in (("train", train), ("val", val), ("test", test))}
    return DEData(n_features=X.shape[1], n_classes=int(y.max()) + 1, **parts)


# --- training -----------------------------------------------------------------------------------------------------
def build_model(family: str, cfg: NeuralDEExperimentConfig, data: DEData) -> Any:
    import torch

    from leanfit.neural_de.models import NeuralODEClassifier, NeuralSDEClassifier

    arm: DEArmConfig = getattr(cfg, family)
    if family == "ode":
        model = NeuralODEClassifier(data.n_features, arm.hidden, data.n_classes, rtol=arm.rtol, atol=arm.atol)
    else:
        model = NeuralSDEClassifier(data.n_features, latent=arm.latent, hidden=arm.hidden,
                                    n_classes=data.n_classes, rtol=arm.rtol, atol=arm.atol)
    return model.to(getattr(torch, cfg.dtype))


@dataclass
class _Eval:
    accuracy: float
    nfe_joint: float  # mean calls of f per eval batch, joint norm
    nfe_sample: float | None = None  # mean per-sample NFE with per-sample control
    logits: Any = field(default=None, repr=False)
    correct: list[int] = field(default_factory=list, repr=False)  # per item, for paired bootstrap intervals
    nfe_batches: list[int] = field(default_factory=list, repr=False)  # joint NFE of each batch


def evaluate(model: Any, X: Any, y: Any, batch: int, seed: int, per_sample: bool = False) -> _Eval:
    """Accuracy and joint NFE over batches of ``batch`` (and, with ``per_sample``, the per-sample NFE)."""
    import torch

    gen = torch.Generator(device=X.device).manual_seed(seed)  # the SDE's Brownian paths
    model.eval()
    hits: list[int] = []
    nfes: list[int] = []
    nfe_sample = 0.0
    with torch.no_grad():
        for i in range(0, len(y), batch):
            xb, yb = X[i : i + batch], y[i : i + batch]
            out = model(xb, generator=gen)
            hits += (out.logits.argmax(1) == yb).long().tolist()
            nfes.append(int(out.nfe_joint))
            if per_sample:
                model.per_sample = True
                try:
                    nfe_sample += float(model(xb, generator=gen).nfe.double().sum())
                finally:
                    model.per_sample = False
    model.train()
    return _Eval(sum(hits) / len(y), statistics.fmean(nfes), nfe_sample / len(y) if per_sample else None,
                 correct=hits, nfe_batches=nfes)


def train_one(ctx: RunContext[NeuralDEExperimentConfig], data: DEData, family: str, method: str, lam: float, seed: int,
              show_progress: bool = True) -> dict[str, Any]:
    """Train (or reuse) one model on ``cfg.device``; returns its record (validation metrics, training time and NFE,
    the device it was trained on)."""
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator

    from leanfit.core.device import configure_threads
    from leanfit.core.io import append_jsonl, atomic_save_tensors
    from leanfit.core.progress import progress_bar
    from leanfit.core.seed import derive_seed

    cfg = ctx.config
    arm: DEArmConfig = getattr(cfg, family)
    name = f"{family}-{method}-lam{lam:g}-s{seed}"
    subrun = ctx.run.subrun(name)
    if (done := subrun.stored()) is not None:
        return done
    sub = subrun.path
    (sub / "metrics.jsonl").unlink(missing_ok=True)
    configure_threads(cfg.threads, small_workload=True)  # again: joblib workers start with torch's default
    device = resolve_device(cfg.device)
    torch.manual_seed(derive_seed(seed, family, "init"))  # the same start for every arm of a seed
    model = build_model(family, cfg, data)
    acc = Accelerator(cpu=device.type == "cpu")
    optimizer = torch.optim.Adam(model.parameters(), lr=arm.lr)
    model, optimizer = acc.prepare(model, optimizer)
    device = acc.device
    X, y = (t.to(device) for t in data.train)
    val = tuple(t.to(device) for t in data.val)
    batches = torch.Generator().manual_seed(derive_seed(seed, family, "batches"))  # the same batches for every arm
    draws = torch.Generator(device=device).manual_seed(derive_seed(seed, family, method, "draws"))
    regularizer = None if method == "vanilla" else method
    train_seconds, nfe_sum, order, pos = 0.0, 0, torch.randperm(len(y), generator=batches), 0
    with progress_bar(arm.steps, name, enabled=show_progress) as bar:
        for step in range(arm.steps):
            if pos + arm.batch_size > len(y):
                order, pos = torch.randperm(len(y), generator=batches), 0
            idx = order[pos : pos + arm.batch_size][acc.process_index :: acc.num_processes]  # this process's shard
            pos += arm.batch_size
            began = time.perf_counter()
            out = model(X[idx], regularizer=regularizer, generator=draws)
            task = F.cross_entropy(out.logits, y[idx])
            lam_t = lam * cfg.lambda_decay ** (1 - step / max(arm.steps - 1, 1))
            loss = task if out.reg is None else task + lam_t * out.reg
            optimizer.zero_grad(set_to_none=True)
            acc.backward(loss)
            optimizer.step()
            synchronize(device)
            seconds = time.perf_counter() - began
            train_seconds += seconds
            nfe_sum += out.nfe_joint + out.reg_nfe
            record = {"step": step + 1, "loss": loss.item(), "task_loss": task.item(),
                      "reg": None if out.reg is None else out.reg.item(), "nfe_joint": out.nfe_joint,
                      "reg_nfe": out.reg_nfe, "seconds": seconds}
            if (step + 1) % arm.eval_every == 0 or step + 1 == arm.steps:
                ev = evaluate(acc.unwrap_model(model), *val, cfg.eval_batch, derive_seed(seed, "val"))
                record.update(val_accuracy=ev.accuracy, val_nfe_joint=ev.nfe_joint)
            if ctx.is_main:
                append_jsonl(sub / "metrics.jsonl", record)
            bar.advance(1, loss=record["task_loss"], nfe=out.nfe_joint)
    model = acc.unwrap_model(model)
    final = evaluate(model, *val, cfg.eval_batch, derive_seed(seed, "val"))
    result = {"name": name, "family": family, "method": method, "lambda": lam, "seed": seed,
              "val_accuracy": final.accuracy, "val_nfe_joint": final.nfe_joint, "train_seconds": train_seconds,
              "train_nfe_per_step": nfe_sum / arm.steps, "train_device": device_name(device),
              "train_jobs": cfg.workers()}
    if ctx.is_main:
        atomic_save_tensors(sub / "model.safetensors", {k: v.detach() for k, v in model.state_dict().items()})
    subrun.store(result)
    acc.wait_for_everyone()  # the other processes read these files next
    return result


def load_trained(ctx: RunContext[NeuralDEExperimentConfig], family: str, data: DEData, name: str, device: Any = "cpu") -> Any:
    from safetensors.torch import load_file

    model = build_model(family, ctx.config, data)
    model.load_state_dict(load_file(str(ctx.run.path / "runs" / name / "model.safetensors")))
    return model.to(device).eval()


def _train_job(ctx: RunContext[NeuralDEExperimentConfig], data: DEData, family: str, job: tuple[str, float, int],
               show_progress: bool = False) -> dict[str, Any]:
    """One ``(method, lambda, seed)`` model (module level, so that it pickles into a joblib worker)."""
    return train_one(ctx, data, family, *job, show_progress=show_progress)


def train_many(ctx: RunContext[NeuralDEExperimentConfig], data: DEData, family: str,
               jobs: list[tuple[str, float, int]]) -> dict[tuple[str, float, int], dict[str, Any]]:
    """Train (or reuse) every ``(method, lambda, seed)`` of ``jobs``; ``cfg.workers()`` of them at once."""
    from functools import partial

    from leanfit.core.parallel import run_jobs

    cfg = ctx.config
    records = run_jobs(partial(_train_job, ctx, data, family), jobs, **cfg.job_options(),
                       desc=f"{family}: {len(jobs)} models, {cfg.workers()} at once",
                       serial_fn=partial(_train_job, ctx, data, family, show_progress=True),
                       postfix=lambda r: {"last": r["name"], "val_acc": r["val_accuracy"]})
    return dict(zip(jobs, records, strict=True))


def run_family(ctx: RunContext[NeuralDEExperimentConfig], data: DEData, family: str) -> list[dict[str, Any]]:
    """Sweep lambda on the first seed, train the chosen lambda on every seed; returns the trained records.

    Two rounds of independent models (run ``cfg.workers()`` at a time): every seed's vanilla with the first seed's
    sweep, then the chosen lambdas on the other seeds."""
    from leanfit.core.stats import choose_within_drop

    cfg = ctx.config
    arm: DEArmConfig = getattr(cfg, family)
    first, methods = cfg.seeds[0], [m for m in arm.methods if m != "vanilla"]
    grid = {m: [arm.method_lambdas[m]] if m in arm.method_lambdas else arm.lambdas for m in methods}
    first_round = [("vanilla", 0.0, s) for s in cfg.seeds] + [(m, lam, first) for m in methods for lam in grid[m]]
    done = train_many(ctx, data, family, first_round)
    records = [done[("vanilla", 0.0, s)] for s in cfg.seeds]
    chosen = {}
    for method in methods:
        sweep = [done[(method, lam, first)] for lam in grid[method]]
        # the fewest validation NFE among the lambdas within max_acc_drop of vanilla's validation accuracy
        best = choose_within_drop(sweep, score=lambda r: r["val_accuracy"], cost=lambda r: r["val_nfe_joint"],
                                  baseline=done[("vanilla", 0.0, first)]["val_accuracy"],
                                  max_drop_points=cfg.max_acc_drop, tiebreak=lambda r: r["lambda"])
        chosen[method] = {**best, "sweep": [{k: r[k] for k in ("lambda", "val_accuracy", "val_nfe_joint")}
                                            for r in sweep]}
    second_round = [(m, chosen[m]["lambda"], s) for m in methods for s in cfg.seeds[1:]]
    done.update(train_many(ctx, data, family, second_round))
    for method in methods:
        records.append(chosen[method])
        records += [done[(method, chosen[method]["lambda"], s)] for s in cfg.seeds[1:]]
    return records


def score(ctx: RunContext[NeuralDEExperimentConfig], data: DEData, family: str, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Test metrics of every trained model (scored once) and their prediction times, timed interleaved."""
    import torch

    from leanfit.core.progress import progress_bar
    from leanfit.core.seed import derive_seed

    cfg = ctx.config
    device = resolve_device(cfg.device)
    X, y = (t.to(device) for t in data.test)
    models = {r["name"]: load_trained(ctx, family, data, r["name"], device) for r in records}
    rows = []
    for r in records:
        ev = evaluate(models[r["name"]], X, y, cfg.eval_batch, derive_seed(r["seed"], "test"), per_sample=True)
        rows.append({**{k: v for k, v in r.items() if k != "sweep"}, "test_accuracy": ev.accuracy,
                     "test_nfe_joint": ev.nfe_joint, "test_nfe_sample": ev.nfe_sample,
                     "test_correct": ev.correct, "test_nfe_batches": ev.nfe_batches})
    times: dict[str, list[float]] = {name: [] for name in models}
    gen = torch.Generator(device=device)
    with progress_bar(cfg.timing_repeats + 1, f"{family} prediction timing") as bar, torch.no_grad():
        for rnd in range(cfg.timing_repeats + 1):  # round 0 warms up
            for name, model in models.items():
                gen.manual_seed(0)
                synchronize(device)
                began = time.perf_counter()
                for i in range(0, len(y), cfg.eval_batch):
                    model(X[i : i + cfg.eval_batch], generator=gen)
                synchronize(device)
                if rnd:
                    times[name].append(time.perf_counter() - began)
            bar.advance(1)
    for row in rows:
        row["predict_seconds"] = statistics.median(times[row["name"]])
    by_seed = {r["seed"]: r for r in rows if r["method"] == "vanilla"}
    for row in rows:
        base = by_seed[row["seed"]]
        for key in ("test_nfe_joint", "test_nfe_sample", "predict_seconds", "train_seconds"):
            row[f"{key}_ratio"] = row[key] / base[key]
        row["accuracy_drop_points"] = 100 * (base["test_accuracy"] - row["test_accuracy"])
    return rows


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sd over seeds per (family, method)."""
    keys = ("test_accuracy", "accuracy_drop_points", "test_nfe_joint", "test_nfe_joint_ratio", "test_nfe_sample",
            "test_nfe_sample_ratio", "predict_seconds", "predict_seconds_ratio", "train_seconds",
            "train_seconds_ratio", "train_nfe_per_step")
    out = []
    for family in dict.fromkeys(r["family"] for r in rows):
        for method in dict.fromkeys(r["method"] for r in rows if r["family"] == family):
            sub = [r for r in rows if r["family"] == family and r["method"] == method]
            entry: dict[str, Any] = {"family": family, "method": method, "lambda": sub[0]["lambda"], "seeds": len(sub)}
            for k in keys:
                vals = [float(r[k]) for r in sub]
                entry[f"{k}_mean"] = statistics.fmean(vals)
                entry[f"{k}_sd"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
            out.append(entry)
    return out


def targets(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, each checked against the ODE summary (mean over seeds)."""
    ode = {s["method"]: s for s in summary if s["family"] == "ode"}
    checks = []
    for m, s in ode.items():
        if m == "vanilla":
            continue
        checks.append({"method": m, "nfe_ratio<=0.60": s["test_nfe_joint_ratio_mean"] <= 0.60,
                       "acc_drop<=0.3": s["accuracy_drop_points_mean"] <= 0.3,
                       "predict_speedup>=1.9": 1 / s["predict_seconds_ratio_mean"] >= 1.9,
                       "train_time<=vanilla": s["train_seconds_ratio_mean"] <= 1.0})
    if "global" in ode:
        g = ode["global"]
        for m in ("local_unbiased", "local_biased", "local_taken", "local_sample", "local_subset"):
            if m in ode:
                s = ode[m]
                checks.append({"method": f"{m} vs global",
                               "nfe_within_5%": s["test_nfe_joint_mean"] <= 1.05 * g["test_nfe_joint_mean"],
                               "train_time_lower": s["train_seconds_mean"] < g["train_seconds_mean"]})
    return checks


# --- report -------------------------------------------------------------------------------------------------------
_COLUMNS = ["method", "lambda", "test_accuracy", "accuracy_drop_points", "test_nfe_joint", "test_nfe_joint_ratio",
            "test_nfe_sample", "predict_seconds", "predict_seconds_ratio", "train_seconds", "train_seconds_ratio"]


def _table(summary: list[dict[str, Any]], family: str) -> list[dict[str, Any]]:
    rows = []
    for s in summary:
        if s["family"] != family:
            continue
        row: dict[str, Any] = {"method": s["method"], "lambda": s["lambda"]}
        for c in _COLUMNS[2:]:
            scale = 100 if c == "test_accuracy" else 1
            row[c] = f"{scale * s[c + '_mean']:.4g} ± {scale * s[c + '_sd']:.2g}"
        rows.append(row)
    return rows


def report(run: RunDir, results: dict[str, Any]) -> Report:
    from leanfit.core.report import Report

    rep = Report("neural-de: local vs global error regularisation")
    rep.text(results.get("headline", ""))
    rep.text("Mean ± sd over seeds; ratios are to vanilla of the same seed. test_nfe_joint: calls of the vector "
             "field per test batch with one joint error norm (the paper's definition); test_nfe_sample: mean "
             "per-sample NFE with per-sample step control; times in seconds (prediction: whole test set, median "
             "of warm repeats; training: the optimiser steps only).")
    if "device" in results:
        trained = sorted({r.get("train_device", "cpu") for r in results.get("rows", [])})
        rep.text(f"Trained on {', '.join(trained) or results['device']} ({results['jobs']} model(s) at a time"
                 f"{'; training times measured under that load' if results['jobs'] > 1 else ''}); scored and "
                 f"prediction-timed on {results['device']}.")
    summary = results.get("summary", [])
    for family, title in (("ode", "Neural ODE"), ("sde", "Neural SDE")):
        if any(s["family"] == family for s in summary):
            rep.section(title).table(_table(summary, family), _COLUMNS)
            _plots(run, results, family)
            rep.figure(f"plots/{family}_nfe_training.png", f"{title}: NFE of the main solve per training step "
                       "(mean over seeds, smoothed)")
            rep.figure(f"plots/{family}_acc_vs_nfe.png", f"{title}: test accuracy against test NFE (per seed)")
    if results.get("contrasts"):
        report_section(rep, run, results)
    if results.get("targets"):
        rep.section("Targets (neural ODE)").table(results["targets"])
    if results.get("sweeps"):
        rep.section("Lambda sweeps (first seed, validation)")
        fixed = {fam: arm.get("method_lambdas") for fam, arm in run.read_config().get("config", {}).items()
                 if isinstance(arm, dict) and arm.get("method_lambdas")}
        for fam, lams in fixed.items():
            rep.text(f"{fam}: lambda fixed per method by the config, not chosen here (method_lambdas: "
                     + ", ".join(f"{m} {lam:g}" for m, lam in lams.items()) + "); only those lambdas were trained.")
        rep.table(results["sweeps"])
    return rep


def _plots(run: RunDir, results: dict[str, Any], family: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from leanfit.core.io import read_jsonl
    from leanfit.core.report import save_figure

    rows = [r for r in results["rows"] if r["family"] == family]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, ax = plt.subplots(figsize=(7.0, 4.4), dpi=110)
    for i, m in enumerate(methods):
        curves = [[x["nfe_joint"] for x in read_jsonl(run.path / "runs" / r["name"] / "metrics.jsonl")]
                  for r in rows if r["method"] == m]
        n = min(len(c) for c in curves)
        mean = np.mean([c[:n] for c in curves], axis=0)
        w = max(1, n // 30)
        smooth = np.convolve(mean, np.ones(w) / w, mode="valid")
        ax.plot(np.arange(len(smooth)) + w, smooth, color=f"C{i}", label=m)
    ax.set(xlabel="training step", ylabel="NFE per step (main solve, joint)", title=f"{family}: NFE during training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, run.plots_dir / f"{family}_nfe_training.png")

    fig, ax = plt.subplots(figsize=(6.0, 4.4), dpi=110)
    for i, m in enumerate(methods):
        sub = [r for r in rows if r["method"] == m]
        ax.scatter([r["test_nfe_joint"] for r in sub], [100 * r["test_accuracy"] for r in sub], color=f"C{i}",
                   label=m, s=18)
    ax.set(xlabel="test NFE per batch (joint)", ylabel="test accuracy (%)", title=f"{family}: accuracy vs NFE")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, run.plots_dir / f"{family}_acc_vs_nfe.png")


def _headline(summary: list[dict[str, Any]]) -> str:
    parts = []
    for s in summary:
        if s["method"] == "vanilla":
            parts.append(f"{s['family']} vanilla: accuracy {100 * s['test_accuracy_mean']:.2f}%, NFE "
                         f"{s['test_nfe_joint_mean']:.1f}")
        else:
            parts.append(f"{s['family']} {s['method']}: NFE x{s['test_nfe_joint_ratio_mean']:.3f}, accuracy "
                         f"{-s['accuracy_drop_points_mean']:+.2f} pts, prediction x"
                         f"{1 / s['predict_seconds_ratio_mean']:.2f} faster, training x"
                         f"{s['train_seconds_ratio_mean']:.2f} time")
    return "; ".join(parts)


@register("neural-de", kind="experiment", description="local vs global error regularisation of neural ODEs/SDEs "
          "(digits; MNIST-5k in the full preset)", config_cls=NeuralDEExperimentConfig, presets=PRESETS,
          report=report)
def run(ctx: RunContext[NeuralDEExperimentConfig]) -> dict[str, Any]:
    from leanfit.core.device import configure_threads

    cfg = ctx.config
    threads = configure_threads(cfg.threads, small_workload=True)
    data = load_data(cfg)
    rows, sweeps = [], []
    for family in ("ode", "sde"):
        if not getattr(cfg, family).enabled:
            continue
        records = run_family(ctx, data, family)
        sweeps += [{"family": family, "method": r["method"], **s, "chosen": s["lambda"] == r["lambda"]}
                   for r in records if "sweep" in r for s in r["sweep"]]
        if ctx.is_main:  # scored and timed in one process (concurrent timings would measure each other)
            rows += score(ctx, data, family, records)
    summary = summarise(rows)
    return {"dataset": cfg.dataset, "splits": data.sizes(),
            "threads": threads, "device": device_name(resolve_device(cfg.device)), "jobs": cfg.workers(), "rows": rows,
            "summary": summary, "targets": targets(summary), "sweeps": sweeps, "headline": _headline(summary),
            "contrasts": contrasts(rows)}
