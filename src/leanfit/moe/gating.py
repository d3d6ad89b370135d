"""Top-K softmax gating and the router losses of sparse mixture-of-experts layers.

Conventions in use (all computed in float32 or wider, whatever the input dtype):

- Mixtral (and Qwen3-MoE): softmax over all E logits, keep the top K, renormalise them. This equals the softmax over
  the K selected logits, i.e. the paper's restricted softmax (``renormalize=True``, the default).
- Qwen2-MoE, OLMoE (``norm_topk_prob=False``): softmax over all E, keep the top K unnormalised
  (``renormalize=False``); the kept weights sum to less than 1.
- The paper (arXiv 2309.13850) writes the selection on the slope part ``beta_1 . x`` only while the weights use the
  full logits; pass those selection scores as ``selection_logits``. Selecting on the full logits is what the
  practical layers do.

Ties in the selection are broken by ``torch.topk`` (implementation-defined order); every row keeps exactly K experts.
"""

from __future__ import annotations

import torch

__all__ = ["router_z_loss", "switch_load_balancing_loss", "topk_softmax_gate"]


def _check_k(k: int, num_experts: int) -> None:
    if not isinstance(k, int) or not 1 <= k <= num_experts:
        raise ValueError(f"top_k={k!r} is invalid: expected an integer in [1, num_experts={num_experts}]")


def topk_softmax_gate(logits: torch.Tensor, k: int, *, renormalize: bool = True,
                      selection_logits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Top-K softmax gate. logits: (T, E). Returns (weights (T, E) float32+, zero outside the K selected experts;
    indices (T, K) of the selected experts, in descending selection order)."""
    if logits.dim() != 2:
        raise ValueError(f"logits has shape {tuple(logits.shape)}: expected (tokens, num_experts)")
    _check_k(k, logits.shape[-1])
    logits = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    score = logits if selection_logits is None else selection_logits.to(logits.dtype)
    if score.shape != logits.shape:
        raise ValueError(f"selection_logits has shape {tuple(score.shape)}: expected {tuple(logits.shape)}")
    indices = score.topk(k, dim=-1).indices
    chosen = logits.gather(1, indices)
    if renormalize:  # the softmax restricted to the selected experts, computed stably in log space
        top = torch.softmax(chosen, dim=-1)
    else:
        top = (chosen - torch.logsumexp(logits, dim=-1, keepdim=True)).exp()
    return torch.zeros_like(logits).scatter(1, indices, top), indices


def _token_mask(padding_mask: torch.Tensor | None, tokens: int, like: torch.Tensor) -> torch.Tensor:
    if padding_mask is None:
        return torch.ones(tokens, dtype=like.dtype, device=like.device)
    mask = padding_mask.reshape(-1).to(like.dtype)
    if mask.numel() != tokens:
        raise ValueError(f"padding_mask has {mask.numel()} entries for {tokens} tokens: shapes must match")
    return mask


def switch_load_balancing_loss(router_logits: torch.Tensor, expert_indices: torch.Tensor, num_experts: int,
                               padding_mask: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Switch Transformer load-balancing loss ``E * sum_e f_e P_e`` over non-padding tokens: ``f_e`` the fraction of
    (token, slot) assignments sent to expert e per token (summing to K, as Hugging Face counts it), ``P_e`` the mean
    router probability. router_logits: (T, E); expert_indices: (T, K); padding_mask: (T,) with 1 for real tokens."""
    logits = router_logits.float() if router_logits.dtype != torch.float64 else router_logits
    probs = torch.softmax(logits, dim=-1)
    mask = _token_mask(padding_mask, logits.shape[0], probs)
    k = expert_indices.shape[-1]
    counts = torch.zeros(num_experts, dtype=probs.dtype, device=probs.device)
    counts = counts.scatter_add(0, expert_indices.reshape(-1), mask.repeat_interleave(k))
    total = mask.sum()
    return num_experts * ((counts / total) * ((probs * mask[:, None]).sum(0) / total)).sum()


def router_z_loss(router_logits: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over non-padding tokens of ``logsumexp(logits)^2``. router_logits: (T, E)."""
    logits = router_logits.float() if router_logits.dtype != torch.float64 else router_logits
    z = torch.logsumexp(logits, dim=-1) ** 2
    mask = _token_mask(padding_mask, logits.shape[0], z)
    return (z * mask).sum() / mask.sum()
