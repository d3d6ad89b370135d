"""``leanfit bench iapt-serving``: one backbone serving N tenants, IAPT against unmerged PEFT LoRA.

Methods, all on the same backbone weights (the adapted models are copies of the backbone's modules that share
its weight tensors), the same prompts and the same greedy decoding:

- ``bare``: the backbone alone;
- ``lora_single``: one unmerged PEFT LoRA adapter serving every row (PEFT's standard path);
- ``lora_mixed``: PEFT LoRA with N adapters, ``generate(..., adapter_names=[...])`` (PEFT's mixed-batch path,
  which runs every LoRA layer once per adapter present in the batch, in prefill and in every decode step);
- ``iapt``: :class:`~leanfit.iapt.IAPTModel` with N adapters and ``adapter_names``: the prompt generators run
  once, at prefill, grouped by tenant; decode steps are the plain backbone reading 4 more cache slots per layer.

Workload: ``batch`` prompts of ``prompt_tokens`` random token ids (the first is BOS), tenants assigned
round-robin to rows (row i serves tenant i mod N), greedy decoding of exactly ``new_tokens`` tokens
(``min_new_tokens = max_new_tokens``, so EOS never stops a row early). Adapter weights are random and non-zero
(LoRA A ~ N(0, 1/d_in), B ~ N(0, ``lora_init_std``^2); IAPT up-projection std ``iapt_init_scale``), drawn from
the run's seed; the LoRA rank is matched to IAPT's trainable count (``lora_rank=0``).

Timing: a logits processor records the clock at every generation step (after the step's forward; on CUDA
after a synchronize), so one ``generate`` call gives ``prefill_ms`` (call start to the first step: input
preparation, cache set-up and the prefill forward, IAPT's generators included) and ``decode_ms_per_token``
(the median time of the remaining ``new_tokens - 1`` steps, which all do the same work, so that a step
disturbed by another process on a shared machine does not count; ``decode_ms_mean`` is their mean; each step
emits one token for every row).
``decode_tokens_per_s = batch / decode step time``; ``tokens_per_s = batch * new_tokens / whole call``. Every
round runs every (method, tenants) cell once, in an order rotated each round, after ``warmup`` untimed rounds
(:func:`leanfit.core.bench.time_side_by_side`); the minimum over ``repeats`` rounds is reported (the median beside
it), and ratios divide by ``bare`` of the same run.

Peak memory (:func:`leanfit.core.bench.peak_memory`): the rise during one ``generate`` over what was held before
it (backbone and adapters loaded): on CUDA ``torch.cuda.max_memory_allocated``; on the CPU the rise of the resident
set (``VmHWM`` after resetting it through ``/proc/self/clear_refs``), each cell in a fresh process
(``isolate_memory``) so that memory freed and cached by earlier cells does not hide its own; there a tiny warm-up
``generate`` of the same method (lazy kernel and library set-up) and a ``malloc_trim`` precede the baseline.
``adapter_mb`` is the size of the adapters a cell uses.

Analytic cost per decode step and row (``*_flops``): the backbone's matmuls ``2 * (weights of its linear
layers)`` plus attention over the mean context; LoRA adds ``2 * r * (d_in + d_out)`` per adapted module (two
small matmuls, the same for single and mixed batches); IAPT adds attention over ``k`` soft tokens,
``4 * k * (heads * head_dim)`` per layer. IAPT's prefill cost (its generators and ``k`` more positions) is
paid once per request and shows in ``prefill_ms``.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from leanfit.core.bench import TimingConfig, add_ratios, peak_memory, time_side_by_side, torch_threads
from leanfit.core.config import option
from leanfit.core.errors import ConfigError, bad_value
from leanfit.core.memory import run_in_fresh_process
from leanfit.core.registry import register

if TYPE_CHECKING:
    from leanfit.core.report import Report
    from leanfit.core.runner import RunContext
    from leanfit.core.runs import RunDir

__all__ = ["DECODE_TARGET", "LORA_TARGETS", "METHODS", "TINY_LLAMA", "IAPTServingBenchConfig", "Servers",
           "build_servers", "cells", "decode_flops", "make_prompts", "matched_rank", "measure_peak_memory",
           "tenant_names", "time_generate"]

METHODS = ("bare", "lora_single", "lora_mixed", "iapt")
MIXED = ("lora_mixed", "iapt")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TINY_LLAMA = {"vocab_size": 96, "d_model": 32, "n_layers": 2, "n_heads": 4}  # model="tiny-llama", for tests
DECODE_TARGET = 0.95  # IAPT decode tokens/s at least 95% of the bare backbone's


@dataclass
class IAPTServingBenchConfig(TimingConfig):
    model: str = option("smollm2-135m-instruct", help="backbone: an alias of leanfit.studies.models.pretrained, a local "
                        "model folder, or 'tiny-llama' (a random 2-layer Llama, for tests); never downloaded")
    tenants: list[int] = option(default_factory=lambda: [1, 4, 16], help="tenant counts N (each <= batch)")
    batch: int = option(16, help="rows per batch; row i serves tenant i mod N")
    prompt_tokens: int = option(64, help="prompt length (random token ids after BOS)")
    new_tokens: int = option(32, help="greedy tokens generated per row (min_new_tokens = max_new_tokens)")
    methods: list[str] = option(default_factory=lambda: list(METHODS), help=f"methods: {METHODS}; bare is required")
    warmup: int = option(1, help="untimed rounds before timing")
    repeats: int = option(5, help="timed rounds; the minimum is reported, the median beside it")
    num_soft_tokens: int = option(4, help="IAPT soft tokens per layer")
    bottleneck: int = option(64, help="IAPT generator width m")
    iapt_init_scale: float = option(0.02, help="std of the IAPT up-projections (random adapters, > 0)")
    lora_rank: int = option(0, help="LoRA rank; 0: the rank whose parameter count is closest to IAPT's")
    lora_targets: list[str] = option(default_factory=lambda: list(LORA_TARGETS),
                                     help="module names LoRA adapts in every layer")
    lora_init_std: float = option(0.02, help="std of the LoRA B matrices (random adapters, > 0)")
    device: str = option("auto", help="auto | cpu | cuda | cuda:N")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = option(
        "float32", help="backbone dtype (adapters stay float32 under half precision); auto: bf16 on CUDA"
    )
    threads: int = option(0, help="CPU torch threads; 0: LEANFIT_THREADS or 1 (decode steps are small ops)")
    isolate_memory: bool = option(True, help="CPU: measure each cell's peak memory in a fresh process")
    check: bool = option(True, help="check that mixed batches generate what each tenant's rows generate alone")

    def __post_init__(self) -> None:
        super().__post_init__()
        sizes = {"batch": (self.batch, 1), "prompt_tokens": (self.prompt_tokens, 2), "new_tokens": (self.new_tokens, 2),
                 "num_soft_tokens": (self.num_soft_tokens, 1), "bottleneck": (self.bottleneck, 1),
                 "lora_rank": (self.lora_rank, 0)}
        for name, (value, low) in sizes.items():
            if value < low:
                raise ConfigError(bad_value(name, value, f"an integer >= {low}"))
        if not self.tenants or any(n < 1 or n > self.batch for n in self.tenants):
            raise ConfigError(bad_value("tenants", self.tenants, f"a non-empty list of counts in [1, batch={self.batch}]",
                                        "every tenant needs a row: raise batch or lower the counts"))
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or len(set(self.methods)) != len(self.methods):
            raise ConfigError(bad_value("methods", self.methods, f"distinct names among {', '.join(METHODS)}"))
        if "bare" not in self.methods:
            raise ConfigError(bad_value("methods", self.methods, "a list including 'bare'",
                                        "ratios divide by the bare backbone of the same run"))
        for name in ("iapt_init_scale", "lora_init_std"):
            if not getattr(self, name) > 0:
                raise ConfigError(bad_value(name, getattr(self, name), "a number > 0",
                                            "zero adapters would measure no real work"))
        if not self.lora_targets:
            raise ConfigError(bad_value("lora_targets", self.lora_targets, "at least one module name"))
        _check_model(self.model)


def _check_model(model: str) -> None:
    from leanfit.studies.models.pretrained import ALIASES

    if model != "tiny-llama" and model not in ALIASES and not Path(model).is_dir():
        raise ConfigError(bad_value("model", model, f"'tiny-llama', an alias ({', '.join(ALIASES)}) or a local "
                                    "model folder", "this benchmark loads models offline only"))


# quick: about 2-3 min on 2 shared CPU cores, SmolLM2 included (its first load converts the GGUF, ~90 s more)
PRESETS = {
    "quick": {"tenants": [1, 4], "batch": 4, "prompt_tokens": 16, "new_tokens": 8, "warmup": 1, "repeats": 3},
    "full": {},
}


# --- workload -----------------------------------------------------------------------------------------------------
def cells(cfg: IAPTServingBenchConfig) -> list[tuple[str, int]]:
    """(method, tenants) pairs measured: bare and single LoRA once (one tenant), mixed methods at every N."""
    out = [(m, 1) for m in ("bare", "lora_single") if m in cfg.methods]
    return out + [(m, n) for n in cfg.tenants for m in MIXED if m in cfg.methods]


def tenant_names(batch: int, tenants: int) -> list[str]:
    """Adapter name of every row: row i serves tenant ``t{i mod tenants}``."""
    return [f"t{i % tenants}" for i in range(batch)]


def make_prompts(batch: int, length: int, vocab_size: int, bos: int | None, seed: int) -> Any:
    """(batch, length) random token ids in [min(32, V/2), V) (clear of special tokens), BOS first."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(min(32, vocab_size // 2), vocab_size, (batch, length), generator=g)
    if bos is not None:
        ids[:, 0] = bos
    return ids


