"""Exact collapsed computations for a VQ-Logits output head, never materialising N x V logits.

The head scores token ``v`` as ``l_v = z_{M(v)} + b_v`` with ``z = h C^T`` (codebook ``C``: K x d, map ``M``: V -> K,
optional per-token bias ``b``). With ``B_k = logsumexp_{v in k} b_v`` (``log n_k`` without bias, ``-inf`` for an
empty cluster):

- ``logsumexp_v l_v = logsumexp_k (z_k + B_k)``, so the full-softmax loss is a K-way computation plus lookups:
  ``-log p(y) = logsumexp_k(z_k + B_k) - z_{M(y)} - b_y``;
- ``p(v) = softmax(z + B)_{M(v)} * exp(b_v - B_{M(v)})``: sampling draws a cluster, then a token of that cluster
  from a fixed table (:class:`ClusterTables`);
- greedy decoding is ``argmax_k (z_k + max_{v in k} b_v)``, then that cluster's best token;
- a decoding step that changes a few logits per row (repetition penalty, n-gram bans: :class:`TokenOverrides`)
  treats those tokens as holes in their clusters plus E extra candidates, O(K + E log E) per row; a bias of
  ``-inf`` in the tables bans a token for every row at no cost per step.

All functions use plain differentiable torch ops (no custom autograd), so gradients are exact by construction;
the tests compare every quantity with the materialised head in float64. ``materialized_logits`` exists only for
parity checks and as the paper's gather form (``mode="gather"``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch

from leanfit.core.errors import bad_value

__all__ = [
    "ClusterTables",
    "TokenOverrides",
    "cluster_log_normalizers",
    "collapsed_argmax",
    "collapsed_cross_entropy",
    "collapsed_log_prob",
    "collapsed_logsumexp",
    "collapsed_sample",
    "cluster_layout",
    "dense_sample",
    "kept_clusters",
    "kept_tokens",
    "materialized_logits",
    "residual_cross_entropy",
    "residual_log_probs",
]

Reduction = Literal["mean", "sum", "none"]
REDUCTIONS = ("mean", "sum", "none")


# --- input checks ------------------------------------------------------------------------------------------------
# Public functions check their inputs here, at the boundary; the private ``_...`` implementations below assume
# checked inputs (the head calls them after its own checks, so nothing is checked twice). Shape and dtype checks
# are free; id ranges cost one reduction and one host sync per call, never one per row or per step.


class _Shown(str):
    """A value printed as is (unquoted) in an error message."""

    def __repr__(self) -> str:
        return str(self)


def _shown(value: Any) -> Any:
    """What an error message shows of ``value``: shape and dtype of a tensor, the type name of a container."""
    if isinstance(value, torch.Tensor):
        return _Shown(f"tensor(shape={tuple(value.shape)}, dtype={value.dtype})")
    if value is None or isinstance(value, (numbers.Number, str, torch.dtype)):
        return value
    return _Shown(type(value).__name__)


def _is_integer_dtype(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _check_tensor(name: str, x: Any, *, dims: int, kind: Literal["float", "int"], shape: str) -> None:
    """``x`` is a torch.Tensor of ``kind`` (floating point / integer, not bool) with ``dims`` dimensions."""
    what = f"{'a floating-point' if kind == 'float' else 'an integer'} tensor of shape {shape}"
    if not isinstance(x, torch.Tensor):
        raise TypeError(bad_value(name, _shown(x), what, "pass a torch.Tensor"))
    if kind == "float" and not x.is_floating_point():
        raise TypeError(bad_value(name, _shown(x), what, "cast it with .float()"))
    if kind == "int" and not _is_integer_dtype(x.dtype):
        raise TypeError(bad_value(name, _shown(x), what, "cast it with .long()"))
    if x.dim() != dims:
        raise ValueError(bad_value(name, _shown(x), what))


def _check_int(name: str, value: Any, low: int, expected: str | None = None, fix: str | None = None) -> int:
    """A Python (or numpy) integer >= ``low``; bools are refused."""
    expected = expected or f"an integer >= {low}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(bad_value(name, _shown(value), expected, fix))
    if value < low:
        raise ValueError(bad_value(name, value, expected, fix))
    return int(value)


def _check_num_codes(num_codes: Any) -> int:
    return _check_int("num_codes", num_codes, 1, "an integer >= 1 (the number of codes K)")


def _check_reduction(reduction: Any) -> None:
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(bad_value("reduction", _shown(reduction), "one of 'mean', 'sum', 'none'",
                                   "'mean' averages over the labels that are not ignore_index, as F.cross_entropy"))


def _check_ignore_index(ignore_index: Any) -> int:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(bad_value("ignore_index", _shown(ignore_index), "an integer label to skip",
                                  "use -100, the default of F.cross_entropy and Hugging Face"))
    return int(ignore_index)


def _check_hidden_codebook(hidden: Any, codebook: Any) -> None:
    """hidden (N, d) and codebook (K, d), floating point, one dtype (unless autocast casts them)."""
    _check_tensor("codebook", codebook, dims=2, kind="float", shape="(K, d)")
    if codebook.shape[0] < 1:
        raise ValueError(bad_value("codebook", _shown(codebook), "shape (K, d) with K >= 1 codes"))
    d = codebook.shape[1]
    _check_tensor("hidden", hidden, dims=2, kind="float", shape=f"(N, d) = (N, {d})")
    if hidden.shape[1] != d:
        raise ValueError(bad_value("hidden", _shown(hidden), f"shape (N, {d}) to match codebook (K, d) = "
                                   f"{tuple(codebook.shape)}", "pass the states of the model this head belongs to"))
    if hidden.dtype != codebook.dtype and not torch.is_autocast_enabled(hidden.device.type):
        raise TypeError(bad_value("codebook", _shown(codebook), f"the dtype of hidden ({hidden.dtype})",
                                  "cast one to the other's dtype, or run under torch.autocast"))


def _check_mapping(mapping: Any) -> torch.Tensor:
    """mapping (V,) integer with V >= 1 (its range is checked by :func:`_check_ids`); returned as int64."""
    _check_tensor("mapping", mapping, dims=1, kind="int", shape="(V,)")
    if mapping.numel() < 1:
        raise ValueError(bad_value("mapping", _shown(mapping), "shape (V,) with V >= 1 tokens"))
    return mapping.long()


def _check_bias(bias: Any, vocab_size: int) -> None:
    if bias is None:
        return
    _check_tensor("bias", bias, dims=1, kind="float", shape=f"(V,) = ({vocab_size},)")
    if bias.shape[0] != vocab_size:
        raise ValueError(bad_value("bias", _shown(bias), f"None or a floating-point tensor of shape (V,) = "
                                   f"({vocab_size},), one entry per token of mapping"))


def _check_residual(proj: Any, emb: Any, d: int, vocab_size: int) -> None:
    """proj (r, d) and emb (V, r), floating point."""
    _check_tensor("proj", proj, dims=2, kind="float", shape=f"(r, d) = (r, {d})")
    if proj.shape[1] != d:
        raise ValueError(bad_value("proj", _shown(proj), f"shape (r, d) = (r, {d})"))
    r = proj.shape[0]
    _check_tensor("emb", emb, dims=2, kind="float", shape=f"(V, r) = ({vocab_size}, {r})")
    if tuple(emb.shape) != (vocab_size, r):
        raise ValueError(bad_value("emb", _shown(emb), f"shape (V, r) = ({vocab_size}, {r}) (V from mapping, r "
                                   "from proj)"))


def _mapping_range_message(mapping: torch.Tensor, num_codes: int) -> str:
    return (f"mapping values span [{int(mapping.min())}, {int(mapping.max())}]: expected codes in [0, {num_codes}); "
            "build it for this num_codes")


def _token_range_message(tokens: torch.Tensor, name: str, vocab_size: int, ignore_index: int | None) -> str:
    """Names the first token outside [0, V) (and not ``ignore_index``), its value and its (flat) position."""
    flat = tokens.reshape(-1)
    bad = (flat < 0) | (flat >= vocab_size)
    if ignore_index is not None:
        bad &= flat != ignore_index
    pos = int(bad.nonzero()[0, 0])
    allowed = f"[0, {vocab_size})" + (f" or ignore_index={ignore_index}" if ignore_index is not None else "")
    fix = ("give positions without a target the label ignore_index" if ignore_index is not None
           else "check that the tokenizer matches the head's vocabulary")
    return (f"{name} contains {int(flat[pos])}: expected token ids in {allowed} (first at position {pos} of "
            f"{flat.numel()}); {fix}")


def _check_ids(mapping: torch.Tensor, num_codes: int, tokens: torch.Tensor | None = None, name: str = "labels",
               ignore_index: int | None = None) -> None:
    """Values of mapping in [0, K) and of tokens in [0, V) or ``ignore_index``: one host sync for both."""
    if mapping.device.type == "meta" or (tokens is not None and tokens.device.type == "meta"):
        return
    flags = [((mapping < 0) | (mapping >= num_codes)).any()]
    if tokens is not None:
        bad = (tokens < 0) | (tokens >= mapping.numel())
        if ignore_index is not None:
            bad &= tokens != ignore_index
        flags.append(bad.any().to(mapping.device))
    found = torch.stack(flags).tolist()
    if found[0]:
        raise ValueError(_mapping_range_message(mapping, num_codes))
    if tokens is not None and found[1]:
        raise ValueError(_token_range_message(tokens, name, mapping.numel(), ignore_index))


def _check_tokens(name: str, tokens: Any, n: int) -> torch.Tensor:
    """tokens (N,) integer with N = ``n``; returned as int64."""
    _check_tensor(name, tokens, dims=1, kind="int", shape=f"(N,) = ({n},)")
    if tokens.shape[0] != n:
        raise ValueError(bad_value(name, _shown(tokens), f"one label per row of hidden: shape (N,) = ({n},)"))
    return tokens.long()


def _check_loss_inputs(hidden: Any, codebook: Any, mapping: Any, labels: Any, bias: Any, name: str = "labels",
                       ignore_index: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Everything of a collapsed loss but the residual factors; returns (mapping, labels) as int64."""
    _check_hidden_codebook(hidden, codebook)
    mapping = _check_mapping(mapping)
    _check_bias(bias, mapping.numel())
    labels = _check_tokens(name, labels, hidden.shape[0])
    _check_ids(mapping, codebook.shape[0], labels, name, ignore_index)
    return mapping, labels


