"""NoiseFiTTrainer, NoiseFiTSFTTrainer and RDropTrainer: hook lifetime, losses, PEFT LoRA, TRL."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments

from leanfit.noisefit.config import NoiseFiTConfig
from leanfit.noisefit.injector import NoiseInjector, find_decoder_layers
from leanfit.noisefit.loss import noisefit_loss, rdrop_loss
from leanfit.noisefit.trainer import NoiseFiTTrainer, RDropTrainer
from leanfit.studies.models.tiny_llama import tiny_llama
from leanfit.studies.noisefit.hallucination import batch_to_tensors

VOCAB = 64


def _features(n: int = 48, seed: int = 0) -> list[dict[str, list[int]]]:
    """Toy QA data: a 4-token prompt whose first token determines the completion (one of 4 tokens, then EOS)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt = torch.randint(4, VOCAB, (4,), generator=g).tolist()
        completion = [4 + prompt[0] % 4, 0]
        out.append({"input_ids": prompt + completion, "labels": [-100] * 4 + completion})
    return out


def _args(tmp_path, steps: int = 12, **kw) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=8,
                             learning_rate=3e-3, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                             logging_steps=1, remove_unused_columns=False, seed=0, **kw)


def _model():
    return tiny_llama(VOCAB, d_model=32, n_layers=3, n_heads=2, seed=0)


def _collate(feats):
    return batch_to_tensors(feats, pad_id=1)


class _HookCounter(TrainerCallback):
    """Records the number of forward hooks on the decoder blocks at every step end."""

    def __init__(self, model) -> None:
        self.blocks, self.counts = find_decoder_layers(model), []

    def on_step_end(self, args, state, control, **kwargs):
        self.counts.append(sum(len(b._forward_hooks) for b in self.blocks))


