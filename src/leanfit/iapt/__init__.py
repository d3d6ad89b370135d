"""Instruction-aware prompt tuning (IAPT, Zhu et al., ACL 2024, arXiv 2405.18203).

Each Transformer layer gets a small prompt generator that turns the hidden states of the instruction tokens at
the layer's input into a few soft tokens (down-projection, self-attention pooling with one query per soft token,
a learnable rational activation per layer, up-projection). The soft tokens overwrite placeholder positions that
the wrapper inserts into the sequence; forward pre-hooks do the injection, so any Hugging Face decoder or encoder
works without code changes. Several adapters serve or train in one batch (one adapter per row), and decoding
reuses the prefill's prompts through the KV cache.

This is our own module rather than a PEFT tuner: PEFT registers methods only under names of its closed
``PeftType`` enum, and its prompt methods store materialised prompt embeddings, which input-dependent prompts
do not have.

Names are imported lazily so that registering this package's experiments does not import torch."""

from __future__ import annotations

from leanfit.core.lazy import lazy_getattr

_EXPORTS = {
    "FIT_TARGETS": "rational",
    "RationalActivation": "rational",
    "RationalCoefficients": "rational",
    "coefficients": "rational",
    "rational": "rational",
    "PEFT_TYPE": "config",
    "IAPTConfig": "config",
    "PromptGenerator": "generator",
    "generator_parameter_count": "generator",
    "iapt_parameter_count": "generator",
    "pool": "generator",
    "CONFIG_NAME": "model",
    "WEIGHTS_NAME": "model",
    "CachedPrompts": "model",
    "IAPTBatch": "model",
    "IAPTModel": "model",
    "find_layers": "model",
    "get_iapt_model": "model",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr("leanfit.iapt", _EXPORTS)
