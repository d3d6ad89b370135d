"""``leanfit run vq-logits``: VQ-Logits heads against the full-softmax lm-baseline, and on a pretrained model.

(a) From scratch: the lm-baseline trunk and schedule with a full-softmax head (per seed), then VQ heads over
    K = V/f, maps and bias on/off, each trained from scratch on the same token budget. ``kmeans``/``hybrid`` maps
    cluster the trained output embeddings of the seed-0 baseline (the paper builds its codebook from a pretrained
    head). Reported: validation perplexity ratio to the full head of the same seed, head-parameter reduction
    (codebook + bias + map counted), and the unigram floor of each map without bias.
(b) Pretrained: SmolLM2-135M-Instruct's tied output embeddings compressed into a VQ head (Option A), the head
    alone fine-tuned on train text (trunk frozen, so its hidden states are computed once), perplexity ratio to the
    original head on held-out text of another corpus.

Every sub-run has its own folder under ``runs/`` with metrics and checkpoints, so ``--resume`` skips finished
sub-runs and continues the interrupted one.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from leanfit.core.registry import register
from leanfit.studies.vq_logits import pretrained as _pretrained  # noqa: F401  (registers vq-logits-pretrained)
from leanfit.studies.vq_logits.config import VQLogitsExperimentConfig

if TYPE_CHECKING:
    from leanfit.core.report import Report
    from leanfit.core.runner import RunContext
    from leanfit.core.runs import RunDir

__all__ = ["PRESETS"]

PRESETS = {
    "quick": {"train": {"steps": 200, "eval_every": 100, "checkpoint_every": 100}},
    "full": {
        "train": {"steps": 600, "eval_every": 200, "checkpoint_every": 200, "eval_tokens": 65536},
        "scratch": {"code_fractions": [16, 64, 256], "mappings": ["equal_mass", "kmeans", "random", "hybrid"],
                    "bias": [True, False], "residual_ranks": [0, 16], "seeds": [0, 1]},
        "pretrained": {"num_codes": [768, 3072], "train_tokens": 65536, "eval_tokens": 32768, "steps": 400},
    },
}


def _vq_loss(model: Any, inputs: Any, targets: Any) -> Any:
    return model(input_ids=inputs, shift_labels=targets).loss


def _train_one(ctx: RunContext[VQLogitsExperimentConfig], name: str, build: Any, data: dict[str, Any], vq: bool, seed: int) -> dict[str, Any]:
    """Train (or resume, or reuse) one sub-run; returns its record."""
    import shutil

    from leanfit.core.io import atomic_save_tensors
    from leanfit.studies.lm.train import next_token_loss, train_lm

    sub = ctx.run.subrun(name)
    if (done := sub.stored()) is not None:
        return done
    model = build()
    model, result = train_lm(model, data["tokens"]["train"], data["tokens"]["valid"], ctx.config.train, run=sub,
                             seed=seed, resume=ctx.resume, loss_fn=_vq_loss if vq else next_token_loss,
                             description=name)
    record = {"name": name, "val_loss": result.val_loss, "tokens_per_s": result.tokens_per_s}
    if ctx.is_main:
        if not vq:  # the trained full head: kmeans/hybrid maps cluster it
            atomic_save_tensors(sub.path / "head.safetensors", {"weight": model.get_output_embeddings().weight})
        sub.store(record)
        shutil.rmtree(sub.checkpoint_dir, ignore_errors=True)  # a finished sub-run is never resumed
    return record


def _scratch_grid(cfg: VQLogitsExperimentConfig) -> list[tuple[int, str, bool, int, int]]:
    """(fraction, mapping, bias, residual rank, seed) of every VQ head; the paper's recipe is kmeans, no bias, r=0."""
    grid = []
    for seed in cfg.scratch.seeds:
        for f in cfg.scratch.code_fractions:
            combos = [(m, b, r) for m in cfg.scratch.mappings for b in cfg.scratch.bias for r in cfg.scratch.residual_ranks]
            if cfg.scratch.paper_recipe and ("kmeans", False, 0) not in combos:
                combos.append(("kmeans", False, 0))
            grid += [(f, m, b, r, seed) for m, b, r in combos]
    return grid


