"""Markdown reports: cell formatting, tables, the report builder, PNG charts (grouped bars and lines, by their pixel
size), and ``render_run`` / ``render_index`` on a small fake run folder."""

from __future__ import annotations

import math
import struct

import pytest

from leanfit.core import registry
from leanfit.core.config import BaseConfig
from leanfit.core.errors import LeanfitError
from leanfit.core.report import (
    Report,
    bar_chart,
    fmt,
    line_plot,
    markdown_table,
    render_index,
    render_run,
)
from leanfit.core.runs import RunDir


@pytest.mark.parametrize(("value", "expected"), [
    (1234, "1234"), (12345, "12,345"), (-20000, "-20,000"), (0.000123456, "0.0001235"), (2.5, "2.5"),
    (12345.6, "12,346"), (math.nan, "nan"), (math.inf, "inf"), (True, "True"), (None, "None"),
    ([1, 2.5, 123456], "1, 2.5, 123,456"), ("a|b", "a\\|b"),
], ids=["int", "big-int", "negative-int", "small-float", "float", "big-float", "nan", "inf", "bool", "none", "list",
        "pipe"])
def test_fmt(value, expected):
    assert fmt(value) == expected


def test_markdown_table_columns_in_first_appearance_and_missing_cells_empty():
    rows = [{"a": 1, "b": 0.5}, {"b": 2, "c": "x"}]
    assert markdown_table(rows) == "| a | b | c |\n|---|---|---|\n| 1 | 0.5 |  |\n|  | 2 | x |"
    assert markdown_table(rows, ["c", "a"]) == "| c | a |\n|---|---|\n|  | 1 |\n| x |  |"
    assert markdown_table([]) == "*(no rows)*"


def test_report_builder_renders_blocks_in_order():
    rep = Report("T").text("  intro  ").section("S").table([{"k": 1}]).figure("plots/p.png", "cap")
    assert rep.render() == "# T\n\nintro\n\n## S\n\n| k |\n|---|\n| 1 |\n\n![cap](plots/p.png)\n\n*cap*\n"


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("n_panels", [1, 3], ids=["one-panel", "three-panels"])
def test_bar_chart_writes_a_png_of_one_width_per_panel(tmp_path, n_panels):
    panels = {f"panel {i}": {"a": [1.0, 2.0, None], "b": [0.5, math.nan, 4.0]} for i in range(n_panels)}
    path = bar_chart(tmp_path / "plots" / "bars.png", ["g1", "g2", "g3"], panels, ylabel="ratio", logy=True,
                     baseline=1.0, target=(2.0, "2x"), value_labels=True)
    assert path == tmp_path / "plots" / "bars.png"
    assert _png_size(path) == (550 * n_panels, 462)  # 5.0 x 4.2 inches a panel at 110 dpi


def test_bar_chart_needs_one_ylabel_per_panel(tmp_path):
    with pytest.raises(ValueError, match="ylabel has 1 entries for 2 panels"):
        bar_chart(tmp_path / "b.png", ["g"], {"p": {"a": [1.0]}, "q": {"a": [2.0]}}, ylabel=["only one"])


def test_line_plot_writes_a_png(tmp_path):
    path = line_plot(tmp_path / "l.png", {"a": ([1, 2, 3], [1.0, 0.5, 0.25])}, xlabel="x", ylabel="y", title="t",
                     logy=True)
    assert _png_size(path) == (704, 440)  # 6.4 x 4.0 inches at 110 dpi


@pytest.fixture
def fake_run(tmp_path, monkeypatch):
    """A finished run of a test-only experiment without a report function (the default report is used)."""

    def run(ctx):
        return {}

    monkeypatch.setattr(registry, "_DISCOVERED", True)  # only the entry below is needed
    monkeypatch.setitem(registry._REGISTRY["experiment"], "report-test", registry.Entry(
        "report-test", "experiment", "a fake run for the report tests", BaseConfig, run))
    run_dir = RunDir(tmp_path / "report-test")
    run_dir.write_config({"experiment": "report-test", "kind": "experiment", "preset": "quick", "seed": 3,
                          "config": {"steps": 2, "lr": 0.001}})
    run_dir.write_env({"cpu": "test cpu", "cpu_count": 2, "torch_threads": 1, "gpus": [], "world_size": 1,
                       "packages": {"torch": "9.9", "leanfit": "0.0"}, "git_commit": "abc123"})
    for step, loss in ((1, 2.0), (2, 1.5)):
        run_dir.log(step, loss=loss)
    return run_dir


def test_render_run_builds_the_report_of_a_run_folder(fake_run):
    with pytest.raises(LeanfitError, match="no results.json yet.*--resume"):
        render_run(fake_run.path)
    fake_run.write_results({"accuracy": 0.8125, "wall_seconds": 12.34, "rows": [{"method": "m", "ms": 1.5}]})
    text = render_run(fake_run.path).read_text()
    assert text.startswith("# report-test: a fake run for the report tests\n")
    assert "- experiment: `report-test`, preset `quick`, seed 3" in text
    assert "test cpu (2 cores, 1 torch threads), GPUs: none" in text and "git abc123" in text
    assert "- wall time: 12.3 s" in text
    assert "| accuracy | 0.8125 |" in text and "| m | 1.5 |" in text
    assert "![loss](plots/loss.png)" in text and _png_size(fake_run.plots_dir / "loss.png") == (704, 440)
    assert "steps: 2\nlr: 0.001\n" in text


def test_render_index_links_each_report(tmp_path):
    path = render_index(tmp_path, [("a", tmp_path / "runs" / "a", {"loss": 0.25, "n": 12345}),
                                   ("b", tmp_path / "runs" / "b", "one | line\nsummary")])
    lines = path.read_text().splitlines()
    assert lines[4] == "| a | [runs/a/report.md](runs/a/report.md) | loss = 0.25, n = 12,345 |"
    assert lines[5] == "| b | [runs/b/report.md](runs/b/report.md) | one \\| line summary |"


def test_a_legend_beside_the_axes_widens_the_picture(tmp_path):
    """A legend past the figure's right edge (one kept with ax.add_artist, which tight_layout leaves out) is in the
    saved picture; a figure without one keeps its size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from leanfit.core.report import save_figure

    fig, ax = plt.subplots(figsize=(4, 3), dpi=100)
    ax.plot([1, 2], label="a long legend label")
    ax.add_artist(ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0)))
    ax.legend(handles=[], loc="lower left", bbox_to_anchor=(1.01, 0.0))
    width, _ = _png_size(save_figure(fig, tmp_path / "beside.png"))
    assert width > 400 + 100
    fig, ax = plt.subplots(figsize=(4, 3), dpi=100)
    ax.plot([1, 2], label="inside")
    ax.legend()
    assert _png_size(save_figure(fig, tmp_path / "inside.png")) == (400, 300)
