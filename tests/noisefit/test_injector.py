"""NoiseInjector: where and when noise is added, how large it is, and that it leaves no trace when off."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from leanfit.core.errors import ConfigError
from leanfit.noisefit.config import NoiseFiTConfig
from leanfit.noisefit.injector import (
    NoiseInjector,
    find_decoder_layers,
    paper_v1_noise_std,
    stream_seed,
    token_noise_std,
)
from leanfit.noisefit.loss import statistics_mask
from leanfit.studies.models.tiny_llama import tiny_llama
from tests.reference import token_std_reference, v1_std_reference

VOCAB = 50


# ------------------------------------------------------------------------------------------------ shared helpers
def llama(n_layers: int = 2, d_model: int = 32, seed: int = 0) -> nn.Module:
    return tiny_llama(VOCAB, d_model=d_model, n_layers=n_layers, n_heads=2, seed=seed)


def gpt2(n_layers: int = 2, dropout: float = 0.0, seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=n_layers, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64, bos_token_id=0,
                     eos_token_id=0, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(cfg)


def qwen2(n_layers: int = 2, seed: int = 0) -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen2ForCausalLM(cfg)


def make_batch(rows: int = 3, seq: int = 12, prompt: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded batch: row 0 has 3 pad tokens; labels are -100 on the prompt and the padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (rows, seq), generator=g)
    attention = torch.ones_like(ids)
    attention[0, seq - 3 :] = 0
    ids[attention == 0] = 1
    labels = ids.clone()
    labels[:, :prompt] = -100
    labels[attention == 0] = -100
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def logits_of(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def n_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def capture(block: nn.Module, store: list) -> torch.utils.hooks.RemovableHandle:
    """Record the block's output (first item of a tuple) as seen at this point of the hook chain."""
    return block.register_forward_hook(lambda m, a, o: store.append((o[0] if isinstance(o, tuple) else o).detach()))


MODELS = {"llama": llama, "gpt2": gpt2, "qwen2": qwen2}


# ------------------------------------------------------------------------------------------ naive references
# ---------------------------------------------------------------------------------------- finding the blocks
@pytest.mark.parametrize("name, path", [("llama", "model.layers"), ("gpt2", "transformer.h"),
                                        ("qwen2", "model.layers")], ids=["llama", "gpt2", "qwen2"])
def test_find_decoder_layers_returns_the_block_list(name, path):
    model = MODELS[name]()
    expected = model.get_submodule(path)
    found = find_decoder_layers(model)
    assert found is expected and len(found) == model.config.num_hidden_layers == 2


def test_find_decoder_layers_unwraps_peft_lora():
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    base = llama()
    expected = base.model.layers
    wrapped = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    found = find_decoder_layers(wrapped)
    assert found is expected
    assert sum(isinstance(m, LoraLayer) for m in found.modules()) == 2 * 2  # the blocks hold the adapters


def test_find_decoder_layers_rejects_a_model_without_blocks():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(ConfigError, match=r"model='Sequential'.*searched ModuleLists named layers, h"):
        find_decoder_layers(model)


# ------------------------------------------------------------------------------------------ when noise is on
@pytest.mark.parametrize("name", sorted(MODELS))
def test_no_noise_in_eval_mode_and_after_remove(name):
    model, batch = MODELS[name](), make_batch()
    hooks_before = n_hooks(model)
    model.eval()
    bare_eval = logits_of(model, batch)
    model.train()
    bare_train = logits_of(model, batch)
    injector = NoiseInjector(model, NoiseFiTConfig(layers="0,1", rel_noise=0.1))
    model.eval()
    with injector.noisy():
        assert torch.equal(logits_of(model, batch), bare_eval)
    model.train()
    with injector.noisy():
        noisy = logits_of(model, batch)
    assert (noisy - bare_train).abs().max() > 1e-3
    injector.remove()
    assert n_hooks(model) == hooks_before
    assert torch.equal(logits_of(model, batch), bare_train)
    with pytest.raises(RuntimeError, match="removed"), injector.noisy():
        pass


