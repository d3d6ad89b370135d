"""The measuring core of every ``leanfit bench``: timing options, interleaved side-by-side timing, peak memory and
ratio columns. It knows no method; torch is imported inside the functions that need it.

Timing: :func:`time_side_by_side` runs every method once per round, the order rotated each round, so that drift of
a shared machine (other processes, clock boost, thermal state) hits every method alike and no method always runs
first or right after the same neighbour. ``torch.utils.benchmark.Timer`` is not used underneath: it times one
statement in blocks of calls, which cannot interleave methods call by call; instead each call is timed with
``time.perf_counter`` between two :func:`~leanfit.core.device.synchronize` calls (a no-op off CUDA), and torch's
threads are set once for the whole run (:func:`torch_threads`).

Peak memory (:func:`peak_memory`), one policy, in this order:

1. CUDA: ``torch.cuda.max_memory_allocated`` over what was allocated before the call (source
   ``"cuda max_memory_allocated"``);
2. CPU: the rise of the resident set's high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``) over the
   resident set before the call, after garbage collection and ``malloc_trim`` so that the call cannot silently
   reuse pages an earlier set-up freed (source ``"rss high-water mark"``);
3. CPU where the kernel refuses the reset: the process's lifetime maximum resident set (``ru_maxrss``) over the
   same baseline, an upper bound that is tight only in a fresh process
   (:func:`leanfit.core.memory.run_in_fresh_process`) whose set-up peaks below the call (source
   ``"rss lifetime maximum (upper bound)"``);
4. anything else (MPS, no ``/proc``): not measured, ``mb`` is None (source ``"not measured on <device>"``).

On the CPU a process's resident set also holds what earlier measurements freed to the allocator, so honest CPU
peaks come from a fresh process per measurement; the benches that need them run there.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, TypeVar

from leanfit.core.config import BaseConfig, option
from leanfit.core.memory import (
    lifetime_peak_rss_bytes,
    peak_rss_bytes,
    release_freed_memory,
    reset_peak_rss,
    rss_bytes,
)

__all__ = [
    "MAX_ROUNDS_PER_REPEAT",
    "PeakMemory",
    "TimingConfig",
    "add_ratios",
    "median_iqr",
    "peak_memory",
    "time_side_by_side",
    "torch_threads",
]

MAX_ROUNDS_PER_REPEAT = 20  # min_seconds never extends timing past 20 x repeats timed rounds
MB = 2**20
K = TypeVar("K")  # what names a method: a string, or a tuple such as (method, tenants)
_clock = time.perf_counter  # the timer's clock (a test replaces it with a fake one)


@dataclass
class TimingConfig(BaseConfig):
    """Options every benchmark config inherits. A bench keeps its own defaults (and help) by redeclaring a field;
    a bench that sweeps thread counts redeclares ``threads`` as a list and validates it itself."""

    warmup: int = option(1, help="untimed rounds first (one call per method each)")
    repeats: int = option(3, help="timed rounds at least (one call per method each); the median is reported")
    min_seconds: float = option(0.0, help=f"keep timing rounds until this much time is spent (at most "
                                          f"{MAX_ROUNDS_PER_REPEAT} x repeats)")
    threads: int = option(0, help="torch threads (0: auto, see leanfit.core.device.configure_threads)")

    def __post_init__(self) -> None:
        for name, low in (("warmup", 0), ("repeats", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"{name}={getattr(self, name)} is invalid: expected an integer >= {low}")
        if not (math.isfinite(self.min_seconds) and self.min_seconds >= 0):
            raise ValueError(f"min_seconds={self.min_seconds} is invalid: expected a finite number >= 0")
        if isinstance(self.threads, int) and self.threads < 0:
            raise ValueError(f"threads={self.threads} is invalid: expected 0 (auto) or a positive count")

    def timing(self) -> dict[str, Any]:
        """``repeats``, ``warmup`` and ``min_seconds`` as keyword arguments of :func:`time_side_by_side`."""
        return {"repeats": self.repeats, "warmup": self.warmup, "min_seconds": self.min_seconds}


# --- timing ---------------------------------------------------------------------------------------------------------
def time_side_by_side(
    calls: Mapping[K, Callable[[], Any]],
    *,
    repeats: int,
    warmup: int = 0,
    min_seconds: float = 0.0,
    device: Any = None,
    around: Callable[[K], AbstractContextManager[Any]] | None = None,
    on_call: Callable[[K, float | None, Any], None] | None = None,
) -> dict[K, list[float]]:
    """Seconds of every timed call of each callable, in call order.

    Round ``r`` calls every callable once, the order of ``calls`` rotated by ``r``. ``warmup`` untimed rounds come
    first, then timed rounds until ``repeats`` rounds are done and ``min_seconds`` of timed calls are spent (at most
    ``MAX_ROUNDS_PER_REPEAT * repeats`` rounds). On a CUDA ``device`` the queue is synchronised before and after
    each call, so queued kernels belong to the call. ``around(name)`` is entered for each call outside the timed
    region (hooks a method attaches and removes); ``on_call(name, seconds, result)`` sees each call's return value
    after it, ``seconds`` None for warm-up calls.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats={repeats}, warmup={warmup}: expected repeats >= 1 and warmup >= 0")
    names = list(calls)
    times: dict[K, list[float]] = {name: [] for name in names}
    sync = _synchronizer(device)
    rounds, spent = 0, 0.0
    while rounds < warmup + repeats or (spent < min_seconds and rounds < warmup + MAX_ROUNDS_PER_REPEAT * repeats):
        shift = rounds % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            with around(name) if around is not None else contextlib.nullcontext():
                sync()
                start = _clock()
                result = calls[name]()
                sync()
                seconds = _clock() - start
            timed = rounds >= warmup
            if timed:
                times[name].append(seconds)
                spent += seconds
            if on_call is not None:
                on_call(name, seconds if timed else None, result)
            del result  # the next method runs without this one's outputs held
        rounds += 1
    return times


