"""Layer calibration: the paper's SNR against a naive reimplementation, leanfit's propagated KL and its scale rule,
and the layer-spec parsing it is driven by."""

from __future__ import annotations

import json
import math

import pytest
import torch

from leanfit.core.errors import ConfigError
from leanfit.noisefit.calibration import calibrate, propagated_kl, scale_for_target
from leanfit.noisefit.config import LayerSpec, NoiseFiTConfig
from leanfit.noisefit.injector import find_decoder_layers
from leanfit.noisefit.loss import statistics_mask
from tests.noisefit.test_injector import gpt2, llama, make_batch, n_hooks
from tests.reference import snr_reference


def batches(n: int = 2) -> list[dict[str, torch.Tensor]]:
    return [make_batch(rows=3, seq=12, seed=s) for s in range(n)]


# ------------------------------------------------------------------------------------------------ layer spec
@pytest.mark.parametrize("value, spec", [
    ("auto", LayerSpec("auto")),
    ("auto:2", LayerSpec("auto", 2)),
    ("snr_high:3", LayerSpec("snr_high", 3)),
    ("SNR_LOW:1", LayerSpec("snr_low", 1)),
    ("5, 2", LayerSpec("explicit", 2, (2, 5))),
    ("0", LayerSpec("explicit", 1, (0,))),
    ([3, 1], LayerSpec("explicit", 2, (1, 3))),
], ids=["auto", "auto-k", "snr-high", "snr-low-upper", "indices", "one-index", "list"])
def test_layer_spec_parsing(value, spec):
    assert NoiseFiTConfig(layers=value).layer_spec() == spec


@pytest.mark.parametrize("value", ["snr_high", "snr_mid:2", "snr_high:0", "1,,2", "1,1", "top", [], [1, -1]],
                         ids=["no-k", "bad-kind", "zero-k", "empty-item", "repeat", "word", "empty-list",
                              "negative"])
def test_bad_layer_spec_names_layers(value):
    with pytest.raises(ConfigError, match=r"layers="):
        NoiseFiTConfig(layers=value)


def test_layer_spec_keep_counts():
    assert [LayerSpec("auto").n_keep(n) for n in (1, 3, 4, 5, 16, 17)] == [1, 2, 2, 3, 4, 5]
    assert NoiseFiTConfig(paper_v1=True).layer_spec() == LayerSpec("snr_high", 3)
    assert NoiseFiTConfig(layers="auto:9").layer_spec().n_keep(4) == 4


# ------------------------------------------------------------------------------------------------------ SNR
@pytest.mark.parametrize("v1", [False, True], ids=["leanfit", "paper-v1"])
def test_snr_matches_naive_reimplementation(v1):
    model, data = llama(n_layers=3, d_model=64), batches(2)
    cfg = NoiseFiTConfig(layers="snr_high:1", rel_noise=0.1, paper_v1=v1)
    result = calibrate(model, data, cfg)
    reference = snr_reference(model, data[:1] if v1 else data, cfg)
    assert result.method == "snr" and result.details["n_batches"] == (1 if v1 else 2)
    for got, ref in zip(result.scores, reference, strict=True):
        assert got == pytest.approx(ref, rel=0.02)
    # the last block's output is not output_hidden_states[-1] (that one is after the final norm)
    with torch.no_grad():
        hidden = model(input_ids=data[0]["input_ids"], output_hidden_states=True).hidden_states[-1]
    last = []
    hook = find_decoder_layers(model)[-1].register_forward_hook(lambda m, a, o: last.append(o))
    with torch.no_grad():
        model(input_ids=data[0]["input_ids"])
    hook.remove()
    assert (hidden - last[0]).abs().max() > 0.1 * last[0].abs().max()


@pytest.mark.parametrize("spec, descending", [("snr_high:2", True), ("snr_low:2", False)], ids=["high", "low"])
def test_snr_high_and_low_keep_the_extremes(spec, descending):
    model = llama(n_layers=4)
    result = calibrate(model, batches(1), NoiseFiTConfig(layers=spec, rel_noise=0.05))
    order = sorted(range(4), key=lambda i: result.scores[i], reverse=descending)
    assert result.layers == sorted(order[:2])
    assert result.scales == {i: 0.05 for i in result.layers}
    assert len(set(result.scores)) == 4  # distinct scores: the choice is not a tie-break


