"""Summaries, target checks, the headline and the markdown report of ``leanfit run iapt``.

No torch at import time: the registry imports this module through :mod:`leanfit.studies.iapt.experiment`."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from leanfit.core.report import Report
    from leanfit.core.runs import RunDir

__all__ = ["headline", "report", "summarise", "targets"]

_STATS = ("test_accuracy", "test_macro_f1", "train_seconds")


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    vals = [float(v) for v in values]
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def summarise(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (task, method, setting): counts and size (from the first seed), mean and sd over seeds."""
    out = []
    keys = dict.fromkeys((r["task"], r["method"], r["setting"]) for r in rows)
    for task, method, setting in keys:
        sub = [r for r in rows if (r["task"], r["method"], r["setting"]) == (task, method, setting)]
        first = sub[0]
        entry: dict[str, Any] = {"task": task, "method": method, "setting": setting, "seeds": len(sub),
                                 "lr": first["lr"], "size": first["size"]}
        for key in ("adapter_params", "head_params", "trainable_params"):
            entry[key] = first[key]
        for key in _STATS:
            entry[f"{key}_mean"], entry[f"{key}_sd"] = _mean_sd([r[key] for r in sub])
        out.append(entry)
    return out


def _main(summary: Sequence[dict[str, Any]], task: str) -> dict[str, dict[str, Any]]:
    return {s["method"]: s for s in summary if s["task"] == task and s["setting"] == "main"}


