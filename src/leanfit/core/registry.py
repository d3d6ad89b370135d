"""Registry of experiments (``leanfit run NAME``) and benchmarks (``leanfit bench NAME``).

A study registers its own entries from ``leanfit/studies/<name>/experiment.py`` or ``bench.py``; :func:`discover`
imports those modules (and any third-party ``leanfit.plugins`` entry point), so no central file names studies.
The study package is named by a string (``STUDY_PACKAGES``), not imported here: ``core`` knows no study.
Registration modules must stay light (configs only, heavy imports inside the run functions) because
``leanfit list`` imports all of them.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import pkgutil
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from leanfit.core.config import BaseConfig
from leanfit.core.errors import ConfigError, bad_value

if TYPE_CHECKING:  # types only: the runner and the report import this module
    from leanfit.core.report import Report
    from leanfit.core.runner import RunContext
    from leanfit.core.runs import RunDir

__all__ = ["Entry", "ReportFn", "RunFn", "discover", "entries", "get", "register"]

ConfigT = TypeVar("ConfigT", bound=BaseConfig)
RunFn = Callable[["RunContext[Any]"], dict[str, Any]]
"""``run(ctx) -> results``: what an entry does; the results are written to ``results.json``."""
ReportFn = Callable[["RunDir", dict[str, Any]], "Report"]
"""``report(run, results) -> Report``: the body of an entry's markdown report."""

Kind = Literal["experiment", "benchmark"]
_NAME = re.compile(r"^[a-z][a-z0-9-]*$")
_REGISTRY: dict[Kind, dict[str, Entry]] = {"experiment": {}, "benchmark": {}}
_DISCOVERED = False
_REGISTRATION_MODULES = ("experiment", "bench")
STUDY_PACKAGES = ("leanfit.studies",)


@dataclass(frozen=True)
class Entry:
    """One registered experiment or benchmark.

    ``run(ctx) -> dict`` does the work and returns the results written to ``results.json``;
    ``report(run, results) -> Report`` (optional) renders the markdown report; ``presets`` maps a preset name to
    config overrides applied on top of the config defaults.
    """

    name: str
    kind: Kind
    description: str
    config_cls: type[BaseConfig]
    run: RunFn
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    report: ReportFn | None = None
    in_demo: bool = True

    def preset_config(self, preset: str) -> BaseConfig:
        """The config ``preset`` runs: the class defaults with the preset's values applied."""
        if preset not in self.presets:
            raise ConfigError(bad_value("--preset", preset, "one of " + ", ".join(self.presets)))
        return self.config_cls.from_dict(self.presets[preset])


def register(
    name: str,
    *,
    kind: Kind,
    description: str,
    config_cls: type[ConfigT],
    presets: Mapping[str, Mapping[str, Any]] | None = None,
    report: ReportFn | None = None,
    in_demo: bool = True,
) -> Callable[[Callable[[RunContext[ConfigT]], dict[str, Any]]], Callable[[RunContext[ConfigT]], dict[str, Any]]]:
    """Decorator registering ``fn(ctx) -> results`` under ``name``; ``ctx.config`` is a ``config_cls``, and a type
    checker holds ``fn``'s ``RunContext[...]`` parameter to it."""
    if not _NAME.match(name):
        raise ValueError(f"name={name!r} is invalid: expected lowercase letters, digits and '-', e.g. 'lm-baseline'")
    presets = dict(presets or {"quick": {}, "full": {}})
    for required in ("quick", "full"):
        if required not in presets:
            raise ValueError(f"presets of {name!r} lack {required!r}; every entry defines 'quick' and 'full'")

    def decorator(
        fn: Callable[[RunContext[ConfigT]], dict[str, Any]],
    ) -> Callable[[RunContext[ConfigT]], dict[str, Any]]:
        existing = _REGISTRY[kind].get(name)
        if existing is not None and existing.run.__module__ != fn.__module__:
            raise ValueError(f"{kind} {name!r} is already registered by {existing.run.__module__}")
        _REGISTRY[kind][name] = Entry(name, kind, description, config_cls, fn, presets, report, in_demo)
        return fn

    return decorator


def discover() -> None:
    """Import every ``leanfit.studies.<name>.experiment`` / ``.bench`` module and ``leanfit.plugins`` entry points."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    for package_name in STUDY_PACKAGES:
        package = importlib.import_module(package_name)
        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
            if not info.ispkg:
                continue
            for mod in _REGISTRATION_MODULES:
                qual = f"{package_name}.{info.name}.{mod}"
                if importlib.util.find_spec(qual) is not None:
                    importlib.import_module(qual)
    for ep in importlib.metadata.entry_points(group="leanfit.plugins"):
        ep.load()
    _DISCOVERED = True


def entries(kind: Kind) -> list[Entry]:
    discover()
    return [_REGISTRY[kind][k] for k in sorted(_REGISTRY[kind])]


def get(kind: Kind, name: str) -> Entry:
    discover()
    try:
        return _REGISTRY[kind][name]
    except KeyError:
        valid = ", ".join(sorted(_REGISTRY[kind])) or "(none registered)"
        command = "run" if kind == "experiment" else "bench"
        raise ConfigError(
            f"{kind} {name!r} is unknown; valid names: {valid} (see `leanfit list`, then `leanfit {command} NAME`)"
        ) from None