# -------------------------------------------------------------------------------------------- propagated KL
def massive_activation_gpt2(n_layers: int = 3, offset: float = 300.0) -> torch.nn.Module:
    """GPT-2 whose block 1 adds a constant vector of norm ``offset`` (the same value on every channel) and block 2
    removes it again: RMS-relative noise at block 1 is then larger than the rest of the residual stream (~200x for
    300), and only there. (A few huge channels would not do: the noise scale ignores them, see _winsorized.)"""
    model = gpt2(n_layers=n_layers)
    shift = offset / model.config.n_embd**0.5
    with torch.no_grad():
        model.transformer.h[1].mlp.c_proj.bias += shift
        model.transformer.h[2].mlp.c_proj.bias -= shift
    return model


def test_propagated_picks_the_layer_that_matters():
    model = massive_activation_gpt2()
    result = calibrate(model, batches(2), NoiseFiTConfig(layers="auto:1", rel_noise=0.05))
    assert result.method == "propagated" and result.layers == [1]
    others = [result.scores[0], result.scores[2]]
    assert result.scores[1] > 100 * max(others)
    assert result.scales == {1: pytest.approx(0.05)}  # one layer: its own KL is the target
    both = calibrate(model, batches(2), NoiseFiTConfig(layers="auto", rel_noise=0.05))  # k = ceil(sqrt(3)) = 2
    assert 1 in both.layers and len(both.layers) == 2
    other = next(i for i in both.layers if i != 1)
    assert both.scales[1] < 0.05 < both.scales[other]  # equal KL needs less noise where noise matters more


def test_calibrated_scales_reach_the_target_kl():
    model, data = massive_activation_gpt2(n_layers=4, offset=0.3), batches(2)  # block 1's KL ~4x the others
    cfg = NoiseFiTConfig(layers="auto:3", rel_noise=0.05, calib_scales=(0.005, 0.01, 0.02, 0.04, 0.08, 0.16))
    result = calibrate(model, data, cfg)
    ranked = sorted(range(4), key=lambda i: -result.scores[i])
    assert result.layers == sorted(ranked[:3]) and 1 in result.layers
    target = result.details["target_kl"]
    assert target == pytest.approx(sorted(result.scores[i] for i in result.layers)[1])  # median of the kept
    median_layer = min(result.layers, key=lambda i: abs(result.scores[i] - target))
    assert result.scales[median_layer] == pytest.approx(0.05, rel=1e-9)
    assert 0.01 < result.scales[1] < 0.035  # ~ 0.05 / sqrt(4): KL grows like scale^2
    model.eval()
    with torch.no_grad():
        measured = propagated_kl(model, data, cfg, [(i, result.scales[i]) for i in result.layers])
    for (layer, _), kl in measured.items():
        assert kl == pytest.approx(target, rel=0.02), layer


def test_propagated_kl_matches_a_direct_computation():
    """KL(clean, noisy) for layer 0 by hand: the same draw via the injector's seed, symmetric KL per token."""
    from leanfit.noisefit.injector import NoiseInjector

    model, data = llama(n_layers=2), batches(1)
    cfg = NoiseFiTConfig(layers=[0], rel_noise=0.1)
    model.eval()
    with torch.no_grad():
        got = propagated_kl(model, data, cfg, [(0, 0.1)])[(0, 0.1)]
        batch = data[0]
        clean = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
        with NoiseInjector(model, cfg) as injector:
            injector.reseed(cfg.seed)  # batch 0
            with injector.noisy(token_mask=statistics_mask(batch["labels"]), noise_mask=batch["attention_mask"],
                                force=True):
                noisy = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    mask = batch["labels"][:, 1:] != -100
    p, q = torch.log_softmax(clean[:, :-1][mask], -1), torch.log_softmax(noisy[:, :-1][mask], -1)
    ref = 0.5 * ((p.exp() * (p - q)).sum(-1) + (q.exp() * (q - p)).sum(-1)).mean()
    assert got == pytest.approx(float(ref), rel=1e-3)
    assert got > 0