def _bare_logits(model, batch) -> torch.Tensor:
    fresh = _model()
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    with torch.no_grad():
        return fresh(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("layers", ["1", "auto"], ids=["explicit", "calibrated"])
def test_hooks_live_only_during_train_and_outputs_equal_bare_model_after(tmp_path, layers):
    model = _model()
    cfg = NoiseFiTConfig(layers=layers, rel_noise=0.1, calib_batches=2)
    counter = _HookCounter(model)
    trainer = NoiseFiTTrainer(model=model, args=_args(tmp_path), train_dataset=_features(), data_collator=_collate,
                              noisefit_config=cfg, callbacks=[counter])
    trainer.train()
    expected_hooks = 1 if layers == "1" else len(trainer.calibration.layers)
    assert counter.counts == [expected_hooks] * 12
    assert trainer.injector is None
    assert all(len(b._forward_hooks) == 0 for b in find_decoder_layers(model))
    batch = _collate(_features(8, seed=1))
    model.eval()
    with torch.no_grad():
        got = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(got, _bare_logits(model, batch))
    if layers == "auto":
        assert trainer.calibration.to_dict()["layers"] == list(trainer.calibration.layers)


def test_training_lowers_the_loss_and_logs_the_terms(tmp_path):
    model = _model()
    trainer = NoiseFiTTrainer(model=model, args=_args(tmp_path, steps=40), train_dataset=_features(),
                              data_collator=_collate, noisefit_config=NoiseFiTConfig(layers="1,2", rel_noise=0.1))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < 0.5 * losses[0]
    logged = [h for h in trainer.state.log_history if "noisefit/soft" in h]
    assert logged and all(h["noisefit/soft"] >= 0 for h in logged)


def test_compute_loss_equals_noisefit_loss_and_evaluation_is_plain_ce(tmp_path):
    model = _model()
    cfg = NoiseFiTConfig(layers="1", rel_noise=0.1)
    data = _features()
    trainer = NoiseFiTTrainer(model=model, args=_args(tmp_path, steps=1), train_dataset=data, eval_dataset=data[:16],
                              data_collator=_collate, noisefit_config=cfg)
    batch = _collate(data[:8])
    trainer._attach_noise()
    model.train()
    trainer.injector.reseed(3)
    got = trainer.compute_loss(model, dict(batch))
    trainer.injector.reseed(3)
    expected = noisefit_loss(model, dict(batch), trainer.injector, cfg).loss
    assert torch.equal(got, expected)
    trainer._detach_noise()
    eval_loss = trainer.evaluate()["eval_loss"]
    model.eval()
    with torch.no_grad():
        plain = model(**_collate(data[:16])).loss.item()
    assert eval_loss == pytest.approx(plain, rel=1e-5)


def test_lora_trains_only_the_adapters(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    trainer = NoiseFiTTrainer(model=model, args=_args(tmp_path, steps=5), train_dataset=_features(),
                              data_collator=_collate, noisefit_config=NoiseFiTConfig(layers="auto", rel_noise=0.1))
    trainer.train()
    changed = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    assert changed and all("lora_" in k for k in changed)
    assert {k for k in before if "lora_" in k} == changed
    assert all(len(b._forward_hooks) == 0 for b in find_decoder_layers(model))


def test_noisefit_sft_trainer_from_trl(tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig

    from leanfit.noisefit.trainer import NoiseFiTSFTTrainer
    from leanfit.studies.noisefit.facts_qa import build_fact_world, qa_example, tokenizer_texts
    from leanfit.studies.noisefit.hallucination import build_tokenizer

    world = build_fact_world(0, pretrain_fraction=0.1, n_fictitious=4)
    tok = build_tokenizer(tokenizer_texts(world), 320)
    tok.padding_side = "right"
    model = tiny_llama(len(tok), d_model=32, n_layers=2, n_heads=2, seed=0)
    data = Dataset.from_list([dict(zip(("prompt", "completion"), qa_example(f), strict=True))
                              for f in world.sft_train[:32]])
    args = SFTConfig(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8, report_to=[],
                     save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=1, learning_rate=1e-3,
                     completion_only_loss=True)
    trainer = NoiseFiTSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                                 noisefit_config=NoiseFiTConfig(layers="0", rel_noise=0.1))
    trainer.train()
    assert any("noisefit/soft" in h for h in trainer.state.log_history)
    assert all(len(b._forward_hooks) == 0 for b in find_decoder_layers(model))


def test_rdrop_trainer_loss_is_rdrop_loss_and_plain_ce_without_dropout(tmp_path):
    model = _model()
    trainer = RDropTrainer(model=model, args=_args(tmp_path, steps=1), train_dataset=_features(),
                           data_collator=_collate, rdrop_alpha=1.0)
    batch = _collate(_features(8))
    model.train()
    got = trainer.compute_loss(model, dict(batch))
    assert torch.equal(got, rdrop_loss(model, dict(batch), 1.0).loss)  # no dropout: both passes agree
    with torch.no_grad():
        assert got.item() == pytest.approx(model(**batch).loss.item(), rel=1e-5)


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"noisefit_config": {"layers": "1"}}, "noisefit_config"),
    ({"rdrop_alpha": -1.0}, "rdrop_alpha"),
])
def test_bad_trainer_arguments_name_the_parameter(tmp_path, kwargs, param):
    cls = RDropTrainer if "rdrop_alpha" in kwargs else NoiseFiTTrainer
    with pytest.raises((TypeError, ValueError), match=param):
        cls(model=_model(), args=_args(tmp_path), train_dataset=_features(), data_collator=_collate, **kwargs)


def _sharp_model():
    """:func:`_model` with the output head times 10: peaked next-token distributions, which noise changes
    measurably (at initialisation they are nearly uniform and every KL term is ~1e-3)."""
    model = _model()
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)
    return model


def _one_sgd_step(tmp_path, cls, batch: int, accumulation: int, make_model=_model, name: str = "",
                  **kw) -> dict[str, torch.Tensor]:
    model = make_model()
    args = _args(tmp_path / f"{cls.__name__}-{batch}x{accumulation}{name}", steps=1, optim="sgd")
    args.per_device_train_batch_size, args.gradient_accumulation_steps = batch, accumulation
    data = _features(16)
    for f in data[::3]:  # uneven completion lengths: micro-batch token means would weigh tokens differently
        f["input_ids"], f["labels"] = f["input_ids"] + [5, 0], f["labels"] + [5, 0]
    cls(model=model, args=args, train_dataset=data, data_collator=_collate, **kw).train()
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("cls, kw", [
    (NoiseFiTTrainer, {"noisefit_config": NoiseFiTConfig(layers="1", alpha=1.0, lam=0.0)}),
    (RDropTrainer, {"rdrop_alpha": 1.0}),
], ids=["noisefit", "rdrop"])
def test_gradient_accumulation_equals_one_big_batch(tmp_path, cls, kw):
    """Two accumulated micro-batches of 4 give the SGD step of one batch of 8 (the same 8 examples): the loss is
    scaled as the plain Trainer scales its own (plain SGD, so a wrong scale cannot hide behind Adam)."""
    big = _one_sgd_step(tmp_path, cls, 8, 1, **kw)
    accumulated = _one_sgd_step(tmp_path, cls, 4, 2, **kw)
    start = {k: v.detach() for k, v in _model().named_parameters()}
    for name, value in big.items():
        torch.testing.assert_close(accumulated[name], value, rtol=0, atol=1e-6, msg=name)
    assert max(float((v - start[k]).abs().max()) for k, v in big.items()) > 1e-4  # the step moved weights (~6e-4)


