"""``leanfit bench threads``: training-step throughput of tiny Llama models at each torch thread count, measured
side by side in one process. It backs the thread policy in :mod:`leanfit.core.device` (``threads=0`` picks one
thread for small CPU workloads)."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

from leanfit.core.config import BaseConfig, option
from leanfit.core.registry import register

__all__ = ["ThreadsBenchConfig"]


@dataclass
class ThreadsBenchConfig(BaseConfig):
    d_models: list[int] = option(default_factory=lambda: [32, 64, 128, 256, 512], help="model widths to measure")
    n_layers: int = option(2, help="decoder layers")
    threads: list[int] = option(default_factory=lambda: [1, 2], help="torch thread counts to compare")
    vocab_size: int = option(8192, help="vocabulary size (full-softmax head)")
    batch_size: int = option(16, help="sequences per step")
    seq_len: int = option(64, help="tokens per sequence")
    steps: int = option(10, help="timed steps per repeat")
    repeats: int = option(3, help="repeats; the median is reported")


PRESETS = {"quick": {"d_models": [32, 64], "steps": 5}, "full": {}}


def _step_time(model: Any, opt: Any, batch: Any, steps: int) -> float:
    import torch.nn.functional as F

    start = time.perf_counter()
    for _ in range(steps):
        logits = model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / steps


def report(run: Any, results: dict[str, Any]) -> Any:
    from leanfit.core.report import Report, line_plot

    rows = results["rows"]
    series = {}
    for t in sorted({r["threads"] for r in rows}):
        pts = sorted((r["d_model"], r["tokens_per_s"]) for r in rows if r["threads"] == t)
        series[f"{t} thread(s)"] = tuple(zip(*pts, strict=True))
    line_plot(run.plots_dir / "threads.png", series, xlabel="d_model", ylabel="training tokens/s",
              title="tiny Llama training throughput by torch threads", logy=True)  # fmt: skip
    rep = Report("Throughput")
    rep.table(rows, ["d_model", "n_layers", "threads", "params", "step_ms", "tokens_per_s", "speedup_vs_1_thread"])
    rep.figure("plots/threads.png", "Training tokens/s against model width, per thread count (median of repeats)")
    return rep


@register("threads", kind="benchmark", description="tiny-Llama training throughput by torch thread count",
          config_cls=ThreadsBenchConfig, presets=PRESETS, report=report)  # fmt: skip
def run(ctx: Any) -> dict[str, Any]:
    import torch

    from leanfit.core.progress import progress_bar
    from leanfit.studies.models.tiny_llama import tiny_llama

    cfg: ThreadsBenchConfig = ctx.config
    rows = []
    batch = torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.seq_len + 1),
                          generator=torch.Generator().manual_seed(ctx.seed))  # fmt: skip
    with progress_bar(len(cfg.d_models) * len(cfg.threads), "threads bench") as bar:
        for d in cfg.d_models:
            model = tiny_llama(cfg.vocab_size, d_model=d, n_layers=cfg.n_layers, n_heads=max(1, d // 32),
                               max_seq_len=cfg.seq_len, seed=ctx.seed)  # fmt: skip
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            base = None
            for t in cfg.threads:
                torch.set_num_threads(t)
                _step_time(model, opt, batch, 2)  # warm-up
                sec = statistics.median(_step_time(model, opt, batch, cfg.steps) for _ in range(cfg.repeats))
                base = base or sec
                rows.append({
                    "d_model": d, "n_layers": cfg.n_layers, "threads": t,
                    "params": sum(p.numel() for p in model.parameters()), "step_ms": 1e3 * sec,
                    "tokens_per_s": cfg.batch_size * cfg.seq_len / sec, "speedup_vs_1_thread": base / sec,
                })  # fmt: skip
                bar.advance(1)
    return {"rows": rows}
