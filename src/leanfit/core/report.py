"""Markdown reports with tables and matplotlib figures, rebuilt from a run folder without re-running.

An experiment's ``report(run, results) -> Report`` fills the body; :func:`render_run` adds the header (config,
seed, environment) so every figure sits beside the settings that produced it.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from leanfit.core.io import atomic_write_bytes, atomic_write_text
from leanfit.core.runs import RunDir

__all__ = ["Report", "bar_chart", "line_plot", "render_index", "render_run", "save_figure"]


class Report:
    """Accumulates markdown blocks; figures are referenced relative to the report file."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.blocks: list[str] = []

    def section(self, title: str) -> Report:
        self.blocks.append(f"## {title}")
        return self

    def text(self, markdown: str) -> Report:
        self.blocks.append(markdown.strip())
        return self

    def table(self, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> Report:
        self.blocks.append(markdown_table(rows, columns))
        return self

    def figure(self, relpath: str | os.PathLike, caption: str) -> Report:
        self.blocks.append(f"![{caption}]({Path(relpath).as_posix()})\n\n*{caption}*")
        return self

    def render(self) -> str:
        return "\n\n".join([f"# {self.title}", *self.blocks]) + "\n"


def fmt(value: Any) -> str:
    """Compact cell formatting: 4 significant digits for floats, thousands separators for large ints."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:,.0f}" if abs(value) >= 10_000 else f"{value:.4g}"
    if isinstance(value, list | tuple):
        return ", ".join(fmt(v) for v in value)
    return str(value).replace("|", "\\|")


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "*(no rows)*"
    columns = list(columns or dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def line_plot(
    path: str | os.PathLike,
    series: Mapping[str, Sequence[Sequence[float]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    logy: bool = False,
) -> Path:
    """Save a line plot of ``{label: (xs, ys)}`` as PNG (atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for label, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), label=label, marker="o" if len(xs) <= 20 else None, markersize=3)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    return save_figure(fig, path)