def test_noise_only_inside_noisy_block():
    model, batch = llama(), make_batch()
    model.train()
    bare = logits_of(model, batch)
    with NoiseInjector(model, NoiseFiTConfig(layers=[1], rel_noise=0.1, token_adaptive=False)) as injector:
        assert torch.equal(logits_of(model, batch), bare) and not injector.active
        with injector.noisy():
            assert injector.active
            assert (logits_of(model, batch) - bare).abs().max() > 1e-3
            assert injector.last_stats[1] == pytest.approx(0.1, rel=0.1)
        assert torch.equal(logits_of(model, batch), bare) and not injector.active
    assert n_hooks(model) == 0


def test_force_adds_noise_in_eval_mode():
    """In eval mode ``force=True`` adds the training noise: noise / (reference std) is standard normal."""
    model, batch = llama(d_model=64), make_batch(rows=4, seq=16)
    model.eval()
    bare = logits_of(model, batch)
    block = find_decoder_layers(model)[0]
    clean, noisy = [], []
    capture(block, clean)
    config = NoiseFiTConfig(layers=[0], rel_noise=0.1)
    with NoiseInjector(model, config) as injector:
        capture(block, noisy)
        logits_of(model, batch)
        assert torch.equal(noisy[0], clean[0])  # eval mode without force: no noise
        with injector.noisy(force=True):
            noisy_logits = logits_of(model, batch)
    assert (noisy_logits - bare).abs().max() > 1e-3
    h = clean[1]
    z = (noisy[1] - h).double() / token_std_reference(h, None, 0.1, config.token_adaptive)
    assert float(z.pow(2).mean().sqrt()) == pytest.approx(1.0, abs=0.05)  # 4096 draws: SE of the RMS ~0.01
    assert float(z.mean()) == pytest.approx(0.0, abs=0.05)


# ------------------------------------------------------------------------------------------------ noise size
@pytest.mark.parametrize("adaptive", [False, True], ids=["isotropic", "token-adaptive"])
def test_measured_relative_noise_matches_config(adaptive):
    """Per valid token RMS(noise)/RMS(h) = rel_noise (isotropic) or rel_noise * f_t (adaptive, f_t the clipped
    variance ratio, whose mean over valid tokens is 1 when nothing is clipped)."""
    rel = 0.05
    model, batch = llama(n_layers=2, d_model=256), make_batch(rows=4, seq=16)
    model.train()
    block = find_decoder_layers(model)[1]
    clean, noisy = [], []
    capture(block, clean)
    injector = NoiseInjector(model, NoiseFiTConfig(layers=[1], rel_noise=rel, token_adaptive=adaptive))
    capture(block, noisy)
    token_mask, noise_mask = statistics_mask(batch["labels"]), batch["attention_mask"].bool()
    with injector.noisy(token_mask=token_mask, noise_mask=noise_mask):
        logits_of(model, batch)
    h, noise = clean[0].double(), (noisy[0] - clean[0]).double()
    ratio = (noise.pow(2).mean(-1).sqrt() / h.pow(2).mean(-1).sqrt())[token_mask]
    expected = token_std_reference(h, token_mask, rel, adaptive).pow(2).mean(-1).sqrt() / h.pow(2).mean(-1).sqrt()
    expected = expected[token_mask]
    if not adaptive:
        torch.testing.assert_close(expected, torch.full_like(expected, rel), rtol=1e-6, atol=0)
    assert float(ratio.mean() / expected.mean()) == pytest.approx(1.0, abs=0.1)
    assert float((ratio / expected).mean()) == pytest.approx(1.0, abs=0.1)
    assert float(expected.mean()) == pytest.approx(rel, rel=0.1)  # the clip at 5 is not reached here
    assert torch.equal(noise[~noise_mask], torch.zeros_like(noise[~noise_mask]))  # padding gets no noise
    measured = math.sqrt(float(noise.pow(2).sum(-1)[token_mask].sum() / h.pow(2).sum(-1)[token_mask].sum()))
    assert injector.last_stats[1] == pytest.approx(measured, rel=1e-5)


