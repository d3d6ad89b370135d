"""Tiny Llama trunks: parameter counts from the config sizes, seeded initialisation, input validation."""

from __future__ import annotations

import pytest
import torch

from leanfit.core.errors import ConfigError
from leanfit.studies.models import tiny_llama


def _llama_param_count(vocab: int, d: int, layers: int, ffn: int, tied: bool) -> int:
    """Hand count: embeddings, per layer q/k/v/o (d x d, no bias) + SwiGLU gate/up/down (d x ffn) + 2 RMSNorms,
    final RMSNorm, and an lm_head unless tied to the embeddings."""
    per_layer = 4 * d * d + 3 * d * ffn + 2 * d
    return vocab * d + layers * per_layer + d + (0 if tied else vocab * d)


@pytest.mark.parametrize(
    ("kwargs", "ffn", "expected"),
    [
        (dict(d_model=32, n_layers=1, n_heads=4), 96, 19_808),
        (dict(d_model=32, n_layers=1, n_heads=4, tie_embeddings=True), 96, 16_608),
        (dict(d_model=64, n_layers=3, n_heads=2, ffn_mult=4.0), 256, 209_856),
        (dict(d_model=8, n_layers=2, n_heads=2, ffn_mult=1.0), 32, 3_688),  # rounds to 0, floored at 32
    ],
    ids=["d32-L1", "d32-L1-tied", "d64-L3-ffn4", "d8-min-ffn"],
)
def test_parameter_count_matches_hand_count(kwargs, ffn, expected):
    model = tiny_llama(100, seed=0, **kwargs)
    cfg = model.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (
        100, kwargs["d_model"], ffn, kwargs["n_layers"],
    )
    assert _llama_param_count(100, kwargs["d_model"], kwargs["n_layers"], ffn, cfg.tie_word_embeddings) == expected
    assert sum(p.numel() for p in model.parameters()) == expected


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _small(seed):
    return tiny_llama(100, d_model=32, n_layers=1, n_heads=4, seed=seed)


def test_same_seed_gives_bitwise_identical_weights():
    a, b = _weights(_small(7)), _weights(_small(7))
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_different_seeds_give_different_weights():
    a, b = _weights(_small(7)), _weights(_small(8))
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    # every randomly initialised matrix differs; RMSNorm weights start at 1 for every seed
    assert sorted(differing) == sorted(k for k in a if not k.endswith("norm.weight"))
    assert (a["model.embed_tokens.weight"] - b["model.embed_tokens.weight"]).abs().max() > 0.01


def test_seeded_build_leaves_global_rng_untouched():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    _small(5)
    assert torch.equal(torch.rand(4), expected)


def test_forward_shapes_and_config_ids():
    model = _small(0).eval()
    logits = model(torch.arange(12).reshape(2, 6)).logits
    assert logits.shape == (2, 6, 100)
    assert bool(torch.isfinite(logits).all())
    cfg = model.config
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id, cfg.num_key_value_heads) == (0, 0, 1, 4)


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        (dict(vocab_size=100, d_model=30, n_heads=4), "d_model=30"),
        (dict(vocab_size=0), "vocab_size=0"),
        (dict(vocab_size=100, n_layers=0), "n_layers=0"),
        (dict(vocab_size=100, max_seq_len=-1), "max_seq_len=-1"),
        (dict(vocab_size=100, n_heads=0), "n_heads=0"),
    ],
    ids=["d_model-not-multiple", "vocab-zero", "layers-zero", "seq-negative", "heads-zero"],
)
def test_invalid_sizes_raise_config_error_naming_parameter(kwargs, param):
    with pytest.raises(ConfigError, match=f"^{param} is invalid: expected "):
        tiny_llama(**kwargs)


def test_unseeded_builds_draw_fresh_weights():
    a = tiny_llama(100, d_model=32, n_layers=1, n_heads=4)
    b = tiny_llama(100, d_model=32, n_layers=1, n_heads=4)
    assert not torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight)
