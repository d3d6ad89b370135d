"""Fact tables for question answering: elements (PyPI ``mendeleev``, read from its SQLite file directly, which is
much faster than importing its ORM), countries (PyPI ``countryinfo`` JSON files) and short-answer trivia
(PyPI ``chatterbot-corpus``)."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import yaml

from leanfit.core.packages import package_dir

__all__ = ["countries", "elements", "trivia"]


def elements() -> list[dict[str, Any]]:
    """118 elements: name, symbol, atomic_number, discovery_year (None when ancient), discoverers, period, group."""
    db = package_dir("mendeleev", "mendeleev", "the element facts") / "elements.db"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        con.row_factory = sqlite3.Row
        rows = con.execute(
            "SELECT name, symbol, atomic_number, discovery_year, discoverers, discovery_location, period, "
            "group_id AS 'group' FROM elements ORDER BY atomic_number"
        ).fetchall()
    return [dict(r) for r in rows]


def countries() -> list[dict[str, Any]]:
    """Countries with a capital: name, capital, currencies, region, subregion, calling_codes, population."""
    root = package_dir("countryinfo", "countryinfo", "the country facts") / "data"
    out = []
    for path in sorted(root.glob("*.json")):
        d = json.loads(path.read_text(encoding="utf-8"))
        if not d.get("capital") or not d.get("name"):
            continue
        out.append({
            "name": d["name"], "capital": d["capital"], "currencies": list(d.get("currencies") or []),
            "region": d.get("region"), "subregion": d.get("subregion"),
            "calling_codes": list(d.get("callingCodes") or []), "population": d.get("population"),
        })
    return out


def trivia() -> list[dict[str, str]]:
    """Short-answer trivia questions (question, answer) from chatterbot-corpus ``english/trivia.yml``."""
    path = package_dir("chatterbot_corpus", "chatterbot-corpus", "the trivia set") / "data" / "english" / "trivia.yml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return [{"question": str(q), "answer": str(a)} for q, a, *_ in data["conversations"]]
