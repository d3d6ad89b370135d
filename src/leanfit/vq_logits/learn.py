"""A token -> code map learned while a VQ head trains from scratch, with no full-softmax run to cluster.

The paper builds its map by clustering a trained full head's output embeddings, which needs that head first.
:class:`MapLearner` learns the map from what the training loop already has: the final hidden states and the
next tokens of each step. The criterion is the one of :mod:`leanfit.vq_logits.sigma`: a code may stand for a
token when its vector gives the token the same logits up to a constant, ``(w_v - c) . h`` constant over ``h``.
For a softmax over linear scores the stationary point ties a token's vector to the states that precede it,
``E[p(v | h) h] = E[1{y = v} h]``; in the linear-discriminant view ``w_v ~ S^{-1} (mu_v - mu)``, with ``mu_v`` the
mean state before token ``v`` and ``S`` the covariance of the states. The expected squared logit error
``(w_v - c_k)^T S (w_v - c_k)`` then becomes the Mahalanobis distance ``(mu_v - m_k)^T S^{-1} (mu_v - m_k)``
between the token's context mean and the pooled context mean ``m_k`` of the code's tokens. Every ``every`` steps
each movable token goes to the code of least distance (:func:`context_reassign`), and :meth:`VQLogitsHead.reassign`
moves it with its logit at the mean state kept, so the collapsed loss stays exact for the new map.

A rarely seen token's context mean is noise: it is shrunk towards its code's pooled mean with the weight of
``shrinkage`` observations, so a token moves only on evidence. The statistics cover the steps since the last
reassignment (the trunk changes while it trains): with ``checkpoint_every`` a multiple of ``every``, a resumed
run reassigns exactly as an uninterrupted one. Under ``torch.distributed`` the statistics are summed over
ranks before each reassignment, so every rank applies the same map.

Why not a library: clustering libraries (scikit-learn's k-means) cluster fixed vectors; here the vectors are
statistics of a changing trunk, the assignment must keep code identities (the codebook is trained), and a move
must update the head's bias so that its loss stays exact.
"""

from __future__ import annotations

from typing import Any

import torch

from leanfit.core.errors import bad_value
from leanfit.vq_logits.functional import _check_int, _check_tensor, _shown
from leanfit.vq_logits.head import VQLogitsHead
from leanfit.vq_logits.mapping import validate_mapping
from leanfit.vq_logits.sigma import _check_mask, _check_ridge, _nearest, sigma_roots

__all__ = ["MapLearner", "context_reassign"]