def test_explicit_layers_get_calibrated_scales_only():
    model = llama(n_layers=4)
    result = calibrate(model, batches(1), NoiseFiTConfig(layers="1,3", rel_noise=0.05))
    assert result.layers == [1, 3] and set(result.scales) == {1, 3}
    assert result.scores[0] is None and result.scores[2] is None and result.scores[1] > 0


@pytest.mark.parametrize("scales, kls, target, expected", [
    ([0.1, 0.2, 0.4], [1.0, 4.0, 16.0], 4.0, 0.2),
    ([0.1, 0.2, 0.4], [1.0, 4.0, 16.0], 2.0, 0.2 / math.sqrt(2)),  # KL ~ s^2 is interpolated exactly in log-log
    ([0.4, 0.1, 0.2], [16.0, 1.0, 4.0], 8.0, 0.2 * math.sqrt(2)),  # unsorted grid
    ([0.1, 0.2, 0.4], [1.0, 4.0, 16.0], 0.5, 0.1),  # below the grid: smallest scale
    ([0.1, 0.2, 0.4], [1.0, 4.0, 16.0], 50.0, 0.4),  # above: largest
    ([0.1, 0.2, 0.4], [1.0, 3.0, 2.0], 2.0, 0.1 * 2 ** (math.log(2) / math.log(3))),  # first bracketing pair
], ids=["grid-point", "interpolated", "unsorted", "below", "above", "non-monotone"])
def test_scale_for_target_rule(scales, kls, target, expected):
    assert scale_for_target(scales, kls, target) == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------------------------------------- house-keeping
def test_calibration_restores_modes_and_leaves_no_trace():
    model = llama(n_layers=3)
    model.train()
    model.model.layers[1].eval()  # a mixed state must come back as it was
    modes = [m.training for m in model.modules()]
    hooks = n_hooks(model)
    calibrate(model, batches(1), NoiseFiTConfig(layers="auto"))
    calibrate(model, batches(1), NoiseFiTConfig(layers="snr_low:1"))
    assert [m.training for m in model.modules()] == modes
    assert n_hooks(model) == hooks and all(p.grad is None for p in model.parameters())


def test_calibration_is_deterministic_and_records_plain_values():
    model = llama(n_layers=3)
    first = calibrate(model, batches(2), NoiseFiTConfig(layers="auto"))
    second = calibrate(model, batches(2), NoiseFiTConfig(layers="auto"))
    assert first.to_dict() == second.to_dict()
    record = json.loads(json.dumps(first.to_dict()))
    assert record["layers"] == first.layers and record["method"] == "propagated"
    assert {int(k): v for k, v in record["scales"].items()} == first.scales
    assert record["details"]["target_kl"] == first.details["target_kl"]


def test_calib_batches_limits_the_batches_used():
    model, data = llama(n_layers=2), batches(3)
    result = calibrate(model, data, NoiseFiTConfig(layers="snr_high:1", calib_batches=2))
    assert result.details["n_batches"] == 2
    assert result.scores == calibrate(model, data[:2], NoiseFiTConfig(layers="snr_high:1")).scores


def _no_completion() -> list[dict]:
    batch = make_batch()
    batch["labels"][:] = -100
    return [batch]


@pytest.mark.parametrize("data, match", [
    ([], r"batches='an empty list'"),
    (_no_completion(), r"batches='batch 0 with no completion token'"),
    ([torch.zeros(2, 3)], r"batches='item 0 of type Tensor'"),
], ids=["empty", "no-completion", "not-a-dict"])
def test_bad_batches_raise(data, match):
    with pytest.raises(ConfigError, match=match):
        calibrate(llama(), data, NoiseFiTConfig())


def test_explicit_layer_beyond_the_model_raises():
    with pytest.raises(ConfigError, match=r"layers='7'.*\[0, 2\)"):
        calibrate(llama(), batches(1), NoiseFiTConfig(layers="7"))
