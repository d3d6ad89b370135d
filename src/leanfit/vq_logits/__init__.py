"""VQ-Logits (arXiv 2505.10202): a K-code output head with exact collapsed loss, log-probs and decoding."""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING

from leanfit.core.lazy import lazy_exports

if TYPE_CHECKING:
    from leanfit.vq_logits.compress import CompressConfig as CompressConfig
    from leanfit.vq_logits.compress import compress_lm_head as compress_lm_head
    from leanfit.vq_logits.compress import teacher_kl as teacher_kl
    from leanfit.vq_logits.functional import ClusterTables as ClusterTables
    from leanfit.vq_logits.functional import TokenOverrides as TokenOverrides
    from leanfit.vq_logits.functional import cluster_log_normalizers as cluster_log_normalizers
    from leanfit.vq_logits.functional import collapsed_argmax as collapsed_argmax
    from leanfit.vq_logits.functional import collapsed_cross_entropy as collapsed_cross_entropy
    from leanfit.vq_logits.functional import collapsed_log_prob as collapsed_log_prob
    from leanfit.vq_logits.functional import collapsed_sample as collapsed_sample
    from leanfit.vq_logits.functional import materialized_logits as materialized_logits
    from leanfit.vq_logits.head import VQLogitsHead as VQLogitsHead
    from leanfit.vq_logits.hf import VQLogitsConfig as VQLogitsConfig
    from leanfit.vq_logits.hf import from_pretrained as from_pretrained
    from leanfit.vq_logits.hf import replace_lm_head as replace_lm_head
    from leanfit.vq_logits.hf import vq_causal_lm_class as vq_causal_lm_class
    from leanfit.vq_logits.learn import MapLearner as MapLearner
    from leanfit.vq_logits.learn import context_reassign as context_reassign
    from leanfit.vq_logits.mapping import MAPPINGS as MAPPINGS
    from leanfit.vq_logits.mapping import build_mapping as build_mapping
    from leanfit.vq_logits.mapping import unigram_floor as unigram_floor
    from leanfit.vq_logits.mapping import validate_mapping as validate_mapping
    from leanfit.vq_logits.sigma import hidden_moments as hidden_moments
    from leanfit.vq_logits.sigma import reassign_mapping as reassign_mapping
    from leanfit.vq_logits.sigma import sigma_kmeans as sigma_kmeans
else:  # names resolve on first use: importing the package does not import torch
    __getattr__, __dir__, __all__ = lazy_exports(__name__, __file__)
    if "transformers.configuration_utils" in sys.modules:  # torch and transformers' configs are loaded already:
        importlib.import_module(f"{__name__}.hf")  # registers the VQ classes with the Auto classes
