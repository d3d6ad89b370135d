"""Config of NoiseFiT training (noise injection into chosen decoder blocks plus a distillation/consistency loss).

One dataclass holds every knob of the injector, the layer calibration and the loss, so that a run record shows
them together. ``paper_v1=True`` switches all three to the reference implementation's v1 behaviour, defects
included (see ``leanfit.noisefit.loss`` for the list), to compare against it. :class:`CalibrationResult` is
what the calibration pass hands to the injector (the chosen blocks and their noise scales).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from leanfit.core.config import BaseConfig, option
from leanfit.core.errors import ConfigError, bad_value

__all__ = ["CalibrationResult", "LayerSpec", "NoiseFiTConfig", "V1_DEFAULT_LAYERS"]

V1_DEFAULT_LAYERS = 3
"""Layers the reference v1 picks ("Largest" SNR) when ``layers="auto"`` under ``paper_v1``."""

_LAYER_FORMS = '"auto", "auto:k", "snr_high:k", "snr_low:k", comma-separated indices such as "2,5", or a list of ints'


class LayerSpec(NamedTuple):
    """Normalised ``layers`` option.

    kind: "auto" (rank by ``calibration``), "snr_high"/"snr_low" (rank by SNR, keep the top/bottom k) or
    "explicit"; k: how many layers to keep (None = ceil(sqrt(L)) for "auto"); indices: the explicit layers."""

    kind: Literal["auto", "snr_high", "snr_low", "explicit"]
    k: int | None = None
    indices: tuple[int, ...] = ()

    def n_keep(self, n_layers: int) -> int:
        """How many layers calibration keeps out of ``n_layers`` (k, ceil(sqrt(L)) for "auto", capped at L)."""
        if self.kind == "explicit":
            return len(self.indices)
        return min(n_layers, self.k if self.k is not None else math.ceil(math.sqrt(n_layers)))


def _parse_layers(value: str | list[int] | tuple[int, ...]) -> LayerSpec:
    if isinstance(value, list | tuple):
        if not value or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
            raise ConfigError(bad_value("layers", value, _LAYER_FORMS, "pass a non-empty list of layer indices"))
        return _explicit(list(value), value)
    if not isinstance(value, str):
        raise ConfigError(bad_value("layers", value, _LAYER_FORMS))
    text = value.strip().lower()
    if text == "auto":
        return LayerSpec("auto")
    head, sep, tail = text.partition(":")
    if sep:
        if head not in ("auto", "snr_high", "snr_low") or not tail.strip().isdigit() or int(tail) < 1:
            raise ConfigError(bad_value("layers", value, _LAYER_FORMS, "write for example snr_high:3"))
        return LayerSpec(head, int(tail))  # type: ignore[arg-type]
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() for p in parts):
        raise ConfigError(bad_value("layers", value, _LAYER_FORMS, 'write for example "auto" or "2,5"'))
    return _explicit([int(p) for p in parts], value)


def _explicit(indices: list[int], value: object) -> LayerSpec:
    if any(i < 0 for i in indices) or len(set(indices)) != len(indices):
        raise ConfigError(bad_value("layers", value, "distinct non-negative layer indices", "drop repeated or "
                                    "negative indices"))
    return LayerSpec("explicit", len(indices), tuple(sorted(indices)))


@dataclass
class NoiseFiTConfig(BaseConfig):
    """Everything NoiseFiT needs: where and how much noise, how layers are calibrated, and the loss weights."""

    layers: str | list[int] = option("auto", help='noisy decoder blocks: "auto" (calibrated, k=ceil(sqrt(L))), '
                                     '"auto:k", "snr_high:k", "snr_low:k" or indices "2,5"')
    rel_noise: float = option(0.05, help="noise std relative to each token's RMS over the hidden dimension "
                                         "(paper_v1: the reference's noise_std)")
    token_adaptive: bool = option(True, help="scale noise per token (variance ratio, clipped) and per element "
                                             "(robust weight); off = isotropic rel_noise*RMS_t")
    robust_beta: float = option(0.1, help="beta of the per-element weight exp(-beta*|h-median_t|/MAD_t)")
    max_token_factor: float = option(5.0, help="clip of the per-token factor var_t/mean(var)")
    n_noisy: int = option(1, help="noisy branches per step: 1 (step cost about 2x SFT) or 2 (needed by the "
                                  "consistency term; about 3x)")
    alpha: float = option(0.5, help="weight of the cross-entropy term; the soft (clean->noisy KL) term gets 1-alpha")
    lam: float = option(0.0, help="weight of the consistency KL between the two noisy branches (needs n_noisy=2; "
                                  "the reference uses 0.1, its 2026 version 0.05)")
    temperature: float = option(1.0, help="distillation temperature T (both sides, loss times T^2)")
    kl: Literal["forward", "symmetric"] = option("symmetric", help="consistency term: symmetric KL between "
                                                 "the noisy branches, or KL to a detached first branch")
    calibration: Literal["propagated", "snr"] = option("propagated", help='how "auto" and explicit layers are '
                                                       "scored: KL at the logits (and per-layer scales) or the "
                                                       "paper's SNR")
    calib_batches: int = option(4, help="training batches used by calibration (paper_v1: 1)")
    calib_scales: tuple[float, ...] = option((0.0125, 0.025, 0.05, 0.1, 0.2),
                                             help="relative noise scales tried per kept layer by the propagated "
                                                  "calibration (plus rel_noise)")
    paper_v1: bool = option(False, help="reproduce the reference v1 trainer, defects included (forces n_noisy=2, "
                                        "calibration=snr, auto=snr_high:3)")
    seed: int = option(0, help="seed of the injector's noise generator")

    def __post_init__(self) -> None:
        if isinstance(self.layers, tuple):
            self.layers = list(self.layers)
        self.layer_spec()  # validates
        self._check_positive()
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(bad_value("alpha", self.alpha, "a weight in [0, 1]", "alpha=1 is plain cross-entropy"))
        if self.paper_v1:
            self.n_noisy, self.calibration = 2, "snr"
        if self.n_noisy not in (1, 2):
            raise ConfigError(bad_value("n_noisy", self.n_noisy, "1 or 2"))
        if self.lam > 0 and self.n_noisy == 1:
            raise ConfigError(bad_value("lam", self.lam, "0 when n_noisy=1 (the consistency term compares two "
                                        "noisy branches)", "set n_noisy=2 or lam=0"))
        if self.kl not in ("forward", "symmetric"):
            raise ConfigError(bad_value("kl", self.kl, "'forward' or 'symmetric'"))
        if self.calibration not in ("propagated", "snr"):
            raise ConfigError(bad_value("calibration", self.calibration, "'propagated' or 'snr'"))

    def _check_positive(self) -> None:
        for name in ("rel_noise", "temperature", "max_token_factor"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(bad_value(name, value, "a finite number > 0"))
        for name in ("lam", "robust_beta"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ConfigError(bad_value(name, value, "a finite number >= 0"))
        if self.calib_batches < 1:
            raise ConfigError(bad_value("calib_batches", self.calib_batches, "an integer >= 1"))
        scales = tuple(float(s) for s in self.calib_scales)
        if not scales or not all(math.isfinite(s) and s > 0 for s in scales):
            raise ConfigError(bad_value("calib_scales", self.calib_scales, "a non-empty list of relative scales > 0",
                                        "for example [0.025, 0.05, 0.1]"))
        self.calib_scales = scales

    def layer_spec(self) -> LayerSpec:
        """The ``layers`` option parsed (``"auto"`` means ``snr_high:3`` under ``paper_v1``)."""
        spec = _parse_layers(self.layers)
        if self.paper_v1 and spec.kind == "auto" and spec.k is None:
            return LayerSpec("snr_high", V1_DEFAULT_LAYERS)
        return spec

    def calibration_method(self) -> Literal["propagated", "snr"]:
        """The method calibration scores layers with: SNR for ``snr_high``/``snr_low``, else ``calibration``."""
        return "snr" if self.layer_spec().kind in ("snr_high", "snr_low") else self.calibration


@dataclass
class CalibrationResult:
    """layers: chosen block indices (ascending); scales: relative noise per chosen layer; scores: per-layer
    ranking score (SNR or KL at ``rel_noise``; None where not measured); method: "snr" or "propagated";
    details: the measurements behind the choice (KL grid, target, batches used)."""

    layers: list[int]
    scales: dict[int, float]
    scores: list[float | None]
    method: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain (JSON/YAML-safe) dict for the run record."""
        return {"method": self.method, "layers": list(self.layers), "scores": list(self.scores),
                "scales": {str(k): v for k, v in self.scales.items()}, "details": _plain(self.details)}


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
