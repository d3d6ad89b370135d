"""Configs shared by the language-model experiments."""

from __future__ import annotations

from dataclasses import dataclass

from leanfit.core.config import BaseConfig, option
from leanfit.core.errors import ConfigError, bad_value

__all__ = ["DataConfig", "ModelConfig"]


@dataclass
class DataConfig(BaseConfig):
    corpus: str = option("shakespeare", help="corpus spec: shakespeare | austen | kjv | gcide | a+b | FILE/DIR | hf:NAME")
    vocab_size: int = option(8192, help="BPE vocabulary size (tokenizer trained on the train split, cached)")
    valid_fraction: float = option(0.1, help="fraction of documents held out for validation", ge=0, lt=1)
    test_fraction: float = option(0.1, help="fraction of documents held out for the single final test score", ge=0,
                                  lt=1)
    max_train_tokens: int = option(0, help="cap on training tokens (0 = all); for smoke tests")

    def __post_init__(self) -> None:
        if self.vocab_size < 258:
            raise ConfigError(bad_value("data.vocab_size", self.vocab_size, "at least 258"))
        if self.max_train_tokens < 0:
            raise ConfigError(bad_value("data.max_train_tokens", self.max_train_tokens, "0 (all) or a positive count"))


@dataclass
class ModelConfig(BaseConfig):
    d_model: int = option(128, help="hidden size", ge=1)
    n_layers: int = option(2, help="decoder layers", ge=1)
    n_heads: int = option(4, help="attention heads (d_model must be a multiple)", ge=1)
    ffn_mult: float = option(8 / 3, help="SwiGLU hidden size as a multiple of d_model (rounded to 32)", gt=0)
    tie_embeddings: bool = option(False, help="tie input embeddings and output head")

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ConfigError(bad_value("model.d_model", self.d_model, f"a multiple of model.n_heads={self.n_heads}"))
