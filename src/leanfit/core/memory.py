"""Process memory readings for the benchmarks (Linux ``/proc``): the resident set, its high-water mark
(``VmHWM``, resettable through ``/proc/self/clear_refs``), the lifetime maximum, releasing freed heap pages, and
running a measurement in a fresh process so that its peak is its own. The measuring policy built on these readings
is :func:`leanfit.core.bench.peak_memory`."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

__all__ = [
    "lifetime_peak_rss_bytes",
    "peak_rss_bytes",
    "release_freed_memory",
    "reset_peak_rss",
    "rss_bytes",
    "run_in_fresh_process",
]


def rss_bytes() -> int:
    """The current resident set of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset the high-water mark to the current resident set; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The resident-set high-water mark (``VmHWM``) since the process started or the last :func:`reset_peak_rss`."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("VmHWM not found in /proc/self/status")


def lifetime_peak_rss_bytes() -> int:
    """The largest resident set since the process started (``ru_maxrss``; the reset of :func:`reset_peak_rss`
    does not touch it)."""
    import resource
    import sys

    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux kilobytes
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def release_freed_memory() -> None:
    """Collect garbage and give freed heap pages back to the system (glibc ``malloc_trim``), so that a measured
    call raises the resident set instead of silently reusing pages an earlier set-up freed."""
    import contextlib
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def run_in_fresh_process(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in a freshly spawned interpreter (``fn`` must be importable at module level)."""
    import concurrent.futures
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(fn, *args, **kwargs).result()
