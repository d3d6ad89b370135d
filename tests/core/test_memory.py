"""The process memory readings under :func:`leanfit.core.bench.peak_memory`: the resident set, its resettable
high-water mark and lifetime maximum against a known allocation, and a measurement in a fresh process."""

from __future__ import annotations

import os

import numpy as np
import pytest

from leanfit.core.memory import (
    lifetime_peak_rss_bytes,
    peak_rss_bytes,
    release_freed_memory,
    reset_peak_rss,
    rss_bytes,
    run_in_fresh_process,
)

MB = 2**20
pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")


def _allocate(mb: int) -> np.ndarray:
    return np.ones(mb * MB // 8)


def test_resident_set_holds_a_live_buffer():
    release_freed_memory()
    before = rss_bytes()
    buf = _allocate(150)
    assert 145 <= (rss_bytes() - before) / MB <= 170
    del buf


def test_high_water_mark_resets_and_sees_a_freed_buffer():
    if not reset_peak_rss():
        pytest.skip("the kernel does not allow resetting VmHWM")
    release_freed_memory()
    before = rss_bytes()
    assert reset_peak_rss()
    assert abs(peak_rss_bytes() - before) / MB < 5  # the mark starts again at the current resident set
    _allocate(150).sum()  # freed at once
    assert 145 <= (peak_rss_bytes() - before) / MB <= 170
    assert lifetime_peak_rss_bytes() >= peak_rss_bytes() - 2 * MB  # never reset, so at least the new mark


def _peak_in_child(mb: int) -> tuple[float, str, int]:
    from leanfit.core.bench import peak_memory

    peak, _ = peak_memory(lambda: _allocate(mb).sum())
    return peak.mb, peak.source, os.getpid()


@pytest.mark.integration
def test_fresh_process_measures_its_own_peak():
    # a buffer of this process stays resident; the child's peak is its own 120 MB
    held = _allocate(200)
    mb, source, pid = run_in_fresh_process(_peak_in_child, 120)
    assert pid != os.getpid() and source == "rss high-water mark"
    assert 115 <= mb <= 170, mb
    del held
