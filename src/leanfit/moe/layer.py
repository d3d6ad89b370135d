"""``SparseMoE``: a dropless sparse mixture-of-experts layer with sort-based dispatch.

The (token, slot) assignments are sorted by expert once (a stable argsort, so tokens keep their order inside an
expert), counted with ``bincount``, gathered into one contiguous block per expert, run through each expert's SwiGLU
MLP with two matmuls, and added back to their tokens weighted by the gate (``index_add_``). Compared with the
Hugging Face Mixtral loop, which builds a (T, K, E) one-hot mask and searches it once per expert, the routing costs one
sort. The expert weights use Mixtral's layout (``gate_up_proj`` (E, 2I, d), ``down_proj`` (E, d, I)), so
:meth:`SparseMoE.from_mixtral` copies a ``MixtralSparseMoeBlock`` exactly.

``capacity_factor`` (optional) caps each expert at ``ceil(capacity_factor * T * K / E)`` assignments; the earliest
tokens win, the rest are dropped (they contribute zero: the residual connection around the layer passes them on).
The load-balancing and z-losses are always returned, with padding excluded through ``padding_mask``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from leanfit.moe.gating import router_z_loss, switch_load_balancing_loss, topk_softmax_gate

__all__ = ["MoEOutput", "SparseMoE"]


class MoEOutput(NamedTuple):
    hidden: torch.Tensor  # (..., d)
    router_logits: torch.Tensor  # (T, E) float32
    aux_loss: torch.Tensor  # Switch load-balancing loss (scalar)
    z_loss: torch.Tensor  # router z-loss (scalar)
    dropped: int  # assignments dropped by the capacity limit (0 when dropless)


class SparseMoE(nn.Module):
    """Top-K routed SwiGLU experts. hidden (..., d) -> :class:`MoEOutput`."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int, *,
                 renormalize: bool = True, capacity_factor: float | None = None) -> None:  # fmt: skip
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size),
                            ("num_experts", num_experts)):  # fmt: skip
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid: expected a positive integer")
        if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k!r} is invalid: expected an integer in [1, num_experts={num_experts}]")
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"capacity_factor={capacity_factor!r} is invalid: expected > 0, or None for dropless")
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.num_experts, self.top_k = num_experts, top_k
        self.renormalize, self.capacity_factor = renormalize, capacity_factor
        self.router = nn.Linear(hidden_size, num_experts, bias=False)
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        nn.init.normal_(self.gate_up_proj, std=hidden_size**-0.5)
        nn.init.normal_(self.down_proj, std=intermediate_size**-0.5)

    @classmethod
    def from_mixtral(cls, block: nn.Module) -> SparseMoE:
        """A layer with the weights of a ``transformers`` ``MixtralSparseMoeBlock`` (copied)."""
        experts = block.experts
        layer = cls(experts.hidden_dim, experts.intermediate_dim, experts.num_experts, block.top_k)
        with torch.no_grad():
            layer.router.weight.copy_(block.gate.weight)
            layer.gate_up_proj.copy_(experts.gate_up_proj)
            layer.down_proj.copy_(experts.down_proj)
        return layer.to(block.gate.weight.device, block.gate.weight.dtype)

    def forward(self, hidden: torch.Tensor, padding_mask: torch.Tensor | None = None) -> MoEOutput:
        if hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden has last dimension {hidden.shape[-1]}: expected hidden_size={self.hidden_size}")
        x = hidden.reshape(-1, self.hidden_size)
        router_dtype = torch.promote_types(x.dtype, torch.float32)  # the router in float32 at least
        logits = F.linear(x.to(router_dtype), self.router.weight.to(router_dtype))
        weights, indices = topk_softmax_gate(logits, self.top_k, renormalize=self.renormalize)
        out, dropped = self._dispatch(x, indices, weights.gather(1, indices).to(x.dtype))
        aux = switch_load_balancing_loss(logits, indices, self.num_experts, padding_mask)
        return MoEOutput(out.reshape(hidden.shape), logits, aux, router_z_loss(logits, padding_mask), dropped)

    def _dispatch(self, x: torch.Tensor, indices: torch.Tensor, top_w: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Sort (token, slot) pairs by expert, run each expert on its contiguous block, scatter back weighted."""
        k = indices.shape[1]
        expert = indices.reshape(-1)
        order = torch.argsort(expert, stable=True)  # token order is kept inside each expert
        counts = torch.bincount(expert, minlength=self.num_experts)
        token = order // k
        weight = top_w.reshape(-1)[order]
        dropped = 0
        if self.capacity_factor is not None:
            capacity = math.ceil(self.capacity_factor * x.shape[0] * k / self.num_experts)
            starts = torch.cumsum(counts, 0) - counts
            rank = torch.arange(order.numel(), device=x.device) - starts.repeat_interleave(counts)
            keep = rank < capacity
            dropped = int((~keep).sum())
            order, token, weight = order[keep], token[keep], weight[keep]
            counts = counts.clamp(max=capacity)
        inputs = x[token]
        outputs = torch.empty_like(inputs)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                gate, up = F.linear(inputs[start : start + n], self.gate_up_proj[e]).chunk(2, dim=-1)
                outputs[start : start + n] = F.linear(F.silu(gate) * up, self.down_proj[e])
                start += n
        out = torch.zeros_like(x).index_add_(0, token, outputs * weight[:, None])
        return out, dropped

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
                f"num_experts={self.num_experts}, top_k={self.top_k}, renormalize={self.renormalize}, "
                f"capacity_factor={self.capacity_factor}")  # fmt: skip
