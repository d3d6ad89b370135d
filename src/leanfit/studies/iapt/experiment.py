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

from dataclasses import dataclass
from typing import Any, Literal

from leanfit.core.config import BaseConfig, option
from leanfit.core.errors import ConfigError, bad_value
from leanfit.core.parallel import BACKENDS
from leanfit.core.registry import register
from leanfit.iapt.config import IAPTConfig
from leanfit.studies.iapt.report import report

__all__ = ["ABLATIONS", "DECODER_METHODS", "METHODS", "PRESETS", "TASKS", "DecoderConfig", "IAPTExperimentConfig",
           "LearningRates"]  # fmt: skip

TASKS = ("bbc-news", "rotten-tomatoes")
METHODS = ("iapt", "lora", "prefix", "prefix-proj", "prompt")
DECODER_METHODS = ("zero-shot", "iapt", "iapt-gate", "lora")
# IAPT ablations: overrides of the experiment's IAPT config
ABLATIONS: dict[str, dict[str, Any]] = {
    "pool-mean": {"pooler": "mean"},
    "pool-last": {"pooler": "last"},
    "act-gelu": {"activation": "gelu"},
    "tokens-1": {"num_soft_tokens": 1},
    "tokens-16": {"num_soft_tokens": 16},
}


def _positive(obj: Any, names: tuple[str, ...], minimum: int = 1, prefix: str = "") -> None:
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(bad_value(prefix + name, value, f"an integer >= {minimum}"))


@dataclass
class LearningRates(BaseConfig):
    """Adapter learning-rate grid per method (the first seed picks one on validation)."""

    iapt: list[float] = option(default_factory=lambda: [1e-3, 3e-3, 1e-2, 3e-2], help="IAPT (and its ablations)")
    lora: list[float] = option(default_factory=lambda: [3e-4, 1e-3, 3e-3, 1e-2], help="LoRA")
    prefix: list[float] = option(default_factory=lambda: [3e-3, 1e-2, 3e-2, 1e-1], help="prefix tuning")
    prefix_proj: list[float] = option(default_factory=lambda: [3e-4, 1e-3, 3e-3, 1e-2], help="prefix tuning with "
                                      "projection")  # fmt: skip
    prompt: list[float] = option(default_factory=lambda: [3e-3, 1e-2, 3e-2, 1e-1], help="prompt tuning")

    def __post_init__(self) -> None:
        for name in ("iapt", "lora", "prefix", "prefix_proj", "prompt"):
            grid = getattr(self, name)
            if not grid or min(grid) <= 0 or len(set(grid)) != len(grid):
                raise ConfigError(bad_value(f"lrs.{name}", grid, "a non-empty list of distinct rates > 0"))

    def grid(self, method: str) -> list[float]:
        return getattr(self, method.replace("-", "_"))


@dataclass
class DecoderConfig(BaseConfig):
    """The headline-generation run: a causal LM writes the headline of a BBC article from its body."""

    enabled: bool = option(True, help="run the decoder study")
    model: str = option("smollm2-135m-instruct", help="causal LM: an alias of load_pretrained or a local folder "
                        "(its tokenizer needs a chat template)")  # fmt: skip
    methods: list[str] = option(default_factory=lambda: list(DECODER_METHODS), help=f"subset of {DECODER_METHODS}")
    iapt: IAPTConfig = option(default_factory=lambda: IAPTConfig(bottleneck=16),
                              help="IAPT adapter of the LM (bottleneck 16 here)")
    lora_targets: list[str] = option(default_factory=lambda: ["q_proj", "v_proj"], help="LoRA target modules")
    instruction: str = option("Write a short headline for this BBC News article.", help="text before the body")
    body_tokens: int = option(256, help="article bodies are cut to this many tokens")
    target_tokens: int = option(24, help="headline tokens trained on (with the end token) and generated at most")
    train_examples: int = option(400, help="training articles (steps x batch_size are drawn from them)")
    test_examples: int = option(100, help="held-out articles scored with ROUGE-L")
    steps: int = option(100, help="optimizer steps")
    batch_size: int = option(4, help="training batch")
    generate_batch: int = option(8, help="generation batch (left padded)")
    iapt_lr: float = option(1e-4, help="IAPT learning rate (fixed: no grid on a CPU budget; see the module "
                            "docstring for why it is small)")  # fmt: skip
    iapt_gate_lr: float = option(1e-3, help="learning rate of iapt-gate: IAPT with prompt_gate (the gate lets it "
                                 "train at LoRA's rate)")  # fmt: skip
    gate_init_scale: float = option(0.01, help="iapt-gate: std of the up-projection's initial weights (a closed "
                                    "gate needs non-zero prompts to learn from)")  # fmt: skip
    lora_lr: float = option(1e-3, help="LoRA learning rate (fixed: no grid on a CPU budget)")
    max_grad_norm: float = option(0.0, help="gradient-norm clipping of the decoder's steps (0 = off)")
    seed: int = option(0, help="training seed")
    threads: int = option(0, help="torch threads of the decoder study (0: one per CPU; LM-sized matmuls)")

    def __post_init__(self) -> None:
        bad = sorted(set(self.methods) - set(DECODER_METHODS))
        if bad or not self.methods:
            raise ConfigError(bad_value("decoder.methods", self.methods, f"a non-empty subset of {DECODER_METHODS}"))
        _positive(self, ("body_tokens", "target_tokens", "train_examples", "test_examples", "steps", "batch_size",
                         "generate_batch"), prefix="decoder.")  # fmt: skip
        _positive(self, ("seed", "threads"), minimum=0, prefix="decoder.")
        rates = (self.iapt_lr, self.iapt_gate_lr, self.lora_lr)
        if not min(rates) > 0:
            raise ConfigError(bad_value("decoder.iapt_lr/iapt_gate_lr/lora_lr", rates, "rates > 0"))
        if not self.gate_init_scale > 0:
            raise ConfigError(bad_value("decoder.gate_init_scale", self.gate_init_scale, "a std > 0", "e.g. 0.01"))
        if not self.max_grad_norm >= 0:
            raise ConfigError(bad_value("decoder.max_grad_norm", self.max_grad_norm, "a norm >= 0 (0 = off)"))
        if not self.lora_targets:
            raise ConfigError(bad_value("decoder.lora_targets", self.lora_targets, "module names such as q_proj"))


