"""A language-model training loop on ``accelerate``: device placement, mixed precision, DDP (``torchrun``/
``accelerate launch``), and checkpoint/resume through ``Accelerator.save_state``/``load_state``.

The loop is shared by every LM experiment; a method changes the model or passes its own ``loss_fn``
(``loss_fn(model, inputs, targets) -> scalar mean loss``), e.g. an output head that never materialises logits.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from leanfit.core.config import BaseConfig, option
from leanfit.core.errors import ConfigError, bad_value

if TYPE_CHECKING:
    import torch

    from leanfit.core.runs import RunDir

__all__ = ["TrainConfig", "TrainResult", "evaluate", "next_token_loss", "train_lm"]

LossFn = Callable[[Any, "torch.Tensor", "torch.Tensor"], "torch.Tensor"]


@dataclass
class TrainConfig(BaseConfig):
    steps: int = option(300, help="optimizer steps")
    batch_size: int = option(16, help="global batch size in sequences (split across processes)")
    seq_len: int = option(64, help="tokens per training sequence")
    lr: float = option(3e-3, help="peak learning rate (AdamW)", gt=0)
    min_lr_ratio: float = option(0.1, help="final learning rate as a fraction of the peak (cosine decay)")
    warmup_steps: int = option(30, help="linear warm-up steps")
    weight_decay: float = option(0.1, help="AdamW weight decay (matrices only)", ge=0)
    grad_clip: float = option(1.0, help="gradient-norm clip; 0 disables", ge=0)
    log_every: int = option(10, help="log training loss every N steps")
    eval_every: int = option(100, help="evaluate validation loss every N steps (and at the end)")
    eval_tokens: int = option(32768, help="validation tokens per evaluation")
    checkpoint_every: int = option(100, help="checkpoint every N steps; 0 disables (the run cannot resume)")
    keep_checkpoints: int = option(2, help="newest checkpoints kept on disk")
    device: str = option("auto", help="auto | cpu | cuda | cuda:N | mps")
    mixed_precision: Literal["no", "bf16", "fp16"] = option("no", help="accelerate mixed precision")
    threads: int = option(0, help="torch CPU threads; 0 = auto (1 for small models, see `leanfit bench threads`)")
    patience: int = option(0, help="stop when the validation loss has not improved for this many evaluations and "
                                   "restore the best weights (0: train every step)", ge=0)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "log_every", "eval_every", "eval_tokens", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(bad_value(f"train.{name}", getattr(self, name), "a positive integer"))
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(bad_value("train.min_lr_ratio", self.min_lr_ratio, "a number in [0, 1]"))
        if self.lr <= 0:
            raise ConfigError(bad_value("train.lr", self.lr, "a positive number such as 3e-3"))
        if self.checkpoint_every < 0 or self.warmup_steps < 0 or self.grad_clip < 0:
            raise ConfigError("train.checkpoint_every, warmup_steps and grad_clip must be >= 0")


@dataclass
class TrainResult:
    step: int
    val_loss: float
    train_loss: float
    tokens_per_s: float
    train_seconds: float
    resumed_from: int | None
    final_losses: dict[str, float]
    best_step: int = 0  # step of the best validation loss (the weights returned under ``patience``)
    stopped_early: bool = False


def next_token_loss(model: Any, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of an HF causal LM's logits (upcast to float32 first)."""
    import torch.nn.functional as F

    logits = model(input_ids=inputs).logits
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def _param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]


def _lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class _Best:
    """The best validation loss so far, its step, and (under ``patience``) its weights on disk for a resume."""

    def __init__(self, path: Any, patience: int) -> None:
        self.path, self.patience = path, patience
        self.loss, self.step, self.bad = math.inf, 0, 0
        self.weights: dict[str, Any] | None = None

    def state(self) -> dict[str, Any]:
        return {"best_loss": self.loss if math.isfinite(self.loss) else None, "best_step": self.step,
                "bad_evals": self.bad}

    def restore_state(self, state: dict[str, Any]) -> None:
        if state.get("best_loss") is not None:
            self.loss, self.step, self.bad = state["best_loss"], state["best_step"], state["bad_evals"]

    def update(self, step: int, loss: float, model: Any, acc: Any) -> bool:
        """Record an evaluation; True when training should stop."""
        from leanfit.core.io import atomic_save_tensors

        if loss < self.loss:
            self.loss, self.step, self.bad = loss, step, 0
            if self.patience:
                state = acc.unwrap_model(model).state_dict()
                self.weights = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
                if acc.is_main_process:
                    atomic_save_tensors(self.path, self.weights)
            return False
        self.bad += 1
        return bool(self.patience) and self.bad >= self.patience

    def load_into(self, model: Any, acc: Any) -> None:
        from safetensors.torch import load_file

        acc.wait_for_everyone()
        weights = self.weights if self.weights is not None else load_file(str(self.path))
        model.load_state_dict(weights)


def evaluate(accelerator: Any, model: Any, windows: torch.Tensor, loss_fn: LossFn, batch_size: int) -> float:
    """Mean next-token loss over ``windows`` (n, T+1), sharded across processes and reduced."""
    import torch

    rank, world = accelerator.process_index, accelerator.num_processes
    mine = windows[rank::world]
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    model.eval()
    with torch.no_grad():
        for chunk in mine.split(batch_size):
            chunk = chunk.to(accelerator.device)
            loss = loss_fn(model, chunk[:, :-1], chunk[:, 1:])
            n = chunk[:, 1:].numel()
            total += torch.tensor([loss.item() * n, n], dtype=torch.float64, device=accelerator.device)
    model.train()
    total = accelerator.reduce(total, reduction="sum")
    return (total[0] / total[1]).item()