@pytest.mark.parametrize("adaptive", [False, True], ids=["isotropic", "token-adaptive"])
@pytest.mark.parametrize("masked", [False, True], ids=["all-tokens", "masked"])
def test_token_noise_std_matches_reference(adaptive, masked):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 5, 16, generator=g) * torch.rand(2, 5, 1, generator=g) * 3
    h[0, 2, 3] = 40.0  # an outlier channel gets a small weight
    mask = torch.rand(2, 5, generator=g) > 0.3 if masked else None
    got = token_noise_std(h, mask, scale=0.07, token_adaptive=adaptive).expand_as(h)
    ref = token_std_reference(h, mask, 0.07, adaptive)
    torch.testing.assert_close(got.double(), ref, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("adaptive", [False, True], ids=["isotropic", "token-adaptive"])
def test_massive_channels_do_not_inflate_the_noise_of_ordinary_channels(adaptive):
    """An attention-sink token (two channels ~1000x the rest, as SmolLM2's first token has) gets noise sized by
    its ordinary channels, not by the plain RMS that the two channels dominate."""
    g = torch.Generator().manual_seed(5)
    h = torch.randn(1, 4, 64, generator=g)
    h[0, 0, :2] = 1000.0
    std = token_noise_std(h, scale=0.05, token_adaptive=adaptive).expand_as(h)
    ordinary = std[0, 0, 2:].pow(2).mean().sqrt() / h[0, 0, 2:].pow(2).mean().sqrt()
    plain_rms_ratio = h[0, 0].pow(2).mean().sqrt() / h[0, 0, 2:].pow(2).mean().sqrt()
    assert plain_rms_ratio > 100  # what the plain RMS would have multiplied the noise by
    # ~ rel_noise, times the token factor when adaptive (<= max_factor = 5; here ~2.5: the clamped channels still
    # raise the token's variance); the plain RMS would have given ~1000x.
    assert 0.03 < float(ordinary) < (0.05 * 5 if adaptive else 0.08)


def test_padding_does_not_change_the_noise_of_valid_tokens():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(2, 6, 16, generator=g)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 3:] = False
    changed = h.clone()
    changed[~mask] = changed[~mask] * 50 + 7  # padding states with a wild scale
    std = token_noise_std(h, mask, scale=0.05)
    std_changed = token_noise_std(changed, mask, scale=0.05)
    torch.testing.assert_close(std_changed[mask], std[mask], rtol=1e-6, atol=0)
    unmasked = token_noise_std(changed, None, scale=0.05)  # without the mask the padding would leak in
    assert (unmasked[mask] / std[mask]).mean() < 0.1


# -------------------------------------------------------------------------------- block output conventions
class _Block(nn.Module):
    def __init__(self, d: int, as_tuple: bool) -> None:
        super().__init__()
        self.lin, self.as_tuple = nn.Linear(d, d), as_tuple

    def forward(self, h: torch.Tensor):  # noqa: ANN201
        out = h + torch.tanh(self.lin(h))
        return (out, {"extra": 1}) if self.as_tuple else out


