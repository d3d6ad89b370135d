"""Hugging Face integration: put a :class:`VQLogitsHead` on any ``*ForCausalLM``.

``replace_lm_head(model, num_codes, ...)`` builds the head from the model's output layer (tied embeddings
included; the paper's Option A) and turns the model into a subclass of its own class (``VQLogits<Class>``) whose

- ``forward(..., labels=...)`` returns the exact full-vocabulary loss (Hugging Face's shift and ``-100`` masking,
  ``num_items_in_batch`` for gradient accumulation) without materialising N x V logits (``logits`` is ``None``
  then); without labels it returns the logits of the kept positions, as usual;
- ``generate(...)`` honours the GenerationConfig with the head's O(K) decoding where every setting has an O(K)
  form, and falls back to the standard ``GenerationMixin.generate`` on materialised logits (with a one-time
  warning) where one has not (see :mod:`leanfit.vq_logits.generation`);
- ``save_pretrained`` / :func:`from_pretrained` round-trip (config key ``vq_logits``, head in the safetensors).

A saved folder has ``model_type`` ``"leanfit-vq-logits"`` (the base's type is ``vq_logits["base_model_type"]``)
and an ``auto_map`` naming ``leanfit_vq_logits.py``, a module file written beside it that only imports leanfit's
classes. Importing this module registers :class:`VQLogitsConfig` and the model classes with ``AutoConfig`` and
``AutoModelForCausalLM`` (``import leanfit.vq_logits`` does it too when transformers' configurations are already
imported; importing the package alone stays free of torch). So ``AutoModelForCausalLM.from_pretrained(folder)``

- with leanfit's classes registered, returns the VQ model (class, head and logits as saved);
- otherwise raises transformers' "contains custom code ... pass trust_remote_code=True" error (model type unknown
  to transformers), never a model with a random head; with ``trust_remote_code=True`` the module file imports
  leanfit and loads the VQ model, or raises an ImportError naming ``leanfit.vq_logits.from_pretrained`` where
  leanfit is not installed.

Folders saved before this format (the base's ``model_type`` plus ``vq_logits``) still load with
:func:`from_pretrained`, and saving them again upgrades them; the Auto classes read such a folder as the plain base
model, as before.

The subclass is made by wrapping, not by editing model code: it calls the model's own decoder
(``model.get_decoder()``) and replaces only the output head.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from leanfit.core.errors import bad_value
from leanfit.vq_logits.functional import _shown
from leanfit.vq_logits.generation import vq_generate
from leanfit.vq_logits.head import Mode, VQLogitsHead

__all__ = ["MODEL_TYPE", "REMOTE_CODE_FILE", "VQLogitsConfig", "check_logit_transform", "from_pretrained",
           "replace_lm_head",
           "vq_causal_lm_class", "vq_config_class"]

MODEL_TYPE = "leanfit-vq-logits"  # config.json's model_type: unknown to transformers without leanfit
REMOTE_CODE_FILE = "leanfit_vq_logits.py"  # written beside config.json; auto_map points at it
_REMOTE_CODE = '''"""Entry point of a leanfit VQ-Logits checkpoint for transformers' trust_remote_code.

