"""Training, evaluation and the job runs of the encoder study (the protocol is in
:mod:`leanfit.studies.iapt.experiment`): learning-rate grids on the first seed's validation split, then every seed
and ablation at the chosen rates."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from leanfit.core.device import device_name, resolve_device, synchronize
from leanfit.core.errors import LeanfitError
from leanfit.core.io import append_jsonl, atomic_save_tensors
from leanfit.core.parallel import run_jobs
from leanfit.core.progress import progress_bar
from leanfit.core.seed import derive_seed
from leanfit.studies.iapt.classifiers import build_classifier, count_trainable, iapt_config
from leanfit.studies.iapt.task import HEAD, ClassificationTask, Split, task_env

if TYPE_CHECKING:
    from leanfit.core.runner import RunContext
    from leanfit.studies.iapt.config import IAPTExperimentConfig

__all__ = ["Job", "RunSpec", "batch_indices", "choose_lrs", "evaluate", "final_runs", "make_accelerator", "make_optimizer", "run_classifiers", "train_loop"]


# --------------------------------------------------------------------------------------------------- training
def batch_indices(n: int, batch_size: int, steps: int, seed: int) -> list[Tensor]:
    """Index batches for ``steps`` steps: reshuffled epochs (a short last batch is dropped), fixed by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    size = min(batch_size, n)
    out: list[Tensor] = []
    while len(out) < steps:
        order = torch.randperm(n, generator=gen)
        out += list(order[: n - n % size].view(-1, size))
    return out[:steps]


def make_optimizer(module: nn.Module, lr: float, head_lr: float, steps: int, warmup_fraction: float,
               activation_lr_scale: float = 1.0) -> tuple[Any, Any]:
    """AdamW (no weight decay) with the head at ``head_lr`` and IAPT's rational coefficients (``.act.``) at
    ``activation_lr_scale * lr``; linear warm-up then linear decay to 0."""
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    head = [p for n, p in params if f"{HEAD}." in n]
    act = [p for n, p in params if f"{HEAD}." not in n and ".act." in n]
    adapter = [p for n, p in params if f"{HEAD}." not in n and ".act." not in n]
    groups = [g for g in ({"params": adapter, "lr": lr}, {"params": act, "lr": activation_lr_scale * lr},
                          {"params": head, "lr": head_lr}) if g["params"]]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    warm = round(warmup_fraction * steps)

    def factor(step: int) -> float:
        return (step + 1) / warm if step < warm else max(0.0, (steps - step) / max(1, steps - warm))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_loop(acc: Any, module: nn.Module, optimizer: Any, scheduler: Any, batches: Sequence[Any],
                loss_fn: Callable[[nn.Module, Any], Tensor], name: str, log: Path, max_grad_norm: float = 0.0,
                show_progress: bool = True) -> dict[str, Any]:
    """Run the optimizer over ``batches`` (gradient norm clipped to ``max_grad_norm`` when > 0); returns the
    training time (steps only, the device synchronised) and the loss curve's ends."""
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    seconds, losses = 0.0, []
    with progress_bar(len(batches), name, enabled=acc.is_main_process and show_progress) as bar:
        for step, batch in enumerate(batches):
            began = time.perf_counter()
            loss = loss_fn(module, batch)
            optimizer.zero_grad(set_to_none=True)
            acc.backward(loss)
            if max_grad_norm > 0:
                acc.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            scheduler.step()
            synchronize(acc.device)
            seconds += time.perf_counter() - began
            losses.append(loss.item())
            if acc.is_main_process:
                append_jsonl(log, {"step": step + 1, "loss": losses[-1]})
            bar.advance(1, loss=losses[-1])
    return {"train_seconds": seconds, "loss_first": losses[0], "loss_last": sum(losses[-5:]) / len(losses[-5:])}


def make_accelerator(device: str = "auto") -> Any:
    """An ``Accelerator`` on ``device`` (``auto``: the GPU when there is one); on CPU ``cpu=True``, which is what
    makes a ``torchrun`` launch data-parallel over processes (gloo)."""
    from accelerate import Accelerator

    return Accelerator(cpu=resolve_device(device).type == "cpu")


def _trainable_state(module: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}


