"""``transformers.Trainer`` for an :class:`~leanfit.iapt.model.IAPTModel`: saves and restores the adapters only.

The plain Trainer saves any model that is not a ``PreTrainedModel`` or a PEFT model as its whole ``state_dict()``,
frozen backbone included, in ``model.safetensors``. :class:`IAPTTrainer` writes ``save_model(out)`` and every
checkpoint in the :meth:`IAPTModel.save_pretrained` format instead (``out/<adapter>/adapter_config.json`` and
``adapter_model.safetensors``, loadable with :meth:`IAPTModel.from_pretrained`), beside the tokenizer and
``training_args.bin`` as the Trainer writes them. ``resume_from_checkpoint`` and ``load_best_model_at_end`` read
the adapters back into the trained model.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from leanfit.core.errors import ConfigError, bad_value
from leanfit.iapt.model import IAPTModel

__all__ = ["IAPTTrainer"]

TRAINING_ARGS_NAME = "training_args.bin"  # transformers.trainer's name for the saved TrainingArguments


class IAPTTrainer(Trainer):
    """A ``transformers.Trainer`` whose ``save_model``, checkpoints, resumption and best-model loading handle the
    IAPT adapters only (see the module docstring); training itself is the plain Trainer's."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.model is not None:  # None only with model_init: checked when saving
            self._iapt_model()

    def _iapt_model(self, model: nn.Module | None = None) -> IAPTModel:
        unwrapped = self.accelerator.unwrap_model(self.model if model is None else model, keep_torch_compile=False)
        if not isinstance(unwrapped, IAPTModel):
            raise TypeError(bad_value("model", type(unwrapped).__name__, "an IAPTModel",
                                      "wrap the backbone with get_iapt_model(), or use transformers.Trainer"))
        return unwrapped

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        folder = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        if folder is None:
            raise ConfigError(bad_value("output_dir", None, "a folder to save the adapters in",
                                        "pass save_model(output_dir) or set TrainingArguments.output_dir"))
        os.makedirs(folder, exist_ok=True)
        # a state_dict comes from DeepSpeed / FSDP gathers: the adapters' tensors are taken from it
        self._iapt_model().save_pretrained(folder, state_dict=state_dict)
        tokenizer = self.processing_class
        if tokenizer is None:
            tokenizer = getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        torch.save(self.args, os.path.join(folder, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        self._iapt_model(model)._reload_weights(resume_from_checkpoint)

    def _load_best_model(self) -> None:  # the Trainer calls it only once a best checkpoint is recorded
        self._iapt_model()._reload_weights(str(self.state.best_model_checkpoint))
