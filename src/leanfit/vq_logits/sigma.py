"""Token -> code maps measured in the metric of the hidden states: a code ``c_k`` standing in for token ``v`` makes
the logit error ``(w_v - c_k) . h``, whose mean square over hidden states is ``(w_v - c_k)^T Sigma (w_v - c_k)``
with ``Sigma = E[h h^T]`` (the second moment of the final hidden states).

- :func:`hidden_moments`: mean (d,) and ``Sigma`` (d, d) of hidden states, in float64;
- :func:`sigma_roots`: ``Sigma^{1/2}`` and ``Sigma^{-1/2}`` with a ridge (``Sigma + ridge * tr(Sigma)/d * I``);
- :func:`sigma_kmeans`: weighted k-means of the rows of ``W Sigma^{1/2}`` (Euclidean there is the Sigma metric
  above), centroids mapped back by ``Sigma^{-1/2}``;
- :func:`reassign_mapping`: each movable token to the code with the least expected squared logit error under
  ``Sigma``, given the current codebook (the assignment step of that k-means, run on a trained codebook).
"""

from __future__ import annotations

from typing import Any

import torch

from leanfit.core.errors import bad_value
from leanfit.vq_logits.functional import _check_int, _check_tensor, _shown
from leanfit.vq_logits.mapping import validate_mapping

__all__ = ["hidden_moments", "reassign_mapping", "sigma_kmeans", "sigma_roots"]

_CHUNK = 4096  # rows per distance block: bounds the (rows x K) distance matrix


def hidden_moments(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (d,), second moment ``E[h h^T]`` (d, d)) of hidden states (N, d), float64, accumulated by blocks."""
    _check_tensor("hidden", hidden, dims=2, kind="float", shape="(N, d)")
    if hidden.shape[0] < 1:
        raise ValueError(bad_value("hidden", _shown(hidden), "at least one hidden state (N >= 1)"))
    d = hidden.shape[1]
    total = torch.zeros(d, dtype=torch.float64, device=hidden.device)
    second = torch.zeros(d, d, dtype=torch.float64, device=hidden.device)
    for block in hidden.split(_CHUNK):
        x = block.double()
        total += x.sum(0)
        second += x.t() @ x
    n = hidden.shape[0]
    return total / n, second / n


def _check_second_moment(second_moment: Any, d: int) -> None:
    expected = f"a symmetric positive semi-definite float tensor of shape (d, d) = ({d}, {d})"
    fix = "estimate it with hidden_moments(hidden)[1]"
    _check_tensor("second_moment", second_moment, dims=2, kind="float", shape=f"(d, d) = ({d}, {d})")
    if tuple(second_moment.shape) != (d, d) or not bool(torch.isfinite(second_moment).all()):
        raise ValueError(bad_value("second_moment", _shown(second_moment), expected, fix))


def _check_ridge(ridge: Any) -> float:
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not 0 <= float(ridge) < float("inf"):
        raise ValueError(bad_value("ridge", _shown(ridge), "a finite number >= 0 (relative to tr(Sigma)/d)",
                                   "1e-3 keeps Sigma^{-1/2} bounded when hidden states span fewer than d directions"))
    return float(ridge)


def sigma_roots(second_moment: torch.Tensor, ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """(``S^{1/2}``, ``S^{-1/2}``) of ``S = Sigma + ridge * tr(Sigma)/d * I``, float64 (d, d), symmetric.

    The ridge is relative to the mean eigenvalue, so it means the same for any scale of hidden states; it bounds
    ``S^{-1/2}`` where the states span fewer than d directions (few or degenerate states). Both roots use the same
    ``S``, so mapping a centroid there and back is exact."""
    d = second_moment.shape[-1] if isinstance(second_moment, torch.Tensor) and second_moment.dim() == 2 else 0
    _check_second_moment(second_moment, max(d, 1))
    ridge = _check_ridge(ridge)
    s = second_moment.double()
    s = (s + s.t()) / 2
    eigvals, vecs = torch.linalg.eigh(s)
    eigvals = eigvals.clamp_min(0) + ridge * float(eigvals.clamp_min(0).mean())
    if not bool((eigvals > 0).all()):
        raise ValueError(bad_value("second_moment", _shown(second_moment), "a matrix with a positive trace or "
                                   "ridge > 0", "hidden states that are all zero carry no signal; pass ridge > 0"))
    return (vecs * eigvals.sqrt()) @ vecs.t(), (vecs * eigvals.rsqrt()) @ vecs.t()


def _nearest(x: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Index of the nearest row of ``centers`` (K, d) for each row of ``x`` (N, d), Euclidean, by blocks: (N,).
    Ties go to the lowest index (argmin's rule), as in the naive reference."""
    c_sq = (centers * centers).sum(-1)
    out = [((c_sq - 2 * (block @ centers.t())) + (block * block).sum(-1, keepdim=True)).argmin(-1)
           for block in x.split(_CHUNK)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=x.device)