def bar_chart(
    path: str | os.PathLike,
    groups: Sequence[str],
    panels: Mapping[str, Mapping[str, Sequence[float | None]]],
    *,
    ylabel: str | Sequence[str],
    logy: bool = False,
    baseline: float | None = None,
    target: tuple[float, str] | None = None,
    value_labels: bool = False,
) -> Path:
    """Save grouped bars as PNG (atomically): one panel per entry of ``panels`` (its title), one group of bars per
    entry of ``groups`` (the x ticks), one bar colour per series; ``panels[title][series][i]`` is the bar of group
    ``i`` (None or NaN: no bar). For speed-up and ratio charts, ``baseline`` draws a black line (e.g. 1.0, no
    change) and ``target`` a dashed red line with its label; ``value_labels`` writes each bar's value above it.
    ``ylabel`` is one label for every panel or one per panel; the legend sits in the first panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ylabels = [ylabel] * len(panels) if isinstance(ylabel, str) else list(ylabel)
    if len(ylabels) != len(panels):
        raise ValueError(f"ylabel has {len(ylabels)} entries for {len(panels)} panels: expected one per panel")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 4.2), dpi=110, squeeze=False)
    for ax, label, (title, series) in zip(axes[0], ylabels, panels.items(), strict=True):
        width = 0.8 / max(len(series), 1)
        for i, (name, values) in enumerate(series.items()):
            ys = [math.nan if v is None else float(v) for v in values]
            xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(groups))]
            bars = ax.bar(xs, ys, width, label=name)
            if value_labels:
                ax.bar_label(bars, labels=["" if math.isnan(y) else f"{y:.2f}" for y in ys], fontsize=6)
        if target is not None:
            ax.axhline(target[0], color="red", linestyle="--", linewidth=1, label=target[1])
        if baseline is not None:
            ax.axhline(baseline, color="black", linewidth=0.8)
        if logy:
            ax.set_yscale("log")
        ax.set_xticks(range(len(groups)), list(groups), rotation=20 if len(groups) > 3 else 0, fontsize=8)
        ax.set(title=title, ylabel=label)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].legend(fontsize=7)
    return save_figure(fig, path)


def save_figure(fig: Any, path: str | os.PathLike) -> Path:
    """Lay out, save as PNG (atomically) and close a matplotlib figure."""
    import matplotlib.pyplot as plt
    from matplotlib.legend import Legend

    fig.tight_layout()
    buf = io.BytesIO()
    # a legend placed beside the axes and past the figure's edge (tight_layout leaves out one kept with
    # ax.add_artist) widens the picture to hold it; every other figure keeps its size
    legends = [c for ax in fig.axes for c in ax.get_children() if isinstance(c, Legend)]
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    spill = any(e.x0 < box.x0 - 1 or e.x1 > box.x1 + 1 or e.y0 < box.y0 - 1 or e.y1 > box.y1 + 1
                for e in (legend.get_window_extent(renderer) for legend in legends))
    fig.savefig(buf, format="png", **({"bbox_inches": "tight", "bbox_extra_artists": legends} if spill else {}))
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def _header(run: RunDir, record: Mapping[str, Any], results: Mapping[str, Any] | None) -> str:
    env = run.read_env()
    pk = env.get("packages", {})
    lines = [
        f"- experiment: `{record.get('experiment')}`, preset `{record.get('preset')}`, seed {record.get('seed')}",
        f"- machine: {env.get('cpu', '?')} ({env.get('cpu_count', '?')} cores, {env.get('torch_threads', '?')} "
        f"torch threads), GPUs: {', '.join(env.get('gpus') or []) or 'none'}, world size {env.get('world_size', 1)}",
        f"- software: torch {pk.get('torch')}, transformers {pk.get('transformers')}, "
        f"leanfit {pk.get('leanfit')}, git {env.get('git_commit')}",
    ]
    if results and "wall_seconds" in results:
        lines.append(f"- wall time: {results['wall_seconds']:.1f} s")
    return "\n".join(lines)


def _config_block(record: Mapping[str, Any]) -> str:
    import yaml

    return "<details><summary>Resolved config</summary>\n\n```yaml\n" + yaml.safe_dump(
        record.get("config", {}), sort_keys=False
    ) + "```\n</details>"


def default_report(run: RunDir, results: Mapping[str, Any]) -> Report:
    """Results table and one plot per numeric metric, for entries without a report function."""
    report = Report("Results")
    report.table([{"metric": k, "value": v} for k, v in results.items() if not isinstance(v, dict | list)])
    if results.get("rows"):
        report.table(results["rows"])
    metrics = run.metrics()
    keys = sorted({k for r in metrics for k, v in r.items() if k != "step" and isinstance(v, int | float)})
    for key in keys:
        pts = [(r["step"], r[key]) for r in metrics if key in r]
        line_plot(run.plots_dir / f"{key}.png", {key: tuple(zip(*pts, strict=True))}, xlabel="step", ylabel=key,
                  title=key)
        report.figure(f"plots/{key}.png", key)
    return report


def render_run(run_dir: str | os.PathLike) -> Path:
    """(Re)render ``report.md`` of a run folder from its records; returns the report's path."""
    from leanfit.core import registry

    run = RunDir(Path(run_dir))
    record = run.read_config()
    results = run.results()
    if results is None:
        from leanfit.core.errors import LeanfitError

        raise LeanfitError(
            f"RUN_DIR={str(run.path)!r} has no results.json yet (the run is unfinished); "
            f"continue it with `leanfit run {record.get('experiment')} --resume ...` first"
        )
    entry = registry.get(record.get("kind", "experiment"), record["experiment"])
    body = (entry.report or default_report)(run, results)
    text = (
        f"# {entry.name}: {entry.description}\n\n"
        + _header(run, record, results)
        + "\n\n"
        + body.render().replace(f"# {body.title}", f"## {body.title}", 1).replace("\n## ", "\n### ")
        + "\n"
        + _config_block(record)
        + "\n"
    )
    return atomic_write_text(run.path / "report.md", text)


def render_index(out: str | os.PathLike, runs: Sequence[tuple[str, Path, Mapping[str, Any] | str]]) -> Path:
    """``index.md`` linking each run's report with its headline (a mapping of numbers, or a sentence)."""
    out = Path(out)
    lines = ["# leanfit demo", "", "| experiment | report | headline |", "|---|---|---|"]
    for name, path, headline in runs:
        rel = os.path.relpath(path / "report.md", out)
        if isinstance(headline, Mapping):
            summary = ", ".join(f"{k} = {fmt(v)}" for k, v in headline.items())
        else:
            summary = str(headline).replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {name} | [{rel}]({rel}) | {summary} |")
    return atomic_write_text(out / "index.md", "\n".join(lines) + "\n")
