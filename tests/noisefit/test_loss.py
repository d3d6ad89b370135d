"""noisefit_loss (packed leanfit and reference-v1 modes), rdrop_loss, masked_kl and the config's validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from leanfit.core.errors import ConfigError
from leanfit.noisefit.config import NoiseFiTConfig
from leanfit.noisefit.injector import NoiseInjector
from leanfit.noisefit.loss import (
    masked_kl,
    noisefit_loss,
    rdrop_loss,
    shifted_completion_mask,
    statistics_mask,
)
from tests.noisefit.test_injector import MODELS, gpt2, llama, make_batch
from tests.reference import kl_reference, masked_kl_reference


def capture_logits(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every lm_head output (the logits of each forward, with gradient retained)."""
    store: list[torch.Tensor] = []

    def hook(module, args, output):
        output.retain_grad()
        store.append(output)

    model.get_output_embeddings().register_forward_hook(hook)
    return store


def shifted_mean(per_position: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean of (B, T) per-position values over the positions that predict a completion token."""
    mask = labels[:, 1:] != -100
    return per_position[:, :-1][mask].mean()


# --------------------------------------------------------------------------------------------- plain CE limit
@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("n_noisy", [1, 2])
def test_alpha_one_lam_zero_is_exactly_cross_entropy(name, n_noisy):
    model, batch = MODELS[name](), make_batch()
    model.train()
    injector = NoiseInjector(model, NoiseFiTConfig(layers=[0]))
    seen = capture_logits(model)
    out = noisefit_loss(model, batch, injector, NoiseFiTConfig(layers=[0], alpha=1.0, lam=0.0, n_noisy=n_noisy))
    assert len(seen) == 1 and seen[0].shape[0] == 3  # no noisy branch ran
    assert out.loss is out.ce and float(out.soft) == 0.0 and float(out.consistency) == 0.0
    assert injector.last_stats == {}
    hf_loss = model(**batch).loss
    assert out.loss.item() == pytest.approx(hf_loss.item(), abs=1e-6)
    logits, labels = out.logits_clean, batch["labels"]
    manual = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
    assert float(out.loss) == pytest.approx(float(manual), abs=1e-6)
    assert noisefit_loss(model, batch, None, NoiseFiTConfig(layers=[0], alpha=1.0, lam=0.0)).loss.item() == \
        pytest.approx(float(manual), abs=1e-6)


# ------------------------------------------------------------------------------------------------ leanfit mode
@pytest.mark.parametrize("n_noisy, kl", [(1, "symmetric"), (2, "symmetric"), (2, "forward")],
                         ids=["one-branch", "symmetric", "forward"])
@pytest.mark.parametrize("temperature", [1.0, 2.0], ids=["T1", "T2"])
def test_packed_loss_terms_match_reference(n_noisy, kl, temperature):
    model, batch = llama(), make_batch()
    model.train()
    cfg = NoiseFiTConfig(layers="0,1", rel_noise=0.2, n_noisy=n_noisy, lam=0.3 if n_noisy == 2 else 0.0,
                         alpha=0.3, kl=kl, temperature=temperature)
    seen = capture_logits(model)
    out = noisefit_loss(model, batch, NoiseInjector(model, cfg), cfg)
    assert len(seen) == 1 and seen[0].shape[0] == 3 * (n_noisy + 1)  # ONE forward, branches packed
    labels = batch["labels"]
    clean, *noisy = seen[0].detach().split(3)
    ce = F.cross_entropy(clean[:, :-1].double().reshape(-1, clean.shape[-1]), labels[:, 1:].reshape(-1))
    soft = sum(shifted_mean(kl_reference(clean, z, temperature), labels) for z in noisy) / n_noisy * temperature**2
    cons = torch.zeros((), dtype=torch.float64)
    if n_noisy == 2:
        forward = shifted_mean(kl_reference(noisy[0], noisy[1]), labels)
        cons = forward if kl == "forward" else 0.5 * (forward + shifted_mean(kl_reference(noisy[1], noisy[0]), labels))
    # The float32 KL of two near-equal distributions cancels terms of size ~entropy (about 5 nats here), so its
    # absolute error is about float32's eps times that: 1e-6, against terms of 5e-4 and more.
    for got, ref in [(out.ce, ce), (out.soft, soft), (out.consistency, cons)]:
        assert float(got) == pytest.approx(float(ref), rel=1e-4, abs=1e-6)
    assert float(out.soft) > 1e-4  # the noise matters at rel_noise 0.2
    assert float(out.loss) == pytest.approx(float(0.3 * ce + 0.7 * soft + cfg.lam * cons), rel=1e-5)
    assert torch.equal(out.logits_clean, seen[0][:3])


def test_teacher_is_detached_and_consistency_gradients():
    model, batch = llama(), make_batch()
    model.train()
    cfg = NoiseFiTConfig(layers="0,1", rel_noise=0.2, n_noisy=2, kl="symmetric")
    seen = capture_logits(model)
    out = noisefit_loss(model, batch, NoiseInjector(model, cfg), cfg)
    out.soft.backward(retain_graph=True)
    grad = seen[0].grad.clone()
    assert torch.count_nonzero(grad[:3]) == 0  # stop-gradient on the clean branch
    assert grad[3:].abs().max() > 0
    seen[0].grad = None
    out.consistency.backward()
    assert grad[:3].abs().max() == 0 and seen[0].grad[3:6].abs().max() > 0 and seen[0].grad[6:].abs().max() > 0


def test_forward_consistency_detaches_the_first_noisy_branch():
    model, batch = llama(), make_batch()
    model.train()
    cfg = NoiseFiTConfig(layers=[1], rel_noise=0.2, kl="forward", n_noisy=2, lam=0.05)
    seen = capture_logits(model)
    noisefit_loss(model, batch, NoiseInjector(model, cfg), cfg).consistency.backward()
    grad = seen[0].grad
    assert torch.count_nonzero(grad[:6]) == 0 and grad[6:].abs().max() > 0


def test_num_items_in_batch_divides_every_term():
    model, batch = llama(), make_batch()
    model.train()
    cfg = NoiseFiTConfig(layers=[0], rel_noise=0.2)
    injector = NoiseInjector(model, cfg)
    n_tokens = int(shifted_completion_mask(batch["labels"]).sum())
    outs = []
    for num_items in (None, n_tokens, 2 * n_tokens):
        injector.reseed()
        outs.append(noisefit_loss(model, batch, injector, cfg, num_items_in_batch=num_items))
    for term in ("loss", "ce", "soft", "consistency"):
        base = float(getattr(outs[0], term))
        assert float(getattr(outs[1], term)) == pytest.approx(base, rel=1e-6)
        assert float(getattr(outs[2], term)) == pytest.approx(base / 2, rel=1e-6)


def test_eval_mode_loss_has_no_noise():
    model, batch = llama(), make_batch()
    model.eval()
    cfg = NoiseFiTConfig(layers="0,1", rel_noise=0.5)
    out = noisefit_loss(model, batch, NoiseInjector(model, cfg), cfg)
    assert float(out.soft) == 0.0 and float(out.consistency) == 0.0
    assert float(out.loss) == pytest.approx(0.5 * float(model(**batch).loss), rel=1e-6)


def test_peft_wrapped_model_trains_only_adapters_and_matches_bare_model():
    from peft import LoraConfig, get_peft_model

    cfg = NoiseFiTConfig(layers=[1], rel_noise=0.2)
    batch = make_batch()
    bare = llama().train()
    expected = noisefit_loss(bare, batch, NoiseInjector(bare, cfg), cfg)
    wrapped = get_peft_model(llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    wrapped.train()
    out = noisefit_loss(wrapped, batch, NoiseInjector(wrapped, cfg), cfg)
    for term in ("loss", "ce", "soft", "consistency"):  # LoRA starts at zero: same model, same noise
        assert float(getattr(out, term)) == pytest.approx(float(getattr(expected, term)), rel=1e-5, abs=1e-8)
    out.loss.backward()
    with_grad = {n for n, p in wrapped.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and all("lora_" in n for n in with_grad)


# ------------------------------------------------------------------------------------------------ paper v1 mode
def test_paper_v1_loss_reproduces_the_reference_defects():
    model, batch = llama(), make_batch()
    model.train()
    t, alpha, lam = 2.0, 0.4, 0.1
    cfg = NoiseFiTConfig(layers="0,1", rel_noise=5.0, paper_v1=True, temperature=t, alpha=alpha, lam=lam)
    assert cfg.n_noisy == 2
    seen = capture_logits(model)
    out = noisefit_loss(model, batch, NoiseInjector(model, cfg), cfg)
    assert [z.shape[0] for z in seen] == [3, 3, 3]  # three separate forwards
    clean, noisy1, noisy2 = (z.detach() for z in seen)
    labels = batch["labels"]
    unshifted = labels != -100  # applied to next-token logits: off by one

    def v1_mean(per_position):
        return per_position[unshifted].mean()

    soft = 0.5 * (v1_mean(kl_reference(clean / t, noisy1)) + v1_mean(kl_reference(clean / t, noisy2)))  # T on teacher, no T^2
    cons = v1_mean(kl_reference(noisy2, noisy1))  # KL(p_noisy2 || p_noisy1)
    assert float(out.ce) == pytest.approx(float(model(**batch).loss), abs=1e-6)
    assert float(out.soft) == pytest.approx(float(soft), rel=1e-4)
    assert float(out.consistency) == pytest.approx(float(cons), rel=1e-4)
    assert float(out.loss) == pytest.approx(float(alpha * out.ce + (1 - alpha) * soft + lam * cons), rel=1e-5)
    fixed = 0.5 * t**2 * (shifted_mean(kl_reference(clean, noisy1, t), labels) + shifted_mean(kl_reference(clean, noisy2, t), labels))
    assert abs(float(out.soft) - float(fixed)) > 0.1 * float(fixed)  # the defects change the number
    out.soft.backward(retain_graph=True)
    assert seen[0].grad.abs().max() > 0  # the teacher is not detached
    out.consistency.backward()
    assert seen[1].grad.abs().max() > 0 and seen[2].grad.abs().max() > 0  # gradients through both noisy passes


# -------------------------------------------------------------------------------------------------- R-Drop
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no-dropout", "dropout"])
def test_rdrop_loss_matches_reference(dropout):
    model, batch = gpt2(dropout=dropout), make_batch()
    model.train()
    seen = capture_logits(model)
    torch.manual_seed(0)
    out = rdrop_loss(model, batch, alpha=0.7)
    assert len(seen) == 1 and seen[0].shape[0] == 6
    labels = batch["labels"]
    z1, z2 = seen[0].detach().split(3)

    def ce(z):
        return F.cross_entropy(z[:, :-1].double().reshape(-1, z.shape[-1]), labels[:, 1:].reshape(-1))

    kl = 0.5 * (shifted_mean(kl_reference(z1, z2), labels) + shifted_mean(kl_reference(z2, z1), labels))
    assert float(out.ce) == pytest.approx(float(0.5 * (ce(z1) + ce(z2))), rel=1e-5)
    assert float(out.kl) == pytest.approx(float(kl), rel=1e-4, abs=1e-9)
    assert float(out.loss) == pytest.approx(float(out.ce + 0.7 * out.kl), rel=1e-6)
    if dropout:
        assert float(out.kl) > 1e-3
    else:
        assert float(out.kl) == 0.0 and float(out.loss) == pytest.approx(float(model(**batch).loss), abs=1e-6)


# ------------------------------------------------------------------------------------------ functional pieces
@pytest.mark.parametrize("temperature", [1.0, 2.5], ids=["T1", "T2.5"])
@pytest.mark.parametrize("num_items", [None, 17.0], ids=["mean", "num-items"])
def test_masked_kl_matches_float64_reference(temperature, num_items):
    g = torch.Generator().manual_seed(0)
    p = (torch.randn(3, 7, 11, generator=g) * 3).requires_grad_()
    q = (torch.randn(3, 7, 11, generator=g) * 3).requires_grad_()
    mask = torch.rand(3, 7, generator=g) > 0.4
    got = masked_kl(p, q, mask, temperature, num_items)
    p64, q64 = p.detach().double().requires_grad_(), q.detach().double().requires_grad_()
    ref = masked_kl_reference(p64, q64, mask, temperature, num_items)
    assert float(got) == pytest.approx(float(ref), rel=1e-5)
    got.backward()
    ref.backward()
    torch.testing.assert_close(p.grad.double(), p64.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(q.grad.double(), q64.grad, rtol=1e-4, atol=1e-7)
    everywhere = masked_kl(p, q, None, temperature)
    ref_all = masked_kl_reference(p64, q64, torch.ones(3, 7, dtype=torch.bool), temperature, None)
    assert float(everywhere) == pytest.approx(float(ref_all), rel=1e-5)


def test_completion_masks():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 3, 4, 7, 8]])
    expected = torch.tensor([[False, True, True, False], [True, True, True, True]])
    assert torch.equal(shifted_completion_mask(labels), expected)
    assert torch.equal(statistics_mask(labels), torch.cat([expected, torch.zeros(2, 1, dtype=torch.bool)], 1))


# ----------------------------------------------------------------------------------------------- bad inputs
def test_all_labels_masked_raises():
    model, batch = llama(), make_batch()
    batch["labels"][:, 1:] = -100
    with pytest.raises(ConfigError, match=r"labels=.*at least one completion token"):
        noisefit_loss(model, batch, None, NoiseFiTConfig(layers=[0]))
    with pytest.raises(ConfigError, match=r"labels="):
        rdrop_loss(model, batch, 1.0)


def test_missing_injector_raises():
    model, batch = llama(), make_batch()
    with pytest.raises(ConfigError, match=r"injector='NoneType'.*alpha=0.5"):
        noisefit_loss(model, batch, None, NoiseFiTConfig(layers=[0]))


@pytest.mark.parametrize("kwargs, match", [
    ({"rel_noise": 0.0}, r"rel_noise=0.0 .*> 0"),
    ({"rel_noise": -0.1}, r"rel_noise=-0.1"),
    ({"alpha": 1.5}, r"alpha=1.5 .*\[0, 1\]"),
    ({"alpha": -0.1}, r"alpha=-0.1"),
    ({"n_noisy": 3}, r"n_noisy=3 .*1 or 2"),
    ({"n_noisy": 1, "lam": 0.1}, r"lam=0.1 .*set n_noisy=2 or lam=0"),
    ({"lam": -1.0}, r"lam=-1.0"),
    ({"temperature": 0.0}, r"temperature=0.0"),
    ({"max_token_factor": 0.0}, r"max_token_factor="),
    ({"robust_beta": -1.0}, r"robust_beta="),
    ({"calib_batches": 0}, r"calib_batches=0"),
    ({"calib_scales": ()}, r"calib_scales="),
    ({"calib_scales": (0.1, -0.2)}, r"calib_scales="),
    ({"kl": "reverse"}, r"kl='reverse'"),
    ({"calibration": "entropy"}, r"calibration='entropy'"),
], ids=["zero-noise", "negative-noise", "alpha-high", "alpha-low", "n-noisy", "lam-one-branch", "lam-negative",
        "temperature", "max-factor", "beta", "calib-batches", "no-scales", "negative-scale", "kl",
        "calibration"])
def test_config_validation_names_the_parameter(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        NoiseFiTConfig(**kwargs)


def test_paper_v1_forces_two_branches_and_snr():
    cfg = NoiseFiTConfig(paper_v1=True, n_noisy=1, lam=0.1, calibration="propagated")
    assert (cfg.n_noisy, cfg.calibration) == (2, "snr")
    assert NoiseFiTConfig(n_noisy=1, lam=0.0).n_noisy == 1


def test_config_round_trips_through_plain_values():
    cfg = NoiseFiTConfig(layers=[4, 2], calib_scales=[0.1, 0.2])
    again = NoiseFiTConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.calib_scales == (0.1, 0.2) and again.layer_spec().indices == (2, 4)
    assert NoiseFiTConfig.from_dict({"layers": "2,5", "alpha": "1", "lam": "0"}).layer_spec().indices == (2, 5)
