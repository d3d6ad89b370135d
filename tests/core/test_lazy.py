"""A method package's public names: one TYPE_CHECKING import block read by type checkers, resolved lazily at run
time, and importing the package imports neither torch nor the studies."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from leanfit.core.lazy import type_checking_imports

METHODS = ["leanfit.vq_logits", "leanfit.neural_de", "leanfit.moe", "leanfit.noisefit", "leanfit.iapt"]
PACKAGES = ["leanfit.core", *METHODS]


@pytest.mark.parametrize("package", PACKAGES)
def test_every_lazy_export_resolves_to_its_declared_module(package):
    module = importlib.import_module(package)
    declared = type_checking_imports(module.__file__, package)
    assert module.__all__ == sorted(declared) and len(declared) >= 10
    assert set(module.__all__) <= set(dir(module)) and "__doc__" in dir(module)
    for name, source in declared.items():
        obj = getattr(module, name)
        assert obj is getattr(importlib.import_module(source), name), name
        assert source.startswith(package + "."), (name, source)


@pytest.mark.parametrize("package", PACKAGES)
def test_unknown_names_raise_attribute_error(package):
    module = importlib.import_module(package)
    with pytest.raises(AttributeError, match="no_such_name"):
        module.no_such_name  # noqa: B018


def test_relative_imports_resolve_against_the_package(tmp_path):
    init = tmp_path / "__init__.py"
    init.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from .a import X as X\n"
        "    from ..b.c import Y\n"
        "from .d import Z\n"
    )
    assert type_checking_imports(init, "pkg.sub") == {"X": "pkg.sub.a", "Y": "pkg.b.c"}


@pytest.mark.parametrize("package", METHODS)
def test_importing_a_method_package_and_its_names_loads_no_study_nor_plotting(package):
    code = (
        "import importlib, sys\n"
        f"m = importlib.import_module({package!r})\n"
        "before = 'torch' in sys.modules\n"
        "[getattr(m, n) for n in m.__all__]\n"
        "bad = sorted(k for k in sys.modules if k.startswith(('matplotlib', 'leanfit.studies', 'leanfit.core.runner',"
        " 'leanfit.core.report', 'leanfit.core.registry', 'leanfit.cli')))\n"
        "print(before, bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False []", out


def test_submodules_resolve_like_a_plain_package_and_renamed_exports_are_refused(tmp_path):
    import leanfit.core

    assert leanfit.core.registry is importlib.import_module("leanfit.core.registry")
    init = tmp_path / "__init__.py"
    init.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import X as Y\n")
    with pytest.raises(ValueError, match="renames an export"):
        type_checking_imports(init, "pkg")
