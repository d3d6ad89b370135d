"""``leanfit bench threads``: training-step throughput of tiny Llama models at each torch thread count, measured
side by side in one process. It backs the thread policy in :mod:`leanfit.core.device` (``threads=0`` picks one
thread for small CPU workloads)."""

from __future__ import annotations

import contextlib
import functools
import statistics
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from leanfit.core.bench import TimingConfig, add_ratios, time_side_by_side, torch_threads
from leanfit.core.config import option
from leanfit.core.registry import register

if TYPE_CHECKING:
    from leanfit.core.report import Report
    from leanfit.core.runner import RunContext
    from leanfit.core.runs import RunDir

__all__ = ["ThreadsBenchConfig"]


@dataclass
class ThreadsBenchConfig(TimingConfig):
    d_models: list[int] = option(default_factory=lambda: [32, 64, 128, 256, 512], help="model widths to measure")
    n_layers: int = option(2, help="decoder layers")
    # a sweep: TimingConfig's single thread count becomes a list here (the name the committed configs use)
    threads: list[int] = option(default_factory=lambda: [1, 2], help="torch thread counts to compare, timed "  # type: ignore[assignment]
                                "side by side; the first is the baseline of speedup_vs_1_thread")
    vocab_size: int = option(8192, help="vocabulary size (full-softmax head)")
    batch_size: int = option(16, help="sequences per step")
    seq_len: int = option(64, help="tokens per sequence")
    steps: int = option(10, help="training steps per timed call")
    repeats: int = option(3, help="timed rounds (one call per thread count each); the median is reported")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.threads or min(self.threads) < 1 or len(set(self.threads)) != len(self.threads):
            raise ValueError(f"threads={self.threads} is invalid: expected distinct positive counts, e.g. [1, 2]")


PRESETS = {"quick": {"d_models": [32, 64], "steps": 5}, "full": {}}


def _train(model: Any, opt: Any, batch: Any, steps: int) -> None:
    import torch.nn.functional as F

    for _ in range(steps):
        logits = model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


@contextlib.contextmanager
def _num_threads(threads: int) -> Iterator[None]:
    """torch's thread count for one timed call, set outside the timer."""
    import torch

    torch.set_num_threads(threads)
    yield


def report(run: RunDir, results: dict[str, Any]) -> Report:
    from leanfit.core.report import Report, line_plot

    rows = results["rows"]
    series = {}
    for t in sorted({r["threads"] for r in rows}):
        pts = sorted((r["d_model"], r["tokens_per_s"]) for r in rows if r["threads"] == t)
        series[f"{t} thread(s)"] = tuple(zip(*pts, strict=True))
    line_plot(run.plots_dir / "threads.png", series, xlabel="d_model", ylabel="training tokens/s",
              title="tiny Llama training throughput by torch threads", logy=True)
    rep = Report("Throughput")
    rep.table(rows, ["d_model", "n_layers", "threads", "params", "step_ms", "tokens_per_s", "speedup_vs_1_thread"])
    rep.figure("plots/threads.png", "Training tokens/s against model width, per thread count (median of repeats)")
    return rep


@register("threads", kind="benchmark", description="tiny-Llama training throughput by torch thread count",
          config_cls=ThreadsBenchConfig, presets=PRESETS, report=report)
def run(ctx: RunContext[ThreadsBenchConfig]) -> dict[str, Any]:
    import torch

    from leanfit.core.progress import progress_bar
    from leanfit.studies.models.tiny_llama import tiny_llama

    cfg = ctx.config
    rows = []
    batch = torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.seq_len + 1),
                          generator=torch.Generator().manual_seed(ctx.seed))
    restored = torch_threads(torch.get_num_threads(), small_workload=False)  # the count in force before the sweep
    with restored, progress_bar(len(cfg.d_models), "threads bench") as bar:
        for d in cfg.d_models:
            model = tiny_llama(cfg.vocab_size, d_model=d, n_layers=cfg.n_layers, n_heads=max(1, d // 32),
                               max_seq_len=cfg.seq_len, seed=ctx.seed)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            calls = dict.fromkeys(cfg.threads, functools.partial(_train, model, opt, batch, cfg.steps))
            times = time_side_by_side(calls, **cfg.timing(), around=_num_threads)
            for t in cfg.threads:
                sec = statistics.median(times[t]) / cfg.steps
                rows.append({
                    "d_model": d, "n_layers": cfg.n_layers, "threads": t,
                    "params": sum(p.numel() for p in model.parameters()), "step_ms": 1e3 * sec,
                    "tokens_per_s": cfg.batch_size * cfg.seq_len / sec,
                })
            bar.advance(1, d_model=d)
    add_ratios(rows, match=("d_model",), baseline={"threads": cfg.threads[0]},
               columns={"speedup_vs_1_thread": "step_ms"}, invert=True)
    return {"rows": rows}