It holds no model code: the classes come from the installed leanfit package. With leanfit imported,
AutoModelForCausalLM.from_pretrained(folder) needs no trust_remote_code; leanfit.vq_logits.from_pretrained(folder)
loads the folder too.
"""

try:
    from leanfit.vq_logits.hf import VQLogitsConfig, vq_causal_lm_class
except ImportError as error:
    raise ImportError("this folder holds a leanfit VQ-Logits model: install leanfit and load it with "
                      "leanfit.vq_logits.from_pretrained(folder)") from error

{name} = vq_causal_lm_class({base_model_type!r})
__all__ = ["VQLogitsConfig", "{name}"]
'''


class VQLogitsConfig(PreTrainedConfig):
    """The configuration of a model with a VQ head: its base's configuration plus ``vq_logits`` (the head's sizes
    and ``base_model_type``), saved under model type ``"leanfit-vq-logits"``.

    Models use one subclass per base, ``vq_config_class(LlamaConfig)`` (``VQLogitsLlamaConfig``); this class
    itself only dispatches: ``AutoConfig`` hands it a saved config.json and gets back an instance of the subclass
    for the saved base."""

    model_type = MODEL_TYPE

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Any:
        if cls is VQLogitsConfig:
            spec = _spec_of(config_dict.get("vq_logits"))
            return vq_config_class(_base_config_class(spec)).from_dict(config_dict, **kwargs)
        return super().from_dict(config_dict, **kwargs)

    @classmethod
    def register_for_auto_class(cls, auto_class: Any = "AutoConfig") -> None:
        """A no-op: leanfit registers its classes itself and writes its own module file (``REMOTE_CODE_FILE``)."""

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any) -> None:
        """config.json (with ``auto_map``) and the module file ``REMOTE_CODE_FILE`` that ``auto_map`` names."""
        spec = _spec(self)
        auto_map = _auto_map(spec["base_model_type"])
        if auto_map is not None:
            self.auto_map = auto_map
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        if auto_map is not None:
            name = auto_map["AutoModelForCausalLM"].split(".")[-1]
            Path(save_directory, REMOTE_CODE_FILE).write_text(
                _REMOTE_CODE.format(name=name, base_model_type=spec["base_model_type"]), encoding="utf-8")


_VQ_CONFIGS: dict[type[Any], type[Any]] = {}  # one subclass per base configuration class


def vq_config_class(base: type[Any]) -> type[Any]:
    """``VQLogits<BaseConfig>``: ``base`` (a transformers configuration class) as a :class:`VQLogitsConfig`."""
    if not (isinstance(base, type) and issubclass(base, PreTrainedConfig)):
        raise TypeError(bad_value("base", _shown(base), "a transformers configuration class",
                                  "pass type(model.config)"))
    if issubclass(base, VQLogitsConfig):
        return base
    if base not in _VQ_CONFIGS:
        _VQ_CONFIGS[base] = type(f"VQLogits{base.__name__}", (VQLogitsConfig, base), {"__module__": __name__})
        model = _causal_lm_of(base)
        if model is not None:
            vq_causal_lm_class(model)  # registers the pair with AutoModelForCausalLM
    return _VQ_CONFIGS[base]


def _causal_lm_of(config_class: type[Any]) -> type[Any] | None:
    """transformers' own *ForCausalLM class for a configuration class, if it has one."""
    try:
        found: Any = AutoModelForCausalLM._model_mapping[config_class]
    except KeyError:
        return None
    return found if isinstance(found, type) else None


def _base_config_class(spec: dict[str, Any]) -> type[Any]:
    base_type = spec.get("base_model_type")
    try:
        found: type[Any] = CONFIG_MAPPING[base_type if isinstance(base_type, str) else ""]
        return found
    except KeyError:
        raise ValueError(f"vq_logits.base_model_type={base_type!r} is not a model type of transformers "
                         f"{transformers.__version__}: expected the model type of the model the VQ head was put on "
                         "(e.g. 'llama'); install the transformers version that saved the folder") from None


def _auto_map(base_model_type: str) -> dict[str, str] | None:
    """config.json's ``auto_map``; None for a base without an AutoModelForCausalLM class (the folder then loads
    with :func:`from_pretrained` only, and the Auto classes refuse its model type)."""
    try:
        model = _causal_lm_of(_base_config_class({"base_model_type": base_model_type}))
    except ValueError:  # a configuration class transformers does not know
        model = None
    if model is None:
        return None
    module = REMOTE_CODE_FILE.removesuffix(".py")
    return {"AutoConfig": f"{module}.VQLogitsConfig", "AutoModelForCausalLM": f"{module}.VQLogits{model.__name__}"}


def _spec(config: Any) -> dict[str, Any]:
    return _spec_of(getattr(config, "vq_logits", None))