def _check_temperature(temperature: Any) -> float:
    expected = "a finite number > 0"
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(bad_value("temperature", _shown(temperature), expected, "pass a Python float"))
    if not (math.isfinite(float(temperature)) and float(temperature) > 0):
        fix = ("for greedy decoding use argmax() (or top_k=1) instead of temperature 0" if temperature == 0
               else "pass temperature=1.0 to sample from the model's distribution unchanged")
        raise ValueError(bad_value("temperature", temperature, expected, fix))
    return float(temperature)


def _check_sampling(temperature: Any, top_k: Any, top_p: Any) -> tuple[float, int | None, float | None]:
    """The warper settings, as Hugging Face's warpers require them: T finite > 0, top-k >= 1, top-p in (0, 1]."""
    t = _check_temperature(temperature)
    k = None if top_k is None else _check_int("top_k", top_k, 1, "None or an integer >= 1",
                                               "pass top_k=None to keep every token")
    if top_p is None:
        return t, k, None
    expected = "None or a probability in (0, 1]"
    if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real):
        raise TypeError(bad_value("top_p", _shown(top_p), expected, "pass a Python float"))
    if not (math.isfinite(float(top_p)) and 0 < float(top_p) <= 1):
        raise ValueError(bad_value("top_p", top_p, expected, "pass top_p=None (or 1.0) to keep every token"))
    return t, k, float(top_p)


def _check_generator(generator: Any) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(bad_value("generator", _shown(generator), "None or a torch.Generator",
                                  "pass torch.Generator(device).manual_seed(seed)"))


