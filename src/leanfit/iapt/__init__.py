"""Instruction-aware prompt tuning (IAPT, Zhu et al., ACL 2024, arXiv 2405.18203).

Each Transformer layer gets a small prompt generator that turns the hidden states of the instruction tokens at
the layer's input into a few soft tokens (down-projection, self-attention pooling with one query per soft token,
a learnable rational activation per layer, up-projection). The soft tokens overwrite placeholder positions that
the wrapper inserts into the sequence; forward pre-hooks do the injection, so any Hugging Face decoder or encoder
works without code changes. Several adapters serve or train in one batch (one adapter per row), and decoding
reuses the prefill's prompts through the KV cache. :func:`encode_instructions` tokenises instructions (and inputs)
into left-padded batches with their ``instruction_mask``; :class:`IAPTTrainer` is a ``transformers.Trainer`` that
saves and restores the adapters only.

This is our own module rather than a PEFT tuner: PEFT registers methods only under names of its closed
``PeftType`` enum, and its prompt methods store materialised prompt embeddings, which input-dependent prompts
do not have."""

from __future__ import annotations

from typing import TYPE_CHECKING

from leanfit.core.lazy import lazy_exports

if TYPE_CHECKING:
    from leanfit.iapt.config import PEFT_TYPE as PEFT_TYPE
    from leanfit.iapt.config import IAPTConfig as IAPTConfig
    from leanfit.iapt.encoding import SEPARATOR as SEPARATOR
    from leanfit.iapt.encoding import encode_instructions as encode_instructions
    from leanfit.iapt.generator import PromptGenerator as PromptGenerator
    from leanfit.iapt.generator import generator_parameter_count as generator_parameter_count
    from leanfit.iapt.generator import iapt_parameter_count as iapt_parameter_count
    from leanfit.iapt.generator import pool as pool
    from leanfit.iapt.model import CONFIG_NAME as CONFIG_NAME
    from leanfit.iapt.model import WEIGHTS_NAME as WEIGHTS_NAME
    from leanfit.iapt.model import IAPTModel as IAPTModel
    from leanfit.iapt.model import get_iapt_model as get_iapt_model
    from leanfit.iapt.rational import FIT_TARGETS as FIT_TARGETS
    from leanfit.iapt.rational import RationalActivation as RationalActivation
    from leanfit.iapt.rational import RationalCoefficients as RationalCoefficients
    from leanfit.iapt.rational import coefficients as coefficients
    from leanfit.iapt.slots import CachedPrompts as CachedPrompts
    from leanfit.iapt.slots import IAPTBatch as IAPTBatch
    from leanfit.iapt.slots import find_layers as find_layers
    from leanfit.iapt.trainer import IAPTTrainer as IAPTTrainer
else:  # names resolve on first use: importing the package does not import torch
    __getattr__, __dir__, __all__ = lazy_exports(__name__, __file__)