def _spec_of(spec: Any) -> dict[str, Any]:
    if not isinstance(spec, dict):
        raise ValueError("config has no 'vq_logits' entry: load a model saved after replace_lm_head(...)")
    return spec


def _as_vq_config(config: Any) -> Any:
    """``config`` (with a ``vq_logits`` entry) as an instance of its :func:`vq_config_class`, in place: the form
    of configs saved before the Auto registration, and of base configs handed to a VQ class."""
    spec = _spec(config)
    if not isinstance(config, VQLogitsConfig):
        spec.setdefault("base_model_type", type(config).model_type)
        config.__class__ = vq_config_class(type(config))
    auto_map = _auto_map(spec["base_model_type"])
    if auto_map is not None:
        config.auto_map = auto_map
    return config


def _vq_forward_with_positions(self: Any, input_ids: torch.Tensor | None = None,
                               attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                               logits_to_keep: int | torch.Tensor = 0, position_ids: torch.Tensor | None = None,
                               **kwargs: Any) -> Any:
    """:func:`_vq_forward` for bases whose forward takes ``position_ids``: the parameter is named so that
    ``GenerationMixin.generate`` (which looks for it in the signature) passes the positions of left-padded rows,
    as it does for the base; models with absolute positions (GPT-2) decode padded rows wrongly without them."""
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    return _vq_forward(self, input_ids, attention_mask, labels, logits_to_keep, **kwargs)


def _vq_forward(self: Any, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, logits_to_keep: int | torch.Tensor = 0, **kwargs: Any) -> Any:
    from transformers.modeling_outputs import CausalLMOutputWithPast

    num_items = kwargs.pop("num_items_in_batch", None)
    shift_labels = kwargs.pop("shift_labels", None)  # already-shifted targets, as transformers' ForCausalLMLoss
    kwargs.pop("return_dict", None)
    outputs = self.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    hidden = outputs.last_hidden_state
    head: VQLogitsHead = self.get_output_embeddings()
    loss = logits = None
    if shift_labels is None and labels is not None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    if shift_labels is not None:
        if num_items is None:
            loss = head.loss(hidden, shift_labels)
        else:
            loss = head.loss(hidden, shift_labels, reduction="sum") / num_items
    else:
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = head.logits(hidden[:, keep, :])
    # transformers >= 5 names the field `cache` and still accepts `past_key_values`, the only name 4.x knows
    return CausalLMOutputWithPast(loss=loss, logits=logits,
                                  past_key_values=outputs.past_key_values,  # type: ignore[call-arg]
                                  hidden_states=outputs.hidden_states, attentions=outputs.attentions)


def _vq_generate(self: Any, inputs: torch.Tensor | None = None, **kwargs: Any) -> Any:
    return vq_generate(self, inputs, kwargs, super(type(self), self).generate)


def _vq_init(self: Any, config: Any, *args: Any, **kwargs: Any) -> None:
    spec = _spec(_as_vq_config(config))
    super(type(self), self).__init__(config, *args, **kwargs)
    placeholder = torch.zeros(spec["vocab_size"], dtype=torch.long)  # the real map is loaded with the weights
    self.set_output_embeddings(VQLogitsHead(spec["hidden_size"], placeholder, spec["num_codes"],
                                            token_bias=spec["token_bias"], residual_rank=spec.get("residual_rank", 0),
                                            mode=spec["mode"]))


_VQ_CLASSES: dict[type[Any], type[Any]] = {}  # one subclass per base, so isinstance and pickling see one class


def _no_auto_class(cls: Any, auto_class: Any = "AutoModel") -> None:
    """A no-op: leanfit registers its classes itself and writes its own module file (``REMOTE_CODE_FILE``)."""


