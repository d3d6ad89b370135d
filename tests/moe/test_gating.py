"""Top-K softmax gate conventions and router losses, against naive formulas and transformers' own functions."""

from __future__ import annotations

import pytest
import torch
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter, load_balancing_loss_func

from leanfit.moe.gating import router_z_loss, switch_load_balancing_loss, topk_gate_weights, topk_softmax_gate
from tests.tolerances import assert_close


def _logits_with_ties(tokens=600, experts=8, seed=0):
    logits = torch.randn(tokens, experts, generator=torch.Generator().manual_seed(seed))
    logits[:100] = 0.0  # every expert tied
    logits[100:200, :4] = 1.5  # a tie group straddling most K
    logits[200:300] = logits[200:300].round()  # scattered ties
    return logits


@pytest.mark.parametrize("k", [1, 2, 3, 8], ids=["K1", "K2", "K3", "K=E"])
def test_gate_keeps_exactly_k_experts_summing_to_one(k):
    logits = _logits_with_ties()
    weights, indices = topk_softmax_gate(logits, k)
    nonzero = weights > 0
    assert (nonzero.sum(-1) == k).all(), nonzero.sum(-1).unique()
    assert_close(weights.sum(-1), torch.ones(len(logits)))
    # the non-zeros are exactly the selected experts, each selected once
    assert (nonzero.gather(1, indices)).all() and (torch.sort(indices, -1).values.diff(dim=-1) > 0).all()
    # and they carry the largest logits: no unselected expert beats a selected one
    assert (logits.gather(1, indices).amin(-1) >= logits.masked_fill(nonzero, -torch.inf).amax(-1)).all()


@pytest.mark.parametrize("k", [1, 2, 4], ids=["K1", "K2", "K4"])
def test_default_gate_equals_the_mixtral_router(k):
    config = MixtralConfig(hidden_size=12, num_local_experts=6, num_experts_per_tok=k)
    router = MixtralTopKRouter(config)
    torch.nn.init.normal_(router.weight, std=0.5, generator=torch.Generator().manual_seed(1))
    x = torch.randn(200, 12, generator=torch.Generator().manual_seed(2))
    logits, scores, indices = router(x)
    weights, got_indices = topk_softmax_gate(logits, k)
    assert torch.equal(got_indices, indices)
    assert_close(weights.gather(1, got_indices), scores)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
def test_unnormalised_gate_is_the_masked_full_softmax(dtype):
    logits = (3 * torch.randn(300, 6, generator=torch.Generator().manual_seed(3))).to(dtype)
    weights, indices = topk_softmax_gate(logits, 2, renormalize=False)
    assert weights.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    full = torch.softmax(logits.double(), -1)
    expected = torch.zeros_like(full).scatter(1, indices, full.gather(1, indices))
    assert torch.equal(indices.sort(-1).values, logits.double().topk(2).indices.sort(-1).values)
    assert_close(weights, expected)  # bf16 logits are gated in float32: the float32 tolerance applies
    assert (weights.sum(-1) < 1).all()


