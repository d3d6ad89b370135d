"""Naive reference implementations that the fast paths are tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def vq_logits_reference(hidden: torch.Tensor, codebook: torch.Tensor, mapping: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """Materialised VQ-Logits logits: the full (N, V) matrix ``h C^T`` gathered by the map, plus the bias."""
    logits = (hidden @ codebook.t())[:, mapping]
    return logits if bias is None else logits + bias


def vq_cross_entropy_reference(hidden, codebook, mapping, labels, bias=None, ignore_index=-100, reduction="mean"):
    logits = vq_logits_reference(hidden, codebook, mapping, bias)
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)


def residual_log_probs_reference(hidden, codebook, mapping, bias, proj, emb) -> torch.Tensor:
    """log p(v | h) of the factorised head, cluster by cluster with explicit loops: (N, V)."""
    z = hidden @ codebook.t()
    b = torch.zeros(mapping.numel(), dtype=hidden.dtype) if bias is None else bias
    scores = b + (hidden @ proj.t()) @ emb.t()
    out = torch.full_like(scores, -float("inf"))
    cluster_logits = torch.stack([z[:, k] + torch.logsumexp(b[mapping == k], 0) if (mapping == k).any()
                                  else torch.full_like(z[:, k], -float("inf")) for k in range(codebook.shape[0])], 1)  # fmt: skip
    log_pk = torch.log_softmax(cluster_logits, dim=-1)
    for k in range(codebook.shape[0]):
        members = (mapping == k).nonzero().squeeze(1)
        if members.numel():
            out[:, members] = log_pk[:, k : k + 1] + torch.log_softmax(scores[:, members], dim=-1)
    return out


def nucleus_mask_reference(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Tokens kept by top-p with ties kept whole: every token whose logit is >= the largest value ``u`` such that
    the tokens with logit >= ``u`` hold probability >= ``top_p``. Without ties this is Hugging Face's
    ``TopPLogitsWarper``; with ties HF keeps an index-order-dependent part of the boundary tie group."""
    probs = torch.softmax(scores, dim=-1)
    keep = torch.zeros_like(scores, dtype=torch.bool)
    for i in range(scores.shape[0]):
        for u in torch.unique(scores[i][torch.isfinite(scores[i])]).flip(0):
            if probs[i][scores[i] >= u].sum() >= top_p:
                keep[i] = scores[i] >= u
                break
    return keep


def warped_probs_reference(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                           top_p: float | None = None) -> torch.Tensor:  # fmt: skip
    """Sampling distribution after temperature -> top-k -> top-p, as ``transformers``' logits warpers apply them
    (the temperature and top-k warpers are used directly; top-p via :func:`nucleus_mask_reference`): (N, V)."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper

    scores = logits.clone()
    ids = torch.zeros(scores.shape[0], 1, dtype=torch.long)
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(ids, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    if top_p is not None and top_p < 1.0:
        scores = scores.masked_fill(~nucleus_mask_reference(scores, top_p), -float("inf"))
    return torch.softmax(scores, dim=-1)
