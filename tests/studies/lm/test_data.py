"""Deterministic LM batches: a pure function of (seed, step), and process slices that tile the global batch."""

from __future__ import annotations

import pytest
import torch

from leanfit.core.errors import ConfigError
from leanfit.studies.lm.data import eval_windows, train_batch

TOKENS = torch.arange(10_000)


def test_batch_depends_only_on_seed_and_step():
    a = train_batch(TOKENS, 7, 8, 16, seed=1)
    assert torch.equal(a, train_batch(TOKENS, 7, 8, 16, seed=1))
    assert not torch.equal(a, train_batch(TOKENS, 8, 8, 16, seed=1))
    assert not torch.equal(a, train_batch(TOKENS, 7, 8, 16, seed=2))
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(8, 16, dtype=torch.long))  # contiguous windows


@pytest.mark.parametrize("world", [2, 4], ids=["2-procs", "4-procs"])
def test_process_slices_tile_the_global_batch(world):
    full = train_batch(TOKENS, 3, 8, 16, seed=0)
    parts = [train_batch(TOKENS, 3, 8, 16, seed=0, rank=r, world=world) for r in range(world)]
    assert torch.equal(torch.cat(parts), full)


def test_batch_size_must_divide_across_processes():
    with pytest.raises(ConfigError, match=r"batch_size=6.*multiple of the number of processes \(4\)"):
        train_batch(TOKENS, 0, 6, 16, seed=0, rank=0, world=4)


def test_eval_windows_are_contiguous_and_non_overlapping():
    w = eval_windows(torch.arange(100), seq_len=10, max_tokens=40)
    assert w.shape == (4, 11)
    assert torch.equal(w[:, 0], torch.tensor([0, 10, 20, 30]))
    assert torch.equal(w[1], torch.arange(10, 21))
