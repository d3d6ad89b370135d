"""Byte-level BPE tokenizers trained locally with ``tokenizers``, cached by (corpus fingerprint, vocab size)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from leanfit.core.cache import cache_dir, cached_folder
from leanfit.core.errors import ConfigError, bad_value
from leanfit.studies.data.corpora import Corpus

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

__all__ = ["SPECIAL_TOKENS", "bpe_tokenizer", "to_hf_tokenizer", "train_bpe"]

SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>")
_VERSION = 1  # bump when the training recipe changes, so old cache entries are not reused


def train_bpe(texts: Sequence[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style pre-tokenisation) with ``SPECIAL_TOKENS`` at ids 0 and 1."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ConfigError(bad_value("vocab_size", vocab_size, f"at least {256 + len(SPECIAL_TOKENS)} (bytes + specials)"))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def bpe_tokenizer(corpus: Corpus, vocab_size: int, cache_root: Path | None = None) -> Tokenizer:
    """The BPE tokenizer trained on ``corpus.train`` at ``vocab_size``, from the cache when present and intact."""
    from tokenizers import Tokenizer

    key = f"bpe-v{_VERSION}-{vocab_size}-{corpus.fingerprint[:16]}"
    root = cache_root or cache_dir("tokenizers")

    def build(tmp: Path) -> None:
        train_bpe(corpus.texts("train"), vocab_size).save(str(tmp / "tokenizer.json"))

    folder = cached_folder(root / key, build, meta={"corpus": corpus.spec, "vocab_size": vocab_size})
    return Tokenizer.from_file(str(folder / "tokenizer.json"))


def to_hf_tokenizer(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap for ``transformers`` (``save_pretrained``, ``generate`` and pipelines)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=SPECIAL_TOKENS[0], bos_token=SPECIAL_TOKENS[0], pad_token=SPECIAL_TOKENS[1]
    )
