"""Token -> code maps and the unigram floor."""

from __future__ import annotations

import math

import pytest
import torch

from leanfit.vq_logits.mapping import build_mapping, unigram_floor, validate_mapping

COUNTS = torch.tensor([1000.0, 500, 300, 10, 5, 5, 3, 2, 1, 1, 0, 0])


@pytest.mark.parametrize("k", [1, 3, 5, 12])
def test_equal_mass_uses_every_code_and_follows_frequency(k):
    m = build_mapping("equal_mass", vocab_size=12, num_codes=k, counts=COUNTS)
    assert torch.bincount(m, minlength=k).min() >= 1
    order = torch.argsort(COUNTS, descending=True, stable=True)
    assert torch.all(m[order][1:] >= m[order][:-1])  # frequent tokens get the low (own) codes


def test_equal_mass_gives_frequent_tokens_their_own_code():
    m = build_mapping("equal_mass", vocab_size=12, num_codes=5, counts=COUNTS)
    assert m.tolist() == [0, 1, 2, 3, 4, 4, 4, 4, 4, 4, 4, 4]


@pytest.mark.parametrize("name", ["random", "contiguous"])
def test_balanced_maps(name):
    m = build_mapping(name, vocab_size=103, num_codes=10)
    sizes = torch.bincount(m, minlength=10)
    assert sizes.sum() == 103 and sizes.max() - sizes.min() <= 1


def test_kmeans_recovers_separated_groups():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 20
    truth = torch.arange(200) % 4
    emb = centers[truth] + torch.randn(200, 16, generator=g) * 0.1
    m = build_mapping("kmeans", vocab_size=200, num_codes=4, embeddings=emb)
    # same partition up to relabelling: each true group maps to exactly one code, all codes distinct
    pairs = {(int(t), int(c)) for t, c in zip(truth, m, strict=True)}
    assert len(pairs) == 4 and len({c for _, c in pairs}) == 4


def test_hybrid_splits_codes_over_frequency_bands():
    g = torch.Generator().manual_seed(0)
    counts = torch.rand(400, generator=g) ** 4 * 1000
    m = build_mapping("hybrid", vocab_size=400, num_codes=16, embeddings=torch.randn(400, 8, generator=g),
                      counts=counts)
    band = build_mapping("equal_mass", vocab_size=400, num_codes=4, counts=counts)
    for b in range(4):  # band b owns codes [4b, 4b + 4)
        assert set(m[band == b].tolist()) <= set(range(4 * b, 4 * b + 4))


def test_callable_mapping_is_validated():
    m = build_mapping(lambda num_codes, vocab_size, **_: torch.arange(vocab_size) % num_codes, vocab_size=9,
                      num_codes=3)
    assert m.tolist() == [0, 1, 2] * 3
    with pytest.raises(ValueError, match=r"mapping values span \[0, 8\]: expected codes in \[0, 3\)"):
        build_mapping(lambda vocab_size, **_: torch.arange(vocab_size), vocab_size=9, num_codes=3)


@pytest.mark.parametrize(
    ("mapping", "error", "fragment"),
    [
        (torch.zeros(5, dtype=torch.long), ValueError, "mapping has 5 entries: expected one per token (V=6)"),
        (torch.tensor([0, 1, 2, 3, 4, -1]), ValueError, "mapping values span [-1, 4]"),
        (torch.zeros(6), TypeError, "expected a 1-D integer tensor"),
        ([0, 1, 2, 0, 1, 2], TypeError, "mapping=list"),
    ],
    ids=["wrong-length", "out-of-range", "float", "list"],
)
def test_validate_mapping_errors(mapping, error, fragment):
    with pytest.raises(error) as err:
        validate_mapping(mapping, vocab_size=6, num_codes=5)
    assert fragment in str(err.value)


@pytest.mark.parametrize(("k", "fragment"), [(0, "num_codes=0"), (13, "num_codes=13")], ids=["zero", "above-V"])
def test_num_codes_range(k, fragment):
    with pytest.raises(ValueError, match=fragment):
        build_mapping("contiguous", vocab_size=12, num_codes=k)


def test_missing_inputs_are_named():
    with pytest.raises(ValueError, match="needs counts"):
        build_mapping("equal_mass", vocab_size=12, num_codes=3)
    with pytest.raises(ValueError, match="mapping='spectral' is invalid"):
        build_mapping("spectral", vocab_size=12, num_codes=3)


def test_unigram_floor_hand_computed():
    counts = torch.tensor([3.0, 1.0, 4.0])  # cluster 0 = {0, 1}, cluster 1 = {2}
    m = torch.tensor([0, 0, 1])
    # within cluster 0: p = (3/4, 1/4) against uniform 1/2: KL = 3/4 log(3/2) + 1/4 log(1/2); mass 4/8
    expected = 0.5 * (0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    assert unigram_floor(counts, m, 2) == pytest.approx(expected, rel=1e-12)
    assert unigram_floor(counts, torch.arange(3), 3) == 0.0
