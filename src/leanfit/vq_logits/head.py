"""``VQLogitsHead``: a K-code output head (codebook + fixed token->code map + optional per-token bias) with the
exact collapsed loss, log-probs, greedy choice and sampling of :mod:`leanfit.vq_logits.functional`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from leanfit.core.errors import bad_value
from leanfit.vq_logits import functional as VF
from leanfit.vq_logits.functional import _check_int, _shown
from leanfit.vq_logits.mapping import _check_counts, build_mapping, unigram_floor, validate_mapping

__all__ = ["VQLogitsHead"]

Mode = Literal["collapsed", "gather"]


class VQLogitsHead(nn.Module):
    """Output head scoring token ``v`` as ``h . C[M(v)] + b_v``.

    Parameters: ``codebook`` (K, d) and, with ``token_bias``, ``bias`` (V,); buffer ``mapping`` (V,) int64.
    With ``residual_rank`` r > 0 the head also learns ``residual_proj`` (r, d) and ``residual_emb`` (V, r): tokens
    of one cluster then differ by context through an exact within-cluster softmax (see
    ``functional.residual_cross_entropy``); the loss stays O(N K d + N n_k r), decoding becomes O(V r) per token.
    ``mode="collapsed"`` (default) computes the loss in O(N K + V); ``mode="gather"`` materialises the N x V
    logits first, as the paper does (for comparison). ``forward(hidden)`` returns the materialised logits so the
    head can stand in for an ``nn.Linear`` anywhere; use :meth:`loss` / :meth:`sample` for the fast paths.
    """

    mapping: torch.Tensor
    bias: nn.Parameter | None
    residual_proj: nn.Parameter | None
    residual_emb: nn.Parameter | None

    def __init__(self, hidden_size: int, mapping: torch.Tensor, num_codes: int, *, token_bias: bool = True,
                 residual_rank: int = 0, mode: Mode = "collapsed", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        hidden_size = _check_int("hidden_size", hidden_size, 1, "a positive integer (the width d of hidden states)")
        if mode not in ("collapsed", "gather"):
            raise ValueError(bad_value("mode", _shown(mode), "'collapsed' or 'gather'"))
        residual_rank = _check_int("residual_rank", residual_rank, 0, "0 (off) or a positive rank")
        if not isinstance(token_bias, bool):
            raise TypeError(bad_value("token_bias", _shown(token_bias), "True or False"))
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(bad_value("dtype", _shown(dtype), "None or a floating-point torch.dtype",
                                      "e.g. torch.float32 or torch.bfloat16"))
        if not isinstance(mapping, torch.Tensor) or mapping.numel() < 1:
            raise (ValueError if isinstance(mapping, torch.Tensor) else TypeError)(bad_value(
                "mapping", _shown(mapping), "a 1-D integer tensor of length V >= 1 (token -> code)",
                "build one with build_mapping(...)"))
        vocab_size = mapping.numel()
        num_codes = _check_int("num_codes", num_codes, 1, f"1 <= num_codes <= V={vocab_size}")
        if num_codes > vocab_size:
            raise ValueError(bad_value("num_codes", num_codes, f"1 <= num_codes <= V={vocab_size}"))
        self.hidden_size, self.vocab_size, self.num_codes, self.mode = hidden_size, vocab_size, num_codes, mode
        self.register_buffer("mapping", validate_mapping(mapping, vocab_size, num_codes).to(device))
        self.codebook = nn.Parameter(torch.empty(num_codes, hidden_size, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(vocab_size, device=device, dtype=dtype)) if token_bias else None
        nn.init.normal_(self.codebook, std=hidden_size**-0.5)
        self.residual_rank = residual_rank
        self.residual_proj = self.residual_emb = None
        if residual_rank:  # starts at U = 0, i.e. exactly the plain head
            self.residual_proj = nn.Parameter(torch.randn(residual_rank, hidden_size, device=device, dtype=dtype)
                                              * hidden_size**-0.5)
            self.residual_emb = nn.Parameter(torch.zeros(vocab_size, residual_rank, device=device, dtype=dtype))
        self._layout: tuple[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] | None = None
        self._tables: tuple[tuple[int, ...], VF.ClusterTables] | None = None

    # --- constructors ----------------------------------------------------------------------------------------
    @classmethod
    def from_scratch(cls, hidden_size: int, vocab_size: int, num_codes: int, *,
                     mapping: str | Callable[..., torch.Tensor] = "equal_mass", counts: torch.Tensor | None = None,
                     token_bias: bool = True, residual_rank: int = 0, seed: int = 0,
                     mode: Mode = "collapsed") -> VQLogitsHead:
        """A freshly initialised head; frequency-based maps need token ``counts`` (V,)."""
        hidden_size = _check_int("hidden_size", hidden_size, 1, "a positive integer (the width d of hidden states)")
        vocab_size = _check_int("vocab_size", vocab_size, 1, "a positive integer (the number of tokens V)")
        seed = _check_int("seed", seed, -(2**63), "an integer")
        if counts is not None:
            _check_counts(counts, vocab_size)
        m = build_mapping(mapping, vocab_size=vocab_size, num_codes=num_codes, counts=counts, seed=seed,
                          embeddings=torch.randn(vocab_size, hidden_size, generator=torch.Generator().manual_seed(seed)))
        head = cls(hidden_size, m, num_codes, token_bias=token_bias, residual_rank=residual_rank, mode=mode)
        if token_bias and counts is not None:
            head._init_bias_from_counts(counts)
        return head

    @classmethod
    def from_linear(cls, linear: nn.Linear, num_codes: int, *,
                    mapping: str | Callable[..., torch.Tensor] | torch.Tensor = "kmeans",
                    counts: torch.Tensor | None = None, token_bias: bool = True, residual_rank: int = 0,
                    bias_init: Literal["zeros", "unigram"] = "zeros", seed: int = 0,
                    mode: Mode = "collapsed") -> VQLogitsHead:
        """Compress a trained output layer (the paper's Option A): codes are the mean output embedding of their
        tokens; the bias starts at the layer's own bias (or 0) and, with ``bias_init="unigram"``, adds each
        token's log-share of its cluster's unigram mass from ``counts`` (useful from scratch with dense counts; on a
        pretrained head with counts from little text it penalises every unseen token, measured 11x worse)."""
        if bias_init not in ("zeros", "unigram") or (bias_init == "unigram" and counts is None):
            raise ValueError(f"bias_init={bias_init!r} is invalid: expected 'zeros', or 'unigram' with counts=(V,)")
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear={type(linear).__name__} is invalid: expected an nn.Linear output layer (V x d)")
        weight = linear.weight.detach()
        vocab_size, hidden_size = weight.shape
        num_codes = _check_int("num_codes", num_codes, 1, f"1 <= num_codes <= V={vocab_size} (the layer's outputs)")
        if num_codes > vocab_size:
            raise ValueError(bad_value("num_codes", num_codes, f"1 <= num_codes <= V={vocab_size} (the layer's "
                                       "outputs)"))
        if counts is not None:
            _check_counts(counts, vocab_size)
        if isinstance(mapping, torch.Tensor):
            m = validate_mapping(mapping, vocab_size, num_codes)
        else:
            m = build_mapping(mapping, vocab_size=vocab_size, num_codes=num_codes, embeddings=weight, counts=counts,
                              seed=seed)
        head = cls(hidden_size, m.to(weight.device), num_codes, token_bias=token_bias, residual_rank=residual_rank,
                   mode=mode, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            sums = torch.zeros(num_codes, hidden_size, dtype=torch.float64, device=weight.device)
            sums.index_add_(0, head.mapping, weight.double())
            n = torch.bincount(head.mapping, minlength=num_codes).clamp_min(1).unsqueeze(1)
            head.codebook.copy_((sums / n).to(weight.dtype))
            if token_bias and bias_init == "unigram" and counts is not None:
                head._init_bias_from_counts(counts)
            if head.bias is not None and linear.bias is not None:
                head.bias.add_(linear.bias.detach())
            if residual_rank:
                head._init_residual_from(weight)
        return head

    def _init_residual_from(self, weight: torch.Tensor) -> None:
        """Rank-r SVD of what the codes discard, ``W - C[M]``: then ``u_v . P h`` is the best rank-r stand-in for
        the original within-cluster logit differences ``(w_v - c_k) . h``."""
        proj, emb = self._residual()
        residual = weight.double() - self.codebook.detach().double()[self.mapping]
        u, s, v = torch.svd_lowrank(residual, q=min(self.residual_rank + 8, *residual.shape), niter=4,
                                    M=None)
        r = self.residual_rank
        emb.copy_((u[:, :r] * s[:r]).to(emb.dtype))
        proj.copy_(v[:, :r].t().to(proj.dtype))

    def _residual(self) -> tuple[nn.Parameter, nn.Parameter]:
        """``(residual_proj, residual_emb)``; only called when ``residual_rank`` > 0, which creates both."""
        assert self.residual_proj is not None and self.residual_emb is not None, "residual_rank is 0"
        return self.residual_proj, self.residual_emb

    def _init_bias_from_counts(self, counts: torch.Tensor) -> None:
        assert self.bias is not None, "called only with token_bias=True"
        with torch.no_grad():
            p = counts.double().to(self.mapping.device) + 0.5
            mass = torch.zeros(self.num_codes, dtype=torch.float64, device=p.device).index_add(0, self.mapping, p)
            self.bias.copy_((p / mass[self.mapping]).log().to(self.bias.dtype))

    # --- checks ----------------------------------------------------------------------------------------------
    def _flat(self, hidden: Any) -> torch.Tensor:
        """hidden (..., d) floating point in the head's dtype (or under autocast), finite: as (N, d)."""
        expected = f"a floating-point tensor of shape (..., {self.hidden_size})"
        if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point():
            raise TypeError(bad_value("hidden", _shown(hidden), expected, "pass the trunk's hidden states"))
        if hidden.dim() < 1:
            raise ValueError(bad_value("hidden", _shown(hidden), expected))
        if hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden has size {hidden.shape[-1]} in its last dimension: expected {self.hidden_size} "
                             "(the head's hidden_size); pass the states of the model this head was built for")
        dtype = self.codebook.dtype
        if hidden.dtype != dtype and not torch.is_autocast_enabled(hidden.device.type):
            raise TypeError(bad_value("hidden", _shown(hidden), f"dtype {dtype} (the head's parameters)",
                                      "cast with hidden.to(head.codebook.dtype), or run under torch.autocast"))
        if not torch.isfinite(hidden).all():
            raise ValueError("hidden contains NaN or inf: the trunk diverged or received bad inputs; "
                             "check the learning rate and mixed-precision settings")
        return hidden.reshape(-1, self.hidden_size)

    def _check_tokens(self, tokens: Any, name: str, n: int, ignore_index: int | None = None) -> torch.Tensor:
        """tokens (...) integer, ``n`` of them, in [0, V) or ``ignore_index``: flat int64 (one host sync)."""
        if not isinstance(tokens, torch.Tensor) or not VF._is_integer_dtype(tokens.dtype):
            raise TypeError(bad_value(name, _shown(tokens), f"an integer tensor of {n} token ids, shape hidden[:-1]",
                                      "cast it with .long()"))
        flat = tokens.reshape(-1)
        if flat.numel() != n:
            raise ValueError(f"{name} has {flat.numel()} entries for {n} hidden states: shapes must match "
                             f"({name}: hidden.shape[:-1])")
        bad = (flat < 0) | (flat >= self.vocab_size)
        if ignore_index is not None:
            bad &= flat != ignore_index
        if bad.any():
            raise ValueError(VF._token_range_message(flat, name, self.vocab_size, ignore_index))
        return flat.long()

    # --- computations ----------------------------------------------------------------------------------------
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Materialised logits (..., V): the drop-in ``nn.Linear`` behaviour (O(N V) memory)."""
        return self.logits(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., V) logits whose softmax is the head's distribution (log-probs when ``residual_rank`` > 0)."""
        flat = self._flat(hidden)
        if self.residual_rank:
            out = VF._residual_log_probs(flat, self.codebook, self.mapping, self.bias, *self._residual())
        else:
            out = VF._materialized_logits(flat, self.codebook, self.mapping, self.bias)
        return out.reshape(*hidden.shape[:-1], self.vocab_size)

    def layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens grouped by cluster and the cluster offsets, rebuilt only when the map changes."""
        key = (self.mapping._version, id(self.mapping))
        if self._layout is None or self._layout[0] != key:
            self._layout = (key, VF._cluster_layout(self.mapping, self.num_codes))
        return self._layout[1]

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
             reduction: VF.Reduction = "mean") -> torch.Tensor:
        """Cross-entropy over the full vocabulary (exact); hidden (..., d), labels (...) in [0, V) or
        ``ignore_index``. With no label counting (empty batch, all ignored) "mean" is nan, as F.cross_entropy."""
        VF._check_reduction(reduction)
        ignore_index = VF._check_ignore_index(ignore_index)
        flat = self._flat(hidden)
        y = self._check_tokens(labels, "labels", flat.shape[0], ignore_index)
        if self.mode == "gather":
            logits = self.logits(flat)
            out = torch.nn.functional.cross_entropy(logits, y, ignore_index=ignore_index, reduction=reduction)
        elif self.residual_rank:
            out = VF._residual_nll(flat, self.codebook, self.mapping, y, self.bias, *self._residual(), self.layout(),
                                   ignore_index, reduction)
        else:
            out = VF._collapsed_nll(flat, self.codebook, self.mapping, y, self.bias, ignore_index, reduction)
        return out.reshape(labels.shape) if reduction == "none" else out

    def log_prob(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``log p(tokens | hidden)``: shape of ``tokens``."""
        flat = self._flat(hidden)
        t = self._check_tokens(tokens, "tokens", flat.shape[0])
        if self.residual_rank:
            nll = VF._residual_nll(flat, self.codebook, self.mapping, t, self.bias, *self._residual(), self.layout(),
                                   None, "none")
        else:
            nll = VF._collapsed_nll(flat, self.codebook, self.mapping, t, self.bias, None, "none")
        return (-nll).reshape(tokens.shape)

    def tables(self) -> VF.ClusterTables:
        """Decoding tables, rebuilt only when the bias or map changed (O(V log V) once, not per token)."""
        key = (self.mapping._version, id(self.mapping), *((self.bias._version, id(self.bias)) if self.bias is not None else ()))
        if self._tables is None or self._tables[0] != key:
            self._tables = (key, VF.ClusterTables.build(self.mapping, self.num_codes, self.bias))
        return self._tables[1]

    @torch.no_grad()
    def argmax(self, hidden: torch.Tensor) -> torch.Tensor:
        """Greedy token ids: shape ``hidden.shape[:-1]``."""
        if self.residual_rank:
            return self.logits(hidden).argmax(-1)
        return VF.collapsed_argmax(self._flat(hidden), self.codebook, self.tables()).reshape(hidden.shape[:-1])

    @torch.no_grad()
    def sample(self, hidden: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Token ids drawn from ``softmax(logits / temperature)`` with HF-style top-k/top-p: ``hidden.shape[:-1]``.
        temperature: finite > 0; top_k: None or >= 1; top_p: None or in (0, 1]."""
        temperature, top_k, top_p = VF._check_sampling(temperature, top_k, top_p)
        if self.residual_rank:
            out = VF.dense_sample(self.logits(self._flat(hidden)), temperature=temperature, top_k=top_k, top_p=top_p,
                                  generator=generator)
        else:
            out = VF.collapsed_sample(self._flat(hidden), self.codebook, self.tables(), temperature=temperature,
                                      top_k=top_k, top_p=top_p, generator=generator)
        return out.reshape(hidden.shape[:-1])

    # --- a learned map ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def token_vectors(self) -> torch.Tensor:
        """Each token's output vector as the head scores it, ``c_{M(v)} + P^T u_v``: (V, d), detached.

        Without ``residual_rank`` every token of a cluster has the same vector (its code), so a map can only be
        learned from the head's own state when the residual term exists: ``u_v`` is then the part of token v that
        its code does not explain, which is what says where it belongs (see ``sigma.reassign_mapping``)."""
        vectors = self.codebook.detach()[self.mapping]
        if self.residual_rank:
            proj, emb = self._residual()
            vectors = vectors + emb.detach() @ proj.detach()
        return vectors

    @torch.no_grad()
    def reassign(self, mapping: torch.Tensor, *, anchor: torch.Tensor | None = None) -> int:
        """Move tokens to new codes in place: ``mapping`` (V,) integer in [0, K); returns how many moved.

        A moved token keeps, as far as the head can represent it, the scores it had: with ``anchor`` (d,), a
        typical hidden state such as the mean, its logit at ``anchor`` is unchanged (the bias absorbs
        ``(c_old - c_new) . anchor``); with ``residual_rank`` its vector ``c + P^T u`` moves by the least-squares
        projection of ``c_old - c_new`` onto P's rows. Parameters stay the same tensors (an optimiser keeps
        them); the cached layout and decoding tables are rebuilt on next use, so the loss, log-probs and
        decoding stay exact for the new map."""
        new = validate_mapping(mapping, self.vocab_size, self.num_codes).to(self.mapping.device)
        if anchor is not None:
            _check_anchor(anchor, self.hidden_size)
        moved = (new != self.mapping).nonzero().squeeze(1)
        if moved.numel() == 0:
            return 0
        delta = (self.codebook[self.mapping[moved]] - self.codebook[new[moved]]).double()  # (n, d)
        shift = torch.zeros(moved.numel(), dtype=torch.float64, device=delta.device)
        if anchor is not None:
            shift += delta @ anchor.double()
        if self.residual_rank:
            proj, emb = self._residual()
            du = delta @ torch.linalg.pinv(proj.double())  # (n, r): u P closest to delta
            emb[moved] += du.to(emb.dtype)
            if anchor is not None:
                shift -= du @ (proj.double() @ anchor.double())
        if self.bias is not None:
            self.bias[moved] += shift.to(self.bias.dtype)
        self.mapping.copy_(new)
        self._layout = self._tables = None
        return int(moved.numel())

    # --- accounting ------------------------------------------------------------------------------------------
    def parameter_counts(self) -> dict[str, int]:
        """Stored numbers of the head: codebook K*d, bias V (if any), map V (an index per token)."""
        counts = {"codebook": self.codebook.numel(), "bias": self.bias.numel() if self.bias is not None else 0,
                  "mapping": self.mapping.numel(),
                  "residual": sum(p.numel() for p in (self.residual_proj, self.residual_emb) if p is not None)}
        counts["total"] = sum(counts.values())
        return counts

    def unigram_floor(self, counts: torch.Tensor) -> float:
        """Excess loss floor (nats) this map imposes without a bias; 0 with a bias (see ``mapping.unigram_floor``)."""
        _check_counts(counts, self.vocab_size)
        return 0.0 if self.bias is not None or self.residual_rank else unigram_floor(counts, self.mapping.cpu(), self.num_codes)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, vocab_size={self.vocab_size}, num_codes={self.num_codes}, "
                f"token_bias={self.bias is not None}, residual_rank={self.residual_rank}, mode={self.mode!r}")


def _check_anchor(anchor: Any, d: int) -> None:
    expected = f"None or a finite floating-point tensor of shape (d,) = ({d},)"
    if not isinstance(anchor, torch.Tensor) or not anchor.is_floating_point():
        raise TypeError(bad_value("anchor", _shown(anchor), expected, "pass the mean hidden state"))
    if tuple(anchor.shape) != (d,) or not bool(torch.isfinite(anchor).all()):
        raise ValueError(bad_value("anchor", _shown(anchor), expected, "pass the mean hidden state"))
