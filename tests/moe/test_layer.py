"""SparseMoE against Hugging Face's Mixtral block and the token-by-token float64 reference in tests/reference.py."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock, load_balancing_loss_func

from leanfit.moe.layer import SparseMoE
from tests.reference import sparse_moe_reference
from tests.tolerances import assert_close

D, INTER = 16, 24
CASES = [(4, 1), (4, 2), (8, 2), (4, 4), (8, 3)]
CASE_IDS = ["E4K1", "E4K2", "E8K2", "E4K4=E", "E8K3"]


def mixtral_block(experts, k, seed=0):
    torch.manual_seed(seed)
    config = MixtralConfig(hidden_size=D, intermediate_size=INTER, num_local_experts=experts, num_experts_per_tok=k,
                           hidden_act="silu")
    config._experts_implementation = "eager"
    block = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, D**-0.5)
    return block


def weights(layer):
    return [layer.router.weight, layer.gate_up_proj, layer.down_proj]


def _inputs(shape, dtype=torch.float32, seed=1):
    return torch.randn(*shape, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _reference(layer, x, **kwargs):
    """The reference in float64 on (float64 copies of) the layer's weights, with gradients enabled."""
    params = [p.detach().double().requires_grad_() for p in weights(layer)]
    x64 = x.detach().double().reshape(-1, D).requires_grad_()
    out, dropped = sparse_moe_reference(x64, *params, layer.top_k, layer.renormalize, **kwargs)
    return out, dropped, [x64, *params]


@pytest.mark.parametrize(("experts", "k"), CASES, ids=CASE_IDS)
def test_equals_the_mixtral_block_forward_and_backward(experts, k):
    block = mixtral_block(experts, k)
    layer = SparseMoE.from_mixtral(block, block_rows=16)  # several blocks per expert
    x = _inputs((3, 37)).requires_grad_()
    got, expected = layer(x).hidden, block(x)
    assert_close(got, expected)
    cot = torch.randn_like(got)
    ours = torch.autograd.grad(got, [x, *weights(layer)], cot)
    theirs = torch.autograd.grad(expected, [x, *block.parameters()], cot)
    for name, g, h in zip(("input", "router", "gate_up_proj", "down_proj"), ours, theirs, strict=True):
        # local atol: with K=1 renormalised the router gradient is exactly 0 here, float32 noise (~2e-6) in Mixtral's
        torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def _rel_err(got, ref):
    """max |got - ref| / max |ref|, with a floor on the scale (the router gradient is exactly 0 for K=1 renormalised)."""
    return float((got.detach().double() - ref.detach()).abs().max() / ref.detach().abs().max().clamp(min=1e-3))


@pytest.mark.parametrize(("experts", "k"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "no-renorm"])
def test_float32_forward_and_gradients_against_the_float64_reference(experts, k, renormalize):
    layer = SparseMoE(D, INTER, experts, k, renormalize=renormalize, block_rows=8)
    x = _inputs((41,)).requires_grad_()
    out = layer(x).hidden
    ref, _, ref_inputs = _reference(layer, x)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    grads = torch.autograd.grad(out, [x, *weights(layer)], cot.float())
    ref_grads = torch.autograd.grad(ref, ref_inputs, cot)
    assert _rel_err(out, ref) <= 1e-6
    for name, g, r in zip(("input", "router", "gate_up_proj", "down_proj"), grads, ref_grads, strict=True):
        assert _rel_err(g, r) <= 1e-5, (name, _rel_err(g, r))


@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "no-renorm"])
def test_float64_forward_and_gradients_equal_the_reference(renormalize):
    layer = SparseMoE(D, INTER, 5, 2, renormalize=renormalize).double()
    x = _inputs((2, 15), torch.float64).requires_grad_()
    out = layer(x).hidden
    ref, _, ref_inputs = _reference(layer, x)
    assert_close(out.reshape(-1, D), ref)
    cot = torch.randn_like(out)
    for g, r in zip(torch.autograd.grad(out, [x, *weights(layer)], cot),
                    torch.autograd.grad(ref, ref_inputs, cot.reshape(-1, D)), strict=True):
        assert_close(g.reshape(r.shape), r)


def test_gradcheck_float64():
    layer = SparseMoE(4, 6, 3, 2).double()
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    names = ["router.weight", "gate_up_proj", "down_proj"]

    def f(x, *params):
        return torch.func.functional_call(layer, dict(zip(names, params, strict=True)), (x,)).hidden

    assert torch.autograd.gradcheck(f, (x, *[p.detach().clone().requires_grad_() for p in weights(layer)]))


