"""VQ-Logits (arXiv 2505.10202): a K-code output head with exact collapsed loss, log-probs and decoding.

Names are imported lazily so that registering this package's experiments does not import torch."""

from __future__ import annotations

from leanfit.core.lazy import lazy_getattr

_EXPORTS = {
    "ClusterTables": "functional",
    "cluster_log_normalizers": "functional",
    "collapsed_argmax": "functional",
    "collapsed_cross_entropy": "functional",
    "collapsed_log_prob": "functional",
    "collapsed_sample": "functional",
    "materialized_logits": "functional",
    "VQLogitsHead": "head",
    "from_pretrained": "hf",
    "replace_lm_head": "hf",
    "vq_causal_lm_class": "hf",
    "MAPPINGS": "mapping",
    "build_mapping": "mapping",
    "unigram_floor": "mapping",
    "validate_mapping": "mapping",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr("leanfit.vq_logits", _EXPORTS)
