"""Every experiment whose config inherits JobsConfig keeps its checks (a subclass's own ``__post_init__`` must call
the base's): jobs=0 refused, threading refused unless the study declares its jobs thread-safe, jobs=-1 accepted."""

from __future__ import annotations

import pytest

from leanfit.core import registry
from leanfit.core.errors import ConfigError
from leanfit.core.parallel import JobsConfig

ENTRIES = [e for e in registry.entries("experiment") if issubclass(e.config_cls, JobsConfig)]


def test_the_studies_that_run_jobs_share_the_knobs():
    assert sorted(e.name for e in ENTRIES) == ["iapt", "neural-de", "topk-moe"]


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_jobs_checks_hold_in_every_study(entry):
    cls = entry.config_cls
    with pytest.raises(ConfigError, match=r"jobs=0 is invalid"):
        cls.from_dict({"jobs": 0})
    assert cls.from_dict({"jobs": -1}).workers() >= 1
    if cls.thread_safe:
        assert cls.from_dict({"backend": "threading"}).backend == "threading"
    else:
        with pytest.raises(ConfigError, match=r"backend='threading' is invalid"):
            cls.from_dict({"backend": "threading"})
