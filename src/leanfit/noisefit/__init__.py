"""NoiseFiT (arXiv 2504.03302): fine-tuning with Gaussian noise injected into chosen decoder blocks.

The noise is scaled per token (relative to its RMS) and per element (robust weights); the blocks are chosen and
their scales set by a calibration pass (leanfit's propagated-KL rule or the paper's SNR); the loss mixes
completion-only cross-entropy, a KL from the clean to the noisy branches and a noisy-noisy consistency term,
with all branches packed into one batched forward. ``paper_v1=True`` reproduces the reference v1 trainer,
defects included, for comparison. :class:`NoiseFiTTrainer` (and ``NoiseFiTSFTTrainer`` for TRL) trains any
Hugging Face causal LM with it. The controlled hallucination benchmark that measures it (fact world, deterministic
metrics, bootstrap intervals) is ``leanfit run noisefit``, beside the library rather than in it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from leanfit.core.lazy import lazy_exports

if TYPE_CHECKING:
    from leanfit.noisefit.calibration import calibrate as calibrate
    from leanfit.noisefit.calibration import propagated_kl as propagated_kl
    from leanfit.noisefit.calibration import scale_for_target as scale_for_target
    from leanfit.noisefit.calibration import snr_scores as snr_scores
    from leanfit.noisefit.config import CalibrationResult as CalibrationResult
    from leanfit.noisefit.config import LayerSpec as LayerSpec
    from leanfit.noisefit.config import NoiseFiTConfig as NoiseFiTConfig
    from leanfit.noisefit.injector import NoiseInjector as NoiseInjector
    from leanfit.noisefit.injector import find_decoder_layers as find_decoder_layers
    from leanfit.noisefit.injector import paper_v1_noise_std as paper_v1_noise_std
    from leanfit.noisefit.injector import token_noise_std as token_noise_std
    from leanfit.noisefit.injector import unwrap_model as unwrap_model
    from leanfit.noisefit.loss import NoiseFiTLossOutput as NoiseFiTLossOutput
    from leanfit.noisefit.loss import RDropLossOutput as RDropLossOutput
    from leanfit.noisefit.loss import masked_kl as masked_kl
    from leanfit.noisefit.loss import noisefit_loss as noisefit_loss
    from leanfit.noisefit.loss import rdrop_loss as rdrop_loss
    from leanfit.noisefit.loss import shifted_completion_mask as shifted_completion_mask
    from leanfit.noisefit.loss import statistics_mask as statistics_mask
    from leanfit.noisefit.trainer import NoiseFiTCallback as NoiseFiTCallback
    from leanfit.noisefit.trainer import NoiseFiTSFTTrainer as NoiseFiTSFTTrainer
    from leanfit.noisefit.trainer import NoiseFiTTrainer as NoiseFiTTrainer
    from leanfit.noisefit.trainer import RDropTrainer as RDropTrainer
else:  # names resolve on first use: importing the package does not import torch
    __getattr__, __dir__, __all__ = lazy_exports(__name__, __file__)
