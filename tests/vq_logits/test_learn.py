"""The map learned during training from scratch: the reassignment rule against a naive reference, recovery of a
planted token structure, the exact loss after a move, the state round trip and clear errors."""

from __future__ import annotations

import pytest
import torch

from leanfit.vq_logits import MapLearner, context_reassign
from leanfit.vq_logits.head import VQLogitsHead
from tests.errors import assert_user_error
from tests.reference import context_reassign_reference, vq_cross_entropy_reference
from tests.tolerances import assert_close


def _stats(g: torch.Generator, v: int = 12, d: int = 4):
    sums = torch.randn(v, d, generator=g, dtype=torch.float64) * 3
    counts = torch.randint(0, 20, (v,), generator=g).double()
    counts[:2] = 0
    sums[counts == 0] = 0
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return sums, counts, a @ a.t() / d


@pytest.mark.parametrize("shrinkage", [0.0, 2.0])
def test_context_reassign_equals_naive_reference(shrinkage):
    g = torch.Generator().manual_seed(0)
    sums, counts, cov = _stats(g)
    mapping = torch.arange(12) % 4
    mapping[counts == 0] = 3  # a code may have no observed token
    movable = torch.rand(12, generator=g) > 0.2
    new = context_reassign(sums, counts, mapping, cov, num_codes=5, shrinkage=shrinkage, ridge=1e-2, movable=movable)
    ref = context_reassign_reference(sums, counts, mapping, cov, 5, shrinkage, 1e-2, movable)
    assert torch.equal(new, ref)
    assert int((new == 4).sum()) == 1  # code 4 had no token: the worst-fitted token of a shared code refills it
    assert torch.equal(new[counts == 0], mapping[counts == 0]) and torch.equal(new[~movable], mapping[~movable])


def test_large_shrinkage_keeps_every_token():
    g = torch.Generator().manual_seed(1)
    sums, counts, cov = _stats(g)
    mapping = torch.arange(12) % 4
    assert torch.equal(context_reassign(sums, counts, mapping, cov, shrinkage=1e12), mapping)


def _planted(g: torch.Generator, n: int, groups: int = 4, per: int = 3, d: int = 8):
    """Hidden states drawn around one mean per group; each next token drawn from its group's tokens."""
    means = torch.randn(groups, d, generator=g) * 4
    group = torch.randint(0, groups, (n,), generator=g)
    hidden = means[group] + torch.randn(n, d, generator=g)
    labels = group * per + torch.randint(0, per, (n,), generator=g)
    return hidden, labels


def test_learner_recovers_a_planted_token_structure():
    """Tokens that follow the same contexts end in one code; a scrambled start is undone within a few moves."""
    g = torch.Generator().manual_seed(2)
    head = VQLogitsHead(8, torch.randperm(12, generator=g) % 4, 4)
    learner = MapLearner(head, every=1, shrinkage=1.0)
    for _ in range(4):
        learner.observe(*_planted(g, 2000))
    groups = [set(head.mapping[3 * k : 3 * k + 3].tolist()) for k in range(4)]
    assert all(len(s) == 1 for s in groups) and len(set.union(*groups)) == 4, head.mapping
    assert learner.moved[0] > 0 and learner.moved[-1] == 0 and learner.steps == 4


