"""compress_lm_head and the learned map: Sigma-weighted clustering and reassignment against naive references,
the exact collapsed loss after a reassignment, the distillation KL against the materialised KL, monotone
distillation and a bitwise save/load round trip of compressed tiny Llamas (tied and untied), bad input."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

from leanfit.studies.models.tiny_llama import tiny_llama
from leanfit.vq_logits.compress import (
    CompressConfig,
    Teacher,
    chunk_kl,
    compress_lm_head,
    compressed_head,
    singleton_count,
    statistics,
    teacher_kl,
)
from leanfit.vq_logits.head import VQLogitsHead
from leanfit.vq_logits.hf import from_pretrained
from leanfit.vq_logits.sigma import hidden_moments, kmeans_init, reassign_mapping, sigma_kmeans
from tests.errors import assert_user_error
from tests.reference import (
    kl_reference,
    reassign_reference,
    residual_log_probs_reference,
    sigma_kmeans_reference,
    vq_cross_entropy_reference,
    vq_logits_reference,
)
from tests.tolerances import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")

V, D, K = 100, 32, 12
TEXTS = ["the quick brown fox jumps over the lazy dog. " * 12, "pack my box with five dozen liquor jugs! " * 12]
FAST = {"sample_tokens": 64, "sample_length": 16, "batch_tokens": 4096, "lr": 1e-2, "show_progress": False}


class CharTokenizer:
    """Characters to ids in [2, 100); id 1 is EOS."""

    eos_token_id = 1

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [2 + ord(c) % 98 for c in text]}


def _llama(tied: bool) -> torch.nn.Module:
    model = tiny_llama(V, d_model=D, n_layers=1, n_heads=2, seed=0, tie_embeddings=tied).double()
    with torch.no_grad():  # a peaked teacher (a fresh tiny model's distribution is nearly uniform)
        model.get_output_embeddings().weight.mul_(8)
    return model


def _hidden(model) -> torch.Tensor:
    ids = torch.tensor([CharTokenizer()(t)["input_ids"][:200] for t in TEXTS])
    with torch.no_grad():
        return model.get_decoder()(input_ids=ids).last_hidden_state.reshape(-1, D)


def _random_sigma(d: int, g: torch.Generator) -> torch.Tensor:
    h = torch.randn(200, d, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, d, dtype=torch.float64)
    return hidden_moments(h + 0.5)[1]


# --- Sigma-weighted clustering -------------------------------------------------------------------------------

@pytest.mark.parametrize("duplicates", [False, True], ids=["distinct-rows", "duplicate-rows-empty-code"])
def test_sigma_kmeans_equals_naive_reference(duplicates):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 5, generator=g, dtype=torch.float64)
    if duplicates:  # rows 0..5 equal: codes started on two of them tie, the second goes empty and restarts
        w[:6] = w[0]
    sigma, weights = _random_sigma(5, g), torch.rand(40, generator=g, dtype=torch.float64) + 0.1
    init = torch.tensor([0, 1, 10, 20, 30, 39]) if duplicates else kmeans_init(weights, 6, seed=3)
    labels, codebook = sigma_kmeans(w, sigma, 6, weights=weights, ridge=1e-2, iters=15, init=init)
    ref_labels, ref_codebook = sigma_kmeans_reference(w, sigma, 6, weights, 1e-2, 15, init)
    assert torch.equal(labels, ref_labels)
    # scipy's sqrtm (Schur) and eigh roots agree to ~1e-13 relative; the inverse root amplifies it by cond(S)^0.5
    torch.testing.assert_close(codebook, ref_codebook, rtol=1e-9, atol=1e-11)


def test_sigma_metric_is_the_mean_squared_logit_error():
    """(w - c)^T Sigma (w - c) with Sigma = hidden_moments(h)[1] is the mean of ((w - c) . h)^2 over the states,
    so the k-means cost of a code is the mean squared logit error it makes."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(300, 6, generator=g, dtype=torch.float64) + 1.0
    w, c = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    mean, sigma = hidden_moments(h)
    assert_close((w - c) @ sigma @ (w - c), (((w - c) * h).sum(-1) ** 2).mean())
    assert_close(mean, h.mean(0))