@dataclass
class IAPTExperimentConfig(BaseConfig):
    tasks: list[Literal["bbc-news", "rotten-tomatoes"]] = option(
        default_factory=lambda: list(TASKS), help="classification tasks (may be empty)")  # fmt: skip
    methods: list[str] = option(default_factory=lambda: list(METHODS), help=f"subset of {METHODS}; must hold iapt")
    ablations: list[str] = option(default_factory=lambda: list(ABLATIONS), help=f"IAPT ablations: {list(ABLATIONS)}")
    encoder: str = option("minilm-l6", help="encoder: an alias of load_pretrained or a local BERT-style folder")
    iapt: IAPTConfig = option(default_factory=lambda: IAPTConfig(bottleneck=32), help="IAPT adapter, bottleneck 32 "
                              "here (its count is the budget every other method is matched to)")  # fmt: skip
    lora_targets: list[str] = option(default_factory=lambda: ["query", "value"], help="LoRA target modules")
    lora_r: int = option(0, help="LoRA rank; 0 = matched to IAPT's count")
    prefix_tokens: int = option(0, help="prefix length without projection; 0 = matched to IAPT's count")
    prefix_proj_tokens: int = option(16, help="prefix length with projection (P-tuning v2 used 16 per layer)")
    prefix_proj_hidden: int = option(0, help="hidden width of the prefix projection; 0 = matched to IAPT's count")
    prompt_tokens: int = option(0, help="prompt-tuning length; 0 = matched to IAPT's count as far as the "
                                "encoder's positions allow (max_position_embeddings - max_length)")  # fmt: skip
    max_length: int = option(128, help="input tokens (longer inputs are cut)")
    batch_size: int = option(16, help="training batch")
    steps: int = option(200, help="optimizer steps (the same for every method)")
    warmup_fraction: float = option(0.1, help="linear warm-up share of the steps, then linear decay to 0")
    head_lr: float = option(3e-3, help="learning rate of the classification head (the same for every method)")
    lrs: LearningRates = option(default_factory=LearningRates, help="adapter learning-rate grids")
    seeds: list[int] = option(default_factory=lambda: [0, 1, 2], help="training seeds; the first picks the rates")
    valid_fraction: float = option(0.1, help="validation share (split by a hash of each example's group)")
    test_fraction: float = option(0.2, help="test share")
    max_train: int = option(0, help="cap on training examples (0 = all)")
    max_valid: int = option(1000, help="cap on validation examples (0 = all)")
    max_test: int = option(2000, help="cap on test examples (0 = all)")
    eval_batch: int = option(64, help="evaluation batch")
    activation_lr_scale: float = option(1.0, help="IAPT's rational coefficients learn at this multiple of the "
                                        "adapter's rate")  # fmt: skip
    max_grad_norm: float = option(1.0, help="gradient-norm clipping of every method's step (transformers' Trainer "
                                  "default; 0 = off)")  # fmt: skip
    threads: int = option(0, help="torch threads (0: auto = 1, see leanfit.core.device)")
    device: str = option("auto", help="encoder study: auto (CUDA when present, else CPU), cpu or cuda")
    jobs: int = option(1, help="classifiers trained at once (joblib workers; they share the machine, so keep 1 "
                       "when timing on a CPU)")  # fmt: skip
    backend: str = option("loky", help="joblib backend of jobs > 1: loky (processes), dask or ray")
    decoder: DecoderConfig = option(default_factory=DecoderConfig, help="headline generation with a causal LM")

    def __post_init__(self) -> None:
        if "iapt" not in self.methods or len(set(self.methods)) != len(self.methods):
            raise ConfigError(bad_value("methods", self.methods, f"distinct names from {METHODS} including 'iapt'",
                                        "IAPT's count is the budget the other methods are matched to"))  # fmt: skip
        bad = sorted(set(self.methods) - set(METHODS)) + sorted(set(self.ablations) - set(ABLATIONS))
        if bad:
            raise ConfigError(bad_value("methods/ablations", bad, f"names from {METHODS} / {list(ABLATIONS)}"))
        if len(set(self.tasks)) != len(self.tasks) or not (self.tasks or self.decoder.enabled):
            raise ConfigError(bad_value("tasks", self.tasks, f"distinct names from {TASKS}",
                                        "an empty list needs decoder.enabled=true"))  # fmt: skip
        _positive(self, ("max_length", "batch_size", "steps", "eval_batch", "prefix_proj_tokens"))
        _positive(self, ("lora_r", "prefix_tokens", "prefix_proj_hidden", "prompt_tokens", "max_train", "max_valid",
                         "max_test", "threads"), minimum=0)  # fmt: skip
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise ConfigError(bad_value("seeds", self.seeds, "distinct non-negative integers"))
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError(bad_value("warmup_fraction", self.warmup_fraction, "a number in [0, 1)"))
        if not self.head_lr > 0:
            raise ConfigError(bad_value("head_lr", self.head_lr, "a rate > 0"))
        shares = (self.valid_fraction, self.test_fraction)
        if not (min(shares) > 0 and max(shares) < 1 and sum(shares) < 1):
            raise ConfigError(bad_value("valid_fraction/test_fraction", (self.valid_fraction, self.test_fraction),
                                        "shares in (0, 1) summing below 1"))  # fmt: skip
        if not self.lora_targets:
            raise ConfigError(bad_value("lora_targets", self.lora_targets, "module names such as query"))
        if not self.activation_lr_scale > 0:
            raise ConfigError(bad_value("activation_lr_scale", self.activation_lr_scale, "a multiple > 0"))
        if not self.max_grad_norm >= 0:
            raise ConfigError(bad_value("max_grad_norm", self.max_grad_norm, "a norm >= 0 (0 = no clipping)"))
        _positive(self, ("jobs",))
        if self.backend not in BACKENDS:
            raise ConfigError(bad_value("backend", self.backend, f"one of {BACKENDS}"))
        if self.device.strip().lower() not in ("auto", "cpu") and not self.device.strip().lower().startswith("cuda"):
            raise ConfigError(bad_value("device", self.device, "auto, cpu or cuda[:N]"))


