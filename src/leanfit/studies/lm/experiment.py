"""``leanfit run lm-baseline``: a tiny Llama with a full-softmax head trained on an offline corpus with a locally
trained BPE; reports validation (and one final test) perplexity, tokens/s and a loss curve. The VQ-Logits
experiment compares against exactly this baseline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from leanfit.core.config import BaseConfig, option
from leanfit.core.registry import register
from leanfit.studies.lm.config import DataConfig, ModelConfig
from leanfit.studies.lm.data import prepare_lm_data
from leanfit.studies.lm.train import TrainConfig

if TYPE_CHECKING:
    from leanfit.core.report import Report
    from leanfit.core.runner import RunContext
    from leanfit.core.runs import RunDir

__all__ = ["LMBaselineConfig"]


@dataclass
class LMBaselineConfig(BaseConfig):
    data: DataConfig = option(default_factory=DataConfig, help="corpus and tokenizer")
    model: ModelConfig = option(default_factory=ModelConfig, help="tiny Llama sizes")
    train: TrainConfig = option(default_factory=TrainConfig, help="optimisation and schedule")


PRESETS = {
    "quick": {},
    "full": {
        "model": {"d_model": 256, "n_layers": 4, "n_heads": 8},
        "train": {"steps": 3000, "batch_size": 32, "seq_len": 128, "lr": 2e-3, "warmup_steps": 200,
                  "eval_every": 250, "eval_tokens": 131072, "checkpoint_every": 250},
    },
}


def report(run: RunDir, results: dict[str, Any]) -> Report:
    from leanfit.core.report import Report, line_plot

    metrics = run.metrics()
    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    valid = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
    series = {"train (mean over log interval)": tuple(zip(*train, strict=True))}
    if valid:
        series["validation"] = tuple(zip(*valid, strict=True))
    line_plot(run.plots_dir / "loss.png", series, xlabel="step", ylabel="cross-entropy (nats/token)",
              title="lm-baseline loss")
    rep = Report("Results")
    rep.table([
        {"metric": "validation perplexity", "value": results["val_ppl"]},
        {"metric": "test perplexity (scored once, at the end)", "value": results["test_ppl"]},
        {"metric": "training tokens/s", "value": results["tokens_per_s"]},
        {"metric": "parameters (total / output head)", "value": f"{results['params']:,} / {results['head_params']:,}"},
        {"metric": "tokens seen in training", "value": results["train_tokens_seen"]},
        {"metric": "corpus training tokens", "value": results["corpus_train_tokens"]},
    ])
    rep.figure("plots/loss.png", "Training and validation loss")
    return rep


@register(
    "lm-baseline",
    kind="experiment",
    description="tiny Llama, full-softmax head, BPE on an offline corpus (the VQ-Logits baseline)",
    config_cls=LMBaselineConfig,
    presets=PRESETS,
    report=report,
)
def run(ctx: RunContext[LMBaselineConfig]) -> dict[str, Any]:
    import math

    from leanfit.studies.lm.train import train_lm
    from leanfit.studies.models.tiny_llama import tiny_llama

    cfg = ctx.config
    data = prepare_lm_data(cfg.data)
    vocab = data["tokenizer"].get_vocab_size()
    m = cfg.model
    model = tiny_llama(vocab, d_model=m.d_model, n_layers=m.n_layers, n_heads=m.n_heads, ffn_mult=m.ffn_mult,
                       max_seq_len=cfg.train.seq_len, tie_embeddings=m.tie_embeddings, seed=ctx.seed)
    model, result = train_lm(model, data["tokens"]["train"], data["tokens"]["valid"], cfg.train, run=ctx.run,
                             seed=ctx.seed, resume=ctx.resume, description="lm-baseline",
                             final_eval={"test": data["tokens"]["test"]})
    test_loss = result.final_losses["test"]
    head = model.get_output_embeddings().weight
    return {
        "val_loss": result.val_loss,
        "val_ppl": math.exp(result.val_loss),
        "test_loss": test_loss,
        "test_ppl": math.exp(test_loss),
        "train_loss": result.train_loss,
        "tokens_per_s": result.tokens_per_s,
        "train_seconds": result.train_seconds,
        "train_tokens_seen": cfg.train.steps * cfg.train.batch_size * cfg.train.seq_len,
        "corpus_train_tokens": int(data["tokens"]["train"].numel()),
        "vocab_size": vocab,
        "params": sum(p.numel() for p in model.parameters()),
        "head_params": head.numel(),
        "resumed_from": result.resumed_from,
        "headline": {"val_ppl": math.exp(result.val_loss), "tokens_per_s": result.tokens_per_s},
    }

