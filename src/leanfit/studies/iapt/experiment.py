"""``leanfit run iapt``: instruction-aware prompt tuning against PEFT LoRA, prefix tuning and prompt tuning.

Encoder study: the MiniLM-L6 encoder (offline package, d = 384, 6 layers) with BERT's sequence-classification
head on BBC News topics (5 classes, article bodies) and Rotten Tomatoes sentiment (2 classes). Methods, all with
the backbone frozen and the same classification head (``classifier``, 384 x C + C, trainable in every method,
re-initialised from the seed, so every method of a seed starts from the same head):

- ``iapt``: :mod:`leanfit.iapt`, the whole input is the instruction (``instruction_mask = attention_mask``);
- ``lora``: PEFT ``LoraConfig`` on ``lora_targets`` (``lora_alpha = 2 r``);
- ``prefix``: PEFT ``PrefixTuningConfig`` without projection (per-layer key/value prefixes);
- ``prefix-proj``: the same with ``prefix_projection=True`` (P-tuning v2 style reparameterisation MLP);
- ``prompt``: PEFT ``PromptTuningConfig`` (soft input tokens, initialised from sampled vocabulary embeddings).

Budgets are matched to IAPT's adapter count (head excluded) as closely as each method allows: LoRA's rank,
prefix length, the projection's hidden width, and the prompt length (prompt tuning cannot reach the budget: it
would need about budget / d tokens, up to the 512 positions BERT has, at several times the cost; the chosen
length is reported). Exact trainable counts are measured on the built models and reported with and without the
head.

Protocol: for each (task, method) a learning-rate grid (4 rates by default) is trained on the first seed and the
rate with the best validation accuracy is kept; ablations of IAPT reuse IAPT's rate. The kept rate is trained on
every seed and the test split is scored once per trained model. Every method sees the same batches in the same
order, with the same optimizer (AdamW, no weight decay), schedule (linear warm-up, linear decay), gradient-norm
clipping (``max_grad_norm``, 1.0 as in transformers' Trainer) and step count; the head has its own fixed rate
(``head_lr``) so that only the adapter's rate differs between methods. Without clipping, IAPT at 1e-2 on Rotten
Tomatoes left one seed of three at the majority class (56.0% test accuracy; 77.1% with clipping). Reported: test
accuracy and macro-F1 (mean ± sd over seeds), trainable counts and training time. Ablations of IAPT: pooling (mean
/ last instruction token instead of self-attention), activation (fixed GELU instead of the learned rational) and
the number of soft tokens (1 / 16 instead of 4). ``activation_lr_scale`` sets the rate of the rational's
coefficients relative to the adapter's (1: the paper's joint training, the default).

Decoder run (``decoder``): SmolLM2-135M-Instruct writes BBC headlines from article bodies (the body prompt is the
instruction), IAPT against PEFT LoRA at a matched budget and the untuned model, plus ``iapt-gate``: IAPT with
``prompt_gate`` (:class:`~leanfit.iapt.config.IAPTConfig`) at LoRA's rate; greedy decoding, ROUGE-L (F1,
``rouge-score`` package, Porter stemming) on held-out articles. The rates are fixed (no grid on a CPU budget):
LoRA 1e-3; IAPT 1e-4, because in 20-step probes on training articles (128-token bodies, batch 4) IAPT's training
loss jumped from 5.2 to 8.8 at 3e-4 and to 12 (never recovering) at 1e-3, while 1e-4 followed LoRA's curve. The
likely cause: SmolLM2's layers normalise their input (RMSNorm) before attention, so the first small soft tokens
of the zero-initialised up-projection reach the keys and values at full size, in directions the first steps
chose; BERT normalises after attention and has no such jump. Three remedies were probed the same way (20 steps at
1e-3, batch 4, 128-token bodies, the same batches; training loss at steps 1 / 2 / 19-20): soft tokens anchored at
the mean instruction hidden state (10.6 / 5.6 / 4.0-4.3: the anchor itself hurts the untrained model), anchored at
the first token's hidden state (4.4 / 4.2 / 4.2: no jump, but above plain 1e-4's 3.2), and a 10-step warm-up (4.6 /
3.6, then 10.5 at step 5 and 15.7 at step 10 as the rate passes 5e-4). None beat the plain zero start at 1e-4, which
stays the decoder's rate. Gradient-norm clipping (``decoder.max_grad_norm=1``) does not help either: Adam's step
size does not depend on the gradient's norm, and the loss still jumped from 5.2 to 12.2 at the second step. What
works: a zero-initialised per-layer gate multiplying the soft positions' output of each layer's input RMSNorm
(``prompt_gate``; keys and values start at zero and grow with the gate), opened 30x faster than the adapter rate:
in the same probe it trained at 1e-3 without the jump (mean training loss of steps 11-20: 3.12, plain 1e-4: 3.32).
The ``iapt-gate`` arm runs it at LoRA's rate.

Every trained model has a folder under ``runs/`` (``result.json`` with the training record, ``test.json`` with its
test scores, its trainable weights and losses), written atomically, so ``--resume`` skips finished work. Training
runs through ``accelerate``'s ``Accelerator``; launched with ``torchrun`` each process takes its shard of every
batch.

Presets and cost. ``quick`` (2-core CPU, one torch thread): BBC News only, 64-token inputs, 40 steps of 8, one
a-priori rate per method (no grid), IAPT / LoRA / prefix / prompt (20 tokens) over 3 seeds, 150 test articles, no
ablations, no decoder; about 4 minutes. ``full``: everything above at 128 tokens, 200 steps of 16, rate grids of 4;
the encoder study took 252 s on one H100 with ``jobs=8`` (classifiers trained 8 at a time through joblib, each in
its own process) and would take several hours on this CPU (about 1.5 s per step; matched-length prompt tuning, 384
virtual tokens, about 6x that); the decoder study about 45 minutes on the 2-core CPU. Threads: MiniLM batches (8 x
64 and 16 x 128) took 3-13x longer with 2 threads than with 1 while another process used the second core, so the
encoder study keeps 1 (``threads=0``); the decoder study uses one thread per CPU (``decoder.threads=0``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from leanfit.core.registry import register
from leanfit.studies.iapt.config import IAPTExperimentConfig
from leanfit.studies.iapt.report import report

if TYPE_CHECKING:
    from leanfit.core.runner import RunContext

__all__ = ["PRESETS", "run"]


_QUICK_LRS = {"iapt": [1e-2], "lora": [3e-3], "prefix": [3e-2], "prefix_proj": [3e-3], "prompt": [3e-2]}
PRESETS: dict[str, dict[str, Any]] = {
    # BBC News only, 64-token inputs, 40 steps of 8, 150 test articles, one a-priori rate per method (no grid),
    # IAPT / LoRA / prefix / prompt (20 tokens), 3 seeds, no ablations, no decoder: about 3.7 min on one core
    "quick": {"tasks": ["bbc-news"], "methods": ["iapt", "lora", "prefix", "prompt"], "ablations": [],
              "max_length": 64, "batch_size": 8, "steps": 40, "prompt_tokens": 20, "head_lr": 1e-2,
              "lrs": _QUICK_LRS, "max_valid": 100, "max_test": 150, "decoder": {"enabled": False}},
    "full": {},
}


@register("iapt", kind="experiment", description="IAPT vs PEFT LoRA / prefix / prompt tuning at matched budgets "
          "(MiniLM on BBC News + Rotten Tomatoes; SmolLM2 headlines in the full preset)",
          config_cls=IAPTExperimentConfig, presets=PRESETS, report=report)
def run(ctx: RunContext[IAPTExperimentConfig]) -> dict[str, Any]:
    from leanfit.core.device import configure_threads
    from leanfit.studies.iapt import decoder, train
    from leanfit.studies.iapt import report as rep
    from leanfit.studies.iapt.task import task_env

    cfg = ctx.config
    threads = configure_threads(cfg.threads, small_workload=True)
    budgets = []
    for task in cfg.tasks:
        env = task_env(cfg, task)
        budgets.append({"task": task, "iapt_adapter_params": env.budget, "sizes": env.sizes})
    rates, sweeps = train.choose_lrs(ctx) if cfg.tasks else ({}, [])
    rows = train.final_runs(ctx, rates) if cfg.tasks else []
    decoder_rows = decoder.run_decoder(ctx) if cfg.decoder.enabled else []
    summary = rep.summarise(rows)
    return {"threads": threads, "rows": rows, "summary": summary, "sweeps": sweeps, "budgets": budgets,
            "decoder": decoder_rows, "targets": rep.targets(summary),
            "headline": rep.headline(summary, decoder_rows)}

