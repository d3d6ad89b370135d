"""Edge inputs at the boundary of leanfit.iapt: every bad input is a ValueError or TypeError whose message names
the parameter, the value, what was expected and the fix; valid edge inputs (empty batches of the generator,
one-token instructions, NaN outside the instruction, 0/1 integer masks, values at the bounds) give the reference
result. Property tests run the config and the rational activation on random values, NaN and infinities
included: each draw is refused with a ValueError/TypeError, or it gives a finite result equal to a naive
reference."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from torch import nn

from leanfit.iapt.config import IAPTConfig
from leanfit.iapt.generator import PromptGenerator, generator_parameter_count, iapt_parameter_count, pool
from leanfit.iapt.model import IAPTModel, get_iapt_model
from leanfit.iapt.rational import RationalActivation, coefficients, rational
from leanfit.iapt.slots import CachedPrompts, IAPTBatch, find_layers
from leanfit.studies.models.tiny_llama import tiny_llama
from tests.reference import prompts_reference, rational_reference
from tests.tolerances import assert_close

INF, NAN = math.inf, math.nan
V, D, L, BOS = 48, 32, 2, 0
G = 12  # the generator tests' hidden size
CFG = IAPTConfig(bottleneck=8, init_scale=0.5)


def raises(exc: type[Exception], fragment: str, call: Callable[[], Any]) -> None:
    """``call()`` raises ``exc`` in the standard format (``param=value is invalid: expected ...``) naming
    ``fragment``."""
    with pytest.raises(exc) as info:
        call()
    message = str(info.value)
    assert fragment in message and "is invalid: expected" in message, message


def backbone() -> nn.Module:
    model = tiny_llama(V, d_model=D, n_layers=L, n_heads=4, seed=0).eval()
    model.generation_config.eos_token_id = None
    return model


@pytest.fixture(scope="module")
def model() -> IAPTModel:
    torch.manual_seed(10)
    return get_iapt_model(backbone(), CFG)


@pytest.fixture(scope="module")
def bare() -> nn.Module:
    """A backbone that is never wrapped: every construction tried on it fails before hooking it."""
    return backbone()


def ids(b: int = 2, t: int = 6, seed: int = 3) -> torch.Tensor:
    out = torch.randint(2, V, (b, t), generator=torch.Generator().manual_seed(seed))
    out[:, 0] = BOS
    return out


def generator(config: IAPTConfig = CFG, seed: int = 0) -> PromptGenerator:
    torch.manual_seed(seed)
    return PromptGenerator(G, config, dtype=torch.float64)


def hidden_and_mask(b: int = 2, t: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    hidden = torch.randn(b, t, G, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mask = torch.zeros(b, t, dtype=torch.bool)
    mask[:, :3] = True
    return hidden, mask


def with_nan(hidden: torch.Tensor, row: int, pos: int) -> torch.Tensor:
    hidden = hidden.clone()
    hidden[row, pos] = NAN
    return hidden


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    "kwargs, exc, fragment",
    [
        pytest.param({"gate_scale": INF, "prompt_gate": True, "init_scale": 0.01}, ValueError, "gate_scale=inf",
                     id="gate-scale-inf"),
        pytest.param({"gate_scale": NAN}, ValueError, "gate_scale=nan", id="gate-scale-nan"),
        pytest.param({"gate_scale": 1e300}, ValueError, "gate_scale=1e+300", id="gate-scale-overflows-float32"),
        pytest.param({"gate_scale": -1.0}, ValueError, "gate_scale=-1.0", id="gate-scale-negative"),
        pytest.param({"rational_range": INF}, ValueError, "rational_range=inf", id="range-inf"),
        pytest.param({"rational_range": 1e300}, ValueError, "rational_range=1e+300", id="range-huge"),
        pytest.param({"rational_range": -3.0}, ValueError, "rational_range=-3.0", id="range-negative"),
        pytest.param({"init_scale": NAN}, ValueError, "init_scale=nan", id="init-scale-nan"),
        pytest.param({"init_scale": 1e300}, ValueError, "init_scale=1e+300", id="init-scale-huge"),
        pytest.param({"dropout": NAN}, ValueError, "dropout=nan", id="dropout-nan"),
        pytest.param({"dropout": -0.1}, ValueError, "dropout=-0.1", id="dropout-negative"),
        pytest.param({"rational_num_degree": -1}, ValueError, "rational_num_degree=-1", id="num-degree-negative"),
        pytest.param({"rational_den_degree": -2}, ValueError, "rational_den_degree=-2", id="den-degree-negative"),
        pytest.param({"rational_num_degree": 40}, ValueError, "rational_num_degree=40", id="num-degree-huge"),
        pytest.param({"num_soft_tokens": -4}, ValueError, "num_soft_tokens=-4", id="tokens-negative"),
        pytest.param({"num_soft_tokens": "4"}, TypeError, "num_soft_tokens='4'", id="tokens-str"),
        pytest.param({"num_soft_tokens": 2.5}, TypeError, "num_soft_tokens=2.5", id="tokens-float"),
        pytest.param({"bottleneck": True}, TypeError, "bottleneck=True", id="bottleneck-bool"),
        pytest.param({"layers": 5}, TypeError, "layers=5", id="layers-int"),
        pytest.param({"layers": [1.5]}, ValueError, "layers=[1.5]", id="layers-float-item"),
        pytest.param({"layers_path": 5}, TypeError, "layers_path=5", id="layers-path-int"),
        pytest.param({"num_layers": -1}, ValueError, "num_layers=-1", id="num-layers-negative"),
        pytest.param({"pooler": "max"}, ValueError, "pooler='max'", id="pooler"),
    ],
)
def test_config_rejects_bad_fields(kwargs: dict, exc: type[Exception], fragment: str) -> None:
    raises(exc, fragment, lambda: IAPTConfig(**kwargs))


NOT_A_CONFIG = {"bottleneck": 8}


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda model, bare: PromptGenerator(G, NOT_A_CONFIG), id="generator"),
        pytest.param(lambda model, bare: generator_parameter_count(G, NOT_A_CONFIG), id="generator-count"),
        pytest.param(lambda model, bare: iapt_parameter_count(G, 2, NOT_A_CONFIG), id="iapt-count"),
        pytest.param(lambda model, bare: get_iapt_model(bare, NOT_A_CONFIG), id="get-iapt-model"),
        pytest.param(lambda model, bare: IAPTModel(bare, NOT_A_CONFIG), id="iapt-model"),
        pytest.param(lambda model, bare: model.add_adapter("x", NOT_A_CONFIG), id="add-adapter"),
    ],
)
def test_a_dict_where_a_config_is_expected_is_a_type_error(call: Callable, model: IAPTModel, bare: nn.Module) -> None:
    raises(TypeError, "config={'bottleneck': 8}", lambda: call(model, bare))
    with pytest.raises(TypeError, match=re.escape("IAPTConfig(**config)")):
        call(model, bare)
    assert model.adapter_names == ["default"] and not hasattr(bare, "_leanfit_iapt_hooked")


@pytest.mark.parametrize(
    "num_layers, exc",
    [
        pytest.param(0, ValueError, id="zero"),
        pytest.param(-1, ValueError, id="negative"),
        pytest.param("3", TypeError, id="str"),
        pytest.param(2.0, TypeError, id="float"),
        pytest.param(True, TypeError, id="bool"),
    ],
)
def test_layer_indices_rejects_bad_layer_counts(num_layers: Any, exc: type[Exception]) -> None:
    raises(exc, f"num_layers={num_layers!r}", lambda: IAPTConfig().layer_indices(num_layers))


def test_config_values_at_the_bounds_are_kept() -> None:
    config = IAPTConfig(rational_num_degree=16, rational_den_degree=1, rational_range=1e3, gate_scale=1e4,
                        init_scale=0.0, dropout=0.0, num_soft_tokens=1, bottleneck=1, layers=[0], num_layers=1)
    assert (config.rational_num_degree, config.rational_range, config.gate_scale) == (16, 1e3, 1e4)
    assert config.layer_indices(1) == [0] and IAPTConfig().layer_indices(1) == [0]
    assert IAPTConfig.from_dict(config.to_dict()) == config


# ------------------------------------------------------------------------------------------------ rational
@pytest.mark.parametrize(
    "call, exc, fragment",
    [
        pytest.param(lambda: coefficients("gelu", True, 4), TypeError, "num_degree=True", id="degree-bool"),
        pytest.param(lambda: coefficients("gelu", 5.0, 4), TypeError, "num_degree=5.0", id="degree-float"),
        pytest.param(lambda: coefficients("gelu", -1, 4), ValueError, "num_degree=-1", id="degree-negative"),
        pytest.param(lambda: coefficients("gelu", 5, -3), ValueError, "den_degree=-3", id="den-degree-negative"),
        pytest.param(lambda: coefficients("gelu", 40, 4), ValueError, "num_degree=40", id="degree-huge"),
        pytest.param(lambda: coefficients(5), TypeError, "init=5", id="init-int"),
        pytest.param(lambda: coefficients("gelu", 5, 4, "ab"), TypeError, "fit_range='ab'", id="range-str"),
        pytest.param(lambda: coefficients("gelu", 5, 4, None), TypeError, "fit_range=None", id="range-none"),
        pytest.param(lambda: coefficients("gelu", 5, 4, (1, 2, 3)), ValueError, "fit_range=(1, 2, 3)",
                     id="range-three"),
        pytest.param(lambda: coefficients("gelu", 5, 4, (NAN, 1.0)), ValueError, "fit_range=(nan, 1.0)",
                     id="range-nan"),
        pytest.param(lambda: coefficients("gelu", 5, 4, (-1e100, 1e100)), ValueError, "fit_range=", id="range-huge"),
        pytest.param(lambda: coefficients("gelu", 5, 4, (0.0, 1e-300)), ValueError, "fit_range=", id="range-tiny"),
        pytest.param(lambda: RationalActivation(dtype=torch.int64), ValueError, "dtype=torch.int64", id="int-dtype"),
        pytest.param(lambda: RationalActivation(5, 4, fit_range=(-1e-6, 1e-6), dtype=torch.float16), ValueError,
                     "dtype=torch.float16", id="coefficients-overflow-dtype"),
    ],
)
def test_rational_rejects_bad_arguments(call: Callable, exc: type[Exception], fragment: str) -> None:
    raises(exc, fragment, call)


A = torch.tensor(coefficients().numerator, dtype=torch.float64)
B = torch.tensor(coefficients().denominator, dtype=torch.float64)


@pytest.mark.parametrize(
    "call, exc, fragment",
    [
        pytest.param(lambda: RationalActivation()([1.0, 2.0]), TypeError, "x=", id="list"),
        pytest.param(lambda: RationalActivation()(torch.ones(2, dtype=torch.bool)), ValueError, "x.dtype=torch.bool",
                     id="bool"),
        pytest.param(lambda: RationalActivation()(torch.ones(2, dtype=torch.complex64)), ValueError,
                     "x.dtype=torch.complex64", id="complex"),
        pytest.param(lambda: rational(torch.ones(3), A[None], B, (-3.0, 3.0)), ValueError, "numerator.shape=(1, 6)",
                     id="numerator-2d"),
        pytest.param(lambda: rational(torch.ones(3), A, B[:0], (-3.0, 3.0)), ValueError, "denominator.shape=(0,)",
                     id="denominator-empty"),
        pytest.param(lambda: rational(torch.ones(3), A.tolist(), B, (-3.0, 3.0)), TypeError, "numerator=",
                     id="numerator-list"),
        pytest.param(lambda: rational(torch.ones(3), A, B, (3.0, -3.0)), ValueError, "fit_range=(3.0, -3.0)",
                     id="range-order"),
        pytest.param(lambda: rational(torch.ones(3), A, B, (NAN, 3.0)), ValueError, "fit_range=(nan, 3.0)",
                     id="range-nan"),
    ],
)
def test_rational_rejects_bad_inputs(call: Callable, exc: type[Exception], fragment: str) -> None:
    raises(exc, fragment, call)


def test_rational_of_an_empty_tensor_is_empty() -> None:
    act = RationalActivation(dtype=torch.float64)
    out = act(torch.empty(0, 3, dtype=torch.float64))
    assert out.shape == (0, 3) and out.dtype == torch.float64


# ------------------------------------------------------------------------------------------------ generator
@pytest.mark.parametrize(
    "kwargs, exc, fragment",
    [
        pytest.param({"hidden_size": 0}, ValueError, "hidden_size=0", id="hidden-zero"),
        pytest.param({"hidden_size": -1}, ValueError, "hidden_size=-1", id="hidden-negative"),
        pytest.param({"hidden_size": "12"}, TypeError, "hidden_size='12'", id="hidden-str"),
        pytest.param({"hidden_size": 12.0}, TypeError, "hidden_size=12.0", id="hidden-float"),
        pytest.param({"hidden_size": True}, TypeError, "hidden_size=True", id="hidden-bool"),
        pytest.param({"dtype": torch.int64}, ValueError, "dtype=torch.int64", id="int-dtype"),
        pytest.param({"config": IAPTConfig(bottleneck=8, hidden_size=64)}, ValueError, "hidden_size=12",
                     id="config-for-another-width"),
    ],
)
def test_generator_rejects_bad_arguments(kwargs: dict, exc: type[Exception], fragment: str) -> None:
    args = {"hidden_size": G, "config": CFG, **kwargs}
    raises(exc, fragment, lambda: PromptGenerator(args.pop("hidden_size"), args.pop("config"), **args))


HIDDEN, MASK = hidden_and_mask()


@pytest.mark.parametrize(
    "hidden, mask, exc, fragment",
    [
        pytest.param(HIDDEN.tolist(), MASK, TypeError, "hidden=", id="hidden-list"),
        pytest.param(HIDDEN[0], MASK, ValueError, "hidden.shape=(5, 12)", id="hidden-2d"),
        pytest.param(HIDDEN[..., :10], MASK, ValueError, "hidden.shape=(2, 5, 10)", id="hidden-width"),
        pytest.param(HIDDEN.long(), MASK, ValueError, "hidden.dtype=torch.int64", id="hidden-int"),
        pytest.param(with_nan(HIDDEN, 1, 2), MASK, ValueError, "hidden[1]", id="hidden-nan-in-instruction"),
        pytest.param(HIDDEN.clone().fill_(INF), MASK, ValueError, "hidden[0]", id="hidden-inf"),
        pytest.param(HIDDEN, MASK.tolist(), TypeError, "instruction_mask=", id="mask-list"),
        pytest.param(HIDDEN, MASK.double(), ValueError, "instruction_mask.dtype=torch.float64", id="mask-float"),
        pytest.param(HIDDEN, MASK.long() * 2, ValueError, "instruction_mask", id="mask-values"),
        pytest.param(HIDDEN, MASK[:, :4], ValueError, "instruction_mask.shape=(2, 4)", id="mask-shape"),
        pytest.param(HIDDEN, MASK & torch.tensor([[True], [False]]), ValueError, "instruction_mask[1]",
                     id="mask-row-without-instruction"),
        pytest.param(HIDDEN[:, :0], MASK[:, :0], ValueError, "hidden.shape=(2, 0, 12)", id="zero-tokens"),
    ],
)
def test_generator_rejects_bad_inputs(hidden: Any, mask: Any, exc: type[Exception], fragment: str) -> None:
    raises(exc, fragment, lambda: generator()(hidden, mask))


Z = torch.randn(2, 5, 8, dtype=torch.float64)
Q = torch.randn(4, 8, dtype=torch.float64)


@pytest.mark.parametrize(
    "args, exc, fragment",
    [
        pytest.param((Z, MASK & torch.tensor([[True], [False]]), Q, "last"), ValueError, "mask[1]",
                     id="row-without-instruction"),
        pytest.param((Z, MASK, Q[:, :5], "self_attn"), ValueError, "query.shape=(4, 5)", id="query-width"),
        pytest.param((Z[0], MASK, Q, "mean"), ValueError, "z.shape=(5, 8)", id="z-2d"),
        pytest.param((Z, MASK[:, :4], Q, "mean"), ValueError, "mask.shape=(2, 4)", id="mask-shape"),
        pytest.param((Z.tolist(), MASK, Q, "mean"), TypeError, "z=", id="z-list"),
        pytest.param((Z, MASK, Q, "max"), ValueError, "pooler='max'", id="pooler"),
    ],
)
def test_pool_rejects_bad_inputs(args: tuple, exc: type[Exception], fragment: str) -> None:
    raises(exc, fragment, lambda: pool(*args))


@pytest.mark.parametrize(
    "call, exc, fragment",
    [
        pytest.param(lambda: generator_parameter_count(-12, CFG), ValueError, "hidden_size=-12", id="hidden-negative"),
        pytest.param(lambda: generator_parameter_count(12.5, CFG), TypeError, "hidden_size=12.5", id="hidden-float"),
        pytest.param(lambda: iapt_parameter_count(12, 0, CFG), ValueError, "num_layers=0", id="layers-zero"),
        pytest.param(lambda: iapt_parameter_count(12, "2", CFG), TypeError, "num_layers='2'", id="layers-str"),
    ],
)
def test_parameter_counts_reject_bad_sizes(call: Callable, exc: type[Exception], fragment: str) -> None:
    raises(exc, fragment, call)


@pytest.mark.parametrize("pooler", ["self_attn", "mean", "last"])
def test_empty_generator_batch_gives_empty_prompts(pooler: str) -> None:
    gen = generator(IAPTConfig(bottleneck=8, init_scale=0.5, pooler=pooler))
    hidden, mask = hidden_and_mask(0, 5)
    out = gen(hidden, mask)
    assert out.shape == (0, 4, G) and out.dtype == torch.float64
    assert pool(torch.zeros(0, 5, 8), mask, Q.float(), pooler).shape == (0, 4, 8)


@pytest.mark.parametrize("pooler", ["self_attn", "mean", "last"])
def test_nan_outside_the_instruction_has_no_influence(pooler: str) -> None:
    """Backbones can leave NaN at padding; only instruction positions may reach the prompts (the reference pools
    the instruction positions alone)."""
    gen = generator(IAPTConfig(bottleneck=8, init_scale=0.5, pooler=pooler))
    hidden, mask = hidden_and_mask()
    hidden = with_nan(with_nan(hidden, 0, 4), 1, 3)
    with torch.no_grad():
        assert_close(gen(hidden, mask), prompts_reference(gen, hidden, mask))


@pytest.mark.parametrize("pooler", ["self_attn", "mean", "last"])
def test_one_instruction_token_and_integer_masks_match_the_reference(pooler: str) -> None:
    gen = generator(IAPTConfig(bottleneck=8, init_scale=0.5, pooler=pooler))
    hidden, _ = hidden_and_mask()
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 4], mask[1, 0] = True, True
    with torch.no_grad():
        ref = prompts_reference(gen, hidden, mask)
        assert_close(gen(hidden, mask), ref)
        assert torch.equal(gen(hidden, mask.to(torch.uint8)), gen(hidden, mask))


# ------------------------------------------------------------------------------------------------ slots
@pytest.mark.parametrize(
    "call, exc, fragment",
    [
        pytest.param(lambda: CachedPrompts("a", {}), ValueError, "prompts={}", id="cached-empty"),
        pytest.param(lambda: CachedPrompts(5, {0: torch.zeros(1, 4, D)}), TypeError, "adapter_name=5",
                     id="cached-name"),
        pytest.param(lambda: CachedPrompts("a", {0: torch.zeros(4, D)}), ValueError, "prompts[0].shape=(4, 32)",
                     id="cached-2d"),
        pytest.param(lambda: CachedPrompts("a", {0: torch.zeros(1, 4, D), 1: torch.zeros(2, 4, D)}), ValueError,
                     "prompts[1].shape=(2, 4, 32)", id="cached-rows-differ"),
        pytest.param(lambda: CachedPrompts("a", {"0": torch.zeros(1, 4, D)}), TypeError, "prompts=",
                     id="cached-layer-str"),
        pytest.param(lambda: find_layers(object()), TypeError, "model=", id="find-layers-not-module"),
        pytest.param(lambda: find_layers(nn.Sequential(), 5), TypeError, "layers_path=5", id="find-layers-path-int"),
        pytest.param(lambda: IAPTBatch(ids(), torch.ones(2, 5), torch.zeros(2, 6), None, torch.zeros(2, 1),
                                       torch.zeros(2, 5), []), ValueError, "attention_mask.shape=(2, 5)",
                     id="batch-shapes"),
    ],
)
def test_slots_reject_bad_arguments(call: Callable, exc: type[Exception], fragment: str) -> None:
    raises(exc, fragment, call)


# ------------------------------------------------------------------------------------------------ model
class NoConfig(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(2, 2)])


@pytest.mark.parametrize(
    "make, config, exc, fragment",
    [
        pytest.param(object, CFG, TypeError, "base_model=", id="not-a-module"),
        pytest.param(NoConfig, IAPTConfig(layers_path="layers"), ValueError, "base_model=", id="no-hf-config"),
        pytest.param(lambda: nn.Linear(2, 2), CFG, ValueError, "layers_path=None", id="no-layer-list"),
    ],
)
def test_wrong_backbones_are_refused(make: Callable, config: IAPTConfig, exc: type[Exception], fragment: str) -> None:
    raises(exc, fragment, lambda: get_iapt_model(make(), config))


@pytest.mark.parametrize("method", ["forward", "generate", "cache_prompts"])
@pytest.mark.parametrize(
    "shape, fragment",
    [pytest.param((0, 6), "input_ids.shape=(0, 6)", id="no-rows"),
     pytest.param((2, 0), "input_ids.shape=(2, 0)", id="no-tokens"),
     pytest.param((0, 0), "input_ids.shape=(0, 0)", id="nothing")],
)
def test_empty_batches_are_value_errors(model: IAPTModel, method: str, shape: tuple, fragment: str) -> None:
    kwargs = {"max_new_tokens": 2} if method == "generate" else {}
    raises(ValueError, fragment, lambda: getattr(model, method)(torch.zeros(shape, dtype=torch.long), **kwargs))


IDS = ids()
ONES = torch.ones_like(IDS)


@pytest.mark.parametrize(
    "kwargs, exc, fragment",
    [
        pytest.param({"input_ids": IDS.tolist()}, TypeError, "input_ids=", id="ids-list"),
        pytest.param({"input_ids": IDS.float()}, ValueError, "input_ids.dtype=torch.float32", id="ids-float"),
        pytest.param({"input_ids": IDS[0]}, ValueError, "input_ids.shape=(6,)", id="ids-1d"),
        pytest.param({"input_ids": IDS + V}, ValueError, "input_ids", id="ids-beyond-vocab"),
        pytest.param({"input_ids": IDS - 100}, ValueError, "input_ids", id="ids-negative"),
        pytest.param({"attention_mask": ONES.tolist()}, TypeError, "attention_mask=", id="attention-list"),
        pytest.param({"attention_mask": ONES[:, :5]}, ValueError, "attention_mask.shape=(2, 5)", id="attention-shape"),
        pytest.param({"attention_mask": ONES * 2}, ValueError, "attention_mask", id="attention-values"),
        pytest.param({"attention_mask": ONES.double().fill_(NAN)}, ValueError, "attention_mask", id="attention-nan"),
        pytest.param({"attention_mask": ONES * 0}, ValueError, "attention_mask", id="attention-row-of-zeros"),
        pytest.param({"instruction_mask": ONES.bool().tolist()}, TypeError, "instruction_mask=", id="instruction-list"),
        pytest.param({"instruction_mask": ONES.bool()[:, :5]}, ValueError, "instruction_mask", id="instruction-shape"),
        pytest.param({"instruction_mask": ONES.float()}, ValueError, "instruction_mask", id="instruction-float"),
        pytest.param({"instruction_mask": ONES * 3}, ValueError, "instruction_mask", id="instruction-values"),
        pytest.param({"instruction_mask": ONES.bool() & torch.tensor([[True], [False]])}, ValueError,
                     "instruction_mask[1]", id="instruction-row-without-token"),
        pytest.param({"labels": IDS[:, :4]}, ValueError, "labels.shape=(2, 4)", id="labels-shape"),
        pytest.param({"labels": IDS[:1], "instruction_mask": ONES.bool()}, ValueError, "labels.shape=(1, 6)",
                     id="labels-rows"),
        pytest.param({"labels": IDS.tolist()}, TypeError, "labels=", id="labels-list"),
        pytest.param({"cached_prompts": {0: torch.zeros(1, 4, D)}}, TypeError, "cached_prompts=", id="cached-dict"),
        pytest.param({"cached_prompts": CachedPrompts("default", {0: torch.zeros(1, 4, 16), 1: torch.zeros(1, 4, 16)})},
                     ValueError, "cached_prompts", id="cached-width"),
        pytest.param({"cached_prompts": CachedPrompts("default", {0: torch.zeros(1, 3, D), 1: torch.zeros(1, 3, D)})},
                     ValueError, "cached_prompts", id="cached-token-count"),
        pytest.param({"cached_prompts": CachedPrompts("default", {5: torch.zeros(1, 4, D)})}, ValueError,
                     "cached_prompts", id="cached-layer"),
    ],
)
def test_forward_rejects_bad_inputs(model: IAPTModel, kwargs: dict, exc: type[Exception], fragment: str) -> None:
    inputs = {"input_ids": IDS, **kwargs}
    raises(exc, fragment, lambda: model(**inputs))


@pytest.mark.parametrize(
    "call, exc, fragment",
    [
        pytest.param(lambda m, tmp: m.save_pretrained(tmp, adapter_names="default"), TypeError,
                     "adapter_names='default'", id="save-names-str"),
        pytest.param(lambda m, tmp: m.save_pretrained(5), TypeError, "save_directory=5", id="save-dir-int"),
        pytest.param(lambda m, tmp: IAPTModel.from_pretrained(backbone(), 5), TypeError, "path=5", id="load-path-int"),
        pytest.param(lambda m, tmp: m.load_adapter(None), TypeError, "path=None", id="load-adapter-none"),
        pytest.param(lambda m, tmp: m.cache_prompts(IDS, adapter_name=5), TypeError, "adapter_name=5",
                     id="cache-adapter-int"),
        pytest.param(lambda m, tmp: m.add_adapter(5, CFG), TypeError, "adapter_name=5", id="add-adapter-int"),
    ],
)
def test_adapter_io_rejects_bad_arguments(model: IAPTModel, tmp_path: Path, call: Callable, exc: type[Exception],
                                          fragment: str) -> None:
    raises(exc, fragment, lambda: call(model, tmp_path))


def test_valid_mask_dtypes_and_one_token_rows_match_the_reference(model: IAPTModel) -> None:
    """0/1 integer and float masks act as the bool ones; a batch of one-token rows equals each row alone."""
    with torch.no_grad():
        ref = model(IDS, attention_mask=ONES, instruction_mask=ONES.bool()).logits
        assert torch.equal(model(IDS, attention_mask=ONES.float(), instruction_mask=ONES.to(torch.uint8)).logits, ref)
        one = torch.tensor([[BOS], [7]])
        both = model(one).logits
        rows = torch.cat([model(one[i : i + 1]).logits for i in range(2)])
    assert both.shape == (2, 1, V)
    assert_close(both, rows)


# ------------------------------------------------------------------------------------------------ properties
def _finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# the documented domain of each numeric field, written out naively: the reference the config is checked against
FIELD_OK: dict[str, Callable[[Any], bool]] = {
    "num_soft_tokens": lambda v: _integer(v) and v >= 1,
    "bottleneck": lambda v: _integer(v) and v >= 1,
    "rational_num_degree": lambda v: _integer(v) and 1 <= v <= 16,
    "rational_den_degree": lambda v: _integer(v) and 1 <= v <= 16,
    "rational_range": lambda v: _finite_number(v) and 0 < v <= 1e3,
    "init_scale": lambda v: _finite_number(v) and 0 <= v <= 1e3,
    "gate_scale": lambda v: _finite_number(v) and 0 < v <= 1e4,
    "dropout": lambda v: _finite_number(v) and 0 <= v < 1,
    "hidden_size": lambda v: v is None or (_integer(v) and v >= 1),
    "num_layers": lambda v: v is None or (_integer(v) and v >= 1),
}
VALUES = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-20, 20), st.sampled_from(
    [0.0, 1.0, 0.999, 1e3, 1e4, 1e300, -0.0, True, None, "3"]))


@settings(max_examples=30, deadline=None)
@given(values=st.dictionaries(st.sampled_from(sorted(FIELD_OK)), VALUES, min_size=1, max_size=3))
def test_config_property_accepts_exactly_the_documented_domain(values: dict[str, Any]) -> None:
    bad = [name for name, value in values.items() if not FIELD_OK[name](value)]
    if bad:
        with pytest.raises((ValueError, TypeError)) as info:
            IAPTConfig(**values)
        assert any(f"{name}=" in str(info.value) for name in bad), str(info.value)
        return
    event("accepted")
    config = IAPTConfig(**values)
    assert all(getattr(config, name) == value for name, value in values.items())
    assert IAPTConfig.from_dict(config.to_dict()) == config


def _continued_reference(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """The naive formula inside [lo, hi]; beyond it the tangent at the edge (slope by autograd of the formula)."""
    out = []
    for v in x.tolist():
        edge = torch.tensor(min(max(v, lo), hi), dtype=torch.float64, requires_grad=True)
        value = rational_reference(edge, a, b)
        (slope,) = torch.autograd.grad(value, edge)
        out.append(value.item() + slope.item() * (v - edge.item()))
    return torch.tensor(out, dtype=torch.float64)


SPECIAL = st.sampled_from([NAN, INF, -INF])
XS = st.lists(st.one_of(st.floats(-1e6, 1e6), SPECIAL), max_size=12)


@settings(max_examples=30, deadline=None)
@given(xs=XS, perturb=st.lists(st.floats(-0.3, 0.3), min_size=10, max_size=10),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_rational_property_finite_in_finite_and_correct(xs: list[float], perturb: list[float],
                                                        dtype: torch.dtype) -> None:
    """Finite inputs give finite values equal to the naive formula (continued linearly beyond the range), with
    trained (perturbed) coefficients too; NaN and infinities propagate as in torch's activations, elementwise."""
    act = RationalActivation(dtype=dtype)
    with torch.no_grad():
        act.numerator.add_(torch.tensor(perturb[:6], dtype=dtype))
        act.denominator.add_(torch.tensor(perturb[6:], dtype=dtype))
        x = torch.tensor(xs, dtype=dtype)
        y = act(x)
    finite = torch.isfinite(x)
    assert y.shape == x.shape and y.dtype == dtype
    assert torch.isfinite(y[finite]).all() and not torch.isfinite(y[~finite]).any()
    assert torch.isnan(y[torch.isnan(x)]).all()
    ref = _continued_reference(x[finite].double(), act.numerator.detach().double(), act.denominator.detach().double(),
                               -3.0, 3.0)
    if dtype == torch.float64:
        assert_close(y[finite], ref)
    else:  # float32 Horner against the float64 formula: a few ulps of the terms, which reach |x| at most
        torch.testing.assert_close(y[finite].double(), ref, rtol=1e-5, atol=1e-5)