class _Toy(nn.Module):
    """A decoder-like stack whose blocks return a tensor or a tuple (hidden, extra); ``checkpoint`` runs the whole
    stack as one checkpointed segment, so block 0's hook runs inside it and feeds block 1 there."""

    def __init__(self, d: int = 64, n: int = 2, as_tuple: bool = False, checkpoint: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.config = SimpleNamespace(num_hidden_layers=n)
        self.layers = nn.ModuleList(_Block(d, as_tuple) for _ in range(n))
        self.checkpoint = checkpoint

    def _stack(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            out = block(h)
            h = out[0] if isinstance(out, tuple) else out
        return h

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.checkpoint:
            return torch.utils.checkpoint.checkpoint(self._stack, h, use_reentrant=True)  # always recomputes fully
        return self._stack(h)


@pytest.mark.parametrize("as_tuple", [False, True], ids=["tensor", "tuple"])
def test_tensor_and_tuple_block_outputs(as_tuple):
    model = _Toy(d=128, as_tuple=as_tuple).train()
    x = torch.randn(3, 10, 128, generator=torch.Generator().manual_seed(0))
    outputs = []
    model.layers[0].register_forward_hook(lambda m, a, o: outputs.append(o))
    clean = model.layers[0](x)
    injector = NoiseInjector(model, NoiseFiTConfig(layers=[0], rel_noise=0.1, token_adaptive=False))
    with injector.noisy():
        noisy = model.layers[0](x)
    if as_tuple:
        assert isinstance(noisy, tuple) and noisy[1] is outputs[-1][1] and noisy[1] == {"extra": 1}
        clean, noisy = clean[0], noisy[0]
    ratio = (noisy - clean).pow(2).mean(-1).sqrt() / clean.pow(2).mean(-1).sqrt()
    ratio = ratio.detach()
    assert float(ratio.mean()) == pytest.approx(0.1, rel=0.05)
    assert injector.last_stats[0] == pytest.approx(float(ratio.pow(2).mean().sqrt()), rel=0.02)


# ------------------------------------------------------------------------------------------------ packed rows
@pytest.mark.parametrize("form", ["indices", "bool"])
def test_clean_rows_of_a_packed_noisy_forward_are_bitwise_clean(form):
    model, batch = llama(), make_batch()
    model.train()
    n = batch["input_ids"].shape[0]
    packed = {k: torch.cat([v] * 3) for k, v in batch.items()}
    clean_packed = logits_of(model, packed)
    rows = torch.arange(n, 3 * n) if form == "indices" else torch.arange(3 * n) >= n
    injector = NoiseInjector(model, NoiseFiTConfig(layers=[0, 1], rel_noise=0.1))
    with injector.noisy(rows=rows):
        noisy_packed = logits_of(model, packed)
    injector.remove()
    assert torch.equal(noisy_packed[:n], clean_packed[:n])
    torch.testing.assert_close(noisy_packed[:n], logits_of(model, batch), rtol=1e-5, atol=1e-6)
    assert (noisy_packed[n : 2 * n] - clean_packed[:n]).abs().max() > 1e-3
    assert (noisy_packed[n : 2 * n] - noisy_packed[2 * n :]).abs().max() > 1e-3  # independent draws per branch


def test_same_seed_same_noise_and_reseed():
    model, batch = llama(), make_batch()
    model.train()
    results = []
    for seed in (3, 3, 4):
        with NoiseInjector(model, NoiseFiTConfig(layers=[0], seed=seed)) as injector, injector.noisy():
            results.append(logits_of(model, batch))
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], results[2])
    with NoiseInjector(model, NoiseFiTConfig(layers=[0], seed=3)) as injector:
        with injector.noisy():
            logits_of(model, batch)
        injector.reseed()
        with injector.noisy():
            assert torch.equal(logits_of(model, batch), results[0])


def _noisy_block_output(model: nn.Module, batch: dict, **kwargs) -> torch.Tensor:
    """Block 0's output under a fresh injector on layer 0 (rel_noise 0.1, seed 3), noise on every position."""
    seen: list[torch.Tensor] = []
    with NoiseInjector(model, NoiseFiTConfig(layers=[0], rel_noise=0.1, seed=3), **kwargs) as injector:
        handle = capture(find_decoder_layers(model)[0], seen)
        with injector.noisy():
            logits_of(model, batch)
        handle.remove()
    return seen[0]


def _clean_block_output(model: nn.Module, batch: dict) -> torch.Tensor:
    clean: list[torch.Tensor] = []
    handle = capture(find_decoder_layers(model)[0], clean)
    logits_of(model, batch)
    handle.remove()
    return clean[0]