_QUICK_LRS = {"iapt": [1e-2], "lora": [3e-3], "prefix": [3e-2], "prefix_proj": [3e-3], "prompt": [3e-2]}
PRESETS: dict[str, dict[str, Any]] = {
    # BBC News only, 64-token inputs, 40 steps of 8, 150 test articles, one a-priori rate per method (no grid),
    # IAPT / LoRA / prefix / prompt (20 tokens), 3 seeds, no ablations, no decoder: about 3.7 min on one core
    "quick": {"tasks": ["bbc-news"], "methods": ["iapt", "lora", "prefix", "prompt"], "ablations": [],
              "max_length": 64, "batch_size": 8, "steps": 40, "prompt_tokens": 20, "head_lr": 1e-2,
              "lrs": _QUICK_LRS, "max_valid": 100, "max_test": 150, "decoder": {"enabled": False}},
    "full": {},
}  # fmt: skip


@register("iapt", kind="experiment", description="IAPT vs PEFT LoRA / prefix / prompt tuning at matched budgets "
          "(MiniLM on BBC News + Rotten Tomatoes; SmolLM2 headlines in the full preset)",
          config_cls=IAPTExperimentConfig, presets=PRESETS, report=report)  # fmt: skip
def run(ctx: Any) -> dict[str, Any]:
    from leanfit.core.device import configure_threads
    from leanfit.studies.iapt import report as rep
    from leanfit.studies.iapt import tasks

    cfg: IAPTExperimentConfig = ctx.config
    threads = configure_threads(cfg.threads, small_workload=True)
    budgets = []
    for task in cfg.tasks:
        env = tasks.task_env(cfg, task)
        budgets.append({"task": task, "iapt_adapter_params": env.budget, "sizes": env.sizes})
    rates, sweeps = tasks.choose_lrs(ctx) if cfg.tasks else ({}, [])
    rows = tasks.final_runs(ctx, rates) if cfg.tasks else []
    decoder = tasks.run_decoder(ctx) if cfg.decoder.enabled else []
    summary = rep.summarise(rows)
    return {"threads": threads, "rows": rows, "summary": summary, "sweeps": sweeps, "budgets": budgets,
            "decoder": decoder, "targets": rep.targets(summary),
            "headline": rep.headline(summary, decoder)}  # fmt: skip