# --- models -------------------------------------------------------------------------------------------------------
def _load_backbone(cfg: IAPTServingBenchConfig, device: Any, dtype: Any, seed: int) -> Any:
    if cfg.model == "tiny-llama":
        from leanfit.studies.models.tiny_llama import tiny_llama

        sizes = dict(TINY_LLAMA)
        model = tiny_llama(sizes.pop("vocab_size"), **sizes, seed=seed)
    else:
        from transformers import AutoModelForCausalLM

        from leanfit.studies.models.pretrained import resolve_pretrained_path

        try:
            model = AutoModelForCausalLM.from_pretrained(resolve_pretrained_path(cfg.model), dtype=dtype)
        except ValueError as exc:  # transformers: no causal-LM class for this config
            raise ConfigError(bad_value("model", cfg.model, "a decoder with a causal-LM head", str(exc))) from exc
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _shared_copy(model: Any) -> Any:
    """A copy of ``model``'s modules that shares its parameter and buffer tensors (no extra weight memory)."""
    import copy

    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


def _lora_modules(model: Any, targets: Sequence[str]) -> list[tuple[str, Any]]:
    from torch import nn

    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in targets]
    if not found or {n.split(".")[-1] for n, _ in found} != set(targets):
        names = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(
            bad_value("lora_targets", list(targets), f"linear modules of the model ({', '.join(names)})")
        )
    return found


