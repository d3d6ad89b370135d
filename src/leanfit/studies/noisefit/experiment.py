"""``leanfit run noisefit``: the controlled hallucination benchmark.

A tiny Llama is pretrained on paraphrased fact sentences (elements and countries), then fine-tuned in QA form
by each arm (SFT, label smoothing, NEFTune, R-Drop, NoiseFiT as the reference implements it, NoiseFiT as leanfit
implements it); the arms differ only in that stage. Each arm's hyper-parameter is chosen on the validation
split of the first seed (lowest confident-wrong rate on the unknown splits among the settings that keep exact
match on the known splits within ``max_em_drop`` points of SFT), then trained on every seed; the test split is
scored once, with bootstrap confidence intervals over seeds and items and paired comparisons against SFT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from leanfit.core.config import BaseConfig, option
from leanfit.core.errors import ConfigError, bad_value
from leanfit.core.registry import register
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
                                        "closed_set_size >= 2, n_boot >= 1, 0 < tau < 1"))  # fmt: skip


PRESETS = {
    "quick": {
        "world": {"pretrain_fraction": 0.3, "n_fictitious": 60, "abstain_examples": 30, "max_eval_per_split": 60},
        "model": {"d_model": 96, "n_layers": 3, "n_heads": 4},
        "pretrain": {"steps": 350, "batch_size": 32, "eval_every": 175, "checkpoint_every": 175},
        "pretrain_per_seed": False,
        "sft": {"steps": 80, "batch_size": 32},
        "seeds": [0, 1, 2],
        "neftune_alpha": [5.0],
        "paper_noise": [0.1],
        "noisefit_noise": [0.1],
        "closed_set_size": 10,
        "n_boot": 500,
    },
    # One pretrained model shared by all seeds (seeds vary the fine-tuning stage, where the arms differ): five
    # per-seed pretrainings would add about 40 minutes on 2 CPU cores.
    "full": {"world": {"abstain_examples": 80}, "pretrain_per_seed": False, "noisefit_noise": [0.05, 0.1, 0.2, 0.4]},
}


def report(run: Any, results: dict[str, Any]) -> Any:
    from leanfit.studies.noisefit.report import render_report

    return render_report(run, results)


@register(
    "noisefit",
    kind="experiment",
    description="controlled hallucination benchmark: tiny Llama pretrained on facts, SFT arms incl. NoiseFiT",
    config_cls=NoiseFiTExperimentConfig,
    presets=PRESETS,
    report=report,
)
def run(ctx: Any) -> dict[str, Any]:
    from leanfit.studies.noisefit.pipeline import run_benchmark

    return run_benchmark(ctx)
