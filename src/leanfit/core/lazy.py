"""Lazy package exports whose single source of truth is the package's ``if TYPE_CHECKING:`` import block.

A method package writes its public names once, as ordinary imports that type checkers and IDEs read::

    if TYPE_CHECKING:
        from leanfit.noisefit.config import NoiseFiTConfig as NoiseFiTConfig
    else:
        __getattr__, __dir__, __all__ = lazy_exports(__name__, __file__)

At run time :func:`lazy_exports` parses that block (no import happens) and resolves each name from its module on
first use, so ``leanfit list`` registers the studies without importing torch.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["lazy_exports", "type_checking_imports"]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def type_checking_imports(init_file: str | Path, package: str) -> dict[str, str]:
    """``{public name: absolute module}`` from the ``from M import X as X`` lines under ``if TYPE_CHECKING:``."""
    tree = ast.parse(Path(init_file).read_text(encoding="utf-8"))
    names: dict[str, str] = {}
    for node in tree.body:
        if not (isinstance(node, ast.If) and _is_type_checking(node.test)):
            continue
        for stmt in node.body:
            if not isinstance(stmt, ast.ImportFrom):
                continue
            module = stmt.module or ""
            if stmt.level:
                base = package.rsplit(".", stmt.level - 1)[0] if stmt.level > 1 else package
                module = f"{base}.{module}" if module else base
            for alias in stmt.names:
                if alias.asname not in (None, alias.name):
                    raise ValueError(f"{init_file}: 'from {module} import {alias.name} as {alias.asname}' renames an "
                                     f"export; lazy exports keep names, write 'import {alias.name} as {alias.name}'")
                names[alias.name] = module
    return names


def lazy_exports(package: str, init_file: str) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``(__getattr__, __dir__, __all__)`` for ``package``, resolving each name of its TYPE_CHECKING block lazily."""
    exports = type_checking_imports(init_file, package)

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        if importlib.util.find_spec(f"{package}.{name}") is not None:  # a submodule, as a plain package offers it
            return importlib.import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(exports) | set(vars(sys.modules[package])))

    return __getattr__, __dir__, sorted(exports)