def test_renormalised_gate_is_the_softmax_over_the_selected_logits():
    logits = torch.randn(50, 7, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    top, indices = topk_gate_weights(logits, 3)
    torch.testing.assert_close(top, torch.softmax(logits.gather(1, indices), -1), rtol=1e-14, atol=1e-16)
    full = torch.softmax(logits, -1).gather(1, indices)
    torch.testing.assert_close(top, full / full.sum(-1, keepdim=True), rtol=1e-13, atol=1e-16)


def test_slope_only_selection_picks_the_set_by_the_selection_scores_and_weights_by_the_logits():
    # the paper's gate: slopes beta_1 . x choose the set, the full logits (with intercepts) weight it
    slope = torch.tensor([[0.0, 1.0, 2.0, -5.0], [3.0, -1.0, 0.5, 0.0]], dtype=torch.float64)
    intercept = torch.tensor([3.0, 1.0, -2.0, 4.0], dtype=torch.float64)
    logits = slope + intercept
    weights, indices = topk_softmax_gate(logits, 2, selection_logits=slope)
    assert [sorted(r) for r in indices.tolist()] == [[1, 2], [0, 2]]
    for row, chosen in enumerate(([1, 2], [0, 2])):
        torch.testing.assert_close(weights[row, chosen], torch.softmax(logits[row, chosen], -1))
        assert weights[row].count_nonzero() == 2
    # selecting on the full logits (logits [[3, 2, 0, -1], [6, 0, -1.5, 4]]) keeps other sets
    assert [sorted(r) for r in topk_softmax_gate(logits, 2)[1].tolist()] == [[0, 1], [0, 3]]


def test_far_apart_selected_logits_give_no_nan():
    # selection by slopes can keep experts whose full logits are all far below the best one
    logits = torch.tensor([[200.0, -300.0, -301.0]])
    weights, _ = topk_softmax_gate(logits, 2, selection_logits=torch.tensor([[0.0, 1.0, 1.0]]))
    torch.testing.assert_close(weights, torch.softmax(torch.tensor([[-torch.inf, -300.0, -301.0]]), -1))


@pytest.mark.parametrize("k", [1, 2], ids=["K1", "K2"])
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "attention-mask"])
def test_load_balancing_loss_equals_transformers(masked, k):
    logits = torch.randn(3 * 11, 6, generator=torch.Generator().manual_seed(6))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 9:] = 0
    attention = mask if masked else None
    expected = load_balancing_loss_func((logits,), 6, top_k=k, attention_mask=attention)
    probs = torch.softmax(logits, -1)
    got = switch_load_balancing_loss(probs, probs.topk(k).indices, 6, attention)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


def test_load_balancing_loss_ignores_whatever_padding_rows_hold():
    logits = torch.randn(20, 5, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    probs, indices = torch.softmax(logits, -1), logits.topk(2).indices
    mask = torch.arange(20) < 13
    garbage_probs, garbage_indices = probs.clone(), indices.clone()
    garbage_probs[13:] = torch.inf
    garbage_indices[13:] = 0
    got = switch_load_balancing_loss(garbage_probs, garbage_indices, 5, mask)
    # naive formula over the 13 real tokens: E * sum_e (assignments to e / n) * (mean prob of e)
    f = torch.zeros(5, dtype=torch.float64)
    for row in indices[:13].tolist():
        for e in row:
            f[e] += 1 / 13
    expected = 5 * (f * probs[:13].mean(0)).sum()
    torch.testing.assert_close(got, expected, rtol=1e-14, atol=0)
    balanced = switch_load_balancing_loss(torch.full((4, 4), 0.25), torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]]), 4)
    assert float(balanced) == pytest.approx(2.0)  # a perfectly balanced router scores K


def test_z_loss_is_the_mean_squared_logsumexp_over_real_tokens():
    logits = torch.randn(10, 4, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    mask = torch.tensor([1, 1, 1, 0, 1, 1, 1, 1, 0, 1])
    logits[3] = torch.inf  # a padding row may hold anything
    expected = sum(float(torch.log(torch.exp(logits[i]).sum())) ** 2 for i in range(10) if mask[i]) / 8
    assert float(router_z_loss(logits, mask)) == pytest.approx(expected, rel=1e-13)
    unmasked = sum(float(torch.log(torch.exp(logits[i]).sum())) ** 2 for i in range(10) if i != 3) / 9
    assert float(router_z_loss(logits[torch.arange(10) != 3])) == pytest.approx(unmasked, rel=1e-13)
    assert float(router_z_loss(logits, torch.zeros(10))) == 0.0  # no real token: 0, not nan


@pytest.mark.parametrize("k", [0, 5, -1, 2.0, True], ids=["zero", "above-E", "negative", "float", "bool"])
def test_bad_top_k_names_the_parameter_value_and_fix(k):
    with pytest.raises(ValueError, match=rf"top_k={k!r} is invalid for num_experts=4.*pass top_k between 1 and 4"):
        topk_softmax_gate(torch.zeros(3, 4), k)


def test_bad_shapes():
    with pytest.raises(ValueError, match=r"selection_logits has shape \(3, 5\)"):
        topk_softmax_gate(torch.zeros(3, 4), 2, selection_logits=torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"logits has shape \(2, 3, 4\)"):
        topk_softmax_gate(torch.zeros(2, 3, 4), 2)
    with pytest.raises(ValueError, match="padding_mask has 4 entries"):
        router_z_loss(torch.zeros(3, 4), torch.ones(4))