def _check_tables(tables: Any, num_codes: int) -> None:
    if not isinstance(tables, ClusterTables):
        raise TypeError(bad_value("tables", _Shown(type(tables).__name__), "a ClusterTables",
                                  "build it with ClusterTables.build(mapping, num_codes, bias)"))
    if tables.num_codes != num_codes:
        raise ValueError(bad_value("tables", _Shown(f"ClusterTables(num_codes={tables.num_codes})"),
                                   f"tables of the codebook's K={num_codes} codes",
                                   "rebuild them with ClusterTables.build(mapping, codebook.shape[0], bias)"))


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
    mapping, num_codes = _check_mapping(mapping), _check_num_codes(num_codes)
    _check_bias(bias, mapping.numel())
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(bad_value("dtype", _shown(dtype), "a floating-point torch.dtype", "e.g. torch.float32"))
    _check_ids(mapping, num_codes)
    return _log_normalizers(mapping, num_codes, bias, dtype)


def _log_normalizers(mapping: torch.Tensor, num_codes: int, bias: torch.Tensor | None,
                     dtype: torch.dtype) -> torch.Tensor:
    if bias is None:
        counts = torch.bincount(mapping, minlength=num_codes).to(dtype)
        return counts.log()  # log 0 = -inf for empty clusters
    return _segment_logsumexp(bias.to(torch.promote_types(bias.dtype, dtype)), mapping, num_codes)


def collapsed_logsumexp(z: torch.Tensor, log_norm: torch.Tensor) -> torch.Tensor:
    """``logsumexp_v l_v`` per row from code logits ``z`` (N, K) and ``B`` (K,): (N,)."""
    _check_tensor("z", z, dims=2, kind="float", shape="(N, K)")
    _check_tensor("log_norm", log_norm, dims=1, kind="float", shape=f"(K,) = ({z.shape[1]},)")
    if log_norm.shape[0] != z.shape[1]:
        raise ValueError(bad_value("log_norm", _shown(log_norm), f"shape (K,) = ({z.shape[1]},) to match z (N, K)"))
    return _logsumexp(z, log_norm)


