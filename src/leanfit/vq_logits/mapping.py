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

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["MAPPINGS", "build_mapping", "unigram_floor", "validate_mapping"]


def validate_mapping(mapping: Any, vocab_size: int, num_codes: int) -> torch.Tensor:
    """Check a map's type, length and range; returns it as int64."""
    if not isinstance(mapping, torch.Tensor) or mapping.dtype.is_floating_point or mapping.dim() != 1:
        raise TypeError(f"mapping={type(mapping).__name__} is invalid: expected a 1-D integer tensor of length V")
    if mapping.numel() != vocab_size:
        raise ValueError(f"mapping has {mapping.numel()} entries: expected one per token (V={vocab_size})")
    if mapping.numel() and mapping.device.type != "meta" and (int(mapping.min()) < 0 or int(mapping.max()) >= num_codes):
        raise ValueError(
            f"mapping values span [{int(mapping.min())}, {int(mapping.max())}]: expected codes in [0, {num_codes}); "
            "build it for this num_codes"
        )
    return mapping.long()


def random_mapping(vocab_size: int, num_codes: int, seed: int = 0, **_: Any) -> torch.Tensor:
    perm = torch.randperm(vocab_size, generator=torch.Generator().manual_seed(seed))
    out = torch.empty(vocab_size, dtype=torch.long)
    out[perm] = torch.arange(vocab_size) * num_codes // vocab_size
    return out


def contiguous_mapping(vocab_size: int, num_codes: int, **_: Any) -> torch.Tensor:
    return torch.arange(vocab_size) * num_codes // vocab_size


def equal_mass_mapping(counts: torch.Tensor, num_codes: int, **_: Any) -> torch.Tensor:
    """Frequency-sorted bins of (about) equal unigram mass; every code gets at least one token."""
    v = counts.numel()
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
    """Build and validate a map by name or callable."""
    if not 1 <= num_codes <= vocab_size:
        raise ValueError(f"num_codes={num_codes} is invalid: expected 1 <= num_codes <= V={vocab_size}")
    if isinstance(mapping, str):
        if mapping not in MAPPINGS:
            raise ValueError(f"mapping={mapping!r} is invalid: expected one of {', '.join(MAPPINGS)} or a callable")
        need = _NEEDS.get(mapping, "")
        if ("embeddings" in need and embeddings is None) or ("counts" in need and counts is None):
            raise ValueError(f"mapping={mapping!r} needs {need}; pass them (counts: token frequencies, shape (V,))")
        fn = MAPPINGS[mapping]
    else:
        fn = mapping
    out = fn(embeddings=embeddings, counts=counts, num_codes=num_codes, vocab_size=vocab_size, seed=seed)
    return validate_mapping(out, vocab_size, num_codes)


def unigram_floor(counts: torch.Tensor, mapping: torch.Tensor, num_codes: int) -> float:
    """Loss (nats/token) a bias-free VQ head pays above the unigram entropy: tokens of a cluster share one logit,
    so within a cluster it predicts uniformly; the floor is ``sum_v p_v log(p_v n_k / P_k)``, the mass-weighted KL
    of each cluster's unigram distribution from uniform. A per-token bias removes it (floor 0)."""
    p = counts.double() / counts.double().sum()
    n_k = torch.bincount(mapping, minlength=num_codes).double()
    mass_k = torch.zeros(num_codes, dtype=torch.float64).index_add(0, mapping, p)
    nz = p > 0
    return float((p[nz] * (p[nz] * n_k[mapping[nz]] / mass_k[mapping[nz]]).log()).sum())