def _load_trainable(module: nn.Module, path: Path) -> nn.Module:
    from safetensors.torch import load_file

    state = load_file(str(path))
    missing = set(_trainable_state(module)) - set(state)
    if missing:  # a run folder from another configuration or a damaged file: the run must be redone
        raise LeanfitError(f"{path} lacks {sorted(missing)[:3]} for this configuration; delete its run folder "
                           "(or start a new run) so that it is trained again")
    module.load_state_dict(state, strict=False)
    return module


@torch.no_grad()
def evaluate(module: nn.Module, split: Split, batch_size: int, num_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1 of ``module`` on ``split`` (batches of similar length, in eval mode)."""
    from sklearn.metrics import f1_score

    device = next(module.parameters()).device
    was_training = module.training
    module.eval()
    order = torch.argsort(split.attention_mask.sum(1))
    preds = torch.empty(len(split), dtype=torch.long)
    for i in range(0, len(split), batch_size):
        idx = order[i : i + batch_size]
        inputs = {k: v.to(device) for k, v in split.inputs(idx).items()}
        preds[idx] = module(**inputs).argmax(-1).cpu()
    module.train(was_training)
    labels = split.labels
    f1 = f1_score(labels.numpy(), preds.numpy(), average="macro", labels=list(range(num_labels)), zero_division=0)
    return {"accuracy": float((preds == labels).double().mean()), "macro_f1": float(f1)}


@dataclass(frozen=True)
class RunSpec:
    """One trained classifier: (task, method, setting, adapter learning rate, seed)."""

    task: str
    method: str
    setting: str
    lr: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.task}-{self.method}-{self.setting}-lr{self.lr:g}-s{self.seed}"


def _train_classifier(ctx: RunContext[IAPTExperimentConfig], task: ClassificationTask, spec: RunSpec, validate: bool,
                      show_progress: bool = True) -> dict[str, Any]:
    """Train (or reuse) one classifier: ``result.json`` (record) and ``trainable.safetensors`` in its folder."""
    import torch.nn.functional as F

    cfg = task.cfg
    subrun = ctx.run.subrun(spec.name)
    if (done := subrun.stored()) is not None:
        return done
    sub = subrun.path
    (sub / "losses.jsonl").unlink(missing_ok=True)
    module = build_classifier(task, spec.method, spec.setting, spec.seed)
    counts = count_trainable(module)
    torch.manual_seed(derive_seed(spec.seed, spec.name, "dropout"))  # a resumed run redraws the same masks
    acc = make_accelerator(cfg.device)
    optimizer, scheduler = make_optimizer(module, spec.lr, cfg.head_lr, cfg.steps, cfg.warmup_fraction,
                                      cfg.activation_lr_scale)
    model, optimizer = acc.prepare(module, optimizer)
    train = task.splits["train"]
    shard = slice(acc.process_index, None, acc.num_processes)  # this process's rows of every batch
    order = batch_indices(len(train), cfg.batch_size, cfg.steps, derive_seed(spec.seed, task.name, "batches"))
    batches = [idx[shard] for idx in order]

    def loss_fn(m: nn.Module, idx: Tensor) -> Tensor:
        inputs = {k: v.to(acc.device) for k, v in train.inputs(idx).items()}
        return F.cross_entropy(m(**inputs), train.labels[idx].to(acc.device))

    record = {"name": spec.name, **dataclasses.asdict(spec), **counts, "size": _size(task, spec),
              "steps": cfg.steps, "batch_size": cfg.batch_size, "processes": acc.num_processes,
              "train_device": device_name(acc.device), "jobs": cfg.workers(),
              "max_grad_norm": cfg.max_grad_norm}
    record.update(train_loop(acc, model, optimizer, scheduler, batches, loss_fn, spec.name, sub / "losses.jsonl",
                              cfg.max_grad_norm, show_progress))
    module = acc.unwrap_model(model)
    if validate:
        val = evaluate(module, task.splits["valid"], cfg.eval_batch, task.num_labels)
        record.update(val_accuracy=val["accuracy"], val_macro_f1=val["macro_f1"])
    if acc.is_main_process:
        atomic_save_tensors(sub / "trainable.safetensors", _trainable_state(module))
    subrun.store(record)
    acc.wait_for_everyone()
    return record


def _size(task: ClassificationTask, spec: RunSpec) -> dict[str, int]:
    if spec.method != "iapt":
        return task.sizes[spec.method]
    icfg = iapt_config(task.cfg, spec.setting)
    return {"bottleneck": icfg.bottleneck, "soft_tokens": icfg.num_soft_tokens}


def _score(ctx: RunContext[IAPTExperimentConfig], task: ClassificationTask, spec: RunSpec) -> dict[str, Any]:
    """Test scores of a trained classifier (``test.json`` beside its training record; computed once)."""
    subrun = ctx.run.subrun(spec.name, file="test.json")
    if (done := subrun.stored()) is not None:
        return done
    module = _load_trainable(build_classifier(task, spec.method, spec.setting, spec.seed),
                             subrun.path / "trainable.safetensors")
    module.to(resolve_device(task.cfg.device))
    began = time.perf_counter()
    test = evaluate(module, task.splits["test"], task.cfg.eval_batch, task.num_labels)
    result = {"test_accuracy": test["accuracy"], "test_macro_f1": test["macro_f1"],
              "test_seconds": time.perf_counter() - began, "test_examples": len(task.splits["test"])}
    return subrun.store(result)




@dataclass(frozen=True)
class Job:
    """One classifier to train (or reuse): validated (a rate-grid run) and/or scored on test."""

    spec: RunSpec
    validate: bool = False
    score: bool = False


def _run_job(ctx: RunContext[IAPTExperimentConfig], job: Job, show_progress: bool = True) -> dict[str, Any]:
    from leanfit.core.device import configure_threads

    configure_threads(ctx.config.threads, small_workload=True)  # again: joblib workers start with torch's default
    task = task_env(ctx.config, job.spec.task)
    record = _train_classifier(ctx, task, job.spec, job.validate, show_progress)
    return {**record, **_score(ctx, task, job.spec)} if job.score else record


def run_classifiers(ctx: RunContext[IAPTExperimentConfig], jobs: Sequence[Job], title: str) -> list[dict[str, Any]]:
    """The records of ``jobs`` in order; ``cfg.workers()`` classifiers at once through joblib when ``cfg.jobs != 1``."""
    cfg = ctx.config
    return run_jobs(partial(_run_job, ctx, show_progress=False), jobs, **cfg.job_options(),
                    desc=f"{title}: {len(jobs)} classifiers, {cfg.workers()} at once", serial_fn=partial(_run_job, ctx),
                    postfix=lambda r: {"last": r["name"]})


def choose_lrs(ctx: RunContext[IAPTExperimentConfig]) -> tuple[dict[tuple[str, str], float], list[dict[str, Any]]]:
    """Train the first seed at every rate of each (task, method) grid and keep the best validation accuracy (ties:
    higher macro-F1, then the smaller rate). A one-rate grid is taken as is (no validation run).
    Returns ({(task, method): rate}, sweep rows)."""
    cfg = ctx.config
    seed = cfg.seeds[0]
    jobs = [Job(RunSpec(task, method, "main", lr, seed), validate=len(cfg.lrs.grid(method)) > 1)
            for task in cfg.tasks for method in cfg.methods for lr in cfg.lrs.grid(method)]
    records = run_classifiers(ctx, jobs, "rate grids")
    chosen: dict[tuple[str, str], float] = {}
    rows: list[dict[str, Any]] = []
    for task in cfg.tasks:
        for method in cfg.methods:
            group = [r for job, r in zip(jobs, records, strict=True) if (job.spec.task, job.spec.method) == (task, method)]
            best = max(group, key=lambda r: (r.get("val_accuracy", 0.0), r.get("val_macro_f1", 0.0), -r["lr"]))
            chosen[task, method] = best["lr"]
            rows += [{"task": task, "method": method, "lr": r["lr"], "val_accuracy": r.get("val_accuracy"),
                      "val_macro_f1": r.get("val_macro_f1"), "chosen": r is best} for r in group]
    return chosen, rows


def final_runs(ctx: RunContext[IAPTExperimentConfig], rates: dict[tuple[str, str], float]) -> list[dict[str, Any]]:
    """Every method at its chosen rate and every IAPT ablation at IAPT's, on every seed, scored on test once."""
    cfg = ctx.config
    specs = []
    for task in cfg.tasks:
        specs += [RunSpec(task, method, "main", rates[task, method], seed) for method in cfg.methods
                  for seed in cfg.seeds]
        specs += [RunSpec(task, "iapt", setting, rates[task, "iapt"], seed) for setting in cfg.ablations
                  for seed in cfg.seeds]
    return run_classifiers(ctx, [Job(spec, score=True) for spec in specs], "seeds and ablations")
