"""``leanfit run vq-logits-pretrained``: compressing a pretrained model's output layer, recipe by recipe, against
the Sigma-weighted low-rank factorisation of the same layer at equal parameters.

The trunk is frozen and runs once: final hidden states of the distillation domain's train split plus states of
the model's own samples (collected as :func:`leanfit.vq_logits.compress_lm_head` collects them), of its valid
split (config choice) and of the test split of every domain (scored once). Each reduction level sets a parameter
budget ``(1 - reduction) V d``; every head spends at most that (codebook, bias, map and rank-r factors counted):

- ``paper``: plain k-means of the output rows, codes = cluster means, no bias (its K is leanfit-v1's);
- ``leanfit-v1``: the same map with a per-token bias, the head fine-tuned with CE on the labelled train tokens;
- ``freq-sigma``: frequency-ranked singleton codes, Sigma-weighted k-means of the rest, bias exact at the mean
  state, no training (:func:`leanfit.vq_logits.compress.compressed_head`);
- ``distilled`` / ``learned-map``: that start distilled by KL to the original head, map fixed / learned;
- ``rank-r``: learned map plus a rank-r within-cluster term; the split of the budget between codes and rank is
  chosen on the validation split at the start, then distilled;
- baselines: the best rank-r approximation of ``W Sigma^{1/2}`` mapped back (``sigma-svd``,
  :func:`leanfit.studies.vq_logits.lowrank.sigma_svd`), and the same factors distilled (``sigma-svd-distilled``).

Ratio = exp(mean NLL of the head - mean NLL of the original head) on the same tokens. Every head is a sub-run
under ``runs/``, so ``--resume`` skips finished ones; the hidden states are cached in the run folder.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

from leanfit.core.registry import register
from leanfit.studies.vq_logits.config import RECIPES, PretrainedStudyConfig

if TYPE_CHECKING:
    import torch

    from leanfit.core.report import Report
    from leanfit.core.runner import RunContext
    from leanfit.core.runs import RunDir

__all__ = ["PRESETS"]

PRESETS = {
    "quick": {"reductions": [80.0, 95.0], "text_tokens": 2048, "sample_tokens": 256, "valid_tokens": 512,
              "test_tokens": 1024, "steps": 10, "batch_tokens": 256, "rank_shares": [0.5], "kmeans_iters": 3, "reassign_every": 4,
              "other_domains": ["bbc-news"]},
    # sized for a shared 2-core CPU: the trunk pass (with 4,096 sampled tokens) takes about 25 minutes there, a
    # distillation step of 512 states about 3 s; levels run from the highest reduction down
    "full": {"reductions": [98.0, 95.0, 90.0, 80.0, 50.0], "steps": 30, "batch_tokens": 512, "kmeans_iters": 4,
             "threads": 2},
}
BASELINES = ("sigma-svd", "sigma-svd-distilled")
_CHUNK = 512  # rows of V-wide logits at once


# --- data: hidden states, computed once -----------------------------------------------------------------------------
def domain_texts(name: str, split: str) -> list[str] | None:
    """Texts of one split of a domain (a corpus of :mod:`leanfit.studies.data.corpora`, ``bbc-news`` or
    ``rotten-tomatoes``); None when its package is not installed."""
    from leanfit.core.errors import MissingDependencyError
    from leanfit.studies.data.corpora import load_corpus
    from leanfit.studies.data.labelled import bbc_news, rotten_tomatoes

    labelled = {"bbc-news": bbc_news, "rotten-tomatoes": rotten_tomatoes}
    try:
        if name in labelled:
            return list(labelled[name]().split()[split].texts)
        return load_corpus(name).texts(split)
    except MissingDependencyError:
        return None


def _compress_config(pc: PretrainedStudyConfig, seed: int, **over: Any) -> Any:
    """compress_lm_head's settings for this study (what a user passing the same options gets)."""
    from leanfit.vq_logits.compress import CompressConfig

    base = {"num_codes": 1, "max_text_tokens": pc.text_tokens, "sample_tokens": pc.sample_tokens,
            "seq_len": pc.seq_len, "steps": pc.steps, "batch_tokens": pc.batch_tokens, "lr": pc.distil_lr,
            "kmeans_iters": pc.kmeans_iters, "reassign_every": pc.reassign_every, "seed": seed,
            "mapping": "fixed"}
    return CompressConfig(**{**base, **over})


