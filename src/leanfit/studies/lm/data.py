"""Token streams and deterministic batches for language-model training.

The batch of step ``s`` is a pure function of ``(seed, s)``: resuming at step ``s`` needs no sampler state, and
``W`` processes that each take their slice of the same global batch see exactly the data of one process.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from leanfit.core.errors import ConfigError, bad_value
from leanfit.core.seed import derive_seed

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer

    from leanfit.studies.lm.config import DataConfig

__all__ = ["encode_documents", "eval_windows", "prepare_lm_data", "train_batch"]


def encode_documents(tokenizer: Tokenizer, texts: Sequence[str], eos_id: int = 0) -> torch.Tensor:
    """Concatenate the token ids of ``texts``, each followed by ``eos_id``: (n_tokens,) int64."""
    import torch

    ids: list[int] = []
    for enc in tokenizer.encode_batch(list(texts)):
        ids.extend(enc.ids)
        ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.long)


def train_batch(
    tokens: torch.Tensor, step: int, batch_size: int, seq_len: int, seed: int, rank: int = 0, world: int = 1
) -> torch.Tensor:
    """Rows ``rank::world``-slice of the global batch of step ``step``: (batch_size // world, seq_len + 1)."""
    import torch

    if batch_size % world:
        raise ConfigError(bad_value("batch_size", batch_size, f"a multiple of the number of processes ({world})"))
    if tokens.numel() < seq_len + 2:
        raise ConfigError(bad_value("seq_len", seq_len, f"below the training-token count {tokens.numel()}"))
    gen = torch.Generator().manual_seed(derive_seed(seed, "lm-batch", step))
    starts = torch.randint(0, tokens.numel() - seq_len - 1, (batch_size,), generator=gen)
    per = batch_size // world
    mine = starts[rank * per : (rank + 1) * per]
    offsets = torch.arange(seq_len + 1)
    return tokens[mine[:, None] + offsets[None, :]]


def eval_windows(tokens: torch.Tensor, seq_len: int, max_tokens: int) -> torch.Tensor:
    """Non-overlapping windows of ``seq_len + 1`` tokens (stride ``seq_len``) covering at most ``max_tokens``
    predicted tokens: (n_windows, seq_len + 1)."""
    import torch

    n = min((tokens.numel() - 1) // seq_len, max(1, max_tokens // seq_len))
    if n < 1:
        raise ConfigError(bad_value("seq_len", seq_len, f"below the evaluation-token count {tokens.numel()}"))
    idx = torch.arange(n)[:, None] * seq_len + torch.arange(seq_len + 1)[None, :]
    return tokens[idx]


def prepare_lm_data(cfg: DataConfig) -> dict[str, Any]:
    """Corpus split, cached tokenizer and encoded train/valid/test token tensors."""
    from leanfit.core.progress import stage
    from leanfit.studies.data.corpora import load_corpus
    from leanfit.studies.data.tokenizer import bpe_tokenizer

    with stage(f"data: corpus {cfg.corpus!r}, BPE tokenizer ({cfg.vocab_size} tokens, cached) and encoding"):
        corpus = load_corpus(cfg.corpus, cfg.valid_fraction, cfg.test_fraction)
        tokenizer = bpe_tokenizer(corpus, cfg.vocab_size)
        tokens = {split: encode_documents(tokenizer, corpus.texts(split)) for split in ("train", "valid", "test")}
    if cfg.max_train_tokens:
        tokens["train"] = tokens["train"][: cfg.max_train_tokens]
    return {"corpus": corpus, "tokenizer": tokenizer, "tokens": tokens}