def vq_causal_lm_class(base: type[Any] | str) -> type[Any]:
    """``VQLogits<Base>``: ``base`` with the VQ head's forward, generate and untied weights (one class per base).

    ``base`` is a transformers *ForCausalLM class, or a model type (``"llama"``) for its AutoModelForCausalLM
    class. Its ``config_class`` is ``vq_config_class(base.config_class)``; when ``base`` is the class
    AutoModelForCausalLM picks for that configuration, the pair is registered with the Auto classes."""
    if isinstance(base, str):
        model = _causal_lm_of(_base_config_class({"base_model_type": base}))
        if model is None:
            raise ValueError(bad_value("base", base, "a model type with a *ForCausalLM class in transformers"))
        base = model
    if not isinstance(base, type):
        raise TypeError(bad_value("base", _shown(base), "a transformers *ForCausalLM class", "pass type(model)"))
    if base not in _VQ_CLASSES:
        config_class = vq_config_class(base.config_class)
        positions = "position_ids" in inspect.signature(base.forward).parameters
        _VQ_CLASSES[base] = cls = type(f"VQLogits{base.__name__}", (base,), {
            "__init__": _vq_init, "forward": _vq_forward_with_positions if positions else _vq_forward,
            "generate": _vq_generate, "_tied_weights_keys": {},
            "config_class": config_class, "register_for_auto_class": classmethod(_no_auto_class),
            "__module__": __name__,
        })
        if _causal_lm_of(base.config_class) is base:
            AutoModelForCausalLM.register(config_class, cls, exist_ok=True)
    return _VQ_CLASSES[base]


def replace_lm_head(model: Any, num_codes: int, *, mapping: str | Callable[..., torch.Tensor] | torch.Tensor = "kmeans",
                    counts: torch.Tensor | None = None, token_bias: bool = True, residual_rank: int = 0,
                    bias_init: Literal["zeros", "unigram"] = "zeros", mode: Mode = "collapsed",
                    seed: int = 0) -> Any:
    """Replace ``model``'s output layer by a VQ head built from it, in place; returns the model."""
    linear = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(linear, nn.Linear):
        raise ValueError(
            f"model={type(model).__name__} has no recognisable output layer (get_output_embeddings() returned "
            f"{type(linear).__name__}); pass a transformers *ForCausalLM model"
        )
    check_logit_transform(model)
    head = VQLogitsHead.from_linear(linear, num_codes, mapping=mapping, counts=counts, token_bias=token_bias,
                                    residual_rank=residual_rank, bias_init=bias_init, seed=seed, mode=mode)
    model.config.vq_logits = {"num_codes": num_codes, "vocab_size": head.vocab_size, "hidden_size": head.hidden_size,
                              "token_bias": token_bias, "residual_rank": residual_rank, "mode": mode,
                              "base_model_type": type(model.config).model_type}
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False
    model.__class__ = vq_causal_lm_class(model.__class__)
    _as_vq_config(model.config)
    model.set_output_embeddings(head)
    return model


def check_logit_transform(model: Any) -> None:
    """Refuse a model whose config transforms the logits after the output layer (a VQ head cannot represent it)."""
    for attr in ("final_logit_softcapping", "logit_scale"):
        if getattr(getattr(model, "config", None), attr, None) not in (None, 1.0):
            raise ValueError(f"model.config.{attr}={getattr(model.config, attr)!r} transforms the logits, which a VQ "
                             "head cannot represent exactly; use a model without it")


def from_pretrained(path: str | os.PathLike, **kwargs: Any) -> Any:
    """Load a model saved after :func:`replace_lm_head` (``save_pretrained``), in either folder format (see the
    module's docstring); ``kwargs`` go to transformers' ``from_pretrained`` (``dtype``, ``device_map``, ...)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(bad_value("path", _shown(path), "a folder written by save_pretrained (str or PathLike)"))
    config = _as_vq_config(AutoConfig.from_pretrained(path))
    return vq_causal_lm_class(config.vq_logits["base_model_type"]).from_pretrained(path, config=config, **kwargs)


AutoConfig.register(MODEL_TYPE, VQLogitsConfig, exist_ok=True)
