"""The decoder study: SmolLM2 writes BBC headlines; ``forward(input_ids, attention_mask, instruction_mask, labels) ->
loss`` and ``new_tokens(...)`` for greedy headlines, ROUGE-L by :func:`rouge_l`."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from leanfit.core.errors import MissingDependencyError
from leanfit.core.io import atomic_write_text
from leanfit.core.seed import derive_seed
from leanfit.iapt.generator import iapt_parameter_count
from leanfit.studies.data.labelled import LabelledText
from leanfit.studies.iapt.task import load_labelled, lora_unit, sample_labelled
from leanfit.studies.iapt.train import batch_indices, make_accelerator, make_optimizer, train_loop

if TYPE_CHECKING:
    from leanfit.core.runner import RunContext
    from leanfit.studies.iapt.config import IAPTExperimentConfig

__all__ = ["HeadlineExample", "HeadlineLM", "IAPTHeadlineLM", "headline_examples", "rouge_l", "run_decoder"]


# --------------------------------------------------------------------------------------------------- decoder
@dataclass
class HeadlineExample:
    """A headline task: ``prompt`` token ids (chat template, cut body), ``target`` ids (headline + end token)."""

    prompt: list[int]
    target: list[int]
    reference: str


def headline_examples(tokenizer: Any, data: LabelledText, dcfg: Any) -> list[HeadlineExample]:
    """Prompt = the chat template around ``instruction`` + the body cut to ``body_tokens`` tokens; the template
    is split at the body, and its pieces are tokenised apart so the cut is exact."""
    mark = "\x00BODY\x00"
    messages = [{"role": "user", "content": f"{dcfg.instruction}\n\n{mark}"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    before, after = (tokenizer(part, add_special_tokens=False)["input_ids"] for part in text.split(mark))
    end = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    out = []
    for body, title in zip(data.texts, data.titles, strict=True):
        body_ids = tokenizer(body, add_special_tokens=False)["input_ids"][: dcfg.body_tokens]
        target = tokenizer(title, add_special_tokens=False)["input_ids"][: dcfg.target_tokens - 1] + [end]
        out.append(HeadlineExample(before + body_ids + after, target, title))
    return out


def _lm_batch(examples: Sequence[HeadlineExample], pad: int) -> dict[str, Tensor]:
    """Right-padded prompt + target; loss on the target only; the prompt is the instruction."""
    width = max(len(e.prompt) + len(e.target) for e in examples)
    ids = torch.full((len(examples), width), pad)
    mask, instruction = torch.zeros_like(ids), torch.zeros_like(ids, dtype=torch.bool)
    labels = torch.full_like(ids, -100)
    for i, e in enumerate(examples):
        n, m = len(e.prompt), len(e.prompt) + len(e.target)
        ids[i, :m] = torch.tensor(e.prompt + e.target)
        mask[i, :m] = 1
        instruction[i, :n] = True
        labels[i, n:m] = torch.tensor(e.target)
    return {"input_ids": ids, "attention_mask": mask, "instruction_mask": instruction, "labels": labels}


def _prompt_batch(examples: Sequence[HeadlineExample], pad: int) -> tuple[Tensor, Tensor]:
    """Left-padded prompts for generation: (ids, mask) of shape (B, T)."""
    width = max(len(e.prompt) for e in examples)
    ids = torch.full((len(examples), width), pad)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(examples):
        ids[i, width - len(e.prompt) :] = torch.tensor(e.prompt)
        mask[i, width - len(e.prompt) :] = 1
    return ids, mask


class HeadlineLM(nn.Module):
    """A causal LM (plain or PEFT) for the headline task: ``forward(...) -> loss`` trains it, ``new_tokens``
    decodes greedily. The instruction mask is IAPT's input (:class:`IAPTHeadlineLM`); here it is unused."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, instruction_mask: Tensor, labels: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss

    @torch.no_grad()
    def new_tokens(self, input_ids: Tensor, attention_mask: Tensor, **kwargs: Any) -> Tensor:
        """Greedy continuation (B, <= max_new_tokens) of left-padded prompts (B, T)."""
        out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False, **kwargs)
        return out[:, input_ids.shape[1] :]


class IAPTHeadlineLM(HeadlineLM):
    """An :class:`~leanfit.iapt.model.IAPTModel` LM: the prompt is the instruction, its prompts are computed once
    at prefill."""

    def forward(self, input_ids: Tensor, attention_mask: Tensor, instruction_mask: Tensor, labels: Tensor) -> Tensor:
        return self.model(input_ids, attention_mask, instruction_mask=instruction_mask, labels=labels).loss

    @torch.no_grad()
    def new_tokens(self, input_ids: Tensor, attention_mask: Tensor, **kwargs: Any) -> Tensor:
        out = self.model.generate(input_ids, attention_mask, do_sample=False, **kwargs)
        return out[:, input_ids.shape[1] :]


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F1 per pair (``rouge-score``: lower-cased alphanumeric tokens, Porter stemming)."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise MissingDependencyError("ROUGE-L needs the rouge-score package: pip install rouge-score") from None
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references, strict=True)]


def _build_lm(base: nn.Module, method: str, dcfg: Any, r: int, seed: int) -> HeadlineLM:
    if method == "zero-shot":
        return HeadlineLM(base)
    model = copy.deepcopy(base)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "decoder", method, "init"))
        if method in ("iapt", "iapt-gate"):
            from leanfit.iapt.model import get_iapt_model

            config = dcfg.iapt if method == "iapt" else dataclasses.replace(dcfg.iapt, prompt_gate=True,
                                                                            init_scale=dcfg.gate_init_scale)
            return IAPTHeadlineLM(get_iapt_model(model, config))
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=2 * r, target_modules=list(dcfg.lora_targets))
        return HeadlineLM(get_peft_model(model, config))


