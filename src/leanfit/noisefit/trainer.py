"""NoiseFiT and R-Drop as ``transformers.Trainer`` subclasses.

:class:`NoiseFiTTrainer` swaps the training loss for :func:`~leanfit.noisefit.loss.noisefit_loss`; a
:class:`NoiseFiTCallback` calibrates (when the config asks for it), attaches the noise hooks at train begin and
removes them at train end, so evaluation, ``generate()`` and everything after ``train()`` see the bare model.
The same loss override is mixed into TRL's ``SFTTrainer`` as ``NoiseFiTSFTTrainer`` (built on first access, TRL
is optional). :class:`RDropTrainer` is the R-Drop baseline (two dropout passes + symmetric KL); the other
baselines need no code: NEFTune is ``TrainingArguments(neftune_noise_alpha=...)``, label smoothing
``TrainingArguments(label_smoothing_factor=...)``.

Loss scaling follows the plain Trainer's: when the model takes loss kwargs the Trainer passes
``num_items_in_batch`` (completion tokens of the whole accumulated batch, summed over processes) and both losses
divide by it, times the process count under ``average_tokens_across_devices``, and the Trainer does not divide
by the accumulation steps; otherwise they are per-micro-batch means and the Trainer divides. The ``paper_v1`` loss
is always a per-micro-batch mean (the reference's): where the Trainer passed a token count, and so will not divide,
it is divided by the accumulation steps here.

The terms logged beside the Trainer's ``loss`` (``noisefit/ce``, ``noisefit/soft``, ``noisefit/consistency``,
unweighted) are reduced as it reduces that loss: each micro-batch's term is scaled as its loss is (so the
micro-batches of an optimizer step add up to the step's value, whatever the accumulation), the steps since the
last log are averaged, and so are the processes. With the token-count normaliser the logged CE is therefore the
completion-token mean of the whole accumulated batch, the same at every gradient accumulation setting.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from transformers import Trainer, TrainerCallback

from leanfit.core.errors import ConfigError, bad_value
from leanfit.noisefit.config import NoiseFiTConfig, check_real

if TYPE_CHECKING:
    from leanfit.noisefit.config import CalibrationResult
    from leanfit.noisefit.injector import NoiseInjector

    _MixinBase = Trainer  # the checker sees the Trainer API the mixin relies on; at run time the mixin is plain
else:
    _MixinBase = object

__all__ = ["NoiseFiTCallback", "NoiseFiTMixin", "NoiseFiTTrainer", "RDropTrainer"]

_PARTS = ("ce", "soft", "consistency")


class NoiseFiTCallback(TrainerCallback):
    """Attaches a :class:`NoiseInjector` to the trainer's model for the duration of ``train()``.

    On train begin: layers and per-layer scales come from :func:`calibrate` on the first ``config.calib_batches``
    batches of the train dataloader (explicit layers with ``calibration="snr"`` skip it: all at ``rel_noise``);
    the result is kept in ``trainer.calibration``. On train end (also when training stops early) the hooks are
    removed. It also counts the optimizer steps whose loss terms :meth:`NoiseFiTMixin.log` averages.
    """

    def __init__(self, trainer: NoiseFiTMixin) -> None:
        if not isinstance(trainer, NoiseFiTMixin):
            raise TypeError(bad_value("trainer", type(trainer).__name__, "a NoiseFiTTrainer (or another trainer with "
                                      "NoiseFiTMixin)", "NoiseFiTTrainer adds this callback itself"))
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._noisefit_sums, self.trainer._noisefit_steps = None, 0
        self.trainer._attach_noise()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._noisefit_steps += 1

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._detach_noise()


def _token_count(trainer: Any, num_items_in_batch: Any) -> Any:
    """The normaliser to hand to the loss: the Trainer's token count where it scales like its own loss, else None."""
    return num_items_in_batch if getattr(trainer, "model_accepts_loss_kwargs", False) else None


