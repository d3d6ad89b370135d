"""The adapter config of instruction-aware prompt tuning (IAPT): one :class:`IAPTConfig` per adapter.

It is saved beside the adapter weights as ``adapter_config.json`` (with ``peft_type`` set to ``LEANFIT_IAPT``)
and records the backbone it was made for (``base_model_name_or_path``, ``hidden_size``, ``num_layers``), so that
loading onto another backbone fails with a clear message.

Zero-initialised up-projection (``init_scale=0``, the default): every soft token starts as the zero vector, so
an untrained adapter adds no content. It still changes the backbone's outputs slightly: the soft tokens are extra
sequence positions that every later token attends to, and their keys (from a zero or normalised-zero hidden
state) take a share of the attention softmax.

Pre-norm backbones (Llama, Qwen, GPT-2) normalise each layer's input, so a small soft token reaches the attention
at full size: on SmolLM2 the training loss jumped in the first steps at rates of 3e-4 and above. ``prompt_gate``
multiplies the soft positions' output of each layer's input norm by ``G = gate_scale * g``, ``g`` a learned
per-layer scalar starting at 0, and scales the bias of every linear map fed by that output (the attention's query,
key and value projections, fused as in GPT-2 or not) by ``G`` there too: at the soft positions the layer's keys
and values are ``G`` times their ungated values, so they start at exactly zero, biased projections included
(GPT-2, Qwen2), and grow as the gate opens (zero-initialised gating in the spirit of LLaMA-Adapter). Zero keys
still take a share of the attention softmax, so a closed gate is not the bare backbone. It needs
``init_scale > 0`` (zero prompts behind a zero gate get no gradient) and a pre-norm layer (a normalisation module
among each layer's direct children).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from leanfit.core.config import BaseConfig, option
from leanfit.core.errors import ConfigError, bad_value

__all__ = ["PEFT_TYPE", "RATIONAL_MAX_DEGREE", "RATIONAL_MAX_RANGE", "IAPTConfig", "check_config", "check_count"]

PEFT_TYPE = "LEANFIT_IAPT"
# beyond degree 16 the least-squares fit of the rational is ill-conditioned (its coefficients blow up), and on
# [-1e3, 1e3] the powers x^(p + q) of the fit's design matrix stay far inside float64
RATIONAL_MAX_DEGREE = 16
RATIONAL_MAX_RANGE = 1e3


@dataclass
class IAPTConfig(BaseConfig):
    num_soft_tokens: int = option(4, ge=1, help="soft tokens per layer (the paper uses 4)")
    bottleneck: int = option(64, ge=1, help="width m of the generator's down-projection d -> m (MiLoRA's IAPT: 320)")
    pooler: Literal["self_attn", "mean", "last"] = option(
        "self_attn", help="pooling of instruction tokens: one learned query per soft token (paper), or the "
                          "mean / last instruction token plus a learned per-token offset (ablations)")
    activation: Literal["rational", "gelu"] = option("rational", help="learnable rational per layer, or fixed GELU")
    rational_num_degree: int = option(5, ge=1, le=RATIONAL_MAX_DEGREE,
                                      help="numerator degree of the rational activation (MiLoRA: 6)")
    rational_den_degree: int = option(4, ge=1, le=RATIONAL_MAX_DEGREE,
                                      help="denominator degree of the rational activation (MiLoRA: 5)")
    rational_init: Literal["gelu", "relu", "silu"] = option("gelu", help="function the rational is fitted to")
    rational_range: float = option(3.0, gt=0, le=RATIONAL_MAX_RANGE,
                                   help="the rational is fitted on [-r, r] and continued linearly beyond it")
    pre_act_norm: bool = option(True, help="LayerNorm on the pooled vectors before the activation")
    layers: Literal["all"] | list[int] = option("all", ge=0, help="layers that get a generator: 'all' or indices")
    init_scale: float = option(0.0, ge=0, le=1e3,
                               help="std of the up-projection's initial weights; 0 = zero init (no content)")
    prompt_gate: bool = option(False, help="pre-norm backbones: scale the soft positions' output of each layer's "
                               "input norm, and the biases of the projections it feeds, by a zero-initialised "
                               "gate, so their keys and values grow from exactly zero (needs init_scale > 0)")
    # at most 1e4: gate_scale * g must stay far inside float32 (a huge scale times the zero gate is NaN)
    gate_scale: float = option(30.0, gt=0, le=1e4, help="the gate is gate_scale x its parameter, so it opens faster "
                               "than the generator's weights move")
    dropout: float = option(0.0, ge=0, lt=1, help="dropout on the activated vectors, before the up-projection")
    slot_position: Literal["after_first", "start"] = option(
        "after_first", help="where the soft tokens go: after the first real token (BOS / [CLS]) or before it")
    layers_path: str | None = option(None, help="dotted path of the layer ModuleList (e.g. 'model.layers'); "
                                                "None = the one ModuleList of config.num_hidden_layers modules")
    base_model_name_or_path: str | None = option(None, help="backbone id, recorded when the adapter is created")
    hidden_size: int | None = option(None, help="backbone hidden size, recorded when the adapter is created")
    num_layers: int | None = option(None, help="backbone layer count, recorded when the adapter is created")

    def __post_init__(self) -> None:
        # types, finite floats, Literal choices and the declared bounds are checked by BaseConfig before this
        for name in ("hidden_size", "num_layers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(bad_value(name, value, "None or an integer >= 1", "leave it None; it is recorded "
                                            "when the adapter is created"))
        if self.prompt_gate and self.init_scale == 0:
            raise ConfigError(bad_value("init_scale", self.init_scale, "> 0 with prompt_gate=True",
                                        "zero prompts behind a zero gate get no gradient; use e.g. 0.01"))
        self._check_layers()

    def _check_layers(self) -> None:
        if isinstance(self.layers, str):
            if self.layers != "all":
                raise ConfigError(bad_value("layers", self.layers, "'all' or a list of layer indices"))
            return
        if not isinstance(self.layers, list | tuple):
            raise TypeError(bad_value("layers", self.layers, "'all' or a list of layer indices",
                                      "for one layer write a list, e.g. layers=[0]"))
        ok = all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers)
        if not self.layers or not ok or len(set(self.layers)) != len(self.layers):
            raise ConfigError(bad_value("layers", self.layers, "'all' or a non-empty list of distinct indices >= 0"))
        if self.num_layers is not None and max(self.layers) >= self.num_layers:
            raise ConfigError(bad_value("layers", self.layers, f"indices below num_layers={self.num_layers}"))

    def layer_indices(self, num_layers: int) -> list[int]:
        """The adapted layers of a backbone with ``num_layers`` layers, ascending."""
        check_count("num_layers", num_layers, "the backbone's layer count (config.num_hidden_layers)")
        if self.layers == "all":
            return list(range(num_layers))
        if max(self.layers) >= num_layers:
            raise ConfigError(bad_value("layers", self.layers, f"indices below the backbone's {num_layers} layers"))
        return sorted(self.layers)


def check_config(config: Any, param: str = "config") -> IAPTConfig:
    """``config`` itself when it is an :class:`IAPTConfig`; a TypeError naming ``param`` and the fix otherwise (as
    in PEFT, a config object is required: a dict of options is not converted silently)."""
    if isinstance(config, IAPTConfig):
        return config
    fix = (f"build one with IAPTConfig(**{param}) (IAPTConfig.from_dict({param}) converts YAML/JSON values)"
           if isinstance(config, dict) else "build one with IAPTConfig(...)")
    raise TypeError(bad_value(param, config, f"an IAPTConfig, got {type(config).__name__}", fix))


def check_count(param: str, value: Any, what: str) -> int:
    """``value`` when it is an integer >= 1; a TypeError or ValueError naming ``param`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(bad_value(param, value, f"an integer >= 1, got {type(value).__name__}", f"pass {what}"))
    if value < 1:
        raise ConfigError(bad_value(param, value, "an integer >= 1", f"pass {what}"))
    return value