def _generate(lm: HeadlineLM, tokenizer: Any, examples: Sequence[HeadlineExample], dcfg: Any,
              pad: int) -> list[str]:
    device = next(lm.parameters()).device
    end = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    lm.eval()
    out = []
    for i in range(0, len(examples), dcfg.generate_batch):
        ids, mask = _prompt_batch(examples[i : i + dcfg.generate_batch], pad)
        new = lm.new_tokens(ids.to(device), mask.to(device), max_new_tokens=dcfg.target_tokens, pad_token_id=pad,
                            eos_token_id=end)
        out += [tokenizer.decode(row, skip_special_tokens=True).strip().split("\n")[0] for row in new.cpu()]
    return out


def _decoder_run(ctx: RunContext[IAPTExperimentConfig], base: nn.Module, tokenizer: Any, method: str, data: dict[str, list[HeadlineExample]],
                 sizes: dict[str, int]) -> dict[str, Any]:
    """Train (unless zero-shot) and score one decoder method: ``result.json``, ``losses.jsonl`` and
    ``predictions.jsonl`` in its folder."""
    dcfg = ctx.config.decoder
    subrun = ctx.run.subrun(f"decoder-{method}-s{dcfg.seed}")
    if (done := subrun.stored()) is not None:
        return done
    sub = subrun.path
    lm = _build_lm(base, method, dcfg, sizes["lora_r"], dcfg.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trainable = sum(p.numel() for p in lm.parameters() if p.requires_grad)
    record: dict[str, Any] = {"method": method, "seed": dcfg.seed, "train_seconds": 0.0, "steps": 0, "lr": None,
                              "adapter_params": trainable}
    torch.manual_seed(derive_seed(dcfg.seed, "decoder", method, "dropout"))
    acc = make_accelerator()
    if method != "zero-shot":
        lr = {"iapt": dcfg.iapt_lr, "iapt-gate": dcfg.iapt_gate_lr, "lora": dcfg.lora_lr}[method]
        optimizer, scheduler = make_optimizer(lm, lr, lr, dcfg.steps, ctx.config.warmup_fraction)
        model, optimizer = acc.prepare(lm, optimizer)
        train = data["train"]
        shard = slice(acc.process_index, None, acc.num_processes)
        order = batch_indices(len(train), dcfg.batch_size, dcfg.steps, derive_seed(dcfg.seed, "decoder"))
        batches = [[train[int(i)] for i in idx[shard]] for idx in order]

        def loss_fn(m: nn.Module, examples: list[HeadlineExample]) -> Tensor:
            return m(**{k: v.to(acc.device) for k, v in _lm_batch(examples, pad).items()})

        (sub / "losses.jsonl").unlink(missing_ok=True)
        record.update(train_loop(acc, model, optimizer, scheduler, batches, loss_fn, f"decoder-{method}",
                                  sub / "losses.jsonl", dcfg.max_grad_norm))
        record.update(lr=lr, steps=dcfg.steps, max_grad_norm=dcfg.max_grad_norm)
        lm = acc.unwrap_model(model)
    began = time.perf_counter()
    predictions = _generate(lm, tokenizer, data["test"], dcfg, pad)
    record["generate_seconds"] = time.perf_counter() - began
    scores = rouge_l(predictions, [e.reference for e in data["test"]])
    record.update(rouge_l=sum(scores) / len(scores), test_examples=len(scores), rouge_l_articles=scores)
    if acc.is_main_process:
        lines = [json.dumps({"reference": e.reference, "prediction": p, "rouge_l": s}) + "\n"
                 for e, p, s in zip(data["test"], predictions, scores, strict=True)]
        atomic_write_text(sub / "predictions.jsonl", "".join(lines))
    subrun.store(record)
    acc.wait_for_everyone()
    return record


def run_decoder(ctx: RunContext[IAPTExperimentConfig]) -> list[dict[str, Any]]:
    """The headline study: every method of ``decoder.methods`` on the same articles; one record per method."""
    from leanfit.core.device import configure_threads
    from leanfit.studies.models.pretrained import load_pretrained

    cfg, dcfg = ctx.config, ctx.config.decoder
    configure_threads(dcfg.threads or os.cpu_count() or 1, small_workload=False)
    base, tokenizer = load_pretrained(dcfg.model, model_class="AutoModelForCausalLM")
    base.eval().requires_grad_(False)
    parts = load_labelled("bbc-news").split(cfg.valid_fraction, cfg.test_fraction)
    data = {"train": headline_examples(tokenizer, sample_labelled(parts["train"], dcfg.train_examples), dcfg),
            "test": headline_examples(tokenizer, sample_labelled(parts["test"], dcfg.test_examples), dcfg)}
    budget = iapt_parameter_count(base.config.hidden_size, base.config.num_hidden_layers, dcfg.iapt)
    sizes = {"iapt_params": budget, "lora_r": max(1, round(budget / lora_unit(base, dcfg.lora_targets)))}
    rows = [_decoder_run(ctx, base, tokenizer, method, data, sizes) for method in dcfg.methods]
    lengths = [len(e.prompt) for e in data["test"]]
    for row in rows:
        row.update(prompt_tokens_mean=sum(lengths) / len(lengths), lora_r=sizes["lora_r"] if row["method"] == "lora"
                   else None)
    configure_threads(cfg.threads, small_workload=True)
    return rows
