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

PRESETS: dict[str, dict[str, Any]] = {
    "quick": {"train": {"steps": 200, "eval_every": 100, "checkpoint_every": 100}},
    # the full softmax trained to its plateau (up to 4 x 600 steps), every head given its budget, the map's
    # full-softmax run counted (hybrid-counted) or not needed (learned); test split scored once per run
    "fair": {
        "train": {"steps": 600, "eval_every": 100, "checkpoint_every": 200, "eval_tokens": 32768},
        "scratch": {"budget": "plateau", "probe_factor": 4, "patience": 3, "code_fractions": [128, 256],
                    "mappings": ["equal_mass", "learned", "hybrid", "hybrid-counted"], "bias": [True],
                    "residual_ranks": [0], "paper_recipe": False, "seeds": [0, 1]},
        "pretrained": {"enabled": False},
    },
    "full": {
        "train": {"steps": 600, "eval_every": 200, "checkpoint_every": 200, "eval_tokens": 65536},
        "scratch": {"code_fractions": [16, 64, 256], "mappings": ["equal_mass", "kmeans", "random", "hybrid"],
                    "bias": [True, False], "residual_ranks": [0, 16], "seeds": [0, 1]},
        "pretrained": {"num_codes": [768, 3072], "train_tokens": 65536, "eval_tokens": 32768, "steps": 400},
    },
}


def _vq_loss(model: Any, inputs: Any, targets: Any) -> Any:
    return model(input_ids=inputs, shift_labels=targets).loss


def _learned_loss(learner: Any) -> Any:
    """The VQ loss that first hands the step's hidden states and targets to a ``MapLearner`` (training steps only)."""
    def loss(model: Any, inputs: Any, targets: Any) -> Any:
        model = getattr(model, "module", model)  # DDP-wrapped under torchrun
        hidden = model.get_decoder()(input_ids=inputs).last_hidden_state
        if model.training:
            learner.observe(hidden, targets)
        return model.get_output_embeddings().loss(hidden, targets)

    return loss


def _train_one(ctx: RunContext[VQLogitsExperimentConfig], name: str, build: Any, data: dict[str, Any], *,
               seed: int, steps: int | None = None, patience: int = 0, loss_fn: Any = None,
               learner: Any = None) -> dict[str, Any]:
    """Train (or resume, or reuse) one sub-run of ``steps`` (default train.steps); returns its record. A full-softmax
    run (``loss_fn`` None) also stores its trained head (kmeans/hybrid maps cluster it)."""
    import dataclasses
    import shutil

    from leanfit.core.io import atomic_save_tensors
    from leanfit.studies.lm.train import next_token_loss, train_lm

    sub = ctx.run.subrun(name)
    if (done := sub.stored()) is not None:
        return done
    cfg = dataclasses.replace(ctx.config.train, steps=steps or ctx.config.train.steps, patience=patience)
    made = build()
    model, result = train_lm(made, data["tokens"]["train"], data["tokens"]["valid"], cfg, run=sub, seed=seed,
                             resume=ctx.resume, loss_fn=loss_fn or next_token_loss, description=name,
                             final_eval={"test": data["tokens"]["test"]})
    record = {"name": name, "val_loss": result.val_loss, "test_loss": result.final_losses["test"],
              "steps": result.step, "best_step": result.best_step, "stopped_early": result.stopped_early,
              "tokens_per_s": result.tokens_per_s}
    if learner is not None:
        record["moved"] = learner.moved
    if ctx.is_main:
        if loss_fn is None:
            atomic_save_tensors(sub.path / "head.safetensors", {"weight": model.get_output_embeddings().weight})
        sub.store(record)
        shutil.rmtree(sub.checkpoint_dir, ignore_errors=True)  # a finished sub-run is never resumed
        (sub.path / "best.safetensors").unlink(missing_ok=True)  # the early-stopping copy (its result is stored)
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


