"""The public names as a user's code imports them, type-checked by mypy (``make typecheck``, and
``test_mypy.py``): ``assert_type`` fails if a name reached the checker as ``Any``. Never imported at run time."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from typing_extensions import assert_type

from leanfit.core.config import BaseConfig, option
from leanfit.core.registry import Entry, get, register
from leanfit.core.runner import RunContext
from leanfit.iapt import IAPTConfig, IAPTModel, PromptGenerator, RationalActivation, get_iapt_model
from leanfit.moe import MoEOutput, SparseMoE, TopKGaussianMoE, topk_softmax_gate
from leanfit.neural_de import Solution, SolveStats, get_tableau, solve
from leanfit.noisefit import NoiseFiTConfig, NoiseFiTLossOutput, NoiseFiTTrainer, NoiseInjector, noisefit_loss
from leanfit.vq_logits import VQLogitsHead, replace_lm_head


def vq_logits_head(hidden: torch.Tensor, labels: torch.Tensor) -> None:
    head = VQLogitsHead.from_scratch(64, 1000, 32, mapping="random")
    assert_type(head, VQLogitsHead)
    assert_type(head.loss(hidden, labels, reduction="sum"), torch.Tensor)
    assert_type(head.sample(hidden, top_p=0.9), torch.Tensor)
    assert_type(head.parameter_counts(), dict[str, int])
    replace_lm_head(nn.Linear(4, 4), 2, mapping="kmeans", mode="gather")


def noisefit(model: nn.Module, batch: dict[str, Any]) -> None:
    config = NoiseFiTConfig(layers="auto", alpha=0.7, n_noisy=2)
    assert_type(config, NoiseFiTConfig)
    assert_type(config.alpha, float)
    injector = NoiseInjector(model, config)
    out = noisefit_loss(model, batch, injector, config)
    assert_type(out, NoiseFiTLossOutput)
    assert_type(out.loss, torch.Tensor)
    assert issubclass(NoiseFiTTrainer, object)


def iapt(backbone: nn.Module) -> None:
    config = IAPTConfig(num_soft_tokens=4, bottleneck=32, activation="gelu")
    assert_type(config.num_soft_tokens, int)
    model = get_iapt_model(backbone, config)
    assert_type(model, IAPTModel)
    assert_type(PromptGenerator(16, config), PromptGenerator)
    assert_type(RationalActivation(5, 4, "gelu").forward(torch.zeros(3)), torch.Tensor)


def neural_de(y0: torch.Tensor) -> None:
    sol = solve(lambda t, y: -y, y0, [0.0, 1.0], method=get_tableau("dopri5"), norm="max")
    assert_type(sol, Solution)
    assert_type(sol.ys, torch.Tensor)
    assert_type(sol.stats, SolveStats)


def moe(X: np.ndarray, y: np.ndarray, tokens: torch.Tensor) -> None:
    est = TopKGaussianMoE(n_experts=3, top_k=2, random_state=0).fit(X, y)
    assert_type(est, TopKGaussianMoE)
    assert_type(est.predict(X), np.ndarray)
    layer = SparseMoE(16, 32, 4, 2)
    assert_type(layer.forward(tokens), MoEOutput)  # torch types Module.__call__ as Any: forward keeps the type
    weights, experts = topk_softmax_gate(torch.zeros(4, 8), 2)
    assert_type(weights, torch.Tensor)


@dataclass
class ToyConfig(BaseConfig):
    steps: int = option(3, help="steps")


@register("toy-typing", kind="experiment", description="typed run", config_cls=ToyConfig)
def toy(ctx: RunContext[ToyConfig]) -> dict[str, Any]:
    assert_type(ctx.config, ToyConfig)
    return {"steps": ctx.config.steps}


def registry() -> None:
    entry = get("experiment", "toy-typing")
    assert_type(entry, Entry)
    assert_type(entry.run, Callable[[RunContext[Any]], dict[str, Any]])