def test_reassign_mapping_equals_naive_reference():
    g = torch.Generator().manual_seed(2)
    x, c = torch.randn(30, 4, generator=g, dtype=torch.float64), torch.randn(7, 4, generator=g, dtype=torch.float64)
    sigma, mapping = _random_sigma(4, g), torch.randint(0, 7, (30,), generator=g)
    movable, targets = torch.rand(30, generator=g) < 0.7, torch.tensor([0, 1, 1, 0, 1, 1, 1], dtype=torch.bool)
    new = reassign_mapping(x, c, sigma, mapping, movable=movable, targets=targets)
    assert torch.equal(new, reassign_reference(x, c, sigma, mapping, movable, targets))
    assert torch.equal(new[~movable], mapping[~movable]) and bool(targets[new[movable]].all())


# --- VQLogitsHead.reassign ---------------------------------------------------------------------------------------

def _head(rank: int, g: torch.Generator) -> VQLogitsHead:
    head = VQLogitsHead(6, torch.arange(20) % 5, 5, residual_rank=rank, dtype=torch.float64)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    return head


def _materialised_nll(head: VQLogitsHead, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if head.residual_rank:
        log_p = residual_log_probs_reference(h, head.codebook, head.mapping, head.bias, *head._residual())
        return -log_p.gather(1, y[:, None]).mean()
    return vq_cross_entropy_reference(h, head.codebook, head.mapping, y, head.bias)


@pytest.mark.parametrize("rank", [0, 2], ids=["plain", "residual"])
def test_reassign_keeps_the_collapsed_loss_exact(rank):
    """After a reassignment (an emptied code included) the head's loss, gradients and greedy choice equal the
    materialised float64 reference on the new map."""
    g = torch.Generator().manual_seed(3)
    head = _head(rank, g)
    h, y = torch.randn(9, 6, generator=g, dtype=torch.float64), torch.randint(0, 20, (9,), generator=g)
    head.argmax(h), head.loss(h, y)  # fill the layout and decoding caches for the old map
    new = torch.randint(0, 4, (20,), generator=g)  # code 4 ends empty
    moved = head.reassign(new, anchor=h.mean(0))
    assert moved == int((new != torch.arange(20) % 5).sum()) and torch.equal(head.mapping, new)
    loss = head.loss(h, y)
    grads = torch.autograd.grad(loss, list(head.parameters()))
    ref = _materialised_nll(head, h, y)
    ref_grads = torch.autograd.grad(ref, list(head.parameters()))
    assert_close(loss, ref)
    for got, want in zip(grads, ref_grads, strict=True):
        assert_close(got, want)
    if not rank:
        assert torch.equal(head.argmax(h), vq_logits_reference(h, head.codebook, head.mapping, head.bias).argmax(-1))


@pytest.mark.parametrize("rank", [0, 2], ids=["plain", "residual"])
def test_reassign_keeps_moved_tokens_scores_at_the_anchor(rank):
    """A moved token's score ``c + b + u . P a`` at the anchor is unchanged; with a residual term, its vector
    ``c + P^T u`` changes only by what P's rows cannot span."""
    g = torch.Generator().manual_seed(4)
    head = _head(rank, g)
    anchor = torch.randn(6, generator=g, dtype=torch.float64)
    before, vectors = _scores(head, anchor), head.token_vectors()
    head.reassign(torch.roll(head.mapping, 1), anchor=anchor)
    assert_close(_scores(head, anchor), before)
    if rank:
        p = head._residual()[0].detach()
        projector = torch.linalg.pinv(p) @ p  # onto P's row space
        assert_close(head.token_vectors() @ projector, vectors @ projector)


def _scores(head: VQLogitsHead, a: torch.Tensor) -> torch.Tensor:
    scores = head.codebook.detach()[head.mapping] @ a + head.bias.detach()
    if head.residual_rank:
        p, u = head._residual()
        scores = scores + u.detach() @ (p.detach() @ a)
    return scores


def test_learned_map_from_the_heads_own_state():
    """Without an original head the map is learned from ``token_vectors()`` (codes plus the residual term)."""
    g = torch.Generator().manual_seed(5)
    head = _head(2, g)
    sigma = _random_sigma(6, g)
    vectors = head.token_vectors()
    p, u = head._residual()
    assert_close(vectors, head.codebook[head.mapping] + u @ p)
    new = reassign_mapping(vectors, head.codebook, sigma, head.mapping)
    everything = torch.ones(20, dtype=torch.bool)
    assert torch.equal(new, reassign_reference(vectors, head.codebook.detach(), sigma, head.mapping, everything,
                                               torch.ones(5, dtype=torch.bool)))


# --- the distillation loss ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("rank", [0, 2], ids=["collapsed", "residual"])
def test_chunk_kl_equals_the_materialised_kl(rank):
    g = torch.Generator().manual_seed(6)
    head = _head(rank, g)
    with torch.no_grad():
        head.reassign(torch.arange(20) % 4)  # one empty code
    h, teacher = torch.randn(7, 6, generator=g, dtype=torch.float64), torch.randn(7, 20, generator=g) * 3
    kl = chunk_kl(head, h, teacher.double())
    student = (residual_log_probs_reference(h, head.codebook, head.mapping, head.bias, *head._residual()) if rank
               else vq_logits_reference(h, head.codebook, head.mapping, head.bias))
    ref = kl_reference(teacher, student)
    assert_close(kl, ref)
    params = list(head.parameters())
    for got, want in zip(torch.autograd.grad(kl.sum(), params), torch.autograd.grad(ref.sum(), params), strict=True):
        assert_close(got, want)


# --- compress_lm_head --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("rank", [0, 2], ids=["plain", "residual"])
def test_compress_lowers_the_kl_to_the_original_head_monotonically(tied, rank):
    teacher_model = _llama(tied)
    h = _hidden(teacher_model)
    w = teacher_model.get_output_embeddings().weight.detach()
    kls = []
    for steps in (0, 1, 2, 4, 8):
        model = compress_lm_head(_llama(tied), CharTokenizer(), TEXTS, K, steps=steps, residual_rank=rank, **FAST)
        kls.append(teacher_kl(model.get_output_embeddings(), h, w))
    assert all(b < a for a, b in zip(kls, kls[1:], strict=False)), kls
    assert kls[-1] < 0.95 * kls[0], kls  # measured: 0.90-0.94 of the start after 8 steps


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_compressed_model_saves_and_loads_bitwise(tied, tmp_path):
    model = compress_lm_head(_llama(tied), CharTokenizer(), TEXTS, K, steps=3, residual_rank=2, **FAST).eval()
    ids = torch.tensor([CharTokenizer()(TEXTS[0])["input_ids"][:40]])
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        logits = model(ids).logits
        for loaded in (from_pretrained(tmp_path, dtype=torch.float64), AutoModelForCausalLM.from_pretrained(
                tmp_path, dtype=torch.float64)):
            assert type(loaded) is type(model)
            assert torch.equal(loaded.eval()(ids).logits, logits)


def test_start_is_exact_for_singletons_and_at_the_mean_state():
    """Before distillation: the round(K/2) most frequent tokens keep their own rows, and every token's logit at
    the mean hidden state is the original one (the bias absorbs the code's error there)."""
    model = _llama(False)
    w = model.get_output_embeddings().weight.detach()
    h = _hidden(model)
    counts = torch.bincount(torch.tensor(CharTokenizer()(TEXTS[0] + TEXTS[1])["input_ids"]), minlength=V)
    stats = statistics(h, Teacher(w, None), counts, 0.1)
    head, clustered = compressed_head(Teacher(w, None), stats, CompressConfig(num_codes=K))
    single = (~clustered).nonzero().squeeze(1)
    assert single.numel() == singleton_count(K, V, 0.5) == 6
    assert torch.equal(head.codebook[head.mapping[single]], w[single])
    assert set(single.tolist()) == set(torch.argsort(stats.frequency, descending=True)[:6].tolist())
    assert_close(head.logits(stats.mean[None])[0], w @ stats.mean)


def test_residual_start_is_the_sigma_weighted_rank_r_optimum():
    """With ``residual_rank`` r the start's ``U P`` fits ``(W - C[M]) (h - mean)`` over the states with the
    Eckart-Young error (the tail of the singular values of ``(W - C[M]) Cov^{1/2}``, root from scipy), and the
    score ``c . a + b + u . P a`` at the mean state ``a`` is the original logit."""
    from scipy.linalg import sqrtm

    g = torch.Generator().manual_seed(9)
    w = torch.randn(30, 6, generator=g, dtype=torch.float64)
    h = torch.randn(400, 6, generator=g, dtype=torch.float64) * torch.linspace(0.3, 2, 6, dtype=torch.float64) + 0.7
    stats = statistics(h, Teacher(w, None), torch.ones(30), 0.1)
    cfg = CompressConfig(num_codes=5, residual_rank=2, singleton_fraction=0.4, ridge=0.0)
    head, _ = compressed_head(Teacher(w, None), stats, cfg)
    p, u = head._residual()
    residual = w - head.codebook[head.mapping]
    centred = h - h.mean(0)
    error = ((centred @ (residual - u @ p).t().detach()) ** 2).mean(0).sum()
    cov = (centred.t() @ centred / h.shape[0]).numpy()
    singular = torch.linalg.svdvals(residual.detach() @ torch.as_tensor(sqrtm(cov).real))
    torch.testing.assert_close(error, (singular[2:] ** 2).sum(), rtol=1e-9, atol=1e-12)  # sqrtm: ~1e-13 relative
    assert_close(_scores(head, stats.mean), w @ stats.mean)


def test_compress_leaves_the_global_random_state_alone():
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    compress_lm_head(_llama(False), CharTokenizer(), TEXTS, K, steps=1, **FAST)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("mapping", ["learned", "fixed"])
def test_learned_map_moves_only_clustered_tokens(mapping):
    model = _llama(False)
    start = compress_lm_head(_llama(False), CharTokenizer(), TEXTS, K, steps=0, **FAST).get_output_embeddings()
    head = compress_lm_head(model, CharTokenizer(), TEXTS, K, steps=6, reassign_every=2, mapping=mapping,
                            **FAST).get_output_embeddings()
    single = start.mapping < 6
    assert torch.equal(head.mapping[single], start.mapping[single])
    assert bool((head.mapping[~single] >= 6).all())
    assert (mapping == "fixed") == torch.equal(head.mapping, start.mapping)


# --- bad input ---------------------------------------------------------------------------------------------------

def _compress(**overrides):
    args = {"model": _llama(False), "tokenizer": CharTokenizer(), "texts": TEXTS, "num_codes": K, **FAST}
    args.update(overrides)
    return lambda: compress_lm_head(**args)


@pytest.mark.parametrize(("error", "fragments", "call"), [
    (TypeError, ("texts=", "wrap one text in a list"), _compress(texts="just a string")),
    (ValueError, ("texts=", "non-blank"), _compress(texts=["  "])),
    (TypeError, ("texts=", "item 1 is int"), _compress(texts=["a", 3])),
    (ValueError, ("num_codes=101", "V=100"), _compress(num_codes=V + 1)),
    (ValueError, ("num_codes=0",), _compress(num_codes=0)),
    (TypeError, ("tokenizer=None",), _compress(tokenizer=None)),
    (TypeError, ("warmup=3", "the options are"), _compress(warmup=3)),
    (ValueError, ("steps=-1",), _compress(steps=-1)),
    (ValueError, ("mapping='kmeans'", "'learned' or 'fixed'"), _compress(mapping="kmeans")),
    (ValueError, ("singleton_fraction=1.0",), _compress(singleton_fraction=1.0)),
    (ValueError, ("lr=0.0",), _compress(lr=0.0)),
    (TypeError, ("show_progress=1",), _compress(show_progress=1)),
    (TypeError, ("model=", "already a VQ head"), _compress(model=compress_lm_head(
        _llama(False), CharTokenizer(), TEXTS, K, steps=0, **FAST))),
], ids=["texts-str", "texts-blank", "texts-item", "num-codes-large", "num-codes-0", "tokenizer", "unknown-option",
        "steps", "mapping", "singleton-fraction", "lr", "show-progress", "compressed-twice"])
def test_compress_bad_input_names_the_parameter(error, fragments, call):
    message = assert_user_error(error, fragments, call, expected=True)
    assert "\n" not in message


def test_compress_refuses_a_tokenizer_of_another_vocabulary():
    class Wide(CharTokenizer):
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [500 + ord(c) for c in text]}

    assert_user_error(ValueError, ("tokenizer=", "V=100"), _compress(tokenizer=Wide()), expected=True)


