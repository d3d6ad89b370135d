"""The measuring core: interleaved timing on a fake clock (exact seconds per method, rotated rounds, the min_seconds
cap), ratio columns against hand-computed values, the peak-memory probe against known allocations and its fallback,
and the timing options every bench config inherits."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import pytest

from leanfit.core import bench
from leanfit.core.bench import (
    MAX_ROUNDS_PER_REPEAT,
    PeakMemory,
    TimingConfig,
    add_ratios,
    median_iqr,
    peak_memory,
    time_side_by_side,
    torch_threads,
)
from leanfit.core.config import option
from leanfit.core.errors import ConfigError


class FakeClock:
    """A clock that only moves when a call says how long it took."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def calls(self, cost: dict[str, float], log: list[str]) -> dict[str, object]:
        def make(name: str):
            def fn() -> str:
                log.append(name)
                self.now += cost[name]
                return f"{name}-result"

            return fn

        return {name: make(name) for name in cost}


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(bench, "_clock", fake)
    return fake


# --- timing -----------------------------------------------------------------------------------------------------------
def test_rounds_interleave_and_rotate_and_each_method_gets_its_own_seconds(clock):
    log: list[str] = []
    times = time_side_by_side(clock.calls({"a": 1.0, "b": 2.0, "c": 4.0}, log), repeats=3, warmup=1)
    # warm-up round 0, then timed rounds 1-3; round r starts at method r mod 3
    assert log == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert times == {"a": [1.0, 1.0, 1.0], "b": [2.0, 2.0, 2.0], "c": [4.0, 4.0, 4.0]}


def test_min_seconds_adds_rounds_until_spent(clock):
    log: list[str] = []
    times = time_side_by_side(clock.calls({"a": 1.0, "b": 1.5}, log), repeats=2, min_seconds=10.0)
    assert [len(t) for t in times.values()] == [4, 4]  # 2.5 s a round: 4 rounds reach 10 s


def test_min_seconds_is_capped(clock):
    times = time_side_by_side(clock.calls({"a": 0.0}, []), repeats=2, warmup=3, min_seconds=1.0)
    assert len(times["a"]) == MAX_ROUNDS_PER_REPEAT * 2


def test_around_is_outside_the_timer_and_on_call_sees_results(clock):
    entered: list[str] = []

    @contextlib.contextmanager
    def around(name: str):
        entered.append(name)
        clock.now += 100.0  # attaching hooks is not part of the call
        yield
        clock.now += 100.0

    seen: list[tuple[str, float | None, object]] = []
    times = time_side_by_side(clock.calls({"a": 1.0, "b": 3.0}, []), repeats=2, warmup=1, around=around,
                              on_call=lambda *args: seen.append(args))
    assert times == {"a": [1.0, 1.0], "b": [3.0, 3.0]}
    assert entered == ["a", "b", "b", "a", "a", "b"]
    assert seen == [("a", None, "a-result"), ("b", None, "b-result"), ("b", 3.0, "b-result"),
                    ("a", 1.0, "a-result"), ("a", 1.0, "a-result"), ("b", 3.0, "b-result")]


def test_real_clock_times_a_sleep():
    import time

    times = time_side_by_side({"sleep": lambda: time.sleep(0.01), "none": lambda: None}, repeats=2)
    assert min(times["sleep"]) >= 0.01 and all(t >= 0 for t in times["none"])


@pytest.mark.parametrize(("repeats", "warmup"), [(0, 0), (1, -1)], ids=["no-repeats", "negative-warmup"])
def test_bad_rounds_are_refused(repeats, warmup):
    with pytest.raises(ValueError, match=f"repeats={repeats}, warmup={warmup}"):
        time_side_by_side({"a": lambda: None}, repeats=repeats, warmup=warmup)


@pytest.mark.parametrize(("seconds", "expected"), [([2.0], (2.0, 0.0)), ([1.0, 2.0, 3.0, 4.0, 5.0], (3.0, 2.0)),
                                                   ([4.0, 1.0], (2.5, 1.5))], ids=["one", "five", "two"])
def test_median_iqr(seconds, expected):
    assert median_iqr(seconds) == pytest.approx(expected, rel=1e-15)


def test_torch_threads_restores_the_count():
    import torch

    before = torch.get_num_threads()
    with torch_threads(1, small_workload=False) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


# --- ratios -----------------------------------------------------------------------------------------------------------
def _rows() -> list[dict]:
    return [
        {"cell": 1, "method": "base", "k": None, "ms": 10.0, "mb": 100.0},
        {"cell": 1, "method": "fast", "k": 4, "ms": 2.5, "mb": 0.5},
        {"cell": 1, "method": "slow", "k": 4, "ms": 40.0, "mb": None},
        {"cell": 2, "method": "base", "k": None, "ms": 0.0, "mb": 8.0},
        {"cell": 2, "method": "fast", "k": 4, "ms": 3.0, "mb": 2.0},
        {"cell": 3, "method": "fast", "k": 4, "ms": 1.0, "mb": 1.0},  # no baseline in its cell
    ]


