"""NoiseFiT (arXiv 2504.03302): fine-tuning with Gaussian noise injected into chosen decoder blocks.

The noise is scaled per token (relative to its RMS) and per element (robust weights); the blocks are chosen and
their scales set by a calibration pass (leanfit's propagated-KL rule or the paper's SNR); the loss mixes
completion-only cross-entropy, a KL from the clean to the noisy branches and a noisy-noisy consistency term,
with all branches packed into one batched forward. ``paper_v1=True`` reproduces the reference v1 trainer,
defects included, for comparison. :class:`NoiseFiTTrainer` (and ``NoiseFiTSFTTrainer`` for TRL) trains any
Hugging Face causal LM with it; ``leanfit run noisefit`` is the controlled hallucination benchmark (fact world,
deterministic metrics, bootstrap intervals).

Names are imported lazily so that registering this package's experiments does not import torch."""

from __future__ import annotations

from leanfit.core.lazy import lazy_getattr

_EXPORTS = {
    "LayerSpec": "config",
    "NoiseFiTConfig": "config",
    "NoiseInjector": "injector",
    "find_decoder_layers": "injector",
    "paper_v1_noise_std": "injector",
    "token_noise_std": "injector",
    "unwrap_model": "injector",
    "CalibrationResult": "calibration",
    "calibrate": "calibration",
    "propagated_kl": "calibration",
    "scale_for_target": "calibration",
    "snr_scores": "calibration",
    "NoiseFiTLossOutput": "loss",
    "RDropLossOutput": "loss",
    "masked_kl": "loss",
    "noisefit_loss": "loss",
    "rdrop_loss": "loss",
    "shifted_completion_mask": "loss",
    "statistics_mask": "loss",
    "NoiseFiTCallback": "trainer",
    "NoiseFiTSFTTrainer": "trainer",
    "NoiseFiTTrainer": "trainer",
    "RDropTrainer": "trainer",
    "ABSTAIN": "facts_qa",
    "Fact": "facts_qa",
    "FactWorld": "facts_qa",
    "FactWorldConfig": "facts_qa",
    "build_fact_world": "facts_qa",
    "pretrain_text": "facts_qa",
    "qa_example": "facts_qa",
    "bootstrap_ci": "metrics",
    "evaluation_summary": "metrics",
    "expected_calibration_error": "metrics",
    "paired_bootstrap_diff": "metrics",
    "relative_change_ci": "metrics",
    "score_items": "hallucination",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr("leanfit.noisefit", _EXPORTS)