def train_lm(
    model: Any,
    train_tokens: torch.Tensor,
    valid_tokens: torch.Tensor,
    cfg: TrainConfig,
    *,
    run: RunDir,
    seed: int,
    resume: bool,
    loss_fn: LossFn = next_token_loss,
    small_workload: bool = False,
    description: str = "training",
    final_eval: dict[str, torch.Tensor] | None = None,
) -> tuple[Any, TrainResult]:
    """Train ``model`` and return (unwrapped model, result). Logs to ``run``; checkpoints under it.

    ``final_eval`` maps a name to a token stream scored once after training (e.g. the test split); the losses
    land in ``result.final_losses``."""
    import torch
    from accelerate import Accelerator

    from leanfit.core.checkpoint import CheckpointManager
    from leanfit.core.device import configure_threads, resolve_device
    from leanfit.core.progress import notice, progress_bar
    from leanfit.studies.lm.data import eval_windows, train_batch

    configure_threads(cfg.threads, small_workload=small_workload)
    device = resolve_device(cfg.device)
    if device.type == "cpu" and cfg.mixed_precision == "fp16":
        raise ConfigError(bad_value("train.mixed_precision", "fp16", "'no' or 'bf16' on the CPU (fp16 autocast needs "
                                    "a GPU)", "use train.mixed_precision=bf16, or train.device=cuda"))
    acc = Accelerator(cpu=device.type == "cpu", mixed_precision=cfg.mixed_precision,
                      step_scheduler_with_optimizer=False)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    ckpt = CheckpointManager(run.checkpoint_dir, acc, keep=cfg.keep_checkpoints)
    windows = eval_windows(valid_tokens, cfg.seq_len, cfg.eval_tokens)

    start, train_seconds, resumed_from = 0, 0.0, None
    val_loss, train_loss = float("nan"), float("nan")
    loss_sum, loss_n = torch.zeros((), dtype=torch.float64), 0
    best = _Best(run.path / "best.safetensors", cfg.patience)
    if resume and (state := ckpt.load()) is not None:
        start = resumed_from = state["step"]
        train_seconds, loss_n = state["train_seconds"], state["loss_n"]
        loss_sum = torch.tensor(state["loss_sum"], dtype=torch.float64)
        best.restore_state(state)
    elif resume and (logged := run.metrics()):
        notice(f"--resume: no checkpoint under {str(ckpt.root)!r}; training {description!r} again from step 0 "
               f"(up to step {max(m.get('step', 0) for m in logged)} was logged)")
    run.truncate_metrics(start)  # records logged after the checkpoint (or before a first one) are redone
    tokens_per_step = cfg.batch_size * cfg.seq_len
    last = start
    with progress_bar(cfg.steps, description, enabled=acc.is_main_process, completed=start) as bar:
        for step in range(start + 1, cfg.steps + 1):
            t0 = time.perf_counter()
            batch = train_batch(train_tokens, step, cfg.batch_size, cfg.seq_len, seed,
                                acc.process_index, acc.num_processes).to(acc.device)
            with acc.autocast():
                loss = loss_fn(model, batch[:, :-1], batch[:, 1:])
            acc.backward(loss)
            if cfg.grad_clip:
                acc.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            train_seconds += time.perf_counter() - t0
            loss_sum += loss.detach().double().cpu()
            loss_n += 1
            if step % cfg.log_every == 0 or step == cfg.steps:
                mean = acc.reduce(loss_sum.to(acc.device), reduction="mean").item() / loss_n
                run.log(step, loss=mean, lr=scheduler.get_last_lr()[0],
                        tokens_per_s=step * tokens_per_step / max(train_seconds, 1e-9))
                bar.advance(0, loss=mean)
                train_loss, loss_sum, loss_n = mean, torch.zeros((), dtype=torch.float64), 0
            stop = False
            if step % cfg.eval_every == 0 or step == cfg.steps:
                val_loss = evaluate(acc, model, windows, loss_fn, cfg.batch_size)
                run.log(step, val_loss=val_loss, val_ppl=math.exp(val_loss))
                stop = best.update(step, val_loss, model, acc)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps and not stop:
                ckpt.save(step, {"train_seconds": train_seconds, "loss_sum": loss_sum.item(), "loss_n": loss_n,
                                 **best.state()})
            bar.advance(1)
            last = step
            if stop:
                notice(f"{description}: validation loss not improved for {cfg.patience} evaluations; stopped at "
                       f"step {step}, weights of step {best.step} restored")
                break
    if best.step and best.step != last and cfg.patience:
        best.load_into(acc.unwrap_model(model), acc)
        val_loss = best.loss
    rate = last * tokens_per_step / max(train_seconds, 1e-9)
    final = {
        name: evaluate(acc, model, eval_windows(tokens, cfg.seq_len, cfg.eval_tokens), loss_fn, cfg.batch_size)
        for name, tokens in (final_eval or {}).items()
    }
    result = TrainResult(last, val_loss, train_loss, rate, train_seconds, resumed_from, final,
                         best_step=best.step or last, stopped_early=last < cfg.steps)
    return acc.unwrap_model(model), result