def matched_rank(model: Any, targets: Sequence[str], budget: int) -> tuple[int, int]:
    """(rank, parameters per rank): the LoRA rank on ``targets`` whose parameter count is closest to ``budget``."""
    per_rank = sum(m.in_features + m.out_features for _, m in _lora_modules(model, targets))
    low = max(1, budget // per_rank)
    return min((low, low + 1), key=lambda r: abs(r * per_rank - budget)), per_rank


def _add_lora(backbone: Any, cfg: IAPTServingBenchConfig, rank: int, adapters: int, seed: int) -> Any:
    """PEFT LoRA with adapters t0..t{adapters-1}, A ~ N(0, 1/d_in), B ~ N(0, lora_init_std^2) drawn from
    ``seed`` on the CPU; t0 active."""
    import torch
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=list(cfg.lora_targets))
    model = get_peft_model(_shared_copy(backbone), lora, adapter_name="t0")
    for i in range(1, adapters):
        model.add_adapter(f"t{i}", lora)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i in range(adapters):
            for _, module in sorted(model.named_modules(), key=lambda x: x[0]):
                if f"t{i}" in getattr(module, "lora_A", {}):
                    a, b = module.lora_A[f"t{i}"].weight, module.lora_B[f"t{i}"].weight
                    a.copy_(torch.randn(a.shape, generator=g) / math.sqrt(a.shape[1]))
                    b.copy_(torch.randn(b.shape, generator=g) * cfg.lora_init_std)
    model.set_adapter("t0")
    return model.eval()


def _iapt_config(cfg: IAPTServingBenchConfig) -> Any:
    from leanfit.iapt.config import IAPTConfig

    return IAPTConfig(num_soft_tokens=cfg.num_soft_tokens, bottleneck=cfg.bottleneck, init_scale=cfg.iapt_init_scale)


def _add_iapt(backbone: Any, cfg: IAPTServingBenchConfig, adapters: int, seed: int) -> Any:
    """IAPT with adapters t0..t{adapters-1}, adapter i initialised under seed ``seed + i``."""
    import torch

    from leanfit.iapt.model import get_iapt_model

    device = next(backbone.parameters()).device
    model = None
    for i in range(adapters):
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed + i)
            if model is None:
                model = get_iapt_model(_shared_copy(backbone), _iapt_config(cfg), adapter_name="t0")
            else:
                model.add_adapter(f"t{i}", _iapt_config(cfg))
    return model.eval()