def _eval_states(model: Any, tokenizer: Any, texts: list[str], n_tokens: int, seq_len: int) -> dict[str, Any]:
    """Hidden states h (n, d) and next tokens y (n,) of the first ``n_tokens`` predictions of ``texts``."""
    import torch

    from leanfit.core.progress import progress_bar
    from leanfit.vq_logits.compress import CompressConfig, text_hidden, token_stream

    stream = token_stream(tokenizer, texts, n_tokens + 1)
    cfg = CompressConfig(num_codes=1, seq_len=seq_len)
    with torch.no_grad(), progress_bar(stream.numel(), "trunk states (held out)") as bar:
        h = text_hidden(model, stream, cfg, bar)
    return {"h": h[:-1].contiguous(), "y": stream[1:].contiguous()}


def _fit_states(model: Any, tokenizer: Any, teacher: Any, texts: list[str], pc: PretrainedStudyConfig,
                seed: int) -> dict[str, Any]:
    """The fitting states as compress_lm_head collects them (same seed, same order): h (N, d), stream (n,)."""
    import torch

    from leanfit.vq_logits.compress import collect_hidden, token_stream

    cfg = _compress_config(pc, seed)
    stream = token_stream(tokenizer, texts, cfg.max_text_tokens)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hidden = collect_hidden(model, teacher, stream, cfg)
    return {"h": hidden, "stream": stream}


def prepare_states(run: RunDir, model: Any, tokenizer: Any, teacher: Any, pc: PretrainedStudyConfig,
                   seed: int) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """{"fit", "valid", "test:<domain>", ...} -> tensors, cached in ``states.safetensors``; and the skipped
    domains (not installed)."""
    from safetensors.torch import load_file

    from leanfit.core.io import atomic_save_tensors, atomic_write_json, read_json

    path, meta = run.path / "states.safetensors", run.path / "states.json"
    if path.exists() and meta.exists():
        flat, names = load_file(str(path)), read_json(meta)
        return {n: {k.split("/", 1)[1]: v for k, v in flat.items() if k.split("/", 1)[0] == str(i)}
                for i, n in enumerate(names["splits"])}, names["skipped"]
    states = {"fit": _fit_states(model, tokenizer, teacher, domain_texts(pc.corpus, "train") or [], pc, seed),
              "valid": _eval_states(model, tokenizer, domain_texts(pc.corpus, "valid") or [], pc.valid_tokens,
                                    pc.seq_len)}
    skipped = []
    for name in [pc.corpus, *pc.other_domains]:
        texts = domain_texts(name, "test")
        if texts is None:
            skipped.append(name)
            continue
        states[f"test:{name}"] = _eval_states(model, tokenizer, texts, pc.test_tokens, pc.seq_len)
    splits = list(states)
    atomic_save_tensors(path, {f"{i}/{k}": v.contiguous() for i, n in enumerate(splits)
                               for k, v in states[n].items()})
    atomic_write_json(meta, {"splits": splits, "skipped": skipped})
    return states, skipped


# --- scoring --------------------------------------------------------------------------------------------------------
def mean_nll(head: Any, h: torch.Tensor, y: torch.Tensor) -> float:
    """Mean ``-log p(y | h)`` in nats of a VQ head, a low-rank head or the original layer (``Teacher``)."""
    import torch

    from leanfit.vq_logits.head import VQLogitsHead

    total = 0.0
    with torch.no_grad():
        for hc, yc in zip(h.split(_CHUNK), y.split(_CHUNK), strict=True):
            if isinstance(head, VQLogitsHead):
                lp = head.log_prob(hc.to(head.codebook.dtype), yc)
            else:
                lp = torch.log_softmax(head.logits(hc).float(), -1).gather(1, yc[:, None]).squeeze(1)
            total -= float(lp.double().sum())
    return total / max(y.numel(), 1)


def score(head: Any, states: dict[str, dict[str, Any]], base: dict[str, float], splits: list[str]) -> dict[str, float]:
    """Perplexity ratio to the original head on each split: exp(NLL - original NLL)."""
    return {s: math.exp(mean_nll(head, states[s]["h"], states[s]["y"]) - base[s]) for s in splits}


