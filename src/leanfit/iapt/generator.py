"""IAPT's per-layer prompt generator: instruction hidden states in, ``num_soft_tokens`` soft tokens out.

One :class:`PromptGenerator` runs before each adapted Transformer layer ``l``. From the hidden states of the
instruction tokens at the input of layer ``l`` it computes

    z = down(h)                                   d -> m, every position
    pooled_k = sum_t softmax_t(z_t . q_k / sqrt(m)) z_t      over instruction positions only, one query per token
    prompt_k = up(dropout(act(LayerNorm(pooled_k))))         m -> d

The pooler is single-head with no key/value projections (the queries ``q`` are an (k, m) parameter). The ablation
poolers "mean" and "last" take the masked mean or the last instruction position, and add the same (k, m)
parameter as a per-token offset so that the k soft tokens can differ; all three poolers have the same parameter
count. :func:`iapt_parameter_count` is the exact count of an adapter's trainable parameters.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from leanfit.core.errors import ConfigError, bad_value
from leanfit.iapt.config import IAPTConfig, check_config, check_count
from leanfit.iapt.rational import RationalActivation
from leanfit.iapt.slots import check_dtype, check_mask, check_tensor

__all__ = ["PromptGenerator", "generator_parameter_count", "iapt_parameter_count", "pool"]

POOLERS = ("self_attn", "mean", "last")


def pool(z: Tensor, mask: Tensor, query: Tensor, pooler: str) -> Tensor:
    """Pool ``z`` (B, T, m) over the positions where ``mask`` (B, T) is True into (B, k, m), k = query.shape[0].

    ``self_attn``: softmax over masked positions of ``z . query_k / sqrt(m)``; ``mean`` / ``last``: the masked mean
    or the last masked position, plus ``query`` as a per-token offset. Every row needs a True in ``mask``;
    positions outside it, NaN included, do not reach the result."""
    if pooler not in POOLERS:
        raise ConfigError(bad_value("pooler", pooler, "'self_attn', 'mean' or 'last'"))
    check_tensor("z", z, "pass the (batch, seq, m) down-projected hidden states")
    if z.ndim != 3:
        raise ConfigError(bad_value("z.shape", tuple(z.shape), "(batch, seq, m)"))
    if not z.is_floating_point():
        raise ConfigError(bad_value("z.dtype", z.dtype, "a floating dtype", "convert it with z.float()"))
    check_tensor("query", query, "pass the (k, m) queries, e.g. PromptGenerator.query")
    if query.ndim != 2 or query.shape[1] != z.shape[2]:
        raise ConfigError(bad_value("query.shape", tuple(query.shape), f"(k, {z.shape[2]}), m from z"))
    mask = check_mask("mask", mask, z.shape[:2], "the first two sizes of z", z.device)
    return _pool(z, mask, query, pooler)


def _pool(z: Tensor, mask: Tensor, query: Tensor, pooler: str) -> Tensor:
    """:func:`pool` without the checks (``mask`` bool (B, T) with a True in every row)."""
    if pooler in ("self_attn", "mean"):  # 0 * NaN is NaN: clear the other positions (backbones may leave NaN there)
        z = z.masked_fill(~mask[..., None], 0.0)
    if pooler == "self_attn":
        scores = torch.einsum("btm,km->bkt", z, query) / math.sqrt(z.shape[-1])
        scores = scores.masked_fill(~mask[:, None, :], -math.inf)
        return torch.einsum("bkt,btm->bkm", torch.softmax(scores, dim=-1), z)
    if pooler == "mean":
        weights = mask.to(z.dtype)
        pooled = torch.einsum("bt,btm->bm", weights, z) / weights.sum(1, keepdim=True)
    elif pooler == "last":
        positions = torch.arange(mask.shape[1], device=mask.device)
        last = torch.where(mask, positions, -1).amax(dim=1)
        pooled = z[torch.arange(z.shape[0], device=z.device), last]
    else:
        raise ConfigError(bad_value("pooler", pooler, "'self_attn', 'mean' or 'last'"))
    return pooled[:, None, :] + query


class PromptGenerator(nn.Module):
    """Soft tokens of one layer from that layer's input hidden states.

    ``forward(hidden (B, T, d), instruction_mask (B, T) bool) -> (B, num_soft_tokens, d)``; positions outside
    the mask have no influence on the result. The generator computes in its own dtype (inputs are cast) and
    returns that dtype."""

    def __init__(self, hidden_size: int, config: IAPTConfig, *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        config = check_config(config)
        check_count("hidden_size", hidden_size, "the backbone's hidden size (config.hidden_size)")
        if config.hidden_size is not None and config.hidden_size != hidden_size:
            raise ConfigError(bad_value("hidden_size", hidden_size, f"{config.hidden_size}, the hidden_size the "
                                        "config records", "build it for the backbone the config was made for, or "
                                        "leave config.hidden_size None"))
        check_dtype(dtype)
        kw: dict[str, Any] = {"dtype": dtype or torch.get_default_dtype(), "device": device}
        m, k = config.bottleneck, config.num_soft_tokens
        self.pooler = config.pooler
        self.down = nn.Linear(hidden_size, m, **kw)
        self.query = nn.Parameter(torch.randn(k, m, **kw))
        self.norm = nn.LayerNorm(m, **kw) if config.pre_act_norm else nn.Identity()
        self.act: nn.Module
        if config.activation == "rational":
            r = config.rational_range
            self.act = RationalActivation(config.rational_num_degree, config.rational_den_degree,
                                          config.rational_init, (-r, r), **kw)
        else:
            self.act = nn.GELU()
        self.dropout = nn.Dropout(config.dropout)
        self.up = nn.Linear(m, hidden_size, **kw)
        self.gate = nn.Parameter(torch.zeros((), **kw)) if config.prompt_gate else None
        self.gate_scale = config.gate_scale
        with torch.no_grad():
            if config.init_scale > 0:
                self.up.weight.normal_(0.0, config.init_scale)
            else:
                self.up.weight.zero_()
            self.up.bias.zero_()

    def gate_value(self) -> Tensor | None:
        """The gate on this layer's normalised soft positions (``gate_scale * g``), None without ``prompt_gate``."""
        return None if self.gate is None else self.gate_scale * self.gate

    @property
    def num_soft_tokens(self) -> int:
        return self.query.shape[0]

    def forward(self, hidden: Tensor, instruction_mask: Tensor) -> Tensor:
        """``hidden`` (B, T, d) floating, finite at the instruction positions; ``instruction_mask`` (B, T) bool
        (or 0/1 integers) with a True in every row. B = 0 gives an empty (0, k, d) result."""
        return self.prompts(hidden, self._check_inputs(hidden, instruction_mask))

    def _check_inputs(self, hidden: Tensor, instruction_mask: Tensor) -> Tensor:
        d = self.down.in_features
        check_tensor("hidden", hidden, "pass the (batch, seq, hidden_size) hidden states")
        if hidden.ndim != 3 or hidden.shape[-1] != d or (hidden.shape[1] == 0 and hidden.shape[0] > 0):
            raise ConfigError(bad_value("hidden.shape", tuple(hidden.shape), f"(batch, seq >= 1, {d}), d = the "
                                        "generator's hidden_size", "pass one row per sequence and its tokens"))
        if not hidden.is_floating_point():
            raise ConfigError(bad_value("hidden.dtype", hidden.dtype, "a floating dtype", "convert it with "
                                        "hidden.float()"))
        mask = check_mask("instruction_mask", instruction_mask, hidden.shape[:2], "the first two sizes of hidden",
                          hidden.device)
        bad = (~torch.isfinite(hidden).all(-1) & mask).any(1).nonzero().flatten()
        if bad.numel():
            raise ConfigError(bad_value(f"hidden[{bad[0].item()}]", "NaN or inf at an instruction position",
                                        "finite values where instruction_mask is True", "check the backbone's "
                                        "outputs (a float16 overflow?); other positions may hold anything"))
        return mask

    def prompts(self, hidden: Tensor, mask: Tensor) -> Tensor:
        """:meth:`forward` without the checks of ``mask`` (bool, (B, T), no empty row), which cost a device sync;
        for callers that validated the mask once for all layers."""
        z = self.down(hidden.to(self.down.weight.dtype))
        pooled = _pool(z, mask, self.query, self.pooler)
        return self.up(self.dropout(self.act(self.norm(pooled))))


def generator_parameter_count(hidden_size: int, config: IAPTConfig) -> int:
    """Trainable parameters of one :class:`PromptGenerator`."""
    config = check_config(config)
    check_count("hidden_size", hidden_size, "the backbone's hidden size (config.hidden_size)")
    d, m, k = hidden_size, config.bottleneck, config.num_soft_tokens
    count = (d * m + m) + k * m + (m * d + d)  # down, queries, up
    if config.pre_act_norm:
        count += 2 * m
    if config.activation == "rational":
        count += config.rational_num_degree + 1 + config.rational_den_degree
    return count + int(config.prompt_gate)


def iapt_parameter_count(hidden_size: int, num_layers: int, config: IAPTConfig) -> int:
    """Trainable parameters of one IAPT adapter on a backbone of ``num_layers`` layers of width ``hidden_size``:
    ``len(layers) * (2 d m + d + m + k m + [2 m if LayerNorm] + [p + 1 + q if rational] + [1 if gate])``."""
    config = check_config(config)
    return len(config.layer_indices(num_layers)) * generator_parameter_count(hidden_size, config)
