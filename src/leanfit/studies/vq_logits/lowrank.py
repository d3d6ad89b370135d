"""Parameter budgets of compressed output layers and the Sigma-weighted low-rank factorisation they are measured
against (the baseline of ``vq-logits-pretrained``)."""

from __future__ import annotations

import torch
from torch import nn

from leanfit.vq_logits.sigma import sigma_roots

__all__ = ["LowRankHead", "budget", "rank_for", "sigma_svd", "vq_shape"]


def budget(vocab: int, d: int, reduction: float) -> int:
    """Head parameters allowed at ``reduction`` (%) of ``V d``: ``floor((1 - reduction/100) V d)``."""
    return int((1 - reduction / 100) * vocab * d)


def vq_shape(vocab: int, d: int, params: int, *, bias: bool = True, rank: int = 0) -> int:
    """Largest K whose VQ head (K d codebook + V map + V bias if any + r (V + d)) fits in ``params``, in [1, V]."""
    fixed = vocab * (2 if bias else 1) + rank * (vocab + d)
    return max(1, min(vocab, (params - fixed) // d))


def rank_for(vocab: int, d: int, params: int) -> int:
    """Largest rank r of ``A (V, r) B (r, d)`` that fits in ``params``; at least 1."""
    return max(1, params // (vocab + d))


def sigma_svd(weight: torch.Tensor, second_moment: torch.Tensor, rank: int,
              ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (V, r), B (r, d)), float64: ``A B`` is the best rank-r approximation of ``W`` (V, d) in the metric of
    the hidden states, the truncated SVD of ``W S^{1/2}`` mapped back by ``S^{-1/2}`` (``S`` = ``second_moment``
    + ridge, :func:`leanfit.vq_logits.sigma.sigma_roots`); it minimises ``E ||(W - A B) h||^2`` over rank r."""
    root, inv_root = sigma_roots(second_moment, ridge)
    u, s, vh = torch.linalg.svd(weight.double() @ root, full_matrices=False)
    return u[:, :rank] * s[:rank], vh[:rank] @ inv_root


class LowRankHead(nn.Module):
    """Output layer ``logits = (h B^T) A^T`` with A (V, r), B (r, d): ``r (V + d)`` parameters."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.a, self.b = nn.Parameter(a.detach().clone()), nn.Parameter(b.detach().clone())

    @classmethod
    def from_weight(cls, weight: torch.Tensor, second_moment: torch.Tensor, rank: int) -> LowRankHead:
        """The Sigma-weighted rank-r factorisation of ``weight`` (V, d), in its dtype."""
        a, b = sigma_svd(weight, second_moment, rank)
        return cls(a.to(weight.dtype), b.to(weight.dtype))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(n, V) float32 logits of hidden (n, d)."""
        return ((hidden.to(self.b.dtype) @ self.b.t()) @ self.a.t()).float()

    def parameter_count(self) -> int:
        return self.a.numel() + self.b.numel()