# --- recipes ---------------------------------------------------------------------------------------------------------
class Level:
    """One reduction level: its budget, the shared fitting data, and starts computed at most once."""

    def __init__(self, reduction: float, teacher: Any, states: dict[str, Any], stats: Any, pc: PretrainedStudyConfig,
                 seed: int) -> None:
        from leanfit.studies.vq_logits.lowrank import budget

        self.reduction, self.teacher, self.states, self.stats, self.pc, self.seed = (reduction, teacher, states,
                                                                                     stats, pc, seed)
        self.vocab, self.d = teacher.weight.shape
        self.budget = budget(self.vocab, self.d, reduction)
        self._cache: dict[Any, tuple[Any, Any, float]] = {}

    def cached(self, key: Any, build: Any) -> tuple[Any, Any, float]:
        """(value, extra, seconds to build), built once per key."""
        if key not in self._cache:
            start = time.perf_counter()
            value, extra = build()
            self._cache[key] = (value, extra, time.perf_counter() - start)
        return self._cache[key]


def _plain_kmeans(lv: Level, k: int) -> tuple[Any, None]:
    import torch

    from leanfit.vq_logits.sigma import sigma_kmeans

    eye = torch.eye(lv.d, dtype=torch.float64)
    labels, _ = sigma_kmeans(lv.teacher.weight, eye, k, ridge=0.0, iters=lv.pc.kmeans_iters, seed=lv.seed)
    return labels, None


def _linear(teacher: Any) -> Any:
    from torch import nn

    v, d = teacher.weight.shape
    lin = nn.Linear(d, v, bias=teacher.bias is not None)
    lin.weight.data = teacher.weight
    if teacher.bias is not None:
        lin.bias.data = teacher.bias
    return lin


def _paper(lv: Level) -> tuple[Any, float, dict[str, Any]]:
    from leanfit.studies.vq_logits.lowrank import vq_shape
    from leanfit.vq_logits.head import VQLogitsHead

    k = vq_shape(lv.vocab, lv.d, lv.budget, bias=True)
    labels, _, secs = lv.cached(("kmeans", k), lambda: _plain_kmeans(lv, k))
    start = time.perf_counter()
    head = VQLogitsHead.from_linear(_linear(lv.teacher), k, mapping=labels, token_bias=False)
    return head, secs + time.perf_counter() - start, {}