def _expected_block_output(model: nn.Module, batch: dict, seed: int) -> torch.Tensor:
    """Block 0's clean output plus a draw of a ``torch.Generator`` seeded with ``seed`` times leanfit's std."""
    h = _clean_block_output(model, batch)
    draw = torch.randn(h.shape, generator=torch.Generator().manual_seed(seed))
    return h + draw * token_noise_std(h, scale=0.1)


def test_rank_0_draws_exactly_the_single_process_noise_and_rank_1_another_stream():
    """Single process (no process group): the generator is seeded with config.seed itself, as before ranks were
    mixed in (bitwise); rank 1 draws from seed + 1_000_003, so two processes given the same input differ."""
    model, batch = llama(), make_batch()
    model.train()
    with torch.no_grad():
        single, rank0, rank1 = (_noisy_block_output(model, batch, **kw) for kw in ({}, {"rank": 0}, {"rank": 1}))
        assert torch.equal(single, _expected_block_output(model, batch, seed=3))
        assert torch.equal(rank0, single)
        assert torch.equal(rank1, _expected_block_output(model, batch, seed=3 + 1_000_003))
        noise = (single - _clean_block_output(model, batch)).abs().max()
    assert (rank1 - single).abs().max() > 0.5 * noise > 0


def test_default_rank_is_the_process_group_rank(monkeypatch):
    """Without ``rank=``, the injector reads the rank of an initialised process group (faked here; the real one is
    exercised by test_distributed.py under torchrun)."""
    model, batch = llama(), make_batch()
    model.train()
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    assert NoiseInjector(model, NoiseFiTConfig(layers=[0])).rank == 1
    with torch.no_grad():
        assert torch.equal(_noisy_block_output(model, batch), _expected_block_output(model, batch, 3 + 1_000_003))


@pytest.mark.parametrize("seed, rank, expected", [
    (7, 0, 7),
    (7, 2, 7 + 2 * 1_000_003),
    (2**63 - 1, 2**62, (2**63 - 1 + 1_000_003 * 2**62) % 2**64),
], ids=["rank-0-keeps-the-seed", "rank-2", "wraps-at-2**64"])
def test_stream_seed(seed, rank, expected):
    assert stream_seed(seed, rank) == expected
    torch.Generator().manual_seed(stream_seed(seed, rank))  # a seed torch accepts


# ------------------------------------------------------------------------------------- gradient checkpointing
def _noisy_grads(model: nn.Module, batch: dict, injector: NoiseInjector) -> list[torch.Tensor]:
    model.zero_grad()
    with injector.noisy(rows=torch.arange(1, 3)):
        loss = logits_of(model, batch).logsumexp(-1).mean()
    loss.backward()  # outside the noisy block, as Trainer does it
    return [p.grad.clone() for p in model.parameters()]


