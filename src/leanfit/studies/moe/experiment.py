"""``leanfit run topk-moe``: a simulation study of the parameter rates of the top-K sparse softmax-gated Gaussian MoE
(arXiv 2309.13850).

Truth: k* = 3 experts, K = 2, d = 1, X ~ U[-1, 1], well-separated parameters (``TRUTH``). Two settings:

- ``exact``: fit k = 3 experts with top-2 gating; loss D1 (theory: every parameter at n^-1/2 up to logs);
- ``over``: fit k = 4 experts with top-3 gating (one true expert's Voronoi cell holds two fitted atoms, so the gate
  must keep 2 + 1 experts where the truth keeps 2); loss D2 (theory: n^-1/2), while inside the doubled cell
  ``beta_1`` and ``b`` converge at n^-1/8 and ``a`` and ``sigma`` at n^-1/4 (rbar(2) = 4), singletons at n^-1/2.

  The over-specified model contains the truth only if the doubled expert is among the true top-K everywhere, with
  its gate logit more than log 2 above every expert outside the top-K (each of the two atoms carries half its weight,
  so each atom's logit is log 2 lower, and both must still be kept): where the truth keeps two singleton experts, a
  top-3 gate must keep a third atom whose weight cannot vanish with finite parameters. Expert 1 of ``TRUTH`` has a
  margin of at least 1 on [-1, 1], so it is the one split (``split_expert``); other choices are refused. (With a
  margin below log 2 near x = 0, as an earlier version of ``TRUTH`` had, the over-specified fits end below the
  truth's likelihood by an amount growing with n: the model cannot represent the truth there.)

Every fit starts from the truth perturbed by Gaussian noise of a fixed scale (``init_noise``, the same at every n, so
the start does not do the converging); in ``over`` the split expert's two atoms start with half its weight each.
A fit that ends below the truth's log-likelihood on its own data is certainly not the MLE the theory is about (an MLE
scores at least the truth), so with ``refit_from_truth`` (default) it is fitted again from the unperturbed truth and
the better of the two is kept; ECM never lowers the likelihood, so the kept fit reaches the truth. Both fractions are
reported: ``reached_truth_first`` (the perturbed start alone, the optimiser's own success rate) and
``reached_truth`` (after the refit). Reported: slopes of log mean loss and log mean per-parameter errors against
log n, with 95% CIs from a bootstrap over replications, and those fractions.

Single starts: each replication also fits ``single_starts`` models from the estimator's own start (``init`` =
``single_start_init``, by default the estimator's default ``"random"``; its default ``tol``, ``param_tol`` and
``max_iter``; ``n_init=1``: what a user gets from one start, not knowing the truth) and reports the fraction that
reach the truth's log-likelihood (``single_start_success``, the same threshold as ``reached_truth``). The estimator's
default ``n_init=5`` keeps the best of five such starts, which hides how often one start alone ends in a worse local
optimum. These fits do not enter the rates; their time is ``single_seconds``, apart from the rate fit's ``seconds``.

Fits run in parallel through joblib: ``backend=loky`` (processes on this machine, the default), ``threading``,
``dask`` (a ``dask.distributed`` cluster at ``scheduler_address``, or a local one) or ``ray``. Each finished fit is
appended to ``fits.jsonl``, so ``--resume`` continues where an interrupted study stopped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from leanfit.core.config import option
from leanfit.core.errors import ConfigError
from leanfit.core.parallel import JobsConfig
from leanfit.core.registry import register

if TYPE_CHECKING:
    from leanfit.core.report import Report
    from leanfit.core.runner import RunContext
    from leanfit.core.runs import RunDir

__all__ = ["SETTINGS", "THEORY", "TRUTH", "TopKMoEStudyConfig", "fit_one", "rate_slope"]

TRUTH = {"gate_coef": [[-6.0], [-3.0], [0.0]], "gate_intercept": [0.0, 1.0, 0.0], "coef": [[2.0], [-1.0], [2.0]],
         "intercept": [1.5, 0.0, -1.5], "var": [0.09, 0.09, 0.09]}
TRUE_TOP_K = 2
SETTINGS = {"exact": {"n_experts": 3, "top_k": 2, "kind": "exact"}, "over": {"n_experts": 4, "top_k": 3, "kind": "over"}}
# slopes of log error against log n predicted by the theory (logarithmic factors ignored)
THEORY = {
    "exact": {"loss": -0.5, "gate_coef": -0.5, "coef": -0.5, "intercept": -0.5, "var": -0.5, "weight": -0.5},
    "over": {"loss": -0.5, "split_gate_coef": -1 / 8, "split_intercept": -1 / 8, "split_coef": -1 / 4,
             "split_var": -1 / 4, "single_gate_coef": -0.5, "single_coef": -0.5, "single_intercept": -0.5,
             "single_var": -0.5, "weight": -0.5},
}
_PARAMS = ("gate_coef", "coef", "intercept", "var")


@dataclass
class TopKMoEStudyConfig(JobsConfig):
    thread_safe = True  # each fit draws from its own numpy generator
    ns: list[int] = option(default_factory=lambda: [1000, 1931, 3728, 7197, 13895, 26827, 51795, 100000],
                           help="sample sizes (log-spaced)")
    replications: int = option(20, help="independent data sets per sample size and setting")
    settings: list[str] = option(default_factory=lambda: ["exact", "over"], help="'exact' and/or 'over'")
    split_expert: int = option(1, help="true expert whose cell holds two fitted atoms in the 'over' setting (must be "
                                          "in the true top-K everywhere)")
    init_noise: float = option(0.1, help="std of the Gaussian perturbation of the start (the same at every n)")
    refit_from_truth: bool = option(True, help="refit a fit that ends below the truth's log-likelihood from the "
                                    "unperturbed truth and keep the better")
    max_iter: int = option(1000, help="ECM iterations per fit")
    tol: float = option(1e-8, help="ECM tolerance on the mean log-likelihood gain per iteration")
    param_tol: float = option(3e-4, help="ECM tolerance on the relative parameter change per iteration (both must "
                              "fall below their tolerance to stop; inf: the gain alone)")
    single_starts: int = option(1, help="fits per replication from the estimator's own start (its defaults, "
                                "n_init=1), to measure single-start success (0: none)")
    single_start_init: str = option("random", help="the estimator's init for the single starts: random (its "
                                    "default), dense or kmeans")
    bootstrap: int = option(2000, help="bootstrap resamples of the replications for slope CIs")
    jobs: int = option(-1, help="fits at once (joblib workers; -1: one per core, -2: all cores but one, 1: one at a "
                       "time in this process)")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, where: str = "") -> TopKMoEStudyConfig:
        """As :meth:`BaseConfig.from_dict`; ``n_jobs``, this knob's earlier name (in the configs of committed runs),
        is read as ``jobs``."""
        if isinstance(values, Mapping) and "n_jobs" in values:
            if "jobs" in values:
                raise ConfigError("jobs and n_jobs are both given: n_jobs is the old name of jobs; keep jobs only")
            values = {("jobs" if k == "n_jobs" else k): v for k, v in values.items()}
        return super().from_dict(values, where=where)

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = sorted(set(self.settings) - set(SETTINGS))
        if unknown or not self.settings:
            raise ValueError(f"settings={self.settings} is invalid: expected a non-empty subset of {sorted(SETTINGS)}")
        if min(self.ns, default=0) < 50:
            raise ValueError(f"ns={self.ns} is invalid: expected sample sizes >= 50")
        if self.single_starts < 0:
            raise ValueError(f"single_starts={self.single_starts} is invalid: expected an integer >= 0")
        if self.single_start_init not in ("random", "dense", "kmeans"):
            raise ValueError(f"single_start_init={self.single_start_init!r} is invalid: expected random, dense or "
                             "kmeans")
        if self.replications < 2:
            raise ValueError(f"replications={self.replications} is invalid: slopes need >= 2 replications per n")
        always = always_selected(TRUTH, TRUE_TOP_K, margin=math.log(2.0))
        if self.split_expert not in always:
            raise ValueError(f"split_expert={self.split_expert} is invalid: the over-specified model contains the truth "
                             f"only if the split expert's gate logit exceeds every expert outside the true "
                             f"top-{TRUE_TOP_K} by more than log 2 for every x; expected one of {always}")


def always_selected(truth: dict[str, Any], top_k: int, margin: float = 0.0, grid: int = 20001) -> list[int]:
    """Experts in the top-K of ``truth``'s gate at every x of a fine grid of [-1, 1] (d = 1) whose logit exceeds every
    unselected expert's logit by more than ``margin`` there.

    Splitting such an expert into two atoms of half its weight each lowers each atom's logit by log 2, so with
    ``margin=log 2`` both atoms stay above every unselected expert and a top-(K+1) gate over k* + 1 experts
    reproduces the truth exactly; with a smaller margin the over-specified model does not contain the truth."""
    import numpy as np

    x = np.linspace(-1.0, 1.0, grid)[:, None]
    gate = np.hstack([np.asarray(truth["gate_coef"], float), np.asarray(truth["gate_intercept"], float)[:, None]])
    logits = np.hstack([x, np.ones_like(x)]) @ gate.T
    order = np.argsort(-logits, axis=1, kind="stable")
    best_unselected = np.take_along_axis(logits, order[:, top_k : top_k + 1], axis=1)[:, 0]
    selected = np.zeros_like(logits, dtype=bool)
    np.put_along_axis(selected, order[:, :top_k], True, axis=1)
    ok = selected & (logits - best_unselected[:, None] > margin)
    return [int(j) for j in np.flatnonzero(ok.all(axis=0))]


PRESETS = {
    "quick": {"ns": [1000, 3162, 10000], "replications": 6, "bootstrap": 500},
    "full": {},
}


# --- one fit (module level: it runs in joblib workers) -----------------------------------------------------------
def simulate(truth: dict[str, Any], n: int, seed: int) -> tuple[Any, Any]:
    """(X (n, d), y (n,)) drawn from the top-K MoE ``truth`` with X ~ U[-1, 1]^d."""
    import numpy as np

    from leanfit.moe.estimator import augment, log_gate, topk_mask

    rng = np.random.RandomState(seed % 2**32)
    d = len(truth["gate_coef"][0])
    X = rng.uniform(-1.0, 1.0, size=(n, d))
    params = _true_params(truth)
    Xa = augment(X)
    weights = np.exp(log_gate(Xa, params.gate, topk_mask(Xa, params.gate, TRUE_TOP_K, "full_logits")))
    expert = np.minimum((rng.uniform(size=(n, 1)) > weights.cumsum(1)).sum(1), len(params.var) - 1)
    y = (Xa * params.experts[expert]).sum(1) + rng.standard_normal(n) * np.sqrt(params.var[expert])
    return X, y


def _true_params(truth: dict[str, Any]) -> Any:
    import numpy as np

    from leanfit.moe.estimator import MoEParams

    gate = np.hstack([np.asarray(truth["gate_coef"], float), np.asarray(truth["gate_intercept"], float)[:, None]])
    experts = np.hstack([np.asarray(truth["coef"], float), np.asarray(truth["intercept"], float)[:, None]])
    return MoEParams(gate, experts, np.asarray(truth["var"], float))


def start_params(setting: str, noise: float, split_expert: int, seed: int) -> dict[str, Any]:
    """The truth (with ``split_expert`` split in two half-weight atoms for ``over``) plus N(0, noise^2) on every
    parameter; variances perturbed multiplicatively so they stay positive. ``noise=0`` gives the truth itself."""
    import numpy as np

    rng = np.random.RandomState(seed % 2**32)
    p = {key: np.asarray(value, dtype=float) for key, value in TRUTH.items()}
    if setting == "over":
        order = [split_expert] + list(range(len(p["var"])))
        p = {key: value[order].copy() for key, value in p.items()}
        p["gate_intercept"][[0, split_expert + 1]] -= math.log(2.0)
    out = {key: value + noise * rng.standard_normal(value.shape) for key, value in p.items()}
    out["var"] = p["var"] * np.exp(noise * rng.standard_normal(p["var"].shape))
    return {key: value.tolist() for key, value in out.items()}


def fit_one(task: dict[str, Any]) -> dict[str, Any]:
    """Simulate, fit from the perturbed truth, and score one replication."""
    import warnings

    import numpy as np

    from leanfit.moe.estimator import TopKGaussianMoE, augment, log_likelihood_terms
    from leanfit.moe.voronoi import per_parameter_errors, voronoi_loss

    setting = SETTINGS[task["setting"]]
    X, y = simulate(TRUTH, task["n"], task["data_seed"])
    truth_ll = float(log_likelihood_terms(augment(X), y, _true_params(TRUTH), TRUE_TOP_K, "full_logits")[1].mean())

    def fit(noise: float) -> Any:
        start = start_params(task["setting"], noise, task["split_expert"], task["init_seed"])
        model = TopKGaussianMoE(setting["n_experts"], setting["top_k"], init="given", init_params=start,
                                max_iter=task["max_iter"], tol=task["tol"], param_tol=task.get("param_tol", math.inf),
                                random_state=task["init_seed"] % 2**32)
        with warnings.catch_warnings(record=True):
            return model.fit(X, y)

    def reached(m: Any) -> bool:
        return bool(m.lower_bound_ >= truth_ll - 1e-12 * abs(truth_ll))

    began = time.perf_counter()
    singles = []
    for i in range(task.get("single_starts", 0)):  # the estimator's own start, one at a time
        with warnings.catch_warnings(record=True):
            single = TopKGaussianMoE(setting["n_experts"], setting["top_k"], n_init=1, init=task["single_start_init"],
                                     random_state=(task["single_seed"] + i) % 2**32).fit(X, y)
        singles.append(single)
    single_seconds = time.perf_counter() - began

    began = time.perf_counter()
    model = fit(task["init_noise"])
    first = reached(model)
    refit = task.get("refit_from_truth", True) and not first
    if refit:
        second = fit(0.0)
        model = second if second.lower_bound_ > model.lower_bound_ else model
    seconds = time.perf_counter() - began
    errors = per_parameter_errors(model, TRUTH)
    record = {key: task[key] for key in ("setting", "n", "rep")}
    record.update({"loss": voronoi_loss(model, TRUTH, kind=setting["kind"]), "loglik": float(model.lower_bound_),
                   "truth_loglik": truth_ll, "reached_truth_first": first, "refit": bool(refit),
                   "reached_truth": reached(model),
                   "converged": bool(model.converged_), "n_iter": int(model.n_iter_), "seconds": seconds,
                   "single_reached": [reached(m) for m in singles],
                   "single_gap": [float(m.lower_bound_) - truth_ll for m in singles],
                   "single_seconds": single_seconds,
                   "cell_sizes": [e["cell_size"] for e in errors],
                   "weight": max(e["weight"] for e in errors)})
    if task["setting"] == "exact":
        for name in _PARAMS:
            record[name] = max(e[name] for e in errors)
    else:
        split = [e for e in errors if e["cell_size"] == 2]
        single = [e for e in errors if e["cell_size"] == 1]
        for name in _PARAMS:
            record[f"split_{name}"] = split[0][name] if len(split) == 1 else float("nan")
            record[f"single_{name}"] = max((e[name] for e in single), default=float("nan"))
    return {key: (float(v) if isinstance(v, np.floating) else v) for key, v in record.items()}


def _tasks(cfg: TopKMoEStudyConfig, seed: int) -> list[dict[str, Any]]:
    from leanfit.core.seed import derive_seed

    tasks = []
    for setting in cfg.settings:
        for n in cfg.ns:
            for rep in range(cfg.replications):
                # the same data sets in both settings; the start depends on the replication only, not on n
                tasks.append({"setting": setting, "n": n, "rep": rep, "data_seed": derive_seed(seed, "data", n, rep),
                              "init_seed": derive_seed(seed, "init", setting, rep), "init_noise": cfg.init_noise,
                              "split_expert": cfg.split_expert, "max_iter": cfg.max_iter, "tol": cfg.tol,
                              "param_tol": cfg.param_tol, "refit_from_truth": cfg.refit_from_truth,
                              "single_starts": cfg.single_starts, "single_start_init": cfg.single_start_init,
                              "single_seed": derive_seed(seed, "single", setting, n, rep)})
    return tasks


# --- analysis -----------------------------------------------------------------------------------------------------
def rate_slope(fits: list[dict[str, Any]], key: str, n_boot: int, seed: int) -> Any:
    """Slope of log(mean over replications of ``key``) against log n with a 95% CI from resampling the replications
    at each n (:func:`leanfit.core.stats.slope_ci`), over the sample sizes with at least 2 finite, positive values;
    NaN where fewer than 2 sample sizes have them."""
    import numpy as np

    from leanfit.core.stats import ConfidenceInterval, slope_ci

    ns = sorted({f["n"] for f in fits})
    values = [np.asarray([f[key] for f in fits if f["n"] == n and np.isfinite(f[key])], dtype=float) for n in ns]
    keep = [i for i, v in enumerate(values) if len(v) >= 2 and (v > 0).all()]
    if len(keep) < 2:
        return ConfidenceInterval(float("nan"), float("nan"), float("nan"))
    return slope_ci([ns[i] for i in keep], [values[i] for i in keep], n_boot=n_boot, seed=seed)


def summarise(fits: list[dict[str, Any]], n_boot: int, seed: int) -> list[dict[str, Any]]:
    """One row per (setting, quantity): slope, CI, theory, and whether the CI covers the theory."""
    rows = []
    for setting, theory in THEORY.items():
        sub = [f for f in fits if f["setting"] == setting]
        if not sub:
            continue
        for key, expected in theory.items():
            slope, lo, hi = rate_slope(sub, key, n_boot, seed)
            rows.append({"setting": setting, "quantity": key, "slope": slope, "ci_lo": lo, "ci_hi": hi,
                         "ci_half_width": (hi - lo) / 2, "theory": expected,
                         "covers_theory": bool(lo <= expected <= hi), "off_theory": abs(slope - expected)})
    return rows


def _per_n(fits: list[dict[str, Any]]) -> list[dict[str, Any]]:
    import numpy as np

    rows = []
    for setting in SETTINGS:
        for n in sorted({f["n"] for f in fits if f["setting"] == setting}):
            sub = [f for f in fits if f["setting"] == setting and f["n"] == n]
            row = {"setting": setting, "n": n, "fits": len(sub)}
            for key in THEORY[setting]:
                row[f"mean_{key}"] = float(np.nanmean([f[key] for f in sub]))
            row["reached_truth"] = float(np.mean([f["reached_truth"] for f in sub]))
            row["reached_truth_first"] = float(np.mean([f.get("reached_truth_first", f["reached_truth"]) for f in sub]))
            singles = [hit for f in sub for hit in f.get("single_reached", [])]
            row["single_starts"] = len(singles)
            row["single_start_success"] = float(np.mean(singles)) if singles else None  # None: a NaN fails the run
            row["converged"] = float(np.mean([f["converged"] for f in sub]))
            row["mean_seconds"] = float(np.mean([f["seconds"] for f in sub]))
            row["mean_iterations"] = float(np.mean([f["n_iter"] for f in sub]))
            row["mean_single_seconds"] = float(np.mean([f.get("single_seconds", 0.0) for f in sub]))
            rows.append(row)
    return rows


def _single_start_success(fits: list[dict[str, Any]]) -> float | None:
    """Fraction of all single starts that reach the truth; None without any (a NaN would mark the run failed)."""
    singles = [hit for f in fits for hit in f.get("single_reached", [])]
    return sum(singles) / len(singles) if singles else None


def report(run: RunDir, results: dict[str, Any]) -> Report:
    from leanfit.core.report import Report

    rep = Report("Results")
    rep.text(results.get("headline", ""))
    for setting in SETTINGS:
        rows = [r for r in results["per_n"] if r["setting"] == setting]
        if not rows:
            continue
        _rate_plot(run.plots_dir / f"{setting}.png", setting, rows, results["slopes"])
        rep.figure(f"plots/{setting}.png", f"{setting}-specified: mean errors against n (log-log), fitted slopes "
                   "with 95% bootstrap CIs, theory slopes dashed")
    rep.section("Slopes").table(results["slopes"], ["setting", "quantity", "slope", "ci_lo", "ci_hi", "ci_half_width",
                                                    "theory", "covers_theory"])
    if results.get("single_start_success") is not None:  # runs with single_starts=0, and records from before it
        init = results.get("single_start_init", "random")
        rep.section("Single starts").text(
            "Fraction of fits from one start that reach the truth's log-likelihood on their data: "
            f"`single_start_success` from the estimator's own start (init={init!r}, its other defaults, n_init=1; "
            "the default n_init=5 keeps the best of five and hides this), `reached_truth_first` from the perturbed "
            "truth the rate fits start at.")
        rep.table(results["per_n"], ["setting", "n", "fits", "single_starts", "single_start_success",
                                     "reached_truth_first", "reached_truth"])
    rep.section("Per sample size").table(results["per_n"])
    return rep


def _rate_plot(path: Any, setting: str, rows: list[dict[str, Any]], slopes: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from leanfit.core.report import save_figure

    ns = np.asarray([r["n"] for r in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(10.5, 4.6), dpi=110)
    for i, key in enumerate(THEORY[setting]):
        ys = np.asarray([r[f"mean_{key}"] for r in rows])
        if not np.isfinite(ys).all() or (ys <= 0).any():
            continue
        s = next(x for x in slopes if x["setting"] == setting and x["quantity"] == key)
        color = f"C{i % 10}"
        ax.plot(ns, ys, "o-", color=color, ms=3,
                label=f"{key}: {s['slope']:.2f} [{s['ci_lo']:.2f}, {s['ci_hi']:.2f}] (theory {s['theory']:.3g})")
        anchor = math.exp(float(np.mean(np.log(ys)) - s["theory"] * np.mean(np.log(ns))))
        ax.plot(ns, anchor * ns ** s["theory"], "--", color=color, lw=0.8)
    ax.set(xscale="log", yscale="log", xlabel="n", ylabel="mean error over replications",
           title=f"top-K Gaussian MoE, {setting}-specified")
    ax.grid(alpha=0.3, which="both")
    # beside the axes: inside, the legend covers the curves of the larger errors
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="slope [95% CI] (theory)",
              title_fontsize=7)
    save_figure(fig, path)


def _headline(slopes: list[dict[str, Any]], fits: list[dict[str, Any]], init: str) -> str:
    parts = []
    for s in slopes:
        if s["quantity"] == "loss":
            name = "D1" if s["setting"] == "exact" else "D2"
            parts.append(f"{name} slope {s['slope']:.3f} [{s['ci_lo']:.3f}, {s['ci_hi']:.3f}] (theory -0.5)")
    for setting in sorted({f["setting"] for f in fits}):
        sub = [f for f in fits if f["setting"] == setting]
        first = sum(f.get("reached_truth_first", f["reached_truth"]) for f in sub) / len(sub)
        final = sum(f["reached_truth"] for f in sub) / len(sub)
        singles = [hit for f in sub for hit in f.get("single_reached", [])]
        alone = (f", {100 * sum(singles) / len(singles):.1f}% of {len(singles)} single starts from the estimator's "
                 f"own start (init={init!r})" if singles else "")
        parts.append(f"{setting}: {100 * first:.1f}% of {len(sub)} fits reach the truth's log-likelihood from the "
                     f"perturbed start, {100 * final:.1f}% after refits from the truth{alone}")
    return "; ".join(parts)


@register("topk-moe", kind="experiment", description="rates of the top-K sparse softmax-gated Gaussian MoE MLE "
          "(exact- and over-specified simulation study)", config_cls=TopKMoEStudyConfig, presets=PRESETS,
          report=report)
def run(ctx: RunContext[TopKMoEStudyConfig]) -> dict[str, Any]:
    from leanfit.core.io import append_jsonl, read_jsonl
    from leanfit.core.parallel import run_jobs

    cfg = ctx.config
    path = ctx.run.path / "fits.jsonl"
    done = read_jsonl(path) if (ctx.resume and path.exists()) else []
    if not ctx.resume:
        path.unlink(missing_ok=True)
    finished = {(f["setting"], f["n"], f["rep"]) for f in done}
    todo = [t for t in _tasks(cfg, ctx.seed) if (t["setting"], t["n"], t["rep"]) not in finished]
    todo.sort(key=lambda t: -t["n"])  # largest fits first keeps the workers busy to the end
    began = time.perf_counter()
    new = run_jobs(fit_one, todo, **cfg.job_options(),
                   desc="topk-moe fits", completed=len(done), on_result=lambda record: append_jsonl(path, record),
                   postfix=lambda r: {"size": r["n"], "setting": r["setting"], "loss": r["loss"]})
    fits = sorted([*done, *new], key=lambda f: (f["setting"], f["n"], f["rep"]))
    slopes = summarise(fits, cfg.bootstrap, ctx.seed)
    return {"slopes": slopes, "per_n": _per_n(fits), "fits": len(fits), "fit_seconds": time.perf_counter() - began,
            "reached_truth": sum(f["reached_truth"] for f in fits) / len(fits),
            "reached_truth_first": sum(f.get("reached_truth_first", f["reached_truth"]) for f in fits) / len(fits),
            "single_start_success": _single_start_success(fits), "single_start_init": cfg.single_start_init,
            "headline": _headline(slopes, fits, cfg.single_start_init)}
