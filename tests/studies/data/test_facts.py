"""Fact tables: elements (mendeleev), countries (countryinfo), trivia (chatterbot-corpus)."""

from __future__ import annotations

import importlib.util

import pytest

from leanfit.core.errors import MissingDependencyError
from leanfit.studies.data.facts import countries, elements, trivia


def _needs(module: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=f"needs {module}")


@_needs("mendeleev")
@pytest.mark.parametrize(
    ("symbol", "name", "atomic_number", "discovery_year", "period", "group"),
    [("H", "Hydrogen", 1, 1766, 1, 1), ("Ne", "Neon", 10, 1898, 2, 18), ("Au", "Gold", 79, None, 6, 11),
     ("Og", "Oganesson", 118, 2002, 7, 18)],
    ids=["H", "Ne", "Au-ancient", "Og"],
)
def test_elements_rows(symbol, name, atomic_number, discovery_year, period, group):
    table = elements()
    assert len(table) == 118
    assert [r["atomic_number"] for r in table] == list(range(1, 119))
    row = next(r for r in table if r["symbol"] == symbol)
    assert (row["name"], row["atomic_number"], row["discovery_year"], row["period"], row["group"]) == (
        name, atomic_number, discovery_year, period, group,
    )


@_needs("countryinfo")
@pytest.mark.parametrize(
    ("name", "capital", "currency", "region"),
    [
        ("France", "Paris", "EUR", "Europe"),
        ("Japan", "Tokyo", "JPY", "Asia"),
        ("Brazil", "Brasília", "BRL", "Americas"),
    ],
    ids=["France", "Japan", "Brazil"],
)
def test_countries_rows(name, capital, currency, region):
    table = countries()
    assert len(table) == 249
    assert all(r["capital"] and r["name"] for r in table)
    row = next(r for r in table if r["name"] == name)
    assert (row["capital"], currency in row["currencies"], row["region"]) == (capital, True, region)


@_needs("chatterbot_corpus")
def test_trivia_has_question_answer_pairs():
    items = trivia()
    assert len(items) == 261
    assert items[0] == {"question": "Who was the 37th President of the United States?", "answer": "Richard Nixon"}
    assert min(len(i["question"]) for i in items) > 0
    assert min(len(i["answer"]) for i in items) > 0


@pytest.mark.parametrize(
    ("loader", "module", "hint"),
    [(elements, "mendeleev", "pip install mendeleev"), (countries, "countryinfo", "pip install countryinfo"),
     (trivia, "chatterbot_corpus", "pip install chatterbot-corpus")],
    ids=["elements", "countries", "trivia"],
)
def test_missing_package_names_pip_install(hide_package, loader, module, hint):
    hide_package(module)
    with pytest.raises(MissingDependencyError, match="which is not installed") as info:
        loader()
    assert f"`{hint}`" in str(info.value)