@dataclass
class Servers:
    """The backbone and its adapted copies; ``generate`` runs one (method, tenants) cell on prompts (B, T) and
    returns the sequences (B, T + n)."""

    bare: Any
    lora: Any | None
    iapt: Any | None
    pad_token_id: int
    lora_rank: int
    counts: dict[str, int] = field(default_factory=dict)

    def model(self, method: str) -> Any:
        model = {"bare": self.bare, "lora_single": self.lora, "lora_mixed": self.lora, "iapt": self.iapt}[method]
        if model is None:
            raise ValueError(f"method={method!r} was not built: pass it to build_servers(methods=...)")
        return model

    def generate(self, method: str, tenants: int, ids: Any, new_tokens: int, logits_processor: Any = None,
                 adapter_names: list[str] | None = None) -> Any:
        """``adapter_names`` (one per row) defaults to the round-robin assignment of ``tenants`` for mixed
        methods; ``lora_single`` serves every row with the active adapter and ``bare`` has none."""
        import torch
        from transformers import LogitsProcessorList

        kwargs = {"attention_mask": torch.ones_like(ids), "max_new_tokens": new_tokens, "min_new_tokens": new_tokens,
                  "do_sample": False, "pad_token_id": self.pad_token_id,
                  "logits_processor": LogitsProcessorList(logits_processor or [])}
        if method in MIXED:
            kwargs["adapter_names"] = adapter_names or tenant_names(ids.shape[0], tenants)
        model = self.model(method)
        if method == "iapt":
            return model.generate(ids, **kwargs)
        out = model.generate(input_ids=ids, **kwargs)
        return out if isinstance(out, torch.Tensor) else out.sequences


def build_servers(cfg: IAPTServingBenchConfig, device: Any, dtype: Any, seed: int,
                  methods: Sequence[str] | None = None, adapters: int | None = None) -> Servers:
    """Load the backbone on ``device`` in ``dtype`` and add ``adapters`` (default max(tenants)) random adapters per
    adapted method of ``methods`` (default cfg.methods); LoRA's rank matched to IAPT's count unless set."""
    from leanfit.iapt.generator import iapt_parameter_count

    methods = cfg.methods if methods is None else methods
    adapters = max(cfg.tenants) if adapters is None else adapters
    bare = _load_backbone(cfg, device, dtype, seed)
    iapt_count = iapt_parameter_count(bare.config.hidden_size, bare.config.num_hidden_layers, _iapt_config(cfg))
    rank, per_rank = matched_rank(bare, cfg.lora_targets, iapt_count)
    rank = cfg.lora_rank or rank
    lora = _add_lora(bare, cfg, rank, adapters, seed) if {"lora_single", "lora_mixed"} & set(methods) else None
    iapt = _add_iapt(bare, cfg, adapters, seed) if "iapt" in methods else None
    gen = bare.generation_config
    pad = next(x for x in (gen.pad_token_id, bare.config.pad_token_id, gen.eos_token_id, 0) if x is not None)
    pad = pad[0] if isinstance(pad, list) else pad
    counts = {"iapt_params_per_adapter": iapt_count, "lora_params_per_adapter": rank * per_rank}
    if iapt is not None:
        assert sum(p.numel() for p in iapt.iapt["t0"].parameters()) == iapt_count
    if lora is not None:
        assert sum(p.numel() for n, p in lora.named_parameters() if ".t0." in n) == rank * per_rank
    return Servers(bare, lora, iapt, int(pad), rank, counts)