def test_loss_stays_exact_after_a_move():
    """A reassignment inside observe: the collapsed loss and its gradients equal the float64 materialised
    reference on the new map, and each moved token keeps its logit at the mean state."""
    g = torch.Generator().manual_seed(3)
    head = VQLogitsHead(8, torch.randperm(12, generator=g) % 4, 4, dtype=torch.float64)
    with torch.no_grad():
        head.codebook.copy_(torch.randn(4, 8, generator=g, dtype=torch.float64))
        head.bias.copy_(torch.randn(12, generator=g, dtype=torch.float64))
    hidden, labels = _planted(g, 500)
    hidden = hidden.double()
    old_map, old_logits = head.mapping.clone(), head.logits(hidden.mean(0, keepdim=True))
    head.loss(hidden, labels)  # the layout cache of the old map
    learner = MapLearner(head, every=1)
    assert learner.observe(hidden, labels) > 0 and not torch.equal(head.mapping, old_map)
    assert_close(head.logits(hidden.mean(0, keepdim=True)), old_logits)
    loss = head.loss(hidden, labels)
    ref = vq_cross_entropy_reference(hidden, head.codebook, head.mapping, labels, head.bias)
    assert_close(loss, ref)
    for got, want in zip(torch.autograd.grad(loss, [head.codebook, head.bias]),
                         torch.autograd.grad(ref, [head.codebook, head.bias]), strict=True):
        assert_close(got, want)


def test_frozen_tokens_and_ignored_labels():
    g = torch.Generator().manual_seed(4)
    movable = torch.ones(12, dtype=torch.bool)
    movable[:3] = False
    head = VQLogitsHead(8, torch.randperm(12, generator=g) % 4, 4)
    start = head.mapping.clone()
    learner = MapLearner(head, every=2, movable=movable)
    hidden, labels = _planted(g, 1000)
    assert learner.observe(hidden, labels) == 0  # not due yet
    labels[::2] = -100
    learner.observe(hidden.reshape(10, 100, 8), labels.reshape(10, 100))
    assert torch.equal(head.mapping[:3], start[:3]) and learner.moved[0] > 0


def test_state_round_trip_reassigns_identically():
    g = torch.Generator().manual_seed(5)
    batches = [_planted(g, 300) for _ in range(3)]
    start = torch.randperm(12, generator=g) % 4
    heads = [VQLogitsHead(8, start.clone(), 4) for _ in range(2)]
    for head in heads[1:]:
        head.load_state_dict(heads[0].state_dict())
    first, second = MapLearner(heads[0], every=3), MapLearner(heads[1], every=3)
    for b in batches[:2]:
        first.observe(*b)
    second.load_state_dict(first.state_dict())
    first.observe(*batches[2])
    second.observe(*batches[2])
    assert first.moved == second.moved and torch.equal(heads[0].mapping, heads[1].mapping)


@pytest.mark.parametrize(("error", "fragments", "call"), [
    (TypeError, "head=", lambda h: MapLearner(torch.nn.Linear(8, 12))),
    (ValueError, "every=0", lambda h: MapLearner(h, every=0)),
    (ValueError, "shrinkage=", lambda h: MapLearner(h, shrinkage=-1.0)),
    (ValueError, "movable=", lambda h: MapLearner(h, movable=torch.ones(5, dtype=torch.bool))),
    (ValueError, ("hidden=", "(..., 8)"), lambda h: MapLearner(h).observe(torch.zeros(3, 5), torch.zeros(3).long())),
    (ValueError, "labels=", lambda h: MapLearner(h).observe(torch.zeros(3, 8), torch.zeros(4).long())),
    (ValueError, ("labels=", "[0, 12)"), lambda h: MapLearner(h).observe(torch.zeros(3, 8), torch.full((3,), 12))),
    (TypeError, ("labels=", ".long()"), lambda h: MapLearner(h).observe(torch.zeros(3, 8), torch.zeros(3))),
    (ValueError, "covariance=", lambda h: context_reassign(torch.zeros(12, 8), torch.ones(12), h.mapping,
                                                          torch.eye(5))),
    (ValueError, "counts=", lambda h: context_reassign(torch.zeros(12, 8), -torch.ones(12), h.mapping, torch.eye(8))),
], ids=["head", "every", "shrinkage", "movable", "hidden", "labels-shape", "labels-range", "labels-dtype",
        "covariance", "counts"])
def test_bad_input_names_the_parameter(error, fragments, call):
    head = VQLogitsHead(8, torch.arange(12) % 4, 4)
    message = assert_user_error(error, fragments, lambda: call(head))
    assert "\n" not in message
