"""Hugging Face integration: put a :class:`VQLogitsHead` on any ``*ForCausalLM``.

``replace_lm_head(model, num_codes, ...)`` builds the head from the model's output layer (tied embeddings
included; the paper's Option A) and turns the model into a subclass of its own class (``VQLogits<Class>``) whose

- ``forward(..., labels=...)`` returns the exact full-vocabulary loss (Hugging Face's shift and ``-100`` masking,
  ``num_items_in_batch`` for gradient accumulation) without materialising N x V logits (``logits`` is ``None``
  then); without labels it returns the logits of the kept positions, as usual;
- ``generate(...)`` decodes greedy or sampled (temperature, top-k, top-p) with the head's O(K) argmax/sampler and
  the KV cache, so a step never touches V-sized tensors; other generation options fall back to the standard
  ``GenerationMixin.generate`` on materialised logits;
- ``save_pretrained`` / :func:`from_pretrained` round-trip (config key ``vq_logits``, head in the safetensors).

The subclass is made by wrapping, not by editing model code: it calls the model's own decoder
(``model.get_decoder()``) and replaces only the output head.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from leanfit.core.errors import bad_value
from leanfit.vq_logits.functional import _check_int, _check_sampling, _is_integer_dtype, _shown
from leanfit.vq_logits.head import Mode, VQLogitsHead

__all__ = ["from_pretrained", "replace_lm_head", "vq_causal_lm_class"]

_FAST_GENERATE_KEYS = {"input_ids", "attention_mask", "max_new_tokens", "max_length", "do_sample", "temperature",
                       "top_k", "top_p", "eos_token_id", "pad_token_id", "generation_config", "generator"}


def _spec(config: Any) -> dict[str, Any]:
    spec = getattr(config, "vq_logits", None)
    if not isinstance(spec, dict):
        raise ValueError("config has no 'vq_logits' entry: load a model saved after replace_lm_head(...)")
    return spec


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


@torch.no_grad()
def _fast_generate(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, *, max_new_tokens: int,
                   do_sample: bool, temperature: float, top_k: int | None, top_p: float | None,
                   eos_token_id: list[int], pad_token_id: int | None, generator: torch.Generator | None) -> torch.Tensor:
    """Greedy/sampled decoding with the KV cache and the head's O(K) argmax/sampler."""
    from transformers import DynamicCache

    head: VQLogitsHead = model.get_output_embeddings()
    head.tables()  # build once, before the loop
    decoder = model.get_decoder()
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    cache = DynamicCache()
    out = decoder(input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                  use_cache=True)
    sequences, done = input_ids, torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    eos = torch.tensor(eos_token_id or [], dtype=torch.long, device=input_ids.device)
    for _ in range(max_new_tokens):
        last = out.last_hidden_state[:, -1, :]
        if do_sample:
            nxt = head.sample(last, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        else:
            nxt = head.argmax(last)
        if pad_token_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
        sequences = torch.cat([sequences, nxt[:, None]], dim=1)
        done |= torch.isin(nxt, eos)
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
        out = decoder(input_ids=nxt[:, None], attention_mask=mask, position_ids=positions, past_key_values=cache,
                      use_cache=True)
    return sequences


def _vq_generate(self: Any, inputs: torch.Tensor | None = None, **kwargs: Any) -> Any:
    import copy

    if inputs is not None:
        kwargs["input_ids"] = inputs
    if set(kwargs) - _FAST_GENERATE_KEYS or kwargs.get("input_ids") is None:
        kwargs.pop("generator", None)
        return super(type(self), self).generate(**kwargs)  # standard path on materialised logits
    config = copy.deepcopy(kwargs.pop("generation_config", None) or self.generation_config)
    generator = kwargs.pop("generator", None)
    input_ids, attention_mask = kwargs.pop("input_ids"), kwargs.pop("attention_mask", None)
    config.update(**kwargs)
    if (getattr(config, "num_beams", 1) or 1) > 1 or (getattr(config, "repetition_penalty", 1.0) or 1.0) != 1.0:
        return super(type(self), self).generate(input_ids=input_ids, attention_mask=attention_mask,
                                                generation_config=config)
    _check_generate_inputs(input_ids, attention_mask, config.max_new_tokens)
    max_new = config.max_new_tokens if config.max_new_tokens is not None else config.max_length - input_ids.shape[1]
    eos = config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    # top_k 0 or None means no top-k, as in transformers; a temperature of 0 is an error there too, not 1
    temperature = 1.0 if config.temperature is None else config.temperature
    top_k = config.top_k or None
    if config.do_sample:  # checked before the prefill, not at the first sampled token
        temperature, top_k, _ = _check_sampling(temperature, top_k, config.top_p)
    return _fast_generate(
        self, input_ids, attention_mask, max_new_tokens=max(0, max_new), do_sample=bool(config.do_sample),
        temperature=temperature, top_k=top_k, top_p=config.top_p,
        eos_token_id=eos, pad_token_id=config.pad_token_id, generator=generator,
    )


def _check_generate_inputs(input_ids: Any, attention_mask: Any, max_new_tokens: Any) -> None:
    expected = "an integer tensor of token ids, shape (batch, length)"
    if not isinstance(input_ids, torch.Tensor) or not _is_integer_dtype(input_ids.dtype):
        raise TypeError(bad_value("input_ids", _shown(input_ids), expected, "use the tokenizer's input_ids"))
    if input_ids.dim() != 2:
        raise ValueError(bad_value("input_ids", _shown(input_ids), expected, "add a batch dimension with [None]"))
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                       or attention_mask.shape != input_ids.shape):
        raise ValueError(bad_value("attention_mask", _shown(attention_mask),
                                   f"None or a tensor of the shape of input_ids {tuple(input_ids.shape)}"))
    if max_new_tokens is not None:
        _check_int("max_new_tokens", max_new_tokens, 0, "None or an integer >= 0")


