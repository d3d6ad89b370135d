"""Training and evaluation behind ``leanfit run iapt`` (the protocol is in :mod:`leanfit.studies.iapt.experiment`).

Classification: every method is an ``nn.Module`` ``forward(input_ids, attention_mask, token_type_ids) -> logits``
(B, C) around a fresh copy of the encoder, built by :func:`build_classifier`; :func:`count_trainable` counts its
trainable parameters (head = the ``classifier`` module). Decoder: ``forward(input_ids, attention_mask,
instruction_mask, labels) -> loss`` and ``new_tokens(...)`` for greedy headlines, ROUGE-L by :func:`rouge_l`.

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
import json
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from leanfit.core.device import device_name, resolve_device, synchronize
from leanfit.core.errors import ConfigError, LeanfitError, MissingDependencyError, bad_value
from leanfit.core.io import append_jsonl, atomic_save_tensors, atomic_write_json, atomic_write_text, read_json
from leanfit.core.progress import progress_bar
from leanfit.core.seed import derive_seed
from leanfit.studies.data.labelled import LabelledText
from leanfit.iapt.config import IAPTConfig
from leanfit.iapt.generator import iapt_parameter_count

__all__ = ["ClassificationTask", "HeadlineExample", "HeadlineLM", "IAPTClassifier", "IAPTHeadlineLM", "PeftClassifier",
           "Job", "PrefixClassifier", "RunSpec", "Split", "build_classifier", "choose_lrs", "count_trainable",
           "evaluate", "final_runs", "headline_examples", "iapt_config", "lora_unit", "matched_sizes", "prepare_task",
           "rouge_l", "run_decoder", "run_jobs", "task_env"]  # fmt: skip

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
                "token_type_ids": self.token_type_ids[idx, :width]}  # fmt: skip


def _sample(data: LabelledText, cap: int, seed: int = 0) -> LabelledText:
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


def _labelled(task: str) -> LabelledText:
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
    from leanfit.studies.models.pretrained import load_pretrained

    data = _labelled(task)
    parts = data.split(cfg.valid_fraction, cfg.test_fraction)
    caps = {"train": cfg.max_train, "valid": cfg.max_valid, "test": cfg.max_test}
    model, tokenizer = load_pretrained(cfg.encoder, model_class="AutoModelForSequenceClassification",
                                       num_labels=len(data.label_names))  # fmt: skip
    model.eval().requires_grad_(False)
    splits = {name: _encode(tokenizer, _sample(parts[name], caps[name]), cfg.max_length) for name in caps}
    hidden, layers = model.config.hidden_size, model.config.num_hidden_layers
    budget = iapt_parameter_count(hidden, layers, cfg.iapt)
    return ClassificationTask(task, cfg, model, tokenizer, splits, data.label_names, budget,
                              matched_sizes(cfg, model, budget))  # fmt: skip


# --------------------------------------------------------------------------------------------------- budgets
def lora_unit(model: nn.Module, targets: Sequence[str]) -> int:
    """LoRA parameters per unit of rank: the sum of ``in + out`` over the Linear layers named in ``targets``."""
    unit = sum(m.in_features + m.out_features for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets)  # fmt: skip
    if not unit:
        raise ConfigError(bad_value("lora_targets", list(targets), "names of Linear modules of the model",
                                    "BERT: query, key, value; Llama: q_proj, k_proj, v_proj, o_proj"))  # fmt: skip
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


def count_trainable(module: nn.Module) -> dict[str, int]:
    """Trainable parameters of ``module``: all, the head's (``classifier``) and the adapter's (the rest)."""
    trainable = [(n, p.numel()) for n, p in module.named_parameters() if p.requires_grad]
    head = sum(c for n, c in trainable if f"{HEAD}." in n or n.startswith(HEAD))
    total = sum(c for _, c in trainable)
    return {"trainable_params": total, "head_params": head, "adapter_params": total - head}


def iapt_config(cfg: Any, setting: str) -> IAPTConfig:
    """The experiment's IAPT config with the ablation ``setting`` applied (``main``: unchanged)."""
    from leanfit.studies.iapt.experiment import ABLATIONS

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
                     **{self._cache_arg: self.peft.get_prompt(b)}).logits  # fmt: skip