def _weighted_means(x: torch.Tensor, weights: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_v w_v x_v / sum_v w_v per label (k, d), the weight of each label (k,))."""
    mass = torch.zeros(k, dtype=x.dtype, device=x.device).index_add(0, labels, weights)
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add(0, labels, x * weights[:, None])
    return sums / mass.clamp_min(torch.finfo(x.dtype).tiny)[:, None], mass


def kmeans_init(weights: torch.Tensor, num_codes: int, seed: int = 0) -> torch.Tensor:
    """Starting rows of :func:`sigma_kmeans`: ``num_codes`` distinct rows drawn with probability proportional to
    ``weights`` (V,), without replacement: (num_codes,) int64. k-means++ would need K sequential passes over V."""
    g = torch.Generator().manual_seed(seed)
    return torch.multinomial(weights.double().cpu(), num_codes, replacement=False, generator=g).to(weights.device)


def _check_weights(weights: Any, vocab_size: int) -> torch.Tensor:
    expected = f"None or finite positive weights of shape (V,) = ({vocab_size},)"
    if weights is None:
        return torch.ones(vocab_size, dtype=torch.float64)
    _check_tensor("weights", weights, dims=1, kind="float", shape=f"(V,) = ({vocab_size},)")
    if weights.shape[0] != vocab_size or not bool((torch.isfinite(weights) & (weights > 0)).all()):
        raise ValueError(bad_value("weights", _shown(weights), expected,
                                   "smooth token frequencies with a positive prior so unseen tokens weigh > 0"))
    return weights.double()


def sigma_kmeans(weight: torch.Tensor, second_moment: torch.Tensor, num_codes: int, *,
                 weights: torch.Tensor | None = None, ridge: float = 1e-3, iters: int = 10, seed: int = 0,
                 init: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted k-means of the rows of ``weight Sigma^{1/2}``: (mapping (V,) int64, codebook (K, d)).

    weight: (V, d) output-layer rows; second_moment: (d, d); weights: (V,) positive (token frequencies: the mean
    excess KL of a logit error grows with the token's probability), default 1. Lloyd's iterations from
    :func:`kmeans_init` rows (or the rows ``init`` (K,)), at most ``iters``, stopping when no token moves; a
    code left empty restarts at the token with the largest weighted error. The codebook is the weighted mean
    in the Sigma metric mapped back by ``Sigma^{-1/2}``. Computed in float64 for float64 input, else float32."""
    _check_tensor("weight", weight, dims=2, kind="float", shape="(V, d)")
    vocab_size, d = weight.shape
    num_codes = _check_int("num_codes", num_codes, 1, f"1 <= num_codes <= V={vocab_size}")
    if num_codes > vocab_size:
        raise ValueError(bad_value("num_codes", num_codes, f"1 <= num_codes <= V={vocab_size}"))
    iters = _check_int("iters", iters, 0, "an integer >= 0 (Lloyd iterations)")
    w = _check_weights(weights, vocab_size).to(weight.device)
    _check_second_moment(second_moment, d)
    root, inv_root = sigma_roots(second_moment.to(weight.device), ridge)
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    x = (weight.double() @ root).to(dtype)
    start = kmeans_init(w, num_codes, seed) if init is None else validate_mapping(init, num_codes, vocab_size)
    centers, w = x[start].clone(), w.to(dtype)
    labels = _nearest(x, centers)
    for _ in range(iters):
        centers, mass = _weighted_means(x, w, labels, num_codes)
        empty = (mass == 0).nonzero().squeeze(1)
        if empty.numel():  # restart each empty code at the worst-served token
            err = w * ((x - centers[labels]) ** 2).sum(-1)
            centers[empty] = x[err.topk(empty.numel()).indices]
        new = _nearest(x, centers)
        if torch.equal(new, labels) and not empty.numel():
            break
        labels = new
    centers, _ = _weighted_means(x, w, labels, num_codes)
    return labels, (centers.double() @ inv_root).to(weight.dtype)