def _v1(lv: Level) -> tuple[Any, float, dict[str, Any]]:
    import torch

    from leanfit.core.progress import progress_bar
    from leanfit.studies.vq_logits.lowrank import vq_shape
    from leanfit.vq_logits.head import VQLogitsHead

    k = vq_shape(lv.vocab, lv.d, lv.budget, bias=True)
    labels, _, secs = lv.cached(("kmeans", k), lambda: _plain_kmeans(lv, k))
    start = time.perf_counter()
    head = VQLogitsHead.from_linear(_linear(lv.teacher), k, mapping=labels, token_bias=True)
    stream = lv.states["fit"]["stream"]
    h, y = lv.states["fit"]["h"][: stream.numel() - 1], stream[1:]
    g = torch.Generator().manual_seed(lv.seed)
    opt = torch.optim.AdamW(head.parameters(), lr=lv.pc.finetune_lr, weight_decay=0.0)
    with progress_bar(lv.pc.steps, f"leanfit-v1 CE fine-tune ({lv.reduction:g}%)") as bar:
        for _ in range(lv.pc.steps):
            idx = torch.randint(0, y.numel(), (lv.pc.batch_tokens,), generator=g)
            loss = head.loss(h[idx], y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            bar.advance(1, loss=float(loss.detach()))
    return head, secs + time.perf_counter() - start, {}


def _freq_start(lv: Level, k: int, rank: int) -> tuple[Any, Any, float]:
    from leanfit.vq_logits.compress import compressed_head

    cfg = _compress_config(lv.pc, lv.seed, num_codes=k, residual_rank=rank)
    return lv.cached(("freq", k, rank), lambda: compressed_head(lv.teacher, lv.stats, cfg))


def _distil(lv: Level, head: Any, clustered: Any, mapping: str, rank: int) -> float:
    """Distil ``head`` in place as compress_lm_head does; returns the seconds."""
    import torch

    from leanfit.vq_logits.compress import distil_head

    cfg = _compress_config(lv.pc, lv.seed, num_codes=head.num_codes, residual_rank=rank, mapping=mapping)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(lv.seed)
        distil_head(head, lv.states["fit"]["h"], lv.teacher, lv.stats, cfg, clustered)
    return time.perf_counter() - start


def _freq_recipe(lv: Level, recipe: str) -> tuple[Any, float, dict[str, Any]]:
    import copy

    from leanfit.studies.vq_logits.lowrank import vq_shape

    k = vq_shape(lv.vocab, lv.d, lv.budget, bias=True)
    start, clustered, secs = _freq_start(lv, k, 0)
    head = copy.deepcopy(start)
    if recipe != "freq-sigma":
        secs += _distil(lv, head, clustered, "learned" if recipe == "learned-map" else "fixed", 0)
    return head, secs, {}


def rank_candidates(vocab: int, d: int, params: int, shares: list[float]) -> list[tuple[int, int]]:
    """(K, r) of the rank-r recipe for each share of the budget left after bias and map; distinct, K >= 2."""
    from leanfit.studies.vq_logits.lowrank import vq_shape

    out = []
    for share in shares:
        r = max(1, int(share * (params - 2 * vocab) / (vocab + d)))
        k = vq_shape(vocab, d, params, bias=True, rank=r)
        if k >= 2 and k * d + 2 * vocab + r * (vocab + d) <= params and (k, r) not in out:
            out.append((k, r))
    return out


def _rank_recipe(lv: Level, base: dict[str, float]) -> tuple[Any, float, dict[str, Any]]:
    import copy

    cands = rank_candidates(lv.vocab, lv.d, lv.budget, lv.pc.rank_shares)
    if not cands:
        raise ValueError(f"rank_shares={lv.pc.rank_shares} leave no code at {lv.reduction:g}% reduction: "
                         "lower the shares")
    valid, secs = {}, 0.0
    for k, r in cands:
        head, _, s = _freq_start(lv, k, r)
        secs += s
        valid[(k, r)] = score(head, lv.states, base, ["valid"])["valid"]
    k, r = min(valid, key=lambda kr: valid[kr])
    start, clustered, _ = _freq_start(lv, k, r)
    head = copy.deepcopy(start)
    secs += _distil(lv, head, clustered, "learned", r)
    return head, secs, {"candidates": [{"K": c[0], "rank": c[1], "valid_ratio_at_start": v}
                                       for c, v in valid.items()]}


# --- the low-rank baseline, optionally distilled -------------------------------------------------------------------
def distil_low_rank(head: Any, hidden: torch.Tensor, teacher: Any, steps: int, batch_tokens: int, lr: float,
                    seed: int) -> list[float]:
    """Adam on ``KL(teacher || head)`` with the schedule of compress_lm_head (cosine decay, epochs of random
    minibatches of hidden (N, d), ``_CHUNK`` rows of logits at once); returns each step's mean KL."""
    import torch

    from leanfit.core.progress import progress_bar

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / max(steps, 1))))
    order, at, losses = torch.randperm(hidden.shape[0], generator=g), 0, []
    with progress_bar(steps, "sigma-svd: distilling") as bar:
        for _ in range(steps):
            if at >= order.numel():
                order, at = torch.randperm(hidden.shape[0], generator=g), 0
            rows, at = order[at:at + batch_tokens], at + batch_tokens
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for chunk in rows.split(_CHUNK):
                with torch.no_grad():
                    log_p = torch.log_softmax(teacher.logits(hidden[chunk]).float(), -1)
                log_q = torch.log_softmax(head.logits(hidden[chunk]), -1)
                loss = (log_p.exp() * (log_p - log_q)).sum() / rows.numel()
                loss.backward()
                total += float(loss.detach())
            opt.step()
            sched.step()
            losses.append(total)
            bar.advance(1, kl=total)
    return losses


def _baseline(lv: Level, name: str) -> tuple[Any, float, dict[str, Any]]:
    import copy

    from leanfit.studies.vq_logits.lowrank import LowRankHead, rank_for

    r = rank_for(lv.vocab, lv.d, lv.budget)
    start, _, secs = lv.cached(("svd", r), lambda: (LowRankHead.from_weight(lv.teacher.weight, lv.stats.second, r),
                                                    None))
    head = copy.deepcopy(start)
    if name == "sigma-svd-distilled":
        t0 = time.perf_counter()
        distil_low_rank(head, lv.states["fit"]["h"], lv.teacher, lv.pc.steps, lv.pc.batch_tokens, lv.pc.distil_lr,
                        lv.seed)
        secs += time.perf_counter() - t0
    return head, secs, {}


