"""Token -> code maps for a VQ-Logits head and the unigram floor they impose.

A map is a (V,) int64 tensor with values in [0, K). Builders:

- ``kmeans``: k-means of the output embeddings (the paper's recipe; scikit-learn ``MiniBatchKMeans``);
- ``random``: a random balanced assignment;
- ``contiguous``: blocks of consecutive token ids;
- ``equal_mass``: tokens sorted by frequency, cut into K bins of equal unigram mass (frequent tokens get their
  own codes, the long tail shares);
- ``hybrid``: k-means within equal-mass frequency bands (codes split evenly over bands);
- any callable ``f(embeddings=..., counts=..., num_codes=..., seed=...) -> (V,) tensor``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from leanfit.core.errors import bad_value
from leanfit.vq_logits.functional import _check_int, _is_integer_dtype, _mapping_range_message, _shown

__all__ = ["MAPPINGS", "build_mapping", "unigram_floor", "validate_mapping"]


def validate_mapping(mapping: Any, vocab_size: int, num_codes: int) -> torch.Tensor:
    """Check a map's type, length and range; returns it as int64."""
    vocab_size = _check_int("vocab_size", vocab_size, 1, "a positive integer (the number of tokens V)")
    num_codes = _check_int("num_codes", num_codes, 1, "an integer >= 1 (the number of codes K)")
    if not isinstance(mapping, torch.Tensor) or not _is_integer_dtype(mapping.dtype) or mapping.dim() != 1:
        shown = _shown(mapping) if isinstance(mapping, torch.Tensor) else type(mapping).__name__
        raise TypeError(f"mapping={shown} is invalid: expected a 1-D integer tensor of length V; "
                        "cast it with .long() or build it with build_mapping(...)")
    if mapping.numel() != vocab_size:
        raise ValueError(f"mapping has {mapping.numel()} entries: expected one per token (V={vocab_size}); "
                         "build it for this vocabulary")
    if mapping.device.type != "meta" and bool(((mapping < 0) | (mapping >= num_codes)).any()):
        raise ValueError(_mapping_range_message(mapping, num_codes))
    return mapping.long()


def _check_counts(counts: Any, vocab_size: int) -> torch.Tensor:
    """Token frequencies: a real tensor (V,), finite and >= 0 (one host sync)."""
    expected = f"finite, non-negative token frequencies of shape (V,) = ({vocab_size},)"
    fix = "count tokens with torch.bincount(token_ids, minlength=V)"
    if not isinstance(counts, torch.Tensor) or counts.dtype == torch.bool or counts.is_complex():
        raise TypeError(bad_value("counts", _shown(counts), expected, fix))
    if counts.dim() != 1 or counts.shape[0] != vocab_size:
        raise ValueError(bad_value("counts", _shown(counts), expected, fix))
    bad = counts < 0
    if counts.is_floating_point():
        bad = bad | ~torch.isfinite(counts)
    if counts.device.type != "meta" and bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        v = float(counts[i])
        found = "NaN" if math.isnan(v) else repr(v)
        raise ValueError(bad_value("counts", _shown(counts), expected, f"found {found} at index {i}; {fix}"))
    return counts


def random_mapping(vocab_size: int, num_codes: int, seed: int = 0, **_: Any) -> torch.Tensor:
    perm = torch.randperm(vocab_size, generator=torch.Generator().manual_seed(seed))
    out = torch.empty(vocab_size, dtype=torch.long)
    out[perm] = torch.arange(vocab_size) * num_codes // vocab_size
    return out


def contiguous_mapping(vocab_size: int, num_codes: int, **_: Any) -> torch.Tensor:
    return torch.arange(vocab_size) * num_codes // vocab_size


def equal_mass_mapping(counts: torch.Tensor, num_codes: int, **_: Any) -> torch.Tensor:
    """Frequency-sorted bins of (about) equal unigram mass; every code gets at least one token."""
    v = _check_counts(counts, counts.numel() if isinstance(counts, torch.Tensor) else 0).numel()
    _check_int("num_codes", num_codes, 1, f"1 <= num_codes <= V={v}")
    if num_codes > v:
        raise ValueError(bad_value("num_codes", num_codes, f"1 <= num_codes <= V={v}"))
    p = (counts.double() + 1e-9) / (counts.double() + 1e-9).sum()
    order = torch.argsort(p, descending=True, stable=True)
    raw = ((torch.cumsum(p[order], 0) - p[order]) * num_codes).floor().long().tolist()
    bins: list[int] = []
    prev = 0
    for j, r in enumerate(raw):  # never skip a code, always leave enough tokens for the codes still empty
        cur = 0 if j == 0 else min(max(r, prev), prev + 1)
        prev = min(max(cur, num_codes - v + j), num_codes - 1)
        bins.append(prev)
    out = torch.empty(v, dtype=torch.long)
    out[order] = torch.tensor(bins, dtype=torch.long)
    return out


