"""The stages of ``leanfit run noisefit``: world and tokenizer, pretraining (per seed or shared), one fine-tuning
run per (arm, setting, seed) through a ``transformers.Trainer``, validation-based selection, one test scoring,
bootstrap summaries. Every stage writes its result under the run folder, so ``--resume`` skips finished work."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from leanfit.core.runner import RunContext
    from leanfit.studies.noisefit.config import NoiseFiTExperimentConfig

__all__ = ["NoiseFiTData", "arm_settings", "prepare", "run_benchmark", "summarise"]


def arm_settings(cfg: Any, arm: str) -> list[dict[str, Any]]:
    """The hyper-parameter settings tried for ``arm`` (one dict per setting)."""
    grids = {
        "sft": [{}],
        "label_smoothing": [{"label_smoothing": v} for v in cfg.label_smoothing],
        "neftune": [{"neftune_alpha": v} for v in cfg.neftune_alpha],
        "rdrop": [{"rdrop_alpha": v} for v in cfg.rdrop_alpha],
        "noisefit_paper": [{"noise": v, "layers": cfg.paper_layers} for v in cfg.paper_noise],
        "noisefit": [{"noise": v, "layers": cfg.noisefit_layers} for v in cfg.noisefit_noise],
    }
    return grids[arm]


def _setting_name(arm: str, setting: dict[str, Any], seed: int) -> str:
    tag = "-".join(f"{k}{v}" for k, v in setting.items() if k != "layers")
    return f"{arm}{'-' + tag if tag else ''}-s{seed}"


# -- data and pretraining --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NoiseFiTData:
    """What every stage reads: the fact world, its tokenizer, the SFT features and the pretraining text."""

    world: Any  # FactWorld
    tokenizer: Any  # PreTrainedTokenizerFast trained on the pretraining text and the SFT examples
    train_features: list[dict[str, Any]]  # tokenized SFT examples (qa_features)
    pretrain_text: list[str]  # paraphrased fact sentences
    heldout: list[str]  # held-out sentences for the pretraining loss


def prepare(cfg: Any) -> NoiseFiTData:
    from leanfit.core.progress import stage
    from leanfit.studies.noisefit.facts_qa import heldout_sentences, pretrain_text, qa_example
    from leanfit.studies.noisefit.hallucination import build_tokenizer, qa_features

    with stage("data: fact world, pretraining text, BPE tokenizer and QA features"):
        world = cfg.world.build()
        text = pretrain_text(world, paraphrases=cfg.paraphrases)
        tokenizer = build_tokenizer(text + ["".join(qa_example(f)) for f in world.sft_train], cfg.vocab_size)
        return NoiseFiTData(world=world, tokenizer=tokenizer, train_features=qa_features(tokenizer, world.sft_train),
                            pretrain_text=text, heldout=heldout_sentences(world))


def pretrained_model(ctx: RunContext[NoiseFiTExperimentConfig], data: NoiseFiTData, seed: int) -> Path:
    """Folder of the model pretrained for ``seed`` (trained now unless already saved)."""
    import torch

    from leanfit.core.io import atomic_dir
    from leanfit.studies.lm.data import encode_documents
    from leanfit.studies.lm.train import train_lm
    from leanfit.studies.models.tiny_llama import tiny_llama

    cfg = ctx.config
    sub = ctx.run.subrun(f"pretrain-s{seed}" if cfg.pretrain_per_seed else "pretrain-shared")
    folder = sub.path / "model"
    if (folder / "config.json").exists():  # the saved model is this sub-run's result
        return folder
    tok = data.tokenizer
    train = encode_documents(tok.backend_tokenizer, data.pretrain_text, tok.eos_token_id)
    valid = encode_documents(tok.backend_tokenizer, data.heldout, tok.eos_token_id)
    m = cfg.model
    model = tiny_llama(len(tok), d_model=m.d_model, n_layers=m.n_layers, n_heads=m.n_heads, ffn_mult=m.ffn_mult,
                       max_seq_len=max(cfg.pretrain.seq_len, 128), tie_embeddings=m.tie_embeddings, seed=seed)
    model, _ = train_lm(model, train, valid, cfg.pretrain, run=sub, seed=seed, resume=ctx.resume,
                        small_workload=True, description=f"pretrain (seed {seed})")
    if ctx.is_main:
        with atomic_dir(folder) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
    if torch.distributed.is_initialized():  # the other processes load the saved folder next
        torch.distributed.barrier()
    return folder


# -- fine-tuning -----------------------------------------------------------------------------------------------------
def _trainer(arm: str, setting: dict[str, Any], model: Any, data: NoiseFiTData, cfg: Any, seed: int,
             out: Path, report_to: Sequence[str] = ()) -> Any:
    from transformers import PrinterCallback, Trainer, TrainingArguments

    from leanfit.noisefit.config import NoiseFiTConfig
    from leanfit.noisefit.trainer import NoiseFiTTrainer, RDropTrainer
    from leanfit.studies.noisefit.hallucination import batch_to_tensors

    sft = cfg.sft
    args = TrainingArguments(
        output_dir=str(out), max_steps=sft.steps, per_device_train_batch_size=sft.batch_size,
        learning_rate=sft.lr, lr_scheduler_type="cosine", warmup_steps=int(sft.warmup_ratio * sft.steps),
        weight_decay=sft.weight_decay, seed=seed, data_seed=seed, report_to=list(report_to), save_strategy="no",
        logging_steps=max(1, sft.steps // 10), disable_tqdm=True, use_cpu=True, dataloader_num_workers=0,
        label_smoothing_factor=setting.get("label_smoothing", 0.0), neftune_noise_alpha=setting.get("neftune_alpha"),
        remove_unused_columns=False,
    )
    pad = data.tokenizer.pad_token_id
    common = {"model": model, "args": args, "train_dataset": data.train_features,
              "data_collator": lambda feats: batch_to_tensors(feats, pad)}
    if arm == "rdrop":
        trainer = RDropTrainer(**common, rdrop_alpha=setting["rdrop_alpha"])
    elif arm in ("noisefit", "noisefit_paper"):
        nf = NoiseFiTConfig(layers=setting["layers"], rel_noise=setting["noise"], paper_v1=arm == "noisefit_paper",
                            seed=seed)
        trainer = NoiseFiTTrainer(**common, noisefit_config=nf)
    else:
        trainer = Trainer(**common)
    trainer.remove_callback(PrinterCallback)  # one progress bar over all arms instead of per-step log lines
    return trainer


def finetune(ctx: RunContext[NoiseFiTExperimentConfig], data: NoiseFiTData, arm: str, setting: dict[str, Any], seed: int,
             validate: bool = True) -> dict[str, Any]:
    """Fine-tune one arm/setting/seed from its pretrained model; returns its record, with validation metrics if
    ``validate`` (only the first seed's choose a setting)."""
    import torch
    from transformers import LlamaForCausalLM

    from leanfit.core.io import atomic_dir
    from leanfit.studies.noisefit.hallucination import score_items

    cfg = ctx.config
    name = _setting_name(arm, setting, seed)
    subrun = ctx.run.subrun(name)
    if (done := subrun.stored()) is not None:
        return done
    sub = subrun.path
    base = pretrained_model(ctx, data, seed)
    kwargs = {"attention_dropout": cfg.sft.rdrop_dropout} if arm == "rdrop" else {}
    model = LlamaForCausalLM.from_pretrained(base, **kwargs)
    torch.manual_seed(seed)
    trainer = _trainer(arm, setting, model, data, cfg, seed, sub / "trainer", ctx.report_to)
    began = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - began
    model = trainer.model
    model.config.attention_dropout = 0.0
    world = data.world
    record = {"name": name, "arm": arm, "setting": setting, "seed": seed, "train_seconds": seconds,
              "step_seconds": seconds / cfg.sft.steps, "train_loss": float(out.training_loss)}
    if validate:
        scores = score_items(model, data.tokenizer, world, world.evaluation("valid"),
                             closed_set_size=cfg.closed_set_size)
        record["valid"] = _summary(scores, cfg.tau)
    calibration = getattr(trainer, "calibration", None)
    if calibration is not None:
        record["calibration"] = calibration.to_dict()
    if ctx.is_main:
        with atomic_dir(sub / "model") as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
    return subrun.store(record)


def _summary(scores: dict[str, Any], tau: float) -> dict[str, dict[str, float]]:
    import numpy as np

    from leanfit.studies.noisefit.metrics import evaluation_summary

    summary = evaluation_summary(scores["confidence"], scores["correct"], scores["abstained"], scores["split"],
                                 tau=tau)
    known = ~np.isnan(scores["closed_correct"])
    if known.any():
        summary["known"]["closed_set_accuracy"] = float(scores["closed_correct"][known].mean())
    return summary


def _valid_em(record: dict[str, Any]) -> float:
    return record["valid"]["known"]["accuracy"]


def _valid_cw(record: dict[str, Any]) -> float:
    return record["valid"]["unknown"]["confident_wrong_rate"]


# -- test scoring and summaries ----------------------------------------------------------------------------------
def score_test(ctx: RunContext[NoiseFiTExperimentConfig], data: NoiseFiTData, record: dict[str, Any]) -> dict[str, Any]:
    """Test-split arrays of one chosen model (scored once; cached in its folder)."""
    import numpy as np
    from transformers import LlamaForCausalLM

    from leanfit.core.io import atomic_write_bytes
    from leanfit.studies.noisefit.hallucination import heldout_loss, score_items

    sub = ctx.run.subrun(record["name"]).path
    cache = sub / "test_scores.npz"
    if not cache.exists():
        model = LlamaForCausalLM.from_pretrained(sub / "model")
        world = data.world
        scores = score_items(model, data.tokenizer, world, world.evaluation("test"),
                             closed_set_size=ctx.config.closed_set_size)
        scores["heldout_loss"] = np.array([heldout_loss(model, data.tokenizer, data.heldout)])
        import io

        buf = io.BytesIO()
        np.savez(buf, **{k: (v.astype(str) if v.dtype == object else v) for k, v in scores.items()})
        atomic_write_bytes(cache, buf.getvalue())
    with np.load(cache, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def run_benchmark(ctx: RunContext[NoiseFiTExperimentConfig]) -> dict[str, Any]:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight loading/saving bars of every arm would bury the run's own bar
    try:
        return _run_benchmark(ctx)
    finally:
        hf_logging.enable_progress_bar()


def _run_benchmark(ctx: RunContext[NoiseFiTExperimentConfig]) -> dict[str, Any]:
    from leanfit.core.device import configure_threads
    from leanfit.core.progress import progress_bar
    from leanfit.core.stats import choose_within_drop

    cfg = ctx.config
    threads = configure_threads(cfg.threads, small_workload=True)
    data = prepare(cfg)
    first = cfg.seeds[0]
    chosen: dict[str, dict[str, Any]] = {}
    sweeps = []
    n_runs = sum(len(arm_settings(cfg, a)) for a in cfg.arms) + len(cfg.arms) * (len(cfg.seeds) - 1)
    with progress_bar(n_runs, "noisefit arms") as bar:
        records: list[dict[str, Any]] = []
        for arm in cfg.arms:
            sweep = [finetune(ctx, data, arm, s, first) for s in arm_settings(cfg, arm)]
            bar.advance(len(sweep), arm=arm)
            sft_em = _valid_em(chosen["sft"] if "sft" in chosen else sweep[0])
            # the lowest unknown-split confident-wrong rate among the settings within max_em_drop of SFT's EM
            best = choose_within_drop(sweep, score=_valid_em, cost=_valid_cw, baseline=sft_em,
                                      max_drop_points=cfg.max_em_drop)
            chosen[arm] = best
            sweeps += [{"arm": arm, "setting": r["setting"], "chosen": r is best,
                        "valid_em_known": r["valid"]["known"]["accuracy"],
                        "valid_cw_unknown": r["valid"]["unknown"]["confident_wrong_rate"]} for r in sweep]
            records.append(best)
            for seed in cfg.seeds[1:]:
                records.append(finetune(ctx, data, arm, best["setting"], seed, validate=False))
                bar.advance(1, arm=arm)
    tests = {r["name"]: score_test(ctx, data, r) for r in records} if ctx.is_main else {}
    rows, summary = summarise(cfg, records, tests) if ctx.is_main else ([], [])
    return {"world": data.world.summary(), "threads": threads, "sweeps": sweeps, "rows": rows,
            "summary": summary, "chosen": {a: r["setting"] for a, r in chosen.items()},
            "calibration": {r["name"]: r["calibration"] for r in records if "calibration" in r},
            "headline": _headline(summary)}


METRICS = (
    ("em_sft_known", "sft_known", "accuracy"),
    ("em_pretrain_only", "pretrain_only", "accuracy"),
    ("closed_set_accuracy_known", "known", "closed"),
    ("hallucination_unknown", "unknown", "hallucination"),
    ("confident_wrong_unknown", "unknown", "confident_wrong"),
    ("abstain_unknown", "unknown", "abstain"),
    ("ece", "all", "ece"),
    ("brier", "all", "brier"),
)


def _item_values(scores: dict[str, Any], group: str, kind: str, tau: float) -> Any:
    """Per-item values (or, for ECE/Brier, per-item indices) of one metric on one split group."""
    import numpy as np

    split = scores["split"]
    members = {"known": ("sft_known", "pretrain_only"), "unknown": ("unseen_attribute", "fictitious"),
               "all": tuple(np.unique(split))}.get(group, (group,))
    mask = np.isin(split, members)
    correct, abstained, conf = scores["correct"][mask], scores["abstained"][mask], scores["confidence"][mask]
    if kind == "accuracy":
        return correct.astype(float)
    if kind == "closed":
        return scores["closed_correct"][mask]
    if kind == "hallucination":
        return (~correct & ~abstained).astype(float)
    if kind == "confident_wrong":
        return (~correct & ~abstained & (conf > tau)).astype(float)
    if kind == "abstain":
        return abstained.astype(float)
    return np.stack([conf, correct.astype(float)], -1)  # ece / brier: (items, 2)


def _stat(kind: str) -> Any:
    import numpy as np

    from leanfit.studies.noisefit.metrics import brier_score, expected_calibration_error

    if kind in ("ece", "brier"):
        fn = expected_calibration_error if kind == "ece" else brier_score
        return lambda pairs: fn(pairs[..., 0].ravel(), pairs[..., 1].ravel() > 0.5)
    return lambda values: float(np.nanmean(values))


def summarise(cfg: Any, records: list[dict[str, Any]], tests: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    """Per-(arm, seed) test rows and per-arm summaries: mean with a bootstrap 95% CI over seeds x items, and for
    every arm but SFT the paired relative change against SFT (same seeds, same items)."""
    import numpy as np

    from leanfit.core.stats import bootstrap_ci, paired_bootstrap_ci

    by_arm: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_arm.setdefault(r["arm"], []).append(r)
    rows, summary = [], []
    arrays: dict[tuple[str, str], Any] = {}
    for arm, recs in by_arm.items():
        recs = sorted(recs, key=lambda r: cfg.seeds.index(r["seed"]))
        for key, group, kind in METRICS:
            per_seed = [_item_values(tests[r["name"]], group, kind, cfg.tau) for r in recs]
            arrays[arm, key] = np.stack(per_seed)  # (seeds, items[, 2])
        for r in recs:
            t = tests[r["name"]]
            rows.append({"arm": arm, "name": r["name"], "seed": r["seed"], "setting": r["setting"], "step_seconds": r["step_seconds"],
                         "heldout_loss": float(t["heldout_loss"][0]),
                         **{key: _stat(kind)(_item_values(t, group, kind, cfg.tau))
                            for key, group, kind in METRICS}})
    for arm, recs in by_arm.items():
        entry: dict[str, Any] = {"arm": arm, "setting": recs[0]["setting"], "seeds": len(recs),
                                 "step_seconds": float(np.mean([r["step_seconds"] for r in recs]))}
        for key, _group, kind in METRICS:
            values, stat = arrays[arm, key], _stat(kind)
            common = {"n_boot": cfg.n_boot, "stat": stat, "trailing_axes": values.ndim - 2}  # ECE/Brier: pairs
            entry[key] = list(bootstrap_ci(values, **common))
            if arm != "sft" and stat(arrays["sft", key]) != 0:
                rel = paired_bootstrap_ci(values, arrays["sft", key], effect="relative", **common)
                entry[f"{key}_rel_vs_sft"] = list(rel)
        summary.append(entry)
    return rows, summary


def _headline(summary: list[dict[str, Any]]) -> str:
    arms = {s["arm"]: s for s in summary}
    if "noisefit" not in arms or "sft" not in arms:
        return "; ".join(f"{a}: confident-wrong {s['confident_wrong_unknown'][0]:.3f}" for a, s in arms.items())
    nf = arms["noisefit"]
    rel = nf.get("confident_wrong_unknown_rel_vs_sft", [float("nan")] * 3)
    return (f"NoiseFiT (leanfit) vs SFT: confident-wrong on unknown facts {100 * rel[0]:+.1f}% "
            f"[{100 * rel[1]:+.1f}, {100 * rel[2]:+.1f}], known-fact EM {100 * nf['em_sft_known'][0]:.1f}% vs "
            f"{100 * arms['sft']['em_sft_known'][0]:.1f}%")
