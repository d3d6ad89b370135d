"""NoiseFiTTrainer, NoiseFiTSFTTrainer and RDropTrainer: hook lifetime, losses, PEFT LoRA, TRL."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments

from leanfit.noisefit.config import NoiseFiTConfig
from leanfit.noisefit.injector import find_decoder_layers
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


def _one_sgd_step(tmp_path, cls, batch: int, accumulation: int, **kw) -> dict[str, torch.Tensor]:
    model = _model()
    args = _args(tmp_path / f"{cls.__name__}-{batch}x{accumulation}", steps=1, optim="sgd")
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