BAD_DEGREES = st.one_of(st.integers(-5, 0), st.integers(17, 10**6), st.booleans(), st.text(max_size=2),
                        st.floats(allow_nan=True, allow_infinity=True))
BAD_RANGES = st.one_of(st.sampled_from([(3.0, -3.0), (1.0, 1.0), (-1e4, 1e4), (0.0, 1e-300), "ab", None, (1, 2, 3)]),
                       st.tuples(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([NAN, INF, -INF])))


@st.composite
def _mostly(draw: st.DrawFn, valid: st.SearchStrategy, bad: st.SearchStrategy) -> Any:
    """Valid in about three draws of four (one valid fit, cached after the first draw: a fit takes ~1 s)."""
    return draw(bad) if draw(st.integers(0, 3)) == 0 else draw(valid)


@settings(max_examples=30, deadline=None)
@given(init=_mostly(st.just("gelu"), st.sampled_from(["tanh", "GELU", 3, None])),
       num=_mostly(st.just(5), BAD_DEGREES), den=_mostly(st.just(4), BAD_DEGREES),
       fit_range=_mostly(st.sampled_from([(-3.0, 3.0), (-3, 3)]), BAD_RANGES))
def test_rational_property_construction(init: Any, num: Any, den: Any, fit_range: Any) -> None:
    """Random arguments: a ValueError/TypeError, or an activation with finite coefficients that matches the
    naive formula on its range."""
    try:
        act = RationalActivation(num, den, init, fit_range, dtype=torch.float64)
    except (ValueError, TypeError) as exc:
        assert "is invalid: expected" in str(exc), str(exc)
        return
    event("valid arguments")
    assert all(math.isfinite(v) for v in (*act.numerator.tolist(), *act.denominator.tolist()))
    lo, hi = act.fit_range
    x = torch.linspace(lo, hi, 101, dtype=torch.float64)
    with torch.no_grad():
        assert_close(act(x), rational_reference(x, act.numerator, act.denominator))
