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
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from leanfit.core.errors import ConfigError, bad_value
from leanfit.noisefit.config import CalibrationResult, NoiseFiTConfig
from leanfit.noisefit.injector import NoiseInjector, find_decoder_layers, paper_v1_noise_std, token_noise_std
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


def _check_batches(batches: Iterable[dict[str, Any]], config: NoiseFiTConfig, device: torch.device) -> list[dict]:
    n_use = 1 if config.paper_v1 else config.calib_batches
    out = []
    for i, batch in enumerate(batches):
        if i >= n_use:
            break
        if not isinstance(batch, dict) or "input_ids" not in batch:
            raise ConfigError(bad_value("batches", f"item {i} of type {type(batch).__name__}", "dicts with "
                                        "input_ids, attention_mask and labels"))
        labels = batch.get("labels")
        if batch["input_ids"].numel() == 0 or (not config.paper_v1 and (
                labels is None or not bool(shifted_completion_mask(labels).any()))):
            raise ConfigError(bad_value("batches", f"batch {i} with no completion token", "batches whose labels "
                                        "hold at least one token != -100 after the next-token shift"))
        out.append({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
    if not out:
        raise ConfigError(bad_value("batches", "an empty list", "at least one training batch"))
    return out


def _inputs(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in batch.items() if k != "labels"}


@torch.no_grad()
def snr_scores(model: nn.Module, batches: list[dict[str, Any]], config: NoiseFiTConfig,
               n_draws: int = SNR_DRAWS) -> list[float]:
    """Per-layer SNR mean|h| / (mean|noise| + 1e-6), noise drawn directly on each block's clean output.

    leanfit: valid tokens = :func:`statistics_mask`, noise = :func:`token_noise_std` at ``rel_noise``; paper_v1:
    every position and the v1 probe noise (base ``rel_noise * std(h)``). Put the model in eval mode first."""
    blocks = find_decoder_layers(model)
    signal, noise, count = [0.0] * len(blocks), [0.0] * len(blocks), [0] * len(blocks)
    captured: dict[int, torch.Tensor] = {}
    hooks = [b.register_forward_hook(_capture(captured, i)) for i, b in enumerate(blocks)]
    try:
        for b, batch in enumerate(batches):
            model(**_inputs(batch))
            mask = None if config.paper_v1 else statistics_mask(batch["labels"])
            gen = torch.Generator(device=captured[0].device).manual_seed(config.seed + b)
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
    return [(s / c) / (n / (c * n_draws) + 1e-6) for s, n, c in zip(signal, noise, count, strict=True)]


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
    injector is forced on), or dropout adds to the measured KL."""
    sums = dict.fromkeys(pairs, 0.0)
    tokens = 0
    by_layer: dict[int, list[float]] = {}
    for layer, scale in pairs:
        by_layer.setdefault(layer, []).append(scale)
    for b, batch in enumerate(batches):
        inputs, labels = _inputs(batch), batch["labels"]
        mask, token_mask = shifted_completion_mask(labels), statistics_mask(labels)
        noise_mask = batch.get("attention_mask")
        clean = model(**inputs).logits[:, :-1]
        tokens += int(mask.sum())
        for layer, scales in by_layer.items():
            injector = NoiseInjector(model, config, layers=[layer])
            try:
                for scale in scales:
                    injector.scales[layer] = scale
                    injector.reseed(config.seed + b)
                    with injector.noisy(token_mask=token_mask, noise_mask=noise_mask, force=True):
                        noisy = model(**inputs).logits[:, :-1]
                    kl = masked_kl(clean, noisy, mask, num_items=1) + masked_kl(noisy, clean, mask, num_items=1)
                    sums[(layer, scale)] += 0.5 * float(kl)
            finally:
                injector.remove()
    return {key: value / tokens for key, value in sums.items()}


def scale_for_target(scales: list[float], kls: list[float], target: float) -> float:
    """The scale where KL reaches ``target``: log-log interpolation between the first pair of ascending grid
    scales whose KLs bracket it; the smallest (largest) scale when every KL is above (below) the target."""
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
    ``config.calib_batches`` are used (one under ``paper_v1``), moved to the model's device."""
    blocks = find_decoder_layers(model)
    n_layers, spec = len(blocks), config.layer_spec()
    device = next(model.parameters()).device
    used = _check_batches(batches, config, device)
    if spec.kind == "explicit" and max(spec.indices) >= n_layers:
        raise ConfigError(bad_value("layers", config.layers, f"indices in [0, {n_layers})"))
    method = config.calibration_method()
    details: dict[str, Any] = {"n_layers": n_layers, "n_batches": len(used), "spec": list(spec)}
    with _calibration_mode(model):
        if method == "snr":
            scores: list[float | None] = list(snr_scores(model, used, config))
            order = _ranked(scores, descending=spec.kind != "snr_low")  # type: ignore[arg-type]
            layers = list(spec.indices) if spec.kind == "explicit" else sorted(order[: spec.n_keep(n_layers)])
            scales = {i: float(config.rel_noise) for i in layers}
            details["ranking"] = order
        else:
            layers, scales, scores = _propagated(model, used, config, spec, n_layers, details)
    return CalibrationResult(layers, scales, scores, method, details)


def _propagated(model: nn.Module, batches: list[dict[str, Any]], config: NoiseFiTConfig, spec: Any, n_layers: int,
                details: dict[str, Any]) -> tuple[list[int], dict[int, float], list[float | None]]:
    rel = float(config.rel_noise)
    candidates = list(spec.indices) if spec.kind == "explicit" else list(range(n_layers))
    at_rel = propagated_kl(model, batches, config, [(i, rel) for i in candidates])
    scores: list[float | None] = [at_rel.get((i, rel)) for i in range(n_layers)]
    order = _ranked([at_rel[(i, rel)] for i in candidates], descending=True)
    layers = sorted(candidates[j] for j in order[: spec.n_keep(n_layers)])
    grid = sorted(set(config.calib_scales) - {rel})
    kl_grid = propagated_kl(model, batches, config, [(i, s) for i in layers for s in grid])
    kl_grid.update({(i, rel): at_rel[(i, rel)] for i in layers})
    target = _median([at_rel[(i, rel)] for i in layers])
    all_scales = sorted(set(grid) | {rel})
    scales = {i: scale_for_target(all_scales, [kl_grid[(i, s)] for s in all_scales], target) for i in layers}
    details.update(target_kl=target, scale_grid=all_scales,
                   kl_grid={i: [kl_grid[(i, s)] for s in all_scales] for i in layers})
    return layers, scales, scores
