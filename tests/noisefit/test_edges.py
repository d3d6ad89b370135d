"""Edge inputs at the boundary of the public noisefit API.

Each kind of bad input (wrong type, non-finite or out-of-range number, bad shape, empty batch) is a TypeError or
ValueError whose message names the parameter; each valid edge input (zero scale, empty batch of the noise std, one
completion token, empty selection with an explicit count) gives the naive reference's result. The property tests
draw random shapes and values, NaN/inf and empty sizes included, and accept only a clear error or the reference.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from leanfit.noisefit.calibration import calibrate, propagated_kl, scale_for_target, snr_scores
from leanfit.noisefit.config import CalibrationResult, LayerSpec, NoiseFiTConfig
from leanfit.noisefit.injector import (
    NoiseInjector,
    find_decoder_layers,
    paper_v1_noise_std,
    token_noise_std,
    unwrap_model,
)
from leanfit.noisefit.loss import masked_kl, noisefit_loss, rdrop_loss, shifted_completion_mask, statistics_mask
from leanfit.noisefit.trainer import NoiseFiTCallback, NoiseFiTTrainer, RDropTrainer
from tests.noisefit.test_injector import VOCAB, llama, make_batch, n_hooks
from tests.reference import masked_kl_reference, token_std_reference, v1_std_reference, winsorized_reference

NAN, INF = float("nan"), float("inf")
BAD = (TypeError, ValueError)


def hidden_states(rows: int = 2, seq: int = 3, d: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, seq, d, generator=torch.Generator().manual_seed(seed))


def with_value(x: torch.Tensor, value: float) -> torch.Tensor:
    x = x.clone()
    x.view(-1)[x.numel() // 2] = value
    return x


class EmbeddingLM(nn.Module):
    """A model-free causal LM stub: logits = an embedding of the input ids (shift=1 drops the last position, so
    the logits no longer match the labels)."""

    def __init__(self, shift: int = 0) -> None:
        super().__init__()
        self.shift = shift
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.emb = nn.Embedding(VOCAB, VOCAB)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> SimpleNamespace:
        return SimpleNamespace(logits=self.emb(input_ids[:, : input_ids.shape[1] - self.shift]))


def ce_reference(logits: torch.Tensor, labels: torch.Tensor, denom: float | None) -> float:
    """Completion-only next-token cross-entropy, token by token in float64."""
    total, count = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            if labels[b, t + 1] != -100:
                total -= float(torch.log_softmax(logits[b, t].detach().double(), -1)[labels[b, t + 1]])
                count += 1
    return total / (count if denom is None else denom)


# ------------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("kwargs, match", [
    ({"calib_batches": 2.5}, r"calib_batches=2\.5"),
    ({"alpha": "0.5"}, r"alpha='0\.5'"),
    ({"alpha": True}, r"alpha=True"),
    ({"n_noisy": 2.0}, r"n_noisy=2\.0"),
    ({"seed": 1.5}, r"seed=1\.5"),
    ({"rel_noise": None}, r"rel_noise=None"),
    ({"token_adaptive": "yes"}, r"token_adaptive='yes'"),
    ({"calib_scales": 0.1}, r"calib_scales=0\.1"),
    ({"calib_scales": "0.1"}, r"calib_scales='0\.1'"),
    ({"calib_scales": (0.1, "0.2")}, r"calib_scales=\(0\.1, '0\.2'\)"),
    ({"calib_scales": (0.1, True)}, r"calib_scales=\(0\.1, True\)"),
], ids=["calib-batches-float", "alpha-str", "alpha-bool", "n-noisy-float", "seed-float", "rel-noise-none",
        "adaptive-str", "scales-scalar", "scales-str", "scales-str-item", "scales-bool-item"])
def test_config_wrong_type_is_a_type_error(kwargs, match):
    with pytest.raises(TypeError, match=match):
        NoiseFiTConfig(**kwargs)


@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("field", ["rel_noise", "robust_beta", "max_token_factor", "alpha", "lam", "temperature",
                                   "calib_scales"])
def test_config_non_finite_is_a_value_error(field, value):
    with pytest.raises(ValueError, match=rf"{field}=.*finite"):
        NoiseFiTConfig(**{field: (0.1, value) if field == "calib_scales" else value})


@pytest.mark.parametrize("kwargs, match", [
    ({"rel_noise": -1e-3}, r"rel_noise=-0\.001 .*> 0"),
    ({"seed": -1}, r"seed=-1 .*>= 0"),
    ({"calib_batches": -2}, r"calib_batches=-2"),
    ({"calib_scales": (0.0,)}, r"calib_scales=\(0\.0,\)"),
    ({"calib_scales": []}, r"calib_scales=\[\]"),
    ({"max_token_factor": -5.0}, r"max_token_factor=-5\.0"),
    ({"temperature": -1.0}, r"temperature=-1\.0"),
    ({"alpha": 1.0 + 1e-9}, r"alpha=1\.0+1 .*\[0, 1\]"),
    ({"layers": [0, 2.0]}, r"layers=\[0, 2\.0\]"),
    ({"layers": None}, r"layers=None"),
    ({"layers": "-1"}, r"layers='-1'"),
], ids=["rel-noise-negative", "seed-negative", "calib-batches-negative", "scale-zero", "scales-empty",
        "max-factor-negative", "temperature-negative", "alpha-above-one", "layers-float", "layers-none",
        "layers-negative-str"])
def test_config_out_of_range_is_a_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NoiseFiTConfig(**kwargs)


@pytest.mark.parametrize("spec, n_layers, exc, match", [
    (LayerSpec("auto"), 0, ValueError, r"n_layers=0"),
    (LayerSpec("auto"), -4, ValueError, r"n_layers=-4"),
    (LayerSpec("auto"), 2.5, TypeError, r"n_layers=2\.5"),
    (LayerSpec("auto", 0), 4, ValueError, r"k=0"),
    (LayerSpec("snr_high", -1), 4, ValueError, r"k=-1"),
], ids=["no-layers", "negative-layers", "float-layers", "k-zero", "k-negative"])
def test_layer_spec_n_keep_rejects(spec, n_layers, exc, match):
    with pytest.raises(exc, match=match):
        spec.n_keep(n_layers)


def test_layer_spec_n_keep_edges():
    assert [LayerSpec("auto").n_keep(n) for n in (1, 2, 9)] == [1, 2, 3]
    assert LayerSpec("snr_low", 5).n_keep(2) == 2 and LayerSpec("explicit", 2, (0, 3)).n_keep(1) == 2


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"scales": {0: -0.1}}, ValueError, r"scales="),
    ({"scales": {0: NAN}}, ValueError, r"scales="),
    ({"scales": {1: 0.1}}, ValueError, r"scales=.*layers \[0\]"),
    ({"scales": [0.1]}, TypeError, r"scales=\[0\.1\]"),
    ({"layers": [0.5], "scales": {}}, TypeError, r"layers=\[0\.5\]"),
    ({"layers": [0, 0], "scales": {}}, ValueError, r"layers=\[0, 0\]"),
    ({"method": "entropy"}, ValueError, r"method='entropy'"),
    ({"scores": [NAN, None]}, ValueError, r"scores=\[nan, None\]"),
], ids=["negative-scale", "nan-scale", "scale-of-unchosen-layer", "scales-list", "float-layer", "repeated-layer",
        "method", "nan-score"])
def test_calibration_result_rejects(kwargs, exc, match):
    base = {"layers": [0], "scales": {0: 0.05}, "scores": [1.0, None], "method": "snr"}
    with pytest.raises(exc, match=match):
        CalibrationResult(**{**base, **kwargs})


# ------------------------------------------------------------------------------------------------ noise std
@pytest.mark.parametrize("kwargs, exc, match", [
    ({"scale": -1}, ValueError, r"scale=-1 .*>= 0"),
    ({"scale": NAN}, ValueError, r"scale=nan"),
    ({"scale": INF}, ValueError, r"scale=inf"),
    ({"scale": "0.1"}, TypeError, r"scale='0\.1'"),
    ({"scale": 0.1, "beta": -1.0}, ValueError, r"beta=-1\.0"),
    ({"scale": 0.1, "beta": NAN}, ValueError, r"beta=nan"),
    ({"scale": 0.1, "max_factor": 0.0}, ValueError, r"max_factor=0\.0"),
    ({"scale": 0.1, "max_factor": INF}, ValueError, r"max_factor=inf"),
    ({"scale": 0.1, "token_adaptive": "no"}, TypeError, r"token_adaptive='no'"),
], ids=["scale-negative", "scale-nan", "scale-inf", "scale-str", "beta-negative", "beta-nan", "max-factor-zero",
        "max-factor-inf", "adaptive-str"])
def test_token_noise_std_rejects_bad_scalars(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        token_noise_std(hidden_states(), **kwargs)


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"base": -1.0}, ValueError, r"base=-1\.0"),
    ({"base": NAN}, ValueError, r"base=nan"),
    ({"base": "1"}, TypeError, r"base='1'"),
    ({"base": 0.1, "beta": -0.5}, ValueError, r"beta=-0\.5"),
    ({"base": 0.1, "max_factor": -1.0}, ValueError, r"max_factor=-1\.0"),
], ids=["base-negative", "base-nan", "base-str", "beta-negative", "max-factor-negative"])
def test_paper_v1_noise_std_rejects_bad_scalars(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        paper_v1_noise_std(hidden_states(), **kwargs)


def _v1(hidden: torch.Tensor) -> torch.Tensor:
    return paper_v1_noise_std(hidden, 0.1)


def _token(hidden: torch.Tensor) -> torch.Tensor:
    return token_noise_std(hidden, scale=0.1)


@pytest.mark.parametrize("fn", [_token, _v1], ids=["token", "v1"])
@pytest.mark.parametrize("hidden, exc, match", [
    (torch.randn(3, 8), ValueError, r"hidden=.*\(B, T, d\)"),
    ([[[0.5, 1.0]]], TypeError, r"hidden=.*tensor"),
    (torch.ones(1, 2, 4, dtype=torch.long), TypeError, r"hidden=.*floating"),
    (torch.ones(1, 2, 0), ValueError, r"hidden=.*d >= "),
    (with_value(hidden_states(), NAN), ValueError, r"hidden=.*finite"),
    (with_value(hidden_states(), -INF), ValueError, r"hidden=.*finite"),
], ids=["2d", "list", "integer", "no-channels", "nan", "inf"])
def test_noise_std_rejects_bad_hidden(fn, hidden, exc, match):
    with pytest.raises(exc, match=match):
        fn(hidden)


def test_paper_v1_noise_std_needs_two_channels():
    with pytest.raises(ValueError, match=r"hidden=.*d >= 2"):
        paper_v1_noise_std(torch.ones(2, 3, 1), 0.1)  # the unbiased variance of one channel is NaN


@pytest.mark.parametrize("mask, exc, match", [
    (torch.ones(2, 4, dtype=torch.bool), ValueError, r"token_mask=.*\(2, 3\)"),
    (torch.ones(2, 3), TypeError, r"token_mask=.*bool"),
    ([[True] * 3] * 2, TypeError, r"token_mask="),
], ids=["shape", "float", "list"])
def test_token_noise_std_rejects_bad_token_mask(mask, exc, match):
    with pytest.raises(exc, match=match):
        token_noise_std(hidden_states(), mask, scale=0.1)


@pytest.mark.parametrize("adaptive", [True, False], ids=["adaptive", "isotropic"])
def test_noise_std_valid_edges_match_the_reference(adaptive):
    h = hidden_states(2, 3, 8)
    assert not token_noise_std(h, scale=0.0, token_adaptive=adaptive).any()  # zero scale: no noise
    empty = token_noise_std(h[:0], scale=0.1, token_adaptive=adaptive)
    assert empty.shape == (0, 3, 8 if adaptive else 1)
    none_valid = torch.zeros(2, 3, dtype=torch.bool)  # no valid token: statistics over all of them
    got = token_noise_std(h, none_valid, scale=0.1, token_adaptive=adaptive)
    torch.testing.assert_close(got.double().expand(h.shape), token_std_reference(h, None, 0.1, adaptive),
                               rtol=1e-5, atol=1e-7)
    assert paper_v1_noise_std(h[:0], 0.1).shape == (0, 3, 8)
    assert not paper_v1_noise_std(h, 0.0).any()


# -------------------------------------------------------------------------------------------------- injector
@pytest.mark.parametrize("kwargs, exc, match", [
    ({"layers": [0.5]}, TypeError, r"layers=\[0\.5\]"),
    ({"layers": [True]}, TypeError, r"layers=\[True\]"),
    ({"layers": "01"}, TypeError, r"layers='01'"),
    ({"layers": []}, ValueError, r"layers=\[\]"),
    ({"layers": [-1]}, ValueError, r"layers=\[-1\]"),
    ({"scales": {0: INF}}, ValueError, r"scales=\{0: inf\}"),
    ({"scales": {0: NAN}}, ValueError, r"scales=\{0: nan\}"),
    ({"scales": {0: "0.1"}}, TypeError, r"scales=\{0: '0\.1'\}"),
    ({"scales": [0.1]}, TypeError, r"scales=\[0\.1\]"),
    ({"scales": {0: 0.0}}, ValueError, r"scales=\{0: 0\.0\}"),
    ({"generator": None}, ValueError, r"generator=None"),
], ids=["layer-float", "layer-bool", "layers-str", "layers-empty", "layer-negative", "scale-inf", "scale-nan",
        "scale-str", "scales-list", "scale-zero", "generator"])
def test_injector_rejects_bad_arguments(kwargs, exc, match):
    model = llama()
    with pytest.raises(exc, match=match):
        NoiseInjector(model, NoiseFiTConfig(layers="0"), **{"layers": [0], **kwargs})
    assert n_hooks(model) == 0


@pytest.mark.parametrize("call, exc, match", [
    (lambda: NoiseInjector("gpt2", NoiseFiTConfig(layers="0")), TypeError, r"model='str'"),
    (lambda: NoiseInjector(llama(), {"layers": "0"}), TypeError, r"config='dict'"),
    (lambda: NoiseInjector(nn.Linear(2, 2), NoiseFiTConfig(layers="0")), ValueError, r"model='Linear'"),
    (lambda: find_decoder_layers(42), TypeError, r"model='int'"),
    (lambda: unwrap_model(None), TypeError, r"model='NoneType'"),
], ids=["injector-model", "injector-config", "no-blocks", "find-layers-int", "unwrap-none"])
def test_model_and_config_types(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"token_mask": [[True] * 12] * 3}, TypeError, r"token_mask="),
    ({"noise_mask": torch.ones(12, dtype=torch.bool)}, ValueError, r"noise_mask=.*\(B, T\)"),
    ({"rows": "abc"}, TypeError, r"rows='abc'"),
    ({"force": "yes"}, TypeError, r"force='yes'"),
], ids=["token-mask-list", "noise-mask-1d", "rows-str", "force-str"])
def test_noisy_rejects_bad_arguments_on_entry(kwargs, exc, match):
    injector = NoiseInjector(llama(), NoiseFiTConfig(layers=[0]))
    with pytest.raises(exc, match=match), injector.noisy(**kwargs):
        pass


@pytest.mark.parametrize("call, exc, match", [
    (lambda inj: inj.set_token_mask([[True]]), TypeError, r"mask="),
    (lambda inj: inj.set_token_mask(None, torch.ones(2, 3, 4)), ValueError, r"noise_mask="),
    (lambda inj: inj.reseed(1.5), TypeError, r"seed=1\.5"),
    (lambda inj: inj.reseed(-1), ValueError, r"seed=-1"),
    (lambda inj: inj.reseed("3"), TypeError, r"seed='3'"),
], ids=["mask-list", "noise-mask-3d", "seed-float", "seed-negative", "seed-str"])
def test_injector_methods_reject(call, exc, match):
    with pytest.raises(exc, match=match):
        call(NoiseInjector(llama(), NoiseFiTConfig(layers=[0])))


def test_injector_accepts_integer_like_layers():
    model = llama()
    with NoiseInjector(model, NoiseFiTConfig(layers=[0]), layers=torch.tensor([1, 0]), scales={1: 0.2}) as inj:
        assert inj.layers == (0, 1) and inj.scales == {0: 0.05, 1: 0.2}
    assert n_hooks(model) == 0


# ----------------------------------------------------------------------------------------------- calibration
def _batch_with(**changes) -> dict:
    batch = make_batch()
    batch.update(changes)
    return batch


@pytest.mark.parametrize("data, exc, match", [
    (make_batch(), TypeError, r"batches=.*\[batch\]"),
    ([_batch_with(labels=make_batch()["labels"][:, :-2])], ValueError, r"labels=.*\(3, 10\).*\(3, 12\)"),
    ([_batch_with(input_ids=[[1, 2, 3]])], TypeError, r"input_ids="),
    ([_batch_with(labels=make_batch()["labels"].float())], TypeError, r"labels=.*integer"),
    ([{k: v[:0] for k, v in make_batch().items()}], ValueError, r"batches=.*empty"),
    (iter([]), ValueError, r"batches='an empty list'"),
], ids=["one-dict", "label-shape", "ids-list", "float-labels", "zero-rows", "zero-batches"])
def test_calibrate_rejects_bad_batches(data, exc, match):
    with pytest.raises(exc, match=match):
        calibrate(llama(), data, NoiseFiTConfig())


@pytest.mark.parametrize("call", [
    lambda model, data: calibrate(model, data, {"layers": "auto"}),
    lambda model, data: snr_scores(model, data, None),
    lambda model, data: propagated_kl(model, data, "config", [(0, 0.1)]),
], ids=["calibrate", "snr-scores", "propagated-kl"])
def test_calibration_functions_check_the_config(call):
    with pytest.raises(TypeError, match=r"config="):
        call(llama(), [make_batch()])


@pytest.mark.parametrize("fn, kwargs, exc, match", [
    (snr_scores, {"batches": []}, ValueError, r"batches="),
    (snr_scores, {"n_draws": 0}, ValueError, r"n_draws=0"),
    (snr_scores, {"n_draws": 2.5}, TypeError, r"n_draws=2\.5"),
    (propagated_kl, {"batches": []}, ValueError, r"batches="),
    (propagated_kl, {"pairs": [(5, 0.1)]}, ValueError, r"pairs=.*\[0, 2\)"),
    (propagated_kl, {"pairs": [(0, -0.1)]}, ValueError, r"pairs="),
    (propagated_kl, {"pairs": [(0, NAN)]}, ValueError, r"pairs="),
    (propagated_kl, {"pairs": [0]}, TypeError, r"pairs=\[0\]"),
    (propagated_kl, {"pairs": [(0.5, 0.1)]}, TypeError, r"pairs="),
], ids=["snr-no-batches", "snr-zero-draws", "snr-float-draws", "kl-no-batches", "kl-layer-range",
        "kl-negative-scale", "kl-nan-scale", "kl-not-pairs", "kl-float-layer"])
def test_probe_functions_reject(fn, kwargs, exc, match):
    args = {"model": llama(), "batches": [make_batch()], "config": NoiseFiTConfig()}
    if fn is propagated_kl:
        args["pairs"] = [(0, 0.1)]
    with pytest.raises(exc, match=match):
        fn(**{**args, **kwargs})


def test_propagated_kl_counts_a_repeated_pair_once():
    model, data, cfg = llama(), [make_batch()], NoiseFiTConfig()
    model.eval()
    once = propagated_kl(model, data, cfg, [(1, 0.1)])
    twice = propagated_kl(model, data, cfg, [(1, 0.1), (0, 0.2), (1, 0.1)])
    assert twice[(1, 0.1)] == pytest.approx(once[(1, 0.1)], rel=1e-6) and once[(1, 0.1)] > 0
    assert propagated_kl(model, data, cfg, []) == {}


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"scales": [], "kls": []}, ValueError, r"scales=\[\]"),
    ({"kls": [1.0]}, ValueError, r"kls=\[1\.0\].*2 values"),
    ({"scales": [0.0, 0.1]}, ValueError, r"scales=\[0\.0, 0\.1\]"),
    ({"scales": [-0.1, 0.1]}, ValueError, r"scales="),
    ({"scales": ["0.1", 0.2]}, TypeError, r"scales="),
    ({"kls": [NAN, 1.0]}, ValueError, r"kls=\[nan, 1\.0\]"),
    ({"kls": [0.1, INF]}, ValueError, r"kls="),
    ({"target": NAN}, ValueError, r"target=nan"),
    ({"target": -1.0}, ValueError, r"target=-1\.0"),
    ({"target": "1"}, TypeError, r"target='1'"),
], ids=["empty", "length", "zero-scale", "negative-scale", "str-scale", "nan-kl", "inf-kl", "nan-target",
        "negative-target", "str-target"])
def test_scale_for_target_rejects(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        scale_for_target(**{"scales": [0.1, 0.2], "kls": [0.5, 2.0], "target": 1.0, **kwargs})


@pytest.mark.parametrize("scales, kls, target, expected", [
    ([0.3], [1.0], 5.0, 0.3),
    ([0.2, 0.1], [2.0, 0.5], 0.0, 0.1),
    ([0.1, 0.2], [0.5, 2.0], 9.0, 0.2),
    ([0.2, 0.1], [2.0, 0.5], 1.0, math.exp(math.log(0.1) + 0.5 * math.log(2.0))),
    ([0.1, 0.2], [-1e-9, 1e-3], 1e-4, math.exp(math.log(0.1) + math.log(1e-4 / 1e-30) / math.log(1e-3 / 1e-30)
                                               * math.log(2.0))),
], ids=["one-scale", "zero-target", "above-all", "unsorted-middle", "rounding-negative-kl"])
def test_scale_for_target_valid_edges(scales, kls, target, expected):
    assert scale_for_target(scales, kls, target) == pytest.approx(expected, rel=1e-12)


# ------------------------------------------------------------------------------------------------------- loss
@pytest.mark.parametrize("fn", [shifted_completion_mask, statistics_mask], ids=["shifted", "statistics"])
@pytest.mark.parametrize("labels, exc, match", [
    ([[1, 2]], TypeError, r"labels=.*tensor"),
    (torch.tensor([1, 2, 3]), ValueError, r"labels=.*\(B, T\)"),
    (torch.ones(2, 3), TypeError, r"labels=.*integer"),
], ids=["list", "1d", "float"])
def test_label_masks_reject(fn, labels, exc, match):
    with pytest.raises(exc, match=match):
        fn(labels)


def test_label_masks_valid_edges():
    one = torch.tensor([[5], [-100]])
    assert shifted_completion_mask(one).shape == (2, 0)
    assert torch.equal(statistics_mask(one), torch.zeros(2, 1, dtype=torch.bool))
    assert shifted_completion_mask(torch.zeros(0, 4, dtype=torch.long)).shape == (0, 3)


def _kl_args(**changes) -> dict:
    g = torch.Generator().manual_seed(0)
    args = {"p_logits": torch.randn(2, 3, 5, generator=g), "q_logits": torch.randn(2, 3, 5, generator=g),
            "mask": torch.tensor([[True, False, True], [False, True, True]]), "temperature": 1.0, "num_items": None}
    args.update(changes)
    return args


@pytest.mark.parametrize("changes, exc, match", [
    ({"q_logits": torch.randn(2, 3, 6)}, ValueError, r"q_logits=.*\(2, 3, 5\)"),
    ({"mask": torch.ones(2, 4, dtype=torch.bool)}, ValueError, r"mask=.*\(2, 3\)"),
    ({"mask": torch.ones(2, 3, dtype=torch.long)}, TypeError, r"mask=.*bool"),
    ({"temperature": 0.0}, ValueError, r"temperature=0\.0"),
    ({"temperature": NAN}, ValueError, r"temperature=nan"),
    ({"temperature": "1"}, TypeError, r"temperature='1'"),
    ({"num_items": 0}, ValueError, r"num_items=0"),
    ({"num_items": -3.0}, ValueError, r"num_items=-3\.0"),
    ({"num_items": torch.tensor(0)}, ValueError, r"num_items="),
    ({"num_items": torch.ones(2)}, ValueError, r"num_items="),
    ({"p_logits": with_value(torch.randn(2, 3, 5), NAN), "mask": None}, ValueError, r"p_logits=.*finite"),
    ({"q_logits": with_value(torch.randn(2, 3, 5), INF), "mask": None}, ValueError, r"q_logits=.*finite"),
    ({"mask": torch.zeros(2, 3, dtype=torch.bool)}, ValueError, r"mask=.*no position.*num_items"),
    ({"p_logits": torch.ones(2, 3, 0), "q_logits": torch.ones(2, 3, 0)}, ValueError, r"p_logits=.*V >= 1"),
    ({"p_logits": [[0.0, 1.0]]}, TypeError, r"p_logits=.*tensor"),
], ids=["shape", "mask-shape", "mask-long", "temperature-zero", "temperature-nan", "temperature-str", "count-zero",
        "count-negative", "count-tensor-zero", "count-two-items", "nan-logit", "inf-logit", "empty-selection",
        "no-vocab", "list"])
def test_masked_kl_rejects(changes, exc, match):
    with pytest.raises(exc, match=match):
        masked_kl(**_kl_args(**changes))


def test_masked_kl_valid_edges_match_the_reference():
    args = _kl_args()
    assert float(masked_kl(**_kl_args(mask=torch.zeros(2, 3, dtype=torch.bool), num_items=4))) == 0.0
    for mask, t, n in ((args["mask"], 0.5, None), (None, 1.0, 7), (args["mask"], 2.0, torch.tensor(3))):
        full = torch.ones(2, 3, dtype=torch.bool) if mask is None else mask
        expected = masked_kl_reference(args["p_logits"], args["q_logits"], full, t, None if n is None else float(n))
        got = masked_kl(args["p_logits"], args["q_logits"], mask, temperature=t, num_items=n)
        assert float(got) == pytest.approx(float(expected), rel=1e-5)
    with_nan = with_value(args["p_logits"], NAN)  # position (1, 0), which the mask leaves out
    assert math.isfinite(float(masked_kl(with_nan, args["q_logits"], args["mask"])))
    one = masked_kl(args["p_logits"][0, 0], args["q_logits"][0, 0])  # a single (V,) pair
    assert float(one) == pytest.approx(float(masked_kl_reference(args["p_logits"][0, 0][None],
                                                                  args["q_logits"][0, 0][None],
                                                                  torch.ones(1, dtype=torch.bool), 1.0, None)))


def _loss(name: str, model: nn.Module, batch: dict, **kwargs):
    if name == "noisefit":
        return noisefit_loss(model, batch, kwargs.pop("injector", None),
                             kwargs.pop("config", NoiseFiTConfig(layers=[0], alpha=1.0)), **kwargs)
    return rdrop_loss(model, batch, kwargs.pop("alpha", 1.0), **kwargs)


def _bad_batch(kind: str):
    batch = make_batch()
    if kind == "label-shape":
        batch["labels"] = batch["labels"][:, :-2]
    elif kind == "zero-rows":
        batch = {k: v[:0] for k, v in batch.items()}
    elif kind == "float-labels":
        batch["labels"] = batch["labels"].float()
    elif kind == "1d-labels":
        batch["labels"] = batch["labels"][0]
    elif kind == "no-labels":
        del batch["labels"]
    elif kind == "mask-shape":
        batch["attention_mask"] = batch["attention_mask"][:2]
    elif kind == "not-a-dict":
        batch = list(batch.values())
    return batch


@pytest.mark.parametrize("name", ["noisefit", "rdrop"])
@pytest.mark.parametrize("kind, exc, match", [
    ("label-shape", ValueError, r"labels=.*\(3, 10\).*input_ids.*\(3, 12\)"),
    ("zero-rows", ValueError, r"labels=.*empty batch"),
    ("float-labels", TypeError, r"labels=.*integer"),
    ("1d-labels", ValueError, r"labels=.*\(B, T\)"),
    ("no-labels", ValueError, r"labels="),
    ("mask-shape", ValueError, r"attention_mask=.*\(2, 12\)"),
    ("not-a-dict", TypeError, r"batch='list'"),
], ids=["label-shape", "zero-rows", "float-labels", "1d-labels", "no-labels", "mask-shape", "not-a-dict"])
def test_losses_reject_bad_batches(name, kind, exc, match):
    with pytest.raises(exc, match=match):
        _loss(name, llama(), _bad_batch(kind))


@pytest.mark.parametrize("name", ["noisefit", "rdrop"])
@pytest.mark.parametrize("value, exc, match", [
    (0, ValueError, r"num_items_in_batch=0"),
    (-4, ValueError, r"num_items_in_batch=-4"),
    (NAN, ValueError, r"num_items_in_batch=nan"),
    (torch.tensor(0), ValueError, r"num_items_in_batch="),
    ("9", TypeError, r"num_items_in_batch='9'"),
    (True, TypeError, r"num_items_in_batch=True"),
], ids=["zero", "negative", "nan", "tensor-zero", "str", "bool"])
def test_losses_reject_bad_token_counts(name, value, exc, match):
    with pytest.raises(exc, match=match):
        _loss(name, llama(), make_batch(), num_items_in_batch=value)


@pytest.mark.parametrize("name", ["noisefit", "rdrop"])
def test_losses_reject_logits_that_do_not_match_the_labels(name):
    with pytest.raises(ValueError, match=r"logits=.*\(\d+, 11, 50\).*labels.*\(3, 12\)"):
        _loss(name, EmbeddingLM(shift=1), make_batch())


@pytest.mark.parametrize("call, exc, match", [
    (lambda m, b: noisefit_loss(m, b, None, {"alpha": 1.0}), TypeError, r"config='dict'"),
    (lambda m, b: rdrop_loss(m, b, "1"), TypeError, r"alpha='1'"),
    (lambda m, b: rdrop_loss(m, b, INF), ValueError, r"alpha=inf"),
    (lambda m, b: rdrop_loss(m, b, True), TypeError, r"alpha=True"),
    (lambda m, b: rdrop_loss(m, b, NAN), ValueError, r"alpha=nan"),
], ids=["noisefit-config", "rdrop-alpha-str", "rdrop-alpha-inf", "rdrop-alpha-bool", "rdrop-alpha-nan"])
def test_loss_scalars_reject(call, exc, match):
    with pytest.raises(exc, match=match):
        call(llama(), make_batch())


def test_losses_with_one_completion_token_match_the_reference():
    model, batch = llama(), make_batch()
    batch["labels"][:] = -100
    batch["labels"][1, 7] = 9  # the batch's only completion token
    model.train()
    plain = noisefit_loss(model, batch, None, NoiseFiTConfig(layers=[0], alpha=1.0))
    assert plain.loss.item() == pytest.approx(ce_reference(plain.logits_clean, batch["labels"], None), rel=1e-5)
    with NoiseInjector(model, NoiseFiTConfig(layers=[0])) as injector:
        out = noisefit_loss(model, batch, injector, NoiseFiTConfig(layers=[0], n_noisy=2, lam=0.1),
                            num_items_in_batch=torch.tensor(4))
    assert all(math.isfinite(v.item()) for v in (out.loss, out.ce, out.soft, out.consistency))
    assert out.ce.item() == pytest.approx(ce_reference(out.logits_clean, batch["labels"], 4.0), rel=1e-5)
    rdrop = rdrop_loss(model, batch, 0.0, num_items_in_batch=2)
    assert rdrop.loss.item() == pytest.approx(ce_reference(rdrop.logits, batch["labels"], 2.0), rel=1e-5)


# ---------------------------------------------------------------------------------------------------- trainer
@pytest.mark.parametrize("cls, kwargs, exc, match", [
    (RDropTrainer, {"rdrop_alpha": INF}, ValueError, r"rdrop_alpha=inf"),
    (RDropTrainer, {"rdrop_alpha": "1"}, TypeError, r"rdrop_alpha='1'"),
    (NoiseFiTTrainer, {"calibration_batches": {"input_ids": torch.ones(1, 2)}}, TypeError,
     r"calibration_batches=.*\[batch\]"),
    (NoiseFiTTrainer, {"calibration_batches": 3}, TypeError, r"calibration_batches=3"),
], ids=["rdrop-alpha-inf", "rdrop-alpha-str", "calibration-one-dict", "calibration-int"])
def test_trainers_reject_bad_arguments(tmp_path, cls, kwargs, exc, match):
    from tests.noisefit.test_trainer import _args, _collate, _features, _model

    with pytest.raises(exc, match=match):
        cls(model=_model(), args=_args(tmp_path), train_dataset=_features(8), data_collator=_collate, **kwargs)


def test_callback_needs_a_noisefit_trainer():
    with pytest.raises(TypeError, match=r"trainer='object'.*NoiseFiTTrainer"):
        NoiseFiTCallback(object())


# ------------------------------------------------------------------------------------------------- properties
SPECIAL = st.sampled_from([None, None, NAN, INF, -INF])
BAD_NUMBERS = st.sampled_from([0.0, -1.0, NAN, INF, -INF, "1"])


@st.composite
def hidden_and_mask(draw, min_d: int = 2):
    rows, seq, d = draw(st.integers(0, 2)), draw(st.integers(1, 3)), draw(st.integers(min_d, 6))
    # half-integers: token variances are 0 or well away from it, so float32 and float64 agree to 1e-4
    values = draw(st.lists(st.integers(-8, 8), min_size=rows * seq * d, max_size=rows * seq * d))
    h = torch.tensor(values, dtype=torch.float32).reshape(rows, seq, d) / 2
    special, where = draw(SPECIAL), draw(st.integers(0, 10**6))
    if special is not None and h.numel():
        h.view(-1)[where % h.numel()] = special
    mask = draw(st.none() | st.lists(st.booleans(), min_size=rows * seq, max_size=rows * seq))
    return h, None if mask is None else torch.tensor(mask, dtype=torch.bool).reshape(rows, seq)


@settings(max_examples=40, deadline=None)
@given(data=hidden_and_mask(), scale=st.floats(0, 2) | BAD_NUMBERS, adaptive=st.booleans())
def test_token_noise_std_is_an_error_or_the_reference(data, scale, adaptive):
    h, mask = data
    valid_scale = isinstance(scale, float) and math.isfinite(scale) and scale >= 0
    if not (valid_scale and bool(torch.isfinite(h).all())):
        with pytest.raises(BAD):
            token_noise_std(h, mask, scale=scale, token_adaptive=adaptive)
        return
    got = token_noise_std(h, mask, scale=scale, token_adaptive=adaptive)
    assert got.shape == (*h.shape[:2], h.shape[2] if adaptive else 1) and bool(torch.isfinite(got).all())
    if h.numel() == 0:
        return
    ref_mask = mask if mask is not None and bool(mask.any()) else None  # no valid token = all of them
    keep = torch.ones(h.shape[:2], dtype=torch.bool) if ref_mask is None else ref_mask
    winsorized = [winsorized_reference(x) for x in h[keep].double()]
    assume(not adaptive or sum(float(w.var(correction=0)) for w in winsorized) > 0)  # the reference divides by it
    expected = token_std_reference(h, ref_mask, scale, adaptive)
    # a token whose winsorised channels are all 0 has std 0; the reference's MAD floor (1e-6 * RMS) is 0 there
    # and it computes 0/0
    zero = torch.tensor([[not winsorized_reference(x).any() for x in row] for row in h.double()])
    expected = torch.where(zero[..., None], 0.0, expected)
    torch.testing.assert_close(got.double().expand(h.shape), expected, rtol=1e-4,
                               atol=1e-6 * (1 + float(expected.abs().max())))


@settings(max_examples=40, deadline=None)
@given(data=hidden_and_mask(), base=st.floats(0, 2) | BAD_NUMBERS)
def test_paper_v1_noise_std_is_an_error_or_the_reference(data, base):
    h, _ = data
    if not (isinstance(base, float) and math.isfinite(base) and base >= 0 and bool(torch.isfinite(h).all())):
        with pytest.raises(BAD):
            paper_v1_noise_std(h, base)
        return
    got = paper_v1_noise_std(h, base)
    assert got.shape == h.shape and bool(torch.isfinite(got).all())
    if h.numel():
        expected = v1_std_reference(h, base)
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-6 * (1 + float(expected.abs().max())))


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(0, 3), seq=st.integers(0, 3), vocab=st.integers(1, 5), seed=st.integers(0, 2**16),
       use_mask=st.booleans(), special=SPECIAL, where=st.integers(0, 10**6),
       temperature=st.floats(0.2, 20) | BAD_NUMBERS,
       num_items=st.none() | st.integers(1, 9) | st.sampled_from([0, -2, NAN, INF, torch.tensor(3)]))
def test_masked_kl_is_an_error_or_the_reference(rows, seq, vocab, seed, use_mask, special, where, temperature,
                                                num_items):
    g = torch.Generator().manual_seed(seed)
    p, q = 5 * torch.randn(rows, seq, vocab, generator=g), 5 * torch.randn(rows, seq, vocab, generator=g)
    if special is not None and p.numel():
        (p if where % 2 else q).view(-1)[where % p.numel()] = special
    mask = torch.rand(rows, seq, generator=g) < 0.6 if use_mask else None
    full = torch.ones(rows, seq, dtype=torch.bool) if mask is None else mask
    count = None if num_items is None else float(num_items)
    selected_finite = bool(torch.isfinite(p[full]).all() and torch.isfinite(q[full]).all())
    valid = (isinstance(temperature, float) and math.isfinite(temperature) and temperature > 0 and selected_finite
             and (count is None or (math.isfinite(count) and count > 0)) and (count is not None or bool(full.any())))
    if not valid:
        with pytest.raises(BAD):
            masked_kl(p, q, mask, temperature=temperature, num_items=num_items)
        return
    got = float(masked_kl(p, q, mask, temperature=temperature, num_items=num_items))
    expected = float(masked_kl_reference(p, q, full, temperature, count))
    assert math.isfinite(got) and got == pytest.approx(expected, rel=1e-4, abs=1e-5)


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(["noisefit", "rdrop"]), rows=st.integers(0, 3), seq=st.integers(0, 5),
       seed=st.integers(0, 2**16), p_ignore=st.sampled_from([0.0, 0.5, 1.0]),
       num_items=st.none() | st.integers(1, 20) | st.sampled_from([0, -1, NAN, torch.tensor(5)]),
       alpha=st.floats(0, 3) | BAD_NUMBERS)
def test_losses_are_an_error_or_the_reference(name, rows, seq, seed, p_ignore, num_items, alpha):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, seq), generator=g)
    labels = torch.where(torch.rand(rows, seq, generator=g) < p_ignore, -100, ids)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    model = EmbeddingLM()
    count = None if num_items is None else float(num_items)
    valid = (bool((labels[:, 1:] != -100).any()) and (count is None or (math.isfinite(count) and count > 0))
             and (name == "noisefit" or (isinstance(alpha, float) and math.isfinite(alpha) and alpha >= 0)))
    call = (lambda: noisefit_loss(model, batch, None, NoiseFiTConfig(layers=[0], alpha=1.0), num_items)) \
        if name == "noisefit" else (lambda: rdrop_loss(model, batch, alpha, num_items))
    if not valid:
        with pytest.raises(BAD):
            call()
        return
    loss = call().loss.item()
    logits = model(ids).logits
    assert math.isfinite(loss) and loss == pytest.approx(ce_reference(logits, labels, count), rel=1e-5)  # KL = 0


def test_ce_reference_agrees_with_torch():
    logits, labels = torch.randn(1, 4, 6), torch.tensor([[-100, 2, -100, 5]])
    expected = F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100).item()
    assert ce_reference(logits, labels, None) == pytest.approx(expected, rel=1e-6)