NOISY = NoiseFiTConfig(layers="1", rel_noise=1.0, token_adaptive=False, n_noisy=2, alpha=0.5, lam=0.5,
                       calibration="snr")
"""All three terms on (alpha < 1, lam > 0), noise large enough to matter, a row-local noise scale (see below)."""


def test_gradient_accumulation_with_the_noisy_terms_equals_one_big_batch(tmp_path, monkeypatch):
    """With the soft and consistency terms on, two accumulated micro-batches of 4 give the SGD step of one batch of
    8, when both runs add the same noise to every (example, branch).

    The noise is made identical by replaying it: the injector's draws of the accumulated run (one (2 x 4, T_i, d)
    standard-normal tensor per micro-batch: branch 1 then branch 2 of its rows) are recorded, rearranged into the
    (2 x 8, T, d) layout of the one-batch run (branch 1 of micro-batches 1 and 2, then branch 2; positions past
    T_i are padding, where no noise lands) and returned by its single draw. The std multiplying the draw must be
    per row as well: ``token_adaptive=False`` makes it rel_noise x the token's RMS, whereas the adaptive factor
    divides by the mean variance of the whole batch (so micro-batches and the big batch differ by design)."""
    draws: list[torch.Tensor] = []
    original = NoiseInjector._draw

    def record(self, shape, device):
        draws.append(original(self, shape, device))
        return draws[-1]

    monkeypatch.setattr(NoiseInjector, "_draw", record)
    accumulated = _one_sgd_step(tmp_path, NoiseFiTTrainer, 4, 2, _sharp_model, noisefit_config=NOISY)
    assert [tuple(d.shape[:1]) for d in draws] == [(8,), (8,)]
    width = max(d.shape[1] for d in draws)
    replay = torch.zeros(16, width, draws[0].shape[2])
    for micro, draw in enumerate(draws):
        for branch in range(2):
            rows = slice(8 * branch + 4 * micro, 8 * branch + 4 * micro + 4)
            replay[rows, : draw.shape[1]] = draw[4 * branch : 4 * branch + 4]

    def replayed(self, shape, device):
        assert tuple(shape) == tuple(replay.shape), "the one-batch run must see the same 8 examples"
        return replay

    monkeypatch.setattr(NoiseInjector, "_draw", replayed)
    big = _one_sgd_step(tmp_path, NoiseFiTTrainer, 8, 1, _sharp_model, noisefit_config=NOISY)
    monkeypatch.setattr(NoiseInjector, "_draw", lambda self, shape, device: torch.zeros(shape))
    noiseless = _one_sgd_step(tmp_path, NoiseFiTTrainer, 8, 1, _sharp_model, "-zero", noisefit_config=NOISY)
    for name, value in big.items():
        torch.testing.assert_close(accumulated[name], value, rtol=0, atol=1e-6, msg=name)
    # zero noise leaves alpha * CE (the noisy terms and their gradients vanish): the noisy terms moved the
    # weights by far more than the tolerance, so they are tested, not just switched on (measured ~1e-3)
    assert max(float((v - noiseless[k]).abs().max()) for k, v in big.items()) > 1e-4


def _logs(tmp_path, accumulation: int, token_count: bool = True, logging_steps: int = 1) -> list[dict[str, float]]:
    """The training logs of 2 SGD steps of 8 examples (accumulated micro-batches of 8 // accumulation)."""
    args = _args(tmp_path / f"log-{accumulation}-{token_count}", steps=2, optim="sgd")
    args.per_device_train_batch_size, args.gradient_accumulation_steps = 8 // accumulation, accumulation
    args.logging_steps = logging_steps
    data = _features(16)
    for f in data[::3]:  # uneven completion lengths: the token mean differs from the mean of micro-batch means
        f["input_ids"], f["labels"] = f["input_ids"] + [5, 0], f["labels"] + [5, 0]
    trainer = NoiseFiTTrainer(model=_sharp_model(), args=args, train_dataset=data, data_collator=_collate,
                              noisefit_config=NOISY)
    if not token_count:  # a model without loss kwargs: per-micro-batch means, the Trainer divides by accumulation
        trainer.model_accepts_loss_kwargs = False
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


