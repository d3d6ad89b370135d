"""Configs of ``leanfit run noisefit``: the fact world, the tiny Llama and its pretraining, the QA fine-tuning
shared by every arm, the arms' settings and the selection rule (the protocol is in
:mod:`leanfit.studies.noisefit.experiment`)."""

from __future__ import annotations

from dataclasses import dataclass

from leanfit.core.config import BaseConfig, option
from leanfit.core.errors import ConfigError, bad_value
from leanfit.studies.lm.config import ModelConfig
from leanfit.studies.lm.train import TrainConfig
from leanfit.studies.noisefit.facts_qa import FactWorldConfig
from leanfit.studies.noisefit.hallucination import ARMS, QATrainConfig

__all__ = ["NoiseFiTExperimentConfig"]


@dataclass
class _PretrainConfig(TrainConfig):
    steps: int = option(1500, help="pretraining optimizer steps")
    batch_size: int = option(64, help="sequences per pretraining step")
    seq_len: int = option(64, help="tokens per pretraining sequence")
    warmup_steps: int = option(100, help="linear warm-up steps")
    weight_decay: float = option(0.0, help="AdamW weight decay (memorisation wants none)")
    eval_every: int = option(500, help="held-out loss every N steps")
    eval_tokens: int = option(8192, help="held-out tokens per evaluation")
    checkpoint_every: int = option(500, help="checkpoint every N steps (0 disables)")


@dataclass
class _ModelConfig(ModelConfig):
    n_layers: int = option(4, help="decoder layers")


@dataclass
class NoiseFiTExperimentConfig(BaseConfig):
    world: FactWorldConfig = option(default_factory=FactWorldConfig, help="which facts go where")
    vocab_size: int = option(2048, help="BPE vocabulary trained on the pretraining text + SFT examples")
    paraphrases: int = option(5, help="templates per fact in the pretraining text")
    model: _ModelConfig = option(default_factory=_ModelConfig, help="tiny Llama sizes")
    pretrain: _PretrainConfig = option(default_factory=_PretrainConfig, help="pretraining schedule")
    pretrain_per_seed: bool = option(True, help="pretrain one model per seed (else one shared by all seeds)")
    sft: QATrainConfig = option(default_factory=QATrainConfig, help="fine-tuning schedule (every arm)")
    arms: tuple[str, ...] = option(ARMS, help=f"arms to run, from {ARMS}")
    seeds: tuple[int, ...] = option((0, 1, 2, 3, 4), help="training seeds; settings are chosen on the first")
    label_smoothing: tuple[float, ...] = option((0.1,), help="label_smoothing_factor values tried")
    neftune_alpha: tuple[float, ...] = option((5.0, 10.0), help="neftune_noise_alpha values tried")
    rdrop_alpha: tuple[float, ...] = option((1.0,), help="R-Drop KL weights tried")
    paper_noise: tuple[float, ...] = option((0.01, 0.1), help="noise_std values of the paper-faithful arm")
    paper_layers: str = option("snr_high:2", help="layers of the paper-faithful arm (the reference uses top-3 SNR)")
    noisefit_noise: tuple[float, ...] = option((0.05, 0.1), help="rel_noise values of leanfit's NoiseFiT arm")
    noisefit_layers: str = option("auto", help="layers of leanfit's NoiseFiT arm")
    max_em_drop: float = option(1.0, help="selection: largest allowed validation EM loss on known facts (points)")
    tau: float = option(0.5, help="confidence above which a wrong answer counts as confident-wrong")
    closed_set_size: int = option(20, help="candidates in the closed-set ranking (gold + distractors)")
    n_boot: int = option(2000, help="bootstrap replicates for the confidence intervals")
    threads: int = option(0, help="torch CPU threads; 0 = auto")

    def __post_init__(self) -> None:
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown or not self.arms:
            raise ConfigError(bad_value("arms", self.arms, f"a non-empty subset of {ARMS}"))
        if "sft" not in self.arms:
            raise ConfigError(bad_value("arms", self.arms, "a list including 'sft' (the reference arm)"))
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(bad_value("seeds", self.seeds, "distinct integers, at least one"))
        if self.closed_set_size < 2 or self.n_boot < 1 or not 0 < self.tau < 1:
            raise ConfigError(bad_value("closed_set_size/n_boot/tau", (self.closed_set_size, self.n_boot, self.tau),
                                        "closed_set_size >= 2, n_boot >= 1, 0 < tau < 1"))
