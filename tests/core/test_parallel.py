"""core.parallel: loky and threading run a Parallel; an unknown backend is refused before anything starts; run_jobs
gives the sequential results in order on every backend, calls back on each result, and refuses jobs != 1 under
torchrun with one line; JobsConfig validates the knobs once for every study and hands them to run_jobs."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from joblib import Parallel, delayed

from leanfit.core.errors import ConfigError
from leanfit.core.parallel import JobsConfig, joblib_backend, run_jobs


def _draws(seed: int) -> list[float]:
    """Work whose result depends on its input only (module level, so that it pickles into loky workers)."""
    rng = random.Random(seed)
    return [rng.random() for _ in range(1000)]


@pytest.mark.parametrize("name", ["loky", "threading"])
def test_local_backends_run_parallel_work(name):
    with joblib_backend(name):
        assert Parallel(n_jobs=2)(delayed(pow)(i, 2) for i in range(5)) == [0, 1, 4, 9, 16]


def test_unknown_backend_is_refused_with_the_choices():
    expected = r"backend='spark' is invalid: expected one of loky, threading, dask, ray"
    with pytest.raises(ConfigError, match=expected), joblib_backend("spark"):
        pass


@pytest.mark.parametrize(("jobs", "backend"), [(2, "loky"), (3, "threading"), (-1, "threading")],
                         ids=["loky-2", "threading-3", "threading-every-core"])
def test_parallel_results_equal_sequential_results_in_order(jobs, backend):
    seeds = [5, 1, 4, 2, 3, 0]
    sequential = run_jobs(_draws, seeds, jobs=1, desc="sequential")
    assert sequential == [_draws(s) for s in seeds]
    assert run_jobs(_draws, seeds, jobs=jobs, backend=backend, desc="parallel") == sequential


@pytest.mark.parametrize("jobs", [1, 2], ids=["sequential", "parallel"])
def test_on_result_sees_every_result_once(jobs):
    seen: list[list[float]] = []
    out = run_jobs(_draws, [3, 4, 5], jobs=jobs, backend="threading", desc="jobs", on_result=seen.append)
    assert sorted(seen) == sorted(out) and len(seen) == 3


def test_serial_fn_runs_only_when_the_jobs_run_one_at_a_time():
    marked = lambda seed: ("serial", seed)  # noqa: E731
    assert run_jobs(str, [1, 2], jobs=1, desc="one", serial_fn=marked) == [("serial", 1), ("serial", 2)]
    assert run_jobs(str, [1, 2], jobs=2, backend="threading", desc="two", serial_fn=marked) == ["1", "2"]
    assert run_jobs(str, [7], jobs=2, backend="threading", desc="single", serial_fn=marked) == [("serial", 7)]


@pytest.mark.parametrize("jobs", [2, -1], ids=["two", "every-core"])
def test_jobs_under_torchrun_are_refused_with_one_line(jobs, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError) as err:
        run_jobs(_draws, [1, 2, 3], jobs=jobs, backend="threading", desc="jobs")
    assert str(err.value) == (f"jobs={jobs} is invalid: expected 1 under torchrun (WORLD_SIZE=2); a data-parallel "
                              "launch already splits every batch over processes; set jobs=1")
    assert "\n" not in str(err.value)
    assert run_jobs(_draws, [1], jobs=1, desc="jobs") == [_draws(1)]  # one at a time is what torchrun needs


@pytest.mark.parametrize("jobs", [0, 1.5, True], ids=["zero", "float", "bool"])
def test_jobs_joblib_cannot_use_are_refused(jobs):
    with pytest.raises(ConfigError, match="jobs="):
        run_jobs(_draws, [1, 2], jobs=jobs, desc="jobs")


@dataclass
class _ThreadSafeJobs(JobsConfig):
    thread_safe = True


@pytest.mark.parametrize(("values", "message"), [
    ({"jobs": 0}, r"jobs=0 is invalid: expected a non-zero integer \(1: one at a time, -1: one per core\)"),
    ({"backend": "spark"}, r"backend='spark' is invalid: expected one of 'loky', 'threading', 'dask', 'ray'"),
    ({"backend": "threading"}, r"backend='threading' is invalid: expected loky, dask or ray; this study's jobs set process-wide state"),
])
def test_jobs_config_refuses_bad_knobs_naming_them(values, message):
    with pytest.raises(ConfigError, match=message):
        JobsConfig.from_dict(values)


def test_jobs_config_hands_its_knobs_to_run_jobs():
    cfg = _ThreadSafeJobs.from_dict({"jobs": 2, "backend": "threading", "scheduler_address": ""})
    assert cfg.job_options() == {"jobs": 2, "backend": "threading", "address": ""}
    seeds = [3, 1, 2]
    assert run_jobs(_draws, seeds, **cfg.job_options(), desc="config") == [_draws(s) for s in seeds]
    assert list(JobsConfig().to_dict()) == ["jobs", "backend", "scheduler_address"]
