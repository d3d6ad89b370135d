"""Tiny Llama models built from a config: the trunk of the language-model experiments."""

from __future__ import annotations

from typing import TYPE_CHECKING

from leanfit.core.errors import ConfigError, bad_value

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

__all__ = ["tiny_llama"]


def tiny_llama(
    vocab_size: int,
    *,
    d_model: int = 128,
    n_layers: int = 2,
    n_heads: int = 4,
    ffn_mult: float = 8 / 3,
    max_seq_len: int = 256,
    tie_embeddings: bool = False,
    seed: int | None = None,
) -> LlamaForCausalLM:
    """A ``transformers.LlamaForCausalLM`` with the given sizes (RMSNorm, RoPE, SwiGLU, no dropout).

    ``seed`` makes the initialisation reproducible without touching the global RNG stream."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sizes = {"vocab_size": vocab_size, "d_model": d_model, "n_layers": n_layers, "n_heads": n_heads,
             "max_seq_len": max_seq_len}
    for name, value in sizes.items():
        if value < 1:
            raise ConfigError(bad_value(name, value, "a positive integer"))
    if d_model % n_heads:
        raise ConfigError(bad_value("d_model", d_model, f"a multiple of n_heads={n_heads}"))
    intermediate = int(round(ffn_mult * d_model / 32)) * 32 or 32
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=d_model, intermediate_size=intermediate, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=n_heads, max_position_embeddings=max_seq_len,
        tie_word_embeddings=tie_embeddings, bos_token_id=0, eos_token_id=0, pad_token_id=1,
        attention_dropout=0.0, rms_norm_eps=1e-5,
    )
    if seed is None:
        return LlamaForCausalLM(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)