# --- the run ---------------------------------------------------------------------------------------------------------
def _build(lv: Level, recipe: str, base: dict[str, float]) -> tuple[Any, float, dict[str, Any]]:
    if recipe == "paper":
        return _paper(lv)
    if recipe == "leanfit-v1":
        return _v1(lv)
    if recipe in ("freq-sigma", "distilled", "learned-map"):
        return _freq_recipe(lv, recipe)
    if recipe == "rank-r":
        return _rank_recipe(lv, base)
    return _baseline(lv, recipe)


def check_level(vocab: int, d: int, reduction: float) -> None:
    """Refuse a reduction whose budget cannot hold a VQ head's bias, map and two codes."""
    from leanfit.core.errors import ConfigError, bad_value
    from leanfit.studies.vq_logits.lowrank import budget

    if budget(vocab, d, reduction) < 2 * vocab + 2 * d:
        most = 100 * (1 - (2 * vocab + 2 * d) / (vocab * d))
        raise ConfigError(bad_value("reductions", reduction, f"at most {most:.1f}% for V={vocab}, d={d} (the "
                                    "per-token bias and map alone take 2V parameters)", "lower that reduction"))


def _params(head: Any) -> tuple[int, int, int]:
    """(parameters, K, rank) of a VQ or low-rank head; K = 0 for the low-rank one."""
    from leanfit.vq_logits.head import VQLogitsHead

    if isinstance(head, VQLogitsHead):
        return head.parameter_counts()["total"], head.num_codes, head.residual_rank
    return head.parameter_count(), 0, head.a.shape[1]


def _record(ctx: RunContext[PretrainedStudyConfig], lv: Level, recipe: str, base: dict[str, float],
            tests: list[str]) -> dict[str, Any]:
    """Build, score and store one head (or reuse the stored record)."""
    sub = ctx.run.subrun(f"{recipe}-{lv.reduction:g}")
    if (done := sub.stored()) is not None:
        return done
    head, seconds, extra = _build(lv, recipe, base)
    params, k, rank = _params(head)
    full = lv.vocab * lv.d
    ratios = score(head, lv.states, base, ["valid", *tests])
    return sub.store({"recipe": recipe, "level": lv.reduction, "K": k, "rank": rank, "head_params": params,
                      "budget": lv.budget, "reduction": 100 * (1 - params / full),
                      "valid_ratio": ratios["valid"], "ratios": {t.split(":", 1)[1]: ratios[t] for t in tests},
                      "compress_s": seconds, **extra})


def _original(ctx: RunContext[PretrainedStudyConfig], teacher: Any, states: dict[str, Any]) -> dict[str, float]:
    sub = ctx.run.subrun("original")
    if (done := sub.stored()) is not None:
        return dict(done["nll"])
    splits = [s for s in states if s != "fit"]
    return dict(sub.store({"nll": {s: mean_nll(teacher, states[s]["h"], states[s]["y"]) for s in splits}})["nll"])


@register("vq-logits-pretrained", kind="experiment",
          description="SmolLM2-135M's output layer compressed by each VQ recipe vs the Sigma-SVD low rank",
          config_cls=PretrainedStudyConfig, presets=PRESETS, report=lambda run, res: report(run, res))
def run(ctx: RunContext[PretrainedStudyConfig]) -> dict[str, Any]:
    from leanfit.core.device import configure_threads
    from leanfit.studies.models.pretrained import load_pretrained
    from leanfit.vq_logits.compress import output_layer, statistics

    pc = ctx.config
    threads = configure_threads(pc.threads, small_workload=False)
    model, tokenizer = load_pretrained(pc.model)
    model.eval().requires_grad_(False)
    teacher = output_layer(model)
    states, skipped = prepare_states(ctx.run, model, tokenizer, teacher, pc, ctx.seed)
    fit = states["fit"]
    counts = fit["stream"].bincount(minlength=teacher.weight.shape[0])
    stats = statistics(fit["h"], teacher, counts, _compress_config(pc, ctx.seed).prior_weight, seed=ctx.seed)
    base = _original(ctx, teacher, states)
    tests = [s for s in states if s.startswith("test:")]
    vocab, d = teacher.weight.shape
    rows = [{"recipe": "original", "level": 0.0, "K": vocab, "rank": 0, "head_params": vocab * d, "budget": vocab * d,
             "reduction": 0.0, "valid_ratio": math.exp(base["valid"] - base["valid"]),
             "ratios": {t.split(":", 1)[1]: math.exp(base[t] - base[t]) for t in tests}, "compress_s": 0.0}]
    names = [r for r in RECIPES if r in pc.recipes] + list(BASELINES if pc.distil_baseline else BASELINES[:1])
    for reduction in pc.reductions:
        check_level(vocab, d, reduction)
        lv = Level(reduction, teacher, states, stats, pc, ctx.seed)
        rows += [_record(ctx, lv, name, base, tests) for name in names]
    return {"model": pc.model, "vocab_size": int(vocab), "d_model": int(d), "corpus": pc.corpus,
            "domains": [t.split(":", 1)[1] for t in tests], "skipped_domains": skipped, "threads": threads,
            "fit_tokens": int(fit["h"].shape[0]), "text_tokens": int(fit["stream"].numel()),
            "valid_tokens": int(states["valid"]["y"].numel()),
            "test_tokens": {t.split(":", 1)[1]: int(states[t]["y"].numel()) for t in tests},
            "original_nll": base, "rows": rows}


