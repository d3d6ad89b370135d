"""``leanfit bench vq-logits``: cost of the output head + loss, VQ-Logits against the heads practitioners use.

Training step (forward + backward of head and loss, gradients for the head's parameters and the hidden states):

- ``vq``: :class:`~leanfit.vq_logits.VQLogitsHead` with a per-token bias, collapsed exact loss (O(N K d + V));
- ``gather``: the same head in the paper's form, materialising the N x V logits by gathering code logits;
- ``linear_ce``: ``nn.Linear`` + ``F.cross_entropy`` (the full-softmax head);
- ``linear_cross_entropy``: PyTorch's fused ``F.linear_cross_entropy`` with its chunked path
  (``LinearCrossEntropyOptions()``), which never holds all N x V logits at once;
- ``adaptive``: ``nn.AdaptiveLogSoftmaxWithLoss`` (cutoffs V/20 and V/5, ``div_value`` 4).

Labels follow a Zipf(1) law over token ids (frequent tokens first, as adaptive softmax assumes). Each measurement
runs in a fresh process (``isolate=true``) so that its peak memory is its own: peak memory is the rise of the
process's resident set (Linux ``VmHWM`` after resetting it through ``/proc/self/clear_refs``; the fallback is that
of :func:`leanfit.core.bench.peak_memory`) over the resident set once inputs and parameters exist, during the
warm-up and timed steps, so it counts activations, gradients and workspace, not the weights.

Decoding: time per generated token of the head alone (batch 1), greedy and sampling, against V.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from leanfit.core.bench import TimingConfig, add_ratios, peak_memory, time_side_by_side, torch_threads
from leanfit.core.config import option
from leanfit.core.memory import run_in_fresh_process
from leanfit.core.registry import register

if TYPE_CHECKING:
    from leanfit.core.report import Report
    from leanfit.core.runner import RunContext
    from leanfit.core.runs import RunDir

__all__ = ["METHODS", "VQLogitsBenchConfig", "measure_decode", "measure_step"]

METHODS = ("vq", "gather", "linear_ce", "linear_cross_entropy", "adaptive")
DECODE_METHODS = ("vq_argmax", "vq_sample", "vq_sample_top_p", "gather_argmax", "dense_argmax", "dense_sample",
                  "dense_sample_top_p")
_VQ_METHODS = ("vq", "gather")


@dataclass
class VQLogitsBenchConfig(TimingConfig):
    ns: list[int] = option(default_factory=lambda: [1024, 4096], help="tokens per step N")
    ds: list[int] = option(default_factory=lambda: [576, 2048], help="hidden sizes d")
    vs: list[int] = option(default_factory=lambda: [32000, 49152, 128256], help="vocabulary sizes V")
    ks: list[int] = option(default_factory=lambda: [256, 1024, 4096], help="codebook sizes K (vq and gather)")
    methods: list[str] = option(default_factory=lambda: list(METHODS), help=f"training-step methods: {METHODS}")
    warmup: int = option(1, help="untimed steps before timing (the first call of some kernels is slow)")
    repeats: int = option(3, help="timed steps at least; the median is reported")
    min_seconds: float = option(1.0, help="keep timing cheap steps until this much time (at most 20 x repeats)")
    decode_vs: list[int] = option(default_factory=lambda: [32000, 49152, 128256, 262144], help="V for decoding")
    decode_d: int = option(576, help="hidden size for decoding")
    decode_k: int = option(1024, help="codebook size for decoding")
    decode_steps: int = option(200, help="timed tokens per decoding method and round; the median is taken")
    decode_rounds: int = option(3, help="rounds of decode timing; the smallest median is reported")
    target: list[int] = option(default_factory=lambda: [4096, 576, 49152, 1024],
                               help="N, d, V, K of the headline comparison")
    threads: int = option(0, help="torch threads (0: torch's default)")
    isolate: bool = option(True, help="one fresh process per measurement (needed for honest peak memory)")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("ns", "ds", "vs", "ks", "decode_vs"):
            bad = [x for x in getattr(self, name) if x < 1]
            if bad:
                raise ValueError(f"{name} contains {bad[0]}: expected positive sizes")
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise ValueError(f"methods contains {unknown[0]!r}: expected any of {', '.join(METHODS)}")
        if self.decode_steps < 1:
            raise ValueError(f"decode_steps={self.decode_steps} is invalid: expected an integer >= 1")
        if self.decode_k > min(self.decode_vs):
            raise ValueError(f"decode_k={self.decode_k} exceeds the smallest of decode_vs={self.decode_vs}: "
                             "expected decode_k <= every V")
        if len(self.target) != 4:
            raise ValueError(f"target={self.target} is invalid: expected [N, d, V, K]")


PRESETS = {
    "quick": {"ns": [4096], "ds": [576], "vs": [32000, 49152], "ks": [256, 1024, 4096], "decode_steps": 100,
              "decode_vs": [32000, 49152, 128256]},
    "full": {},
}


# --- measurements (module level so that a spawned process can run them) ---------------------------------------
def _zipf_labels(n: int, vocab_size: int, generator: Any) -> Any:
    import torch

    probs = 1.0 / torch.arange(1, vocab_size + 1, dtype=torch.float64)
    return torch.multinomial(probs / probs.sum(), n, replacement=True, generator=generator)


def _step_fn(method: str, n: int, d: int, v: int, k: int, seed: int) -> tuple[Any, list[Any]]:
    """A closure computing the loss, and the tensors whose gradients it produces."""
    import torch
    import torch.nn.functional as F

    from leanfit.vq_logits.head import VQLogitsHead

    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).requires_grad_(True)
    labels = _zipf_labels(n, v, g)
    torch.manual_seed(seed)
    if method in _VQ_METHODS:
        head = VQLogitsHead.from_scratch(d, v, k, mapping="random", token_bias=True, seed=seed,
                                         mode="collapsed" if method == "vq" else "gather")
        with torch.no_grad():
            head.bias.normal_(0.0, 1.0, generator=g)
        head.tables()  # decoding tables are not part of a training step
        return (lambda: head.loss(hidden, labels)), [hidden, *head.parameters()]
    if method == "linear_ce":
        linear = torch.nn.Linear(d, v, bias=False)
        return (lambda: F.cross_entropy(linear(hidden), labels)), [hidden, linear.weight]
    if method == "linear_cross_entropy":
        weight = torch.nn.Linear(d, v, bias=False).weight
        options = torch.nn.LinearCrossEntropyOptions()
        return (lambda: F.linear_cross_entropy(hidden, weight, labels, options=options)), [hidden, weight]
    if method == "adaptive":
        asm = torch.nn.AdaptiveLogSoftmaxWithLoss(d, v, cutoffs=[max(1, v // 20), max(2, v // 5)], div_value=4.0)
        return (lambda: asm(hidden, labels).loss), [hidden, *asm.parameters()]
    raise ValueError(f"method={method!r} is invalid: expected any of {', '.join(METHODS)}")


def measure_step(method: str, n: int, d: int, v: int, k: int, *, warmup: int, repeats: int, min_seconds: float = 0.0,
                 seed: int = 0, threads: int = 0) -> dict[str, Any]:
    """Median forward+backward time (ms) and peak extra memory (MB) of one head + loss at (N, d, V, K)."""
    import torch

    with torch_threads(threads, small_workload=False):
        loss_fn, grads_of = _step_fn(method, n, d, v, k, seed)

        def step() -> float:
            for t in grads_of:
                t.grad = None
            loss = loss_fn()
            loss.backward()
            return loss.item()

        losses: list[float] = []
        peak, times = peak_memory(lambda: time_side_by_side(
            {method: step}, repeats=repeats, warmup=warmup, min_seconds=min_seconds,
            on_call=lambda name, seconds, loss: losses.append(loss))[method])
        return {"method": method, "n": n, "d": d, "v": v, "k": k if method in _VQ_METHODS else None,
                "step_ms": 1e3 * statistics.median(times), "step_ms_min": 1e3 * min(times), "timed_steps": len(times),
                "peak_mb": peak.mb, "loss": losses[-1], "threads": torch.get_num_threads()}


def measure_decode(v: int, d: int, k: int, *, steps: int, rounds: int = 3, seed: int = 0,
                   threads: int = 0) -> list[dict[str, Any]]:
    """Head time (microseconds) per generated token at batch 1, for every decoding method, at one V: the smallest
    over ``rounds`` of the median over ``steps`` tokens."""
    import torch

    rows = []
    with torch_threads(threads, small_workload=False):
        calls, hidden = _decode_calls(v, d, k, steps, seed)
        for name, call in calls.items():  # method after method: its tables stay in the cache, as in decoding
            medians = []
            for r in range(rounds):  # the least disturbed round estimates the cost best (as timeit does)
                with torch.inference_mode():
                    times = time_side_by_side({name: _token_by_token(call, hidden)}, repeats=steps,
                                              warmup=min(10, steps) if r == 0 else 0)
                medians.append(statistics.median(times[name]))
            rows.append({"method": name, "v": v, "d": d, "k": k if not name.startswith("dense") else None,
                         "us_per_token": 1e6 * min(medians), "us_per_token_max_round": 1e6 * max(medians),
                         "threads": torch.get_num_threads()})
    return rows


def _token_by_token(call: Callable[[Any], Any], hidden: Any) -> Callable[[], Any]:
    """``call`` on the next hidden state (1, d) of ``hidden`` (steps, 1, d) at every call, cycling."""
    tokens = itertools.cycle(hidden)
    return lambda: call(next(tokens))


def _decode_calls(v: int, d: int, k: int, steps: int, seed: int) -> tuple[dict[str, Any], Any]:
    """One function per decoding method taking a hidden state (1, d), and ``steps`` hidden states (steps, 1, d)."""
    import torch

    from leanfit.vq_logits import functional as VF
    from leanfit.vq_logits.head import VQLogitsHead

    g = torch.Generator().manual_seed(seed)
    head = VQLogitsHead.from_scratch(d, v, k, mapping="random", token_bias=True, seed=seed)
    linear = torch.nn.Linear(d, v, bias=False)
    with torch.no_grad():
        head.bias.normal_(0.0, 1.0, generator=g)
    head.tables()  # built once per model, not per token
    hidden = torch.randn(steps, 1, d, generator=g)
    calls = {
        "vq_argmax": lambda h: head.argmax(h),
        "vq_sample": lambda h: head.sample(h, generator=g),
        "vq_sample_top_p": lambda h: head.sample(h, top_p=0.9, generator=g),
        "gather_argmax": lambda h: ((h @ head.codebook.t())[:, head.mapping] + head.bias).argmax(-1),
        "dense_argmax": lambda h: linear(h).argmax(-1),
        "dense_sample": lambda h: VF.dense_sample(linear(h), generator=g),
        "dense_sample_top_p": lambda h: VF.dense_sample(linear(h), top_p=0.9, generator=g),
    }
    return calls, hidden


# --- the benchmark ----------------------------------------------------------------------------------------------
def _grid(cfg: VQLogitsBenchConfig) -> list[tuple[str, int, int, int, int]]:
    cells = []
    for n in cfg.ns:
        for d in cfg.ds:
            for v in cfg.vs:
                for method in cfg.methods:
                    for k in cfg.ks if method in _VQ_METHODS else [0]:
                        if k <= v:
                            cells.append((method, n, d, v, k))
    return cells


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """Per row: how many times faster / leaner it is than each dense baseline and the gather form at its cell
    (dense baselines have no K); no memory ratio below 1 MB, where the resident-set measure is noise (page
    granularity, allocator reuse)."""
    for base in ("linear_ce", "linear_cross_entropy", "gather"):
        spec = {"method": base} if base == "gather" else {"method": base, "k": None}
        for column, measured, floor in ((f"speedup_vs_{base}", "step_ms", None),
                                        (f"memory_ratio_vs_{base}", "peak_mb", 1.0)):
            add_ratios(rows, match=("n", "d", "v", "k"), baseline=spec, columns={column: measured}, invert=True,
                       floor=floor, self_ratio=False)


def _headline(cfg: VQLogitsBenchConfig, rows: list[dict[str, Any]], decode: list[dict[str, Any]]) -> dict[str, Any]:
    n, d, v, k = cfg.target
    out: dict[str, Any] = {"target": {"n": n, "d": d, "v": v, "k": k}}
    hit = [r for r in rows if (r["method"], r["n"], r["d"], r["v"], r["k"]) == ("vq", n, d, v, k)]
    if hit:
        out.update({key: hit[0][key] for key in hit[0] if key.startswith(("speedup_vs", "memory_ratio_vs"))})
    # flatness over the target's range (smallest V to 128256 when measured, else to the largest V)
    vs = sorted({r["v"] for r in decode})
    if len(vs) > 1:
        lo, hi = vs[0], (128256 if 128256 in vs else vs[-1])
        out["decode_v_range"] = [lo, hi]
        for method in DECODE_METHODS:
            t = {r["v"]: r["us_per_token"] for r in decode if r["method"] == method}
            out[f"decode_{method}_change"] = t[hi] / t[lo] - 1.0
    return out


def _headline_text(h: dict[str, Any]) -> str:
    t = h["target"]
    parts = []
    if "speedup_vs_linear_ce" in h:
        parts.append(f"at N={t['n']}, d={t['d']}, V={t['v']}, K={t['k']}: {h['speedup_vs_linear_ce']:.1f}x faster and "
                     f"{h['memory_ratio_vs_linear_ce']:.1f}x less memory than Linear+CE")
    if "speedup_vs_gather" in h:
        parts.append(f"{h['speedup_vs_gather']:.1f}x faster than the gather form")
    if "decode_vq_argmax_change" in h:
        lo, hi = h["decode_v_range"]
        parts.append(f"head time per token from V={lo} to V={hi}: greedy {100 * h['decode_vq_argmax_change']:+.0f}%, "
                     f"sampling {100 * h['decode_vq_sample_change']:+.0f}%, top-p {100 * h['decode_vq_sample_top_p_change']:+.0f}% "
                     f"(full softmax greedy {100 * h['decode_dense_argmax_change']:+.0f}%)")
    return "; ".join(parts)


def report(run: RunDir, results: dict[str, Any]) -> Report:
    from leanfit.core.report import Report, line_plot

    rows, decode, h = results["rows"], results.get("decode_rows", []), results["summary"]
    n, d, _, k = (h["target"][key] for key in ("n", "d", "v", "k"))
    if not any(r["method"] == "vq" and (r["n"], r["d"], r["k"]) == (n, d, k) for r in rows):
        # the target cell was not measured: plot the largest N, the smallest d and the middle K instead
        ks = sorted({r["k"] for r in rows if r["method"] in _VQ_METHODS})
        n, d, k = max(r["n"] for r in rows), min(r["d"] for r in rows), ks[len(ks) // 2] if ks else None
    rep = Report("Results")
    rep.text(results.get("headline", ""))

    def curve(method: str, key: str, nn: int, dd: int, kk: int | None) -> tuple[list[int], list[float]]:
        pts = sorted((r["v"], r[key]) for r in rows if r["method"] == method and r["n"] == nn and r["d"] == dd
                     and r["k"] == (kk if method in _VQ_METHODS else None))
        return [p[0] for p in pts], [p[1] for p in pts]

    for key, label, fname in (("step_ms", "forward+backward time (ms)", "step_time"),
                              ("peak_mb", "peak extra memory (MB)", "peak_memory")):
        series = {}
        for method in METHODS:
            xs, ys = curve(method, key, n, d, k)
            if xs:
                series[f"{method} (K={k})" if method in _VQ_METHODS else method] = (xs, ys)
        if series:
            line_plot(run.plots_dir / f"{fname}.png", series, xlabel="vocabulary size V", ylabel=label,
                      title=f"head + loss, N={n}, d={d}", logy=True)
            rep.figure(f"plots/{fname}.png", f"{label} of one training step of the head against V (N={n}, d={d})")
    if decode:
        series = {}
        for method in DECODE_METHODS:
            pts = sorted((r["v"], r["us_per_token"]) for r in decode if r["method"] == method)
            if pts:
                series[method] = ([p[0] for p in pts], [p[1] for p in pts])
        line_plot(run.plots_dir / "decode.png", series, xlabel="vocabulary size V", ylabel="head time per token (us)",
                  title=f"decoding, batch 1, d={decode[0]['d']}", logy=True)
        rep.figure("plots/decode.png", "Head time per generated token against V (median over tokens)")
    cols = ["method", "n", "d", "v", "k", "step_ms", "peak_mb", "speedup_vs_linear_ce", "memory_ratio_vs_linear_ce",
            "speedup_vs_linear_cross_entropy", "memory_ratio_vs_linear_cross_entropy", "speedup_vs_gather",
            "memory_ratio_vs_gather", "loss"]
    rep.section("Training step (head + loss, forward + backward)").table(rows, cols)
    if decode:
        rep.section("Decoding (head only, batch 1)").table(decode, ["method", "v", "d", "k", "us_per_token"])
    return rep


@register("vq-logits", kind="benchmark", description="VQ-Logits head + loss against full softmax, fused, adaptive "
          "and gather heads: step time, peak memory, decode time", config_cls=VQLogitsBenchConfig, presets=PRESETS,
          report=report)
def run(ctx: RunContext[VQLogitsBenchConfig]) -> dict[str, Any]:
    from leanfit.core.io import atomic_write_csv
    from leanfit.core.progress import progress_bar

    cfg = ctx.config
    call = run_in_fresh_process if cfg.isolate else (lambda fn, *a, **kw: fn(*a, **kw))
    cells = _grid(cfg)
    rows: list[dict[str, Any]] = []
    with progress_bar(len(cells) + len(cfg.decode_vs), "vq-logits bench") as bar:
        for method, n, d, v, k in cells:
            row = call(measure_step, method, n, d, v, k, warmup=cfg.warmup, repeats=cfg.repeats,
                       min_seconds=cfg.min_seconds, seed=ctx.seed,
                       threads=cfg.threads)
            rows.append(row)
            bar.advance(1, method=method, N=n, d=d, V=v, ms=row["step_ms"])
        decode: list[dict[str, Any]] = []
        for v in cfg.decode_vs:
            decode += call(measure_decode, v, cfg.decode_d, cfg.decode_k, steps=cfg.decode_steps,
                           rounds=cfg.decode_rounds, seed=ctx.seed, threads=cfg.threads)
            bar.advance(1, decode_V=v)
    _add_ratios(rows)
    atomic_write_csv(ctx.run.path / "decode.csv", decode)
    headline = _headline(cfg, rows, decode)
    return {"rows": rows, "decode_rows": decode, "summary": headline, "headline": _headline_text(headline)}
