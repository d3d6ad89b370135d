"""Byte-level BPE: exact round trips, special-token ids, vocab checks, and the hash-verified tokenizer cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from leanfit.core.cache import verify_folder
from leanfit.core.errors import ConfigError
from leanfit.studies.data import tokenizer as tokenizer_module
from leanfit.studies.data.corpora import load_corpus
from leanfit.studies.data.tokenizer import SPECIAL_TOKENS, bpe_tokenizer, to_hf_tokenizer, train_bpe

_TRAIN_TEXTS = [
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n",
    "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n",
    "Café naïve façade — déjà vu; Zürich, Größe, 日本語のテキスト.\n",
] * 20


@pytest.fixture(scope="module")
def tok():
    return train_bpe(_TRAIN_TEXTS, 320)


@pytest.mark.parametrize(
    "text",
    [
        "To be, or not to be",
        "  leading and trailing spaces  ",
        "tabs\tand\nnewlines\r\n\n",
        "Größe déjà vu, naïve café",
        "日本語 and emoji 🎉🦀 and a snowman ☃",
        "unseen words: xylophone quizzically",
        "",
    ],
    ids=["ascii", "spaces", "whitespace", "latin-accents", "cjk-emoji", "unseen", "empty"],
)
def test_bpe_round_trips_text_exactly(tok, text):
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.get_vocab_size() for i in ids)
    assert SPECIAL_TOKENS[0] not in tok.decode(ids)


@pytest.mark.parametrize(("vocab_size", "expected_tokens"), [(258, 85), (320, 46)], ids=["no-merges", "V320"])
def test_bpe_token_count_of_training_line(vocab_size, expected_tokens):
    # 258 = 256 byte tokens + 2 specials: no merges, one token per UTF-8 byte; 62 merges cut that to 46
    text = _TRAIN_TEXTS[0]
    assert len(text.encode("utf-8")) == 85
    assert len(train_bpe(_TRAIN_TEXTS, vocab_size).encode(text).ids) == expected_tokens


@pytest.mark.parametrize(
    ("token", "expected_id"), [(SPECIAL_TOKENS[0], 0), (SPECIAL_TOKENS[1], 1)], ids=["eos", "pad"]
)
def test_special_tokens_at_ids_0_and_1(tok, token, expected_id):
    assert tok.token_to_id(token) == expected_id
    assert tok.encode(token).ids == [expected_id]


def test_vocab_size_is_reached_when_corpus_is_rich_enough(tok):
    assert tok.get_vocab_size() == 320
    assert train_bpe(["ab"], 258).get_vocab_size() == 258  # 256 bytes + 2 specials, no merges


@pytest.mark.parametrize("vocab_size", [0, 256, 257], ids=["zero", "bytes-only", "one-below"])
def test_vocab_size_below_258_raises_config_error(vocab_size):
    with pytest.raises(ConfigError, match=rf"vocab_size={vocab_size} is invalid: expected at least 258"):
        train_bpe(["some text"], vocab_size)


def test_hf_wrapper_keeps_ids_and_specials(tok):
    hf = to_hf_tokenizer(tok)
    text = "Whether 'tis nobler in the mind"
    assert hf(text)["input_ids"] == tok.encode(text).ids
    assert (hf.eos_token_id, hf.bos_token_id, hf.pad_token_id) == (0, 0, 1)
    assert len(hf) == 320


# --- bpe_tokenizer cache ---------------------------------------------------------------------------------------
@pytest.fixture
def small_corpus(tmp_path: Path):
    folder = tmp_path / "texts"
    folder.mkdir()
    for i, text in enumerate(_TRAIN_TEXTS[:3] * 2):
        (folder / f"doc{i}.txt").write_text(f"{i}: {text}", encoding="utf-8")
    return load_corpus(str(folder), valid_fraction=0.2, test_fraction=0.2)


@pytest.fixture
def counted_training(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("LEANFIT_CACHE", str(tmp_path / "cache"))
    calls = []
    real = tokenizer_module.train_bpe

    def counting(texts, vocab_size):
        calls.append(vocab_size)
        return real(texts, vocab_size)

    monkeypatch.setattr(tokenizer_module, "train_bpe", counting)
    return calls


def _entry(tmp_path: Path, corpus, vocab_size: int) -> Path:
    return tmp_path / "cache" / "tokenizers" / f"bpe-v1-{vocab_size}-{corpus.fingerprint[:16]}"


def test_bpe_tokenizer_trains_once_then_reads_cache(tmp_path, small_corpus, counted_training):
    first = bpe_tokenizer(small_corpus, 300)
    second = bpe_tokenizer(small_corpus, 300)
    assert counted_training == [300]
    assert second.get_vocab() == first.get_vocab()
    entry = _entry(tmp_path, small_corpus, 300)
    assert sorted(p.name for p in entry.iterdir()) == ["manifest.json", "tokenizer.json"]
    assert verify_folder(entry)


def test_bpe_tokenizer_equals_direct_training_on_train_split(small_corpus, counted_training):
    cached = bpe_tokenizer(small_corpus, 300)
    direct = train_bpe(small_corpus.texts("train"), 300)
    assert cached.get_vocab() == direct.get_vocab()


@pytest.mark.parametrize("vocab_size", [290, 310], ids=["V290", "V310"])
def test_bpe_tokenizer_cache_key_includes_vocab_size(tmp_path, small_corpus, counted_training, vocab_size):
    bpe_tokenizer(small_corpus, 300)
    other = bpe_tokenizer(small_corpus, vocab_size)
    assert counted_training == [300, vocab_size]
    assert other.get_vocab_size() == vocab_size
    assert _entry(tmp_path, small_corpus, vocab_size).is_dir() and _entry(tmp_path, small_corpus, 300).is_dir()


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda p: p.write_bytes(b"\x00" + p.read_bytes()[1:]),
        lambda p: p.write_bytes(p.read_bytes()[:-10]),
        lambda p: p.unlink(),
    ],
    ids=["first-byte", "truncated", "deleted"],
)
def test_corrupted_tokenizer_is_rebuilt_identically(tmp_path, small_corpus, counted_training, corrupt):
    original = bpe_tokenizer(small_corpus, 300)
    entry = _entry(tmp_path, small_corpus, 300)
    corrupt(entry / "tokenizer.json")
    assert not verify_folder(entry)
    rebuilt = bpe_tokenizer(small_corpus, 300)
    assert counted_training == [300, 300]
    assert rebuilt.get_vocab() == original.get_vocab()
    assert verify_folder(entry)


def test_explicit_cache_root_is_used(tmp_path, small_corpus, counted_training):
    root = tmp_path / "elsewhere"
    bpe_tokenizer(small_corpus, 300, cache_root=root)
    assert [p.name for p in root.iterdir() if p.is_dir()] == [f"bpe-v1-300-{small_corpus.fingerprint[:16]}"]
    assert not (tmp_path / "cache" / "tokenizers").exists()
