"""The encoder study's tasks: labelled text sampled, tokenised and split with the frozen encoder and the adapter
budget every method is matched to (:func:`prepare_task`, once per process and configuration by :func:`task_env`)."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from leanfit.core.errors import ConfigError, bad_value
from leanfit.iapt.generator import iapt_parameter_count
from leanfit.studies.data.labelled import LabelledText

__all__ = ["ClassificationTask", "HEAD", "Split", "load_labelled", "lora_unit", "matched_sizes", "prepare_task", "sample_labelled", "task_env"]

HEAD = "classifier"  # the sequence-classification head of BERT-style models, trainable in every method


# --------------------------------------------------------------------------------------------------- data
@dataclass
class Split:
    """One tokenised split: ``input_ids`` / ``attention_mask`` / ``token_type_ids`` (N, T), right-padded, and
    ``labels`` (N,)."""

    input_ids: Tensor
    attention_mask: Tensor
    token_type_ids: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]

    def inputs(self, idx: Tensor) -> dict[str, Tensor]:
        """Rows ``idx``, cut to their longest row."""
        width = int(self.attention_mask[idx].sum(1).max())
        return {"input_ids": self.input_ids[idx, :width], "attention_mask": self.attention_mask[idx, :width],
                "token_type_ids": self.token_type_ids[idx, :width]}


def sample_labelled(data: LabelledText, cap: int, seed: int = 0) -> LabelledText:
    """A fixed random subset of at most ``cap`` examples (0 = all), in the original order."""
    if not cap or len(data) <= cap:
        return data
    keep = sorted(random.Random(seed).sample(range(len(data)), cap))
    pick = lambda seq: tuple(seq[i] for i in keep) if seq else ()  # noqa: E731
    return LabelledText(pick(data.texts), pick(data.labels), data.label_names, pick(data.groups), pick(data.titles))


def _encode(tokenizer: Any, data: LabelledText, max_length: int) -> Split:
    enc = tokenizer(list(data.texts), truncation=True, max_length=max_length, padding="longest", return_tensors="pt")
    types = enc.get("token_type_ids", torch.zeros_like(enc["input_ids"]))
    return Split(enc["input_ids"], enc["attention_mask"], types, torch.tensor(data.labels))


def load_labelled(task: str) -> LabelledText:
    from leanfit.studies.data.labelled import bbc_news, rotten_tomatoes

    return {"bbc-news": bbc_news, "rotten-tomatoes": rotten_tomatoes}[task]()


@dataclass
class ClassificationTask:
    """A task ready to train on: the pristine encoder, its tokenizer, the splits and the matched sizes."""

    name: str
    cfg: Any
    base: nn.Module
    tokenizer: Any
    splits: dict[str, Split]
    label_names: tuple[str, ...]
    budget: int
    sizes: dict[str, dict[str, int]]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def prepare_task(cfg: Any, task: str) -> ClassificationTask:
    """Load and split the data, load the encoder with a ``num_labels`` head, and match every method's size."""
    from leanfit.core.progress import stage
    from leanfit.studies.models.pretrained import load_pretrained

    with stage(f"data: {task} split and tokenized for {cfg.encoder}"):
        data = load_labelled(task)
        parts = data.split(cfg.valid_fraction, cfg.test_fraction)
        caps = {"train": cfg.max_train, "valid": cfg.max_valid, "test": cfg.max_test}
        model, tokenizer = load_pretrained(cfg.encoder, model_class="AutoModelForSequenceClassification",
                                           num_labels=len(data.label_names))
        model.eval().requires_grad_(False)
        splits = {name: _encode(tokenizer, sample_labelled(parts[name], caps[name]), cfg.max_length)
                  for name in caps}
    hidden, layers = model.config.hidden_size, model.config.num_hidden_layers
    budget = iapt_parameter_count(hidden, layers, cfg.iapt)
    return ClassificationTask(task, cfg, model, tokenizer, splits, data.label_names, budget,
                              matched_sizes(cfg, model, budget))


# --------------------------------------------------------------------------------------------------- budgets
def lora_unit(model: nn.Module, targets: Sequence[str]) -> int:
    """LoRA parameters per unit of rank: the sum of ``in + out`` over the Linear layers named in ``targets``."""
    unit = sum(m.in_features + m.out_features for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets)
    if not unit:
        raise ConfigError(bad_value("lora_targets", list(targets), "names of Linear modules of the model",
                                    "BERT: query, key, value; Llama: q_proj, k_proj, v_proj, o_proj"))
    return unit


def matched_sizes(cfg: Any, model: nn.Module, budget: int) -> dict[str, dict[str, int]]:
    """Each method's size closest to ``budget`` adapter parameters (explicit sizes in ``cfg`` win).

    Counts: LoRA ``r * lora_unit``; prefix ``p * 2 L d``; prefix with projection ``p d + (d + 1) h + h 2 L d +
    2 L d``; prompt ``p d``, with ``p`` at most the positions the encoder has left beside ``max_length``."""
    mc = model.config
    d, two_l = mc.hidden_size, 2 * mc.num_hidden_layers
    p_proj = cfg.prefix_proj_tokens
    hidden = round((budget - p_proj * d - two_l * d) / (d + 1 + two_l * d))
    room = mc.max_position_embeddings - cfg.max_length
    if cfg.prompt_tokens > room:
        limit = f"at most {room}: the encoder's {mc.max_position_embeddings} positions minus max_length"
        raise ConfigError(bad_value("prompt_tokens", cfg.prompt_tokens, limit, "lower it or max_length"))
    return {
        "iapt": {"bottleneck": cfg.iapt.bottleneck, "soft_tokens": cfg.iapt.num_soft_tokens},
        "lora": {"r": cfg.lora_r or max(1, round(budget / lora_unit(model, cfg.lora_targets)))},
        "prefix": {"tokens": cfg.prefix_tokens or max(1, round(budget / (two_l * d)))},
        "prefix-proj": {"tokens": p_proj, "hidden": cfg.prefix_proj_hidden or max(1, hidden)},
        "prompt": {"tokens": cfg.prompt_tokens or max(1, min(round(budget / d), room))},
    }


_PREPARED: dict[str, ClassificationTask] = {}  # this process's prepared tasks (a joblib worker prepares its own)


def task_env(cfg: Any, task: str) -> ClassificationTask:
    """:func:`prepare_task` once per process and configuration."""
    key = task + json.dumps(cfg.to_dict(), sort_keys=True, default=str)
    if key not in _PREPARED:
        if len(_PREPARED) >= 4:  # a bound for long-lived processes (tests) that see many configurations
            _PREPARED.pop(next(iter(_PREPARED)))
        _PREPARED[key] = prepare_task(cfg, task)
    return _PREPARED[key]
