"""Every name a method package exports lazily resolves, and unknown names fail like a normal attribute."""

from __future__ import annotations

import importlib

import pytest

PACKAGES = ["leanfit.vq_logits", "leanfit.neural_de", "leanfit.moe", "leanfit.noisefit", "leanfit.iapt"]


@pytest.mark.parametrize("package", PACKAGES)
def test_every_lazy_export_resolves(package):
    module = importlib.import_module(package)
    assert module.__all__ == sorted(module._EXPORTS)
    for name in module.__all__:
        assert getattr(module, name) is not None, name


@pytest.mark.parametrize("package", PACKAGES)
def test_unknown_names_raise_attribute_error(package):
    module = importlib.import_module(package)
    with pytest.raises(AttributeError, match="no_such_name"):
        module.no_such_name  # noqa: B018
