"""Configs of ``leanfit run iapt``: the tasks, methods and ablations compared, the learning-rate grids and the
decoder study (the protocol is in :mod:`leanfit.studies.iapt.experiment`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from leanfit.core.config import BaseConfig, option
from leanfit.core.errors import ConfigError, bad_value
from leanfit.core.parallel import JobsConfig
from leanfit.iapt.config import IAPTConfig

__all__ = ["ABLATIONS", "DECODER_METHODS", "METHODS", "TASKS", "DecoderConfig", "IAPTExperimentConfig",
           "LearningRates"]


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
                                      "projection")
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
                        "(its tokenizer needs a chat template)")
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
                            "docstring for why it is small)")
    iapt_gate_lr: float = option(1e-3, help="learning rate of iapt-gate: IAPT with prompt_gate (the gate lets it "
                                 "train at LoRA's rate)")
    gate_init_scale: float = option(0.01, help="iapt-gate: std of the up-projection's initial weights (a closed "
                                    "gate needs non-zero prompts to learn from)")
    lora_lr: float = option(1e-3, help="LoRA learning rate (fixed: no grid on a CPU budget)")
    max_grad_norm: float = option(0.0, help="gradient-norm clipping of the decoder's steps (0 = off)")
    seed: int = option(0, help="training seed")
    threads: int = option(0, help="torch threads of the decoder study (0: one per CPU; LM-sized matmuls)")

    def __post_init__(self) -> None:
        bad = sorted(set(self.methods) - set(DECODER_METHODS))
        if bad or not self.methods:
            raise ConfigError(bad_value("decoder.methods", self.methods, f"a non-empty subset of {DECODER_METHODS}"))
        _positive(self, ("body_tokens", "target_tokens", "train_examples", "test_examples", "steps", "batch_size",
                         "generate_batch"), prefix="decoder.")
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
class IAPTExperimentConfig(JobsConfig):
    tasks: list[Literal["bbc-news", "rotten-tomatoes"]] = option(
        default_factory=lambda: list(TASKS), help="classification tasks (may be empty)")
    methods: list[str] = option(default_factory=lambda: list(METHODS), help=f"subset of {METHODS}; must hold iapt")
    ablations: list[str] = option(default_factory=lambda: list(ABLATIONS), help=f"IAPT ablations: {list(ABLATIONS)}")
    encoder: str = option("minilm-l6", help="encoder: an alias of load_pretrained or a local BERT-style folder")
    iapt: IAPTConfig = option(default_factory=lambda: IAPTConfig(bottleneck=32), help="IAPT adapter, bottleneck 32 "
                              "here (its count is the budget every other method is matched to)")
    lora_targets: list[str] = option(default_factory=lambda: ["query", "value"], help="LoRA target modules")
    lora_r: int = option(0, help="LoRA rank; 0 = matched to IAPT's count")
    prefix_tokens: int = option(0, help="prefix length without projection; 0 = matched to IAPT's count")
    prefix_proj_tokens: int = option(16, help="prefix length with projection (P-tuning v2 used 16 per layer)")
    prefix_proj_hidden: int = option(0, help="hidden width of the prefix projection; 0 = matched to IAPT's count")
    prompt_tokens: int = option(0, help="prompt-tuning length; 0 = matched to IAPT's count as far as the "
                                "encoder's positions allow (max_position_embeddings - max_length)")
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
                                        "adapter's rate")
    max_grad_norm: float = option(1.0, help="gradient-norm clipping of every method's step (transformers' Trainer "
                                  "default; 0 = off)")
    threads: int = option(0, help="torch threads (0: auto = 1, see leanfit.core.device)")
    device: str = option("auto", help="encoder study: auto (CUDA when present, else CPU), cpu or cuda")
    decoder: DecoderConfig = option(default_factory=DecoderConfig, help="headline generation with a causal LM")

    def __post_init__(self) -> None:
        super().__post_init__()
        if "iapt" not in self.methods or len(set(self.methods)) != len(self.methods):
            raise ConfigError(bad_value("methods", self.methods, f"distinct names from {METHODS} including 'iapt'",
                                        "IAPT's count is the budget the other methods are matched to"))
        bad = sorted(set(self.methods) - set(METHODS)) + sorted(set(self.ablations) - set(ABLATIONS))
        if bad:
            raise ConfigError(bad_value("methods/ablations", bad, f"names from {METHODS} / {list(ABLATIONS)}"))
        if len(set(self.tasks)) != len(self.tasks) or not (self.tasks or self.decoder.enabled):
            raise ConfigError(bad_value("tasks", self.tasks, f"distinct names from {TASKS}",
                                        "an empty list needs decoder.enabled=true"))
        _positive(self, ("max_length", "batch_size", "steps", "eval_batch", "prefix_proj_tokens"))
        _positive(self, ("lora_r", "prefix_tokens", "prefix_proj_hidden", "prompt_tokens", "max_train", "max_valid",
                         "max_test", "threads"), minimum=0)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise ConfigError(bad_value("seeds", self.seeds, "distinct non-negative integers"))
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError(bad_value("warmup_fraction", self.warmup_fraction, "a number in [0, 1)"))
        if not self.head_lr > 0:
            raise ConfigError(bad_value("head_lr", self.head_lr, "a rate > 0"))
        shares = (self.valid_fraction, self.test_fraction)
        if not (min(shares) > 0 and max(shares) < 1 and sum(shares) < 1):
            raise ConfigError(bad_value("valid_fraction/test_fraction", (self.valid_fraction, self.test_fraction),
                                        "shares in (0, 1) summing below 1"))
        if not self.lora_targets:
            raise ConfigError(bad_value("lora_targets", self.lora_targets, "module names such as query"))
        if not self.activation_lr_scale > 0:
            raise ConfigError(bad_value("activation_lr_scale", self.activation_lr_scale, "a multiple > 0"))
        if not self.max_grad_norm >= 0:
            raise ConfigError(bad_value("max_grad_norm", self.max_grad_norm, "a norm >= 0 (0 = no clipping)"))
        if self.device.strip().lower() not in ("auto", "cpu") and not self.device.strip().lower().startswith("cuda"):
            raise ConfigError(bad_value("device", self.device, "auto, cpu or cuda[:N]"))
