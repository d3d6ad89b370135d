"""Top-K softmax gating and the router losses of sparse mixture-of-experts layers.

Conventions in use (weights are computed in float32, or float64 for float64 logits, whatever the input dtype):

- Mixtral, Qwen3-MoE (``renormalize=True``, the default): softmax over all E logits, keep the K largest, divide by
  their sum. This equals the softmax over the K selected logits, which is how it is computed here (stable in log
  space, and never 0/0).
- Qwen2-MoE, OLMoE (``norm_topk_prob=False``; ``renormalize=False``): softmax over all E logits, keep the K largest
  unnormalised; the kept weights sum to less than 1 (a softmax over the K kept logits would be the other convention).
- The paper (Nguyen et al., arXiv 2309.13850): the weights are the softmax over the selected set, as with
  ``renormalize=True``, but the set is chosen by the slope part ``beta_1 . x`` only, without the intercepts. Pass
  those selection scores as ``selection_logits``; by default the set is chosen on the full logits, as practical
  layers do.

The set is chosen by ``torch.topk`` on the selection scores (on the logits themselves, not on the softmax, which can
round distinct logits to equal probabilities); ties are broken by ``topk`` (implementation-defined order), and every
row keeps exactly K experts. A kept weight is 0 only when it underflows (logits more than ~100 apart in float32).
"""

from __future__ import annotations

import torch

from leanfit.core.errors import bad_value

__all__ = ["router_z_loss", "switch_load_balancing_loss", "topk_softmax_gate"]


def check_top_k(top_k: object, num_experts: int) -> None:
    """Raise ``ValueError`` unless ``1 <= top_k <= num_experts`` (an int)."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k!r} is invalid for num_experts={num_experts}: expected an integer with "
                         f"1 <= top_k <= num_experts; pass top_k between 1 and {num_experts} (top_k={num_experts} "
                         "routes every token to every expert)")


def check_scores(name: str, x: object, real: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` as a (tokens, experts) tensor whose rows are finite (only the real tokens' rows, given ``real``);
    TypeError for a non-tensor, ValueError otherwise. One host synchronisation (the finiteness check)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(bad_value(name, type(x).__name__, "a (tokens, num_experts) tensor", "pass a torch tensor"))
    if x.dim() != 2:
        raise ValueError(f"{name} has shape {tuple(x.shape)}: expected (tokens, num_experts); reshape to 2-D")
    bad = ~torch.isfinite(x).all(-1)
    if real is not None:
        bad &= real
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise ValueError(bad_value(name, f"<NaN/inf in token {i}>", "finite values for every real token",
                                   "check the router's input and weights (or mark the token as padding)"))
    return x


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 at least (router arithmetic is never done in half precision)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def topk_gate_weights(logits: torch.Tensor, k: int, *, selection_logits: torch.Tensor | None = None,
                      renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The K kept gate weights in compact form. logits: (T, E); selection_logits: (T, E) or None (select on
    ``logits``). Returns (weights (T, K) float32 or float64, indices (T, K) int64), in descending selection order.
    NaN or infinite logits are refused (ValueError naming the token)."""
    check_scores("logits", logits)
    if selection_logits is not None:
        check_scores("selection_logits", selection_logits)
    return _topk_gate_weights(logits, k, selection_logits=selection_logits, renormalize=renormalize)