@pytest.mark.parametrize("block_rows", [2, None], ids=["blocks-of-2", "whole-experts"])
def test_experts_without_tokens_get_zero_gradients(block_rows):
    layer = SparseMoE(D, INTER, 8, 1, block_rows=block_rows)
    x = _inputs((3,)).requires_grad_()  # 3 tokens, top-1: at most 3 of the 8 experts are used
    result = layer(x)
    out = result.hidden
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    ref, _, ref_inputs = _reference(layer, x)
    grads = torch.autograd.grad(out, [x, *weights(layer)], cot.float())
    for g, r in zip(grads, torch.autograd.grad(ref, ref_inputs, cot), strict=True):
        assert _rel_err(g, r) <= 1e-5
    unused = sorted(set(range(8)) - set(result.router_logits.argmax(-1).tolist()))
    assert len(unused) >= 5 and (grads[2][unused] == 0).all() and (grads[3][unused] == 0).all()


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 1.25], ids=["cf0.5", "cf1.0", "cf1.25"])
@pytest.mark.parametrize("k", [1, 2], ids=["K1", "K2"])
def test_capacity_drops_exactly_the_reference_assignments(k, capacity_factor):
    layer = SparseMoE(D, INTER, 4, k, capacity_factor=capacity_factor, block_rows=5).double()
    with torch.no_grad():
        layer.router.weight[0] += 0.5  # with inputs of positive mean, an unbalanced router: experts overflow
    x = _inputs((2, 30), torch.float64) + 0.3
    out = layer(x)
    capacity = math.ceil(capacity_factor * 60 * k / 4)
    ref, dropped, _ = _reference(layer, x, capacity=capacity)
    assert_close(out.hidden.reshape(-1, D), ref)
    assert out.dropped == dropped > 0
    assert SparseMoE(D, INTER, 4, k)(x.float()).dropped == 0  # dropless by default


def test_padding_is_not_dispatched_takes_no_capacity_and_is_left_out_of_the_losses():
    layer = SparseMoE(D, INTER, 4, 2, capacity_factor=1.0).double()
    x = _inputs((2, 20), torch.float64)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[0, 12:] = 0
    out = layer(x, mask)
    real = mask.reshape(-1).bool()
    ref, dropped, _ = _reference(layer, x, capacity=math.ceil(1.0 * 32 * 2 / 4), real=real)
    assert_close(out.hidden.reshape(-1, D), ref)
    assert out.dropped == dropped and (out.hidden[0, 12:] == 0).all()
    expected_aux = load_balancing_loss_func((out.router_logits,), 4, top_k=2, attention_mask=mask)
    torch.testing.assert_close(out.aux_loss, expected_aux.double(), rtol=1e-6, atol=1e-7)  # theirs sums in float32
    lse = torch.logsumexp(out.router_logits[real], -1)
    assert_close(out.z_loss, (lse**2).mean())
    # dropless: real tokens' outputs do not depend on the padding
    dropless, keep = SparseMoE(D, INTER, 4, 2).double(), mask.bool()
    assert_close(dropless(x, mask).hidden[keep], dropless(x).hidden[keep])


def test_losses_are_returned_without_any_flag_and_match_transformers():
    block = mixtral_block(8, 2)
    out = SparseMoE.from_mixtral(block)(_inputs((2, 25)))
    expected = load_balancing_loss_func((out.router_logits,), 8, top_k=2)
    torch.testing.assert_close(out.aux_loss, expected, rtol=1e-6, atol=1e-7)
    assert out.z_loss.requires_grad and out.aux_loss.requires_grad and out.dropped == 0


def test_batched_equals_row_by_row_and_no_grad_equals_grad():
    # float64: float32 GEMMs over differently grouped rows round differently (measured 3e-7 apart)
    layer = SparseMoE(D, INTER, 6, 2, block_rows=4).double()
    x = _inputs((3, 11), torch.float64)
    batched = layer(x).hidden
    rows = torch.stack([layer(x[i]).hidden for i in range(3)])
    assert_close(batched, rows)
    with torch.inference_mode():  # the in-place path gives the same numbers
        assert_close(layer(x).hidden, batched.detach())


def test_bfloat16_input_routes_in_float32():
    layer = SparseMoE(D, INTER, 4, 2).to(torch.bfloat16)
    x = _inputs((9,), torch.bfloat16)
    out = layer(x)
    assert out.hidden.dtype == torch.bfloat16 and out.router_logits.dtype == torch.float32
    ref = SparseMoE.from_mixtral(layer.to_mixtral().float())(x.float()).hidden  # same rounded weights, in float32
    torch.testing.assert_close(out.hidden.float(), ref, rtol=2e-2, atol=2e-2)


def test_weights_round_trip_through_the_mixtral_block():
    layer = SparseMoE(D, INTER, 4, 2)
    back = SparseMoE.from_mixtral(layer.to_mixtral())
    for a, b in zip(weights(layer), weights(back), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="renormalize=False"):
        SparseMoE(D, INTER, 4, 2, renormalize=False).to_mixtral()


@pytest.mark.parametrize(("kwargs", "pattern"), [
    ({"top_k": 0}, r"top_k=0 is invalid for num_experts=4.*pass top_k between 1 and 4"),
    ({"top_k": 5}, r"top_k=5 is invalid for num_experts=4.*pass top_k between 1 and 4"),
    ({"capacity_factor": 0.0}, r"capacity_factor=0.0 is invalid.*or None for dropless"),
    ({"num_experts": 0}, r"num_experts=0 is invalid"),
    ({"block_rows": 0}, r"block_rows=0 is invalid"),
], ids=["top_k=0", "top_k>E", "capacity=0", "experts=0", "block_rows=0"])
def test_bad_settings_name_the_parameter_value_and_fix(kwargs, pattern):
    args = {"hidden_size": 8, "intermediate_size": 8, "num_experts": 4, "top_k": 2, **kwargs}
    with pytest.raises(ValueError, match=pattern):
        SparseMoE(**args)


def test_bad_inputs():
    layer = SparseMoE(8, 8, 4, 2)
    with pytest.raises(ValueError, match=r"hidden has shape \(3, 7\): expected \(\.\.\., hidden_size=8\)"):
        layer(torch.zeros(3, 7))
    with pytest.raises(ValueError, match="padding_mask has 5 entries"):
        layer(torch.zeros(2, 3, 8), torch.ones(5))