class IAPTClassifier(nn.Module):
    """An :class:`~leanfit.iapt.model.IAPTModel` classifier; the whole input is the instruction."""

    def __init__(self, iapt_model: nn.Module) -> None:
        super().__init__()
        self.iapt = iapt_model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor) -> Tensor:
        return self.iapt(input_ids, attention_mask, instruction_mask=attention_mask.bool(),
                         token_type_ids=token_type_ids).logits  # fmt: skip


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
                                encoder_hidden_size=size.get("hidden", model.config.hidden_size))  # fmt: skip
    return PrefixClassifier(get_peft_model(model, config))


def _build_prompt(model: nn.Module, task: ClassificationTask, setting: str) -> nn.Module:
    from peft import PromptTuningConfig, get_peft_model

    config = PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=task.sizes["prompt"]["tokens"],
                                prompt_tuning_init="SAMPLE_VOCAB")  # fmt: skip
    return PeftClassifier(get_peft_model(model, config))


_BUILDERS: dict[str, Callable[[nn.Module, ClassificationTask, str], nn.Module]] = {
    "iapt": _build_iapt, "lora": _build_lora, "prefix": _build_prefix,
    "prefix-proj": lambda m, t, s: _build_prefix(m, t, s, project=True), "prompt": _build_prompt,
}  # fmt: skip


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


