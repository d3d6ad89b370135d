"""MapLearner under ``torchrun --nproc_per_node 2`` (gloo, CPU): both processes end every reassignment with the same
map, bias and codebook (a data-parallel model stays one model), equal to one process that observes the union of
the shards. The processes run ``_dist_learn.py``; the reference is computed here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from leanfit.vq_logits import MapLearner
from tests.vq_logits import _dist_learn as script

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.integration]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("dist-map-learner")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LEANFIT_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(script.__file__)), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def _one_process(shards: list[list]) -> tuple[list[dict], list[int]]:
    """One learner that observes, at each step, the batches of both shards (the union), reassigning as often."""
    h = script.head()
    learner = MapLearner(h, every=script.PER_PROCESS, shrinkage=1.0)
    rounds = []
    for step in zip(*shards, strict=True):
        hidden = torch.cat([b[0] for b in step])
        labels = torch.cat([b[1] for b in step])
        learner.observe(hidden, labels)
        if learner.steps % learner.every == 0:
            rounds.append(script.snapshot(h))
    return rounds, learner.moved


def _alone(shard: list) -> list[int]:
    h = script.head()
    learner = MapLearner(h, every=script.PER_PROCESS, shrinkage=1.0)
    for hidden, labels in shard:
        learner.observe(hidden, labels)
    return h.mapping.tolist()


def test_processes_reassign_like_one_process_on_the_union(ranks):
    n = script.PER_PROCESS * script.ROUNDS
    data = script.batches(2)
    shards = [data[:n], data[n:]]
    assert _alone(shards[0]) != _alone(shards[1])  # a shard alone moves other tokens: the data test the reduction
    union, moved = _one_process(shards)
    assert len(union) == script.ROUNDS and sum(moved) > 0
    for record in ranks:
        assert record["world_size"] == 2 and record["moved"] == moved
        for got, want in zip(record["rounds"], union, strict=True):
            assert got["mapping"] == want["mapping"], record["rank"]
            torch.testing.assert_close(torch.tensor(got["bias"]), torch.tensor(want["bias"]), rtol=1e-5, atol=1e-5)
            assert got["codebook"] == want["codebook"]  # reassign moves tokens, never code vectors


def test_processes_hold_one_model_after_every_reassignment(ranks):
    for a, b in zip(ranks[0]["rounds"], ranks[1]["rounds"], strict=True):
        assert a == b