def test_ratios_row_over_baseline_of_the_same_cell():
    rows = _rows()
    add_ratios(rows, match=("cell",), baseline={"method": "base"}, columns={"ms_vs_base": "ms", "mb_vs_base": "mb"})
    assert [r.get("ms_vs_base", "absent") for r in rows] == [1.0, 0.25, 4.0, None, None, "absent"]  # 0 ms: None
    assert [r.get("mb_vs_base", "absent") for r in rows] == [1.0, 0.005, None, 1.0, 0.25, "absent"]
    assert list(rows[1]) == ["cell", "method", "k", "ms", "mb", "ms_vs_base", "mb_vs_base"]  # columns in order


def test_inverted_ratios_floor_and_no_self_ratio():
    rows = _rows()
    add_ratios(rows, match=("cell",), baseline={"method": "base"}, columns={"speedup": "ms"}, invert=True,
               self_ratio=False)
    assert [r.get("speedup", "absent") for r in rows] == ["absent", 4.0, 0.25, "absent", 0.0, "absent"]
    add_ratios(rows, match=("cell",), baseline={"method": "base"}, columns={"leaner": "mb"}, invert=True, floor=1.0)
    assert [r.get("leaner") for r in rows] == [1.0, None, None, 1.0, 4.0, None]  # 0.5 MB is below the floor


def test_baseline_overrides_matched_columns_and_may_depend_on_the_row():
    rows = _rows()
    # "fast" rows (k=4) find the "base" row (k=None) of their cell although k is matched
    add_ratios(rows, match=("cell", "k"), baseline=lambda r: {"method": "base", "k": None} if r["method"] == "fast"
               else None, columns={"r": "ms"})
    assert [r.get("r", "absent") for r in rows] == ["absent", 0.25, "absent", "absent", None, "absent"]


def test_ambiguous_baseline_is_an_error():
    rows = _rows()
    with pytest.raises(ValueError, match=r"baseline \{'method': 'base'\} matches 2 rows"):
        add_ratios(rows, match=(), baseline={"method": "base"}, columns={"r": "ms"})


# --- memory -----------------------------------------------------------------------------------------------------------
MB = 2**20


def _allocate(mb: int) -> np.ndarray:
    return np.ones(mb * MB // 8)  # written, so every page is resident


def test_peak_memory_sees_a_known_allocation():
    peak, out = peak_memory(lambda: _allocate(200).sum())
    assert out == 200 * MB // 8
    assert peak.source == "rss high-water mark"
    assert 190 <= peak.mb <= 260, peak  # the buffer, plus allocator and page-table slack


def test_peak_memory_of_a_freed_buffer_is_still_its_peak():
    peak, _ = peak_memory(lambda: _allocate(100).size)  # freed before the call returns
    assert 95 <= peak.mb <= 150, peak


def test_fallback_is_the_lifetime_maximum_an_upper_bound(monkeypatch):
    exact, _ = peak_memory(lambda: _allocate(120).sum())
    monkeypatch.setattr(bench, "reset_peak_rss", lambda: False)
    bound, out = peak_memory(lambda: _allocate(120).sum())
    assert out == 120 * MB // 8
    assert bound.source == "rss lifetime maximum (upper bound)"
    assert bound.mb >= 0.95 * 120 and bound.mb >= 0.9 * exact.mb, (exact, bound)


def test_devices_without_a_probe_run_the_call_and_say_so():
    assert peak_memory(lambda: 7, "mps") == (PeakMemory(None, "not measured on mps"), 7)


@pytest.mark.gpu
def test_cuda_peak_memory_sees_a_known_allocation():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    peak, _ = peak_memory(lambda: torch.ones(256 * MB // 4, device="cuda").sum().item(), torch.device("cuda"))
    assert peak.source == "cuda max_memory_allocated" and 256 <= peak.mb <= 257, peak


# --- options ----------------------------------------------------------------------------------------------------------
@dataclass
class _Bench(TimingConfig):
    repeats: int = option(7, help="a bench keeps its own default")
    size: int = option(3, help="something else")


def test_a_bench_config_inherits_the_options_and_keeps_its_defaults():
    cfg = _Bench.from_dict({"warmup": 2, "min_seconds": 0.5})
    assert (cfg.warmup, cfg.repeats, cfg.min_seconds, cfg.threads, cfg.size) == (2, 7, 0.5, 0, 3)
    assert cfg.timing() == {"repeats": 7, "warmup": 2, "min_seconds": 0.5}


@pytest.mark.parametrize(("key", "value", "fragment"), [("repeats", 0, "repeats=0"), ("warmup", -1, "warmup=-1"),
                                                        ("min_seconds", math.inf, "min_seconds=inf"),
                                                        ("threads", -2, "threads=-2")])
def test_bad_timing_options_are_config_errors(key, value, fragment):
    with pytest.raises(ConfigError, match=fragment):
        _Bench.from_dict({key: value})
