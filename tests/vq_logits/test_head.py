"""VQLogitsHead: construction, parity of every path with the materialised head, accounting, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from leanfit.vq_logits.head import VQLogitsHead
from tests.reference import vq_cross_entropy_reference, vq_logits_reference
from tests.tolerances import assert_close


def _head(v=50, d=8, k=7, bias=True, mode="collapsed", seed=0):
    torch.manual_seed(seed)
    head = VQLogitsHead(d, torch.arange(v) % k, k, token_bias=bias, mode=mode).double()
    if bias:
        nn.init.normal_(head.bias)
    return head


def test_from_linear_with_one_code_per_token_reproduces_the_layer():
    torch.manual_seed(0)
    linear = nn.Linear(8, 20).double()
    head = VQLogitsHead.from_linear(linear, 20, mapping=torch.arange(20), counts=torch.ones(20), bias_init="unigram")
    h = torch.randn(5, 8, dtype=torch.float64)
    assert_close(head(h), linear(h))


def test_from_linear_codes_are_cluster_means_and_bias_is_within_cluster_log_share():
    torch.manual_seed(0)
    linear = nn.Linear(4, 6, bias=False).double()
    m = torch.tensor([0, 0, 1, 1, 1, 2])
    counts = torch.tensor([3.0, 1.0, 1.0, 1.0, 2.0, 5.0])
    head = VQLogitsHead.from_linear(linear, 3, mapping=m, counts=counts, bias_init="unigram")
    assert_close(head.codebook[1], linear.weight[2:5].mean(0))
    p = counts.double() + 0.5
    assert_close(head.bias[:2], (p[:2] / p[:2].sum()).log())


def test_from_linear_kmeans_default_recovers_planted_clusters_and_their_means():
    """Output embeddings in 12 well-separated groups: the default k-means map is the planted partition (up to
    relabelling), each code is the float64 mean of its group's rows, and the logits are the reference's."""
    g = torch.Generator().manual_seed(0)
    truth = torch.arange(300) % 12
    linear = nn.Linear(16, 300, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(12, 16, generator=g)[truth] * 10 + torch.randn(300, 16, generator=g) * 0.1)
    head = VQLogitsHead.from_linear(linear, 12)
    pairs = {(int(t), int(c)) for t, c in zip(truth, head.mapping, strict=True)}
    assert len(pairs) == 12 and len({c for _, c in pairs}) == 12
    assert head.codebook.dtype == torch.float32
    w = linear.weight.detach().double()
    means = torch.stack([w[head.mapping == k].mean(0) for k in range(12)])
    assert_close(head.codebook, means)
    assert torch.equal(head.bias, torch.zeros(300))  # bias_init="zeros" and a bias-free layer
    h = torch.randn(5, 16, generator=g, dtype=torch.float64)  # float64: the logits cancel terms of size ~30
    assert_close(head.double().logits(h), vq_logits_reference(h, head.codebook, head.mapping, None))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_gather_and_collapsed_modes_agree_with_reference(bias):
    h = torch.randn(3, 5, 8, dtype=torch.float64)
    y = torch.randint(0, 50, (3, 5))
    y[0, 0] = -100
    collapsed, gather = _head(bias=bias), _head(bias=bias, mode="gather")
    ref = vq_cross_entropy_reference(h.reshape(-1, 8), collapsed.codebook, collapsed.mapping, y.reshape(-1),
                                     collapsed.bias)
    assert_close(collapsed.loss(h, y), ref)
    assert_close(gather.loss(h, y), ref)
    per_token = collapsed.loss(h, y, reduction="none")
    assert per_token.shape == (3, 5) and per_token[0, 0] == 0


def test_log_prob_logits_argmax_shapes_and_values():
    head = _head()
    h = torch.randn(2, 3, 8, dtype=torch.float64)
    logits = head.logits(h)
    assert logits.shape == (2, 3, 50)
    assert_close(logits.reshape(-1, 50), vq_logits_reference(h.reshape(-1, 8), head.codebook, head.mapping, head.bias))
    tokens = torch.randint(0, 50, (2, 3))
    assert_close(head.log_prob(h, tokens), torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1))
    assert torch.equal(head.argmax(h), logits.argmax(-1))
    assert head.sample(h, generator=torch.Generator().manual_seed(0)).shape == (2, 3)


def test_decoding_tables_follow_bias_updates():
    head = _head()
    h = torch.randn(4, 8, dtype=torch.float64)
    before = head.tables()
    assert head.tables() is before  # cached
    with torch.no_grad():
        head.bias.add_(torch.randn(50, dtype=torch.float64) * 5)
    assert head.tables() is not before
    assert torch.equal(head.argmax(h), head.logits(h).argmax(-1))


def test_parameter_counts_include_map_and_bias():
    assert _head(v=50, d=8, k=7).parameter_counts() == {"codebook": 56, "bias": 50, "mapping": 50, "residual": 0,
                                                        "total": 156}
    residual = VQLogitsHead(8, torch.arange(50) % 7, 7, residual_rank=3).parameter_counts()
    assert residual["residual"] == 3 * 8 + 50 * 3 and residual["total"] == 56 + 50 + 50 + 174
    assert _head(bias=False).parameter_counts()["bias"] == 0


def test_gradients_flow_to_codebook_and_bias_only():
    head = _head()
    h = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    head.loss(h, torch.randint(0, 50, (6,))).backward()
    assert head.codebook.grad.abs().sum() > 0 and head.bias.grad.abs().sum() > 0 and h.grad is not None
    assert head.mapping.grad is None


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda hd: hd.loss(torch.randn(4, 9, dtype=torch.float64), torch.zeros(4, dtype=torch.long)),
         "hidden has size 9 in its last dimension: expected 8"),
        (lambda hd: hd.loss(torch.full((4, 8), float("nan"), dtype=torch.float64), torch.zeros(4, dtype=torch.long)),
         "hidden contains NaN or inf"),
        (lambda hd: hd.loss(torch.randn(4, 8, dtype=torch.float64), torch.tensor([0, 1, 50, 2])),
         "labels contains 50: expected token ids in [0, 50) or ignore_index=-100"),
        (lambda hd: hd.loss(torch.randn(4, 8, dtype=torch.float64), torch.tensor([0, 1, 2])),
         "labels has 3 entries for 4 hidden states"),
        (lambda hd: hd.log_prob(torch.randn(2, 8, dtype=torch.float64), torch.tensor([-100, 1])),
         "tokens contains -100: expected token ids in [0, 50)"),
    ],
    ids=["hidden-size", "nan", "label-range", "label-count", "token-range"],
)
def test_bad_input_is_a_clear_value_error(call, fragment):
    with pytest.raises(ValueError) as err:
        call(_head())
    assert fragment in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"num_codes": 0}, ValueError, "num_codes=0 is invalid"),
        ({"num_codes": 51}, ValueError, "num_codes=51 is invalid"),
        ({"mode": "scatter"}, ValueError, "mode='scatter' is invalid"),
        ({"mapping": torch.arange(50.0)}, TypeError, "expected a 1-D integer tensor"),
    ],
    ids=["zero-codes", "codes-above-V", "bad-mode", "float-map"],
)
def test_constructor_errors(kwargs, error, fragment):
    args = {"mapping": torch.arange(50) % 7, "num_codes": 7, **kwargs}
    with pytest.raises(error, match=fragment):
        VQLogitsHead(8, args.pop("mapping"), args.pop("num_codes"), **args)


def test_from_linear_refuses_non_linear_layers():
    with pytest.raises(TypeError, match=r"linear=Embedding is invalid: expected an nn.Linear"):
        VQLogitsHead.from_linear(nn.Embedding(10, 4), 2)


def test_residual_head_starts_as_the_plain_head_and_stays_normalised():
    torch.manual_seed(0)
    plain = _head()
    res = VQLogitsHead(8, plain.mapping, 7, residual_rank=4).double()
    res.load_state_dict(plain.state_dict(), strict=False)
    h = torch.randn(5, 8, dtype=torch.float64)
    y = torch.randint(0, 50, (5,))
    assert_close(res.loss(h, y), plain.loss(h, y))
    with torch.no_grad():
        res.residual_emb.normal_()
    probs = res.logits(h).exp()
    assert_close(probs.sum(-1), torch.ones(5, dtype=torch.float64))
    assert_close(res.log_prob(h, y), res.logits(h).gather(1, y[:, None]).squeeze(1))
    assert torch.equal(res.argmax(h), res.logits(h).argmax(-1))
    assert res.sample(h, top_k=3, generator=torch.Generator().manual_seed(0)).shape == (5,)


def test_residual_from_linear_is_the_best_rank_r_fit_of_what_codes_discard():
    torch.manual_seed(0)
    linear = nn.Linear(6, 30, bias=False).double()
    m = torch.arange(30) % 4
    full = VQLogitsHead.from_linear(linear, 4, mapping=m, residual_rank=6)  # r = d: nothing is discarded
    h = torch.randn(7, 6, dtype=torch.float64)
    ref = torch.log_softmax(linear(h), -1)
    within_ref = ref - torch.logsumexp(ref.unsqueeze(-1).expand(-1, -1, 4).masked_fill(
        m[None, :, None] != torch.arange(4)[None, None, :], -float("inf")), dim=1).gather(1, m.expand(7, -1))
    within = full.logits(h) - torch.logsumexp(full.logits(h).unsqueeze(-1).expand(-1, -1, 4).masked_fill(
        m[None, :, None] != torch.arange(4)[None, None, :], -float("inf")), dim=1).gather(1, m.expand(7, -1))
    torch.testing.assert_close(within, within_ref, rtol=1e-6, atol=1e-6)  # within-cluster distributions recovered


def test_unigram_bias_init_needs_counts():
    with pytest.raises(ValueError, match="bias_init='unigram' is invalid"):
        VQLogitsHead.from_linear(nn.Linear(4, 10), 2, mapping=torch.arange(10) % 2, bias_init="unigram")
