"""The ablation between the paper's local regulariser and leanfit's ``local_taken``: which change earns which effect.

``local_taken`` differs from the paper's ``local_unbiased`` in four ways: (a) the first stage ``k_1`` is
differentiated instead of a constant, (b) the step is the one the solver took instead of the automatic initial step,
(c) one point and error norm per sample instead of one per batch, (d) the step starts at the recorded start of the
solver's step instead of at ``u(t_r)``. The arms between them change one thing at a time
(:data:`~leanfit.neural_de.models.REGULARIZER_PRESETS`), and :data:`CONTRASTS` names the pairs that isolate each
change. (b) is compared from the step start on both sides, so (d) is measured apart from it.

Each contrast is an arm against its reference, both at their own lambda chosen on validation, scored on the same
test items with the same training seeds: the accuracy difference (points) is bootstrapped over seeds and test items
together (two-way, :func:`leanfit.core.stats.paired_bootstrap_ci`), the relative change of the joint test NFE over
seeds and test batches. Every regularised arm is also contrasted with vanilla.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from leanfit.core.report import Report
    from leanfit.core.runs import RunDir

__all__ = ["ABLATION_METHODS", "CONTRASTS", "contrasts", "report_section"]

ABLATION_METHODS = ("vanilla", "global", "local_unbiased", "local_start", "local_start_k1", "local_taken_const_batch",
                    "local_taken_batch", "local_taken")

# (what the pair isolates, arm, reference arm): each pair differs in that one change only
CONTRASTS = (
    ("(d) step start instead of u(t_r)", "local_start", "local_unbiased"),
    ("(a) k_1 differentiated, initial step", "local_start_k1", "local_start"),
    ("(a) k_1 differentiated, taken step", "local_taken_batch", "local_taken_const_batch"),
    ("(b) taken instead of initial step, k_1 constant", "local_taken_const_batch", "local_start"),
    ("(b) taken instead of initial step, k_1 differentiated", "local_taken_batch", "local_start_k1"),
    ("(c) one point per sample instead of per batch", "local_taken", "local_taken_batch"),
    ("(a-d) all four: local_taken against the paper's", "local_taken", "local_unbiased"),
)

_N_BOOT = 2000


def _paired(rows: list[dict[str, Any]], arm: str, ref: str) -> dict[str, Any] | None:
    """Accuracy difference (points) and relative joint-NFE change of ``arm`` against ``ref`` over the seeds both
    have, with 95% bootstrap intervals; None when either arm is missing."""
    import numpy as np

    from leanfit.core.stats import paired_bootstrap_ci

    by = {(r["method"], r["seed"]): r for r in rows}
    seeds = sorted(s for (m, s) in by if m == arm and (ref, s) in by)
    if not seeds:
        return None
    a, b = [by[(arm, s)] for s in seeds], [by[(ref, s)] for s in seeds]
    acc = paired_bootstrap_ci(np.array([r["test_correct"] for r in a]), np.array([r["test_correct"] for r in b]),
                              n_boot=_N_BOOT)
    nfe = paired_bootstrap_ci(np.array([r["test_nfe_batches"] for r in a]),
                              np.array([r["test_nfe_batches"] for r in b]), effect="relative", n_boot=_N_BOOT)
    return {"arm": arm, "reference": ref, "lambda": a[0]["lambda"], "reference_lambda": b[0]["lambda"],
            "seeds": len(seeds), "accuracy_diff_points": 100 * acc.estimate, "accuracy_ci_low": 100 * acc.low,
            "accuracy_ci_high": 100 * acc.high, "nfe_change": nfe.estimate, "nfe_ci_low": nfe.low,
            "nfe_ci_high": nfe.high}


def contrasts(rows: list[dict[str, Any]], family: str = "ode") -> list[dict[str, Any]]:
    """Every regularised arm against vanilla, then the isolating pairs of :data:`CONTRASTS` present in ``rows``."""
    fam = [r for r in rows if r["family"] == family]
    methods = [m for m in dict.fromkeys(r["method"] for r in fam) if m != "vanilla"]
    pairs = [(f"{m} against vanilla", m, "vanilla") for m in methods] + list(CONTRASTS)
    out = []
    for what, arm, ref in pairs:
        found = _paired(fam, arm, ref)
        if found is not None:
            out.append({"contrast": what, **found})
    return out


def _fmt_ci(est: float, low: float, high: float, scale: float = 1.0, unit: str = "") -> str:
    return f"{scale * est:+.2f}{unit} [{scale * low:+.2f}, {scale * high:+.2f}]"


def report_section(rep: Report, run: RunDir, results: dict[str, Any]) -> None:
    """The contrast table (95% intervals) and the figures: the lambda sweeps and the contrasts' intervals."""
    rows = [{"contrast": c["contrast"], "lambda (arm / ref)": f"{c['lambda']:g} / {c['reference_lambda']:g}",
             "test accuracy, points [95% CI]": _fmt_ci(c["accuracy_diff_points"], c["accuracy_ci_low"],
                                                       c["accuracy_ci_high"]),
             "test NFE change, % [95% CI]": _fmt_ci(c["nfe_change"], c["nfe_ci_low"], c["nfe_ci_high"], 100, "%"),
             "seeds": c["seeds"]} for c in results["contrasts"]]
    rep.section("Ablation: which change earns which effect (neural ODE)")
    rep.text("Each row is an arm against its reference, both at their own validation-chosen lambda, on the same "
             "seeds and test items. Accuracy: difference in points, 95% percentile bootstrap over seeds and test "
             "items (two-way, paired). NFE: relative change of the joint test NFE per batch, bootstrap over seeds "
             "and test batches. (a) k_1 differentiated, (b) the step the solver took, (c) one point per sample, "
             "(d) stepping from the recorded step start; each lettered row changes that one thing.")
    rep.table(rows)
    _sweep_plot(run, results)
    rep.figure("plots/ode_lambda_sweep.png", "Validation accuracy and NFE against lambda (first seed), per arm")
    _contrast_plot(run, results["contrasts"])
    rep.figure("plots/ode_contrasts.png", "Contrasts with 95% bootstrap intervals")


