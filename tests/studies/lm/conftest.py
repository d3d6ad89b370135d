"""Tiny LM settings for fast runs on the shared ``tiny_corpus``."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_overrides(tiny_corpus: Path) -> list[str]:
    return [
        f"data.corpus={tiny_corpus}", "data.vocab_size=300", "data.valid_fraction=0.2", "data.test_fraction=0.2",
        "model.d_model=32", "model.n_heads=2", "model.n_layers=1",
        "train.batch_size=8", "train.seq_len=32", "train.eval_tokens=2048", "train.warmup_steps=5",
        "train.log_every=5", "train.eval_every=20", "train.checkpoint_every=10", "train.threads=1",
    ]