def _synchronizer(device: Any) -> Callable[[], None]:
    if device is None or getattr(device, "type", str(device).split(":")[0]) != "cuda":
        return lambda: None
    import torch

    from leanfit.core.device import synchronize

    device = torch.device(device)
    return lambda: synchronize(device)


def median_iqr(seconds: Sequence[float]) -> tuple[float, float]:
    """Median and interquartile range (inclusive quartiles; 0 for a single value) of timed calls."""
    if not seconds:
        raise ValueError("seconds=[] is invalid: expected at least one timed call")
    if len(seconds) == 1:
        return seconds[0], 0.0
    q1, median, q3 = statistics.quantiles(seconds, n=4, method="inclusive")
    return median, q3 - q1


@contextlib.contextmanager
def torch_threads(threads: int, *, small_workload: bool) -> Iterator[int]:
    """Set torch's threads for a measurement (:func:`~leanfit.core.device.configure_threads`: 0 is auto), yield
    the number in force, and restore the previous number afterwards."""
    import torch

    from leanfit.core.device import configure_threads

    before = torch.get_num_threads()
    try:
        yield configure_threads(threads, small_workload=small_workload)
    finally:
        torch.set_num_threads(before)


# --- memory ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PeakMemory:
    """Peak extra memory of a call in MB (None where not measured) and how it was measured (module docstring)."""

    mb: float | None
    source: str


def peak_memory(fn: Callable[[], Any], device: Any = "cpu") -> tuple[PeakMemory, Any]:
    """Run ``fn()`` once and measure its peak memory above what was held before it; returns (peak, its result).
    The policy and its fallbacks are in the module docstring."""
    kind = getattr(device, "type", str(device).split(":")[0])
    if kind == "cuda":
        return _cuda_peak(fn, device)
    if kind != "cpu":
        return PeakMemory(None, f"not measured on {kind}"), fn()
    try:
        release_freed_memory()
        before = rss_bytes()
    except OSError:  # no /proc
        return PeakMemory(None, "not measured (no /proc)"), fn()
    if reset_peak_rss():
        result = fn()
        return PeakMemory(max(peak_rss_bytes() - before, 0) / MB, "rss high-water mark"), result
    result = fn()
    return PeakMemory(max(lifetime_peak_rss_bytes() - before, 0) / MB, "rss lifetime maximum (upper bound)"), result


def _cuda_peak(fn: Callable[[], Any], device: Any) -> tuple[PeakMemory, Any]:
    import torch

    device = torch.device(device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize(device)
    return PeakMemory((torch.cuda.max_memory_allocated(device) - before) / MB, "cuda max_memory_allocated"), result


# --- ratios ---------------------------------------------------------------------------------------------------------
def add_ratios(
    rows: list[dict[str, Any]],
    *,
    match: Sequence[str],
    baseline: Mapping[str, Any] | Callable[[dict[str, Any]], Mapping[str, Any] | None],
    columns: Mapping[str, str],
    invert: bool = False,
    floor: float | None = None,
    self_ratio: bool = True,
) -> None:
    """Add ratio columns to ``rows`` in place: for each row, its baseline row is the row whose ``match`` columns
    equal the row's, with the ``baseline`` columns set as given (e.g. ``{"method": "sft"}``; a function of the
    row may return None for "no baseline"). ``columns`` maps each new column to the measured column it divides:
    ``row / baseline``, or ``baseline / row`` with ``invert`` (speed-ups from times). A ratio is None where either
    value is None, the divisor is 0, or (``floor``) either value is below ``floor`` (e.g. memory below 1 MB, where
    the resident set is page-granular noise). Rows without a baseline row get no column; with ``self_ratio``
    False, neither do the baseline rows themselves.
    """
    indexes: dict[tuple[str, ...], dict[tuple[Any, ...], list[dict[str, Any]]]] = {}
    for row in rows:
        spec = baseline(row) if callable(baseline) else baseline
        if spec is None:
            continue
        cols = tuple(sorted({*match, *spec}))
        if cols not in indexes:
            indexes[cols] = {}
            for r in rows:
                indexes[cols].setdefault(tuple(r.get(c) for c in cols), []).append(r)
        found = indexes[cols].get(tuple(spec[c] if c in spec else row.get(c) for c in cols), [])
        if len(found) > 1:
            raise ValueError(f"baseline {dict(spec)} matches {len(found)} rows on {list(cols)}: add the columns "
                             "that tell them apart to match=")
        if not found or (found[0] is row and not self_ratio):
            continue
        ref = found[0]
        for new, measured in columns.items():
            num, den = (ref[measured], row[measured]) if invert else (row[measured], ref[measured])
            row[new] = _ratio(num, den, floor)


def _ratio(num: float | None, den: float | None, floor: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    if floor is not None and min(num, den) < floor:
        return None
    return num / den
