"""SparseMoE against Hugging Face's Mixtral block and a token-by-token reference; gate and router losses."""

from __future__ import annotations

import math

import pytest
import torch
from tests.reference import sparse_moe_reference
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock, load_balancing_loss_func

from leanfit.moe.gating import router_z_loss, switch_load_balancing_loss, topk_softmax_gate
from leanfit.moe.layer import SparseMoE


def mixtral_block(d=16, inter=24, experts=4, k=2, seed=0):
    torch.manual_seed(seed)
    cfg = MixtralConfig(hidden_size=d, intermediate_size=inter, num_local_experts=experts, num_experts_per_tok=k,
                        hidden_act="silu")  # fmt: skip
    block = MixtralSparseMoeBlock(cfg).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, d**-0.5)
    return block


@pytest.mark.parametrize(("experts", "k"), [(4, 1), (4, 2), (8, 2), (4, 4)], ids=["E4K1", "E4K2", "E8K2", "E4K4"])
def test_equals_the_mixtral_block(experts, k):
    block = mixtral_block(experts=experts, k=k)
    layer = SparseMoE.from_mixtral(block)
    x = torch.randn(3, 37, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = block(x.clone())
        got = layer(x).hidden
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("renormalize", [True, False])
def test_forward_and_gradients_match_the_float64_reference(renormalize):
    layer = SparseMoE(8, 12, 5, 2, renormalize=renormalize).double()
    x = torch.randn(29, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    out = layer(x).hidden
    ref_params = [p.detach().clone().requires_grad_(True) for p in (layer.router.weight, layer.gate_up_proj, layer.down_proj)]
    x_ref = x.detach().clone().requires_grad_(True)
    ref = sparse_moe_reference(x_ref, *ref_params, 2, renormalize)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    cot = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, layer.router.weight, layer.gate_up_proj, layer.down_proj], cot)
    ref_grads = torch.autograd.grad(ref, [x_ref, *ref_params], cot)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_capacity_drops_the_latest_tokens_of_full_experts():
    layer = SparseMoE(8, 12, 4, 2, capacity_factor=0.5).double()
    x = torch.randn(40, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out = layer(x)
    capacity = math.ceil(0.5 * 40 * 2 / 4)
    ref = sparse_moe_reference(x, layer.router.weight, layer.gate_up_proj, layer.down_proj, 2, capacity=capacity)
    torch.testing.assert_close(out.hidden, ref, rtol=1e-12, atol=1e-12)
    counts = torch.bincount(out.router_logits.topk(2).indices.reshape(-1), minlength=4)
    assert out.dropped == int((counts - capacity).clamp(min=0).sum()) > 0
    assert SparseMoE(8, 12, 4, 2)(x.float()).dropped == 0


@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_gate_keeps_exactly_k_experts_summing_to_one(k):
    logits = torch.randn(500, 8, generator=torch.Generator().manual_seed(4))
    logits[:50] = 0.0  # all tied
    logits[50:100, :4] = 1.5  # partly tied
    weights, indices = topk_softmax_gate(logits, k)
    assert ((weights > 0).sum(-1) == k).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(500), rtol=1e-6, atol=1e-6)
    assert torch.equal(torch.sort(indices, -1).values, torch.sort(weights.topk(k).indices, -1).values)


def test_unnormalised_gate_is_the_masked_full_softmax():
    logits = torch.randn(100, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    weights, indices = topk_softmax_gate(logits, 2, renormalize=False)
    full = torch.softmax(logits, -1)
    expected = torch.zeros_like(full).scatter(1, full.topk(2).indices, full.topk(2).values)
    torch.testing.assert_close(weights, expected, rtol=1e-14, atol=1e-16)
    assert (weights.sum(-1) < 1).all()


def test_slope_only_selection_uses_the_selection_scores_for_the_set_and_the_logits_for_the_weights():
    logits = torch.tensor([[3.0, 2.0, 0.0, -1.0]], dtype=torch.float64)
    selection = torch.tensor([[0.0, 1.0, 2.0, -5.0]], dtype=torch.float64)
    weights, indices = topk_softmax_gate(logits, 2, selection_logits=selection)
    assert sorted(indices[0].tolist()) == [1, 2]
    expected = torch.softmax(torch.tensor([2.0, 0.0], dtype=torch.float64), -1)
    torch.testing.assert_close(weights[0, [1, 2]], expected)


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "padding"])
def test_load_balancing_loss_equals_transformers(masked):
    logits = torch.randn(2 * 9, 6, generator=torch.Generator().manual_seed(6))
    mask = torch.ones(2, 9)
    mask[1, 5:] = 0
    expected = load_balancing_loss_func((logits,), 6, top_k=2, attention_mask=mask if masked else None)
    got = switch_load_balancing_loss(logits, logits.topk(2).indices, 6, mask if masked else None)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    # padding changes the loss (it is excluded, not counted)
    assert masked == (not torch.allclose(got, switch_load_balancing_loss(logits, logits.topk(2).indices, 6)))


def test_z_loss_is_the_mean_squared_logsumexp_over_real_tokens():
    logits = torch.randn(10, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    mask = torch.tensor([1, 1, 1, 0, 1, 1, 1, 1, 0, 1])
    expected = sum(float(torch.logsumexp(logits[i], 0)) ** 2 for i in range(10) if mask[i]) / 8
    assert float(router_z_loss(logits, mask)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(("kwargs", "fragment"), [({"top_k": 0}, "top_k=0"), ({"top_k": 5}, "top_k=5"),
                                                  ({"capacity_factor": 0.0}, "capacity_factor=0.0")])  # fmt: skip
def test_bad_settings(kwargs, fragment):
    args = {"hidden_size": 8, "intermediate_size": 8, "num_experts": 4, "top_k": 2, **kwargs}
    with pytest.raises(ValueError, match=fragment):
        SparseMoE(**args)
    with pytest.raises(ValueError, match="top_k=9"):
        topk_softmax_gate(torch.zeros(3, 4), 9)
    with pytest.raises(ValueError, match="hidden_size=8"):
        SparseMoE(8, 8, 4, 2)(torch.zeros(3, 7))