def reassign_mapping(vectors: torch.Tensor, codebook: torch.Tensor, second_moment: torch.Tensor,
                     mapping: torch.Tensor, *, movable: torch.Tensor | None = None,
                     targets: torch.Tensor | None = None) -> torch.Tensor:
    """Each movable token to ``argmin_k (x_v - c_k)^T Sigma (x_v - c_k)`` over the target codes: new map (V,).

    vectors: (V, d) the tokens' output vectors (the original head's rows ``w_v`` when compressing; without one,
    the head's own ``VQLogitsHead.token_vectors()``); codebook: (K, d); second_moment: ``Sigma`` (d, d);
    mapping: (V,) the current map; movable: (V,) bool, the tokens that may move (default all); targets: (K,)
    bool, the codes they may move to (default all). Other tokens keep their code. A code may end with no token
    (then it carries no probability: ``B_k = -inf``); the next reassignment can fill it again."""
    _check_tensor("vectors", vectors, dims=2, kind="float", shape="(V, d)")
    vocab_size, d = vectors.shape
    _check_tensor("codebook", codebook, dims=2, kind="float", shape=f"(K, d) = (K, {d})")
    if codebook.shape[1] != d:
        raise ValueError(bad_value("codebook", _shown(codebook), f"shape (K, d) = (K, {d}) to match vectors"))
    k = codebook.shape[0]
    _check_second_moment(second_moment, d)
    mapping = validate_mapping(mapping, vocab_size, k)
    movable = _check_mask("movable", movable, vocab_size, "V", mapping.device)
    targets = _check_mask("targets", targets, k, "K", mapping.device)
    if not bool(targets.any()) and bool(movable.any()):
        raise ValueError(bad_value("targets", _shown(targets), "a mask with at least one code", "pass targets=None"))
    dtype = torch.float64 if vectors.dtype == torch.float64 else torch.float32
    sigma, c = second_moment.to(vectors.device, dtype), codebook.detach().to(dtype)
    cost_c = ((c @ sigma) * c).sum(-1).masked_fill(~targets, float("inf"))  # c_k^T Sigma c_k, inf if not a target
    rows = movable.nonzero().squeeze(1)
    out = mapping.clone()
    for block in rows.split(_CHUNK):
        xs = vectors.detach()[block].to(dtype) @ sigma
        out[block] = (cost_c - 2 * (xs @ c.t())).argmin(-1)  # x^T Sigma x is the same for every code
    return out


def _check_mask(name: str, mask: Any, n: int, size: str, device: torch.device) -> torch.Tensor:
    if mask is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (n,):
        raise (TypeError if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool else ValueError)(
            bad_value(name, _shown(mask), f"None or a bool tensor of shape ({size},) = ({n},)"))
    return mask.to(device)