def run_scratch(ctx: RunContext[VQLogitsExperimentConfig], data: dict[str, Any]) -> list[dict[str, Any]]:
    import torch
    from safetensors.torch import load_file

    from leanfit.studies.models.tiny_llama import tiny_llama
    from leanfit.vq_logits.hf import replace_lm_head
    from leanfit.vq_logits.mapping import build_mapping, unigram_floor

    cfg = ctx.config
    vocab = data["tokenizer"].get_vocab_size()
    counts = torch.bincount(data["tokens"]["train"], minlength=vocab).double()
    m = cfg.model

    def trunk(seed: int) -> Any:
        return tiny_llama(vocab, d_model=m.d_model, n_layers=m.n_layers, n_heads=m.n_heads, ffn_mult=m.ffn_mult,
                          max_seq_len=cfg.train.seq_len, seed=seed)

    def seed_of(s: int) -> int:  # grid seed s under --seed g: the full-s0 run with --seed 0 is lm-baseline's run
        return ctx.seed + s

    baselines = {s: _train_one(ctx, f"full-s{s}", lambda s=s: trunk(seed_of(s)), data, vq=False, seed=seed_of(s))
                 for s in cfg.scratch.seeds}
    trained_head = load_file(str(ctx.run.path / "runs" / f"full-s{cfg.scratch.seeds[0]}" / "head.safetensors"))["weight"]
    full_params = vocab * m.d_model
    rows = [{"head": "full softmax", "K": vocab, "mapping": "-", "bias": False, "rank": 0, "seed": s,
             "val_loss": b["val_loss"],
             "val_ppl": math.exp(b["val_loss"]), "ppl_ratio": 1.0, "head_params": full_params, "reduction": 0.0,
             "unigram_floor": 0.0} for s, b in baselines.items()]
    for f, mapping, bias, rank, seed in _scratch_grid(cfg):
        k = max(1, vocab // f)
        tokens_to_code = build_mapping(mapping, vocab_size=vocab, num_codes=k, embeddings=trained_head, counts=counts,
                                       seed=seed)
        name = f"K{k}-{mapping}-{'bias' if bias else 'nobias'}{f'-r{rank}' if rank else ''}-s{seed}"

        def build(seed: int = seed, tokens_to_code: Any = tokens_to_code, k: int = k, bias: bool = bias,
                  rank: int = rank) -> Any:
            return replace_lm_head(trunk(seed_of(seed)), k, mapping=tokens_to_code, counts=counts, token_bias=bias,
                                   residual_rank=rank, bias_init="unigram" if bias else "zeros")

        rec = _train_one(ctx, name, build, data, vq=True, seed=seed_of(seed))
        params = k * m.d_model + (vocab if bias else 0) + vocab + rank * (m.d_model + vocab)
        rows.append({"head": "vq", "K": k, "mapping": mapping, "bias": bias, "rank": rank, "seed": seed,
                     "val_loss": rec["val_loss"],
                     "val_ppl": math.exp(rec["val_loss"]),
                     "ppl_ratio": math.exp(rec["val_loss"] - baselines[seed]["val_loss"]),
                     "head_params": params, "reduction": 1 - params / full_params,
                     "unigram_floor": unigram_floor(counts, tokens_to_code, k)})
    return rows


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and spread over seeds of each head configuration."""
    import statistics

    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["head"], r["K"], r["mapping"], r["bias"], r["rank"]), []).append(r)
    out = []
    for (head, k, mapping, bias, rank), rs in groups.items():
        ratios = [r["ppl_ratio"] for r in rs]
        out.append({"head": head, "K": k, "mapping": mapping, "bias": bias, "rank": rank, "seeds": len(rs),
                    "ppl_ratio_mean": statistics.fmean(ratios),
                    "ppl_ratio_std": statistics.stdev(ratios) if len(ratios) > 1 else 0.0,
                    "val_ppl_mean": statistics.fmean(r["val_ppl"] for r in rs), "reduction": rs[0]["reduction"],
                    "unigram_floor": rs[0]["unigram_floor"]})
    return sorted(out, key=lambda r: (r["head"] != "full softmax", r["K"], r["ppl_ratio_mean"]))


# --- part (b): a pretrained model's head ---------------------------------------------------------------------------
def _eval_corpus(spec: str) -> tuple[str, list[str]]:
    from leanfit.core.errors import MissingDependencyError
    from leanfit.studies.data.corpora import load_corpus

    if spec != "auto":
        return spec, load_corpus(spec).texts("test") + load_corpus(spec).texts("valid")
    for name in ("austen", "kjv"):
        try:
            corpus = load_corpus(name)
        except MissingDependencyError:
            continue
        return name, corpus.texts("test") + corpus.texts("valid")
    return "", []


def _features(model: Any, tokenizer: Any, texts: list[str], n_tokens: int, seq_len: int) -> tuple[Any, Any]:
    """Final hidden states (n, d) and next-token targets (n,) of the first ``n_tokens`` predictions of ``texts``."""
    import torch

    from leanfit.core.progress import progress_bar

    ids = tokenizer("\n\n".join(texts)[: n_tokens * 12], return_tensors="pt")["input_ids"][0]
    n_win = max(1, min(n_tokens // seq_len, (ids.numel() - 1) // seq_len))
    windows = ids[: n_win * seq_len + 1]
    hs, ys = [], []
    decoder = model.get_decoder()
    with torch.no_grad(), progress_bar(n_win, "trunk features") as bar:
        for w in range(n_win):
            x = windows[w * seq_len : (w + 1) * seq_len + 1]
            hs.append(decoder(input_ids=x[None, :-1]).last_hidden_state[0])
            ys.append(x[1:])
            bar.advance(1)
    return torch.cat(hs), torch.cat(ys)


def run_pretrained(ctx: RunContext[VQLogitsExperimentConfig]) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from leanfit.studies.data.corpora import load_corpus
    from leanfit.studies.models.pretrained import load_pretrained
    from leanfit.vq_logits.head import VQLogitsHead
    from leanfit.vq_logits.mapping import build_mapping

    pc = ctx.config.pretrained
    model, tokenizer = load_pretrained(pc.model)
    model.eval()
    lm_head = model.get_output_embeddings()
    train_corpus = load_corpus(pc.train_corpus)
    eval_name, eval_texts = _eval_corpus(pc.eval_corpus)
    if not eval_texts:
        eval_name, eval_texts = f"{pc.train_corpus} (test split)", train_corpus.texts("test")
    h_train, y_train = _features(model, tokenizer, train_corpus.texts("train"), pc.train_tokens, pc.seq_len)
    h_eval, y_eval = _features(model, tokenizer, eval_texts, pc.eval_tokens, pc.seq_len)
    vocab = lm_head.weight.shape[0]
    counts = torch.bincount(y_train, minlength=vocab).double()
    with torch.no_grad():
        base = F.cross_entropy(lm_head(h_eval).float(), y_eval).item()
    rows = [{"head": "original", "K": vocab, "bias": False, "rank": 0, "eval_loss": base, "eval_ppl": math.exp(base),
             "ppl_ratio": 1.0, "head_params": lm_head.weight.numel(), "reduction": 0.0}]
    gen = torch.Generator().manual_seed(ctx.seed)
    maps = {k: build_mapping(pc.mapping, vocab_size=vocab, num_codes=k, embeddings=lm_head.weight.detach(),
                             counts=counts, seed=ctx.seed) for k in pc.num_codes}  # once per K, shared by ranks
    for k, rank in [(k, r) for k in pc.num_codes for r in pc.residual_ranks]:
        head = VQLogitsHead.from_linear(lm_head, k, mapping=maps[k], residual_rank=rank)
        with torch.no_grad():
            before = head.loss(h_eval, y_eval).item()
        opt = torch.optim.AdamW(head.parameters(), lr=pc.lr, weight_decay=0.0)
        for _ in range(pc.steps):
            idx = torch.randint(0, y_train.numel(), (pc.batch_tokens,), generator=gen)
            loss = head.loss(h_train[idx], y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            after = head.loss(h_eval, y_eval).item()
        params = head.parameter_counts()["total"]
        rows.append({"head": f"vq {pc.mapping} (Option A + head fine-tune)", "K": k, "bias": True, "rank": rank,
                     "eval_loss": after, "eval_ppl": math.exp(after), "ppl_ratio": math.exp(after - base),
                     "ppl_ratio_before_finetune": math.exp(before - base), "head_params": params,
                     "reduction": 1 - params / lm_head.weight.numel()})
    return {"model": pc.model, "train_corpus": pc.train_corpus, "eval_corpus": eval_name,
            "train_tokens": int(y_train.numel()), "eval_tokens": int(y_eval.numel()), "rows": rows}


# --- report and registration ----------------------------------------------------------------------------------------
def report(run: RunDir, results: dict[str, Any]) -> Report:
    from leanfit.core.report import Report

    rep = Report("Results")
    rep.section("(a) From scratch: VQ heads vs the full-softmax lm-baseline (equal token budgets)")
    rep.text(f"V = {results['vocab_size']}, d = {results['d_model']}; ratio = exp(val loss - full-softmax val loss of "
             "the same seed); reduction counts codebook + bias + map against V x d. Unigram floor: excess loss (nats) "
             "a bias-free head with this map cannot avoid.")
    rep.table(results["summary"], ["head", "K", "mapping", "bias", "rank", "seeds", "ppl_ratio_mean", "ppl_ratio_std",
                                   "val_ppl_mean", "reduction", "unigram_floor"])
    _pareto(run, results["summary"])
    rep.figure("plots/pareto.png", "Validation perplexity ratio against head-parameter reduction, per map")
    _curves(run)
    rep.figure("plots/loss_curves.png", "Validation loss during training, every head (seed 0)")
    if results.get("pretrained"):
        p = results["pretrained"]
        rep.section(f"(b) {p['model']}: compressed head, fine-tuned on {p['train_corpus']}")
        rep.text(f"Held-out text: {p['eval_corpus']} ({p['eval_tokens']:,} tokens); head fine-tuned on "
                 f"{p['train_tokens']:,} tokens with the trunk frozen.")
        rep.table(p["rows"])
    return rep


def _pareto(run: RunDir, summary: list[dict[str, Any]]) -> None:
    """One colour per map, one marker and line style per head variant (bias, residual rank); each line joins the
    code counts K of one recipe. Legends beside the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    from leanfit.core.report import save_figure

    vq = [r for r in summary if r["head"] == "vq"]
    mappings = sorted({r["mapping"] for r in vq})
    variants = sorted({(r["bias"], r["rank"]) for r in vq})
    colour = {m: f"C{i % 10}" for i, m in enumerate(mappings)}
    style = {v: (marker, line) for v, marker, line in zip(variants, "osD^v<>p" * 4, ["-", "--", ":", "-."] * 8,
                                                          strict=False)}

    def variant_name(bias: bool, rank: int) -> str:
        return ("bias" if bias else "no bias") + (f", residual r={rank}" if rank else "")

    fig, ax = plt.subplots(figsize=(9.6, 4.6), dpi=110)
    for mapping in mappings:
        for variant in variants:
            pts = sorted((100 * r["reduction"], r["ppl_ratio_mean"], r["ppl_ratio_std"]) for r in vq
                         if r["mapping"] == mapping and (r["bias"], r["rank"]) == variant)
            if pts:
                xs, ys, es = zip(*pts, strict=True)
                ax.errorbar(xs, ys, yerr=es, color=colour[mapping], marker=style[variant][0],
                            linestyle=style[variant][1], capsize=3, markersize=5)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.axhline(1.04, color="grey", lw=0.8, ls=":")
    ax.set(xlabel="head-parameter reduction (%)", ylabel="validation perplexity ratio (log scale)",
           title="vq-logits (a): each line joins the code counts K of one recipe", yscale="log")
    ax.grid(alpha=0.3)
    maps = [Line2D([], [], color=colour[m], lw=2, label=m) for m in mappings]
    refs = [Line2D([], [], color="k", lw=0.8, ls="--", label="full softmax"),
            Line2D([], [], color="grey", lw=0.8, ls=":", label="paper's claim (+4%)")]
    heads = [Line2D([], [], color="0.3", marker=style[v][0], ls=style[v][1], label=variant_name(*v)) for v in variants]
    first = ax.legend(handles=maps + refs, title="map", fontsize=7, title_fontsize=7, loc="upper left",
                      bbox_to_anchor=(1.01, 1.0))
    ax.add_artist(first)
    ax.legend(handles=heads, title="head", fontsize=7, title_fontsize=7, loc="lower left", bbox_to_anchor=(1.01, 0.0))
    save_figure(fig, run.plots_dir / "pareto.png")


def _curves(run: RunDir) -> None:
    from leanfit.core.io import read_jsonl
    from leanfit.core.report import line_plot

    series = {}
    for sub in sorted((run.path / "runs").glob("*-s0")):
        pts = [(m["step"], m["val_loss"]) for m in read_jsonl(sub / "metrics.jsonl") if "val_loss" in m]
        if pts:
            series[sub.name.removesuffix("-s0")] = tuple(zip(*pts, strict=True))
    line_plot(run.plots_dir / "loss_curves.png", series, xlabel="step", ylabel="validation loss (nats/token)",
              title="vq-logits (a): validation loss")


@register("vq-logits", kind="experiment", description="VQ-Logits heads vs full softmax (scratch) and on SmolLM2-135M",
          config_cls=VQLogitsExperimentConfig, presets=PRESETS, report=report)
def run(ctx: RunContext[VQLogitsExperimentConfig]) -> dict[str, Any]:
    from leanfit.studies.lm.experiment import prepare_lm_data

    data = prepare_lm_data(ctx.config.data)
    rows = run_scratch(ctx, data)
    summary = summarise(rows)
    results: dict[str, Any] = {"vocab_size": data["tokenizer"].get_vocab_size(), "d_model": ctx.config.model.d_model,
                               "rows": rows, "summary": summary}
    if ctx.config.pretrained.enabled:
        results["pretrained"] = run_pretrained(ctx)
    vq = [r for r in summary if r["head"] == "vq"]
    best = min(vq, key=lambda r: r["ppl_ratio_mean"]) if vq else None
    if best:
        results["headline"] = {"best_ppl_ratio": best["ppl_ratio_mean"], "at_reduction": best["reduction"],
                               "K": best["K"], "mapping": best["mapping"]}
    return results