def kmeans_mapping(embeddings: torch.Tensor, num_codes: int, seed: int = 0, **_: Any) -> torch.Tensor:
    from sklearn.cluster import MiniBatchKMeans

    x = embeddings.detach().float().cpu().numpy()
    km = MiniBatchKMeans(n_clusters=num_codes, random_state=seed, n_init=1, batch_size=max(1024, 4 * num_codes),
                         max_iter=50)
    return torch.as_tensor(km.fit_predict(x), dtype=torch.long)


def hybrid_mapping(embeddings: torch.Tensor, counts: torch.Tensor, num_codes: int, seed: int = 0,
                   bands: int = 4, **_: Any) -> torch.Tensor:
    """k-means within ``bands`` equal-mass frequency bands, ``num_codes / bands`` codes each."""
    bands = max(1, min(bands, num_codes))
    band = equal_mass_mapping(counts, bands)
    out = torch.empty(counts.numel(), dtype=torch.long)
    first = 0
    for b in range(bands):
        members = (band == b).nonzero().squeeze(1)
        k_b = num_codes // bands + (1 if b < num_codes % bands else 0)
        k_b = min(k_b, members.numel())
        local = kmeans_mapping(embeddings[members], k_b, seed=seed + b) if k_b > 1 else torch.zeros_like(members)
        out[members] = first + local
        first += k_b
    return out


MAPPINGS: dict[str, Callable[..., torch.Tensor]] = {
    "kmeans": kmeans_mapping,
    "random": random_mapping,
    "contiguous": contiguous_mapping,
    "equal_mass": equal_mass_mapping,
    "hybrid": hybrid_mapping,
}
_NEEDS = {"kmeans": "embeddings", "equal_mass": "counts", "hybrid": "embeddings and counts"}


def build_mapping(
    mapping: str | Callable[..., torch.Tensor],
    *,
    vocab_size: int,
    num_codes: int,
    embeddings: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Build and validate a map by name or callable. embeddings: (V, d) floating point; counts: (V,) finite, >= 0."""
    vocab_size = _check_int("vocab_size", vocab_size, 1, "a positive integer (the number of tokens V)")
    num_codes = _check_int("num_codes", num_codes, 1, f"1 <= num_codes <= V={vocab_size}")
    if num_codes > vocab_size:
        raise ValueError(f"num_codes={num_codes} is invalid: expected 1 <= num_codes <= V={vocab_size}")
    seed = _check_int("seed", seed, -(2**63), "an integer")
    if isinstance(mapping, str):
        if mapping not in MAPPINGS:
            raise ValueError(f"mapping={mapping!r} is invalid: expected one of {', '.join(MAPPINGS)} or a callable")
        need = _NEEDS.get(mapping, "")
        if ("embeddings" in need and embeddings is None) or ("counts" in need and counts is None):
            raise ValueError(f"mapping={mapping!r} needs {need}; pass them (counts: token frequencies, shape (V,))")
        fn = MAPPINGS[mapping]
    elif callable(mapping):
        fn = mapping
    else:
        raise TypeError(bad_value("mapping", _shown(mapping), f"one of {', '.join(map(repr, MAPPINGS))} or a "
                                  "callable", "a ready map tensor goes to validate_mapping(...)"))
    if embeddings is not None:
        _check_embeddings(embeddings, vocab_size)
    if counts is not None:
        _check_counts(counts, vocab_size)
    out = fn(embeddings=embeddings, counts=counts, num_codes=num_codes, vocab_size=vocab_size, seed=seed)
    return validate_mapping(out, vocab_size, num_codes)


def _check_embeddings(embeddings: Any, vocab_size: int) -> None:
    expected = f"a floating-point tensor of shape (V, d) = ({vocab_size}, d), one row per token"
    if not isinstance(embeddings, torch.Tensor) or not embeddings.is_floating_point():
        raise TypeError(bad_value("embeddings", _shown(embeddings), expected, "cast it with .float()"))
    if embeddings.dim() != 2 or embeddings.shape[0] != vocab_size:
        raise ValueError(bad_value("embeddings", _shown(embeddings), expected,
                                   "pass the output layer's weight (V x d)"))


def unigram_floor(counts: torch.Tensor, mapping: torch.Tensor, num_codes: int) -> float:
    """Loss (nats/token) a bias-free VQ head pays above the unigram entropy: tokens of a cluster share one logit,
    so within a cluster it predicts uniformly; the floor is ``sum_v p_v log(p_v n_k / P_k)``, the mass-weighted KL
    of each cluster's unigram distribution from uniform. A per-token bias removes it (floor 0)."""
    mapping = validate_mapping(mapping, mapping.numel() if isinstance(mapping, torch.Tensor) else 0, num_codes)
    _check_counts(counts, mapping.numel())
    if counts.device.type != "meta" and not float(counts.double().sum()) > 0:
        raise ValueError(bad_value("counts", _shown(counts), "token frequencies with a positive total",
                                   "count tokens of a non-empty text"))
    p = counts.double() / counts.double().sum()
    n_k = torch.bincount(mapping, minlength=num_codes).double()
    mass_k = torch.zeros(num_codes, dtype=torch.float64).index_add(0, mapping, p)
    nz = p > 0
    return float((p[nz] * (p[nz] * n_k[mapping[nz]] / mass_k[mapping[nz]]).log()).sum())