# --- measurements -------------------------------------------------------------------------------------------------
class _StepClock:
    """A logits processor recording the clock at every generation step (called once per step, after its
    forward); ``sync`` waits for the device first."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync, self.times = sync, []

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        self.sync()
        self.times.append(time.perf_counter())
        return scores


def _sync(device: Any) -> Callable[[], None]:
    from leanfit.core.device import synchronize

    return lambda: synchronize(device) if device is not None else None


def _generate_call(servers: Servers, method: str, tenants: int, ids: Any, new_tokens: int,
                   device: Any) -> Callable[[], tuple[float, list[float], Any]]:
    """One ``generate`` of a cell with a step clock: (its start, the clock at every step, sequences (B, T + n))."""

    sync = _sync(device)

    def call() -> tuple[float, list[float], Any]:
        clock = _StepClock(sync)
        start = time.perf_counter()
        out = servers.generate(method, tenants, ids, new_tokens, [clock])
        assert len(clock.times) == new_tokens and out.shape[1] == ids.shape[1] + new_tokens, (clock.times, out.shape)
        return start, clock.times, out

    return call


def _split(start: float, steps: list[float], seconds: float | None) -> dict[str, float]:
    """{prefill_ms, decode_ms_per_token (median step), decode_ms_mean, total_ms} of one timed ``generate``."""
    gaps = [b - a for a, b in zip(steps[:-1], steps[1:], strict=True)]
    return {"prefill_ms": 1e3 * (steps[0] - start), "decode_ms_per_token": 1e3 * statistics.median(gaps),
            "decode_ms_mean": 1e3 * statistics.fmean(gaps),
            "total_ms": math.nan if seconds is None else 1e3 * seconds}


def time_generate(servers: Servers, method: str, tenants: int, ids: Any, new_tokens: int,
                  device: Any = None) -> tuple[dict[str, float], Any]:
    """One timed ``generate``: ({prefill_ms, decode_ms_per_token (median step), decode_ms_mean, total_ms},
    sequences (B, T + n))."""
    got: list[tuple[dict[str, float], Any]] = []
    call = _generate_call(servers, method, tenants, ids, new_tokens, device)
    time_side_by_side({method: call}, repeats=1, device=device,
                      on_call=lambda _, seconds, r: got.append((_split(r[0], r[1], seconds), r[2])))
    return got[0]


def _time_cells(cfg: IAPTServingBenchConfig, servers: Servers, todo: list[tuple[str, int]], ids: Any,
                device: Any, bar: Any) -> tuple[dict, dict]:
    """Interleaved rounds (order rotated each round): per cell the list of timed measurements, and the sequences
    of its last call."""
    times: dict[tuple[str, int], list[dict[str, float]]] = {c: [] for c in todo}
    outputs: dict[tuple[str, int], Any] = {}

    def record(cell: tuple[str, int], seconds: float | None, result: tuple[float, list[float], Any]) -> None:
        t, outputs[cell] = _split(result[0], result[1], seconds), result[2]
        if seconds is not None:
            times[cell].append(t)
        bar.advance(1, method=cell[0], N=cell[1], decode_ms=t["decode_ms_per_token"])

    calls = {cell: _generate_call(servers, *cell, ids, cfg.new_tokens, device) for cell in todo}
    time_side_by_side(calls, **cfg.timing(), device=device, on_call=record)
    return times, outputs


def _peak_mb(servers: Servers, method: str, tenants: int, ids: Any, new_tokens: int,
             device: Any) -> tuple[float | None, str]:
    """Peak memory (MB) of one generate above what was held before it, and how it was measured."""
    import torch

    if device.type == "cpu":
        with torch.no_grad():  # weights may be memory-mapped: make them resident before the baseline
            for p in servers.model(method).parameters():
                p.sum()
        servers.generate(method, tenants, ids[:1, :2], 2)  # lazy initialisation of kernels and libraries
    peak, _ = peak_memory(lambda: servers.generate(method, tenants, ids, new_tokens), device)
    return peak.mb, peak.source


def measure_peak_memory(cfg: IAPTServingBenchConfig, method: str, tenants: int, seed: int,
                        threads: int = 0) -> tuple[float | None, str]:
    """Peak memory (MB) of one ``generate`` of a cell with only that cell's model and ``tenants`` adapters
    built; meant to run in a fresh process (module level, so a spawned process can call it)."""
    from leanfit.core.device import configure_threads, resolve_device, resolve_dtype

    device = resolve_device(cfg.device)
    if device.type == "cpu":
        configure_threads(threads, small_workload=True)
    servers = build_servers(cfg, device, resolve_dtype(cfg.dtype, device), seed, [method], tenants)
    ids = _prompts(cfg, servers, seed).to(device)
    return _peak_mb(servers, method, tenants, ids, cfg.new_tokens, device)


def _prompts(cfg: IAPTServingBenchConfig, servers: Servers, seed: int) -> Any:
    config = servers.bare.config
    return make_prompts(cfg.batch, cfg.prompt_tokens, config.vocab_size, config.bos_token_id, seed)


def _check_cell(servers: Servers, method: str, tenants: int, ids: Any, mixed_out: Any, new_tokens: int) -> float:
    """Fraction of rows whose mixed-batch generation equals the generation of its tenant's rows alone (LoRA: the
    adapter set active, PEFT's single-adapter path; IAPT: a one-adapter batch)."""
    import torch

    names = tenant_names(ids.shape[0], tenants)
    same = torch.zeros(ids.shape[0], dtype=torch.bool)
    for tenant in dict.fromkeys(names):
        rows = torch.tensor([i for i, n in enumerate(names) if n == tenant], device=ids.device)
        if method == "lora_mixed":
            servers.lora.set_adapter(tenant)
            alone = servers.generate("lora_single", 1, ids[rows], new_tokens)
            servers.lora.set_adapter("t0")
        else:
            alone = servers.generate("iapt", 1, ids[rows], new_tokens, adapter_names=[tenant] * len(rows))
        same[rows.cpu()] = (alone == mixed_out[rows]).all(1).cpu()
    return same.double().mean().item()


