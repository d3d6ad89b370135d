"""Configs of the ``vq-logits`` experiment."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from leanfit.core.config import BaseConfig, option
from leanfit.core.errors import ConfigError, bad_value
from leanfit.studies.lm.config import DataConfig, ModelConfig
from leanfit.studies.lm.train import TrainConfig

__all__ = ["RECIPES", "PretrainedHeadConfig", "PretrainedStudyConfig", "ScratchGridConfig", "VQLogitsExperimentConfig"]

_MAPPINGS = ("kmeans", "random", "contiguous", "equal_mass", "hybrid")
# from scratch also: "learned" (equal_mass start, moved during training by leanfit.vq_logits.MapLearner; no
# full-softmax run) and "hybrid-counted" (hybrid from a full-softmax run of half the budget, the head trains the rest)
_SCRATCH_MAPPINGS = (*_MAPPINGS, "learned", "hybrid-counted")


@dataclass
class ScratchGridConfig(BaseConfig):
    code_fractions: list[int] = option(default_factory=lambda: [64], help="K = V / f for each f")
    mappings: list[str] = option(default_factory=lambda: ["equal_mass", "kmeans", "random", "hybrid"],
                                 help="token->code maps: " + ", ".join(_SCRATCH_MAPPINGS) + " (kmeans/hybrid cluster "
                                      "the seed-0 baseline's trained head, outside the budget; hybrid-counted "
                                      "clusters a full-softmax run of half the budget and trains the head the "
                                      "other half; learned moves tokens during training)")
    bias: list[bool] = option(default_factory=lambda: [True], help="per-token bias on/off")
    residual_ranks: list[int] = option(default_factory=lambda: [0], help="within-cluster low-rank term ranks (0 = off)")
    paper_recipe: bool = option(True, help="also run the paper's recipe (kmeans map, no bias) at every K")
    seeds: list[int] = option(default_factory=lambda: [0], help="seeds; every head and the baseline use each")
    budget: Literal["fixed", "plateau"] = option("fixed", help="fixed: every run trains train.steps; plateau: a "
                                                 "full-softmax probe per seed trains up to probe_factor x train.steps "
                                                 "and stops after patience evaluations without a better validation "
                                                 "loss; the latest best step of the probes becomes every run's steps")
    probe_factor: int = option(4, ge=1, help="cap of the plateau probe, in multiples of train.steps")
    patience: int = option(2, ge=1, help="evaluations without improvement that end the plateau probe")
    learn_every: int = option(200, ge=1, help="training steps between reassignments of the learned map")
    learn_shrinkage: float = option(2.0, ge=0, help="observations with which a token's context mean is shrunk to "
                                                    "its code's (learned map)")

    def __post_init__(self) -> None:
        for m in self.mappings:
            if m not in _SCRATCH_MAPPINGS:
                raise ConfigError(bad_value("scratch.mappings", m, "names from " + ", ".join(_SCRATCH_MAPPINGS)))
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


# the recipes of ``vq-logits-pretrained``, in the order of the report (the baselines are always run)
RECIPES = ("paper", "leanfit-v1", "freq-sigma", "distilled", "learned-map", "rank-r")


@dataclass
class PretrainedStudyConfig(BaseConfig):
    model: str = option("smollm2-135m-instruct", help="pretrained causal LM (alias, folder or hub id); trunk frozen")
    corpus: str = option("shakespeare", help="distillation domain: its train split feeds the head, its valid split "
                                             "picks configs, its test split is scored once")
    other_domains: list[str] = option(default_factory=lambda: ["austen", "bbc-news"],
                                      help="held-out domains scored on their test split (corpora names, bbc-news, "
                                           "rotten-tomatoes); one not installed is skipped and named in the report")
    reductions: list[float] = option(default_factory=lambda: [50.0, 80.0, 90.0, 95.0, 98.0], gt=0, lt=100,
                                     help="head-parameter reductions (%) against V x d; each sets a parameter budget")
    recipes: list[str] = option(default_factory=lambda: list(RECIPES), help="recipes to run: " + ", ".join(RECIPES))
    distil_baseline: bool = option(True, help="also distil the Sigma-SVD low-rank baseline (same steps as the VQ heads)")
    text_tokens: int = option(16384, ge=64, help="distillation-domain tokens the heads are fitted on")
    sample_tokens: int = option(4096, ge=0, help="tokens sampled from the model itself, added to the fitting states")
    valid_tokens: int = option(4096, ge=16, help="validation tokens (config choice)")
    test_tokens: int = option(8192, ge=16, help="test tokens per domain (scored once)")
    seq_len: int = option(256, ge=8, help="tokens per trunk window")
    steps: int = option(100, ge=0, help="training steps of every trained head (distillation, CE fine-tune)")
    batch_tokens: int = option(512, ge=1, help="hidden states per training step")
    distil_lr: float = option(2e-3, gt=0, help="Adam learning rate of the distillation (cosine decay)")
    finetune_lr: float = option(1e-3, gt=0, help="AdamW learning rate of leanfit-v1's CE fine-tune")
    rank_shares: list[float] = option(default_factory=lambda: [0.25, 0.5], gt=0, lt=1,
                                      help="shares of the budget left after bias and map given to the rank-r term "
                                           "of 'rank-r'; the one with the best validation ratio at the start is "
                                           "distilled")
    reassign_every: int = option(10, ge=1, help="distillation steps between moves of the learned map "
                                                "('learned-map', 'rank-r'); below steps, or the map never moves")
    kmeans_iters: int = option(8, ge=0, help="Lloyd iterations of every k-means (plain and Sigma-weighted)")
    threads: int = option(0, ge=0, help="torch threads (0: auto, see leanfit.core.device.configure_threads)")

    def __post_init__(self) -> None:
        for r in self.recipes:
            if r not in RECIPES:
                raise ConfigError(bad_value("recipes", r, "names from " + ", ".join(RECIPES),
                                            "e.g. recipes=[paper,distilled]"))
        learned = {"learned-map", "rank-r"} & set(self.recipes)
        if learned and self.steps and self.reassign_every >= self.steps:
            raise ConfigError(bad_value("reassign_every", self.reassign_every, f"fewer than steps={self.steps} (else "
                                        f"{', '.join(sorted(learned))} never move the map)",
                                        "lower reassign_every or raise steps"))
        if not self.reductions:
            raise ConfigError(bad_value("reductions", self.reductions, "at least one reduction in (0, 100)",
                                        "e.g. reductions=[80,95]"))
