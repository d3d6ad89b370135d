"""Choosing the noisy decoder blocks and their noise scales before training.

Two scores per layer, both measured in eval mode without gradient (the injector forced on), on up to
``config.calib_batches`` training batches; the model's train/eval modes are restored afterwards.

- ``"snr"``, the paper's: SNR_l = mean|h_l| / mean|n_l| where h_l is block l's clean output (read from a forward
  hook on the block, not from ``output_hidden_states``, whose last entry is after the final norm) and n_l is noise
  drawn directly on h_l with the injector's formula, over 10 draws; nothing is propagated. It depends only on the
  distribution of h_l: with leanfit's RMS-relative noise it measures the shape of the activations (mean |h| over
  RMS, and the robust weights), with the reference v1 noise it falls as 1/activation size. ``snr_high:k`` /
  ``snr_low:k`` keep the k largest / smallest; the scales stay at ``rel_noise``. Under ``paper_v1`` the probe
  copies the reference: the first batch only, padding included, base std ``noise_std * std(h)``.
- ``"propagated"``, leanfit's: inject noise at one layer only and measure the symmetric KL
  ``(KL(p||q) + KL(q||p)) / 2`` between the clean and the noisy next-token distributions, averaged over the
  completion tokens (shifted labels != -100). Layers are ranked by this KL at ``rel_noise`` and the top k are
  kept (k = ceil(sqrt(L)) for ``"auto"``). Rule for the scales: the target is the median KL of the kept layers
  at ``rel_noise``; each kept layer is measured at every scale of ``calib_scales`` (plus ``rel_noise``) and gets
  the scale where its KL reaches the target, interpolated linearly in log(scale)-log(KL) between the two grid
  points that bracket it (clamped to the grid's ends). All layers and scales of one batch see the same normal
  draw (the injector is reseeded with ``seed + batch index``), so the KL curves are smooth in the scale and the
  result is deterministic.

Several processes: when a ``torch.distributed`` process group is initialised, :func:`calibrate` is a collective
(every process must call it): each process measures its own batches, the sums and token counts behind the scores
are added over all processes (``all_reduce``) before anything is chosen, and batch ``b`` of process ``r`` draws
its noise as batch ``offset_r + b`` (the batches of the lower ranks come first). Every process thus picks the same
layers and scales, those that one process picks on the union of the batches in rank order (up to the order of
floating-point additions). :func:`snr_scores` and :func:`propagated_kl` alone measure the local batches only.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from leanfit.core.errors import ConfigError, bad_value
from leanfit.noisefit.config import CalibrationResult, NoiseFiTConfig, brief, check_int, check_real
from leanfit.noisefit.injector import (
    NoiseInjector,
    find_decoder_layers,
    paper_v1_noise_std,
    process_rank,
    token_noise_std,
)
from leanfit.noisefit.loss import masked_kl, shifted_completion_mask, statistics_mask

__all__ = ["CalibrationResult", "SNR_DRAWS", "calibrate", "propagated_kl", "scale_for_target", "snr_scores"]

SNR_DRAWS = 10
"""Noise draws per layer in the SNR probe (the reference's number)."""


@contextlib.contextmanager
def _calibration_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and no gradient; every module's own training flag is restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, mode in modes:
            module.training = mode


def _check_config(config: Any) -> NoiseFiTConfig:
    if not isinstance(config, NoiseFiTConfig):
        raise TypeError(bad_value("config", type(config).__name__, "a NoiseFiTConfig",
                                  "build one with NoiseFiTConfig(...)"))
    return config


def _check_batch(i: int, batch: Any, need_labels: bool) -> None:
    """One calibration batch: a dict with input_ids (B, T), B >= 1, and (where needed) integer labels of the same
    shape holding a completion token after the next-token shift."""
    if not isinstance(batch, dict) or "input_ids" not in batch:
        raise ConfigError(bad_value("batches", f"item {i} of type {type(batch).__name__}", "dicts with "
                                    "input_ids, attention_mask and labels"))
    ids, labels = batch["input_ids"], batch.get("labels")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise TypeError(bad_value("input_ids", f"{brief(ids)} in batch {i}", "a (B, T) tensor of token ids",
                                  "collate the batch into tensors"))
    if ids.numel() == 0:
        raise ConfigError(bad_value("batches", f"batch {i} of shape {tuple(ids.shape)}", "non-empty batches (B >= 1 "
                                    "rows of T >= 2 tokens)", "drop the empty batch"))
    for key in ("labels", "attention_mask"):
        value = batch.get(key)
        if value is not None and (not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(ids.shape)):
            raise ConfigError(bad_value(key, f"{brief(value)} in batch {i}", f"the shape of input_ids "
                                        f"{tuple(ids.shape)}", "collate labels and attention_mask with input_ids"))
    if labels is not None and (labels.dtype == torch.bool or labels.dtype.is_floating_point):
        raise TypeError(bad_value("labels", f"{brief(labels)} in batch {i}", "an integer tensor (-100 = ignored)",
                                  "convert it with .long()"))
    if need_labels and (labels is None or not bool(shifted_completion_mask(labels).any())):
        raise ConfigError(bad_value("batches", f"batch {i} with no completion token", "batches whose labels "
                                    "hold at least one token != -100 after the next-token shift"))


def _check_batches(batches: Iterable[dict[str, Any]], config: NoiseFiTConfig, device: torch.device) -> list[dict]:
    if isinstance(batches, Mapping | torch.Tensor | str) or not isinstance(batches, Iterable):
        raise TypeError(bad_value("batches", brief(batches) if isinstance(batches, torch.Tensor) else
                                  type(batches).__name__, "an iterable of batch dicts (a list or a DataLoader)",
                                  "wrap a single batch in a list: [batch]"))
    n_use = 1 if config.paper_v1 else config.calib_batches
    out = []
    for i, batch in enumerate(batches):
        if i >= n_use:
            break
        _check_batch(i, batch, need_labels=not config.paper_v1)
        out.append({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
    if not out:
        raise ConfigError(bad_value("batches", "an empty list", "at least one training batch"))
    return out


def _check_batch_list(batches: Any, need_labels: bool) -> None:
    """The ``batches`` of :func:`snr_scores` and :func:`propagated_kl`: a non-empty list of valid batches."""
    if isinstance(batches, Mapping | str) or not isinstance(batches, Sequence):
        raise TypeError(bad_value("batches", type(batches).__name__, "a list of batch dicts",
                                  "wrap a single batch in a list: [batch]"))
    if not batches:
        raise ConfigError(bad_value("batches", batches, "at least one batch", "pass the calibration batches"))
    for i, batch in enumerate(batches):
        _check_batch(i, batch, need_labels)


def _check_pairs(pairs: Any, n_layers: int) -> list[tuple[int, float]]:
    expected = f"a list of (layer, scale) pairs, layer in [0, {n_layers}) and scale > 0 finite"
    if isinstance(pairs, Mapping | str) or not isinstance(pairs, Iterable):
        raise TypeError(bad_value("pairs", pairs, expected, "pass e.g. [(0, 0.05), (1, 0.1)]"))
    pairs, out = list(pairs), []
    for pair in pairs:
        if not (isinstance(pair, tuple | list) and len(pair) == 2) or any(isinstance(v, bool) for v in pair) or \
                not (isinstance(pair[0], numbers.Integral) and isinstance(pair[1], numbers.Real)):
            raise TypeError(bad_value("pairs", pairs, expected, "pass e.g. [(0, 0.05), (1, 0.1)]"))
        layer, scale = int(pair[0]), float(pair[1])
        if not (0 <= layer < n_layers and math.isfinite(scale) and scale > 0):
            raise ConfigError(bad_value("pairs", pairs, expected, f"the model has {n_layers} decoder blocks"))
        out.append((layer, scale))
    return out


def _inputs(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in batch.items() if k != "labels"}


@torch.no_grad()
def snr_scores(model: nn.Module, batches: list[dict[str, Any]], config: NoiseFiTConfig,
               n_draws: int = SNR_DRAWS) -> list[float]:
    """Per-layer SNR mean|h| / (mean|noise| + 1e-6), noise drawn directly on each block's clean output.

    leanfit: valid tokens = :func:`statistics_mask`, noise = :func:`token_noise_std` at ``rel_noise``; paper_v1:
    every position and the v1 probe noise (base ``rel_noise * std(h)``). Put the model in eval mode first.
    batches: a non-empty list (as for :func:`calibrate`, all used); n_draws >= 1."""
    config = _check_config(config)
    n_draws = check_int("n_draws", n_draws, ge=1, fix=f"the reference uses {SNR_DRAWS}")
    _check_batch_list(batches, need_labels=not config.paper_v1)
    return _snr_ratios(*_snr_sums(model, batches, config, n_draws), n_draws)


def _snr_ratios(signal: list[float], noise: list[float], count: list[float], n_draws: int) -> list[float]:
    return [(s / c) / (n / (c * n_draws) + 1e-6) for s, n, c in zip(signal, noise, count, strict=True)]


def _snr_sums(model: nn.Module, batches: list[dict[str, Any]], config: NoiseFiTConfig, n_draws: int,
              first_batch: int = 0) -> tuple[list[float], list[float], list[float]]:
    """Per layer: sum |h|, sum |noise| over the draws and the number of elements, over ``batches``; batch ``b``
    draws with seed ``config.seed + first_batch + b``."""
    blocks = find_decoder_layers(model)
    signal, noise, count = [0.0] * len(blocks), [0.0] * len(blocks), [0.0] * len(blocks)
    captured: dict[int, torch.Tensor] = {}
    hooks = [b.register_forward_hook(_capture(captured, i)) for i, b in enumerate(blocks)]
    try:
        for b, batch in enumerate(batches):
            model(**_inputs(batch))
            mask = None if config.paper_v1 else statistics_mask(batch["labels"])
            gen = torch.Generator(device=captured[0].device).manual_seed(config.seed + first_batch + b)
            for i in range(len(blocks)):
                h = captured[i].float()
                std = _probe_std(h, mask, config)
                keep = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device) if mask is None else mask
                signal[i] += float(h[keep].abs().sum())
                count[i] += int(keep.sum()) * h.shape[-1]
                for _ in range(n_draws):
                    draw = torch.randn(h.shape, generator=gen, device=h.device) * std
                    noise[i] += float(draw[keep].abs().sum())
    finally:
        for hook in hooks:
            hook.remove()
    return signal, noise, count


def _capture(store: dict[int, torch.Tensor], layer: int):  # noqa: ANN202 - a closure over the layer index
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        store[layer] = (output if isinstance(output, torch.Tensor) else output[0]).detach()

    return hook


def _probe_std(h: torch.Tensor, mask: torch.Tensor | None, config: NoiseFiTConfig) -> torch.Tensor:
    if config.paper_v1:  # the reference's probe applies noise_std once
        return paper_v1_noise_std(h, config.rel_noise * float(h.std()), beta=config.robust_beta,
                                  max_factor=config.max_token_factor)
    return token_noise_std(h, mask, scale=config.rel_noise, token_adaptive=config.token_adaptive,
                           beta=config.robust_beta, max_factor=config.max_token_factor)


@torch.no_grad()
def propagated_kl(model: nn.Module, batches: list[dict[str, Any]], config: NoiseFiTConfig,
                  pairs: list[tuple[int, float]]) -> dict[tuple[int, float], float]:
    """Symmetric KL between clean and noisy next-token distributions on the completion tokens, for each
    (layer, relative scale) in ``pairs``, noise at that layer only. Put the model in eval mode first (the
    injector is forced on), or dropout adds to the measured KL. batches: a non-empty list of batches with
    labels; a repeated pair is measured once."""
    config = _check_config(config)
    pairs = _check_pairs(pairs, len(find_decoder_layers(model)))
    _check_batch_list(batches, need_labels=True)
    sums, tokens = _kl_sums(model, batches, config, pairs)
    return {key: value / tokens for key, value in sums.items()}


def _kl_sums(model: nn.Module, batches: list[dict[str, Any]], config: NoiseFiTConfig, pairs: list[tuple[int, float]],
             first_batch: int = 0) -> tuple[dict[tuple[int, float], float], float]:
    """:func:`propagated_kl` before the division: the KL summed over completion tokens per distinct pair, and the
    number of those tokens; batch ``b`` draws with seed ``config.seed + first_batch + b``."""
    sums = dict.fromkeys(pairs, 0.0)
    tokens = 0
    by_layer: dict[int, list[float]] = {}
    for layer, scale in sums:  # distinct pairs, in order
        by_layer.setdefault(layer, []).append(scale)
    for b, batch in enumerate(batches):
        inputs, labels = _inputs(batch), batch["labels"]
        mask, token_mask = shifted_completion_mask(labels), statistics_mask(labels)
        noise_mask = batch.get("attention_mask")
        clean = model(**inputs).logits[:, :-1]
        tokens += int(mask.sum())
        for layer, scales in by_layer.items():
            injector = NoiseInjector(model, config, layers=[layer], rank=0)  # the draw depends on the batch only
            try:
                for scale in scales:
                    injector.scales[layer] = scale
                    injector.reseed(config.seed + first_batch + b)
                    with injector.noisy(token_mask=token_mask, noise_mask=noise_mask, force=True):
                        noisy = model(**inputs).logits[:, :-1]
                    kl = masked_kl(clean, noisy, mask, num_items=1) + masked_kl(noisy, clean, mask, num_items=1)
                    sums[(layer, scale)] += 0.5 * float(kl)
            finally:
                injector.remove()
    return sums, float(tokens)


def scale_for_target(scales: list[float], kls: list[float], target: float) -> float:
    """The scale where KL reaches ``target``: log-log interpolation between the first pair of ascending grid
    scales whose KLs bracket it; the smallest (largest) scale when every KL is above (below) the target.

    scales: finite, > 0; kls: as many finite values (ones below 1e-30, rounding errors of a zero KL included, count
    as 1e-30); target: finite, >= 0."""
    _check_grid(scales, kls)
    check_real("target", target, ge=0, fix="pass the KL to reach, e.g. the median KL of the kept layers")
    order = sorted(range(len(scales)), key=lambda i: scales[i])
    s = [scales[i] for i in order]
    k = [max(kls[i], 1e-30) for i in order]
    if target <= k[0]:
        return s[0]
    for i in range(len(s) - 1):
        lo, hi = k[i], k[i + 1]
        if min(lo, hi) <= target <= max(lo, hi):
            if hi == lo:
                return s[i]
            frac = (math.log(target) - math.log(lo)) / (math.log(hi) - math.log(lo))
            return math.exp(math.log(s[i]) + frac * (math.log(s[i + 1]) - math.log(s[i])))
    return s[-1]


def _check_grid(scales: Any, kls: Any) -> None:
    for name, values in (("scales", scales), ("kls", kls)):
        if isinstance(values, str | bytes | Mapping) or not isinstance(values, Sequence):
            raise TypeError(bad_value(name, values, "a list of numbers"))
    if not scales:
        raise ConfigError(bad_value("scales", scales, "at least one scale", "pass the grid of relative scales"))
    for s in scales:
        check_real("scales", s, gt=0, shown=scales, fix="relative noise scales are positive")
    if len(kls) != len(scales):
        raise ConfigError(bad_value("kls", kls, f"{len(scales)} values, one per scale"))
    for k in kls:
        check_real("kls", k, shown=kls, fix="measure the KL of every scale on finite logits")


def _median(values: list[float]) -> float:
    """Median; for an even count the geometric mean of the two middle values (KLs vary on a log scale)."""
    v, n = sorted(values), len(values)
    if n % 2:
        return v[n // 2]
    return math.sqrt(max(v[n // 2 - 1], 1e-30) * max(v[n // 2], 1e-30))


def _ranked(scores: list[float], descending: bool) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: (-scores[i] if descending else scores[i], i))


def calibrate(model: nn.Module, batches: Iterable[dict[str, Any]], config: NoiseFiTConfig) -> CalibrationResult:
    """Choose the noisy layers and their scales (see the module docstring).

    batches: dicts with ``input_ids``, ``attention_mask``, ``labels`` (B, T) as for training; the first
    ``config.calib_batches`` are used (one under ``paper_v1``), moved to the model's device. Under an initialised
    ``torch.distributed`` process group every process must call it, each with its own batches: the measurements
    are summed over the processes and all of them return the same result (``details["n_batches"]`` counts the
    batches of all processes)."""
    config = _check_config(config)
    blocks = find_decoder_layers(model)
    n_layers, spec = len(blocks), config.layer_spec()
    param = next(iter(model.parameters()), None)
    procs = _processes(torch.device("cpu") if param is None else param.device)
    used, first, total = _shared_batches(batches, config, procs)
    if spec.kind == "explicit" and max(spec.indices) >= n_layers:
        raise ConfigError(bad_value("layers", config.layers, f"indices in [0, {n_layers})"))
    method = config.calibration_method()
    details: dict[str, Any] = {"n_layers": n_layers, "n_batches": total, "n_processes": procs.world,
                               "spec": list(spec)}
    with _calibration_mode(model):
        if method == "snr":
            sums = _snr_sums(model, used, config, SNR_DRAWS, first)
            signal, noise, count = _split(_all_sum([v for part in sums for v in part], procs), n_layers)
            scores: list[float | None] = list(_snr_ratios(signal, noise, count, SNR_DRAWS))
            order = _ranked(scores, descending=spec.kind != "snr_low")  # type: ignore[arg-type]
            layers = list(spec.indices) if spec.kind == "explicit" else sorted(order[: spec.n_keep(n_layers)])
            scales = {i: float(config.rel_noise) for i in layers}
            details["ranking"] = order
        else:
            layers, scales, scores = _propagated(model, used, config, spec, n_layers, details, procs, first)
    return CalibrationResult(layers, scales, scores, method, details)


def _propagated(model: nn.Module, batches: list[dict[str, Any]], config: NoiseFiTConfig, spec: Any, n_layers: int,
                details: dict[str, Any], procs: _Processes,
                first: int) -> tuple[list[int], dict[int, float], list[float | None]]:
    rel = float(config.rel_noise)
    candidates = list(spec.indices) if spec.kind == "explicit" else list(range(n_layers))
    at_rel = _shared_kl(model, batches, config, [(i, rel) for i in candidates], procs, first)
    scores: list[float | None] = [at_rel.get((i, rel)) for i in range(n_layers)]
    order = _ranked([at_rel[(i, rel)] for i in candidates], descending=True)
    layers = sorted(candidates[j] for j in order[: spec.n_keep(n_layers)])
    grid = sorted(set(config.calib_scales) - {rel})
    kl_grid = _shared_kl(model, batches, config, [(i, s) for i in layers for s in grid], procs, first)
    kl_grid.update({(i, rel): at_rel[(i, rel)] for i in layers})
    target = _median([at_rel[(i, rel)] for i in layers])
    all_scales = sorted(set(grid) | {rel})
    scales = {i: scale_for_target(all_scales, [kl_grid[(i, s)] for s in all_scales], target) for i in layers}
    details.update(target_kl=target, scale_grid=all_scales,
                   kl_grid={i: [kl_grid[(i, s)] for s in all_scales] for i in layers})
    return layers, scales, scores


def _shared_kl(model: nn.Module, batches: list[dict[str, Any]], config: NoiseFiTConfig,
               pairs: list[tuple[int, float]], procs: _Processes, first: int) -> dict[tuple[int, float], float]:
    """:func:`propagated_kl` over the batches of all processes: sums and token counts added before dividing."""
    sums, tokens = _kl_sums(model, batches, config, pairs, first)
    *totals, all_tokens = _all_sum([*sums.values(), tokens], procs)
    return {key: value / all_tokens for key, value in zip(sums, totals, strict=True)}


# ------------------------------------------------------------------------------------------- several processes
class _Processes(NamedTuple):
    """The default ``torch.distributed`` group as calibration sees it (rank 0 of 1 without one); ``device``: where
    the tensors of the collectives live (the model's device, which the group's backend serves)."""

    rank: int
    world: int
    device: torch.device


def _processes(device: torch.device) -> _Processes:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return _Processes(process_rank(), dist.get_world_size(), device)
    return _Processes(0, 1, device)


def _all_sum(values: list[float], procs: _Processes) -> list[float]:
    """``values`` added element-wise over all processes, in float64 (as given for one process)."""
    if procs.world == 1:
        return values
    totals = torch.tensor(values, dtype=torch.float64, device=procs.device)
    torch.distributed.all_reduce(totals)
    return [float(v) for v in totals.tolist()]


def _split(values: list[float], n: int) -> list[list[float]]:
    return [values[i : i + n] for i in range(0, len(values), n)]


def _shared_batches(batches: Iterable[dict[str, Any]], config: NoiseFiTConfig,
                    procs: _Processes) -> tuple[list[dict[str, Any]], int, int]:
    """This process's checked batches, the global index of its first batch and the number of batches of all
    processes. The counts are exchanged before a rejected batch raises, so that the other processes raise too
    instead of waiting forever in the next collective."""
    try:
        used, error = _check_batches(batches, config, procs.device), None
    except (TypeError, ValueError) as err:
        used, error = [], err
    mine = -1.0 if error is not None else float(len(used))
    counts = [int(c) for c in _all_sum([mine if r == procs.rank else 0.0 for r in range(procs.world)], procs)]
    if error is not None:
        raise error
    rejected = [r for r, c in enumerate(counts) if c < 0]
    if rejected:
        raise ConfigError(bad_value("batches", f"rejected on process(es) {rejected}", "valid calibration batches "
                                    "on every process", "see the error those processes raised"))
    return used, sum(counts[: procs.rank]), sum(counts)