def decode_flops(config: Any, cfg: IAPTServingBenchConfig, linear_weights: int, lora_params: int) -> dict[str, float]:
    """Analytic FLOPs per decode step and row (see the module docstring): backbone, and extra for LoRA and IAPT."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attn_width = config.num_attention_heads * head_dim
    context = cfg.prompt_tokens + cfg.new_tokens / 2  # mean context length during decoding
    layers = config.num_hidden_layers
    return {"backbone": 2 * linear_weights + 4 * attn_width * context * layers, "lora": 2 * lora_params,
            "iapt": 4 * cfg.num_soft_tokens * attn_width * layers}


# --- rows, ratios, headline ---------------------------------------------------------------------------------------
def _adapter_bytes(servers: Servers, method: str) -> int:
    """Bytes of one adapter of ``method`` (t0)."""
    if method == "iapt":
        return sum(p.numel() * p.element_size() for p in servers.iapt.iapt["t0"].parameters())
    return sum(p.numel() * p.element_size() for n, p in servers.lora.named_parameters() if ".t0." in n)


def _row(cfg: IAPTServingBenchConfig, servers: Servers, cell: tuple[str, int], times: list[dict[str, float]],
         flops: dict[str, float]) -> dict[str, Any]:
    method, tenants = cell
    best = {key: min(t[key] for t in times) for key in times[0]}
    adapters = {"bare": 0, "lora_single": 1}.get(method, tenants)
    params = {"bare": 0, "iapt": servers.counts["iapt_params_per_adapter"]}.get(
        method, servers.counts["lora_params_per_adapter"])
    extra = {"bare": 0.0, "iapt": flops["iapt"]}.get(method, flops["lora"])
    return {
        "method": method, "tenants": tenants, "batch": cfg.batch, "prompt_tokens": cfg.prompt_tokens,
        "new_tokens": cfg.new_tokens, "prefill_ms": best["prefill_ms"], "decode_ms_per_token": best["decode_ms_per_token"],
        "decode_ms_mean": best["decode_ms_mean"], "total_ms": best["total_ms"], "decode_tokens_per_s": 1e3 * cfg.batch / best["decode_ms_per_token"],
        "tokens_per_s": 1e3 * cfg.batch * cfg.new_tokens / best["total_ms"],
        "prefill_ms_median": statistics.median(t["prefill_ms"] for t in times),
        "decode_ms_per_token_median": statistics.median(t["decode_ms_per_token"] for t in times),
        "timed_rounds": len(times), "adapters": adapters, "adapter_params": params,
        "adapter_mb": 0.0 if method == "bare" else adapters * _adapter_bytes(servers, method) / 2**20,
        "extra_decode_flops": extra, "extra_decode_flops_pct": 100 * extra / flops["backbone"],
    }


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """Ratios against ``bare`` of the same run (throughput: row / bare; prefill time: row / bare), and IAPT's
    decode throughput over mixed-batch LoRA's at the same N."""
    add_ratios(rows, match=(), baseline={"method": "bare"}, columns={
        "decode_ratio_vs_bare": "decode_tokens_per_s", "tokens_per_s_ratio_vs_bare": "tokens_per_s",
        "prefill_ratio_vs_bare": "prefill_ms"})
    add_ratios(rows, match=("tenants",), baseline=lambda r: {"method": "lora_mixed"} if r["method"] == "iapt"
               else None, columns={"decode_speedup_vs_lora_mixed": "decode_tokens_per_s",
                                   "tokens_per_s_speedup_vs_lora_mixed": "tokens_per_s"})


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    iapt = [r for r in rows if r["method"] == "iapt"]
    out: dict[str, Any] = {
        "iapt_decode_vs_bare": {str(r["tenants"]): r["decode_ratio_vs_bare"] for r in iapt},
        "iapt_decode_vs_lora_mixed": {str(r["tenants"]): r["decode_speedup_vs_lora_mixed"] for r in iapt
                                      if "decode_speedup_vs_lora_mixed" in r},
    }
    if iapt:
        out["target_decode_within_5pct_of_bare"] = min(r["decode_ratio_vs_bare"] for r in iapt) >= DECODE_TARGET
    many = [v for n, v in out["iapt_decode_vs_lora_mixed"].items() if int(n) >= 4]
    out["target_faster_than_lora_mixed_at_4plus"] = min(many) > 1.0 if many else None
    return out


def _met(value: bool | None) -> str:
    return {True: "met", False: "MISSED", None: "not measured"}[value]