# --------------------------------------------------------------------------------------------------- training
def _batches(n: int, batch_size: int, steps: int, seed: int) -> list[Tensor]:
    """Index batches for ``steps`` steps: reshuffled epochs (a short last batch is dropped), fixed by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    size = min(batch_size, n)
    out: list[Tensor] = []
    while len(out) < steps:
        order = torch.randperm(n, generator=gen)
        out += list(order[: n - n % size].view(-1, size))
    return out[:steps]


def _optimizer(module: nn.Module, lr: float, head_lr: float, steps: int, warmup_fraction: float,
               activation_lr_scale: float = 1.0) -> tuple[Any, Any]:  # fmt: skip
    """AdamW (no weight decay) with the head at ``head_lr`` and IAPT's rational coefficients (``.act.``) at
    ``activation_lr_scale * lr``; linear warm-up then linear decay to 0."""
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    head = [p for n, p in params if f"{HEAD}." in n]
    act = [p for n, p in params if f"{HEAD}." not in n and ".act." in n]
    adapter = [p for n, p in params if f"{HEAD}." not in n and ".act." not in n]
    groups = [g for g in ({"params": adapter, "lr": lr}, {"params": act, "lr": activation_lr_scale * lr},
                          {"params": head, "lr": head_lr}) if g["params"]]  # fmt: skip
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    warm = round(warmup_fraction * steps)

    def factor(step: int) -> float:
        return (step + 1) / warm if step < warm else max(0.0, (steps - step) / max(1, steps - warm))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _train_loop(acc: Any, module: nn.Module, optimizer: Any, scheduler: Any, batches: Sequence[Any],
                loss_fn: Callable[[nn.Module, Any], Tensor], name: str, log: Path, max_grad_norm: float = 0.0,
                show_progress: bool = True) -> dict[str, Any]:  # fmt: skip
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


def _accelerator(device: str = "auto") -> Any:
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


def _train_classifier(ctx: Any, task: ClassificationTask, spec: RunSpec, validate: bool,
                      show_progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """Train (or reuse) one classifier: ``result.json`` (record) and ``trainable.safetensors`` in its folder."""
    import torch.nn.functional as F

    cfg = task.cfg
    sub = ctx.run.path / "runs" / spec.name
    if (sub / "result.json").exists():
        return read_json(sub / "result.json")
    sub.mkdir(parents=True, exist_ok=True)
    (sub / "losses.jsonl").unlink(missing_ok=True)
    module = build_classifier(task, spec.method, spec.setting, spec.seed)
    counts = count_trainable(module)
    torch.manual_seed(derive_seed(spec.seed, spec.name, "dropout"))  # a resumed run redraws the same masks
    acc = _accelerator(cfg.device)
    optimizer, scheduler = _optimizer(module, spec.lr, cfg.head_lr, cfg.steps, cfg.warmup_fraction,
                                      cfg.activation_lr_scale)  # fmt: skip
    model, optimizer = acc.prepare(module, optimizer)
    train = task.splits["train"]
    shard = slice(acc.process_index, None, acc.num_processes)  # this process's rows of every batch
    order = _batches(len(train), cfg.batch_size, cfg.steps, derive_seed(spec.seed, task.name, "batches"))
    batches = [idx[shard] for idx in order]

    def loss_fn(m: nn.Module, idx: Tensor) -> Tensor:
        inputs = {k: v.to(acc.device) for k, v in train.inputs(idx).items()}
        return F.cross_entropy(m(**inputs), train.labels[idx].to(acc.device))

    record = {"name": spec.name, **dataclasses.asdict(spec), **counts, "size": _size(task, spec),
              "steps": cfg.steps, "batch_size": cfg.batch_size, "processes": acc.num_processes,
              "train_device": device_name(acc.device), "jobs": cfg.jobs,
              "max_grad_norm": cfg.max_grad_norm}  # fmt: skip
    record.update(_train_loop(acc, model, optimizer, scheduler, batches, loss_fn, spec.name, sub / "losses.jsonl",
                              cfg.max_grad_norm, show_progress))  # fmt: skip
    module = acc.unwrap_model(model)
    if validate:
        val = evaluate(module, task.splits["valid"], cfg.eval_batch, task.num_labels)
        record.update(val_accuracy=val["accuracy"], val_macro_f1=val["macro_f1"])
    if acc.is_main_process:
        atomic_save_tensors(sub / "trainable.safetensors", _trainable_state(module))
        atomic_write_json(sub / "result.json", record)
    acc.wait_for_everyone()
    return record


def _size(task: ClassificationTask, spec: RunSpec) -> dict[str, int]:
    if spec.method != "iapt":
        return task.sizes[spec.method]
    icfg = iapt_config(task.cfg, spec.setting)
    return {"bottleneck": icfg.bottleneck, "soft_tokens": icfg.num_soft_tokens}


def _score(ctx: Any, task: ClassificationTask, spec: RunSpec) -> dict[str, Any]:
    """Test scores of a trained classifier (``test.json``; computed once)."""
    sub = ctx.run.path / "runs" / spec.name
    if (sub / "test.json").exists():
        return read_json(sub / "test.json")
    module = _load_trainable(build_classifier(task, spec.method, spec.setting, spec.seed),
                             sub / "trainable.safetensors")  # fmt: skip
    module.to(resolve_device(task.cfg.device))
    began = time.perf_counter()
    test = evaluate(module, task.splits["test"], task.cfg.eval_batch, task.num_labels)
    result = {"test_accuracy": test["accuracy"], "test_macro_f1": test["macro_f1"],
              "test_seconds": time.perf_counter() - began, "test_examples": len(task.splits["test"])}  # fmt: skip
    if ctx.is_main:
        atomic_write_json(sub / "test.json", result)
    return result


_PREPARED: dict[str, ClassificationTask] = {}  # this process's prepared tasks (a joblib worker prepares its own)


def task_env(cfg: Any, task: str) -> ClassificationTask:
    """:func:`prepare_task` once per process and configuration."""
    key = task + json.dumps(cfg.to_dict(), sort_keys=True, default=str)
    if key not in _PREPARED:
        if len(_PREPARED) >= 4:  # a bound for long-lived processes (tests) that see many configurations
            _PREPARED.pop(next(iter(_PREPARED)))
        _PREPARED[key] = prepare_task(cfg, task)
    return _PREPARED[key]


@dataclass(frozen=True)
class Job:
    """One classifier to train (or reuse): validated (a rate-grid run) and/or scored on test."""

    spec: RunSpec
    validate: bool = False
    score: bool = False


def _run_job(ctx: Any, job: Job, show_progress: bool = True) -> dict[str, Any]:
    from leanfit.core.device import configure_threads

    configure_threads(ctx.config.threads, small_workload=True)  # again: joblib workers start with torch's default
    task = task_env(ctx.config, job.spec.task)
    record = _train_classifier(ctx, task, job.spec, job.validate, show_progress)
    return {**record, **_score(ctx, task, job.spec)} if job.score else record


def run_jobs(ctx: Any, jobs: Sequence[Job], title: str) -> list[dict[str, Any]]:
    """The records of ``jobs`` in order; ``cfg.jobs`` classifiers at once through joblib when > 1."""
    cfg = ctx.config
    if cfg.jobs == 1 or len(jobs) <= 1:
        return [_run_job(ctx, job) for job in jobs]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(bad_value("jobs", cfg.jobs, "1 under torchrun", "a data-parallel launch already splits "
                                    "every batch over processes"))  # fmt: skip
    from joblib import Parallel, delayed

    from leanfit.core.parallel import joblib_backend

    out = []
    with progress_bar(len(jobs), f"{title}: {len(jobs)} classifiers, {cfg.jobs} at once") as bar, \
            joblib_backend(cfg.backend):  # fmt: skip
        parallel = Parallel(n_jobs=min(cfg.jobs, len(jobs)), return_as="generator")
        for record in parallel(delayed(_run_job)(ctx, job, False) for job in jobs):  # one bar for the round
            out.append(record)
            bar.advance(1, last=record["name"])
    return out


def choose_lrs(ctx: Any) -> tuple[dict[tuple[str, str], float], list[dict[str, Any]]]:
    """Train the first seed at every rate of each (task, method) grid and keep the best validation accuracy (ties:
    higher macro-F1, then the smaller rate). A one-rate grid is taken as is (no validation run).
    Returns ({(task, method): rate}, sweep rows)."""
    cfg = ctx.config
    seed = cfg.seeds[0]
    jobs = [Job(RunSpec(task, method, "main", lr, seed), validate=len(cfg.lrs.grid(method)) > 1)
            for task in cfg.tasks for method in cfg.methods for lr in cfg.lrs.grid(method)]  # fmt: skip
    records = run_jobs(ctx, jobs, "rate grids")
    chosen: dict[tuple[str, str], float] = {}
    rows: list[dict[str, Any]] = []
    for task in cfg.tasks:
        for method in cfg.methods:
            group = [r for job, r in zip(jobs, records, strict=True) if (job.spec.task, job.spec.method) == (task, method)]
            best = max(group, key=lambda r: (r.get("val_accuracy", 0.0), r.get("val_macro_f1", 0.0), -r["lr"]))
            chosen[task, method] = best["lr"]
            rows += [{"task": task, "method": method, "lr": r["lr"], "val_accuracy": r.get("val_accuracy"),
                      "val_macro_f1": r.get("val_macro_f1"), "chosen": r is best} for r in group]  # fmt: skip
    return chosen, rows


def final_runs(ctx: Any, rates: dict[tuple[str, str], float]) -> list[dict[str, Any]]:
    """Every method at its chosen rate and every IAPT ablation at IAPT's, on every seed, scored on test once."""
    cfg = ctx.config
    specs = []
    for task in cfg.tasks:
        specs += [RunSpec(task, method, "main", rates[task, method], seed) for method in cfg.methods
                  for seed in cfg.seeds]  # fmt: skip
        specs += [RunSpec(task, "iapt", setting, rates[task, "iapt"], seed) for setting in cfg.ablations
                  for seed in cfg.seeds]  # fmt: skip
    return run_jobs(ctx, [Job(spec, score=True) for spec in specs], "seeds and ablations")


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
                                                                            init_scale=dcfg.gate_init_scale)  # fmt: skip
            return IAPTHeadlineLM(get_iapt_model(model, config))
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=2 * r, target_modules=list(dcfg.lora_targets))
        return HeadlineLM(get_peft_model(model, config))


