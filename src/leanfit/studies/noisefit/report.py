"""Report of ``leanfit run noisefit``: summary tables with bootstrap CIs, per-metric bar charts and reliability
diagrams (pooled over seeds and test items)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from leanfit.core.report import Report
    from leanfit.core.runs import RunDir

__all__ = ["render_report"]

_LABELS = {
    "em_sft_known": "EM, known facts seen in SFT",
    "em_pretrain_only": "EM, known facts seen only in pretraining",
    "closed_set_accuracy_known": "closed-set accuracy, known facts",
    "hallucination_unknown": "hallucination rate, unknown facts",
    "confident_wrong_unknown": "confident-wrong rate, unknown facts",
    "abstain_unknown": "abstention rate, unknown facts",
    "ece": "ECE (15 bins), all test items",
    "brier": "Brier score, all test items",
}


def _cell(ci: list[float], scale: float = 1.0, digits: int = 1) -> str:
    est, lo, hi = (scale * v for v in ci)
    return f"{est:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _tables(summary: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    main, rel = [], []
    for s in summary:
        main.append({"arm": s["arm"], "setting": s["setting"] or "-",
                     **{_LABELS[k]: _cell(s[k], 100 if k not in ("ece", "brier") else 1,
                                          1 if k not in ("ece", "brier") else 3) for k in _LABELS},
                     "step time (ms)": f"{1e3 * s['step_seconds']:.1f}"})
        if s["arm"] != "sft":
            rel.append({"arm": s["arm"], **{_LABELS[k]: _cell(s[f"{k}_rel_vs_sft"], 100)
                                            for k in _LABELS if f"{k}_rel_vs_sft" in s}})
    return main, rel


def _bars(path: Any, summary: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from leanfit.core.report import save_figure

    keys = list(_LABELS)
    fig, axes = plt.subplots(2, 4, figsize=(15, 6.5), dpi=100)
    arms = [s["arm"] for s in summary]
    for ax, key in zip(axes.ravel(), keys, strict=True):
        est = [s[key][0] for s in summary]
        err = [[s[key][0] - s[key][1] for s in summary], [s[key][2] - s[key][0] for s in summary]]
        ax.bar(range(len(arms)), est, yerr=err, capsize=3, color=[f"C{i}" for i in range(len(arms))])
        ax.set_xticks(range(len(arms)), arms, rotation=35, ha="right", fontsize=8)
        ax.set_title(_LABELS[key], fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("noisefit benchmark, test split: mean and bootstrap 95% CI over seeds x items")
    save_figure(fig, path)


def _reliability(path: Any, run: RunDir, results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from leanfit.core.report import save_figure
    from leanfit.studies.noisefit.metrics import reliability_curve

    by_arm: dict[str, list[str]] = {}
    for row in results["rows"]:
        by_arm.setdefault(row["arm"], []).append(row["name"])
    fig, ax = plt.subplots(figsize=(6, 5), dpi=110)
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    for i, (arm, names) in enumerate(by_arm.items()):
        conf, correct = [], []
        for name in names:
            f = run.path / "runs" / name / "test_scores.npz"
            if f.exists():
                with np.load(f, allow_pickle=False) as z:
                    conf.append(z["confidence"])
                    correct.append(z["correct"])
        if not conf:
            continue
        mids, acc, mean_conf, counts = reliability_curve(np.concatenate(conf), np.concatenate(correct), 10)
        keep = counts > 0
        ax.plot(mean_conf[keep], acc[keep], marker="o", color=f"C{i}", label=arm)
    ax.set(xlabel="confidence of the greedy answer", ylabel="accuracy", title="Reliability (test, all seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def render_report(run: RunDir, results: dict[str, Any]) -> Report:
    from leanfit.core.report import Report

    rep = Report("Results")
    rep.text(results["headline"])
    main, rel = _tables(results["summary"])
    rep.section("Test split (scored once): mean [95% bootstrap CI over seeds x items], rates in %")
    rep.table(main)
    rep.section("Relative change against SFT (paired bootstrap, %)")
    rep.table(rel)
    _bars(run.plots_dir / "metrics.png", results["summary"])
    rep.figure("plots/metrics.png", "Every metric per arm with 95% CIs")
    _reliability(run.plots_dir / "reliability.png", run, results)
    rep.figure("plots/reliability.png", "Reliability diagrams: confidence of the greedy answer vs accuracy")
    rep.section("Settings chosen on validation (first seed)")
    rep.table([{"arm": s["arm"], "setting": s["setting"] or "-", "chosen": s["chosen"],
                "valid EM known (%)": 100 * s["valid_em_known"],
                "valid confident-wrong unknown (%)": 100 * s["valid_cw_unknown"]} for s in results["sweeps"]])
    rep.section("World")
    rep.table([{"count": k, "value": v} for k, v in results["world"].items()])
    if results.get("calibration"):
        rep.section("NoiseFiT layers and scales (calibration)")
        rep.table([{"run": k, "layers": v.get("layers"), "scales": v.get("scales")}
                   for k, v in results["calibration"].items()])
    return rep
