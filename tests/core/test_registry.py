"""The experiment/benchmark registry."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from leanfit.core import registry
from leanfit.core.config import BaseConfig
from leanfit.core.errors import ConfigError


@dataclass
class _Cfg(BaseConfig):
    pass


def test_discover_finds_method_registrations():
    names = {e.name for e in registry.entries("experiment")}
    assert "lm-baseline" in names
    assert "threads" in {e.name for e in registry.entries("benchmark")}


@pytest.mark.parametrize("name", ["LM", "lm_baseline", "-x", ""], ids=["upper", "underscore", "dash-first", "empty"])
def test_register_rejects_bad_names(name):
    with pytest.raises(ValueError, match="lowercase letters"):
        registry.register(name, kind="experiment", description="d", config_cls=_Cfg)


def test_register_requires_quick_and_full_presets():
    with pytest.raises(ValueError, match="lack 'full'"):
        registry.register("x-test", kind="experiment", description="d", config_cls=_Cfg, presets={"quick": {}})


def test_register_returns_the_function_and_records_its_entry(monkeypatch):
    registry.discover()
    monkeypatch.setitem(registry._REGISTRY, "benchmark", dict(registry._REGISTRY["benchmark"]))  # undone after

    def run(ctx):
        return {"steps": ctx.config}

    def report(run_dir, results):
        return None

    decorated = registry.register("registry-typed-test", kind="benchmark", description="d", config_cls=_Cfg,
                                  report=report, in_demo=False)(run)
    entry = registry.get("benchmark", "registry-typed-test")
    assert decorated is run and entry.run is run and entry.report is report and entry.config_cls is _Cfg
    assert (entry.name, entry.kind, entry.in_demo, dict(entry.presets)) == (
        "registry-typed-test", "benchmark", False, {"quick": {}, "full": {}})


def test_unknown_name_lists_valid_names():
    with pytest.raises(ConfigError) as err:
        registry.get("experiment", "lm-basline")
    assert "'lm-basline' is unknown" in str(err.value)
    assert "lm-baseline" in str(err.value)