def _vq_init(self: Any, config: Any, *args: Any, **kwargs: Any) -> None:
    spec = _spec(config)
    super(type(self), self).__init__(config, *args, **kwargs)
    placeholder = torch.zeros(spec["vocab_size"], dtype=torch.long)  # the real map is loaded with the weights
    self.set_output_embeddings(VQLogitsHead(spec["hidden_size"], placeholder, spec["num_codes"],
                                            token_bias=spec["token_bias"], residual_rank=spec.get("residual_rank", 0),
                                            mode=spec["mode"]))


_VQ_CLASSES: dict[type[Any], type[Any]] = {}  # one subclass per base, so isinstance and pickling see one class


def vq_causal_lm_class(base: type[Any]) -> type[Any]:
    """``VQLogits<Base>``: ``base`` with the VQ head's forward, generate and untied weights (one class per base)."""
    if not isinstance(base, type):
        raise TypeError(bad_value("base", _shown(base), "a transformers *ForCausalLM class", "pass type(model)"))
    if base not in _VQ_CLASSES:
        _VQ_CLASSES[base] = type(f"VQLogits{base.__name__}", (base,), {
            "__init__": _vq_init, "forward": _vq_forward, "generate": _vq_generate, "_tied_weights_keys": {},
            "__module__": __name__,
        })
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
    for attr in ("final_logit_softcapping", "logit_scale"):
        if getattr(model.config, attr, None) not in (None, 1.0):
            raise ValueError(f"model.config.{attr}={getattr(model.config, attr)!r} transforms the logits, which a VQ "
                             "head cannot represent exactly; use a model without it")
    head = VQLogitsHead.from_linear(linear, num_codes, mapping=mapping, counts=counts, token_bias=token_bias,
                                    residual_rank=residual_rank, bias_init=bias_init, seed=seed, mode=mode)
    model.config.vq_logits = {"num_codes": num_codes, "vocab_size": head.vocab_size, "hidden_size": head.hidden_size,
                              "token_bias": token_bias, "residual_rank": residual_rank, "mode": mode}
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False
    model.__class__ = vq_causal_lm_class(model.__class__)
    model.set_output_embeddings(head)
    return model


def from_pretrained(path: str | os.PathLike, **kwargs: Any) -> Any:
    """Load a model saved after :func:`replace_lm_head` (``save_pretrained``)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(bad_value("path", _shown(path), "a folder written by save_pretrained (str or PathLike)"))
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    _spec(config)
    base: Any = AutoModelForCausalLM._model_mapping[type(config)]
    return vq_causal_lm_class(base).from_pretrained(path, config=config, **kwargs)