def _headline(summary: dict[str, Any]) -> str:
    parts = []
    if summary["iapt_decode_vs_bare"]:
        ratios = ", ".join(f"{100 * v:.1f}% at N={n}" for n, v in summary["iapt_decode_vs_bare"].items())
        parts.append(f"IAPT decode tokens/s relative to the bare backbone: {ratios} (target >= {100 * DECODE_TARGET:.0f}%: "
                     f"{_met(summary.get('target_decode_within_5pct_of_bare'))})")
    if summary["iapt_decode_vs_lora_mixed"]:
        ratios = ", ".join(f"{v:.2f}x at N={n}" for n, v in summary["iapt_decode_vs_lora_mixed"].items())
        parts.append(f"IAPT vs PEFT mixed-batch LoRA decode tokens/s: {ratios} (target faster at N >= 4: "
                     f"{_met(summary['target_faster_than_lora_mixed_at_4plus'])})")
    return "; ".join(parts)


# --- report -------------------------------------------------------------------------------------------------------
_TABLE = ["method", "tenants", "prefill_ms", "decode_ms_per_token", "decode_tokens_per_s", "tokens_per_s",
          "decode_ratio_vs_bare", "tokens_per_s_ratio_vs_bare", "prefill_ratio_vs_bare",
          "decode_speedup_vs_lora_mixed", "peak_mb", "adapter_mb", "extra_decode_flops_pct", "tokens_match",
          "rows_changed_vs_bare"]


def _by_method(rows: list[dict[str, Any]], key: str) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for r in rows:
        out.setdefault(r["method"], {})[r["tenants"]] = r[key]
    return out


def _throughput_plot(path: Path, rows: list[dict[str, Any]]) -> None:
    from leanfit.core.report import line_plot

    tenants = sorted({r["tenants"] for r in rows if r["method"] in MIXED}) or [1]
    series = {}
    for method, values in _by_method(rows, "decode_tokens_per_s").items():
        if method in MIXED:
            series[method] = (sorted(values), [values[n] for n in sorted(values)])
        else:  # one tenant's adapter (or none) serves every row: the same workload at every N
            series[f"{method} (any N)"] = (tenants, [values[1]] * len(tenants))
    line_plot(path, series, xlabel="tenants N in the batch", ylabel="decode tokens/s (batch / step time)",
              title="decode throughput, one backbone, N tenants")


def _time_bars(path: Path, rows: list[dict[str, Any]]) -> None:
    from leanfit.core.report import bar_chart

    tenants = sorted({r["tenants"] for r in rows if r["method"] in MIXED}) or [1]
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    panels = {}
    for key, label in (("decode_ms_per_token", "decode ms per step"), ("prefill_ms", "prefill ms")):
        values = _by_method(rows, key)
        panels[f"{label} (min over rounds)"] = {m: [values[m].get(n if m in MIXED else 1, math.nan) for n in tenants]
                                                for m in methods}
    bar_chart(path, [f"N={n}" for n in tenants], panels, ylabel=["decode ms per step", "prefill ms"])


def report(run: RunDir, results: dict[str, Any]) -> Report:
    from leanfit.core.report import Report

    rows, counts, flops = results["rows"], results["counts"], results["flops"]
    rep = Report("Results").text(results.get("headline", ""))
    rep.text(f"Backbone `{results['model']}` ({results['layers']} layers, d={results['hidden_size']}) on "
             f"{results['device']} in {results['dtype']}, {results['threads']} torch threads; batch {rows[0]['batch']}, "
             f"{rows[0]['prompt_tokens']} prompt tokens, {rows[0]['new_tokens']} greedy new tokens; min over "
             f"{rows[0]['timed_rounds']} interleaved rounds. Peak memory: {results['peak_memory_source']}. Timings "
             "on a shared CPU are noisy: compare ratios of the same run, and read the medians beside the minima "
             "in results.csv.")
    _throughput_plot(run.plots_dir / "decode_throughput.png", rows)
    rep.figure("plots/decode_throughput.png", "Decode tokens/s against the number of tenants in the batch")
    _time_bars(run.plots_dir / "step_times.png", rows)
    rep.figure("plots/step_times.png", "Decode time per step and prefill time (bare and single LoRA: the same "
               "measurement in every group)")
    rep.section("All cells").table(rows, _TABLE)
    rep.section("Adapter budget and analytic cost").table([
        {"method": "IAPT", "params_per_adapter": counts["iapt_params_per_adapter"],
         "setting": f"{results['num_soft_tokens']} soft tokens, bottleneck {results['bottleneck']}, every layer",
         "extra_decode_flops_per_row": flops["iapt"]},
        {"method": "LoRA", "params_per_adapter": counts["lora_params_per_adapter"],
         "setting": f"r={counts['lora_rank']} on {', '.join(counts['lora_targets'])}",
         "extra_decode_flops_per_row": flops["lora"]},
        {"method": "backbone", "params_per_adapter": None, "setting": "linear layers + attention over the mean context",
         "extra_decode_flops_per_row": flops["backbone"]},
    ])
    rep.text("`tokens_match`: fraction of rows whose mixed-batch generation equals the generation of its tenant's "
             "rows alone (LoRA through PEFT's single-adapter path); `rows_changed_vs_bare`: fraction of rows whose "
             "tokens differ from the bare backbone's, so the adapters do change the output.")
    return rep