def test_gradient_checkpointing_sees_the_same_noise():
    """transformers' blocks checkpoint forward() and keep hooks outside: the recomputation adds no new noise."""
    model, batch = llama(), make_batch()
    model.train()
    cfg = NoiseFiTConfig(layers="0,1", rel_noise=0.2)
    with NoiseInjector(model, cfg) as injector:
        reference = _noisy_grads(model, batch, injector)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    calls, hook_calls = [], []
    model.model.layers[0].mlp.register_forward_pre_hook(lambda m, a: calls.append(1))
    model.model.layers[0].register_forward_hook(lambda m, a, o: hook_calls.append(1))
    with NoiseInjector(model, cfg) as injector:
        got = _noisy_grads(model, batch, injector)
    assert len(calls) == 2  # forward + recomputation: checkpointing is really on
    assert len(hook_calls) == 1  # block hooks run outside the checkpoint
    for g, r in zip(got, reference, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("generator", ["global", "private"])
def test_hooks_inside_a_checkpoint_replay_with_the_global_generator(generator):
    """A hook inside a checkpointed segment runs again at recomputation, and block 1 (same segment) is recomputed
    from its output: the global RNG (restored by preserve_rng_state) with backward inside the noisy block
    reproduces the gradients; the private generator draws new noise there, so they differ."""
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    cfg = NoiseFiTConfig(layers=[0], rel_noise=0.2)
    grads = []
    for checkpointed in (False, True):
        model = _Toy(checkpoint=checkpointed).train()
        calls = []
        model.layers[0].register_forward_hook(lambda m, a, o, calls=calls: calls.append(1))
        injector = NoiseInjector(model, cfg, generator=generator)
        torch.manual_seed(5)
        with injector.noisy():
            model(x).pow(3).mean().backward()
        assert len(calls) == (2 if checkpointed else 1)
        grads.append([p.grad for p in model.parameters()] + [x.grad.clone()])
        x.grad = None
    worst = max(float((g - r).abs().max() / r.abs().max()) for g, r in zip(grads[1], grads[0], strict=True))
    if generator == "global":
        assert worst < 1e-5
    else:
        assert worst > 1e-2


# ----------------------------------------------------------------------------------------------- paper v1 noise
def test_paper_v1_training_noise_applies_noise_std_twice():
    noise_std = 0.1
    model, batch = llama(d_model=64), make_batch(rows=4, seq=16)
    model.train()
    block = find_decoder_layers(model)[0]
    clean, noisy = [], []
    capture(block, clean)
    injector = NoiseInjector(model, NoiseFiTConfig(layers=[0], rel_noise=noise_std, paper_v1=True))
    capture(block, noisy)
    with injector.noisy():
        logits_of(model, batch)
    h = clean[0]
    std_twice = v1_std_reference(h, noise_std**2 * float(h.std()))
    torch.testing.assert_close(paper_v1_noise_std(h, noise_std**2 * float(h.std())).double(), std_twice,
                               rtol=1e-5, atol=1e-12)
    z = (noisy[0] - h).double() / std_twice  # standard normal if the std is noise_std^2 * std(h) * ...
    assert float(z.pow(2).mean().sqrt()) == pytest.approx(1.0, abs=0.1)
    assert float(z.mean()) == pytest.approx(0.0, abs=0.1)


# ------------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("kwargs, match", [
    ({"layers": [2]}, r"layers=\[2\].*\[0, 2\)"),
    ({"scales": {5: 0.1}}, r"scales="),
    ({"scales": {0: -1.0}}, r"scales="),
    ({"generator": "cuda"}, r"generator='cuda'"),
    ({"rank": -1}, r"rank=-1.*>= 0"),
], ids=["layer-out-of-range", "scale-for-unhooked-layer", "negative-scale", "generator", "negative-rank"])
def test_bad_injector_arguments_raise(kwargs, match):
    model = llama()
    with pytest.raises(ConfigError, match=match):
        NoiseInjector(model, NoiseFiTConfig(layers="0"), **{"layers": [0], **kwargs})
    assert n_hooks(model) == 0


def test_auto_layers_need_calibration_first():
    with pytest.raises(ConfigError, match=r"layers='auto'.*calibrate\(model, batches, config\)"):
        NoiseInjector(llama(), NoiseFiTConfig(layers="auto"))


@pytest.mark.parametrize("kwargs, match", [
    ({"rows": torch.tensor([0, 7])}, r"rows=\[0, 7\].*\[0, 3\)"),
    ({"rows": torch.ones(5, dtype=torch.bool)}, r"rows=.*length batch=3"),
    ({"rows": torch.tensor([0.5])}, r"rows="),
    ({"token_mask": torch.ones(3, 5, dtype=torch.bool)}, r"token_mask=.*\(3, 12\)"),
    ({"noise_mask": torch.ones(2, 12, dtype=torch.bool)}, r"noise_mask="),
], ids=["row-out-of-range", "bool-length", "float-rows", "token-mask-shape", "noise-mask-shape"])
def test_bad_noisy_arguments_raise(kwargs, match):
    model, batch = llama(), make_batch()
    model.train()
    injector = NoiseInjector(model, NoiseFiTConfig(layers=[0]))
    with pytest.raises(ConfigError, match=match), injector.noisy(**kwargs):
        logits_of(model, batch)
