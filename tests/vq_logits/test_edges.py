"""Edge inputs of every public VQ-Logits entry point: bad input is a ValueError/TypeError naming the parameter,
valid edge input (empty batch, everything ignored, int32 ids, one-token vocabulary) equals the materialised head."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from leanfit.vq_logits.functional import (
    ClusterTables,
    cluster_layout,
    cluster_log_normalizers,
    collapsed_argmax,
    collapsed_cross_entropy,
    collapsed_log_prob,
    collapsed_logsumexp,
    collapsed_sample,
    dense_sample,
    kept_clusters,
    materialized_logits,
    residual_cross_entropy,
    residual_log_probs,
)
from leanfit.vq_logits.head import VQLogitsHead
from leanfit.vq_logits.hf import from_pretrained, replace_lm_head, vq_causal_lm_class
from leanfit.vq_logits.mapping import build_mapping, unigram_floor, validate_mapping
from tests.errors import assert_user_error
from tests.reference import residual_log_probs_reference, vq_logits_reference
from tests.tolerances import assert_close

N, D, K, V, R = 4, 3, 3, 7, 2
NAN, INF = float("nan"), float("inf")


def _problem(seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden": torch.randn(N, D, generator=g, dtype=torch.float64),
        "codebook": torch.randn(K, D, generator=g, dtype=torch.float64),
        "mapping": torch.tensor([0, 1, 2, 0, 1, 2, 0]),
        "labels": torch.tensor([0, 6, -100, 3]),
        "bias": torch.randn(V, generator=g, dtype=torch.float64),
        "proj": torch.randn(R, D, generator=g, dtype=torch.float64),
        "emb": torch.randn(V, R, generator=g, dtype=torch.float64),
    }


def _raises(exc: type[Exception], fragments: str | tuple[str, ...], call: Callable[[], Any]) -> None:
    assert_user_error(exc, fragments, call)


# --- the collapsed and residual losses and log-probs ---------------------------------------------------------------

LOSS_ARGS = {
    "ce": (collapsed_cross_entropy, ("hidden", "codebook", "mapping", "labels", "bias")),
    "residual": (residual_cross_entropy, ("hidden", "codebook", "mapping", "labels", "bias", "proj", "emb")),
    "log_prob": (collapsed_log_prob, ("hidden", "codebook", "mapping", "tokens", "bias")),
}


def _loss(which: str, **override: Any) -> torch.Tensor:
    fn, names = LOSS_ARGS[which]
    p = _problem()
    p["tokens"] = p["labels"].clamp_min(0)
    if which == "log_prob" and "labels" in override:
        override["tokens"] = override.pop("labels")
    return fn(**{**{k: p[k] for k in names}, **override})


def _f64(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64)


# (id, override, error, fragments, functions); "{y}" is the labels parameter's name (tokens for log_prob)
LOSS_CASES: list[tuple[str, dict[str, Any], type[Exception], tuple[str, ...], str]] = [
    ("negative-label", {"labels": torch.tensor([0, 1, -3, 2])}, ValueError, ("{y} contains -3", "position 2"),
     "ce residual log_prob"),
    ("label-equals-V", {"labels": torch.tensor([0, 7, 1, 2])}, ValueError, ("{y} contains 7", "[0, 7)"),
     "ce residual log_prob"),
    ("label-far-negative", {"labels": torch.tensor([0, -(2**40), 1, 2])}, ValueError, ("{y} contains",),
     "ce residual log_prob"),
    ("float-labels", {"labels": torch.zeros(N)}, TypeError, ("{y}=", "integer"), "ce residual log_prob"),
    ("bool-labels", {"labels": torch.zeros(N, dtype=torch.bool)}, TypeError, ("{y}=",), "ce residual log_prob"),
    ("labels-2d", {"labels": torch.zeros(N, 1, dtype=torch.long)}, ValueError, ("{y}=", "(N,)"),
     "ce residual log_prob"),
    ("labels-count", {"labels": torch.zeros(N + 1, dtype=torch.long)}, ValueError, ("{y}=", "4"),
     "ce residual log_prob"),
    ("labels-list", {"labels": [0, 1, 2, 3]}, TypeError, ("{y}=list",), "ce residual log_prob"),
    ("reduction-bogus", {"reduction": "bogus"}, ValueError, ("reduction='bogus'", "'mean', 'sum', 'none'"),
     "ce residual"),
    ("reduction-None", {"reduction": None}, ValueError, ("reduction=None",), "ce residual"),
    ("ignore-index-float", {"ignore_index": -100.0}, TypeError, ("ignore_index=-100.0",), "ce residual"),
    ("ignore-index-bool", {"ignore_index": True}, TypeError, ("ignore_index=True",), "ce residual"),
    ("hidden-last-dim", {"hidden": _f64(N, D + 2)}, ValueError, ("hidden=", "(4, 5)", "codebook"),
     "ce residual log_prob"),
    ("hidden-1d", {"hidden": _f64(D)}, ValueError, ("hidden=", "(N, d)"), "ce residual log_prob"),
    ("hidden-int", {"hidden": torch.ones(N, D, dtype=torch.long)}, TypeError, ("hidden=", "floating"),
     "ce residual log_prob"),
    ("hidden-numpy", {"hidden": _f64(N, D).numpy()}, TypeError, ("hidden=ndarray",), "ce residual log_prob"),
    ("hidden-dtype-mismatch", {"hidden": torch.randn(N, D)}, TypeError, ("codebook=", "float32"),
     "ce residual log_prob"),
    ("codebook-int", {"codebook": torch.ones(K, D, dtype=torch.long)}, TypeError, ("codebook=", "floating"),
     "ce residual log_prob"),
    ("codebook-empty", {"codebook": _f64(0, D)}, ValueError, ("codebook=", "K >= 1"), "ce residual log_prob"),
    ("mapping-float", {"mapping": torch.zeros(V)}, TypeError, ("mapping=", "integer"), "ce residual log_prob"),
    ("mapping-out-of-range", {"mapping": torch.tensor([0, 1, 2, 3, 1, 2, 0])}, ValueError,
     ("mapping values span [0, 3]", "[0, 3)"), "ce residual log_prob"),
    ("mapping-negative", {"mapping": torch.tensor([0, 1, 2, -1, 1, 2, 0])}, ValueError, ("mapping values span [-1",),
     "ce residual log_prob"),
    ("mapping-2d", {"mapping": torch.zeros(V, 1, dtype=torch.long)}, ValueError, ("mapping=", "(V,)"),
     "ce residual log_prob"),
    ("mapping-shorter-than-bias", {"mapping": torch.zeros(V - 1, dtype=torch.long)}, ValueError,
     ("bias=", "(6,)"), "ce residual log_prob"),
    ("bias-int", {"bias": torch.zeros(V, dtype=torch.long)}, TypeError, ("bias=", "floating"),
     "ce residual log_prob"),
    ("bias-2d", {"bias": _f64(1, V)}, ValueError, ("bias=",), "ce residual log_prob"),
    ("proj-wrong-d", {"proj": _f64(R, D + 1)}, ValueError, ("proj=", "(r, d)"), "residual"),
    ("emb-wrong-V", {"emb": _f64(V + 1, R)}, ValueError, ("emb=", "(V, r)"), "residual"),
    ("emb-wrong-rank", {"emb": _f64(V, R + 1)}, ValueError, ("emb=",), "residual"),
    ("emb-int", {"emb": torch.zeros(V, R, dtype=torch.long)}, TypeError, ("emb=",), "residual"),
    ("layout-wrong", {"layout": (torch.arange(V), torch.zeros(2, dtype=torch.long))}, ValueError, ("layout=",),
     "residual"),
]


@pytest.mark.parametrize(
    ("which", "override", "error", "fragments"),
    [pytest.param(w, o, e, tuple(f.format(y="tokens" if w == "log_prob" else "labels") for f in fr), id=f"{w}-{i}")
     for i, o, e, fr, ws in LOSS_CASES for w in ws.split()],
)
def test_loss_rejects_bad_input(which, override, error, fragments):
    _raises(error, fragments, lambda: _loss(which, **override))


def test_negative_label_message_names_ignore_index():
    _raises(ValueError, ("labels contains -3", "ignore_index=-100", "[0, 7)"),
            lambda: _loss("ce", labels=torch.tensor([0, 1, -3, 2])))
    _raises(ValueError, ("labels contains -100", "ignore_index=-1"),
            lambda: _loss("ce", labels=torch.tensor([0, -100, -1, 2]), ignore_index=-1))


# --- other functional entry points ---------------------------------------------------------------------------------

def _tables() -> ClusterTables:
    p = _problem()
    return ClusterTables.build(p["mapping"], K, p["bias"])


OTHER_CASES = [
    ("normalizers-mapping-float", lambda: cluster_log_normalizers(torch.zeros(V), K), TypeError, ("mapping=",)),
    ("normalizers-num-codes-0", lambda: cluster_log_normalizers(torch.zeros(V, dtype=torch.long), 0), ValueError,
     ("num_codes=0",)),
    ("normalizers-out-of-range", lambda: cluster_log_normalizers(torch.tensor([0, 5]), 3), ValueError,
     ("mapping values span [0, 5]",)),
    ("normalizers-bias-length", lambda: cluster_log_normalizers(torch.tensor([0, 1]), 2, _f64(3)), ValueError,
     ("bias=",)),
    ("normalizers-dtype-int", lambda: cluster_log_normalizers(torch.tensor([0, 1]), 2, dtype=torch.long), TypeError,
     ("dtype=torch.int64",)),
    ("logsumexp-shape", lambda: collapsed_logsumexp(_f64(N, K), _f64(K + 1)), ValueError, ("log_norm=",)),
    ("logsumexp-int", lambda: collapsed_logsumexp(torch.zeros(N, K, dtype=torch.long), _f64(K)), TypeError,
     ("z=",)),
    ("layout-num-codes", lambda: cluster_layout(torch.tensor([0, 1]), 0), ValueError, ("num_codes=0",)),
    ("layout-num-codes-float", lambda: cluster_layout(torch.tensor([0, 1]), 2.0), TypeError, ("num_codes=2.0",)),
    ("materialized-bias", lambda: materialized_logits(_f64(N, D), _f64(K, D), torch.tensor([0, 1]), _f64(5)),
     ValueError, ("bias=",)),
    ("materialized-hidden", lambda: materialized_logits(_f64(N, D + 1), _f64(K, D), torch.tensor([0, 1])),
     ValueError, ("hidden=",)),
    ("residual-log-probs-emb", lambda: residual_log_probs(_f64(N, D), _f64(K, D), torch.tensor([0, 1]), None,
                                                          _f64(R, D), _f64(3, R)), ValueError, ("emb=",)),
    ("tables-mapping-float", lambda: ClusterTables.build(torch.zeros(V), K), TypeError, ("mapping=",)),
    ("tables-bias-length", lambda: ClusterTables.build(torch.tensor([0, 1]), 2, _f64(3)), ValueError, ("bias=",)),
    ("tables-num-codes", lambda: ClusterTables.build(torch.tensor([0, 1]), 0), ValueError, ("num_codes=0",)),
    ("tables-out-of-range", lambda: ClusterTables.build(torch.tensor([0, 4]), 2), ValueError,
     ("mapping values span [0, 4]",)),
    ("argmax-tables-type", lambda: collapsed_argmax(_f64(N, D), _f64(K, D), "tables"), TypeError, ("tables=str",)),
    ("argmax-tables-codes", lambda: collapsed_argmax(_f64(N, D), _f64(K + 1, D), _tables()), ValueError,
     ("tables=", "num_codes")),
    ("argmax-hidden", lambda: collapsed_argmax(_f64(N, D + 1), _f64(K, D), _tables()), ValueError, ("hidden=",)),
    ("sample-tables-codes", lambda: collapsed_sample(_f64(N, D), _f64(K + 1, D), _tables()), ValueError,
     ("tables=",)),
    ("sample-generator", lambda: collapsed_sample(_f64(N, D), _f64(K, D), _tables(), generator=0), TypeError,
     ("generator=0",)),
    ("kept-z-width", lambda: kept_clusters(_f64(N, K + 1), _tables()), ValueError, ("z=",)),
    ("dense-logits-1d", lambda: dense_sample(_f64(V)), ValueError, ("logits=",)),
    ("dense-logits-int", lambda: dense_sample(torch.zeros(N, V, dtype=torch.long)), TypeError, ("logits=",)),
    ("dense-logits-empty-vocab", lambda: dense_sample(_f64(N, 0)), ValueError, ("logits=",)),
    ("prefix-mass-temperature", lambda: _tables().prefix_mass(NAN), ValueError, ("temperature=nan",)),
]


@pytest.mark.parametrize(("call", "error", "fragments"), [pytest.param(c, e, f, id=i) for i, c, e, f in OTHER_CASES])
def test_functional_rejects_bad_input(call, error, fragments):
    _raises(error, fragments, call)


# --- sampling settings, on every sampler -------------------------------------------------------------------------

def _head(residual_rank: int = 0, mode: str = "collapsed") -> VQLogitsHead:
    torch.manual_seed(0)
    return VQLogitsHead(D, _problem()["mapping"], K, residual_rank=residual_rank, mode=mode, dtype=torch.float64)


SAMPLERS: dict[str, Callable[..., Any]] = {
    "collapsed": lambda **kw: collapsed_sample(_f64(N, D), _f64(K, D), _tables(), **kw),
    "dense": lambda **kw: dense_sample(_f64(N, V), **kw),
    "kept": lambda **kw: kept_clusters(_f64(N, K), _tables(), **kw),
    "head": lambda **kw: _head().sample(_f64(N, D), **kw),
    "head-residual": lambda **kw: _head(residual_rank=R).sample(_f64(N, D), **kw),
}
SAMPLING_CASES = [
    ("temperature-nan", {"temperature": NAN}, ValueError, ("temperature=nan", "finite number > 0")),
    ("temperature-inf", {"temperature": INF}, ValueError, ("temperature=inf", "finite number > 0")),
    ("temperature-negative", {"temperature": -1.0}, ValueError, ("temperature=-1.0",)),
    ("temperature-zero", {"temperature": 0.0}, ValueError, ("temperature=0.0", "argmax")),
    ("temperature-str", {"temperature": "hot"}, TypeError, ("temperature='hot'",)),
    ("temperature-bool", {"temperature": True}, TypeError, ("temperature=True",)),
    ("top-k-negative", {"top_k": -3}, ValueError, ("top_k=-3", "None or an integer >= 1")),
    ("top-k-zero", {"top_k": 0}, ValueError, ("top_k=0", "None")),
    ("top-k-float", {"top_k": 2.5}, TypeError, ("top_k=2.5",)),
    ("top-k-bool", {"top_k": True}, TypeError, ("top_k=True",)),
    ("top-p-zero", {"top_p": 0.0}, ValueError, ("top_p=0.0", "(0, 1]")),
    ("top-p-negative", {"top_p": -0.1}, ValueError, ("top_p=-0.1",)),
    ("top-p-above-1", {"top_p": 1.5}, ValueError, ("top_p=1.5",)),
    ("top-p-nan", {"top_p": NAN}, ValueError, ("top_p=nan",)),
    ("top-p-inf", {"top_p": INF}, ValueError, ("top_p=inf",)),
    ("top-p-str", {"top_p": "0.9"}, TypeError, ("top_p='0.9'",)),
]


@pytest.mark.parametrize(
    ("sampler", "kwargs", "error", "fragments"),
    [pytest.param(s, kw, e, f, id=f"{s}-{i}") for i, kw, e, f in SAMPLING_CASES for s in SAMPLERS],
)
def test_samplers_reject_bad_settings(sampler, kwargs, error, fragments):
    _raises(error, fragments, lambda: SAMPLERS[sampler](**kwargs))


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_samplers_accept_edge_settings(sampler):
    out = SAMPLERS[sampler](temperature=2, top_k=V + 5, top_p=1.0)  # int temperature, top_k > V, top_p = 1
    if sampler != "kept":
        assert out.shape == (N,) and bool(((out >= 0) & (out < V)).all())


def test_top_k_one_is_greedy_and_empty_batch_samples_nothing():
    p = _problem()
    tables = ClusterTables.build(p["mapping"], K, p["bias"])
    logits = vq_logits_reference(p["hidden"], p["codebook"], p["mapping"], p["bias"])
    assert torch.equal(collapsed_sample(p["hidden"], p["codebook"], tables, top_k=1), logits.argmax(-1))
    assert collapsed_sample(p["hidden"][:0], p["codebook"], tables).shape == (0,)
    assert dense_sample(logits[:0]).shape == (0,)
    assert collapsed_argmax(p["hidden"][:0], p["codebook"], tables).shape == (0,)


# --- maps -------------------------------------------------------------------------------------------------------

def _build(**kw: Any) -> torch.Tensor:
    args: dict[str, Any] = {"mapping": "equal_mass", "vocab_size": 6, "num_codes": 3,
                            "counts": torch.tensor([5.0, 1, 3, 0, 2, 7]), **kw}
    return build_mapping(args.pop("mapping"), **args)


MAPPING_CASES = [
    ("counts-nan", lambda: _build(counts=torch.tensor([5.0, NAN, 3, 0, 2, 7])), ValueError, ("counts=", "NaN")),
    ("counts-inf", lambda: _build(counts=torch.tensor([5.0, INF, 3, 0, 2, 7])), ValueError, ("counts=", "inf")),
    ("counts-negative", lambda: _build(counts=torch.tensor([5.0, -1, 3, 0, 2, 7])), ValueError,
     ("counts=", "-1")),
    ("counts-length", lambda: _build(counts=torch.ones(5)), ValueError, ("counts=", "(6,)")),
    ("counts-2d", lambda: _build(counts=torch.ones(6, 1)), ValueError, ("counts=",)),
    ("counts-bool", lambda: _build(counts=torch.ones(6, dtype=torch.bool)), TypeError, ("counts=",)),
    ("counts-list", lambda: _build(counts=[1, 2, 3, 4, 5, 6]), TypeError, ("counts=list",)),
    ("hybrid-counts-nan", lambda: _build(mapping="hybrid", embeddings=_f64(6, 2),
                                         counts=torch.tensor([5.0, NAN, 3, 0, 2, 7])), ValueError, ("counts=",)),
    ("num-codes-zero", lambda: _build(num_codes=0), ValueError, ("num_codes=0",)),
    ("num-codes-above-V", lambda: _build(num_codes=7), ValueError, ("num_codes=7", "V=6")),
    ("num-codes-float", lambda: _build(num_codes=2.0), TypeError, ("num_codes=2.0",)),
    ("num-codes-bool", lambda: _build(num_codes=True), TypeError, ("num_codes=True",)),
    ("vocab-size-zero", lambda: _build(vocab_size=0, num_codes=1), ValueError, ("vocab_size=0",)),
    ("unknown-method", lambda: _build(mapping="spectral"), ValueError,
     ("mapping='spectral'", "kmeans", "random", "contiguous", "equal_mass", "hybrid")),
    ("method-not-callable", lambda: _build(mapping=3), TypeError, ("mapping=3",)),
    ("embeddings-rows", lambda: _build(mapping="kmeans", embeddings=_f64(5, 2)), ValueError, ("embeddings=",)),
    ("embeddings-1d", lambda: _build(mapping="kmeans", embeddings=_f64(6)), ValueError, ("embeddings=",)),
    ("embeddings-int", lambda: _build(mapping="kmeans", embeddings=torch.ones(6, 2, dtype=torch.long)), TypeError,
     ("embeddings=",)),
    ("seed-float", lambda: _build(mapping="random", seed=0.5), TypeError, ("seed=0.5",)),
    ("callable-wrong-length", lambda: _build(mapping=lambda **_: torch.zeros(5, dtype=torch.long)), ValueError,
     ("mapping has 5 entries",)),
    ("validate-bool", lambda: validate_mapping(torch.zeros(6, dtype=torch.bool), 6, 3), TypeError, ("mapping=",)),
    ("validate-vocab-size", lambda: validate_mapping(torch.zeros(0, dtype=torch.long), 0, 3), ValueError,
     ("vocab_size=0",)),
    ("validate-num-codes", lambda: validate_mapping(torch.zeros(6, dtype=torch.long), 6, 0), ValueError,
     ("num_codes=0",)),
    ("floor-counts-length", lambda: unigram_floor(torch.ones(5), torch.tensor([0, 1, 2, 0, 1, 2]), 3), ValueError,
     ("counts=",)),
    ("floor-counts-nan", lambda: unigram_floor(torch.tensor([1.0, NAN, 1]), torch.tensor([0, 1, 1]), 2), ValueError,
     ("counts=",)),
    ("floor-counts-zero-total", lambda: unigram_floor(torch.zeros(3), torch.tensor([0, 1, 1]), 2), ValueError,
     ("counts=", "positive")),
    ("floor-mapping-range", lambda: unigram_floor(torch.ones(3), torch.tensor([0, 1, 2]), 2), ValueError,
     ("mapping values span",)),
]


@pytest.mark.parametrize(("call", "error", "fragments"), [pytest.param(c, e, f, id=i) for i, c, e, f in MAPPING_CASES])
def test_mapping_rejects_bad_input(call, error, fragments):
    _raises(error, fragments, call)


# --- the head ---------------------------------------------------------------------------------------------------

HEAD_CASES = [
    ("hidden-size-float", lambda: VQLogitsHead(2.5, torch.tensor([0, 1]), 2), TypeError, ("hidden_size=2.5",)),
    ("num-codes-float", lambda: VQLogitsHead(2, torch.tensor([0, 1]), 2.0), TypeError, ("num_codes=2.0",)),
    ("mapping-list", lambda: VQLogitsHead(2, [0, 1], 2), TypeError, ("mapping=list",)),
    ("mapping-empty", lambda: VQLogitsHead(2, torch.zeros(0, dtype=torch.long), 1), ValueError, ("mapping",)),
    ("dtype-int", lambda: VQLogitsHead(2, torch.tensor([0, 1]), 2, dtype=torch.long), TypeError,
     ("dtype=torch.int64",)),
    ("residual-rank-float", lambda: VQLogitsHead(2, torch.tensor([0, 1]), 2, residual_rank=1.5), TypeError,
     ("residual_rank=1.5",)),
    ("scratch-vocab-zero", lambda: VQLogitsHead.from_scratch(4, 0, 1, mapping="random"), ValueError,
     ("vocab_size=0",)),
    ("scratch-hidden-zero", lambda: VQLogitsHead.from_scratch(0, 6, 2, mapping="random"), ValueError,
     ("hidden_size=0",)),
    ("scratch-counts-nan", lambda: VQLogitsHead.from_scratch(4, 3, 2, mapping="random",
                                                             counts=torch.tensor([1.0, NAN, 2])), ValueError,
     ("counts=",)),
    ("scratch-counts-length", lambda: VQLogitsHead.from_scratch(4, 3, 2, mapping="random", counts=torch.ones(4)),
     ValueError, ("counts=",)),
    ("linear-num-codes-zero", lambda: VQLogitsHead.from_linear(nn.Linear(4, 6), 0, mapping="random"), ValueError,
     ("num_codes=0",)),
    ("linear-counts-length", lambda: VQLogitsHead.from_linear(nn.Linear(4, 6), 2, mapping="random",
                                                              counts=torch.ones(5), bias_init="unigram"),
     ValueError, ("counts=",)),
    ("loss-reduction", lambda: _head().loss(_f64(N, D), torch.zeros(N, dtype=torch.long), reduction="bogus"),
     ValueError, ("reduction='bogus'", "'mean', 'sum', 'none'")),
    ("gather-loss-reduction", lambda: _head(mode="gather").loss(_f64(N, D), torch.zeros(N, dtype=torch.long),
                                                               reduction="avg"), ValueError, ("reduction='avg'",)),
    ("gather-loss-negative", lambda: _head(mode="gather").loss(_f64(N, D), torch.tensor([0, -3, 1, 2])),
     ValueError, ("labels contains -3", "ignore_index=-100")),
    ("residual-loss-label", lambda: _head(residual_rank=R).loss(_f64(N, D), torch.tensor([0, 7, 1, 2])),
     ValueError, ("labels contains 7",)),
    ("loss-float-labels", lambda: _head().loss(_f64(N, D), torch.zeros(N)), TypeError, ("labels=",)),
    ("loss-hidden-int", lambda: _head().loss(torch.ones(N, D, dtype=torch.long), torch.zeros(N, dtype=torch.long)),
     TypeError, ("hidden=",)),
    ("loss-hidden-dtype", lambda: _head().loss(torch.randn(N, D), torch.zeros(N, dtype=torch.long)), TypeError,
     ("hidden=", "float64")),
    ("loss-hidden-scalar", lambda: _head().loss(torch.tensor(1.0, dtype=torch.float64), torch.zeros(1)),
     ValueError, ("hidden=",)),
    ("loss-ignore-index", lambda: _head().loss(_f64(N, D), torch.zeros(N, dtype=torch.long), ignore_index=None),
     TypeError, ("ignore_index=None",)),
    ("log-prob-count", lambda: _head().log_prob(_f64(N, D), torch.zeros(N - 1, dtype=torch.long)), ValueError,
     ("tokens",)),
    ("log-prob-float-tokens", lambda: _head().log_prob(_f64(N, D), torch.zeros(N)), TypeError, ("tokens=",)),
    ("argmax-hidden-size", lambda: _head().argmax(_f64(N, D + 1)), ValueError, ("hidden",)),
    ("logits-hidden-int", lambda: _head()(torch.ones(N, D, dtype=torch.long)), TypeError, ("hidden=",)),
    ("floor-counts-nan", lambda: _head(residual_rank=0).unigram_floor(torch.tensor([1.0, NAN, 1, 1, 1, 1, 1])),
     ValueError, ("counts=",)),
]


@pytest.mark.parametrize(("call", "error", "fragments"), [pytest.param(c, e, f, id=i) for i, c, e, f in HEAD_CASES])
def test_head_rejects_bad_input(call, error, fragments):
    _raises(error, fragments, call)


# --- Hugging Face wrapper -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vq_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=20, n_embd=8, n_layer=1, n_head=2, n_positions=16, bos_token_id=0,
                        eos_token_id=0, pad_token_id=1)
    return replace_lm_head(GPT2LMHeadModel(config).double().eval(), 4, mapping="random")


HF_CASES = [
    ("generate-temperature-nan", {"do_sample": True, "temperature": NAN}, ValueError, ("temperature=nan",)),
    ("generate-temperature-zero", {"do_sample": True, "temperature": 0.0}, ValueError, ("temperature=0.0",)),
    ("generate-top-k-negative", {"do_sample": True, "top_k": -3}, ValueError, ("top_k=-3",)),
    ("generate-top-p-nan", {"do_sample": True, "top_p": NAN}, ValueError, ("top_p=nan",)),
    ("generate-max-new-negative", {"max_new_tokens": -2}, ValueError, ("max_new_tokens", "-2")),
]


@pytest.mark.parametrize(("kwargs", "error", "fragments"), [pytest.param(k, e, f, id=i) for i, k, e, f in HF_CASES])
def test_generate_rejects_bad_settings(vq_gpt2, kwargs, error, fragments):
    ids = torch.tensor([[2, 3, 4]])
    _raises(error, fragments, lambda: vq_gpt2.generate(ids, **{"max_new_tokens": 2, **kwargs}))


@pytest.mark.parametrize(
    ("call", "error", "fragments"),
    [
        pytest.param(lambda m: m.generate(torch.tensor([2, 3, 4]), max_new_tokens=1), ValueError, ("input_ids=",),
                     id="generate-input-1d"),
        pytest.param(lambda m: m.generate(torch.tensor([[2.0, 3.0]]), max_new_tokens=1), TypeError, ("input_ids=",),
                     id="generate-input-float"),
        pytest.param(lambda m: m(torch.tensor([[2, 3, 4]]), labels=torch.tensor([[2, 30, 4]])), ValueError,
                     ("labels contains 30",), id="forward-label-range"),
        pytest.param(lambda m: vq_causal_lm_class(42), TypeError,
                     ("base=42",), id="class-of-non-class"),
        pytest.param(lambda m: from_pretrained(42), TypeError,
                     ("path=42",), id="from-pretrained-path"),
        pytest.param(lambda m: replace_lm_head(_tiny_plain_gpt2(), 0, mapping="random"), ValueError,
                     ("num_codes=0",), id="replace-num-codes-zero"),
    ],
)
def test_hf_rejects_bad_input(vq_gpt2, call, error, fragments):
    _raises(error, fragments, lambda: call(vq_gpt2))


def _tiny_plain_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=20, n_embd=8, n_layer=1, n_head=2, n_positions=16))


def test_generate_greedy_still_matches_argmax_after_checks(vq_gpt2):
    ids = torch.tensor([[2, 3, 4]])
    out = vq_gpt2.generate(ids, max_new_tokens=1, do_sample=False)
    hidden = vq_gpt2.get_decoder()(input_ids=ids).last_hidden_state[:, -1]
    assert out[0, -1].item() == vq_gpt2.get_output_embeddings().logits(hidden).argmax(-1).item()


# --- valid edge inputs equal the materialised head ---------------------------------------------------------------

def _reference_loss(p: dict[str, Any], labels: torch.Tensor, reduction: str, residual: bool,
                    ignore_index: int = -100) -> torch.Tensor:
    if residual:
        logits = residual_log_probs_reference(p["hidden"], p["codebook"], p["mapping"], p["bias"], p["proj"],
                                              p["emb"])
    else:
        logits = vq_logits_reference(p["hidden"], p["codebook"], p["mapping"], p["bias"])
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)


def _ours(p: dict[str, Any], labels: torch.Tensor, reduction: str, residual: bool,
          ignore_index: int = -100) -> torch.Tensor:
    if residual:
        return residual_cross_entropy(p["hidden"], p["codebook"], p["mapping"], labels, p["bias"], p["proj"],
                                      p["emb"], ignore_index=ignore_index, reduction=reduction)
    return collapsed_cross_entropy(p["hidden"], p["codebook"], p["mapping"], labels, p["bias"],
                                   ignore_index=ignore_index, reduction=reduction)


@pytest.mark.parametrize("residual", [False, True], ids=["ce", "residual"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", ["empty-batch", "all-ignored", "ignore-index-is-a-token", "int32-ids"])
def test_valid_edges_equal_cross_entropy_of_materialised_logits(case, reduction, residual):
    """Empty batch and all-ignored follow F.cross_entropy: sum 0, 'none' zeros, 'mean' 0/0 = nan; gradients
    (zero when nothing counts) equal too."""
    p = {k: v.requires_grad_() if v.is_floating_point() else v for k, v in _problem().items()}
    labels, ignore_index = p["labels"], -100
    if case == "empty-batch":
        p["hidden"] = p["hidden"].detach()[:0].requires_grad_()
        labels = labels[:0]
    elif case == "all-ignored":
        labels = torch.full_like(labels, -100)
    elif case == "ignore-index-is-a-token":
        labels, ignore_index = torch.tensor([0, 6, 3, 3]), 3
    got = _ours({**p, "mapping": p["mapping"].int()} if case == "int32-ids" else p,
                labels.int() if case == "int32-ids" else labels, reduction, residual, ignore_index)
    ref = _reference_loss(p, labels, reduction, residual, ignore_index)
    assert got.shape == ref.shape
    assert_close(got, ref, equal_nan=True)
    params = [p[k] for k in ("hidden", "codebook", "bias", *(("proj", "emb") if residual else ()))]
    weights = torch.linspace(0.5, 1.5, max(got.numel(), 1), dtype=torch.float64)[: got.numel()].reshape(got.shape)
    grads = torch.autograd.grad((got * weights).sum(), params, allow_unused=True)
    refs = torch.autograd.grad((ref * weights).sum(), params, allow_unused=True)
    for g, r in zip(grads, refs, strict=True):
        assert_close(torch.zeros_like(r) if g is None else g, torch.zeros_like(g) if r is None else r, equal_nan=True)


def test_log_prob_of_empty_batch_and_one_token_vocabulary():
    p = _problem()
    assert collapsed_log_prob(p["hidden"][:0], p["codebook"], p["mapping"], torch.zeros(0, dtype=torch.long)).shape \
        == (0,)
    one = collapsed_log_prob(p["hidden"], p["codebook"][:1], torch.zeros(1, dtype=torch.long),
                             torch.zeros(N, dtype=torch.long))
    assert torch.equal(one, torch.zeros(N, dtype=torch.float64))


@pytest.mark.parametrize("mode", ["collapsed", "gather", "residual"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_head_empty_batch_equals_cross_entropy(mode, reduction):
    head = _head(residual_rank=R) if mode == "residual" else _head(mode=mode)
    hidden, labels = _f64(2, 0, D), torch.zeros(2, 0, dtype=torch.long)
    got = head.loss(hidden, labels, reduction=reduction)
    ref = F.cross_entropy(head.logits(hidden).reshape(0, V), labels.reshape(0), reduction=reduction)
    assert got.shape == (labels.shape if reduction == "none" else ())
    assert_close(got.reshape(ref.shape), ref, equal_nan=True)
    assert head.sample(hidden).shape == head.argmax(hidden).shape == (2, 0)
    assert head.log_prob(hidden, labels).shape == (2, 0)


# --- property: random shapes and labels ---------------------------------------------------------------------------

@st.composite
def _problems(draw: st.DrawFn) -> dict[str, Any]:
    n, d, k = draw(st.integers(0, 5)), draw(st.integers(1, 3)), draw(st.integers(1, 4))
    v = draw(st.integers(k, 9))
    rank = draw(st.integers(0, 2))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    ignore_index = draw(st.sampled_from([-100, -1, 0]))
    labels = draw(st.lists(st.one_of(st.integers(-3, v + 1), st.just(ignore_index)), min_size=n, max_size=n))
    return {
        "hidden": torch.randn(n, d, generator=g, dtype=torch.float64),
        "codebook": torch.randn(k, d, generator=g, dtype=torch.float64),
        "mapping": torch.randint(0, k, (v,), generator=g),
        "bias": torch.randn(v, generator=g, dtype=torch.float64) if draw(st.booleans()) else None,
        "proj": torch.randn(rank, d, generator=g, dtype=torch.float64),
        "emb": torch.randn(v, rank, generator=g, dtype=torch.float64),
        "labels": torch.tensor(labels, dtype=torch.long),
        "ignore_index": ignore_index,
        "reduction": draw(st.sampled_from(["mean", "sum", "none"])),
        "residual": draw(st.booleans()),
    }


@settings(max_examples=50, deadline=None)
@given(_problems())
def test_property_loss_is_an_error_or_equals_cross_entropy(p):
    labels, ii, reduction, residual = p["labels"], p["ignore_index"], p["reduction"], p["residual"]
    v = p["mapping"].numel()
    invalid = bool((((labels < 0) | (labels >= v)) & (labels != ii)).any())
    try:
        got = _ours(p, labels, reduction, residual, ii)
    except (ValueError, TypeError) as err:
        assert invalid and "labels contains" in str(err), str(err)
        return
    assert not invalid, "an out-of-range label was accepted"
    ref = _reference_loss({**p, "bias": p["bias"] if p["bias"] is not None else torch.zeros(v, dtype=torch.float64)},
                          labels, reduction, residual, ii)
    nothing_counts = reduction == "mean" and bool((labels == ii).all())
    assert nothing_counts or bool(torch.isfinite(got).all())
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12, equal_nan=nothing_counts)
    if nothing_counts:
        assert math.isnan(got.item())
