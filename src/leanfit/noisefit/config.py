"""Config of NoiseFiT training (noise injection into chosen decoder blocks plus a distillation/consistency loss).

One dataclass holds every knob of the injector, the layer calibration and the loss, so that a run record shows
them together. ``paper_v1=True`` switches all three to the reference implementation's v1 behaviour, defects
included (see ``leanfit.noisefit.loss`` for the list), to compare against it. :class:`CalibrationResult` is
what the calibration pass hands to the injector (the chosen blocks and their noise scales).
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Mapping, Sequence
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
        check_int("n_layers", n_layers, ge=1, fix="pass the number of decoder blocks of the model")
        if self.kind == "explicit":
            return len(self.indices)
        if self.k is not None:
            check_int("k", self.k, ge=1, fix='keep at least one layer, for example LayerSpec("auto", 2)')
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
    rel_noise: float = option(0.05, gt=0, help="noise std relative to each token's RMS over the hidden dimension "
                                               "(paper_v1: the reference's noise_std)")
    token_adaptive: bool = option(True, help="scale noise per token (variance ratio, clipped) and per element "
                                             "(robust weight); off = isotropic rel_noise*RMS_t")
    robust_beta: float = option(0.1, ge=0, help="beta of the per-element weight exp(-beta*|h-median_t|/MAD_t)")
    max_token_factor: float = option(5.0, gt=0, help="clip of the per-token factor var_t/mean(var)")
    n_noisy: int = option(1, help="noisy branches per step: 1 (step cost about 2x SFT) or 2 (needed by the "
                                  "consistency term; about 3x)")
    alpha: float = option(0.5, help="weight of the cross-entropy term; the soft (clean->noisy KL) term gets 1-alpha")
    lam: float = option(0.0, ge=0, help="weight of the consistency KL between the two noisy branches (needs "
                                        "n_noisy=2; the reference uses 0.1, its 2026 version 0.05)")
    temperature: float = option(1.0, gt=0, help="distillation temperature T (both sides, loss times T^2)")
    kl: Literal["forward", "symmetric"] = option("symmetric", help="consistency term: symmetric KL between "
                                                 "the noisy branches, or KL to a detached first branch")
    calibration: Literal["propagated", "snr"] = option("propagated", help='how "auto" and explicit layers are '
                                                       "scored: KL at the logits (and per-layer scales) or the "
                                                       "paper's SNR")
    calib_batches: int = option(4, ge=1, help="training batches used by calibration (paper_v1: 1)")
    calib_scales: tuple[float, ...] = option((0.0125, 0.025, 0.05, 0.1, 0.2), gt=0,
                                             help="relative noise scales tried per kept layer by the propagated "
                                                  "calibration (plus rel_noise)")
    paper_v1: bool = option(False, help="reproduce the reference v1 trainer, defects included (forces n_noisy=2, "
                                        "calibration=snr, auto=snr_high:3)")
    seed: int = option(0, ge=0, lt=2**63, help="seed of the injector's noise generator (an integer >= 0)")

    def __post_init__(self) -> None:
        # types, finiteness and the bounds declared above are checked by BaseConfig before this runs
        if isinstance(self.layers, tuple):
            self.layers = list(self.layers)
        self.layer_spec()  # validates
        self.calib_scales = _check_scales(self.calib_scales)
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(bad_value("alpha", self.alpha, "a weight in [0, 1]", "alpha=1 is plain cross-entropy"))
        if self.paper_v1:
            self.n_noisy, self.calibration = 2, "snr"
        if self.n_noisy not in (1, 2):
            raise ConfigError(bad_value("n_noisy", self.n_noisy, "1 or 2"))
        if self.lam > 0 and self.n_noisy == 1:
            raise ConfigError(bad_value("lam", self.lam, "0 when n_noisy=1 (the consistency term compares two "
                                        "noisy branches)", "set n_noisy=2 or lam=0"))

    def layer_spec(self) -> LayerSpec:
        """The ``layers`` option parsed (``"auto"`` means ``snr_high:3`` under ``paper_v1``)."""
        spec = _parse_layers(self.layers)
        if self.paper_v1 and spec.kind == "auto" and spec.k is None:
            return LayerSpec("snr_high", V1_DEFAULT_LAYERS)
        return spec

    def calibration_method(self) -> Literal["propagated", "snr"]:
        """The method calibration scores layers with: SNR for ``snr_high``/``snr_low``, else ``calibration``."""
        return "snr" if self.layer_spec().kind in ("snr_high", "snr_low") else self.calibration


def _check_scales(value: Any) -> tuple[float, ...]:
    fix = "for example [0.025, 0.05, 0.1]"
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise TypeError(bad_value("calib_scales", value, "a list of relative noise scales", fix))
    if any(isinstance(s, bool) or not isinstance(s, numbers.Real) for s in value):
        raise TypeError(bad_value("calib_scales", value, "a list of numbers", fix))
    if not value:
        raise ConfigError(bad_value("calib_scales", value, "a non-empty list of relative scales > 0", fix))
    return tuple(float(s) for s in value)  # finite and > 0: checked by the field's option


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

    def __post_init__(self) -> None:
        layers = self.layers
        if isinstance(layers, str | bytes) or not isinstance(layers, Sequence) or any(
                isinstance(i, bool) or not isinstance(i, numbers.Integral) for i in layers):
            raise TypeError(bad_value("layers", layers, "a list of decoder block indices (ints)"))
        if len(set(layers)) != len(layers) or any(i < 0 for i in layers):
            raise ConfigError(bad_value("layers", layers, "distinct non-negative block indices"))
        if not isinstance(self.scales, Mapping):
            raise TypeError(bad_value("scales", self.scales, "a dict {layer: relative noise scale}"))
        for layer, scale in self.scales.items():
            if layer not in layers:
                raise ConfigError(bad_value("scales", dict(self.scales), "scales only for the chosen layers "
                                            f"{layers}"))
            check_real("scales", scale, gt=0, shown=dict(self.scales))
        if isinstance(self.scores, str | bytes) or not isinstance(self.scores, Sequence):
            raise TypeError(bad_value("scores", self.scores, "a list of per-layer scores (None where not measured)"))
        for score in self.scores:
            if score is not None:
                check_real("scores", score, shown=self.scores, fix="calibration measured a non-finite score: check "
                           "that the model's outputs are finite")
        if self.method not in ("snr", "propagated"):
            raise ConfigError(bad_value("method", self.method, "'snr' or 'propagated'"))
        if not isinstance(self.details, dict):
            raise TypeError(bad_value("details", self.details, "a dict of measurements"))

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


# ------------------------------------------------------------------------ value checks shared by the noisefit modules
def brief(value: Any) -> Any:
    """What an error message shows of ``value``: a tensor (anything with shape and dtype) as its shape and dtype."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"tensor of shape {tuple(value.shape)} ({value.dtype})"
    return value