def _topk_gate_weights(logits: torch.Tensor, k: int, *, selection_logits: torch.Tensor | None = None,
                       renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`topk_gate_weights` without the finiteness checks (the layer checks its real tokens itself: padding
    rows may hold anything)."""
    if logits.dim() != 2:
        raise ValueError(f"logits has shape {tuple(logits.shape)}: expected (tokens, num_experts); reshape to 2-D")
    check_top_k(k, logits.shape[-1])
    logits = _wide(logits)
    if selection_logits is not None and selection_logits.shape != logits.shape:
        raise ValueError(f"selection_logits has shape {tuple(selection_logits.shape)}: expected the shape of logits "
                         f"{tuple(logits.shape)}")
    score = logits if selection_logits is None else selection_logits
    indices = score.topk(k, dim=-1, sorted=True).indices
    chosen = logits.gather(1, indices)
    # exp(x - logsumexp) rather than torch.softmax: the same numbers, and several times faster on CPU for short rows
    norm = torch.logsumexp(chosen if renormalize else logits, dim=-1, keepdim=True)
    return (chosen - norm).exp(), indices


def topk_softmax_gate(logits: torch.Tensor, k: int, *, selection_logits: torch.Tensor | None = None,
                      renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-K softmax gate (conventions in the module docstring).

    logits: (T, E); selection_logits: (T, E) scores that choose the K experts (default: ``logits``).
    Returns (weights (T, E) float32 or float64, zero outside the K selected experts, rows summing to 1 when
    ``renormalize``; indices (T, K) of the selected experts in descending selection order)."""
    top, indices = topk_gate_weights(logits, k, selection_logits=selection_logits, renormalize=renormalize)
    return torch.zeros(logits.shape, dtype=top.dtype, device=top.device).scatter(1, indices, top), indices


def real_token_mask(padding_mask: torch.Tensor | None, tokens: int, device: torch.device) -> torch.Tensor | None:
    """padding_mask (any shape with ``tokens`` entries, 1/True for real tokens) as a flat bool (T,), or None."""
    if padding_mask is None:
        return None
    if padding_mask.numel() != tokens:
        raise ValueError(f"padding_mask has {padding_mask.numel()} entries (shape {tuple(padding_mask.shape)}) for "
                         f"{tokens} tokens: expected one entry per token, 1 for real tokens and 0 for padding")
    return padding_mask.reshape(-1).to(device) != 0


def _check_balance_inputs(router_probs: object, expert_indices: object, num_experts: object,
                          padding_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Shapes, dtypes, ranges and finiteness (real tokens only) of the load-balancing loss's inputs; the mask."""
    if not isinstance(expert_indices, torch.Tensor):
        raise TypeError(bad_value("expert_indices", type(expert_indices).__name__, "an int64 (tokens, K) tensor",
                                  "pass the indices returned by topk_softmax_gate"))
    if expert_indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(bad_value("expert_indices.dtype", expert_indices.dtype, "an integer dtype (int64)",
                                  "pass the indices returned by topk_softmax_gate"))
    if expert_indices.dim() != 2:
        raise ValueError(bad_value("expert_indices.shape", tuple(expert_indices.shape), "(tokens, K)",
                                   "pass the indices returned by topk_softmax_gate"))
    tokens = expert_indices.shape[0]
    real = real_token_mask(padding_mask, tokens, expert_indices.device)
    probs = check_scores("router_probs", router_probs, real)
    if probs.shape[0] != tokens:
        raise ValueError(bad_value("expert_indices.shape", tuple(expert_indices.shape), f"({probs.shape[0]}, K), "
                                   f"one row per token of router_probs {tuple(probs.shape)}",
                                   "pass the probabilities and indices of the same tokens"))
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts != probs.shape[1]:
        raise ValueError(bad_value("num_experts", num_experts, f"router_probs.shape[1] = {probs.shape[1]}",
                                   "pass the number of experts the router scores"))
    if expert_indices.numel():
        low, high = (int(v) for v in torch.stack([expert_indices.min(), expert_indices.max()]).tolist())
        if low < 0 or high >= num_experts:
            raise ValueError(bad_value("expert_indices", f"<range [{low}, {high}]>", f"indices in [0, {num_experts})",
                                       "pass the indices returned by topk_softmax_gate"))
    return real


def switch_load_balancing_loss(router_probs: torch.Tensor, expert_indices: torch.Tensor, num_experts: int,
                               padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch Transformer load-balancing loss ``E * sum_e f_e P_e`` over the real (non-padding) tokens, as Hugging
    Face's ``load_balancing_loss_func`` computes it: ``f_e`` is the number of (token, slot) assignments to expert e
    per token (the f_e sum to K, so a perfectly balanced router scores K), ``P_e`` the mean router probability.

    router_probs: (T, E), the softmax of the router logits over all experts (not the kept top-K weights);
    expert_indices: (T, K); padding_mask: T entries, 1 for real tokens (e.g. an attention mask (B, S)).
    Gradients flow through ``router_probs`` only. A batch with no real token gives 0."""
    real = _check_balance_inputs(router_probs, expert_indices, num_experts, padding_mask)
    return _switch_loss(router_probs, expert_indices, num_experts, real)


def _switch_loss(router_probs: torch.Tensor, expert_indices: torch.Tensor, num_experts: int,
                 real: torch.Tensor | None) -> torch.Tensor:
    """:func:`switch_load_balancing_loss` on checked inputs; real: flat bool (T,) or None."""
    probs = _wide(router_probs)
    tokens, k = expert_indices.shape
    slots = torch.ones(tokens, k, dtype=probs.dtype, device=probs.device)
    n: torch.Tensor | int = max(tokens, 1)
    if real is not None:  # where, not a product: padding rows may hold anything, even inf
        slots, probs = slots * real[:, None], torch.where(real[:, None], probs, 0.0)
        n = real.sum().to(probs.dtype).clamp(min=1)
    counts = torch.zeros(num_experts, dtype=probs.dtype, device=probs.device)
    counts = counts.index_add_(0, expert_indices.reshape(-1), slots.reshape(-1))
    return num_experts * (counts * probs.sum(0)).sum() / (n * n)


def router_z_loss(router_logits: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: the mean over real tokens of ``logsumexp(logits)^2``.

    router_logits: (T, E); padding_mask: T entries, 1 for real tokens. A batch with no real token gives 0."""
    if isinstance(router_logits, torch.Tensor) and router_logits.dim() == 2:
        mask = real_token_mask(padding_mask, router_logits.shape[0], router_logits.device)
    else:
        mask = None
    check_scores("router_logits", router_logits, mask)
    return _z_loss(router_logits, mask)


def _z_loss(router_logits: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """:func:`router_z_loss` on checked inputs; real: flat bool (T,) or None."""
    z = torch.logsumexp(_wide(router_logits), dim=-1) ** 2
    if real is None:
        return z.sum() / max(z.shape[0], 1)
    return torch.where(real, z, 0.0).sum() / real.sum().clamp(min=1)
