"""Collapsed VQ-Logits computations against the materialised head: loss, gradients, log-probs, greedy, sampling."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chisquare

from leanfit.vq_logits.functional import (
    ClusterTables,
    cluster_log_normalizers,
    collapsed_argmax,
    collapsed_cross_entropy,
    collapsed_log_prob,
    collapsed_sample,
    dense_sample,
    kept_clusters,
    residual_cross_entropy,
    residual_log_probs,
)
from tests.reference import (
    residual_log_probs_reference,
    vq_cross_entropy_reference,
    vq_logits_reference,
    warped_probs_reference,
)
from tests.tolerances import TOL


def make_problem(n=37, d=16, k=11, v=203, bias=True, empty=2, dtype=torch.float64, seed=0):
    """Random head with ``empty`` unused codes (empty clusters are legal and must be exact)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64)
    codebook = torch.randn(k, d, generator=g, dtype=torch.float64) * 0.5
    mapping = torch.randint(0, k - empty, (v,), generator=g)
    b = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::5] = -100
    cast = lambda t: None if t is None else t.to(dtype).requires_grad_()  # noqa: E731
    return cast(hidden), cast(codebook), mapping, cast(b), labels


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach(), ref.detach()
    return float((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_loss_and_gradients_match_materialised_head(bias, reduction, dtype):
    h, c, m, b, y = make_problem(bias=bias, dtype=dtype)
    got = collapsed_cross_entropy(h, c, m, y, b, reduction=reduction)
    # ground truth in float64 from the same (rounded) inputs
    h64, c64 = h.detach().double().requires_grad_(), c.detach().double().requires_grad_()
    b64 = None if b is None else b.detach().double().requires_grad_()
    ref = vq_cross_entropy_reference(h64, c64, m, y, b64, reduction=reduction)
    rtol, _ = TOL[dtype]  # normwise: max |error| / max |reference|
    assert got.dtype == dtype
    assert _rel_err(got, ref) <= rtol
    weights = torch.linspace(0.5, 1.5, got.numel(), dtype=torch.float64).reshape(got.shape)
    grads = torch.autograd.grad((got.double() * weights).sum(), [t for t in (h, c, b) if t is not None])
    refs = torch.autograd.grad((ref * weights).sum(), [t for t in (h64, c64, b64) if t is not None])
    for name, g, r in zip(("hidden", "codebook", "bias"), grads, refs, strict=False):
        assert _rel_err(g, r) <= rtol, name


def test_all_ignored_gives_nan_like_cross_entropy():
    h, c, m, b, y = make_problem()
    y[:] = -100
    ref = vq_cross_entropy_reference(h, c, m, y, b)
    assert math.isnan(collapsed_cross_entropy(h, c, m, y, b).item()) and math.isnan(ref.item())


def test_gradcheck_float64():
    h, c, m, b, y = make_problem(n=5, d=4, k=4, v=13, empty=1)
    assert torch.autograd.gradcheck(lambda h, c, b: collapsed_cross_entropy(h, c, m, y, b, reduction="sum"),
                                    (h, c, b))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_log_prob_matches_log_softmax(bias):
    h, c, m, b, _ = make_problem(bias=bias)
    tokens = torch.arange(h.shape[0]) * 5 % m.numel()
    ref = torch.log_softmax(vq_logits_reference(h, c, m, b), -1).gather(1, tokens[:, None]).squeeze(1)
    assert _rel_err(collapsed_log_prob(h, c, m, tokens, b), ref) <= 1e-12


def test_cluster_normalizers_are_minus_inf_for_empty_clusters():
    m = torch.tensor([0, 0, 2, 2, 2])
    b = torch.tensor([0.0, 1.0, -1.0, 2.0, 0.5], dtype=torch.float64)
    got = cluster_log_normalizers(m, 4, b, dtype=torch.float64)
    assert got[0].item() == pytest.approx(math.log(1 + math.e), rel=1e-15)
    assert got[2].item() == pytest.approx(math.log(math.exp(-1) + math.exp(2) + math.exp(0.5)), rel=1e-15)
    assert got[1].item() == got[3].item() == -math.inf
    assert torch.equal(cluster_log_normalizers(m, 4), torch.tensor([2.0, 0.0, 3.0, 0.0]).log())


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_argmax_matches_materialised(bias):
    h, c, m, b, _ = make_problem(n=200, bias=bias)
    tables = ClusterTables.build(m, c.shape[0], b)
    logits = vq_logits_reference(h, c, m, b)
    got = collapsed_argmax(h.detach(), c.detach(), tables)
    # with ties (no bias: every token of a cluster ties) any maximiser is correct
    assert torch.equal(logits.gather(1, got[:, None]).squeeze(1), logits.max(-1).values)


def test_count_at_least_matches_brute_force():
    _, c, m, b, _ = make_problem()
    b = torch.round(b.detach() * 2) / 2  # ties inside clusters
    tables = ClusterTables.build(m, c.shape[0], b)
    thresholds = torch.randn(6, c.shape[0], dtype=torch.float64).round()
    expected = torch.stack([torch.stack([((m == k) & (b >= t[k])).sum() for k in range(c.shape[0])])
                            for t in thresholds])
    assert torch.equal(tables.count_at_least(thresholds), expected)


CASES = {
    "plain": dict(temperature=1.0),
    "temperature": dict(temperature=0.6),
    "top-k": dict(temperature=0.8, top_k=7),
    "top-p": dict(temperature=1.0, top_p=0.7),
    "top-k+top-p": dict(temperature=1.2, top_k=12, top_p=0.8),
}


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("case", list(CASES))
def test_sampler_matches_warped_softmax_chi_square(case, bias):
    h, c, m, b, _ = make_problem(n=3, d=8, k=9, v=60, bias=bias, seed=3)
    h, c = h.detach(), c.detach()
    b = None if b is None else b.detach()
    tables = ClusterTables.build(m, c.shape[0], b)
    probs = warped_probs_reference(vq_logits_reference(h, c, m, b), **CASES[case])
    draws = 20_000
    g = torch.Generator().manual_seed(0)
    for row in range(h.shape[0]):
        got = collapsed_sample(h[row : row + 1].expand(draws, -1), c, tables, generator=g, **CASES[case])
        counts = torch.bincount(got, minlength=m.numel()).double()
        p = probs[row]
        assert counts[p == 0].sum() == 0, "sampled a token outside the warped support"
        big = p * draws >= 5  # chi-square needs >= 5 expected per bin; the rest is pooled
        obs = torch.cat([counts[big], counts[~big].sum(0, keepdim=True)])
        exp = torch.cat([p[big], p[~big].sum(0, keepdim=True)]) * draws
        keep = exp > 0
        assert chisquare(obs[keep].numpy(), exp[keep].numpy()).pvalue > 1e-3, (case, row)


@pytest.mark.parametrize("case", ["top-p", "top-k+top-p", "heavy-tail", "ties", "one-token"])
def test_kept_set_equals_the_warped_support_exactly(case):
    """The kept prefixes reproduce the reference support token for token, including rows whose mass sits mostly in
    low-bias tails (the cutoff falls below every cluster's best token) and tie groups at the boundary."""
    h, c, m, b, _ = make_problem(n=40, d=8, k=9, v=300, seed=5)
    h, c, b = h.detach(), c.detach(), b.detach()
    kwargs = {"temperature": 1.0, "top_p": 0.9}
    if case == "top-k+top-p":
        kwargs = {"temperature": 0.7, "top_k": 25, "top_p": 0.6}
    elif case == "heavy-tail":  # one high-bias token per cluster, many low ones that carry most of the mass
        b = torch.where(torch.rand(b.shape, generator=torch.Generator().manual_seed(1)) < 0.05, 6.0, 0.0) + 0.01 * b
        kwargs = {"temperature": 1.0, "top_p": 0.95}
    elif case == "ties":
        b, h = torch.round(b * 2) / 2, torch.round(h * 2) / 2
        c = torch.round(c * 2) / 2
    elif case == "one-token":  # the best token alone holds more than top_p
        b = b.clone()
        b[int(m.argmax())] = 40.0
    tables = ClusterTables.build(m, c.shape[0], b)
    counts, log_w = kept_clusters((h @ c.t()).double(), tables, **kwargs)
    got = torch.zeros(h.shape[0], m.numel(), dtype=torch.bool)
    for k in range(c.shape[0]):
        start = int(tables.offsets[k])
        for i in range(h.shape[0]):
            got[i, tables.order[start : start + int(counts[i, k])]] = True
    expected = warped_probs_reference(vq_logits_reference(h, c, m, b), **kwargs) > 0
    assert torch.equal(got, expected)
    if case == "one-token":
        assert (got.sum(-1) == 1).any()
    # the cluster masses are those of the kept tokens
    probs = torch.softmax(vq_logits_reference(h, c, m, b) / kwargs["temperature"], dim=-1)
    mass = torch.zeros(h.shape[0], c.shape[0], dtype=torch.float64).index_add(1, m, probs * got)
    assert torch.allclose(torch.softmax(log_w, -1), mass / mass.sum(-1, keepdim=True), rtol=1e-10, atol=1e-14)


def test_nucleus_reference_equals_transformers_without_ties():
    from transformers import TopPLogitsWarper

    from tests.reference import nucleus_mask_reference

    scores = torch.randn(20, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    hf = torch.isfinite(TopPLogitsWarper(0.7)(torch.zeros(20, 1, dtype=torch.long), scores.clone()))
    assert torch.equal(nucleus_mask_reference(scores, 0.7), hf)


def test_sampling_is_reproducible_with_a_generator():
    h, c, m, b, _ = make_problem()
    tables = ClusterTables.build(m, c.shape[0], b)
    draw = lambda: collapsed_sample(h.detach(), c.detach(), tables, top_k=5, generator=torch.Generator().manual_seed(1))  # noqa: E731
    assert torch.equal(draw(), draw())


@pytest.mark.parametrize(("kwargs", "fragment"), [({"temperature": 0.0}, "temperature=0.0"), ({"top_p": 1.5}, "top_p=1.5")],
                         ids=["zero-temperature", "top-p-above-1"])
def test_sampler_rejects_bad_settings(kwargs, fragment):
    h, c, m, b, _ = make_problem()
    with pytest.raises(ValueError, match=fragment):
        collapsed_sample(h.detach(), c.detach(), ClusterTables.build(m, c.shape[0], b), **kwargs)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_residual_loss_and_gradients_match_explicit_reference(bias, dtype):
    h, c, m, b, y = make_problem(bias=bias, dtype=dtype)
    g = torch.Generator().manual_seed(7)
    proj = (torch.randn(3, h.shape[1], generator=g, dtype=torch.float64) * 0.3).to(dtype).requires_grad_()
    emb = torch.randn(m.numel(), 3, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    got = residual_cross_entropy(h, c, m, y, b, proj, emb)
    leaves = [t for t in (h, c, b, proj, emb) if t is not None]
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    args = dict(zip(["h", "c", "b", "proj", "emb"] if bias else ["h", "c", "proj", "emb"], leaves64, strict=True))
    ref_lp = residual_log_probs_reference(args["h"], args["c"], m, args.get("b"), args["proj"], args["emb"])
    ref = F.nll_loss(ref_lp, y, ignore_index=-100)
    rtol, _ = TOL[dtype]  # normwise: max |error| / max |reference|
    assert _rel_err(got, ref) <= rtol
    for got_g, ref_g in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(ref, leaves64), strict=True):
        assert _rel_err(got_g, ref_g) <= 10 * rtol
    fast_lp = residual_log_probs(*(t.detach().double() for t in (h, c)), m, None if b is None else b.detach().double(),
                                 proj.detach().double(), emb.detach().double())
    assert _rel_err(fast_lp[torch.isfinite(ref_lp)], ref_lp.detach()[torch.isfinite(ref_lp)]) <= 1e-12


def test_residual_gradcheck_float64():
    h, c, m, b, y = make_problem(n=4, d=3, k=3, v=9, empty=1)
    proj = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    emb = torch.randn(9, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: residual_cross_entropy(a[0], a[1], m, y, a[2], a[3], a[4]),
                                    (h, c, b, proj, emb))


@pytest.mark.parametrize("case", ["plain", "top-k", "top-p"])
def test_dense_sampler_matches_warped_softmax(case):
    logits = torch.randn(1, 40, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    probs = warped_probs_reference(logits, **CASES[case])[0]
    got = dense_sample(logits.expand(20_000, -1), generator=torch.Generator().manual_seed(0), **CASES[case])
    counts = torch.bincount(got, minlength=40).double()
    assert counts[probs == 0].sum() == 0
    big = probs * 20_000 >= 5
    obs = torch.cat([counts[big], counts[~big].sum(0, keepdim=True)])
    exp = torch.cat([probs[big], probs[~big].sum(0, keepdim=True)]) * 20_000
    assert chisquare(obs[exp > 0].numpy(), exp[exp > 0].numpy()).pvalue > 1e-3