def _assert_terms_add_up_to_the_loss(log: dict[str, float]) -> None:
    combined = NOISY.alpha * log["noisefit/ce"] + (1 - NOISY.alpha) * log["noisefit/soft"] + \
        NOISY.lam * log["noisefit/consistency"]
    assert log["loss"] == pytest.approx(combined, rel=1e-5), (log, combined)
    assert log["noisefit/soft"] > 0.01 * log["noisefit/ce"] and log["noisefit/consistency"] > 0.01 * log["noisefit/ce"]


@pytest.fixture(scope="module")
def logs_without_accumulation(tmp_path_factory) -> list[dict[str, float]]:
    return _logs(tmp_path_factory.mktemp("ga1"), 1)


@pytest.mark.parametrize("accumulation", [1, 2, 4])
def test_logged_terms_do_not_depend_on_gradient_accumulation(tmp_path, logs_without_accumulation, accumulation):
    """The logged CE is the completion-token mean of the step's whole batch: at step 1 (same weights; the clean
    branch sees no noise) it is the same at every accumulation. At every step the Trainer's logged loss is the
    weighted sum of the logged terms (each term reduced as the loss is). Before, the last micro-batch's share
    was logged (CE 4.19, 1.54, 0.76 at accumulation 1, 2, 4 for one step of this data without the sharpened
    head). Step 2 differs between accumulations: the noise, hence the first update, depends on the batch shapes."""
    logs = _logs(tmp_path, accumulation)
    assert [h["step"] for h in logs] == [1, 2]
    assert logs[0]["noisefit/ce"] == pytest.approx(logs_without_accumulation[0]["noisefit/ce"], rel=1e-5)
    for log in logs:
        _assert_terms_add_up_to_the_loss(log)


def test_logged_terms_follow_micro_batch_means_without_the_token_count(tmp_path, logs_without_accumulation):
    """A model that takes no loss kwargs gets per-micro-batch means, which the Trainer divides by the accumulation
    steps: the logged terms are then means of micro-batch means, like its loss (not the token mean); with
    ``logging_steps=2`` both are averaged over the two steps."""
    (log,) = _logs(tmp_path, 2, token_count=False, logging_steps=2)
    assert log["step"] == 2
    _assert_terms_add_up_to_the_loss(log)
    assert abs(log["noisefit/ce"] / logs_without_accumulation[0]["noisefit/ce"] - 1) > 1e-4


def test_paper_v1_loss_is_averaged_over_accumulated_micro_batches(tmp_path):
    """The v1 loss is a per-micro-batch mean that ignores the Trainer's token count; the Trainer, having passed
    one, does not divide by the accumulation steps, so NoiseFiTTrainer does. Equal-length examples (micro-batch
    means average to the batch mean) and tiny v1 noise: the logged loss, CE and gradient norm are those of one
    batch of 8 (before: x2 and x4 at accumulation 2 and 4, e.g. grad norm 11.7, 23.4, 46.8)."""
    cfg = NoiseFiTConfig(layers="1", paper_v1=True, rel_noise=0.01)
    logs = []
    for accumulation in (1, 2, 4):
        args = _args(tmp_path / f"v1-{accumulation}", steps=1, optim="sgd")
        args.per_device_train_batch_size, args.gradient_accumulation_steps = 8 // accumulation, accumulation
        trainer = NoiseFiTTrainer(model=_sharp_model(), args=args, train_dataset=_features(16),
                                  data_collator=_collate, noisefit_config=cfg)
        trainer.train()
        logs.append(next(h for h in trainer.state.log_history if "loss" in h))
    for log in logs[1:]:
        for key in ("loss", "noisefit/ce", "grad_norm"):
            assert log[key] == pytest.approx(logs[0][key], rel=1e-4), key
    assert logs[0]["loss"] == pytest.approx(cfg.alpha * logs[0]["noisefit/ce"] + (1 - cfg.alpha) *
                                            logs[0]["noisefit/soft"] + cfg.lam * logs[0]["noisefit/consistency"],
                                            rel=1e-5)