# --- the benchmark ------------------------------------------------------------------------------------------------
def _add_memory(cfg: IAPTServingBenchConfig, servers: Servers, rows: list[dict[str, Any]], ids: Any, device: Any,
                seed: int, threads: int) -> str:
    source = ""
    for r in rows:
        if device.type == "cpu" and cfg.isolate_memory:
            r["peak_mb"], how = run_in_fresh_process(measure_peak_memory, cfg, r["method"], r["tenants"], seed, threads)
            how += ", a fresh process per cell"
        else:
            r["peak_mb"], how = _peak_mb(servers, r["method"], r["tenants"], ids, cfg.new_tokens, device)
        source = source or how
    return source


def _add_checks(cfg: IAPTServingBenchConfig, servers: Servers, rows: list[dict[str, Any]], ids: Any,
                outputs: dict[tuple[str, int], Any]) -> None:
    bare = outputs[("bare", 1)]
    for r in rows:
        cell = (r["method"], r["tenants"])
        if r["method"] != "bare":
            r["rows_changed_vs_bare"] = (outputs[cell] != bare).any(1).double().mean().item()
        if r["method"] in MIXED and cfg.check:
            r["tokens_match"] = _check_cell(servers, *cell, ids, outputs[cell], cfg.new_tokens)


def _measure(cfg: IAPTServingBenchConfig, seed: int, device: Any, dtype: Any, threads: int) -> dict[str, Any]:
    from torch import nn

    from leanfit.core.progress import progress_bar

    clock = [time.perf_counter()]
    servers = build_servers(cfg, device, dtype, seed)
    ids = _prompts(cfg, servers, seed).to(device)
    todo = cells(cfg)
    clock.append(time.perf_counter())
    with progress_bar(len(todo) * (cfg.warmup + cfg.repeats), "iapt-serving bench") as bar:
        times, outputs = _time_cells(cfg, servers, todo, ids, device, bar)
    clock.append(time.perf_counter())
    config = servers.bare.config
    linear = sum(m.weight.numel() for m in servers.bare.modules() if isinstance(m, nn.Linear))
    flops = decode_flops(config, cfg, linear, servers.counts["lora_params_per_adapter"])
    rows = [_row(cfg, servers, cell, times[cell], flops) for cell in todo]
    _add_checks(cfg, servers, rows, ids, outputs)
    clock.append(time.perf_counter())
    source = _add_memory(cfg, servers, rows, ids, device, seed, threads)
    clock.append(time.perf_counter())
    spans = [b - a for a, b in zip(clock[:-1], clock[1:], strict=True)]
    phases = dict(zip(("load", "timing", "checks", "memory"), spans, strict=True))
    _add_ratios(rows)
    summary = _summary(rows)
    counts = {**servers.counts, "lora_rank": servers.lora_rank, "lora_targets": list(cfg.lora_targets)}
    return {"rows": rows, "summary": summary, "headline": _headline(summary), "counts": counts, "flops": flops,
            "model": cfg.model, "layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
            "backbone_params": sum(p.numel() for p in servers.bare.parameters()),
            "num_soft_tokens": cfg.num_soft_tokens, "bottleneck": cfg.bottleneck, "device": str(device),
            "dtype": str(dtype).removeprefix("torch."), "threads": threads, "phase_seconds": phases,
            "peak_memory_source": source}


@register("iapt-serving", kind="benchmark", description="one backbone, N tenants in mixed batches: bare, unmerged "
          "LoRA, PEFT mixed-batch LoRA and IAPT; prefill, decode time, tokens/s, peak memory",
          config_cls=IAPTServingBenchConfig, presets=PRESETS, report=report)
def run(ctx: RunContext[IAPTServingBenchConfig]) -> dict[str, Any]:
    import torch

    from leanfit.core.device import resolve_device, resolve_dtype

    cfg = ctx.config
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    threads = cfg.threads if device.type == "cpu" else torch.get_num_threads()  # CUDA: torch's CPU threads as set
    with torch_threads(threads, small_workload=True) as threads:
        return _measure(cfg, ctx.seed, device, dtype, threads)