def targets(summary: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per task: IAPT's mean test accuracy against each baseline (points), and the issue's two targets."""
    checks = []
    for task in dict.fromkeys(s["task"] for s in summary):
        main = _main(summary, task)
        iapt = main.get("iapt")
        if iapt is None:
            continue
        row: dict[str, Any] = {"task": task}
        for method, s in main.items():
            if method != "iapt":
                row[f"iapt - {method} (points)"] = 100 * (iapt["test_accuracy_mean"] - s["test_accuracy_mean"])
        prompt_like = [m for m in ("prefix", "prefix-proj", "prompt") if m in main]
        if prompt_like:
            row["ahead of prefix/prompt"] = all(row[f"iapt - {m} (points)"] > 0 for m in prompt_like)
        if "lora" in main:
            row["within 1 point of LoRA"] = row["iapt - lora (points)"] >= -1.0
        checks.append(row)
    return checks


def headline(summary: Sequence[dict[str, Any]], decoder: Sequence[dict[str, Any]]) -> str:
    """One sentence per task (test accuracy mean ± sd and adapter size of every method) and the decoder."""
    parts = []
    for task in dict.fromkeys(s["task"] for s in summary):
        items = [f"{m} {100 * s['test_accuracy_mean']:.1f} ± {100 * s['test_accuracy_sd']:.1f}% "
                 f"({s['adapter_params'] / 1000:.0f}k)" for m, s in _main(summary, task).items()]
        parts.append(f"{task}: " + ", ".join(items))
    if decoder:
        parts.append("headlines ROUGE-L: " + ", ".join(f"{d['method']} {100 * d['rouge_l']:.1f}" for d in decoder))
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------------- report
def _pm(entry: dict[str, Any], key: str, scale: float = 100.0, digits: int = 2) -> str:
    return f"{scale * entry[key + '_mean']:.{digits}f} ± {scale * entry[key + '_sd']:.{digits}f}"


def _size_text(size: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in size.items())


def _method_table(summary: Sequence[dict[str, Any]], task: str) -> list[dict[str, Any]]:
    main = _main(summary, task)
    budget = main["iapt"]["adapter_params"] if "iapt" in main else None
    return [{"method": m, "size": _size_text(s["size"]), "adapter params": s["adapter_params"],
             "with head": s["trainable_params"], "vs IAPT": s["adapter_params"] / budget if budget else None,
             "lr": s["lr"], "test accuracy (%)": _pm(s, "test_accuracy"), "macro-F1 (%)": _pm(s, "test_macro_f1"),
             "train s": _pm(s, "train_seconds", 1.0, 1), "seeds": s["seeds"]} for m, s in main.items()]


def _ablation_table(summary: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for s in summary:
        if s["method"] != "iapt":
            continue
        ref = _main(summary, s["task"])["iapt"]
        delta = 100 * (s["test_accuracy_mean"] - ref["test_accuracy_mean"])
        rows.append({"task": s["task"], "setting": "IAPT (self_attn, rational, 4 tokens)" if s["setting"] == "main"
                     else s["setting"], "size": _size_text(s["size"]), "adapter params": s["adapter_params"],
                     "test accuracy (%)": _pm(s, "test_accuracy"), "macro-F1 (%)": _pm(s, "test_macro_f1"),
                     "Δ accuracy vs IAPT (points)": delta})
    return rows


def _paired_lora_table(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per task and IAPT setting: IAPT minus LoRA in test accuracy points, paired by seed (every method of a seed
    starts from the same head and sees the same batches), mean with its 95% Student-t interval over the seeds."""
    from leanfit.core.stats import t_interval  # scipy: kept out of `leanfit list`

    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        lora = {r["seed"]: r["test_accuracy"] for r in rows
                if (r["task"], r["method"], r["setting"]) == (task, "lora", "main")}
        for setting in dict.fromkeys(r["setting"] for r in rows if (r["task"], r["method"]) == (task, "iapt")):
            iapt = {r["seed"]: r["test_accuracy"] for r in rows
                    if (r["task"], r["method"], r["setting"]) == (task, "iapt", setting)}
            seeds = sorted(set(iapt) & set(lora))
            if len(seeds) < 2:
                continue
            mean, low, high = t_interval([100 * (iapt[s] - lora[s]) for s in seeds])
            out.append({"task": task, "setting": "IAPT (self_attn, rational, 4 tokens)" if setting == "main"
                        else setting, "IAPT - LoRA (points)": f"{mean:+.2f}", "95% t-interval": f"[{low:+.1f}, {high:+.1f}]",
                        "seeds": len(seeds)})
    return out


_DRAWS = 10_000  # bootstrap replicates of the decoder's per-article ROUGE-L intervals (seed 0)


def _decoder_table(decoder: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    from leanfit.core.stats import bootstrap_ci  # numpy: kept out of `leanfit list`

    lora = next((d for d in decoder if d["method"] == "lora" and "rouge_l_articles" in d), None)
    rows = []
    for d in decoder:
        row = {"method": d["method"], "adapter params": d["adapter_params"], "LoRA r": d.get("lora_r"), "lr": d["lr"],
               "steps": d["steps"], "ROUGE-L F1 (%)": 100 * d["rouge_l"]}
        if "rouge_l_articles" in d:
            _, lo, hi = bootstrap_ci(d["rouge_l_articles"], n_boot=_DRAWS)
            row["95% CI"] = f"[{100 * lo:.1f}, {100 * hi:.1f}]"
            if lora is not None and d is not lora:
                # the per-article differences bootstrapped as one sample (paired: the same articles)
                diff = [a - b for a, b in zip(d["rouge_l_articles"], lora["rouge_l_articles"], strict=True)]
                _, lo, hi = bootstrap_ci(diff, n_boot=_DRAWS)
                row["vs LoRA (paired, 95% CI)"] = f"{100 * sum(diff) / len(diff):+.2f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"
        rows.append({**row, "test articles": d["test_examples"], "prompt tokens (mean)": d.get("prompt_tokens_mean"),
                     "train s": d["train_seconds"], "generate s": d["generate_seconds"]})
    return rows


def _decoder_plot(run: RunDir, decoder: Sequence[dict[str, Any]]) -> None:
    import matplotlib

    from leanfit.core.stats import bootstrap_ci  # numpy: kept out of `leanfit list`

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from leanfit.core.report import save_figure

    fig, ax = plt.subplots(figsize=(5.6, 4.0), dpi=110)
    for i, d in enumerate(decoder):
        mean = 100 * d["rouge_l"]
        articles = d.get("rouge_l_articles")
        lo, hi = bootstrap_ci(articles, n_boot=_DRAWS)[1:] if articles is not None else (d["rouge_l"],) * 2
        ax.bar(i, mean, yerr=[[mean - 100 * lo], [100 * hi - mean]], capsize=4, color=f"C{i}")
    ax.set_xticks(range(len(decoder)), [d["method"] for d in decoder])
    ax.set(ylabel="ROUGE-L F1 (%)", title="BBC headlines (bars: 95% bootstrap CI over articles)")
    ax.grid(alpha=0.3, axis="y")
    save_figure(fig, run.plots_dir / "decoder_rouge_l.png")


_RATES = {True: "each method's adapter learning rate was chosen on validation with the first seed (table "
                "*Learning-rate selection*)",
          False: "one fixed adapter learning rate per method (no grid)"}
_NOTES = (
    "Encoder: MiniLM-L6 (frozen) with BERT's sequence-classification head (`classifier`, trainable in every method "
    "and initialised identically per seed). Test accuracy and macro-F1 in %, mean ± sd over seeds; {rates}, the "
    "head has its own fixed rate. `adapter params` exclude the head, `with head` include it, both counted on the "
    "built models; `vs IAPT` is the ratio to IAPT's adapter count. Prompt tuning cannot reach the budget within the "
    "encoder's positions at a comparable cost; its length is in `size`. PEFT prefix tuning runs through PEFT's "
    "prefix encoder and `get_prompt` with our own call of the BERT model: PEFT 0.21's classification forward "
    "refuses BERT under transformers 5 (it looks for `past_key_values` in the signature, now named `cache`). "
    "Train time: optimizer steps only."
)


def report(run: RunDir, results: dict[str, Any]) -> Report:
    from leanfit.core.report import Report

    rep = Report("iapt: instruction-aware prompt tuning vs LoRA, prefix and prompt tuning")
    rep.text(results.get("headline", ""))
    graded = any(s.get("val_accuracy") is not None for s in results.get("sweeps", []))
    rep.text(_NOTES.replace("{rates}", _RATES[graded]))
    rows = results.get("rows", [])
    if rows:
        devices = ", ".join(sorted({r.get("train_device", "cpu") for r in rows}))
        jobs = max(r.get("jobs", 1) for r in rows)
        clips = sorted({r.get("max_grad_norm", 0.0) for r in rows})
        clip = "none" if clips == [0.0] else " / ".join(f"{c:g}" for c in clips)
        rep.text(f"Trained on {devices}, {jobs} classifier(s) at a time"
                 f"{' (training times measured under that shared load)' if jobs > 1 else ''}; gradient-norm "
                 f"clipping: {clip}.")
    summary = results.get("summary", [])
    tasks = list(dict.fromkeys(s["task"] for s in summary))
    for task in tasks:
        rep.section(f"Task: {task}").table(_method_table(summary, task))
    if tasks:
        _accuracy_plot(run, summary, tasks)
        rep.figure("plots/accuracy_vs_params.png", "Test accuracy (mean ± sd over seeds) per method, with its "
                   "trainable adapter parameters (head excluded) under its name")
    if any(s["setting"] != "main" for s in summary):
        rep.section("IAPT ablations").table(_ablation_table(summary))
        _ablation_plot(run, summary)
        rep.figure("plots/ablations.png", "IAPT ablations: test accuracy (mean ± sd over seeds)")
    paired = _paired_lora_table(rows)
    if paired:
        rep.section("IAPT minus LoRA, paired by seed").table(paired)
        rep.text("Test accuracy difference in points on the same seeds (same head initialisation and batches): "
                 "mean over the seeds and its 95% Student-t interval (t with seeds - 1 degrees of freedom).")
    if results.get("targets"):
        rep.section("Targets").table(results["targets"])
    if results.get("sweeps"):
        rep.section("Learning-rate selection (first seed, validation)").table(results["sweeps"])
    if results.get("decoder"):
        rep.section("Decoder: BBC headlines with SmolLM2").table(_decoder_table(results["decoder"]))
        _decoder_plot(run, results["decoder"])
        rep.figure("plots/decoder_rouge_l.png", "ROUGE-L F1 per method (95% bootstrap interval over test articles)")
        rep.text("Greedy decoding of at most `target_tokens` tokens; ROUGE-L F1 (rouge-score, Porter stemming), "
                 "mean over the held-out articles; predictions: `runs/decoder-*/predictions.jsonl`.")
    return rep


def _accuracy_plot(run: RunDir, summary: Sequence[dict[str, Any]], tasks: Sequence[str]) -> None:
    """Test accuracy per method with its spread over seeds; the methods' budgets are matched (within a few %), so
    the parameter count is a label under each method, not an axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from leanfit.core.report import save_figure

    fig, axes = plt.subplots(1, len(tasks), figsize=(5.6 * len(tasks), 4.2), dpi=110, squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        main = _main(summary, task)
        for i, s in enumerate(main.values()):
            mean, sd = 100 * s["test_accuracy_mean"], 100 * s["test_accuracy_sd"]
            ax.errorbar(i, mean, yerr=sd, fmt="o", capsize=4, color=f"C{i}")
            ax.annotate(f"{mean:.1f} ± {sd:.1f}", (i, mean + sd), textcoords="offset points", xytext=(0, 4),
                        ha="center", fontsize=7)
        ax.set_xticks(range(len(main)), [f"{m}\n{s['adapter_params'] / 1e3:.1f}k params" for m, s in main.items()],
                      fontsize=8)
        ax.set_xlim(-0.6, len(main) - 0.4)
        ax.margins(y=0.12)
        ax.set(ylabel="test accuracy (%), mean ± sd over seeds", title=task)
        ax.grid(alpha=0.3, axis="y")
    save_figure(fig, run.plots_dir / "accuracy_vs_params.png")


def _ablation_plot(run: RunDir, summary: Sequence[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from leanfit.core.report import save_figure

    tasks = list(dict.fromkeys(s["task"] for s in summary if s["setting"] != "main"))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.6 * len(tasks), 4.2), dpi=110, squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        entries = [s for s in summary if s["task"] == task and s["method"] == "iapt"]
        labels = ["IAPT" if s["setting"] == "main" else s["setting"] for s in entries]
        ax.bar(labels, [100 * s["test_accuracy_mean"] for s in entries],
               yerr=[100 * s["test_accuracy_sd"] for s in entries], capsize=3, color="C0")
        low = min(100 * (s["test_accuracy_mean"] - s["test_accuracy_sd"]) for s in entries)
        ax.set_ylim(max(0.0, low - 5), 100)
        ax.set(ylabel="test accuracy (%)", title=f"{task}: IAPT ablations")
        ax.tick_params(axis="x", rotation=30)
        ax.grid(alpha=0.3, axis="y")
    save_figure(fig, run.plots_dir / "ablations.png")