# --- report ------------------------------------------------------------------------------------------------------
def table_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per head: recipe, K, rank, parameters, reduction, test ratio per domain, seconds."""
    out = []
    for r in results["rows"]:
        row = {"recipe": r["recipe"], "level %": r["level"], "K": r["K"], "rank": r["rank"],
               "head params": r["head_params"], "reduction %": r["reduction"], "valid ratio": r["valid_ratio"]}
        row.update({f"ratio {dom}" + (" (in-domain)" if dom == results["corpus"] else ""): v
                    for dom, v in r["ratios"].items()})
        row["compress s"] = r["compress_s"]
        out.append(row)
    return out


def report(run: RunDir, results: dict[str, Any]) -> Report:
    from leanfit.core.report import Report

    rep = Report("Results")
    rep.section(f"{results['model']}: compressed output layers against the Sigma-SVD low rank")
    skipped = results["skipped_domains"]
    rep.text(f"V = {results['vocab_size']:,}, d = {results['d_model']}; trunk frozen. Heads fitted on "
             f"{results['text_tokens']:,} tokens of {results['corpus']} (train split) + "
             f"{results['fit_tokens'] - results['text_tokens']:,} tokens sampled from the model; configs chosen on "
             f"{results['valid_tokens']:,} validation tokens; test tokens per domain: "
             + ", ".join(f"{k} {v:,}" for k, v in results["test_tokens"].items())
             + (f" (not installed, skipped: {', '.join(skipped)})" if skipped else "")
             + f". Ratio = test perplexity / the original head's on the same tokens; reduction counts codebook, "
             f"bias, map and rank-r factors against V x d; {results['threads']} torch threads; compress s = start "
             "+ training of the head (the shared trunk pass excluded).")
    rep.table(table_rows(results))
    pareto(run, results)
    rep.figure("plots/pareto.png", "Test perplexity ratio against head-parameter reduction, per recipe and domain")
    return rep


def pareto(run: RunDir, results: dict[str, Any]) -> None:
    """One panel per domain, one colour per recipe, log y, legend outside the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from leanfit.core.report import save_figure

    domains = results["domains"]
    rows = [r for r in results["rows"] if r["recipe"] != "original"]
    recipes = list(dict.fromkeys(r["recipe"] for r in rows))
    fig, axes = plt.subplots(1, len(domains), figsize=(4.2 * len(domains) + 2.2, 4.2), dpi=110, squeeze=False)
    for ax, dom in zip(axes[0], domains, strict=True):
        for i, recipe in enumerate(recipes):
            pts = sorted((r["reduction"], r["ratios"][dom]) for r in rows if r["recipe"] == recipe)
            style = "--" if recipe in BASELINES else "-"
            ax.plot(*zip(*pts, strict=True), marker="o", ms=4, ls=style, color=f"C{i % 10}", label=recipe)
        ax.axhline(1.0, color="k", lw=0.8, ls=":")
        ax.set(yscale="log", xlabel="head-parameter reduction (%)", title=dom + (" (in-domain)"
                                                                                  if dom == results["corpus"] else ""))
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("test perplexity ratio to the original head (log)")
    axes[0][-1].legend(title="recipe", fontsize=7, title_fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    save_figure(fig, run.plots_dir / "pareto.png")
