"""The job runner of the studies: :func:`run_jobs` runs independent jobs (models to train, fits to make) one at a
time or ``jobs`` at once through joblib, on a backend of :func:`joblib_backend`: ``loky`` (processes on this
machine), ``threading``, ``dask`` (a ``dask.distributed`` cluster) or ``ray``.

A study's config inherits the knobs from :class:`JobsConfig`: ``jobs`` (1: one at a time in this process; -1: one
per core, joblib's convention), ``backend`` and ``scheduler_address``, with one validation; the runner refuses
``jobs != 1`` of such a config under ``torchrun`` (a data-parallel launch already splits every batch over
processes) before anything is written, with the same line for every study."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar, get_args

from leanfit.core.config import BaseConfig, option
from leanfit.core.errors import ConfigError, LeanfitError, bad_value

__all__ = ["BACKENDS", "Backend", "JobsConfig", "check_jobs", "joblib_backend", "run_jobs"]

Backend = Literal["loky", "threading", "dask", "ray"]
BACKENDS: tuple[str, ...] = get_args(Backend)
_JOBS = "a non-zero integer (1: one at a time, -1: one per core)"  # what jobs may be
T = TypeVar("T")
R = TypeVar("R")


@contextlib.contextmanager
def joblib_backend(name: str, address: str = "") -> Iterator[None]:
    """joblib's ``parallel_config`` for ``name``; dask and ray start (or join, given ``address``) their cluster."""
    from joblib import parallel_config

    if name not in BACKENDS:
        raise ConfigError(bad_value("backend", name, f"one of {', '.join(BACKENDS)}"))
    if name in ("loky", "threading"):
        with parallel_config(backend=name):
            yield
        return
    if name == "dask":
        try:
            from dask.distributed import Client
        except ImportError as exc:
            raise LeanfitError("backend='dask' needs dask.distributed: pip install 'dask[distributed]'") from exc
        client = Client(address) if address else Client(processes=True, dashboard_address=None)
        with client, parallel_config(backend="dask", wait_for_workers_timeout=60):
            yield
        return
    try:
        import ray
        from ray.util.joblib import register_ray
    except ImportError as exc:
        raise LeanfitError("backend='ray' needs ray: pip install 'ray[default]'") from exc
    register_ray()
    ray.init(address=address or None, ignore_reinit_error=True)
    try:
        with parallel_config(backend="ray"):
            yield
    finally:
        ray.shutdown()


def check_jobs(jobs: int) -> None:
    """Refuse ``jobs`` that joblib cannot use (0, not an integer) and ``jobs != 1`` under ``torchrun``."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs == 0:
        raise ConfigError(bad_value("jobs", jobs, _JOBS))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if jobs != 1 and world > 1:
        raise ConfigError(bad_value("jobs", jobs, f"1 under torchrun (WORLD_SIZE={world})", "a data-parallel launch "
                                    "already splits every batch over processes; set jobs=1"))


@dataclass
class JobsConfig(BaseConfig):
    """The job-runner knobs of a study's config (inherit it; its fields come first): how many independent jobs run
    at once and where. A study with another default redeclares ``jobs``; one whose jobs are safe in threads of one
    process (they set no process-wide state: torch's global generator, its thread count) sets ``thread_safe``."""

    thread_safe: ClassVar[bool] = False

    jobs: int = option(1, help="independent jobs at once (joblib workers; 1: one at a time in this process, -1: one "
                       "per core, -2: all cores but one); jobs at once share the machine, so keep 1 where their "
                       "times are compared")
    backend: Backend = option("loky", help="joblib backend when jobs != 1: loky (processes on this machine), dask, "
                              "ray, or threading where the study's jobs are thread-safe")
    scheduler_address: str = option("", help="backend dask or ray: the scheduler or cluster address to join "
                                    "(empty: start a local one)")

    def __post_init__(self) -> None:
        if self.jobs == 0:
            raise ConfigError(bad_value("jobs", self.jobs, _JOBS))
        if self.backend == "threading" and not self.thread_safe:
            raise ConfigError(bad_value("backend", self.backend, "loky, dask or ray", "this study's jobs set "
                                        "process-wide state (torch's global generator) that threads would share"))

    def workers(self) -> int:
        """How many jobs run at once on this machine (``jobs`` < 0 resolved as joblib does: -1 every core)."""
        if self.jobs == 1:
            return 1
        from joblib import effective_n_jobs

        return int(effective_n_jobs(self.jobs))

    def job_options(self) -> dict[str, Any]:
        """``jobs``, ``backend`` and ``address`` as keyword arguments of :func:`run_jobs`."""
        return {"jobs": self.jobs, "backend": self.backend, "address": self.scheduler_address}


def _indexed(fn: Callable[[Any], Any], index: int, item: Any) -> tuple[int, Any]:
    """``(index, fn(item))`` in a worker (module level, so that it pickles)."""
    return index, fn(item)


def run_jobs(
    fn: Callable[[T], R],
    items: Sequence[T],
    *,
    jobs: int,
    backend: str = "loky",
    address: str = "",
    desc: str,
    serial_fn: Callable[[T], R] | None = None,
    postfix: Callable[[R], dict[str, float | str]] | None = None,
    on_result: Callable[[R], None] | None = None,
    completed: int = 0,
) -> list[R]:
    """``[fn(item) for item in items]``, ``jobs`` at a time through joblib when ``jobs != 1`` and there are two or
    more items; the results come back in the order of ``items`` whatever order the workers finish in.

    fn: runs in the workers, so it must pickle (a module-level function or a ``functools.partial`` of one) and
    should show no progress bar of its own: the runner shows one bar, ``desc``, for all items, with the fields
    ``postfix(result)``. serial_fn: run instead of ``fn`` when the items run one at a time in this process, e.g.
    ``fn`` with its own progress bar (the runner then shows none). on_result: called in this process on each result
    as soon as it is there (e.g. to append it to a log that a resumed run reads). completed: items finished
    before (a resumed run), counted in the bar. Raises :class:`~leanfit.core.errors.ConfigError` for invalid
    ``jobs`` and for ``jobs != 1`` under ``torchrun``."""
    from leanfit.core.progress import progress_bar

    check_jobs(jobs)
    out: list[Any] = [None] * len(items)
    if jobs == 1 or len(items) <= 1:
        with progress_bar(len(items) + completed, desc, enabled=serial_fn is None, completed=completed) as bar:
            for i, item in enumerate(items):
                out[i] = (serial_fn or fn)(item)
                _finished(out[i], bar, postfix, on_result)
        return out
    from joblib import Parallel, delayed

    n_jobs = min(jobs, len(items)) if jobs > 0 else jobs
    with progress_bar(len(items) + completed, desc, completed=completed) as bar, joblib_backend(backend, address):
        parallel = Parallel(n_jobs=n_jobs, return_as="generator_unordered")
        for i, result in parallel(delayed(_indexed)(fn, i, item) for i, item in enumerate(items)):
            out[i] = result
            _finished(result, bar, postfix, on_result)
    return out


def _finished(result: Any, bar: Any, postfix: Callable[[Any], dict] | None, on_result: Callable | None) -> None:
    if on_result is not None:
        on_result(result)
    bar.advance(1, **(postfix(result) if postfix else {}))
