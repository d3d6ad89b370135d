"""``SparseMoE``: a dropless sparse mixture-of-experts layer with sort-based dispatch.

Routing: the router runs in float32 (float64 for float64 input) whatever the hidden dtype; the gate is
:func:`~leanfit.moe.gating.topk_gate_weights` (Mixtral's renormalised top-K by default, Qwen2-MoE/OLMoE's
unnormalised top-K with ``renormalize=False``).

Dispatch: the (token, slot) assignments are sorted by expert once (a stable argsort), counted with ``bincount``, and
each expert's block of rows is gathered, run through its SwiGLU MLP (``down(silu(gate(x)) * up(x))``) and added back
to its tokens weighted by the gate (``index_add_``). Blocks are cut into at most ``block_rows`` rows so that the
gathered rows and the (rows, 2I) activations stay in cache on CPU. Without gradients the activation and the gate
weighting are done in place; with gradients a hand-written backward (:class:`_GroupedSwiGLU`, gradchecked) writes
each expert's weight gradient into its slice of one buffer, where autograd through per-expert views would allocate
one gradient per expert and then stack them. The expert weights use Mixtral's layout (``gate_up_proj`` (E, 2I, d),
``down_proj`` (E, d, I)), so :meth:`SparseMoE.from_mixtral` and :meth:`SparseMoE.to_mixtral` copy a
``transformers`` ``MixtralSparseMoeBlock`` exactly, and the outputs agree with it to float32 rounding.

Capacity (``capacity_factor``, optional; dropless by default): each expert serves at most
``C = ceil(capacity_factor * T_real * K / E)`` assignments, T_real the number of real tokens. Priority is slot-major,
as in GShard and Switch: every token's first choice is served before any token's second choice, and within one slot
earlier tokens (in flattened ``(..., d)`` order) come first. A dropped assignment contributes zero and the token's
other weights are not renormalised; a token with every assignment dropped gets a zero output, which the residual
connection around the layer passes on unchanged.

Padding (``padding_mask``, 1 for real tokens): padding tokens are not dispatched (their output is zero), take no
capacity, and are left out of both router losses. The load-balancing and z-losses are always returned.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from leanfit.core.errors import bad_value
from leanfit.moe.gating import _switch_loss, _topk_gate_weights, _z_loss, check_top_k, real_token_mask

__all__ = ["MoEOutput", "SparseMoE"]


class MoEOutput(NamedTuple):
    """What :meth:`SparseMoE.forward` returns (T = number of tokens, E = experts)."""

    hidden: torch.Tensor  # (..., d): the input's shape and dtype; zero for padding and fully dropped tokens
    router_logits: torch.Tensor  # (T, E), float32 (float64 for float64 input)
    aux_loss: torch.Tensor  # Switch load-balancing loss over real tokens, scalar (K at perfect balance)
    z_loss: torch.Tensor  # router z-loss over real tokens, scalar
    dropped: int  # (token, expert) assignments dropped by the capacity limit; 0 when dropless


class SparseMoE(nn.Module):
    """Top-K routed SwiGLU experts. hidden (..., d) -> :class:`MoEOutput` (see the module docstring).

    ``block_rows``: rows per expert matmul (cache blocking; 1024 suits CPUs); None runs each expert in one matmul."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int, *,
                 renormalize: bool = True, capacity_factor: float | None = None,
                 block_rows: int | None = 1024) -> None:
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size),
                            ("num_experts", num_experts), ("block_rows", 1 if block_rows is None else block_rows)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid: expected a positive integer")
        check_top_k(top_k, num_experts)
        if capacity_factor is not None and (isinstance(capacity_factor, bool)
                                            or not isinstance(capacity_factor, int | float)
                                            or not 0 < capacity_factor < math.inf):
            raise ValueError(f"capacity_factor={capacity_factor!r} is invalid: expected a finite number > 0 (1.0 to "
                             "1.25 is usual), or None for dropless routing")
        if not isinstance(renormalize, bool):
            raise TypeError(bad_value("renormalize", renormalize, "True or False",
                                      "True renormalises the K kept weights (Mixtral), False keeps them (Qwen2-MoE)"))
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.num_experts, self.top_k = num_experts, top_k
        self.renormalize, self.capacity_factor, self.block_rows = renormalize, capacity_factor, block_rows
        self.router = nn.Linear(hidden_size, num_experts, bias=False)
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        nn.init.normal_(self.gate_up_proj, std=hidden_size**-0.5)
        nn.init.normal_(self.down_proj, std=intermediate_size**-0.5)

    @classmethod
    def from_mixtral(cls, block: nn.Module, **kwargs: object) -> SparseMoE:
        """A layer with a copy of the weights of a ``transformers`` (>= 5) ``MixtralSparseMoeBlock``; ``kwargs`` go to
        the constructor (``renormalize`` stays True to match the block)."""
        experts: Any = getattr(block, "experts", None)
        if not all(hasattr(experts, a) for a in ("gate_up_proj", "down_proj", "act_fn")):
            raise TypeError(f"block is a {type(block).__name__}: expected a MixtralSparseMoeBlock whose experts hold "
                            "stacked gate_up_proj and down_proj (transformers >= 5)")
        probe = torch.linspace(-6, 6, 25)
        if not torch.allclose(experts.act_fn(probe), F.silu(probe)):
            raise ValueError(f"block's expert activation is {experts.act_fn!r}: expected SiLU (hidden_act='silu')")
        num_experts, inter2, hidden = experts.gate_up_proj.shape
        layer = cls(hidden, inter2 // 2, num_experts, block.top_k, **kwargs)  # type: ignore[arg-type]
        layer.to(experts.gate_up_proj.device, experts.gate_up_proj.dtype)
        with torch.no_grad():
            layer.router.weight.copy_(cast(nn.Linear, block.gate).weight)
            layer.gate_up_proj.copy_(experts.gate_up_proj)
            layer.down_proj.copy_(experts.down_proj)
        return layer

    def to_mixtral(self) -> nn.Module:
        """A ``transformers`` ``MixtralSparseMoeBlock`` (eager experts) with a copy of this layer's weights."""
        if not self.renormalize or self.capacity_factor is not None:
            raise ValueError(f"renormalize={self.renormalize}, capacity_factor={self.capacity_factor}: a Mixtral "
                             "block renormalises and never drops; use renormalize=True, capacity_factor=None")
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        config = MixtralConfig(hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                               num_local_experts=self.num_experts, num_experts_per_tok=self.top_k, hidden_act="silu")
        config._experts_implementation = "eager"
        block = MixtralSparseMoeBlock(config).to(self.gate_up_proj.device, self.gate_up_proj.dtype)
        with torch.no_grad():
            block.gate.weight.copy_(self.router.weight)
            block.experts.gate_up_proj.copy_(self.gate_up_proj)
            block.experts.down_proj.copy_(self.down_proj)
        return block

    def forward(self, hidden: torch.Tensor, padding_mask: torch.Tensor | None = None) -> MoEOutput:
        """hidden: (..., d); padding_mask: one entry per token (e.g. (B, S)), 1 for real tokens and 0 for padding.
        Real tokens must be finite (ValueError naming the token); padding tokens may hold anything. 0 tokens give
        an empty output and zero losses."""
        x, real = self._check_hidden(hidden, padding_mask)
        router_dtype = torch.promote_types(x.dtype, torch.float32)
        logits = F.linear(x.to(router_dtype), self.router.weight.to(router_dtype))
        top_w, indices = _topk_gate_weights(logits, self.top_k, renormalize=self.renormalize)
        token, weight, counts, dropped = self._route(indices, top_w.to(x.dtype), real)
        out = self._run_experts(x, token, weight, counts)
        probs = (logits - torch.logsumexp(logits, dim=-1, keepdim=True)).exp()  # softmax, faster for small E on CPU
        aux = _switch_loss(probs, indices, self.num_experts, real)
        return MoEOutput(out.reshape(hidden.shape), logits, aux, _z_loss(logits, real), dropped)

    def _check_hidden(self, hidden: object,
                      padding_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``hidden`` as (T, d) and the real-token mask; refuses non-tensors, integer dtypes, a wrong last dim
        and NaN/inf in real tokens (one host synchronisation)."""
        if not isinstance(hidden, torch.Tensor):
            raise TypeError(bad_value("hidden", type(hidden).__name__, f"a floating (..., {self.hidden_size}) tensor",
                                      "pass a torch tensor"))
        if hidden.dim() == 0 or hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden has shape {tuple(hidden.shape)}: expected (..., hidden_size={self.hidden_size})")
        if not hidden.is_floating_point():
            raise TypeError(bad_value("hidden", f"{hidden.dtype} tensor", "a floating tensor (float32, bfloat16, ...)",
                                      "cast it with hidden.float()"))
        x = hidden.reshape(-1, self.hidden_size)
        real = real_token_mask(padding_mask, x.shape[0], x.device)
        bad = ~torch.isfinite(x).all(-1)
        if real is not None:
            bad &= real
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            raise ValueError(bad_value("hidden", f"<NaN/inf in token {i} of {x.shape[0]}>", "finite hidden states "
                                       "for every real token", "check the layers before this one, or mark the token "
                                       "as padding in padding_mask"))
        return x, real

    def _route(self, indices: torch.Tensor, top_w: torch.Tensor,
               real: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, list[int], int]:
        """Assignments sorted by expert. indices, top_w: (T, K); real: (T,) bool or None.
        Returns (token (A,), weight (A,), rows per expert (E ints summing to A), assignments dropped)."""
        tokens, k = indices.shape
        expert = indices.t().reshape(-1)  # slot-major: assignment a = slot * T + token (the capacity priority)
        assignment = torch.arange(tokens * k, device=indices.device)
        if real is not None:
            keep = real.repeat(k)
            expert, assignment = expert[keep], assignment[keep]
        assignment = assignment[torch.argsort(expert, stable=True)]
        counts = torch.bincount(expert, minlength=self.num_experts)
        dropped = 0
        if self.capacity_factor is not None:
            n_real = tokens if real is None else int(real.sum())
            capacity = math.ceil(self.capacity_factor * n_real * k / self.num_experts)
            first = torch.cumsum(counts, 0) - counts
            rank = torch.arange(assignment.numel(), device=counts.device) - first.repeat_interleave(counts)
            served = rank < capacity
            dropped = int(served.numel() - served.sum())
            assignment, counts = assignment[served], counts.clamp(max=capacity)
        return assignment % tokens, top_w.t().reshape(-1)[assignment], counts.tolist(), dropped

    def _run_experts(self, x: torch.Tensor, token: torch.Tensor, weight: torch.Tensor,
                     counts: list[int]) -> torch.Tensor:
        """sum over assignments of weight * expert(x[token]), scattered to the tokens. x: (T, d) -> (T, d)."""
        experts, sizes = [], []
        for e, n in enumerate(counts):
            step = self.block_rows or max(n, 1)
            for lo in range(0, n, step):
                experts.append(e)
                sizes.append(min(step, n - lo))
        args = (x, weight, self.gate_up_proj, self.down_proj, token, experts, sizes)
        if torch.is_grad_enabled() and any(t.requires_grad for t in args[:4]):
            return _GroupedSwiGLU.apply(*args)
        return _grouped_swiglu(*args, keep=False)[0]

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
                f"num_experts={self.num_experts}, top_k={self.top_k}, renormalize={self.renormalize}, "
                f"capacity_factor={self.capacity_factor}, block_rows={self.block_rows}")


def _grouped_swiglu(x: torch.Tensor, weight: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                    token: torch.Tensor, experts: list[int], sizes: list[int],
                    keep: bool) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """out[t] = sum over assignments a of token t: weight_a * down_e(silu(gate_e(x_t)) * up_e(x_t)), block by block
    (block b: expert ``experts[b]``, the next ``sizes[b]`` assignments). x: (T, d); weight, token: (A,) sorted by
    expert; gate_up: (E, 2I, d); down: (E, d, I). Returns out (T, d) and, with ``keep``, each block's pre-activations
    (n, 2I) and expert outputs (n, d) for the backward (without, activations are computed in place). Blocks are
    separate tensors, not slices of one (A, 2I) buffer: a fresh buffer that large costs page faults on every call."""
    out = torch.zeros_like(x)
    pre, post = [], []
    lo = 0
    for e, n in zip(experts, sizes, strict=True):
        tok, w = token[lo : lo + n], weight[lo : lo + n, None]
        h = F.linear(x.index_select(0, tok), gate_up[e])  # gathered block by block, still in cache for the matmul
        gate, up = h.chunk(2, dim=-1)
        if keep:
            y = F.linear(F.silu(gate) * up, down[e])
            pre.append(h)
            post.append(y)
            out.index_add_(0, tok, y * w)
        else:
            out.index_add_(0, tok, F.linear(F.silu(gate, inplace=True).mul_(up), down[e]).mul_(w))
        lo += n
    return out, pre, post


class _GroupedSwiGLU(torch.autograd.Function):
    """:func:`_grouped_swiglu` with a hand-written backward: each expert's weight gradient is written into its slice
    of one (E, ...) buffer (autograd through per-expert views would allocate one gradient per expert, then stack
    them), and only the pre-activations and expert outputs are kept (not the gathered rows or the activations)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                token: torch.Tensor, experts: list[int], sizes: list[int]) -> torch.Tensor:
        out, pre, post = _grouped_swiglu(x, weight, gate_up, down, token, experts, sizes, keep=True)
        ctx.save_for_backward(x, weight, gate_up, down, token, *pre, *post)
        ctx.experts, ctx.sizes = experts, sizes
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (x, weight, gate_up, down, token), blocks = ctx.saved_tensors[:5], ctx.saved_tensors[5:]
        pres, posts = blocks[: len(ctx.sizes)], blocks[len(ctx.sizes) :]
        need_x, need_w, need_gate_up, need_down = ctx.needs_input_grad[:4]
        dx = torch.zeros_like(x) if need_x else None
        dw = torch.empty_like(weight) if need_w else None
        d_gate_up = torch.empty_like(gate_up) if need_gate_up else None
        d_down = torch.empty_like(down) if need_down else None
        seen: set[int] = set()  # experts whose gradient slice has been written (the first block writes, later add)
        lo = 0
        for e, n, pre, post in zip(ctx.experts, ctx.sizes, pres, posts, strict=True):
            tok, rows = token[lo : lo + n], slice(lo, lo + n)
            go = grad_out.index_select(0, tok)
            if dw is not None:
                dw[rows] = (go * post).sum(-1)
            dy = go.mul_(weight[rows, None])
            gate, up = pre.chunk(2, dim=-1)
            silu, da = F.silu(gate), dy @ down[e]
            if d_down is not None:
                _write_or_add(d_down[e], dy.t(), silu * up, e in seen)
            dh = torch.cat([torch.ops.aten.silu_backward(da * up, gate), da.mul_(silu)], dim=-1)
            if d_gate_up is not None:
                _write_or_add(d_gate_up[e], dh.t(), x.index_select(0, tok), e in seen)
            if dx is not None:
                dx.index_add_(0, tok, dh @ gate_up[e])
            seen.add(e)
            lo += n
        for e in set(range(gate_up.shape[0])) - seen:  # experts that received no token
            for grad in (d_gate_up, d_down):
                if grad is not None:
                    grad[e].zero_()
        return dx, dw, d_gate_up, d_down, None, None, None


def _write_or_add(target: torch.Tensor, a: torch.Tensor, b: torch.Tensor, add: bool) -> None:
    """target = a @ b, or target += a @ b, in place."""
    if add:
        target.addmm_(a, b)
    else:
        torch.mm(a, b, out=target)
