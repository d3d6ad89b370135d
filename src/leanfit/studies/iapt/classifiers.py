"""The encoder study's methods at matched budgets: every method is an ``nn.Module`` ``forward(input_ids,
attention_mask, token_type_ids) -> logits`` (B, C) around a fresh copy of the encoder, built by
:func:`build_classifier`; :func:`count_trainable` counts its trainable parameters (head = the ``classifier`` module).

PEFT prefix tuning on BERT: PEFT 0.21's sequence-classification forward refuses the model ("Model does not
support past key values"), because it looks for a ``past_key_values`` argument in the signature of the backbone's
``forward``, which transformers 5 renamed to ``cache``. :class:`PrefixClassifier` therefore keeps PEFT's prefix
encoder and ``get_prompt`` (the method's parameters and their layout) and does the call PEFT would make itself:
the per-layer key/value prefix as the cache, the attention mask extended by the prefix length. PEFT prompt tuning
and LoRA run through PEFT's own forward; with prompt tuning BERT's pooled output is taken at the first virtual
token (PEFT prepends the prompt before [CLS]).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from leanfit.core.seed import derive_seed
from leanfit.iapt.config import IAPTConfig
from leanfit.studies.iapt.config import ABLATIONS
from leanfit.studies.iapt.task import HEAD, ClassificationTask

__all__ = ["IAPTClassifier", "PeftClassifier", "PrefixClassifier", "build_classifier", "count_trainable", "iapt_config"]


# --------------------------------------------------------------------------------------------------- budgets
def count_trainable(module: nn.Module) -> dict[str, int]:
    """Trainable parameters of ``module``: all, the head's (``classifier``) and the adapter's (the rest)."""
    trainable = [(n, p.numel()) for n, p in module.named_parameters() if p.requires_grad]
    head = sum(c for n, c in trainable if f"{HEAD}." in n or n.startswith(HEAD))
    total = sum(c for _, c in trainable)
    return {"trainable_params": total, "head_params": head, "adapter_params": total - head}


def iapt_config(cfg: Any, setting: str) -> IAPTConfig:
    """The experiment's IAPT config with the ablation ``setting`` applied (``main``: unchanged)."""
    return cfg.iapt if setting == "main" else dataclasses.replace(cfg.iapt, **ABLATIONS[setting])


# --------------------------------------------------------------------------------------------------- methods
class PeftClassifier(nn.Module):
    """A PEFT sequence-classification model (LoRA, prompt tuning) as ``(ids, mask, types) -> logits``."""

    def __init__(self, peft_model: nn.Module) -> None:
        super().__init__()
        self.peft = peft_model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor) -> Tensor:
        return self.peft(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits


class PrefixClassifier(nn.Module):
    """PEFT prefix tuning on a BERT-style classifier, called the way PEFT's own forward would (module docstring)."""

    def __init__(self, peft_model: nn.Module) -> None:
        super().__init__()
        self.peft = peft_model
        backbone = peft_model.get_base_model().base_model
        self._cache_arg = "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor) -> Tensor:
        b = input_ids.shape[0]
        prefix = self.peft.peft_config[self.peft.active_adapter].num_virtual_tokens
        mask = torch.cat([attention_mask.new_ones(b, prefix), attention_mask], dim=1)
        model = self.peft.get_base_model()
        return model(input_ids=input_ids, attention_mask=mask, token_type_ids=token_type_ids,
                     **{self._cache_arg: self.peft.get_prompt(b)}).logits


class IAPTClassifier(nn.Module):
    """An :class:`~leanfit.iapt.model.IAPTModel` classifier; the whole input is the instruction."""

    def __init__(self, iapt_model: nn.Module) -> None:
        super().__init__()
        self.iapt = iapt_model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor) -> Tensor:
        return self.iapt(input_ids, attention_mask, instruction_mask=attention_mask.bool(),
                         token_type_ids=token_type_ids).logits


def _build_iapt(model: nn.Module, task: ClassificationTask, setting: str) -> nn.Module:
    from leanfit.iapt.model import get_iapt_model

    wrapped = get_iapt_model(model, iapt_config(task.cfg, setting))
    model.get_submodule(HEAD).requires_grad_(True)
    return IAPTClassifier(wrapped)


def _build_lora(model: nn.Module, task: ClassificationTask, setting: str) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    r = task.sizes["lora"]["r"]
    config = LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=2 * r, target_modules=list(task.cfg.lora_targets))
    return PeftClassifier(get_peft_model(model, config))


def _build_prefix(model: nn.Module, task: ClassificationTask, setting: str, project: bool = False) -> nn.Module:
    from peft import PrefixTuningConfig, get_peft_model

    size = task.sizes["prefix-proj" if project else "prefix"]
    config = PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=size["tokens"], prefix_projection=project,
                                encoder_hidden_size=size.get("hidden", model.config.hidden_size))
    return PrefixClassifier(get_peft_model(model, config))


def _build_prompt(model: nn.Module, task: ClassificationTask, setting: str) -> nn.Module:
    from peft import PromptTuningConfig, get_peft_model

    config = PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=task.sizes["prompt"]["tokens"],
                                prompt_tuning_init="SAMPLE_VOCAB")
    return PeftClassifier(get_peft_model(model, config))


_BUILDERS: dict[str, Callable[[nn.Module, ClassificationTask, str], nn.Module]] = {
    "iapt": _build_iapt, "lora": _build_lora, "prefix": _build_prefix,
    "prefix-proj": lambda m, t, s: _build_prefix(m, t, s, project=True), "prompt": _build_prompt,
}


def _init_head(model: nn.Module, seed: int) -> None:
    """Re-initialise the head (normal weights with the model's ``initializer_range``, zero biases) from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    std = getattr(model.config, "initializer_range", 0.02)
    with torch.no_grad():
        for m in model.get_submodule(HEAD).modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * std)
                if m.bias is not None:
                    m.bias.zero_()


def build_classifier(task: ClassificationTask, method: str, setting: str, seed: int) -> nn.Module:
    """A fresh copy of the encoder with ``method`` (``setting``: ``main`` or an IAPT ablation); the head is
    initialised from ``seed`` alone (the same for every method), the adapter from (seed, task, method)."""
    model = copy.deepcopy(task.base)
    _init_head(model, derive_seed(seed, task.name, "head"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, task.name, method, "init"))
        return _BUILDERS[method](model, task, setting)



