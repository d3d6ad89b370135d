"""Configs of the ``vq-logits`` experiment."""

from __future__ import annotations

from dataclasses import dataclass

from leanfit.core.config import BaseConfig, option
from leanfit.core.errors import ConfigError, bad_value
from leanfit.studies.lm.config import DataConfig, ModelConfig
from leanfit.studies.lm.train import TrainConfig

__all__ = ["PretrainedHeadConfig", "ScratchGridConfig", "VQLogitsExperimentConfig"]

_MAPPINGS = ("kmeans", "random", "contiguous", "equal_mass", "hybrid")


@dataclass
class ScratchGridConfig(BaseConfig):
    code_fractions: list[int] = option(default_factory=lambda: [64], help="K = V / f for each f")
    mappings: list[str] = option(default_factory=lambda: ["equal_mass", "kmeans", "random", "hybrid"],
                                 help="token->code maps (kmeans/hybrid cluster the seed-0 baseline's trained head)")
    bias: list[bool] = option(default_factory=lambda: [True], help="per-token bias on/off")
    residual_ranks: list[int] = option(default_factory=lambda: [0], help="within-cluster low-rank term ranks (0 = off)")
    paper_recipe: bool = option(True, help="also run the paper's recipe (kmeans map, no bias) at every K")
    seeds: list[int] = option(default_factory=lambda: [0], help="seeds; every head and the baseline use each")

    def __post_init__(self) -> None:
        for m in self.mappings:
            if m not in _MAPPINGS:
                raise ConfigError(bad_value("scratch.mappings", m, "names from " + ", ".join(_MAPPINGS)))
        if not self.seeds or any(f < 1 for f in self.code_fractions):
            raise ConfigError("scratch.seeds must be non-empty and scratch.code_fractions positive")


@dataclass
class PretrainedHeadConfig(BaseConfig):
    enabled: bool = option(True, help="run part (b): compress a pretrained model's head")
    model: str = option("smollm2-135m-instruct", help="pretrained causal LM (alias, folder or hub id)")
    num_codes: list[int] = option(default_factory=lambda: [768], help="codebook sizes K (768 = V/64 for SmolLM2)")
    mapping: str = option("kmeans", help="token->code map built from the model's output embeddings")
    residual_ranks: list[int] = option(default_factory=lambda: [0, 16], help="within-cluster term ranks to compare")
    train_corpus: str = option("shakespeare", help="text the head is fine-tuned on (train split)")
    eval_corpus: str = option("auto", help="held-out text from another corpus; auto = austen, else kjv, else the "
                                           "train corpus's test split")
    train_tokens: int = option(16384, help="fine-tuning tokens (trunk hidden states are computed once)")
    eval_tokens: int = option(8192, help="held-out evaluation tokens")
    seq_len: int = option(256, help="tokens per window")
    steps: int = option(150, help="head fine-tuning steps")
    batch_tokens: int = option(2048, help="tokens per fine-tuning step")
    lr: float = option(1e-3, help="AdamW learning rate for the head")

    def __post_init__(self) -> None:
        if self.mapping not in _MAPPINGS:
            raise ConfigError(bad_value("pretrained.mapping", self.mapping, "one of " + ", ".join(_MAPPINGS)))


@dataclass
class VQLogitsExperimentConfig(BaseConfig):
    data: DataConfig = option(default_factory=DataConfig, help="corpus and tokenizer (as lm-baseline)")
    model: ModelConfig = option(default_factory=ModelConfig, help="tiny Llama trunk (as lm-baseline)")
    train: TrainConfig = option(default_factory=TrainConfig, help="schedule shared by every head (equal budgets)")
    scratch: ScratchGridConfig = option(default_factory=ScratchGridConfig, help="part (a): heads trained from scratch")
    pretrained: PretrainedHeadConfig = option(default_factory=PretrainedHeadConfig, help="part (b): SmolLM2 head")
