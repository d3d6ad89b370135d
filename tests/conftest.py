"""Shared test set-up: no progress bars, an isolated leanfit cache per test session."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _leanfit_env(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["LEANFIT_NO_PROGRESS"] = "1"
    os.environ.setdefault("LEANFIT_CACHE", str(tmp_path_factory.mktemp("leanfit-cache")))