def _sweep_plot(run: RunDir, results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from leanfit.core.report import save_figure

    sweeps = [s for s in results.get("sweeps", []) if s["family"] == "ode"]
    base = next((r for r in results["rows"] if r["family"] == "ode" and r["method"] == "vanilla"
                 and r["seed"] == min(x["seed"] for x in results["rows"])), None)
    fig, axes = plt.subplots(1, 2, figsize=(11.0, 4.2), dpi=110)
    for i, m in enumerate(dict.fromkeys(s["method"] for s in sweeps)):
        pts = sorted((s["lambda"], s["val_accuracy"], s["val_nfe_joint"]) for s in sweeps if s["method"] == m)
        lams = [p[0] for p in pts]
        axes[0].plot(lams, [100 * p[1] for p in pts], "o-", color=f"C{i}", label=m, ms=3)
        axes[1].plot(lams, [p[2] for p in pts], "o-", color=f"C{i}", label=m, ms=3)
    if base is not None:
        axes[0].axhline(100 * base["val_accuracy"], color="k", ls="--", lw=1, label="vanilla")
        axes[1].axhline(base["val_nfe_joint"], color="k", ls="--", lw=1, label="vanilla")
    for ax, label in zip(axes, ("validation accuracy (%)", "validation NFE per batch (joint)"), strict=True):
        ax.set(xscale="log", xlabel="lambda", ylabel=label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    save_figure(fig, run.plots_dir / "ode_lambda_sweep.png")


def _contrast_plot(run: RunDir, found: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from leanfit.core.report import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(12.0, 0.45 * len(found) + 1.5), dpi=110, sharey=True)
    ys = list(range(len(found)))[::-1]
    for ax, key, scale, label in ((axes[0], "accuracy", 1.0, "test accuracy difference (points)"),
                                  (axes[1], "nfe", 100.0, "test NFE change (%)")):
        est = [scale * c[f"{key}_diff_points" if key == "accuracy" else "nfe_change"] for c in found]
        low = [scale * c[f"{key}_ci_low"] for c in found]
        high = [scale * c[f"{key}_ci_high"] for c in found]
        ax.errorbar(est, ys, xerr=[[e - lo for e, lo in zip(est, low, strict=True)],
                                   [h - e for e, h in zip(est, high, strict=True)]], fmt="o", ms=4, capsize=3)
        ax.axvline(0, color="k", lw=1)
        ax.set(xlabel=label)
        ax.grid(alpha=0.3)
    axes[0].set_yticks(ys, [c["contrast"] for c in found], fontsize=7)
    save_figure(fig, run.plots_dir / "ode_contrasts.png")
