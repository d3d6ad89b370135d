"""``leanfit run noisefit``: the controlled hallucination benchmark.

A tiny Llama is pretrained on paraphrased fact sentences (elements and countries), then fine-tuned in QA form
by each arm (SFT, label smoothing, NEFTune, R-Drop, NoiseFiT as the reference implements it, NoiseFiT as leanfit
implements it); the arms differ only in that stage. Each arm's hyper-parameter is chosen on the validation
split of the first seed (lowest confident-wrong rate on the unknown splits among the settings that keep exact
match on the known splits within ``max_em_drop`` points of SFT), then trained on every seed; the test split is
scored once, with bootstrap confidence intervals over seeds and items and paired comparisons against SFT.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from leanfit.core.registry import register
from leanfit.studies.noisefit.config import NoiseFiTExperimentConfig

if TYPE_CHECKING:
    from leanfit.core.report import Report
    from leanfit.core.runner import RunContext
    from leanfit.core.runs import RunDir

__all__ = ["PRESETS", "run"]


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


def report(run: RunDir, results: dict[str, Any]) -> Report:
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
def run(ctx: RunContext[NoiseFiTExperimentConfig]) -> dict[str, Any]:
    from leanfit.studies.noisefit.pipeline import run_benchmark

    return run_benchmark(ctx)