@pytest.mark.parametrize(("error", "fragments", "call"), [
    (ValueError, "mapping values span", lambda h: h.reassign(torch.full((20,), 5))),
    (TypeError, "mapping=", lambda h: h.reassign(torch.zeros(20))),
    (ValueError, ("anchor=", "(d,) = (6,)"), lambda h: h.reassign(h.mapping, anchor=torch.zeros(5))),
    (TypeError, "anchor=", lambda h: h.reassign(h.mapping, anchor=[0.0] * 6)),
    (ValueError, ("weights=", "positive"), lambda h: sigma_kmeans(h.codebook, torch.eye(6), 2,
                                                                  weights=-torch.ones(5))),
    (ValueError, "second_moment=", lambda h: sigma_kmeans(h.codebook, torch.eye(5), 2)),
    (ValueError, "ridge=", lambda h: sigma_kmeans(h.codebook, torch.eye(6), 2, ridge=math.nan)),
    (ValueError, "num_codes=6", lambda h: sigma_kmeans(h.codebook, torch.eye(6), 6)),
    (TypeError, "movable=", lambda h: reassign_mapping(h.codebook[h.mapping], h.codebook, torch.eye(6), h.mapping,
                                                       movable=torch.ones(20))),
    (ValueError, "targets=", lambda h: reassign_mapping(h.codebook[h.mapping], h.codebook, torch.eye(6), h.mapping,
                                                        targets=torch.zeros(5, dtype=torch.bool))),
], ids=["map-range", "map-dtype", "anchor-shape", "anchor-type", "weights", "sigma-shape", "ridge", "num-codes",
        "movable", "targets"])
def test_learned_map_bad_input_names_the_parameter(error, fragments, call):
    head = _head(0, torch.Generator().manual_seed(8))
    message = assert_user_error(error, fragments, lambda: call(head))
    assert "\n" not in message


def test_a_learned_map_that_cannot_move_says_so():
    """Reassignments happen every reassign_every steps before the last: with steps <= reassign_every there are none,
    and the user is told instead of silently getting the fixed map; with one more step, or with the default (fixed)
    map, there is no warning."""
    with pytest.warns(UserWarning, match=r"steps=2 <= reassign_every=2: the map never moves"):
        compress_lm_head(_llama(False), CharTokenizer(), TEXTS, K, steps=2, reassign_every=2, mapping="learned",
                         **FAST)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compress_lm_head(_llama(False), CharTokenizer(), TEXTS, K, steps=3, reassign_every=2, mapping="learned",
                         **FAST)
        compress_lm_head(_llama(False), CharTokenizer(), TEXTS, K, steps=2, reassign_every=2, **FAST)

