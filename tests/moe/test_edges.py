"""Edge inputs at the boundary of the moe layer, gate and Voronoi functions: one parametrized test per kind of bad
input (the exception type and a message fragment naming the parameter), and the reference results of valid edge
inputs (empty batches, NaN in padding tokens, top_k = number of experts)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from leanfit.moe.gating import (
    check_top_k,
    router_z_loss,
    switch_load_balancing_loss,
    topk_gate_weights,
    topk_softmax_gate,
)
from leanfit.moe.layer import SparseMoE
from leanfit.moe.voronoi import MixingMeasure, per_parameter_errors, voronoi_cells, voronoi_loss
from tests.errors import assert_user_error
from tests.reference import sparse_moe_reference
from tests.tolerances import assert_close

NAN, INF = float("nan"), float("inf")
D, INTER, E = 8, 6, 4
LOGITS = torch.randn(5, E, generator=torch.Generator().manual_seed(0))
TRUE = {"gate_intercept": [0.5, 0.0], "gate_coef": [[2.0], [0.0]], "coef": [[1.0], [-1.0]], "intercept": [0.0, 1.0],
        "var": [0.1, 0.2]}


def _raises(exc: type[Exception], fragments: str | tuple[str, ...], call: Callable[[], Any]) -> None:
    assert_user_error(exc, fragments, call, expected=True)


def _layer(**kwargs: Any) -> SparseMoE:
    torch.manual_seed(0)
    return SparseMoE(**({"hidden_size": D, "intermediate_size": INTER, "num_experts": E, "top_k": 2} | kwargs))


def _with(row: int, value: float, shape: tuple[int, ...] = (5, E)) -> torch.Tensor:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    x.view(-1)[row] = value
    return x


TOP_K = [pytest.param(0, id="top_k-0"), pytest.param(E + 1, id="top_k-above-E"), pytest.param(-1, id="top_k-negative"),
         pytest.param(1.5, id="top_k-float"), pytest.param(True, id="top_k-bool"), pytest.param("2", id="top_k-str"),
         pytest.param(None, id="top_k-none")]


@pytest.mark.parametrize("top_k", TOP_K)
@pytest.mark.parametrize("where", ["layer", "gate", "check"])
def test_bad_top_k(where: str, top_k: Any) -> None:
    calls = {"layer": lambda: _layer(top_k=top_k), "gate": lambda: topk_softmax_gate(LOGITS, top_k),
             "check": lambda: check_top_k(top_k, E)}
    _raises(ValueError, f"top_k={top_k!r}", calls[where])


@pytest.mark.parametrize(
    ("kwargs", "exc", "fragment"),
    [
        pytest.param({"capacity_factor": INF}, ValueError, "capacity_factor=inf", id="capacity-inf"),
        pytest.param({"capacity_factor": NAN}, ValueError, "capacity_factor=nan", id="capacity-nan"),
        pytest.param({"capacity_factor": True}, ValueError, "capacity_factor=True", id="capacity-bool"),
        pytest.param({"hidden_size": 0}, ValueError, "hidden_size=0", id="hidden-size-zero"),
        pytest.param({"intermediate_size": 2.0}, ValueError, "intermediate_size=2.0", id="intermediate-float"),
        pytest.param({"renormalize": "yes"}, TypeError, "renormalize='yes'", id="renormalize-str"),
    ],
)
def test_layer_settings_rejected(kwargs: dict, exc: type[Exception], fragment: str) -> None:
    _raises(exc, fragment, lambda: _layer(**kwargs))


@pytest.mark.parametrize(
    ("hidden", "mask", "exc", "fragment"),
    [
        pytest.param(_with(3, NAN, (2, 3, D)), None, ValueError, "hidden=", id="nan"),
        pytest.param(_with(0, INF, (4, D)), None, ValueError, "hidden=", id="inf"),
        pytest.param(_with(9, -INF, (2, 3, D)), torch.ones(2, 3), ValueError, "hidden=", id="inf-in-real-token"),
        pytest.param(torch.tensor(1.0), None, ValueError, "hidden", id="0-d"),
        pytest.param(torch.ones(3, 7), None, ValueError, "hidden has shape (3, 7)", id="wrong-d"),
        pytest.param(torch.ones(3, D, dtype=torch.long), None, TypeError, "hidden=", id="integer"),
        pytest.param([[0.0] * D], None, TypeError, "hidden=", id="list"),
        pytest.param(torch.ones(2, 3, D), torch.ones(5), ValueError, "padding_mask has 5 entries", id="mask-size"),
    ],
)
def test_layer_forward_rejects(hidden: Any, mask: Any, exc: type[Exception], fragment: str) -> None:
    _raises(exc, fragment, lambda: _layer()(hidden, mask))


@pytest.mark.parametrize(
    ("call", "exc", "fragment"),
    [
        pytest.param(lambda: topk_gate_weights(LOGITS[0], 2), ValueError, "logits has shape (4,)", id="logits-1d"),
        pytest.param(lambda: topk_gate_weights(_with(7, NAN), 2), ValueError, "logits=", id="logits-nan"),
        pytest.param(lambda: topk_softmax_gate(_with(2, INF), 2), ValueError, "logits=", id="logits-inf"),
        pytest.param(lambda: topk_softmax_gate(LOGITS.tolist(), 2), TypeError, "logits=", id="logits-list"),
        pytest.param(lambda: topk_softmax_gate(LOGITS, 2, selection_logits=_with(1, NAN)), ValueError,
                     "selection_logits=", id="selection-nan"),
        pytest.param(lambda: topk_softmax_gate(LOGITS, 2, selection_logits=LOGITS[:, :3]), ValueError,
                     "selection_logits has shape (5, 3)", id="selection-shape"),
    ],
)
def test_gate_rejects(call: Callable[[], Any], exc: type[Exception], fragment: str) -> None:
    _raises(exc, fragment, call)


PROBS = LOGITS.softmax(-1)
IDX = LOGITS.topk(2).indices


@pytest.mark.parametrize(
    ("call", "exc", "fragment"),
    [
        pytest.param(lambda: switch_load_balancing_loss(PROBS[0], IDX, E), ValueError, "router_probs",
                     id="switch-probs-1d"),
        pytest.param(lambda: switch_load_balancing_loss(_with(3, NAN), IDX, E), ValueError, "router_probs=",
                     id="switch-probs-nan"),
        pytest.param(lambda: switch_load_balancing_loss(PROBS, IDX[:3], E), ValueError, "expert_indices",
                     id="switch-indices-tokens"),
        pytest.param(lambda: switch_load_balancing_loss(PROBS, IDX + E, E), ValueError, "expert_indices=",
                     id="switch-indices-range"),
        pytest.param(lambda: switch_load_balancing_loss(PROBS, IDX.float(), E), TypeError, "expert_indices",
                     id="switch-indices-float"),
        pytest.param(lambda: switch_load_balancing_loss(PROBS, IDX, 0), ValueError, "num_experts=0",
                     id="switch-experts-zero"),
        pytest.param(lambda: switch_load_balancing_loss(PROBS, IDX, E + 1), ValueError, "num_experts=5",
                     id="switch-experts-mismatch"),
        pytest.param(lambda: switch_load_balancing_loss(PROBS, IDX, E, torch.ones(4)), ValueError,
                     "padding_mask has 4 entries", id="switch-mask-size"),
        pytest.param(lambda: router_z_loss(LOGITS[0]), ValueError, "router_logits", id="z-1d"),
        pytest.param(lambda: router_z_loss(_with(0, NAN)), ValueError, "router_logits=", id="z-nan"),
        pytest.param(lambda: router_z_loss("logits"), TypeError, "router_logits=", id="z-str"),
    ],
)
def test_router_losses_reject(call: Callable[[], Any], exc: type[Exception], fragment: str) -> None:
    _raises(exc, fragment, call)


def _measure(**changes: Any) -> dict[str, Any]:
    return TRUE | changes


@pytest.mark.parametrize(
    ("call", "exc", "fragment"),
    [
        pytest.param(lambda: MixingMeasure.of(_measure(var=[0.1, NAN])), ValueError, "var=", id="nan"),
        pytest.param(lambda: MixingMeasure.of(_measure(gate_coef=[[INF], [0.0]])), ValueError, "gate_coef=",
                     id="inf"),
        pytest.param(lambda: MixingMeasure.of(_measure(var=[0.1, -0.2])), ValueError, "var=", id="var-negative"),
        pytest.param(lambda: MixingMeasure.of(_measure(coef=[[1.0], [2.0], [3.0]])), ValueError, "coef=",
                     id="rows-mismatch"),
        pytest.param(lambda: MixingMeasure.of(_measure(intercept=[0.0])), ValueError, "intercept=",
                     id="intercept-size"),
        pytest.param(lambda: MixingMeasure.of({k: v for k, v in TRUE.items() if k != "var"}), ValueError, "var",
                     id="missing-key"),
        pytest.param(lambda: MixingMeasure.of("model"), TypeError, "model='model'", id="not-a-model"),
        pytest.param(lambda: MixingMeasure.of({k: [] for k in TRUE}), ValueError, "gate_intercept=", id="empty"),
        pytest.param(lambda: voronoi_loss(_measure(gate_coef=[[1.0, 0.0], [0.0, 0.0]], coef=[[1.0, 0.0], [0.0, 1.0]]),
                                          TRUE), ValueError, "fitted", id="dims-differ"),
        pytest.param(lambda: voronoi_cells(TRUE, "x"), TypeError, "model='x'", id="cells-not-a-model"),
        pytest.param(lambda: voronoi_loss(TRUE, TRUE, rbar={1: 0}), ValueError, "rbar=", id="rbar-zero"),
        pytest.param(lambda: per_parameter_errors(TRUE, _measure(var=[0.1, NAN])), ValueError, "var=",
                     id="errors-nan"),
    ],
)
def test_voronoi_rejects(call: Callable[[], Any], exc: type[Exception], fragment: str) -> None:
    _raises(exc, fragment, call)


# --- valid edge inputs give the reference result ---


@pytest.mark.parametrize("k", [1, 2, E], ids=["K1", "K2", "K=E"])
def test_gate_empty_batch(k: int) -> None:
    weights, indices = topk_softmax_gate(torch.zeros(0, E), k)
    assert weights.shape == (0, E) and indices.shape == (0, k) and indices.dtype == torch.int64
    top, idx = topk_gate_weights(torch.zeros(0, E, dtype=torch.float64), k)
    assert top.shape == (0, k) and top.dtype == torch.float64 and idx.shape == (0, k)


def test_router_losses_empty_batch_are_zero() -> None:
    empty = torch.zeros(0, E)
    assert float(switch_load_balancing_loss(empty, torch.zeros(0, 2, dtype=torch.long), E)) == 0.0
    assert float(router_z_loss(empty)) == 0.0


@pytest.mark.parametrize("capacity_factor", [None, 1.0], ids=["dropless", "capacity"])
@pytest.mark.parametrize("shape", [(0, D), (2, 0, D)], ids=["0-tokens", "0-seq"])
def test_layer_empty_batch(shape: tuple[int, ...], capacity_factor: float | None) -> None:
    layer = _layer(capacity_factor=capacity_factor)
    hidden = torch.zeros(*shape, requires_grad=True)
    out = layer(hidden)
    assert out.hidden.shape == shape and out.router_logits.shape == (0, E) and out.dropped == 0
    assert float(out.aux_loss.detach()) == 0.0 and float(out.z_loss.detach()) == 0.0
    (out.hidden.sum() + out.aux_loss).backward()
    assert hidden.grad is not None and hidden.grad.shape == shape


def test_layer_nan_in_padding_is_ignored() -> None:
    """Padding tokens are never dispatched: NaN there changes nothing, and real tokens match the reference."""
    layer = _layer()
    hidden = torch.randn(2, 3, D, generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    clean = layer(hidden, mask)
    dirty = hidden.clone()
    dirty[0, 2] = NAN
    dirty[1, 1] = INF
    out = layer(dirty, mask)
    assert torch.equal(out.hidden, clean.hidden) and torch.equal(out.aux_loss, clean.aux_loss)
    assert torch.equal(out.z_loss, clean.z_loss)
    ref, _ = sparse_moe_reference(hidden.reshape(-1, D).double(), layer.router.weight.double(),
                                  layer.gate_up_proj.double(), layer.down_proj.double(), 2,
                                  real=mask.reshape(-1).bool())
    assert_close(out.hidden.reshape(-1, D), ref.float())


def test_layer_top_k_equal_to_experts_is_dense() -> None:
    layer = _layer(top_k=E)
    x = torch.randn(7, D, generator=torch.Generator().manual_seed(3))
    ref, _ = sparse_moe_reference(x.double(), layer.router.weight.double(), layer.gate_up_proj.double(),
                                  layer.down_proj.double(), E)
    assert_close(layer(x).hidden, ref.float())


def test_voronoi_single_expert_measure() -> None:
    one = {"gate_intercept": [0.0], "gate_coef": [[0.0]], "coef": [[1.0]], "intercept": [0.0], "var": [0.1]}
    assert voronoi_loss(one, one) == 0.0 and [c.tolist() for c in voronoi_cells(one, one)] == [[0]]
    assert np.isfinite(per_parameter_errors(one, one)[0]["coef"])