def _as_trainer_scales(trainer: Any, loss: Any, num_items: Any) -> Any:
    """Undo the Trainer's gradient averaging over processes for a loss divided by the all-process token count."""
    if num_items is not None and trainer.args.average_tokens_across_devices:
        return loss * trainer.accelerator.num_processes
    return loss


class NoiseFiTMixin(_MixinBase):
    """The NoiseFiT loss for any ``transformers.Trainer`` subclass (mix in before the Trainer class)."""

    def __init__(self, *args: Any, noisefit_config: NoiseFiTConfig | None = None,
                 calibration_batches: Iterable[Mapping[str, Any]] | None = None, **kwargs: Any) -> None:
        config = NoiseFiTConfig() if noisefit_config is None else noisefit_config
        if not isinstance(config, NoiseFiTConfig):
            raise TypeError(bad_value("noisefit_config", type(config).__name__, "a NoiseFiTConfig",
                                      "build one with NoiseFiTConfig(...)"))
        batches = calibration_batches
        if batches is not None and (isinstance(batches, Mapping | str | bytes) or not isinstance(batches, Iterable)):
            shown = type(batches).__name__ if isinstance(batches, Mapping) else batches
            raise TypeError(bad_value("calibration_batches", shown, "an iterable of batch dicts, or None for the "
                                      "train dataloader", "wrap a single batch in a list: [batch]"))
        super().__init__(*args, **kwargs)
        self.noisefit_config = config
        self.calibration_batches = calibration_batches
        self.injector: NoiseInjector | None = None
        self.calibration: CalibrationResult | None = None
        self._noisefit_sums: torch.Tensor | None = None  # (3,) the terms since the last log, scaled as the loss
        self._noisefit_steps = 0  # optimizer steps since the last log
        self.add_callback(NoiseFiTCallback(self))

    # -- hooks lifetime --------------------------------------------------------------------------------------
    def _attach_noise(self) -> None:
        from leanfit.noisefit.calibration import calibrate
        from leanfit.noisefit.injector import NoiseInjector

        if self.injector is not None:
            return
        cfg = self.noisefit_config
        model = self.accelerator.unwrap_model(self.model)
        if cfg.layer_spec().kind == "explicit" and cfg.calibration_method() == "snr":
            self.injector = NoiseInjector(model, cfg)  # explicit layers, every one at rel_noise
            return
        self.calibration = calibrate(model, self._calibration_batches(), cfg)
        self.injector = NoiseInjector.from_calibration(model, cfg, self.calibration)

    def _detach_noise(self) -> None:
        if self.injector is not None:
            self.injector.remove()
            self.injector = None

    def _calibration_batches(self) -> list[dict[str, torch.Tensor]]:
        n = self.noisefit_config.calib_batches
        source = self.calibration_batches if self.calibration_batches is not None else self.get_train_dataloader()
        device = self.accelerator.device
        batches = []
        for batch in source:
            batches.append({k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()})
            if len(batches) == n:
                break
        if not batches:
            raise ConfigError(bad_value("calibration_batches", "an empty iterable", f"{n} batch(es) of training data",
                                        "pass training batches or a non-empty train_dataset"))
        return batches

    # -- loss --------------------------------------------------------------------------------------------------
    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        from leanfit.noisefit.loss import noisefit_loss

        if self.injector is None or not model.training:  # evaluation: the plain loss, never noisy
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        cfg, num_items = self.noisefit_config, _token_count(self, num_items_in_batch)
        out = noisefit_loss(model, inputs, self.injector, cfg, num_items_in_batch=None if cfg.paper_v1 else num_items)
        if cfg.paper_v1:  # a per-micro-batch mean, but a Trainer that passed a token count will not average it
            loss = out.loss if num_items is None else out.loss / self._accumulation_steps()
            num_items = None
        else:
            loss = _as_trainer_scales(self, out.loss, num_items)
        out = out._replace(loss=loss)
        self._add_parts(out, num_items)
        return (out.loss, {"logits": out.logits_clean}) if return_outputs else out.loss

    def _accumulation_steps(self) -> int:
        """Micro-batches of the current optimizer step (the Trainer sets it per step; 1 outside ``train()``)."""
        return getattr(self, "current_gradient_accumulation_steps", 1)

    def _add_parts(self, out: Any, num_items: Any) -> None:
        """Adds the micro-batch's terms, scaled as the loss the Trainer accumulates for logging: divided by the
        all-process token count (times the process count, see :func:`_as_trainer_scales`), or per-micro-batch
        means divided by the accumulation steps; either way one optimizer step adds up to its own value."""
        parts = torch.stack([getattr(out, k).detach().float() for k in _PARTS])
        parts = _as_trainer_scales(self, parts, num_items)
        if num_items is None:
            parts = parts / self._accumulation_steps()
        self._noisefit_sums = parts if self._noisefit_sums is None else self._noisefit_sums + parts

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Adds ``noisefit/ce|soft|consistency`` to the Trainer's training logs (those with ``loss``): the mean over
        the optimizer steps since the last such log and over the processes, as the Trainer reduces ``loss``."""
        if "loss" in logs and self._noisefit_sums is not None and self._noisefit_steps > 0:
            logs = {**logs, **self._logged_parts(self._noisefit_sums)}
        super().log(logs, *args, **kwargs)

    def _logged_parts(self, sums: torch.Tensor) -> dict[str, float]:
        """The accumulated terms ``sums`` (3,) averaged over steps and processes (a collective: every process logs
        together, as for the Trainer's own loss); resets the accumulators."""
        per_process = self.accelerator.gather(sums[None]).reshape(-1, len(_PARTS))  # (processes, 3)
        means = (per_process.mean(0) / self._noisefit_steps).tolist()
        self._noisefit_sums, self._noisefit_steps = None, 0
        return {f"noisefit/{k}": float(v) for k, v in zip(_PARTS, means, strict=True)}


class NoiseFiTTrainer(NoiseFiTMixin, Trainer):
    """``transformers.Trainer`` with the NoiseFiT loss: ``NoiseFiTTrainer(model, args, train_dataset=...,
    noisefit_config=NoiseFiTConfig(...))``. Works with PEFT models (only the adapters train) and under
    ``accelerate launch``/``torchrun`` like the plain Trainer."""


class RDropTrainer(Trainer):
    """R-Drop baseline: CE on two dropout passes (packed in one batch) + ``rdrop_alpha`` x symmetric KL.

    The model needs dropout for R-Drop to do anything (e.g. ``attention_dropout`` of a Llama config)."""

    def __init__(self, *args: Any, rdrop_alpha: float = 1.0, **kwargs: Any) -> None:
        check_real("rdrop_alpha", rdrop_alpha, ge=0, fix="R-Drop papers use 0.3 to 5")
        super().__init__(*args, **kwargs)
        self.rdrop_alpha = rdrop_alpha

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        from leanfit.noisefit.loss import rdrop_loss

        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        num_items = _token_count(self, num_items_in_batch)
        out = rdrop_loss(model, inputs, self.rdrop_alpha, num_items_in_batch=num_items)
        loss = _as_trainer_scales(self, out.loss, num_items)
        return (loss, {"logits": out.logits}) if return_outputs else loss


def __getattr__(name: str) -> Any:
    if name == "NoiseFiTSFTTrainer":  # TRL is optional: build the class on first access
        from trl import SFTTrainer

        cls = type("NoiseFiTSFTTrainer", (NoiseFiTMixin, SFTTrainer), {
            "__doc__": "TRL ``SFTTrainer`` with the NoiseFiT loss (same arguments plus ``noisefit_config``).",
            "__module__": __name__,
        })
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
