"""MapLearner under ``torchrun --nproc_per_node 2`` (gloo, CPU); run by ``test_distributed.py``.

Every process builds the same scrambled head and the same list of (hidden, labels) batches drawn around planted
token groups, observes its own shard (a contiguous slice, so the union in rank order is the whole list) for two
reassignments, and writes ``rank{r}.json`` into the folder given as argument: the map, the bias and the codebook
after each reassignment, and the tokens moved. The test imports the builders below for the one-process reference.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from leanfit.vq_logits import MapLearner
from leanfit.vq_logits.head import VQLogitsHead

VOCAB, CODES, HIDDEN, GROUPS, PER_PROCESS, ROUNDS = 24, 6, 8, 6, 3, 2


def head() -> VQLogitsHead:
    g = torch.Generator().manual_seed(0)
    out = VQLogitsHead(HIDDEN, torch.randperm(VOCAB, generator=g) % CODES, CODES, token_bias=True)
    with torch.no_grad():
        out.codebook.normal_(generator=g)
    return out


def batches(n_processes: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``PER_PROCESS * ROUNDS`` batches per process, in process order: hidden states around one mean per token
    group, next tokens from the group; process r sees mostly groups of its own half (so that a shard alone moves
    other tokens than the union does), and some labels are ignored (-100)."""
    g = torch.Generator().manual_seed(1)
    means = torch.randn(GROUPS, HIDDEN, generator=g) * 4
    per_group = VOCAB // GROUPS
    out = []
    for shard in range(n_processes):
        for _ in range(PER_PROCESS * ROUNDS):
            own = torch.randint(0, GROUPS // n_processes, (40,), generator=g) + shard * GROUPS // n_processes
            other = torch.randint(0, GROUPS, (8,), generator=g)
            group = torch.cat([own, other])
            hidden = means[group] + torch.randn(len(group), HIDDEN, generator=g)
            labels = group * per_group + torch.randint(0, per_group, (len(group),), generator=g)
            labels[::7] = -100
            out.append((hidden, labels))
    return out


def snapshot(h: VQLogitsHead) -> dict[str, list]:
    return {"mapping": h.mapping.tolist(), "bias": h.bias.detach().tolist(), "codebook": h.codebook.detach().tolist()}


def main(out: Path) -> None:
    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    h = head()
    learner = MapLearner(h, every=PER_PROCESS, shrinkage=1.0)
    shard = batches(world)[rank * PER_PROCESS * ROUNDS:(rank + 1) * PER_PROCESS * ROUNDS]
    rounds = []
    for hidden, labels in shard:
        learner.observe(hidden, labels)
        if learner.steps % learner.every == 0:
            rounds.append(snapshot(h))
    record = {"rank": rank, "world_size": world, "rounds": rounds, "moved": learner.moved}
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
