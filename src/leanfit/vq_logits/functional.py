"""Exact collapsed computations for a VQ-Logits output head, never materialising N x V logits.

The head scores token ``v`` as ``l_v = z_{M(v)} + b_v`` with ``z = h C^T`` (codebook ``C``: K x d, map ``M``: V -> K,
optional per-token bias ``b``). With ``B_k = logsumexp_{v in k} b_v`` (``log n_k`` without bias, ``-inf`` for an
empty cluster):

- ``logsumexp_v l_v = logsumexp_k (z_k + B_k)``, so the full-softmax loss is a K-way computation plus lookups:
  ``-log p(y) = logsumexp_k(z_k + B_k) - z_{M(y)} - b_y``;
- ``p(v) = softmax(z + B)_{M(v)} * exp(b_v - B_{M(v)})``: sampling draws a cluster, then a token of that cluster
  from a fixed table (:class:`ClusterTables`);
- greedy decoding is ``argmax_k (z_k + max_{v in k} b_v)``, then that cluster's best token.

All functions use plain differentiable torch ops (no custom autograd), so gradients are exact by construction;
the tests compare every quantity with the materialised head in float64. ``materialized_logits`` exists only for
parity checks and as the paper's gather form (``mode="gather"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

__all__ = [
    "ClusterTables",
    "cluster_log_normalizers",
    "collapsed_argmax",
    "collapsed_cross_entropy",
    "collapsed_log_prob",
    "collapsed_logsumexp",
    "collapsed_sample",
    "cluster_layout",
    "dense_sample",
    "materialized_logits",
    "residual_cross_entropy",
    "residual_log_probs",
]

Reduction = Literal["mean", "sum", "none"]


def code_logits(hidden: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """``z = hidden @ codebook.T`` upcast to at least float32: (N, K)."""
    z = hidden @ codebook.t()
    return z if z.dtype in (torch.float32, torch.float64) else z.float()


def _segment_logsumexp(values: torch.Tensor, segment: torch.Tensor, n: int) -> torch.Tensor:
    """logsumexp of ``values`` within each of ``n`` segments (-inf for empty ones); the max is a detached shift."""
    shift = torch.full((n,), -math.inf, dtype=values.dtype, device=values.device)
    shift = shift.scatter_reduce(0, segment, values.detach(), reduce="amax", include_self=True)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    sums = torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, segment, (values - shift[segment]).exp())
    return sums.log() + shift


def cluster_log_normalizers(mapping: torch.Tensor, num_codes: int, bias: torch.Tensor | None = None,
                            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``B_k = logsumexp_{v: M(v)=k} b_v`` (``log n_k`` without bias; ``-inf`` for empty clusters): (K,).

    Differentiable in ``bias`` (the per-cluster max is a detached shift)."""
    if bias is None:
        counts = torch.bincount(mapping, minlength=num_codes).to(dtype)
        return counts.log()  # log 0 = -inf for empty clusters
    return _segment_logsumexp(bias.to(torch.promote_types(bias.dtype, dtype)), mapping, num_codes)


def collapsed_logsumexp(z: torch.Tensor, log_norm: torch.Tensor) -> torch.Tensor:
    """``logsumexp_v l_v`` per row from code logits ``z`` (N, K) and ``B`` (K,): (N,)."""
    return torch.logsumexp(z + log_norm.to(z.dtype), dim=-1)