def _check_real(name: str, value: Any, expected: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= float(value) < float("inf"):
        raise ValueError(bad_value(name, _shown(value), expected))
    return float(value)


def context_reassign(sums: torch.Tensor, counts: torch.Tensor, mapping: torch.Tensor, covariance: torch.Tensor, *,
                     num_codes: int | None = None, shrinkage: float = 2.0, ridge: float = 1e-3,
                     movable: torch.Tensor | None = None) -> torch.Tensor:
    """Each movable token to the code whose pooled context mean is nearest its own (Mahalanobis under
    ``covariance``): the new map (V,).

    sums: (V, d) sum of the hidden states that preceded each token; counts: (V,) how many; mapping: (V,) the
    current map into ``num_codes`` codes (default ``mapping.max() + 1``); covariance: (d, d) of the states (a ridge of
    ``ridge * tr/d`` is added). A token's mean is shrunk to its code's pooled mean with weight ``shrinkage``
    observations (an unseen token stays). Codes with no observed state cannot be chosen by nearness; each code
    left with no token then takes the worst-fitted movable token (count x distance to its code) of a code shared
    with others, as k-means refills an empty cluster."""
    _check_tensor("sums", sums, dims=2, kind="float", shape="(V, d)")
    vocab_size, d = sums.shape
    _check_tensor("counts", counts, dims=1, kind="float", shape=f"(V,) = ({vocab_size},)")
    if counts.shape[0] != vocab_size or bool((counts < 0).any()):
        raise ValueError(bad_value("counts", _shown(counts), f"non-negative counts of shape (V,) = ({vocab_size},)"))
    _check_tensor("covariance", covariance, dims=2, kind="float", shape=f"(d, d) = ({d}, {d})")
    if tuple(covariance.shape) != (d, d):
        raise ValueError(bad_value("covariance", _shown(covariance), f"shape (d, d) = ({d}, {d}) to match sums"))
    shrinkage = _check_real("shrinkage", shrinkage, "a finite number >= 0 (observations)")
    ridge = _check_ridge(ridge)
    if num_codes is None:
        num_codes = int(mapping.max()) + 1 if isinstance(mapping, torch.Tensor) and mapping.numel() else 1
    num_codes = _check_int("num_codes", num_codes, 1, "a positive number of codes")
    mapping = validate_mapping(mapping, vocab_size, num_codes).to(sums.device)
    movable = _check_mask("movable", movable, vocab_size, "V", sums.device)
    s, n = sums.double(), counts.double().to(sums.device)
    code_sum = torch.zeros(num_codes, d, dtype=torch.float64, device=s.device).index_add(0, mapping, s)
    code_n = torch.zeros(num_codes, dtype=torch.float64, device=s.device).index_add(0, mapping, n)
    seen = code_n > 0
    code_mean = code_sum / code_n.clamp_min(1e-300)[:, None]
    token_mean = (s + shrinkage * code_mean[mapping]) / (n + shrinkage).clamp_min(1e-300)[:, None]
    _, inv_root = sigma_roots(covariance.double().to(s.device), ridge)
    out = mapping.clone()
    rows = (movable.to(s.device) & (n > 0)).nonzero().squeeze(1)
    if not rows.numel():
        return out
    z_code, z_rows = code_mean[seen] @ inv_root, token_mean[rows] @ inv_root
    nearest = _nearest(z_rows, z_code)  # index among the seen codes
    out[rows] = seen.nonzero().squeeze(1)[nearest]
    # a code left with no token gets the worst-fitted token of a shared code (weight x distance),
    # as k-means refills an empty cluster: else two groups could share a code for good while another idles
    cost = n[rows] * ((z_rows - z_code[nearest]) ** 2).sum(-1)
    sizes = torch.bincount(out, minlength=num_codes)
    for k in (sizes == 0).nonzero().squeeze(1).tolist():
        shared = sizes[out[rows]] > 1
        pick = cost.masked_fill(~shared, -1.0).argmax()
        if cost[pick] <= 0 or not shared[pick]:
            break
        sizes[out[rows[pick]]] -= 1
        sizes[k] += 1
        out[rows[pick]], cost[pick] = k, -1.0
    return out


class MapLearner:
    """Learns ``head``'s token -> code map during training (see the module docstring for the criterion).

    Call :meth:`observe` once per training step with that step's final hidden states and next tokens, before
    the head's loss: every ``every`` calls it reassigns the map from the states seen since the last
    reassignment and returns how many tokens moved (0 on other calls). Frozen tokens (``movable`` False, e.g.
    the most frequent ones holding codes of their own) keep their code.

    The defaults were chosen on validation loss (tiny Llama, d = 128, V = 8,192, K = 64, 2,400 steps, seed 0;
    perplexity ratio to a full softmax): every 100 / shrinkage 8: 1.331, 100 / 2: 1.289, 200 / 8: 1.293,
    200 / 2: 1.277; freezing the equal-mass singletons (1.353) or stopping the moves at 75% of the steps (1.340)
    did not help.

    >>> learner = MapLearner(model.get_output_embeddings(), every=200)
    >>> hidden = model.get_decoder()(input_ids=x).last_hidden_state
    >>> learner.observe(hidden, y)          # in training steps only
    >>> loss = model.get_output_embeddings().loss(hidden, y)
    """

    def __init__(self, head: VQLogitsHead, *, every: int = 200, shrinkage: float = 2.0, ridge: float = 1e-3,
                 movable: torch.Tensor | None = None, ignore_index: int = -100) -> None:
        if not isinstance(head, VQLogitsHead):
            raise TypeError(bad_value("head", _shown(head), "a VQLogitsHead",
                                      "pass model.get_output_embeddings() of a VQ model"))
        self.head = head
        self.every = _check_int("every", every, 1, "a positive number of training steps between reassignments")
        self.shrinkage = _check_real("shrinkage", shrinkage, "a finite number >= 0 (observations)")
        self.ridge = _check_ridge(ridge)
        v, d = head.vocab_size, head.hidden_size
        if movable is not None:
            _check_mask("movable", movable, v, "V", head.codebook.device)
        self.movable = movable
        self.ignore_index = ignore_index
        device = head.codebook.device
        self._sums = torch.zeros(v, d, dtype=torch.float32, device=device)
        self._counts = torch.zeros(v, dtype=torch.float64, device=device)
        self._total = torch.zeros(d, dtype=torch.float64, device=device)
        self._second = torch.zeros(d, d, dtype=torch.float64, device=device)
        self.steps = 0
        self.moved: list[int] = []  # tokens moved at each reassignment

    @torch.no_grad()
    def observe(self, hidden: torch.Tensor, labels: torch.Tensor) -> int:
        """Add one step's states (..., d) and next tokens (...) (``ignore_index`` skipped); reassign when due."""
        _check_tensor("hidden", hidden, dims=hidden.dim() if isinstance(hidden, torch.Tensor) else 2, kind="float",
                      shape="(..., d)")
        if hidden.dim() < 1 or hidden.shape[-1] != self.head.hidden_size:
            raise ValueError(bad_value("hidden", _shown(hidden), f"shape (..., d) = (..., {self.head.hidden_size})"))
        if isinstance(labels, torch.Tensor) and (labels.is_floating_point() or labels.dtype == torch.bool):
            raise TypeError(bad_value("labels", _shown(labels), "an integer tensor of token ids", "cast it with .long()"))
        if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != tuple(hidden.shape[:-1]):
            raise ValueError(bad_value("labels", _shown(labels), f"an integer tensor of shape {tuple(hidden.shape[:-1])} "
                                       "(hidden's leading dimensions)"))
        h = hidden.detach().reshape(-1, hidden.shape[-1])
        y = labels.reshape(-1).to(h.device)
        keep = y != self.ignore_index
        h, y = h[keep], y[keep]
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.head.vocab_size):
            raise ValueError(bad_value("labels", _shown(labels), f"token ids in [0, {self.head.vocab_size}) or "
                                       f"{self.ignore_index} (ignored)"))
        self._sums.index_add_(0, y, h.float())
        self._counts.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
        hd = h.double()
        self._total += hd.sum(0)
        self._second += hd.t() @ hd
        self.steps += 1
        if self.steps % self.every:
            return 0
        return self.reassign()

    @torch.no_grad()
    def reassign(self) -> int:
        """Reassign now from the statistics gathered so far, then start new ones; returns the tokens moved."""
        stats = [self._sums, self._counts, self._total, self._second]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for t in stats:
                torch.distributed.all_reduce(t)
        n = float(self._counts.sum())
        moved = 0
        if n > 1:
            mean = self._total / n
            covariance = self._second / n - torch.outer(mean, mean)
            new = context_reassign(self._sums, self._counts, self.head.mapping, covariance,
                                   num_codes=self.head.num_codes, shrinkage=self.shrinkage, ridge=self.ridge, movable=self.movable)
            moved = self.head.reassign(new, anchor=mean.to(self.head.codebook.dtype))
        for t in stats:
            t.zero_()
        self.moved.append(moved)
        return moved

    def state_dict(self) -> dict[str, Any]:
        """The statistics since the last reassignment and the step counter (for ``Accelerator.register_for_checkpointing``)."""
        return {"sums": self._sums.clone(), "counts": self._counts.clone(), "total": self._total.clone(),
                "second": self._second.clone(), "steps": self.steps, "moved": list(self.moved)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("sums", "counts", "total", "second"):
            getattr(self, f"_{name}").copy_(state[name])
        self.steps, self.moved = int(state["steps"]), list(state["moved"])
