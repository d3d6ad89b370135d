"""PromptGenerator and IAPTConfig: poolers against naive float64 references, masking, zero init, parameter counts,
config validation and the JSON round trip."""

from __future__ import annotations

import json

import pytest
import torch

from leanfit.core.errors import ConfigError
from leanfit.iapt.config import IAPTConfig
from leanfit.iapt.generator import PromptGenerator, generator_parameter_count, iapt_parameter_count
from tests.reference import prompts_reference
from tests.tolerances import assert_close

D = 12


def make(config: IAPTConfig, seed: int = 0) -> PromptGenerator:
    torch.manual_seed(seed)
    return PromptGenerator(D, config, dtype=torch.float64)


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 9, D, generator=g, dtype=torch.float64)
    mask = torch.zeros(3, 9, dtype=torch.bool)
    mask[0, :4] = True
    mask[1, 2:9] = True
    mask[2, [0, 3, 5]] = True
    return hidden, mask


CONFIGS = [
    pytest.param(IAPTConfig(bottleneck=6, init_scale=0.5), id="self_attn-rational"),
    pytest.param(IAPTConfig(bottleneck=6, init_scale=0.5, pooler="mean"), id="mean"),
    pytest.param(IAPTConfig(bottleneck=6, init_scale=0.5, pooler="last"), id="last"),
    pytest.param(IAPTConfig(bottleneck=6, init_scale=0.5, activation="gelu", pre_act_norm=False), id="gelu-nonorm"),
    pytest.param(IAPTConfig(bottleneck=6, init_scale=0.5, num_soft_tokens=1, rational_num_degree=6,
                            rational_den_degree=5, rational_init="silu"), id="one-token-6-5-silu"),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_matches_naive_reference(config: IAPTConfig) -> None:
    gen = make(config)
    hidden, mask = batch()
    out = gen(hidden, mask)
    assert out.shape == (3, config.num_soft_tokens, D)
    with torch.no_grad():
        assert_close(out, prompts_reference(gen, hidden, mask))


@pytest.mark.parametrize("config", CONFIGS)
def test_positions_outside_mask_have_no_influence(config: IAPTConfig) -> None:
    gen = make(config)
    hidden, mask = batch()
    noisy = hidden.clone()
    noisy[~mask] = 1e3 * torch.randn_like(noisy[~mask])
    assert torch.equal(gen(hidden, mask), gen(noisy, mask))
    moved = hidden.clone()
    moved[mask] += 0.1  # positions inside the mask do count
    assert (gen(moved, mask) - gen(hidden, mask)).abs().max() > 1e-3


@pytest.mark.parametrize("pooler", ["self_attn", "mean", "last"])
def test_soft_tokens_differ_for_every_pooler(pooler: str) -> None:
    """Each soft token is the reference pooling with its own query: swapping the queries swaps the tokens, and the
    tokens are far apart."""
    gen = make(IAPTConfig(bottleneck=6, init_scale=0.5, pooler=pooler))
    hidden, mask = batch()
    with torch.no_grad():
        out = gen(hidden, mask)
        assert_close(out, prompts_reference(gen, hidden, mask))
        gen.query.copy_(gen.query.flip(0))
        assert_close(gen(hidden, mask), out.flip(1))
    assert (out[:, 0] - out[:, 1]).abs().max() > 1e-3


def test_zero_init_gives_zero_prompts_and_gradients_reach_up() -> None:
    gen = make(IAPTConfig(bottleneck=6))
    hidden, mask = batch()
    out = gen(hidden, mask)
    assert torch.equal(out, torch.zeros_like(out))
    (out * torch.randn_like(out)).sum().backward()
    assert gen.up.weight.grad.abs().max() > 0
    assert gen.down.weight.grad.abs().max() == 0  # blocked by the zero up-projection on the first step


def test_empty_instruction_row_is_an_error() -> None:
    gen = make(IAPTConfig(bottleneck=6))
    hidden, mask = batch()
    mask[1] = False
    with pytest.raises(ConfigError, match=r"instruction_mask\[1\]='all False'"):
        gen(hidden, mask)
    with pytest.raises(ConfigError, match="instruction_mask.shape"):
        gen(hidden, mask[:, :4])


@pytest.mark.parametrize(
    "hidden_size, num_layers, config",
    [
        pytest.param(12, 3, IAPTConfig(bottleneck=6), id="default"),
        pytest.param(12, 3, IAPTConfig(bottleneck=5, num_soft_tokens=7, pre_act_norm=False), id="no-norm"),
        pytest.param(16, 4, IAPTConfig(bottleneck=8, activation="gelu"), id="gelu"),
        pytest.param(16, 4, IAPTConfig(bottleneck=8, layers=[0, 3]), id="two-layers"),
        pytest.param(8, 2, IAPTConfig(bottleneck=3, rational_num_degree=6, rational_den_degree=5), id="6-5"),
        pytest.param(8, 2, IAPTConfig(bottleneck=3, prompt_gate=True, init_scale=0.1), id="gate"),
    ],
)
def test_parameter_count_formula(hidden_size: int, num_layers: int, config: IAPTConfig) -> None:
    layers = config.layer_indices(num_layers)
    counted = sum(p.numel() for _ in layers for p in PromptGenerator(hidden_size, config).parameters())
    assert iapt_parameter_count(hidden_size, num_layers, config) == counted


def test_parameter_count_at_paper_scale() -> None:
    """MiLoRA's IAPT budget on LLaMA-2-7B: 2 d m L = 83.89M; with biases, queries, norm and rational 84.09M."""
    config = IAPTConfig(bottleneck=320, rational_num_degree=6, rational_den_degree=5)
    per_layer = 2 * 4096 * 320 + 4096 + 320 + 4 * 320 + 2 * 320 + 12
    assert generator_parameter_count(4096, config) == per_layer
    assert iapt_parameter_count(4096, 32, config) == 32 * per_layer == 84_089_216


@pytest.mark.parametrize(
    "kwargs, match",
    [
        pytest.param({"num_soft_tokens": 0}, "num_soft_tokens=0", id="no-tokens"),
        pytest.param({"bottleneck": 0}, "bottleneck=0", id="bottleneck"),
        pytest.param({"rational_den_degree": 0}, "rational_den_degree=0", id="den-degree"),
        pytest.param({"layers": []}, "layers=", id="layers-empty"),
        pytest.param({"layers": [1, 1]}, "layers=", id="layers-duplicate"),
        pytest.param({"layers": [-1]}, "layers=", id="layers-negative"),
        pytest.param({"layers": [4], "num_layers": 4}, "layers=", id="layers-out-of-range"),
        pytest.param({"dropout": 1.0}, "dropout=1.0", id="dropout"),
        pytest.param({"rational_range": 0.0}, "rational_range=0.0", id="range"),
        pytest.param({"init_scale": -1.0}, "init_scale=-1.0", id="init-scale"),
        pytest.param({"hidden_size": 0}, "hidden_size=0", id="hidden-size"),
        pytest.param({"pooler": "median"}, "pooler='median'", id="pooler"),
        pytest.param({"activation": "relu"}, "activation='relu'", id="activation"),
        pytest.param({"rational_init": "tanh"}, "rational_init='tanh'", id="rational-init"),
        pytest.param({"slot_position": "end"}, "slot_position='end'", id="slot-position"),
    ],
)
def test_config_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        IAPTConfig(**kwargs)


@pytest.mark.parametrize(
    "values, match",
    [
        pytest.param({"pooler": "max"}, "pooler='max'", id="pooler"),
        pytest.param({"layers": "some"}, "layers='some'", id="layers-string"),
        pytest.param({"num_soft_tokens": 0}, "num_soft_tokens=0", id="tokens"),
        pytest.param({"soft_tokens": 4}, "unknown config key 'soft_tokens'", id="unknown-key"),
    ],
)
def test_config_from_dict_errors(values: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        IAPTConfig.from_dict(values)


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(IAPTConfig(), id="default"),
        pytest.param(IAPTConfig(layers=[0, 2], pooler="last", activation="gelu", base_model_name_or_path="org/m",
                                hidden_size=64, num_layers=3, slot_position="start", dropout=0.1), id="custom"),
    ],
)
def test_config_json_round_trip(config: IAPTConfig) -> None:
    again = IAPTConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    assert again.layer_indices(3) == ([0, 1, 2] if config.layers == "all" else [0, 2])