def _logsumexp(z: torch.Tensor, log_norm: torch.Tensor) -> torch.Tensor:
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

    hidden: (N, d) floating point; codebook: (K, d), same dtype; mapping: (V,) integer in [0, K); labels: (N,)
    integer in [0, V) or ``ignore_index``; bias: (V,) or None. ``reduction="mean"`` averages over non-ignored
    labels; like ``F.cross_entropy`` it is nan (0/0) when no label counts (empty batch, or all ignored), while "sum"
    is 0 and "none" gives zeros. Anything else is a ValueError/TypeError naming the parameter (one host sync for
    the id ranges)."""
    _check_reduction(reduction)
    ignore_index = _check_ignore_index(ignore_index)
    mapping, labels = _check_loss_inputs(hidden, codebook, mapping, labels, bias, ignore_index=ignore_index)
    return _collapsed_nll(hidden, codebook, mapping, labels, bias, ignore_index, reduction)


def _valid(labels: torch.Tensor, ignore_index: int | None) -> torch.Tensor:
    return torch.ones_like(labels, dtype=torch.bool) if ignore_index is None else labels != ignore_index


def _reduce(nll: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    nll = torch.where(valid, nll, torch.zeros_like(nll))
    if reduction == "none":
        return nll
    if reduction == "sum":
        return nll.sum()
    return nll.sum() / valid.sum()  # 0/0 = nan when no label counts, as F.cross_entropy


def _collapsed_nll(hidden: torch.Tensor, codebook: torch.Tensor, mapping: torch.Tensor, labels: torch.Tensor,
                   bias: torch.Tensor | None, ignore_index: int | None, reduction: str) -> torch.Tensor:
    """:func:`collapsed_cross_entropy` on checked inputs; ``ignore_index=None`` ignores nothing."""
    z = code_logits(hidden, codebook)
    log_norm = _log_normalizers(mapping, codebook.shape[0], bias, dtype=z.dtype)
    valid = _valid(labels, ignore_index)
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    nll = _logsumexp(z, log_norm) - z.gather(1, mapping[safe].unsqueeze(1)).squeeze(1)
    if bias is not None:
        nll = nll - bias[safe].to(nll.dtype)
    return _reduce(nll, valid, reduction)


def collapsed_log_prob(hidden: torch.Tensor, codebook: torch.Tensor, mapping: torch.Tensor, tokens: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """``log p(tokens[i] | hidden[i])``: (N,); tokens (N,) integer in [0, V), nothing ignored."""
    mapping, tokens = _check_loss_inputs(hidden, codebook, mapping, tokens, bias, "tokens")
    return -_collapsed_nll(hidden, codebook, mapping, tokens, bias, None, "none")


def materialized_logits(hidden: torch.Tensor, codebook: torch.Tensor, mapping: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """The (N, V) logits by gathering code logits (the paper's form); for parity checks and fallbacks only."""
    _check_hidden_codebook(hidden, codebook)
    mapping = _check_mapping(mapping)
    _check_bias(bias, mapping.numel())
    _check_ids(mapping, codebook.shape[0])
    return _materialized_logits(hidden, codebook, mapping, bias)


def _materialized_logits(hidden: torch.Tensor, codebook: torch.Tensor, mapping: torch.Tensor,
                         bias: torch.Tensor | None) -> torch.Tensor:
    logits = code_logits(hidden, codebook)[:, mapping]
    return logits if bias is None else logits + bias.to(logits.dtype)


@dataclass(frozen=True)
class ClusterTables:
    """Per-cluster decoding tables, built once per (mapping, bias) in O(V log V).

    Tokens are laid out cluster by cluster (``offsets``), by descending bias within a cluster (``order``,
    ``sorted_bias``; ``position`` is the inverse of ``order``). ``keys`` lets one ``searchsorted`` count, for any
    cluster and threshold, how many of its tokens have bias >= threshold: ``keys[j] = cluster(j) * R +
    rank(-sorted_bias[j])`` with ``uniq`` the sorted distinct values of ``-sorted_bias``; integers, so the counts are
    exact. A bias of ``-inf`` bans a token (how decoding suppresses tokens for every row alike); ``n_finite`` counts
    the tokens of each cluster that are not banned (they come first in its layout).
    """

    num_codes: int
    order: torch.Tensor  # (V,) token ids, grouped by cluster, bias descending
    offsets: torch.Tensor  # (K + 1,)
    sorted_bias: torch.Tensor  # (V,) float64
    bias_max: torch.Tensor  # (K,) float64, -inf for empty clusters
    keys: torch.Tensor  # (V,) int64
    uniq: torch.Tensor  # (U,) float64 ascending
    segment: torch.Tensor  # (V,) cluster of each position
    position: torch.Tensor  # (V,) layout position of each token
    n_finite: torch.Tensor  # (K,) tokens of each cluster with a finite bias
    _prefix_mass: dict[float, torch.Tensor] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(cls, mapping: torch.Tensor, num_codes: int, bias: torch.Tensor | None = None) -> ClusterTables:
        mapping, num_codes = _check_mapping(mapping), _check_num_codes(num_codes)
        _check_bias(bias, mapping.numel())
        _check_ids(mapping, num_codes)
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
        position = torch.empty_like(order)
        position[order] = torch.arange(order.numel(), device=order.device)
        n_finite = torch.bincount(mapping, weights=torch.isfinite(b).double(), minlength=num_codes).long()
        return cls(num_codes, order, offsets, sorted_bias, bias_max, keys, uniq, segment, position, n_finite)

    def count_at_least(self, thresholds: torch.Tensor) -> torch.Tensor:
        """For thresholds (N, K): number of tokens of cluster k with bias >= thresholds[i, k]: (N, K) int64."""
        _check_tensor("thresholds", thresholds, dims=2, kind="float", shape=f"(N, K) = (N, {self.num_codes})")
        if thresholds.shape[1] != self.num_codes:
            raise ValueError(bad_value("thresholds", _shown(thresholds), f"shape (N, K) = (N, {self.num_codes})"))
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
        temperature = _check_temperature(temperature)
        if temperature in self._prefix_mass:
            return self._prefix_mass[temperature]
        finite = torch.isfinite(self.sorted_bias)  # a banned token has no mass (and -inf - -inf would be nan)
        shifted = torch.where(finite, ((self.sorted_bias - self.bias_max[self.segment]) / temperature).exp(), 0.0)
        pm = torch.zeros(shifted.numel() + 1, dtype=torch.float64, device=shifted.device)
        pm[1:] = shifted.cumsum(0)
        if len(self._prefix_mass) >= 8:  # a few temperatures per model in practice; bound the memory anyway
            self._prefix_mass.pop(next(iter(self._prefix_mass)))
        self._prefix_mass[temperature] = pm
        return pm


# --- decoding with a few per-row logits overridden ---------------------------------------------------------------
# Repetition penalties, n-gram bans and multi-token sequence biases change a handful of logits per row and step.
# Those tokens become "holes" in their cluster's layout: a cluster's best remaining token is the first position
# after its leading run of holes, its kept mass is its prefix mass minus the holes' masses, and the overridden
# tokens compete as E extra candidates. Everything stays O(K + E log E) per row, never O(V).


@dataclass(frozen=True)
class TokenOverrides:
    """Logits that replace the head's for a few tokens per row (penalised, banned or biased tokens of one step).

    tokens: (N, E) integer ids in [0, V), ``-1`` for an unused slot, no id twice in a row; values: (N, E) floating
    point, the new logits (``-inf`` bans the token). Tokens banned for every row alike belong in the tables' bias
    instead (``ClusterTables.build(mapping, K, bias)`` with ``-inf`` entries), which costs nothing per step."""

    tokens: torch.Tensor
    values: torch.Tensor


@dataclass(frozen=True)
class _Holes:
    """Overrides sorted by layout position per row; unused slots last (position V, cluster K, value -inf)."""

    pos: torch.Tensor  # (N, E) int64
    cluster: torch.Tensor  # (N, E) int64
    tokens: torch.Tensor  # (N, E) int64, -1 for unused slots
    values: torch.Tensor  # (N, E) float64
    valid: torch.Tensor  # (N, E) bool
    slot: torch.Tensor  # (N, E) int64: the column of each entry in the caller's TokenOverrides


def _holes(tables: ClusterTables, tokens: torch.Tensor, values: torch.Tensor) -> _Holes | None:
    if tokens.shape[1] == 0:
        return None
    vocab = tables.order.numel()
    valid = tokens >= 0
    pos, slot = torch.where(valid, tables.position[tokens.clamp_min(0)], vocab).sort(dim=1)
    valid = valid.gather(1, slot)
    values = torch.where(valid, values.double().gather(1, slot), -math.inf)
    at = pos.clamp(max=vocab - 1)
    cluster = torch.where(valid, tables.segment[at], tables.num_codes)
    return _Holes(pos, cluster, torch.where(valid, tables.order[at], -1), values, valid, slot)


def _check_overrides(overrides: Any, n: int, tables: ClusterTables) -> _Holes | None:
    if overrides is None:
        return None
    if not isinstance(overrides, TokenOverrides):
        raise TypeError(bad_value("overrides", _shown(overrides), "None or a TokenOverrides(tokens, values)"))
    tokens, values = overrides.tokens, overrides.values
    _check_tensor("overrides.tokens", tokens, dims=2, kind="int", shape=f"(N, E) = ({n}, E)")
    _check_tensor("overrides.values", values, dims=2, kind="float", shape=f"(N, E) = ({n}, E)")
    if tokens.shape[0] != n or values.shape != tokens.shape:
        raise ValueError(bad_value("overrides.values", _shown(values), f"the shape of overrides.tokens "
                                   f"{tuple(tokens.shape)}, with N = {n} rows as hidden"))
    vocab = tables.order.numel()
    if ((tokens < -1) | (tokens >= vocab)).any():
        raise ValueError(f"overrides.tokens holds ids outside [0, {vocab}) other than -1 (an unused slot); "
                         "pass token ids of the head's vocabulary")
    holes = _holes(tables, tokens.long(), values)
    if holes is not None and (holes.valid[:, 1:] & (holes.pos[:, 1:] == holes.pos[:, :-1])).any():
        raise ValueError("overrides.tokens names a token twice in one row: give each token one value per row")
    return holes


def _first_free(tables: ClusterTables, holes: _Holes) -> torch.Tensor:
    """(N, K) layout position of each cluster's best token that is not overridden (the cluster's end if none)."""
    k = tables.num_codes
    starts = tables.offsets[:-1]
    col = torch.arange(holes.pos.shape[1], device=holes.pos.device).expand_as(holes.pos)
    first = torch.ones_like(holes.valid)
    first[:, 1:] = holes.cluster[:, 1:] != holes.cluster[:, :-1]
    rank = col - torch.where(first, col, 0).cummax(dim=1).values  # rank among the row's holes of its cluster
    # the j-th hole of a cluster sits at start + j exactly when holes 0..j fill the cluster's first j + 1 places
    leading = holes.valid & (holes.pos - starts[holes.cluster.clamp(max=k - 1)] == rank)
    run = torch.zeros(holes.pos.shape[0], k + 1, dtype=torch.long, device=col.device)
    return starts + run.scatter_add(1, holes.cluster, leading.long())[:, :k]


def _free_bias(tables: ClusterTables, first_free: torch.Tensor) -> torch.Tensor:
    """(N, K) bias of each cluster's best token that is not overridden; -inf when none is left."""
    inside = first_free < tables.offsets[1:]
    return torch.where(inside, tables.sorted_bias[first_free.clamp(max=tables.order.numel() - 1)], -math.inf)


def collapsed_argmax(hidden: torch.Tensor, codebook: torch.Tensor, tables: ClusterTables, *,
                     overrides: TokenOverrides | None = None) -> torch.Tensor:
    """Greedy token per row, ``argmax_v l_v``, in O(N K) (plus O(N E log E) with ``overrides``): (N,)."""
    _check_hidden_codebook(hidden, codebook)
    _check_tables(tables, codebook.shape[0])
    holes = _check_overrides(overrides, hidden.shape[0], tables)
    return _argmax(code_logits(hidden, codebook).double(), tables, holes)


def _argmax(z: torch.Tensor, tables: ClusterTables, holes: _Holes | None) -> torch.Tensor:
    """:func:`collapsed_argmax` from code logits z (N, K) float64, on checked inputs."""
    if holes is None:
        k = (z + tables.bias_max).argmax(dim=-1)
        return tables.order[tables.offsets[k]]
    first_free = _first_free(tables, holes)
    regular = z + _free_bias(tables, first_free)
    k = regular.argmax(dim=-1, keepdim=True)
    best = regular.gather(1, k).squeeze(1)
    token = tables.order[first_free.gather(1, k).squeeze(1).clamp(max=tables.order.numel() - 1)]
    top = holes.values.max(dim=-1).values
    top_token = torch.where(holes.valid & (holes.values == top[:, None]), holes.tokens, tables.order.numel()).amin(-1)
    # a tie between an overridden token and a regular one goes to the lower id, as argmax over V does
    return torch.where((top > best) | ((top == best) & (top_token < token)), top_token, token)


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


def _top_k_cut(z: torch.Tensor, tables: ClusterTables, top_k: int, holes: _Holes,
               free_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_top_k_thresholds` with overridden tokens: the k-th largest of the regular candidates (the first
    k + E places of the top clusters by best regular token, holes skipped) and the E override values. Returns the
    bias thresholds (N, K) and the logit cutoff (N,) that the overrides must reach."""
    e = holes.pos.shape[1]
    vocab, kc, width = tables.order.numel(), min(top_k, tables.num_codes), top_k + e
    top_clusters = (z + free_bias).topk(kc, dim=-1).indices  # (N, kc)
    pos = tables.offsets[top_clusters].unsqueeze(-1) + torch.arange(width, device=z.device)  # (N, kc, width)
    inside = pos < tables.offsets[top_clusters + 1].unsqueeze(-1)
    flat = pos.flatten(1)
    hole = (holes.pos.gather(1, torch.searchsorted(holes.pos, flat).clamp(max=e - 1)) == flat).view_as(pos)
    cand_bias = torch.where(inside & ~hole, tables.sorted_bias[pos.clamp(max=vocab - 1)], -math.inf)
    cand = (z.gather(1, top_clusters).unsqueeze(-1) + cand_bias).flatten(1)
    every = torch.cat([cand, holes.values], dim=1)
    idx = every.topk(min(top_k, every.shape[1]), dim=-1).indices[:, -1:]  # the k-th largest
    value = every.gather(1, idx)
    regular = idx < cand.shape[1]
    at = idx.clamp(max=cand.shape[1] - 1)
    c_star = top_clusters.gather(1, at // width)
    b_star = cand_bias.flatten(1).gather(1, at)
    by_bias = (b_star + (z.gather(1, c_star) - z)).scatter(1, c_star, b_star)
    return torch.where(regular, by_bias, value - z), value.squeeze(1)


def _check_min_p(min_p: Any) -> float | None:
    if min_p is None:
        return None
    expected = "None or a probability in [0, 1]"
    if isinstance(min_p, bool) or not isinstance(min_p, numbers.Real):
        raise TypeError(bad_value("min_p", _shown(min_p), expected, "pass a Python float"))
    if not (math.isfinite(float(min_p)) and 0 <= float(min_p) <= 1):
        raise ValueError(bad_value("min_p", min_p, expected, "pass min_p=None to keep every token"))
    return float(min_p)


def collapsed_sample(
    hidden: torch.Tensor,
    codebook: torch.Tensor,
    tables: ClusterTables,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    overrides: TokenOverrides | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample one token per row from ``softmax(l / T)`` restricted as Hugging Face's top-k (keep every token whose
    logit is >= the k-th largest), then top-p (smallest set of most likely tokens with mass >= p), then min-p (keep
    tokens with probability >= min_p times the largest) warpers do.

    Cost per row is O(K log V) (O(K d) for the code logits), independent of V up to the logarithm: a cluster is
    drawn from the truncated cluster masses, then a token by inverse CDF within that cluster's kept prefix.
    ``overrides`` replaces a few logits per row first (O(E log E) more per row). temperature: finite > 0; top_k:
    None or >= 1; top_p: None or in (0, 1]; min_p: None or in [0, 1]."""
    _check_hidden_codebook(hidden, codebook)
    _check_tables(tables, codebook.shape[0])
    temperature, top_k, top_p = _check_sampling(temperature, top_k, top_p)
    min_p = _check_min_p(min_p)
    _check_generator(generator)
    holes = _check_overrides(overrides, hidden.shape[0], tables)
    z = code_logits(hidden, codebook).double()  # (N, K)
    return _sample(z, tables, temperature, top_k, top_p, min_p, holes, generator)


def _sample(z: torch.Tensor, tables: ClusterTables, temperature: float, top_k: int | None, top_p: float | None,
            min_p: float | None, holes: _Holes | None, generator: torch.Generator | None) -> torch.Tensor:
    """:func:`collapsed_sample` from code logits z (N, K) float64, on checked inputs."""
    counts, log_w, override_log_w = _kept(z, tables, temperature, top_k, top_p, min_p, holes)
    return _draw(tables, temperature, counts, log_w, override_log_w, holes, generator)


def _draw(tables: ClusterTables, temperature: float, counts: torch.Tensor, log_w: torch.Tensor,
          override_log_w: torch.Tensor | None, holes: _Holes | None,
          generator: torch.Generator | None) -> torch.Tensor:
    """A cluster (or an overridden token) from the kept masses, then a token by inverse CDF within the cluster's
    kept prefix, its holes skipped."""
    pm, starts = tables.prefix_mass(temperature), tables.offsets[:-1]
    k = log_w.shape[1]
    weights = log_w if override_log_w is None else torch.cat([log_w, override_log_w], dim=1)
    pick = torch.multinomial(torch.softmax(weights, dim=-1), 1, generator=generator).squeeze(1)
    cluster = pick.clamp(max=k - 1)
    # inverse CDF within the kept prefix of the drawn cluster
    start = starts[cluster]
    n_kept = counts.gather(1, cluster.unsqueeze(1)).squeeze(1)
    u = torch.rand(log_w.shape[0], generator=generator, dtype=torch.float64, device=log_w.device)
    if holes is None:
        target = pm[start] + u * (pm[start + n_kept] - pm[start])
    else:
        target = pm[start] + _skip_holes(pm, holes, cluster, start, start + n_kept, u)
    pos = torch.searchsorted(pm, target, right=True) - 1  # pm[pos] <= target < pm[pos + 1]
    pos = torch.minimum(torch.maximum(pos, start), start + n_kept - 1)
    if holes is None:
        return tables.order[pos]
    token = tables.order[_off_holes(pos, holes, start, start + n_kept).clamp(0, tables.order.numel() - 1)]
    overridden = holes.tokens.gather(1, (pick - k).clamp_min(0).unsqueeze(1)).squeeze(1)
    return torch.where(pick >= k, overridden, token)


def _skip_holes(pm: torch.Tensor, holes: _Holes, cluster: torch.Tensor, start: torch.Tensor, end: torch.Tensor,
                u: torch.Tensor) -> torch.Tensor:
    """Offset from ``pm[start]`` of the point at fraction ``u`` of the cluster's regular kept mass: each hole that
    starts at or before the point (in regular mass) pushes it on by the hole's own mass."""
    at = holes.pos.clamp(max=pm.numel() - 2)
    inside = holes.valid & (holes.cluster == cluster.unsqueeze(1)) & (holes.pos < end.unsqueeze(1))
    mass = torch.where(inside, pm[at + 1] - pm[at], 0.0)
    t = u * (pm[end] - pm[start] - mass.sum(dim=1))
    ahead = pm[at] - pm[start].unsqueeze(1) - (mass.cumsum(dim=1) - mass)  # regular mass before each hole
    return t + torch.where(inside & (ahead <= t.unsqueeze(1)), mass, 0.0).sum(dim=1)


def _off_holes(pos: torch.Tensor, holes: _Holes, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """Moves a position that rounding left on a hole to the next regular one of the kept prefix (or the previous
    one at its end); the holes' own mass is never drawn, so this only happens within a few ulps of a boundary."""
    e = holes.pos.shape[1]
    for step in (1, -1):
        for _ in range(e):
            found = holes.pos.gather(1, torch.searchsorted(holes.pos, pos.unsqueeze(1)).clamp(max=e - 1))
            hit = found.squeeze(1) == pos
            if not bool(hit.any()):
                return pos
            nxt = pos + step
            pos = torch.where(hit & (nxt >= start) & (nxt < end), nxt, pos)
    return pos


def kept_clusters(z: torch.Tensor, tables: ClusterTables, *, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, min_p: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """What top-k, top-p then min-p keep, cluster by cluster, from code logits ``z`` (N, K) float64: ``counts``
    (N, K), the kept tokens of cluster k being its first ``counts[:, k]`` in ``tables.order`` (bias descending), and
    their log masses ``log_w`` (N, K) under ``softmax(l / T)`` up to a per-row constant."""
    counts, log_w, _ = kept_tokens(z, tables, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    return counts, log_w


def kept_tokens(z: torch.Tensor, tables: ClusterTables, *, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, min_p: float | None = None,
                overrides: TokenOverrides | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`kept_clusters` with ``overrides``: also the log masses (N, E) of the overridden tokens (``-inf`` for
    those dropped), column by column as in ``overrides.tokens``, or None without overrides. The prefixes in
    ``counts`` then still count the overridden tokens among them; ``log_w`` holds the other tokens' mass only."""
    if not isinstance(tables, ClusterTables):
        _check_tables(tables, 0)
    _check_tensor("z", z, dims=2, kind="float", shape=f"(N, K) = (N, {tables.num_codes})")
    if z.shape[1] != tables.num_codes:
        raise ValueError(bad_value("z", _shown(z), f"code logits of shape (N, K) = (N, {tables.num_codes}), K from "
                                   "tables", "pass code_logits(hidden, codebook) of the tables' codebook"))
    temperature, top_k, top_p = _check_sampling(temperature, top_k, top_p)
    min_p = _check_min_p(min_p)
    holes = _check_overrides(overrides, z.shape[0], tables)
    counts, log_w, override_log_w = _kept(z.double(), tables, temperature, top_k, top_p, min_p, holes)
    if holes is not None and override_log_w is not None:  # back to the caller's column order
        override_log_w = torch.empty_like(override_log_w).scatter(1, holes.slot, override_log_w)
    elif overrides is not None:
        override_log_w = torch.full(overrides.tokens.shape, -math.inf, dtype=torch.float64, device=z.device)
    return counts, log_w, override_log_w


_FLOOR = torch.finfo(torch.float64).min  # a bias threshold never admits a banned (-inf) token


def _kept(z: torch.Tensor, tables: ClusterTables, temperature: float, top_k: int | None, top_p: float | None,
          min_p: float | None, holes: _Holes | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(counts, log_w, override_log_w) on checked inputs. A kept set is "every token with logit >= c": per cluster
    a bias threshold (N, K) for the regular tokens and a logit cutoff (N,) for the overridden ones."""
    n, k = z.shape
    pm, starts = tables.prefix_mass(temperature), tables.offsets[:-1]
    best = (z + tables.bias_max) / temperature
    free_bias = tables.bias_max.expand_as(z)
    thresholds, cut = torch.full_like(z, -math.inf), torch.full((n,), -math.inf, dtype=z.dtype, device=z.device)
    if holes is not None:
        free_bias = _free_bias(tables, _first_free(tables, holes))
        at = holes.pos.clamp(max=pm.numel() - 2)
        hole_mass, hole_cluster = pm[at + 1] - pm[at], holes.cluster.clamp(max=k - 1)
        hole_start = starts[hole_cluster]
        if top_k is not None:
            thresholds, cut = _top_k_cut(z, tables, top_k, holes, free_bias)
    elif top_k is not None:
        thresholds = _top_k_thresholds(z, tables, top_k)

    def kept(bias_thresholds: torch.Tensor, cutoff: torch.Tensor) -> _Kept:
        counts = tables.count_at_least(bias_thresholds.clamp_min(_FLOOR))
        within = pm[starts + counts] - pm[starts]
        if holes is None:
            log_w = torch.where(counts > 0, best + within.clamp_min(1e-300).log(), -math.inf)
            return _Kept(counts, log_w, None, counts.sum(-1))
        inside = holes.valid & (holes.pos < hole_start + counts.gather(1, hole_cluster))
        spare = torch.zeros(n, k + 1, dtype=within.dtype, device=z.device)
        within = within - spare.scatter_add(1, holes.cluster, torch.where(inside, hole_mass, 0.0))[:, :k]
        regular = counts - spare.long().scatter_add(1, holes.cluster, inside.long())[:, :k]
        log_w = torch.where(regular > 0, best + within.clamp_min(1e-300).log(), -math.inf)
        keep = torch.isfinite(holes.values) & (holes.values >= cutoff.unsqueeze(1))
        override_log_w = torch.where(keep, holes.values / temperature, -math.inf)
        return _Kept(counts, log_w, override_log_w, regular.sum(-1) + keep.sum(-1))

    hi = (z + free_bias).max(dim=-1).values  # the largest logit
    if holes is not None:
        hi = torch.maximum(hi, holes.values.max(dim=-1).values)
    cutoff = torch.full_like(hi, -math.inf)
    if top_p is not None and top_p < 1.0:
        cutoff = _top_p_cutoff(z, tables, top_p, hi, holes, kept(thresholds, cut), lambda c: kept(
            torch.maximum(thresholds, c.unsqueeze(1) - z), torch.maximum(cut, c)))
    if min_p is not None and min_p > 0:  # p_v >= min_p * p_max  <=>  l_v >= l_max + T log(min_p)
        cutoff = torch.maximum(cutoff, hi + temperature * math.log(min_p))
    out = kept(torch.maximum(thresholds, cutoff.unsqueeze(1) - z), torch.maximum(cut, cutoff))
    return out.counts, out.log_w, out.override_log_w


class _Kept(NamedTuple):
    counts: torch.Tensor  # (N, K) kept prefix of each cluster, holes included
    log_w: torch.Tensor  # (N, K) log mass of each cluster's kept regular tokens
    override_log_w: torch.Tensor | None  # (N, E) log mass of each kept overridden token, -inf if dropped
    n_kept: torch.Tensor  # (N,) number of kept tokens


def _mass(kept: _Kept) -> torch.Tensor:
    every = kept.log_w if kept.override_log_w is None else torch.cat([kept.log_w, kept.override_log_w], dim=1)
    return torch.logsumexp(every, dim=-1)


def _top_p_cutoff(z: torch.Tensor, tables: ClusterTables, top_p: float, hi: torch.Tensor, holes: _Holes | None,
                  after_top_k: _Kept, kept_at: Callable[[torch.Tensor], _Kept]) -> torch.Tensor:
    """The largest logit cutoff c whose kept set {l >= c} still holds mass >= top_p of what top-k left (N,)."""
    # Raise each row's cutoff by bisection; every step is an exact count. [lo, hi) brackets the cutoff: the set at
    # lo is enough, the set at hi is not. It stops once one token (or one tie of equal logits) separates them.
    starts = tables.offsets[:-1]
    finite = tables.n_finite > 0
    bias_min = torch.where(finite, tables.sorted_bias[(starts + tables.n_finite - 1).clamp_min(0)], math.inf)
    lowest = torch.where(finite, z + bias_min, math.inf).min(dim=-1).values
    if holes is not None:
        lowest = torch.minimum(lowest, torch.where(torch.isfinite(holes.values), holes.values, math.inf).amin(-1))
    total = _mass(after_top_k)
    lo = lowest - 1.0  # lo keeps all that top-k left; hi only the best
    log_p = math.log(top_p)
    at_hi = kept_at(hi)
    n_lo, n_hi = after_top_k.n_kept, at_hi.n_kept
    best_enough = _mass(at_hi) - total >= log_p  # the best token(s) alone hold mass >= top_p
    lo, n_lo = torch.where(best_enough, hi, lo), torch.where(best_enough, n_hi, n_lo)
    for _ in range(200):
        active = (n_lo - n_hi > 1) & ((hi - lo) > 1e-13 * hi.abs().clamp_min(1.0))
        if not bool(active.any()):
            break
        mid = (lo + hi) / 2
        at_mid = kept_at(mid)
        n_mid = at_mid.n_kept
        enough = (_mass(at_mid) - total >= log_p) & active
        short = ~enough & active
        lo, n_lo = torch.where(enough, mid, lo), torch.where(enough, n_mid, n_lo)
        hi, n_hi = torch.where(short, mid, hi), torch.where(short, n_mid, n_hi)
    return lo


# --- within-cluster low-rank residual --------------------------------------------------------------------------
# An exact class-based factorisation that lets tokens of one cluster differ by context:
#   p(v | h) = softmax_k(z_k + B_k)[M(v)] * softmax_{v' in M(v)}(b_v' + u_v' . P h)[v],
# with P (r x d) and U (V x r). With U = 0 it is the plain head. The loss needs the target cluster's members
# only, so a token costs O(K d + r d + n_k r) where n_k is the size of its target cluster.


def cluster_layout(mapping: torch.Tensor, num_codes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, offsets): token ids grouped by cluster (V,), and cluster start positions (K + 1,)."""
    mapping, num_codes = _check_mapping(mapping), _check_num_codes(num_codes)
    _check_ids(mapping, num_codes)
    return _cluster_layout(mapping, num_codes)


def _cluster_layout(mapping: torch.Tensor, num_codes: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.argsort(mapping, stable=True)
    offsets = torch.zeros(num_codes + 1, dtype=torch.long, device=mapping.device)
    offsets[1:] = torch.bincount(mapping, minlength=num_codes).cumsum(0)
    return order, offsets


def _check_layout(layout: Any, vocab_size: int, num_codes: int) -> None:
    shapes = ((vocab_size,), (num_codes + 1,))
    if layout is None:
        return
    if not (isinstance(layout, (tuple, list)) and len(layout) == 2
            and all(isinstance(t, torch.Tensor) and tuple(t.shape) == s for t, s in zip(layout, shapes, strict=True))):
        shown = _Shown(f"({', '.join(str(_shown(t)) for t in layout)})") if isinstance(layout, (tuple, list)) \
            else _shown(layout)
        raise ValueError(bad_value("layout", shown, f"None or cluster_layout(mapping, K): tensors of shapes (V,) = "
                                   f"{shapes[0]} and (K + 1,) = {shapes[1]}", "pass layout=None to build it"))


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
    emb: (V, r), floating point; the other inputs, the reductions and the empty batch as in
    :func:`collapsed_cross_entropy`. Cost O(N K d + sum_i n_{k_i} r); never builds N x V."""
    _check_reduction(reduction)
    ignore_index = _check_ignore_index(ignore_index)
    _check_hidden_codebook(hidden, codebook)
    mapping = _check_mapping(mapping)
    _check_bias(bias, mapping.numel())
    _check_residual(proj, emb, hidden.shape[1], mapping.numel())
    _check_layout(layout, mapping.numel(), codebook.shape[0])
    mapping, labels = _check_loss_inputs(hidden, codebook, mapping, labels, bias, ignore_index=ignore_index)
    return _residual_nll(hidden, codebook, mapping, labels, bias, proj, emb, layout, ignore_index, reduction)


def _residual_nll(hidden: torch.Tensor, codebook: torch.Tensor, mapping: torch.Tensor, labels: torch.Tensor,
                  bias: torch.Tensor | None, proj: torch.Tensor, emb: torch.Tensor,
                  layout: tuple[torch.Tensor, torch.Tensor] | None, ignore_index: int | None,
                  reduction: str) -> torch.Tensor:
    """:func:`residual_cross_entropy` on checked inputs; ``ignore_index=None`` ignores nothing."""
    z = code_logits(hidden, codebook)
    k_total = codebook.shape[0]
    log_norm = _log_normalizers(mapping, k_total, bias, dtype=z.dtype)
    order, offsets = layout or _cluster_layout(mapping, k_total)
    valid = _valid(labels, ignore_index)
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    k = mapping[safe]
    cluster_term = z.gather(1, k[:, None]).squeeze(1) + log_norm[k] - _logsumexp(z, log_norm)
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
    return _reduce(-(cluster_term + own - within_norm), valid, reduction)


def residual_log_probs(hidden: torch.Tensor, codebook: torch.Tensor, mapping: torch.Tensor,
                       bias: torch.Tensor | None, proj: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """Full (N, V) log-probabilities of the factorised head: O(N V r); for decoding and parity checks."""
    _check_hidden_codebook(hidden, codebook)
    mapping = _check_mapping(mapping)
    _check_bias(bias, mapping.numel())
    _check_residual(proj, emb, hidden.shape[1], mapping.numel())
    _check_ids(mapping, codebook.shape[0])
    return _residual_log_probs(hidden, codebook, mapping, bias, proj, emb)


def _residual_log_probs(hidden: torch.Tensor, codebook: torch.Tensor, mapping: torch.Tensor,
                        bias: torch.Tensor | None, proj: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    z = code_logits(hidden, codebook)
    k_total = codebook.shape[0]
    log_norm = _log_normalizers(mapping, k_total, bias, dtype=z.dtype)
    b = torch.zeros(mapping.numel(), dtype=z.dtype, device=z.device) if bias is None else bias.to(z.dtype)
    scores = b + (hidden.to(z.dtype) @ proj.to(z.dtype).t()) @ emb.to(z.dtype).t()  # (N, V)
    shift = torch.full((z.shape[0], k_total), -math.inf, dtype=z.dtype, device=z.device)
    idx = mapping.expand_as(scores)
    shift = shift.scatter_reduce(1, idx, scores.detach(), reduce="amax", include_self=True)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    sums = torch.zeros_like(shift).scatter_add(1, idx, (scores - shift.gather(1, idx)).exp())
    within = scores - (sums.log() + shift).gather(1, idx)
    cluster = z + log_norm - _logsumexp(z, log_norm)[:, None]
    return cluster[:, mapping] + within


def dense_sample(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample from (N, V) logits with the same rules as :func:`collapsed_sample` (ties at a cutoff kept whole);
    the O(V) path used by heads whose distribution does not factor per cluster at T != 1."""
    _check_tensor("logits", logits, dims=2, kind="float", shape="(N, V)")
    if logits.shape[1] < 1:
        raise ValueError(bad_value("logits", _shown(logits), "shape (N, V) with V >= 1 tokens"))
    temperature, top_k, top_p = _check_sampling(temperature, top_k, top_p)
    _check_generator(generator)
    scores = logits.double() / temperature
    if top_k is not None:
        kth = scores.topk(min(top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if top_p is not None and top_p < 1.0:
        sorted_scores, _ = scores.sort(dim=-1, descending=True)
        cum = torch.softmax(sorted_scores, dim=-1).cumsum(-1)
        first = (cum < top_p).sum(-1, keepdim=True).clamp(max=scores.shape[-1] - 1)
        scores = scores.masked_fill(scores < sorted_scores.gather(1, first), -math.inf)
    return torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator).squeeze(1)
