"""``leanfit bench moe``: the sparse MoE layer against Hugging Face's Mixtral block, and the estimator's fit time.

Layer (forward, no grad, float32, in one process side by side; median of timed calls):

- ``leanfit``: :class:`~leanfit.moe.SparseMoE` (sort-based dispatch);
- ``hf_eager``: ``transformers``' ``MixtralSparseMoeBlock`` with its default per-expert loop, same weights;
- ``hf_grouped_mm``: the same block with ``_experts_implementation="grouped_mm"``;
- ``ideal_dense``: one SwiGLU MLP pass over the T * K routed rows with a single expert's weights (no routing, no
  gather, no scatter): the throughput a perfect dispatch would reach.

Experts are SwiGLU with intermediate size ``intermediate_mult * d``. Estimator: fit time of
:class:`~leanfit.moe.TopKGaussianMoE` (3 experts, top-2, default starts) on data of the topk-moe study's truth.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

from leanfit.core.config import BaseConfig, option
from leanfit.core.registry import register

__all__ = ["LAYER_METHODS", "MoEBenchConfig"]

LAYER_METHODS = ("leanfit", "hf_eager", "hf_grouped_mm", "ideal_dense")


@dataclass
class MoEBenchConfig(BaseConfig):
    tokens: list[int] = option(default_factory=lambda: [2048, 8192], help="tokens per call T")
    ds: list[int] = option(default_factory=lambda: [256, 1024], help="hidden sizes d")
    experts: list[int] = option(default_factory=lambda: [8, 64], help="numbers of experts E")
    ks: list[int] = option(default_factory=lambda: [1, 2, 4], help="experts per token K")
    intermediate_mult: int = option(2, help="expert intermediate size = intermediate_mult * d")
    methods: list[str] = option(default_factory=lambda: list(LAYER_METHODS), help=f"layer methods: {LAYER_METHODS}")
    repeats: int = option(3, help="timed calls at least; the median is reported")
    min_seconds: float = option(0.5, help="keep timing cheap calls until this much time (at most 20 x repeats)")
    estimator_ns: list[int] = option(default_factory=lambda: [1000, 10000, 100000],
                                     help="sample sizes for the estimator fit time (empty: skip)")  # fmt: skip
    target: list[int] = option(default_factory=lambda: [8192, 256, 8, 2], help="T, d, E, K of the headline")

    def __post_init__(self) -> None:
        unknown = sorted(set(self.methods) - set(LAYER_METHODS))
        if unknown:
            raise ValueError(f"methods contains {unknown[0]!r}: expected any of {', '.join(LAYER_METHODS)}")
        for name in ("tokens", "ds", "experts", "ks"):
            bad = [x for x in getattr(self, name) if x < 1]
            if bad:
                raise ValueError(f"{name} contains {bad[0]}: expected positive sizes")
        if self.repeats < 1 or self.intermediate_mult < 1:
            raise ValueError(f"repeats={self.repeats} and intermediate_mult={self.intermediate_mult} must be >= 1")


PRESETS = {
    "quick": {"tokens": [8192], "ds": [256], "experts": [8, 64], "ks": [2], "estimator_ns": [1000, 10000]},
    "full": {},
}


def _timed(fn: Any, repeats: int, min_seconds: float) -> float:
    fn()  # warm-up
    times: list[float] = []
    while len(times) < repeats or (sum(times) < min_seconds and len(times) < 20 * repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _layer_cell(t: int, d: int, e: int, k: int, cfg: MoEBenchConfig, seed: int) -> list[dict[str, Any]]:
    import torch
    import torch.nn.functional as F
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    from leanfit.moe.layer import SparseMoE

    inter = cfg.intermediate_mult * d
    torch.manual_seed(seed)
    hf_cfg = MixtralConfig(hidden_size=d, intermediate_size=inter, num_local_experts=e, num_experts_per_tok=k,
                           hidden_act="silu")  # fmt: skip
    block = MixtralSparseMoeBlock(hf_cfg).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, d**-0.5)
    layer = SparseMoE.from_mixtral(block).eval()
    x = torch.randn(1, t, d, generator=torch.Generator().manual_seed(seed))
    rows_x = x.reshape(t, d).repeat_interleave(k, dim=0)

    def ideal() -> Any:
        gate, up = F.linear(rows_x, layer.gate_up_proj[0]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, layer.down_proj[0])

    def hf(impl: str) -> Any:
        hf_cfg._experts_implementation = impl  # read at call time by transformers' experts dispatcher
        return block(x)

    calls = {"leanfit": lambda: layer(x).hidden, "hf_eager": lambda: hf("eager"),
             "hf_grouped_mm": lambda: hf("grouped_mm"), "ideal_dense": ideal}  # fmt: skip
    rows = []
    with torch.inference_mode():
        for method in cfg.methods:
            ms = 1e3 * _timed(calls[method], cfg.repeats, cfg.min_seconds)
            rows.append({"method": method, "t": t, "d": d, "e": e, "k": k, "intermediate": inter, "ms": ms,
                         "tokens_per_s": t / ms * 1e3})  # fmt: skip
    by = {r["method"]: r["ms"] for r in rows}
    for r in rows:
        if "hf_eager" in by:
            r["speedup_vs_hf_eager"] = by["hf_eager"] / r["ms"]
        if "ideal_dense" in by:
            r["fraction_of_ideal"] = by["ideal_dense"] / r["ms"]
    return rows


def _layer_rows(cfg: MoEBenchConfig, ctx: Any, bar: Any) -> list[dict[str, Any]]:
    rows = []
    for t in cfg.tokens:
        for d in cfg.ds:
            for e in cfg.experts:
                for k in cfg.ks:
                    if k <= e:
                        rows += _layer_cell(t, d, e, k, cfg, ctx.seed)
                    bar.advance(1, T=t, d=d, E=e, K=k)
    return rows


def _estimator_rows(cfg: MoEBenchConfig, ctx: Any, bar: Any) -> list[dict[str, Any]]:
    import warnings

    from leanfit.moe.estimator import TopKGaussianMoE
    from leanfit.moe.experiment import TRUTH, simulate

    rows = []
    for n in cfg.estimator_ns:
        X, y = simulate(TRUTH, n, ctx.seed)
        model = TopKGaussianMoE(3, 2, random_state=ctx.seed)
        start = time.perf_counter()
        with warnings.catch_warnings(record=True):
            model.fit(X, y)
        seconds = time.perf_counter() - start
        rows.append({"n": n, "n_experts": 3, "top_k": 2, "n_init": model.n_init, "seconds": seconds,
                     "us_per_sample": 1e6 * seconds / n, "n_iter_best_start": model.n_iter_,
                     "converged": model.converged_})  # fmt: skip
        bar.advance(1, size=n)
    return rows


def _headline(cfg: MoEBenchConfig, rows: list[dict[str, Any]]) -> str:
    t, d, e, k = cfg.target
    hit = {r["method"]: r for r in rows if (r["t"], r["d"], r["e"], r["k"]) == (t, d, e, k)}
    if "leanfit" not in hit:
        return ""
    r = hit["leanfit"]
    parts = [f"at T={t}, d={d}, E={e}, K={k}: {r['ms']:.0f} ms per forward"]
    if "speedup_vs_hf_eager" in r:
        parts.append(f"{r['speedup_vs_hf_eager']:.2f}x the HF Mixtral loop")
    if "hf_grouped_mm" in hit:
        parts.append(f"{hit['hf_grouped_mm']['ms'] / r['ms']:.2f}x HF grouped_mm")
    if "fraction_of_ideal" in r:
        parts.append(f"{100 * r['fraction_of_ideal']:.0f}% of the ideal dense-GEMM throughput")
    return ", ".join(parts)


def report(run: Any, results: dict[str, Any]) -> Any:
    from leanfit.core.report import Report, line_plot

    rep = Report("Results")
    rep.text(results.get("headline", ""))
    rows = results["rows"]
    if rows:
        labels = sorted({(r["t"], r["d"], r["e"], r["k"]) for r in rows})
        series = {}
        for method in LAYER_METHODS:
            ys = [next((r["ms"] for r in rows if r["method"] == method and (r["t"], r["d"], r["e"], r["k"]) == c),
                       float("nan")) for c in labels]  # fmt: skip
            if any(y == y for y in ys):
                series[method] = (list(range(len(labels))), ys)
        line_plot(run.plots_dir / "layer.png", series, xlabel="configuration (see table: T, d, E, K in order)",
                  ylabel="forward time (ms)", title="sparse MoE layer forward, CPU", logy=True)  # fmt: skip
        rep.figure("plots/layer.png", "Forward time per configuration (index = row order of (T, d, E, K) below)")
        rep.section("Layer").table(rows, ["method", "t", "d", "e", "k", "intermediate", "ms", "tokens_per_s",
                                          "speedup_vs_hf_eager", "fraction_of_ideal"])  # fmt: skip
    est = results.get("estimator_rows", [])
    if est:
        line_plot(run.plots_dir / "estimator.png", {"TopKGaussianMoE.fit": ([r["n"] for r in est], [r["seconds"] for r in est])},
                  xlabel="n", ylabel="fit time (s)", title="estimator fit time (3 experts, top-2, 5 starts)", logy=True)  # fmt: skip
        rep.figure("plots/estimator.png", "Estimator fit time against the number of samples")
        rep.section("Estimator").table(est)
    return rep


@register("moe", kind="benchmark", description="sparse MoE layer vs Hugging Face Mixtral block and the ideal dense "
          "GEMM; estimator fit time", config_cls=MoEBenchConfig, presets=PRESETS, report=report)  # fmt: skip
def run(ctx: Any) -> dict[str, Any]:
    from leanfit.core.io import atomic_write_text
    from leanfit.core.progress import progress_bar
    from leanfit.core.runner import _csv

    cfg: MoEBenchConfig = ctx.config
    cells = len(cfg.tokens) * len(cfg.ds) * len(cfg.experts) * len(cfg.ks)
    with progress_bar(cells + len(cfg.estimator_ns), "moe bench") as bar:
        rows = _layer_rows(cfg, ctx, bar)
        est = _estimator_rows(cfg, ctx, bar)
    atomic_write_text(ctx.run.path / "estimator.csv", _csv(est))
    return {"rows": rows, "estimator_rows": est, "headline": _headline(cfg, rows)}
