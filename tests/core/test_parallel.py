"""joblib backends: loky and threading run a Parallel; an unknown name is refused before anything starts."""

from __future__ import annotations

import pytest
from joblib import Parallel, delayed

from leanfit.core.parallel import joblib_backend


@pytest.mark.parametrize("name", ["loky", "threading"])
def test_local_backends_run_parallel_work(name):
    with joblib_backend(name):
        assert Parallel(n_jobs=2)(delayed(pow)(i, 2) for i in range(5)) == [0, 1, 4, 9, 16]


def test_unknown_backend_is_refused_with_the_choices():
    expected = r"backend='spark' is invalid: expected one of loky, threading, dask, ray"
    with pytest.raises(ValueError, match=expected), joblib_backend("spark"):
        pass