def _bounds_text(gt: float | None, ge: float | None, le: float | None) -> str:
    if ge is not None and le is not None:
        return f"a finite number in [{ge}, {le}]"
    parts = [f"{sign} {b}" for sign, b in ((">", gt), (">=", ge), ("<=", le)) if b is not None]
    return "a finite number " + " and ".join(parts) if parts else "a finite number"


def check_real(param: str, value: Any, *, gt: float | None = None, ge: float | None = None, le: float | None = None,
               fix: str | None = None, shown: Any = None) -> float:
    """``value`` as a float: a real number (not a bool; else TypeError), finite and within the bounds (else
    :class:`ConfigError`, a ValueError). Messages name ``param`` and show ``shown`` (default: the value)."""
    shown = value if shown is None else shown
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(bad_value(param, shown, "a real number", fix))
    x = float(value)
    if not (math.isfinite(x) and (gt is None or x > gt) and (ge is None or x >= ge) and (le is None or x <= le)):
        raise ConfigError(bad_value(param, shown, _bounds_text(gt, ge, le), fix))
    return x


def check_int(param: str, value: Any, *, ge: int | None = None, lt: int | None = None,
              fix: str | None = None) -> int:
    """``value`` as an int: an integer (Python, NumPy or a 0-d integer tensor; not a bool; else TypeError) within
    the bounds (else :class:`ConfigError`)."""
    try:
        if isinstance(value, bool):
            raise TypeError
        i = operator.index(value)
    except TypeError:
        raise TypeError(bad_value(param, brief(value), "an integer", fix)) from None
    if (ge is not None and i < ge) or (lt is not None and i >= lt):
        expected = "an integer" + (f" >= {ge}" if ge is not None else "") + (f" < {lt}" if lt is not None else "")
        raise ConfigError(bad_value(param, brief(value), expected, fix))
    return i