def _generate(lm: HeadlineLM, tokenizer: Any, examples: Sequence[HeadlineExample], dcfg: Any,
              pad: int) -> list[str]:  # fmt: skip
    device = next(lm.parameters()).device
    end = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    lm.eval()
    out = []
    for i in range(0, len(examples), dcfg.generate_batch):
        ids, mask = _prompt_batch(examples[i : i + dcfg.generate_batch], pad)
        new = lm.new_tokens(ids.to(device), mask.to(device), max_new_tokens=dcfg.target_tokens, pad_token_id=pad,
                            eos_token_id=end)  # fmt: skip
        out += [tokenizer.decode(row, skip_special_tokens=True).strip().split("\n")[0] for row in new.cpu()]
    return out


def _decoder_run(ctx: Any, base: nn.Module, tokenizer: Any, method: str, data: dict[str, list[HeadlineExample]],
                 sizes: dict[str, int]) -> dict[str, Any]:  # fmt: skip
    """Train (unless zero-shot) and score one decoder method: ``result.json``, ``losses.jsonl`` and
    ``predictions.jsonl`` in its folder."""
    dcfg = ctx.config.decoder
    sub = ctx.run.path / "runs" / f"decoder-{method}-s{dcfg.seed}"
    if (sub / "result.json").exists():
        return read_json(sub / "result.json")
    sub.mkdir(parents=True, exist_ok=True)
    lm = _build_lm(base, method, dcfg, sizes["lora_r"], dcfg.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trainable = sum(p.numel() for p in lm.parameters() if p.requires_grad)
    record: dict[str, Any] = {"method": method, "seed": dcfg.seed, "train_seconds": 0.0, "steps": 0, "lr": None,
                              "adapter_params": trainable}  # fmt: skip
    torch.manual_seed(derive_seed(dcfg.seed, "decoder", method, "dropout"))
    acc = _accelerator()
    if method != "zero-shot":
        lr = {"iapt": dcfg.iapt_lr, "iapt-gate": dcfg.iapt_gate_lr, "lora": dcfg.lora_lr}[method]
        optimizer, scheduler = _optimizer(lm, lr, lr, dcfg.steps, ctx.config.warmup_fraction)
        model, optimizer = acc.prepare(lm, optimizer)
        train = data["train"]
        shard = slice(acc.process_index, None, acc.num_processes)
        order = _batches(len(train), dcfg.batch_size, dcfg.steps, derive_seed(dcfg.seed, "decoder"))
        batches = [[train[int(i)] for i in idx[shard]] for idx in order]

        def loss_fn(m: nn.Module, examples: list[HeadlineExample]) -> Tensor:
            return m(**{k: v.to(acc.device) for k, v in _lm_batch(examples, pad).items()})

        (sub / "losses.jsonl").unlink(missing_ok=True)
        record.update(_train_loop(acc, model, optimizer, scheduler, batches, loss_fn, f"decoder-{method}",
                                  sub / "losses.jsonl", dcfg.max_grad_norm))  # fmt: skip
        record.update(lr=lr, steps=dcfg.steps, max_grad_norm=dcfg.max_grad_norm)
        lm = acc.unwrap_model(model)
    began = time.perf_counter()
    predictions = _generate(lm, tokenizer, data["test"], dcfg, pad)
    record["generate_seconds"] = time.perf_counter() - began
    scores = rouge_l(predictions, [e.reference for e in data["test"]])
    record.update(rouge_l=sum(scores) / len(scores), test_examples=len(scores), rouge_l_articles=scores)
    if acc.is_main_process:
        lines = [json.dumps({"reference": e.reference, "prediction": p, "rouge_l": s}) + "\n"
                 for e, p, s in zip(data["test"], predictions, scores, strict=True)]  # fmt: skip
        atomic_write_text(sub / "predictions.jsonl", "".join(lines))
        atomic_write_json(sub / "result.json", record)
    acc.wait_for_everyone()
    return record


def run_decoder(ctx: Any) -> list[dict[str, Any]]:
    """The headline study: every method of ``decoder.methods`` on the same articles; one record per method."""
    from leanfit.core.device import configure_threads
    from leanfit.studies.models.pretrained import load_pretrained

    cfg, dcfg = ctx.config, ctx.config.decoder
    configure_threads(dcfg.threads or os.cpu_count() or 1, small_workload=False)
    base, tokenizer = load_pretrained(dcfg.model, model_class="AutoModelForCausalLM")
    base.eval().requires_grad_(False)
    parts = _labelled("bbc-news").split(cfg.valid_fraction, cfg.test_fraction)
    data = {"train": headline_examples(tokenizer, _sample(parts["train"], dcfg.train_examples), dcfg),
            "test": headline_examples(tokenizer, _sample(parts["test"], dcfg.test_examples), dcfg)}  # fmt: skip
    budget = iapt_parameter_count(base.config.hidden_size, base.config.num_hidden_layers, dcfg.iapt)
    sizes = {"iapt_params": budget, "lora_r": max(1, round(budget / lora_unit(base, dcfg.lora_targets)))}
    rows = [_decoder_run(ctx, base, tokenizer, method, data, sizes) for method in dcfg.methods]
    lengths = [len(e.prompt) for e in data["test"]]
    for row in rows:
        row.update(prompt_tokens_mean=sum(lengths) / len(lengths), lora_r=sizes["lora_r"] if row["method"] == "lora"
                   else None)  # fmt: skip
    configure_threads(cfg.threads, small_workload=True)
    return rows