def collapsed_cross_entropy(
    hidden: torch.Tensor,
    codebook: torch.Tensor,
    mapping: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Cross-entropy over the full vocabulary of the VQ head, in O(N K + V).

    hidden: (N, d); codebook: (K, d); mapping: (V,) int64 in [0, K); labels: (N,) in [0, V) or ``ignore_index``;
    bias: (V,) or None. ``reduction="mean"`` averages over non-ignored labels (as ``F.cross_entropy``)."""
    z = code_logits(hidden, codebook)
    log_norm = cluster_log_normalizers(mapping, codebook.shape[0], bias, dtype=z.dtype)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    nll = collapsed_logsumexp(z, log_norm) - z.gather(1, mapping[safe].unsqueeze(1)).squeeze(1)
    if bias is not None:
        nll = nll - bias[safe].to(nll.dtype)
    nll = torch.where(valid, nll, torch.zeros_like(nll))
    if reduction == "none":
        return nll
    if reduction == "sum":
        return nll.sum()
    return nll.sum() / valid.sum()  # 0/0 = nan when every label is ignored, as F.cross_entropy


def collapsed_log_prob(hidden: torch.Tensor, codebook: torch.Tensor, mapping: torch.Tensor, tokens: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """``log p(tokens[i] | hidden[i])``: (N,)."""
    return -collapsed_cross_entropy(hidden, codebook, mapping, tokens, bias, ignore_index=-(2**62), reduction="none")


def materialized_logits(hidden: torch.Tensor, codebook: torch.Tensor, mapping: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """The (N, V) logits by gathering code logits (the paper's form); for parity checks and fallbacks only."""
    logits = code_logits(hidden, codebook)[:, mapping]
    return logits if bias is None else logits + bias.to(logits.dtype)


@dataclass(frozen=True)
class ClusterTables:
    """Per-cluster decoding tables, built once per (mapping, bias) in O(V log V).

    Tokens are laid out cluster by cluster (``offsets``), by descending bias within a cluster (``order``,
    ``sorted_bias``). ``keys`` lets one ``searchsorted`` count, for any cluster and threshold, how many of its
    tokens have bias >= threshold: ``keys[j] = cluster(j) * R + rank(-sorted_bias[j])`` with ``uniq`` the sorted
    distinct values of ``-sorted_bias``; integers, so the counts are exact.
    """

    num_codes: int
    order: torch.Tensor  # (V,) token ids, grouped by cluster, bias descending
    offsets: torch.Tensor  # (K + 1,)
    sorted_bias: torch.Tensor  # (V,) float64
    bias_max: torch.Tensor  # (K,) float64, -inf for empty clusters
    keys: torch.Tensor  # (V,) int64
    uniq: torch.Tensor  # (U,) float64 ascending
    segment: torch.Tensor  # (V,) cluster of each position
    _prefix_mass: dict[float, torch.Tensor] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(cls, mapping: torch.Tensor, num_codes: int, bias: torch.Tensor | None = None) -> ClusterTables:
        b = (bias.detach() if bias is not None else torch.zeros(mapping.numel(), device=mapping.device)).double()
        # sort by cluster, then bias descending: lexicographic via two stable sorts
        by_bias = torch.argsort(-b, stable=True)
        order = by_bias[torch.argsort(mapping[by_bias], stable=True)]
        segment = mapping[order]
        counts = torch.bincount(mapping, minlength=num_codes)
        offsets = torch.zeros(num_codes + 1, dtype=torch.long, device=mapping.device)
        offsets[1:] = counts.cumsum(0)
        sorted_bias = b[order]
        bias_max = torch.full((num_codes,), -math.inf, dtype=torch.float64, device=b.device)
        nonempty = counts > 0
        bias_max[nonempty] = sorted_bias[offsets[:-1][nonempty]]
        uniq, rank = torch.unique(-sorted_bias, sorted=True, return_inverse=True)
        keys = segment * (uniq.numel() + 1) + rank
        return cls(num_codes, order, offsets, sorted_bias, bias_max, keys, uniq, segment)

    def count_at_least(self, thresholds: torch.Tensor) -> torch.Tensor:
        """For thresholds (N, K): number of tokens of cluster k with bias >= thresholds[i, k]: (N, K) int64."""
        # bias >= x  <=>  -bias <= -x  <=>  rank(-bias) < #(uniq <= -x)
        q = torch.searchsorted(self.uniq, (-thresholds).contiguous(), right=True)
        cluster = torch.arange(self.num_codes, device=q.device)
        ends = torch.searchsorted(self.keys, cluster * (self.uniq.numel() + 1) + q, right=False)
        return ends - self.offsets[:-1]

    def prefix_mass(self, temperature: float) -> torch.Tensor:
        """Prefix sums of ``exp((b - max_k b) / T)`` in layout order with a leading 0: (V + 1,) float64. The kept
        prefix of cluster k holding ``c`` tokens has mass ``pm[offsets[k] + c] - pm[offsets[k]]`` (each cluster's
        best token contributes exactly 1, so cluster masses never underflow). Cached per temperature: O(V) once,
        not per decoded token."""
        if temperature in self._prefix_mass:
            return self._prefix_mass[temperature]
        shifted = ((self.sorted_bias - self.bias_max[self.segment]) / temperature).exp()
        pm = torch.zeros(shifted.numel() + 1, dtype=torch.float64, device=shifted.device)
        pm[1:] = shifted.cumsum(0)
        if len(self._prefix_mass) >= 8:  # a few temperatures per model in practice; bound the memory anyway
            self._prefix_mass.pop(next(iter(self._prefix_mass)))
        self._prefix_mass[temperature] = pm
        return pm


def collapsed_argmax(hidden: torch.Tensor, codebook: torch.Tensor, tables: ClusterTables) -> torch.Tensor:
    """Greedy token per row, ``argmax_v l_v``, in O(N K): (N,)."""
    z = code_logits(hidden, codebook).double()
    k = (z + tables.bias_max).argmax(dim=-1)
    return tables.order[tables.offsets[k]]


def _top_k_thresholds(z: torch.Tensor, tables: ClusterTables, top_k: int) -> torch.Tensor:
    """Per-cluster bias thresholds (N, K) keeping every token whose logit is >= the k-th largest logit.

    The top-k tokens lie in the top-k clusters by best-token logit and among each one's top-k biases, so k*k
    candidates give the k-th value ``z_c + b`` exactly; it is kept in bias space (``b`` for its own cluster, so the
    boundary token is never lost to rounding)."""
    kc = min(top_k, tables.num_codes)
    top_clusters = (z + tables.bias_max).topk(kc, dim=-1).indices  # (N, kc)
    pos = tables.offsets[top_clusters].unsqueeze(-1) + torch.arange(top_k, device=z.device)  # (N, kc, k)
    inside = pos < tables.offsets[top_clusters + 1].unsqueeze(-1)
    cand_bias = torch.where(inside, tables.sorted_bias[pos.clamp(max=tables.sorted_bias.numel() - 1)], -math.inf)
    cand = (z.gather(1, top_clusters).unsqueeze(-1) + cand_bias).flatten(1)
    idx = cand.topk(min(top_k, cand.shape[1]), dim=-1).indices[:, -1]  # the k-th largest candidate
    c_star = top_clusters.gather(1, (idx // top_k).unsqueeze(1)).squeeze(1)
    b_star = cand_bias.flatten(1).gather(1, idx.unsqueeze(1)).squeeze(1)
    thresholds = b_star.unsqueeze(1) + (z.gather(1, c_star.unsqueeze(1)) - z)
    return thresholds.scatter(1, c_star.unsqueeze(1), b_star.unsqueeze(1))


def collapsed_sample(
    hidden: torch.Tensor,
    codebook: torch.Tensor,
    tables: ClusterTables,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample one token per row from ``softmax(l / T)`` restricted as Hugging Face's top-k (keep every token whose
    logit is >= the k-th largest) and then top-p (smallest set of most likely tokens with mass >= p) warpers do.

    Cost per row is O(K log V) (O(K d) for the code logits), independent of V up to the logarithm: a cluster is
    drawn from the truncated cluster masses, then a token by inverse CDF within that cluster's kept prefix."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} is invalid: expected > 0; use argmax() for greedy decoding")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} is invalid: expected a probability in (0, 1]")
    z = code_logits(hidden, codebook).double()  # (N, K)
    counts, log_w = kept_clusters(z, tables, temperature=temperature, top_k=top_k, top_p=top_p)
    pm, starts = tables.prefix_mass(temperature), tables.offsets[:-1]
    cluster = torch.multinomial(torch.softmax(log_w, dim=-1), 1, generator=generator).squeeze(1)
    # inverse CDF within the kept prefix of the drawn cluster
    start = starts[cluster]
    n_kept = counts.gather(1, cluster.unsqueeze(1)).squeeze(1)
    u = torch.rand(z.shape[0], generator=generator, dtype=torch.float64, device=z.device)
    target = pm[start] + u * (pm[start + n_kept] - pm[start])
    pos = torch.searchsorted(pm, target, right=True) - 1  # pm[pos] <= target < pm[pos + 1]
    pos = torch.minimum(torch.maximum(pos, start), start + n_kept - 1)
    return tables.order[pos]


def kept_clusters(z: torch.Tensor, tables: ClusterTables, *, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """What top-k then top-p keep, cluster by cluster, from code logits ``z`` (N, K) float64: ``counts`` (N, K), the
    kept tokens of cluster k being its first ``counts[:, k]`` in ``tables.order`` (bias descending), and their
    log masses ``log_w`` (N, K) under ``softmax(l / T)`` up to a per-row constant."""
    thresholds = torch.full_like(z, -math.inf)
    if top_k is not None and top_k > 0:
        thresholds = _top_k_thresholds(z, tables, top_k)
    pm, starts = tables.prefix_mass(temperature), tables.offsets[:-1]
    best = (z + tables.bias_max) / temperature

    def kept(bias_thresholds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        counts = tables.count_at_least(bias_thresholds)
        within = pm[starts + counts] - pm[starts]
        return counts, torch.where(counts > 0, best + within.clamp_min(1e-300).log(), -math.inf)

    counts, log_w = kept(thresholds)
    if top_p is None or top_p >= 1.0:
        return counts, log_w
    # Raise each row's logit cutoff c (keep l_v >= c) to the largest value whose kept set still holds mass >= top_p
    # of what top-k left, by bisection; every step is an exact count. [lo, hi) brackets the cutoff: the set at lo
    # is enough, the set at hi is not. It stops once one token (or one tie of equal logits) separates them.
    nonempty = tables.offsets[1:] > starts
    bias_min = torch.where(nonempty, tables.sorted_bias[(tables.offsets[1:] - 1).clamp_min(0)], math.inf)
    lowest = torch.where(nonempty, z + bias_min, math.inf).min(dim=-1).values
    total = torch.logsumexp(log_w, dim=-1)
    lo, hi = lowest - 1.0, (z + tables.bias_max).max(dim=-1).values  # lo keeps all top-k left; hi only the best
    log_p = math.log(top_p)
    c_hi, lw_hi = kept(torch.maximum(thresholds, hi.unsqueeze(1) - z))
    n_lo, n_hi = counts.sum(-1), c_hi.sum(-1)
    best_enough = torch.logsumexp(lw_hi, dim=-1) - total >= log_p  # the best token(s) alone hold mass >= top_p
    lo, n_lo = torch.where(best_enough, hi, lo), torch.where(best_enough, n_hi, n_lo)
    for _ in range(200):
        active = (n_lo - n_hi > 1) & ((hi - lo) > 1e-13 * hi.abs().clamp_min(1.0))
        if not bool(active.any()):
            break
        mid = (lo + hi) / 2
        c_mid, lw = kept(torch.maximum(thresholds, mid.unsqueeze(1) - z))
        enough = (torch.logsumexp(lw, dim=-1) - total >= log_p) & active
        short = ~enough & active
        n_mid = c_mid.sum(-1)
        lo, n_lo = torch.where(enough, mid, lo), torch.where(enough, n_mid, n_lo)
        hi, n_hi = torch.where(short, mid, hi), torch.where(short, n_mid, n_hi)
    return kept(torch.maximum(thresholds, lo.unsqueeze(1) - z))


# --- within-cluster low-rank residual --------------------------------------------------------------------------
# An exact class-based factorisation that lets tokens of one cluster differ by context:
#   p(v | h) = softmax_k(z_k + B_k)[M(v)] * softmax_{v' in M(v)}(b_v' + u_v' . P h)[v],
# with P (r x d) and U (V x r). With U = 0 it is the plain head. The loss needs the target cluster's members
# only, so a token costs O(K d + r d + n_k r) where n_k is the size of its target cluster.


def cluster_layout(mapping: torch.Tensor, num_codes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, offsets): token ids grouped by cluster (V,), and cluster start positions (K + 1,)."""
    order = torch.argsort(mapping, stable=True)
    offsets = torch.zeros(num_codes + 1, dtype=torch.long, device=mapping.device)
    offsets[1:] = torch.bincount(mapping, minlength=num_codes).cumsum(0)
    return order, offsets


def residual_cross_entropy(
    hidden: torch.Tensor,
    codebook: torch.Tensor,
    mapping: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    proj: torch.Tensor,
    emb: torch.Tensor,
    *,
    layout: tuple[torch.Tensor, torch.Tensor] | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Cross-entropy of the factorised head with a rank-r within-cluster term (see above); proj: (r, d),
    emb: (V, r). Cost O(N K d + sum_i n_{k_i} r); never builds N x V."""
    z = code_logits(hidden, codebook)
    k_total = codebook.shape[0]
    log_norm = cluster_log_normalizers(mapping, k_total, bias, dtype=z.dtype)
    order, offsets = layout or cluster_layout(mapping, k_total)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    k = mapping[safe]
    cluster_term = z.gather(1, k[:, None]).squeeze(1) + log_norm[k] - collapsed_logsumexp(z, log_norm)
    ph = hidden.to(z.dtype) @ proj.to(z.dtype).t()  # (N, r)
    b = torch.zeros(mapping.numel(), dtype=z.dtype, device=z.device) if bias is None else bias.to(z.dtype)
    # all (position, member of its target cluster) pairs, flattened
    sizes = torch.where(valid, offsets[k + 1] - offsets[k], torch.zeros_like(k))
    pos = torch.repeat_interleave(torch.arange(labels.numel(), device=labels.device), sizes)
    local = torch.arange(pos.numel(), device=labels.device) - torch.repeat_interleave(sizes.cumsum(0) - sizes, sizes)
    member = order[offsets[k][pos] + local]
    scores = b[member] + (emb[member].to(z.dtype) * ph[pos]).sum(-1)
    within_norm = _segment_logsumexp(scores, pos, labels.numel())
    own = b[safe] + (emb[safe].to(z.dtype) * ph).sum(-1)
    nll = -(cluster_term + own - within_norm)
    nll = torch.where(valid, nll, torch.zeros_like(nll))
    if reduction == "none":
        return nll
    return nll.sum() if reduction == "sum" else nll.sum() / valid.sum()


def residual_log_probs(hidden: torch.Tensor, codebook: torch.Tensor, mapping: torch.Tensor,
                       bias: torch.Tensor | None, proj: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """Full (N, V) log-probabilities of the factorised head: O(N V r); for decoding and parity checks."""
    z = code_logits(hidden, codebook)
    k_total = codebook.shape[0]
    log_norm = cluster_log_normalizers(mapping, k_total, bias, dtype=z.dtype)
    b = torch.zeros(mapping.numel(), dtype=z.dtype, device=z.device) if bias is None else bias.to(z.dtype)
    scores = b + (hidden.to(z.dtype) @ proj.to(z.dtype).t()) @ emb.to(z.dtype).t()  # (N, V)
    shift = torch.full((z.shape[0], k_total), -math.inf, dtype=z.dtype, device=z.device)
    idx = mapping.expand_as(scores)
    shift = shift.scatter_reduce(1, idx, scores.detach(), reduce="amax", include_self=True)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    sums = torch.zeros_like(shift).scatter_add(1, idx, (scores - shift.gather(1, idx)).exp())
    within = scores - (sums.log() + shift).gather(1, idx)
    cluster = z + log_norm - collapsed_logsumexp(z, log_norm)[:, None]
    return cluster[:, mapping] + within


def dense_sample(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample from (N, V) logits with the same rules as :func:`collapsed_sample` (ties at a cutoff kept whole);
    the O(V) path used by heads whose distribution does not factor per cluster at T != 1."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} is invalid: expected > 0; use argmax() for greedy decoding")
    scores = logits.double() / temperature
    if top_k is not None and top_k > 0:
        kth = scores.topk(min(top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if top_p is not None and top_p < 1.0:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p={top_p} is invalid: expected a probability in (0, 1]")
        sorted_scores, _ = scores.sort(dim=-1, descending=True)
        cum = torch.softmax(sorted_scores, dim=-1).cumsum(-1)
        first = (cum < top_p).sum(-1, keepdim=True).clamp(max=scores.shape[-1] - 1)
        scores = scores.masked_fill(scores < sorted_scores.gather(1, first), -math.inf)
    return torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator).squeeze(1)
