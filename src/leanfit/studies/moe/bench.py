"""``leanfit bench moe``: the sparse MoE layer against Hugging Face's Mixtral block and the ideal dense GEMM.

Layer section (float32, torch's default threads, all methods of one configuration timed side by side in one process:
rounds of one call per method, interleaved and rotated by :func:`leanfit.core.bench.time_side_by_side`, after
``warmup`` untimed rounds; the median per method is reported):

- ``leanfit``: :class:`~leanfit.moe.SparseMoE` (sort-based dispatch; its forward also computes the two router
  losses, which the Hugging Face block does not);
- ``hf_mixtral``: ``transformers``' ``MixtralSparseMoeBlock`` with the same weights and its default eager
  per-expert loop (the baseline of ``speedup_vs_hf``);
- ``hf_grouped_mm``: the same block with ``_experts_implementation="grouped_mm"``;
- ``ideal_dense``: one pass of the same SwiGLU MLP over the T * K routed rows with a single expert's weights, in the
  layer's blocks of rows (a single unblocked GEMM over all T * K rows is slower on CPU: its (T K, 2I) activations
  leave the cache): no routing, gather or scatter, the baseline of ``fraction_of_ideal``.

Modes: ``forward`` (under ``inference_mode``) and ``train`` (forward, then the gradients of the input and every
weight for a fixed cotangent). Experts are SwiGLU with intermediate size ``intermediate_mult * d``.

Estimator section: fit time of :class:`~leanfit.moe.TopKGaussianMoE` (3 experts, top-2, default starts) against
the sample size, on data of the topk-moe study's truth.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from leanfit.core.bench import TimingConfig, add_ratios, time_side_by_side, torch_threads
from leanfit.core.config import option
from leanfit.core.registry import register

if TYPE_CHECKING:
    from leanfit.core.report import Report
    from leanfit.core.runner import RunContext
    from leanfit.core.runs import RunDir

__all__ = ["LAYER_METHODS", "MODES", "MoEBenchConfig"]

LAYER_METHODS = ("leanfit", "hf_mixtral", "hf_grouped_mm", "ideal_dense")
MODES = ("forward", "train")
_CELL = ("t", "d", "e", "k")


@dataclass
class MoEBenchConfig(TimingConfig):
    tokens: list[int] = option(default_factory=lambda: [2048, 8192], help="tokens per call T")
    ds: list[int] = option(default_factory=lambda: [256, 1024], help="hidden sizes d")
    experts: list[int] = option(default_factory=lambda: [8, 64], help="numbers of experts E")
    ks: list[int] = option(default_factory=lambda: [1, 2, 4], help="experts per token K (cells with K > E skipped)")
    intermediate_mult: int = option(2, help="expert intermediate size = intermediate_mult * d")
    methods: list[str] = option(default_factory=lambda: list(LAYER_METHODS), help=f"layer methods: {LAYER_METHODS}")
    modes: list[str] = option(default_factory=lambda: list(MODES), help=f"what is timed: {MODES}")
    warmup: int = option(2, help="untimed rounds first (allocator, thread pool and kernel warm-up)")
    repeats: int = option(5, help="timed rounds at least (one call per method each); the median is reported")
    min_seconds: float = option(2.0, help="keep timing rounds until this much time is spent (at most 20 x repeats)")
    threads: int = option(0, help="torch threads (0: torch's default, one per core)")
    estimator_ns: list[int] = option(default_factory=lambda: [1000, 10000, 100000],
                                     help="sample sizes for the estimator fit time (empty: skip)")
    target: list[int] = option(default_factory=lambda: [8192, 256, 8, 2], help="T, d, E, K of the headline")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, allowed in (("methods", LAYER_METHODS), ("modes", MODES)):
            unknown = sorted(set(getattr(self, name)) - set(allowed))
            if unknown:
                raise ValueError(f"{name} contains {unknown[0]!r}: expected any of {', '.join(allowed)}")
        for name in ("tokens", "ds", "experts", "ks", "estimator_ns"):
            bad = [x for x in getattr(self, name) if x < 1]
            if bad:
                raise ValueError(f"{name} contains {bad[0]}: expected positive sizes")
        if self.intermediate_mult < 1:
            raise ValueError(f"intermediate_mult={self.intermediate_mult} is invalid: expected an integer >= 1")
        if len(self.target) != 4:
            raise ValueError(f"target={self.target} is invalid: expected [T, d, E, K]")


_QUICK = {"tokens": [8192], "ds": [256], "experts": [8, 64], "ks": [2], "estimator_ns": [1000, 10000]}
PRESETS = {"quick": {**_QUICK, "repeats": 3}, "full": {"warmup": 1, "repeats": 3}}  # full: HF's E=64 d=1024 backward
# takes ~50 s a call on 2 cores (it allocates a full-size weight gradient per expert), so keep its rounds few


def _build(t: int, d: int, e: int, k: int, inter: int, seed: int) -> tuple[Any, Any, Any]:
    """A SparseMoE, the Mixtral block with its weights, and an input (1, T, d)."""
    import torch

    from leanfit.moe.layer import SparseMoE

    torch.manual_seed(seed)
    layer = SparseMoE(d, inter, e, k)
    x = torch.randn(1, t, d, generator=torch.Generator().manual_seed(seed))
    return layer, layer.to_mixtral(), x


def _calls(mode: str, methods: list[str], layer: Any, block: Any, x: Any) -> dict[str, Callable[[], Any]]:
    """One callable per method: the forward, or (mode "train") the forward and the gradients of x and the weights."""
    import torch
    import torch.nn.functional as F

    k, step = layer.top_k, layer.block_rows or x.numel()
    rows = x.reshape(-1, x.shape[-1]).repeat_interleave(k, dim=0)
    w1, w2 = layer.gate_up_proj[0].detach().clone(), layer.down_proj[0].detach().clone()
    train = mode == "train"
    if train:
        x, rows = x.detach().requires_grad_(), rows.detach().requires_grad_()
        w1, w2 = w1.requires_grad_(), w2.requires_grad_()

    def hf(impl: str) -> Any:
        block.experts.config._experts_implementation = impl  # read by transformers at every call
        return block(x)

    def ideal() -> Any:  # in the layer's row blocks, so that the ratio measures routing and dispatch only
        out = torch.empty_like(rows) if not train else None
        parts = []
        for i, block_rows in enumerate(rows.split(step)):  # split: one backward node, where slices make one each
            gate, up = F.linear(block_rows, w1).chunk(2, dim=-1)
            if out is None:
                parts.append(F.linear(F.silu(gate) * up, w2))
            else:
                torch.mm(F.silu(gate, inplace=True).mul_(up), w2.t(), out=out[i * step : (i + 1) * step])
        return torch.cat(parts) if out is None else out

    forward = {"leanfit": (lambda: layer(x).hidden, [x, layer.router.weight, layer.gate_up_proj, layer.down_proj]),
               "hf_mixtral": (lambda: hf("eager"), [x, *block.parameters()]),
               "hf_grouped_mm": (lambda: hf("grouped_mm"), [x, *block.parameters()]),
               "ideal_dense": (ideal, [rows, w1, w2])}
    if not train:
        return {m: forward[m][0] for m in methods}
    cot_x, cot_rows = torch.randn_like(x), torch.randn_like(rows)  # the same cotangent for every layer method

    def grad(method: str) -> Callable[[], Any]:
        fn, inputs = forward[method]
        return lambda: torch.autograd.grad(fn(), inputs, cot_rows if method == "ideal_dense" else cot_x)

    return {m: grad(m) for m in methods}


def _layer_cell(t: int, d: int, e: int, k: int, cfg: MoEBenchConfig, seed: int) -> list[dict[str, Any]]:
    import torch

    inter = cfg.intermediate_mult * d
    layer, block, x = _build(t, d, e, k, inter, seed)
    rows = []
    for mode in cfg.modes:
        with torch.inference_mode(mode == "forward"):
            calls = _calls(mode, cfg.methods, layer, block, x)
            times = time_side_by_side(calls, **cfg.timing())
        for method in cfg.methods:
            s = statistics.median(times[method])
            rows.append({"method": method, "mode": mode, "t": t, "d": d, "e": e, "k": k, "intermediate": inter,
                         "ms": 1e3 * s, "tokens_per_s": t / s})
    add_ratios(rows, match=("mode",), baseline={"method": "hf_mixtral"}, columns={"speedup_vs_hf": "ms"}, invert=True)
    add_ratios(rows, match=("mode",), baseline={"method": "ideal_dense"}, columns={"fraction_of_ideal": "ms"},
               invert=True)
    return rows


def _layer_rows(cfg: MoEBenchConfig, ctx: RunContext[MoEBenchConfig]) -> list[dict[str, Any]]:
    """The layer section: one row per (configuration, mode, method)."""
    from leanfit.core.progress import progress_bar

    cells = [(t, d, e, k) for t in cfg.tokens for d in cfg.ds for e in cfg.experts for k in cfg.ks if k <= e]
    rows: list[dict[str, Any]] = []
    with progress_bar(len(cells), "moe bench: layer") as bar:
        for t, d, e, k in cells:
            rows += _layer_cell(t, d, e, k, cfg, ctx.seed)
            bar.advance(1, T=t, d=d, E=e, K=k)
    return rows


def _estimator_rows(cfg: MoEBenchConfig, ctx: RunContext[MoEBenchConfig]) -> list[dict[str, Any]]:
    """The estimator section: fit time of TopKGaussianMoE against the number of samples."""
    import warnings

    from leanfit.core.progress import progress_bar
    from leanfit.moe.estimator import TopKGaussianMoE
    from leanfit.studies.moe.experiment import TRUTH, simulate

    rows = []
    with progress_bar(len(cfg.estimator_ns), "moe bench: estimator") as bar:
        for n in cfg.estimator_ns:
            X, y = simulate(TRUTH, n, ctx.seed)
            model = TopKGaussianMoE(3, 2, random_state=ctx.seed)
            start = time.perf_counter()
            with warnings.catch_warnings(record=True):
                model.fit(X, y)
            seconds = time.perf_counter() - start
            rows.append({"n": n, "n_experts": 3, "top_k": 2, "n_init": model.n_init, "seconds": seconds,
                         "us_per_sample": 1e6 * seconds / n, "n_iter_best_start": model.n_iter_,
                         "converged": model.converged_})
            bar.advance(1, size=n)
    return rows


def _headline(cfg: MoEBenchConfig, rows: list[dict[str, Any]]) -> str:
    target = tuple(cfg.target)
    parts = []
    for mode in cfg.modes:
        r = next((r for r in rows if r["method"] == "leanfit" and r["mode"] == mode
                  and tuple(r[c] for c in _CELL) == target), None)
        if r is None:
            continue
        part = f"{mode} {r['ms']:.0f} ms"
        if "speedup_vs_hf" in r:
            part += f" = {r['speedup_vs_hf']:.2f}x the HF Mixtral loop"
        if "fraction_of_ideal" in r:
            part += f", {100 * r['fraction_of_ideal']:.0f}% of the ideal dense-GEMM throughput"
        parts.append(part)
    if not parts:
        return ""
    return "SparseMoE at T={}, d={}, E={}, K={}: ".format(*target) + "; ".join(parts)


def _layer_report(rep: Any, run: RunDir, rows: list[dict[str, Any]]) -> None:
    rep.section("Layer").text(
        "`speedup_vs_hf` = time of `hf_mixtral` (transformers' eager per-expert loop) / time of the method; "
        "`fraction_of_ideal` = time of `ideal_dense` (the same SwiGLU MLP over the T*K routed rows with one expert's "
        "weights, in the layer's row blocks, no routing, gather or scatter) / time of the method. `train` = forward "
        "and the gradients of the input and all weights. Medians of interleaved rounds in one process."
    )
    for mode in sorted({r["mode"] for r in rows}, key=MODES.index):
        _speedup_plot(run.plots_dir / f"layer_{mode}.png", [r for r in rows if r["mode"] == mode], mode)
        rep.figure(f"plots/layer_{mode}.png", f"{mode}: speed-up over transformers' Mixtral loop (hf_mixtral = 1) "
                   "per configuration (d, E, K), one panel per token count T")
    cols = ["method", "mode", "t", "d", "e", "k", "intermediate", "ms", "tokens_per_s", "speedup_vs_hf",
            "fraction_of_ideal"]
    rep.table(sorted(rows, key=lambda r: (tuple(r[c] for c in _CELL), MODES.index(r["mode"]))), cols)


def _speedup_plot(path: Any, rows: list[dict[str, Any]], mode: str) -> None:
    """Bars of ``speedup_vs_hf`` per configuration (d, E, K), one row of panels per T; hf_mixtral is the line at 1."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from leanfit.core.report import save_figure

    groups = sorted({(r["d"], r["e"], r["k"]) for r in rows})
    methods = [m for m in LAYER_METHODS if m != "hf_mixtral" and any(r["method"] == m for r in rows)]
    speedup = {(r["t"], r["d"], r["e"], r["k"], r["method"]): r.get("speedup_vs_hf") for r in rows}
    tokens = sorted({r["t"] for r in rows})
    values = [v for v in speedup.values() if v]
    fig, axes = plt.subplots(len(tokens), 1, figsize=(max(6.4, 0.8 * len(groups) + 1.5), 3.0 * len(tokens)),
                             dpi=110, squeeze=False)
    width = 0.8 / max(len(methods), 1)
    for ax, t in zip(axes[:, 0], tokens, strict=True):
        for i, method in enumerate(methods):
            ys = [speedup.get((t, *g, method)) or math.nan for g in groups]
            ax.bar([j + (i - (len(methods) - 1) / 2) * width for j in range(len(groups))], ys, width, label=method,
                   color=f"C{LAYER_METHODS.index(method)}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        if values and max(values) / min(values) > 10:
            ax.set_yscale("log")
        ax.set_xticks(range(len(groups)), [f"d={d}\nE={e}, K={k}" for d, e, k in groups], fontsize=7)
        ax.set(title=f"sparse MoE layer, {mode}, T = {t} tokens, CPU", ylabel="speed-up over hf_mixtral (x)")
        ax.grid(alpha=0.3, axis="y")
    axes[0, 0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    save_figure(fig, path)


def _estimator_report(rep: Any, run: RunDir, rows: list[dict[str, Any]]) -> None:
    from leanfit.core.report import line_plot

    line_plot(run.plots_dir / "estimator.png", {"TopKGaussianMoE.fit": ([r["n"] for r in rows],
              [r["seconds"] for r in rows])}, xlabel="n", ylabel="fit time (s)",
              title="estimator fit time (3 experts, top-2, default starts)", logy=True)
    rep.section("Estimator").figure("plots/estimator.png", "Estimator fit time against the number of samples")
    rep.table(rows)


def report(run: RunDir, results: dict[str, Any]) -> Report:
    from leanfit.core.report import Report

    rep = Report("Results").text(results.get("headline", ""))
    if results.get("rows"):
        _layer_report(rep, run, results["rows"])
    if results.get("estimator_rows"):
        _estimator_report(rep, run, results["estimator_rows"])
    return rep


@register("moe", kind="benchmark", description="sparse MoE layer vs Hugging Face's Mixtral block and the ideal "
          "dense GEMM (forward, forward+backward); estimator fit time", config_cls=MoEBenchConfig, presets=PRESETS,
          report=report)
def run(ctx: RunContext[MoEBenchConfig]) -> dict[str, Any]:
    from leanfit.core.io import atomic_write_csv

    cfg = ctx.config
    with torch_threads(cfg.threads, small_workload=False):
        rows = _layer_rows(cfg, ctx)
        est = _estimator_rows(cfg, ctx) if cfg.estimator_ns else []
    if est:
        atomic_write_csv(ctx.run.path / "estimator.csv", est)
    return {"rows": rows, "estimator_rows": est, "headline": _headline(cfg, rows)}