def run_scratch(ctx: RunContext[VQLogitsExperimentConfig], data: dict[str, Any]) -> dict[str, Any]:
    """Every from-scratch run; returns rows (one per run) and the budget (steps of every run, probe records)."""
    import torch
    from safetensors.torch import load_file

    from leanfit.studies.models.tiny_llama import tiny_llama
    from leanfit.vq_logits.hf import replace_lm_head
    from leanfit.vq_logits.learn import MapLearner
    from leanfit.vq_logits.mapping import build_mapping, unigram_floor

    cfg, sc = ctx.config, ctx.config.scratch
    vocab = data["tokenizer"].get_vocab_size()
    counts = torch.bincount(data["tokens"]["train"], minlength=vocab).double()
    m = cfg.model

    def trunk(seed: int) -> Any:
        return tiny_llama(vocab, d_model=m.d_model, n_layers=m.n_layers, n_heads=m.n_heads, ffn_mult=m.ffn_mult,
                          max_seq_len=cfg.train.seq_len, seed=seed)

    def seed_of(s: int) -> int:  # grid seed s under --seed g: the full-s0 run with --seed 0 is lm-baseline's run
        return ctx.seed + s

    budget, probes = cfg.train.steps, {}
    if sc.budget == "plateau":  # the full softmax trains until its validation loss stops improving
        probes = {s: _train_one(ctx, f"probe-s{s}", lambda s=s: trunk(seed_of(s)), data, seed=seed_of(s),
                                steps=sc.probe_factor * cfg.train.steps, patience=sc.patience) for s in sc.seeds}
        budget = max(p["best_step"] for p in probes.values())
    half = budget // 2

    def baseline(s: int) -> dict[str, Any]:
        probe = probes.get(s)
        if probe is not None and probe["best_step"] == probe["steps"] == budget:
            return probe  # trained the budget's schedule on the same batches and ended at its best: the same run
        return _train_one(ctx, f"full-s{s}", lambda: trunk(seed_of(s)), data, seed=seed_of(s), steps=budget)

    baselines = {s: baseline(s) for s in sc.seeds}
    reference = {s: min([baselines[s]] + ([probes[s]] if s in probes else []), key=lambda r: r["val_loss"])
                 for s in sc.seeds}  # the stronger full softmax of each seed: every ratio is against it
    head_file = ctx.run.path / "runs" / baselines[sc.seeds[0]]["name"] / "head.safetensors"
    trained_head = load_file(str(head_file))["weight"]
    if "hybrid-counted" in sc.mappings:
        _train_one(ctx, f"full-half-s{sc.seeds[0]}", lambda: trunk(seed_of(sc.seeds[0])), data,
                   seed=seed_of(sc.seeds[0]), steps=half)
        half_head = load_file(str(ctx.run.path / "runs" / f"full-half-s{sc.seeds[0]}" / "head.safetensors"))["weight"]
    full_params = vocab * m.d_model

    def ratios(rec: dict[str, Any], s: int) -> dict[str, float]:
        ref = reference[s]
        return {"val_loss": rec["val_loss"], "test_loss": rec["test_loss"], "val_ppl": math.exp(rec["val_loss"]),
                "ppl_ratio": math.exp(rec["val_loss"] - ref["val_loss"]),
                "test_ppl_ratio": math.exp(rec["test_loss"] - ref["test_loss"])}

    rows = [{"head": "full softmax", "K": vocab, "mapping": "-", "bias": False, "rank": 0, "seed": s,
             **ratios(reference[s], s), "steps": reference[s]["best_step"], "map_steps": 0,
             "head_params": full_params, "reduction": 0.0, "unigram_floor": 0.0} for s in sc.seeds]
    for f, mapping, bias, rank, seed in _scratch_grid(cfg):
        k = max(1, vocab // f)
        steps, map_steps, learner = budget, 0, None
        if mapping == "hybrid-counted":  # the map's full-softmax run is half of this head's budget
            tokens_to_code = build_mapping("hybrid", vocab_size=vocab, num_codes=k, embeddings=half_head,
                                           counts=counts, seed=seed)
            steps, map_steps = budget - half, half
        else:
            tokens_to_code = build_mapping("equal_mass" if mapping == "learned" else mapping, vocab_size=vocab,
                                           num_codes=k, embeddings=trained_head, counts=counts, seed=seed)
            if mapping in ("kmeans", "hybrid"):  # clusters the baseline's head: a full-softmax run beside the budget
                map_steps = budget
        name = f"K{k}-{mapping}-{'bias' if bias else 'nobias'}{f'-r{rank}' if rank else ''}-s{seed}"
        if (rec := ctx.run.subrun(name).stored()) is None:  # a stored sub-run needs no model
            model = replace_lm_head(trunk(seed_of(seed)), k, mapping=tokens_to_code, counts=counts, token_bias=bias,
                                    residual_rank=rank, bias_init="unigram" if bias else "zeros")
            loss_fn = _vq_loss
            if mapping == "learned":
                learner = MapLearner(model.get_output_embeddings(), every=sc.learn_every,
                                     shrinkage=sc.learn_shrinkage)
                loss_fn = _learned_loss(learner)
            rec = _train_one(ctx, name, lambda model=model: model, data, seed=seed_of(seed), steps=steps,
                             loss_fn=loss_fn, learner=learner)
        params = k * m.d_model + (vocab if bias else 0) + vocab + rank * (m.d_model + vocab)
        rows.append({"head": "vq", "K": k, "mapping": mapping, "bias": bias, "rank": rank, "seed": seed,
                     **ratios(rec, seed), "steps": rec["steps"], "map_steps": map_steps,
                     "head_params": params, "reduction": 1 - params / full_params,
                     "unigram_floor": unigram_floor(counts, tokens_to_code, k)})
    return {"rows": rows, "budget": budget, "probes": list(probes.values()), "baselines": list(baselines.values())}


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
                    "test_ppl_ratio_mean": statistics.fmean(r.get("test_ppl_ratio", math.nan) for r in rs),
                    "val_ppl_mean": statistics.fmean(r["val_ppl"] for r in rs), "reduction": rs[0]["reduction"],
                    "steps": rs[0].get("steps", 0), "map_steps": rs[0].get("map_steps", 0),
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
    probes = results.get("probes") or []
    if probes:
        stops = ", ".join(f"{p['name']}: best step {p['best_step']} of {p['steps']} trained (val ppl "
                          f"{math.exp(p['val_loss']):.1f})" for p in probes)
        rep.text(f"Budget: a full-softmax probe per seed trained until its validation loss stopped improving ({stops}); "
                 f"the latest best step, {results['budget']}, is every run's number of steps (its own cosine "
                 "schedule). Each seed's ratios are against the stronger of its probe's best weights and its "
                 f"{results['budget']}-step full-softmax run. kmeans/hybrid maps cluster that run's trained head, "
                 "beside the budget (map_steps; a probe that ended at the budget is that run); hybrid-counted clusters a full-softmax run of half the budget and "
                 "trains its head the other half; learned starts from equal_mass and moves tokens every "
                 "learn_every steps (leanfit.vq_logits.MapLearner), no full-softmax run.")
    rep.text(f"V = {results['vocab_size']}, d = {results['d_model']}; ratio = exp(loss - full-softmax loss of the same "
             "seed) on the validation split (configs are compared on it) and on the test split (scored once per run); "
             "reduction counts codebook + bias + map against V x d. Unigram floor: excess loss (nats) a bias-free "
             "head with this map cannot avoid.")
    columns = ["head", "K", "mapping", "bias", "rank", "seeds", "ppl_ratio_mean", "ppl_ratio_std"]
    if probes:
        columns += ["test_ppl_ratio_mean", "steps", "map_steps"]
    rep.table(results["summary"], [*columns, "val_ppl_mean", "reduction", "unigram_floor"])
    if (pick := results.get("headline", {}).get("at_97")) is not None:
        rep.text(f"At >= 97% reduction the best head on validation is K={pick['K']} {pick['mapping']} "
                 f"({100 * pick['reduction']:.2f}%): validation ratio {pick['ppl_ratio_mean']:.3f}, test ratio "
                 f"{pick['test_ppl_ratio_mean']:.3f} (mean of {pick['seeds']} seeds).")
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
    scratch = run_scratch(ctx, data)
    rows = scratch["rows"]
    summary = summarise(rows)
    results: dict[str, Any] = {"vocab_size": data["tokenizer"].get_vocab_size(), "d_model": ctx.config.model.d_model,
                               "rows": rows, "summary": summary, "budget": scratch["budget"],
                               "probes": scratch["probes"], "baselines": scratch["baselines"]}
    if ctx.config.pretrained.enabled:
        results["pretrained"] = run_pretrained(ctx)
    vq = [r for r in summary if r["head"] == "vq"]
    best = min(vq, key=lambda r: r["ppl_ratio_mean"]) if vq else None
    if best:
        results["headline"] = {"best_ppl_ratio": best["ppl_ratio_mean"], "at_reduction": best["reduction"],
                               "K": best["K"], "mapping": best["mapping"]}
        high = [r for r in vq if r["reduction"] >= 0.97]
        if high:
            results["headline"]["at_97"] = min(high, key=lambda r: r["ppl_ratio_mean"])
    return results
