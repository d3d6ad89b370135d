"""The report of ``leanfit run iapt``: IAPT minus LoRA paired by seed, with its Student-t interval, from the
per-model records alone (so ``leanfit report`` produces it for committed runs)."""

from __future__ import annotations

import pytest
from scipy import stats as sps

from leanfit.studies.iapt.report import _paired_lora_table


def _row(task: str, method: str, setting: str, seed: int, acc: float) -> dict:
    return {"task": task, "method": method, "setting": setting, "seed": seed, "test_accuracy": acc}


def test_paired_difference_is_the_mean_of_per_seed_differences_with_its_t_interval():
    lora = [0.90, 0.92, 0.91]
    iapt = [0.88, 0.91, 0.87]
    rows = [_row("t", "lora", "main", s, a) for s, a in enumerate(lora)]
    rows += [_row("t", "iapt", "main", s, a) for s, a in enumerate(iapt)]
    rows += [_row("t", "prefix", "main", s, 0.5) for s in range(3)]        # other methods are not paired
    (entry,) = _paired_lora_table(rows)
    diffs = [100 * (a - b) for a, b in zip(iapt, lora, strict=True)]       # -2, -1, -4 points
    low, high = sps.t.interval(0.95, 2, loc=sum(diffs) / 3, scale=sps.sem(diffs))
    assert entry["IAPT - LoRA (points)"] == "-2.33"
    assert entry["95% t-interval"] == f"[{low:+.1f}, {high:+.1f}]"
    assert entry["seeds"] == 3


def test_ablations_are_paired_with_the_main_lora_and_unmatched_seeds_are_left_out():
    rows = [_row("t", "lora", "main", s, 0.9) for s in range(3)]
    rows += [_row("t", "iapt", "main", s, 0.9) for s in range(3)]
    rows += [_row("t", "iapt", "pool-mean", s, 0.8) for s in (0, 1)]      # seed 2 missing
    rows += [_row("t", "iapt", "tokens-1", 0, 0.8)]                         # one seed: no interval
    table = {e["setting"]: e for e in _paired_lora_table(rows)}
    assert set(table) == {"IAPT (self_attn, rational, 4 tokens)", "pool-mean"}
    assert table["pool-mean"]["IAPT - LoRA (points)"] == "-10.00" and table["pool-mean"]["seeds"] == 2


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_no_lora_no_table(method):
    rows = [_row("t", m, "main", s, 0.9) for m in ("iapt", method) for s in range(3)]
    assert _paired_lora_table(rows) == []
