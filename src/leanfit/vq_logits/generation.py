"""``generate()`` for models with a VQ head: the GenerationConfig at O(K) per token where it has an O(K) form.

:func:`vq_generate` fixes a call's settings the way ``GenerationMixin.generate`` does (the call's arguments over
``generation_config`` over ``model.generation_config`` over transformers' defaults; the same length rules, special
tokens and attention mask), asks transformers for the logits processors it would run, and translates each one to
the collapsed head, whose logits are ``l_v = z_{M(v)} + b_v``:

- a bias shared by every row of a step: ``suppress_tokens``, ``begin_suppress_tokens`` (first step only),
  ``min_length`` / ``min_new_tokens`` (EOS banned until then), single-token ``bad_words_ids`` and
  ``sequence_bias``. Decoding tables are built once per distinct bias (at most four per call, O(V log V) each);
- a few logits replaced per row and step (:class:`~leanfit.vq_logits.functional.TokenOverrides`):
  ``repetition_penalty`` (the row's tokens so far), ``no_repeat_ngram_size`` (the tokens that would repeat an
  n-gram), multi-token ``bad_words_ids`` and ``sequence_bias`` (those whose prefix ends the row); O(L log L) per
  row for L tokens so far, never O(V);
- the collapsed sampler's cutoffs: ``temperature``, ``top_k``, ``top_p``, ``min_p``.

:data:`FAST_FIELDS` lists the GenerationConfig fields handled so. Any other field that differs from its neutral
value, any processor transformers builds that is not one of the above, any other argument (``logits_processor``,
``stopping_criteria``, ``streamer``, ``assistant_model``, ...), and any processor or ``min_p`` on a head with a
within-cluster residual (whose decoding is O(V r) anyway) send the call to ``GenerationMixin.generate`` on
materialised logits (O(V) per token), after a warning given once per cause.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.generation import logits_process as lp

from leanfit.core.errors import bad_value
from leanfit.vq_logits.functional import (
    ClusterTables,
    TokenOverrides,
    _argmax,
    _check_int,
    _check_min_p,
    _check_sampling,
    _holes,
    _is_integer_dtype,
    _sample,
    _shown,
    code_logits,
)
from leanfit.vq_logits.head import VQLogitsHead

__all__ = ["FAST_FIELDS", "vq_generate"]

FAST_FIELDS = frozenset({
    "max_length", "max_new_tokens", "min_length", "min_new_tokens",  # lengths
    "do_sample", "temperature", "top_k", "top_p", "min_p",  # greedy or sampled, the warpers
    "repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "sequence_bias", "suppress_tokens",
    "begin_suppress_tokens",  # processors
    "eos_token_id", "pad_token_id",
    # no effect on a decoder-only model given input_ids, nor on the tokens
    "bos_token_id", "decoder_start_token_id", "use_cache", "transformers_version", "_from_model_config",
})
_NEUTRAL = {"output_attentions": False, "output_hidden_states": False, "output_scores": False, "output_logits": False}
_ARGUMENTS = {"input_ids", "attention_mask", "generation_config", "generator"}
_NOTED: set[str] = set()  # causes already reported


def _note(cause: str) -> None:
    if cause not in _NOTED:
        _NOTED.add(cause)
        warnings.warn(f"generate() of a VQ-Logits model: {cause} has no O(K) form on the VQ head; decoding with "
                      "GenerationMixin.generate on materialised logits (O(V) per token) instead. This warning is "
                      "given once per cause.", UserWarning, stacklevel=4)


@dataclass
class _Plan:
    """What a fast call does, translated from transformers' own processors."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    max_new_tokens: int
    eos: list[int]
    pad: int | None
    do_sample: bool
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    shared_bias: dict[int, float] = field(default_factory=dict)  # single-token biases, -inf bans
    eos_ban_below: int = 0  # EOS is banned while the sequence is shorter than this
    eos_ban: list[int] = field(default_factory=list)
    begin_index: int = -1  # begin_ban holds at this sequence length
    begin_ban: list[int] = field(default_factory=list)
    penalty: float | None = None
    penalty_skip: torch.Tensor | None = None  # (N,) leading positions the penalty ignores (left padding)
    ngram: int = 0
    sequence_biases: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)

    @property
    def per_row(self) -> bool:
        return self.penalty is not None or self.ngram > 0 or bool(self.sequence_biases)

    @property
    def processed(self) -> bool:
        return self.per_row or bool(self.shared_bias or self.eos_ban or self.begin_ban)


def vq_generate(model: Any, inputs: torch.Tensor | None, kwargs: dict[str, Any],
                fallback: Callable[..., Any]) -> Any:
    """``model.generate(inputs, **kwargs)``: O(K) decoding where every setting allows it, else ``fallback``
    (``GenerationMixin.generate``) with the same arguments. ``generator`` (a torch.Generator) seeds the O(K)
    sampler; transformers' path draws from the global generator."""
    kwargs = dict(kwargs)
    if inputs is not None:
        kwargs["input_ids"] = inputs
    generator = kwargs.pop("generator", None)
    plan = _plan(model, kwargs) if kwargs.get("input_ids") is not None else "generate() without input_ids"
    if isinstance(plan, str):
        _note(plan + (" (the generator argument is not used there)" if generator is not None else ""))
        return fallback(**kwargs)
    return _decode(model, plan, generator)


def _check_generate_inputs(input_ids: Any, attention_mask: Any) -> None:
    expected = "an integer tensor of token ids, shape (batch, length)"
    if not isinstance(input_ids, torch.Tensor) or not _is_integer_dtype(input_ids.dtype):
        raise TypeError(bad_value("input_ids", _shown(input_ids), expected, "use the tokenizer's input_ids"))
    if input_ids.dim() != 2:
        raise ValueError(bad_value("input_ids", _shown(input_ids), expected, "add a batch dimension with [None]"))
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                       or attention_mask.shape != input_ids.shape):
        raise ValueError(bad_value("attention_mask", _shown(attention_mask),
                                   f"None or a tensor of the shape of input_ids {tuple(input_ids.shape)}"))


def _unhandled_fields(config: Any) -> list[str]:
    """GenerationConfig fields outside FAST_FIELDS whose value is not neutral (None or transformers' default)."""
    neutral = {**config._get_default_generation_params(), **_NEUTRAL}
    return sorted(name for name, value in config.to_dict().items()
                  if name not in FAST_FIELDS and value is not None and not (name in neutral and value == neutral[name]))


def _plan(model: Any, kwargs: dict[str, Any]) -> _Plan | str:
    """The fast call's plan, or the cause that sends it to transformers."""
    input_ids, attention_mask = kwargs["input_ids"], kwargs.get("attention_mask")
    _check_generate_inputs(input_ids, attention_mask)
    if kwargs.get("max_new_tokens") is not None:
        _check_int("max_new_tokens", kwargs["max_new_tokens"], 0, "None or an integer >= 0")
    given = kwargs.get("generation_config")
    settings = {k: v for k, v in kwargs.items() if k not in _ARGUMENTS}
    config, others = model._prepare_generation_config(given, **settings)
    if others:
        return f"the argument(s) {', '.join(sorted(others))}"
    unhandled = _unhandled_fields(config)
    if unhandled:
        return f"GenerationConfig field(s) {', '.join(unhandled)}"
    if config.max_new_tokens is not None:
        _check_int("max_new_tokens", config.max_new_tokens, 0, "None or an integer >= 0")
    if config.do_sample:  # leanfit's messages first; transformers' processors check the same settings again
        _check_sampling(1.0 if config.temperature is None else config.temperature, config.top_k or None,
                        config.top_p)
        _check_min_p(config.min_p)
    plan = _prepared(model, config, kwargs, input_ids, attention_mask)
    if isinstance(plan, _Plan) and model.get_output_embeddings().residual_rank and (plan.processed or plan.min_p):
        return "a logits processor or min_p on a head with residual_rank > 0"
    return plan


def _prepared(model: Any, config: Any, kwargs: dict[str, Any], input_ids: torch.Tensor,
              attention_mask: torch.Tensor | None) -> _Plan | str:
    """The steps of GenerationMixin.generate that fix special tokens, attention mask, lengths and processors.

    They are GenerationMixin's own private methods (transformers 5), called rather than copied so that both paths
    resolve every setting alike; a transformers release that renames one fails this module's tests first."""
    given = kwargs.get("generation_config")
    has_default_max = (kwargs.get("max_length") is None and (given is None or given.max_length is None)
                       and model.generation_config.max_length is None)
    has_default_min = (kwargs.get("min_length") is None and (given is None or given.min_length is None)
                       and model.generation_config.min_length is None)
    n, length = input_ids.shape
    model._prepare_special_tokens(config, attention_mask is not None, device=input_ids.device, batch_size=n)
    if attention_mask is None:
        attention_mask = model._prepare_attention_mask_for_generation(input_ids, config, {})
    config = model._prepare_generated_length(config, has_default_max, has_default_min, "input_ids", length,
                                             input_ids)
    model._validate_generated_length(config, length, has_default_max)
    processors = model._get_logits_processor(config, input_ids_seq_length=length, encoder_input_ids=input_ids,
                                             device=input_ids.device, model_kwargs={"attention_mask": attention_mask})
    eos = [] if config._eos_token_tensor is None else config._eos_token_tensor.tolist()
    pad = None if config._pad_token_tensor is None else int(config._pad_token_tensor)
    plan = _Plan(input_ids, attention_mask, config.max_length - length, eos, pad, bool(config.do_sample))
    for processor in processors:
        cause = _translate(processor, plan, n, model.get_output_embeddings().vocab_size)
        if cause:
            return cause
    return plan


def _translate(processor: Any, plan: _Plan, n: int, vocab_size: int) -> str | None:
    """Puts one of transformers' processors into ``plan``; the cause of a fallback for any other."""
    kind = type(processor)
    if kind is lp.TemperatureLogitsWarper:
        plan.temperature = float(processor.temperature)
    elif kind is lp.TopKLogitsWarper:
        plan.top_k = int(processor.top_k)
    elif kind is lp.TopPLogitsWarper:
        plan.top_p = float(processor.top_p)
    elif kind is lp.MinPLogitsWarper:
        plan.min_p = float(processor.min_p)
    elif kind is lp.RepetitionPenaltyLogitsProcessor:
        plan.penalty, skip = float(processor.penalty), processor.prompt_ignore_length
        plan.penalty_skip = torch.full((n,), skip) if isinstance(skip, int) else skip
    elif kind is lp.NoRepeatNGramLogitsProcessor:
        plan.ngram = int(processor.ngram_size)
    elif kind in (lp.SequenceBiasLogitsProcessor, lp.NoBadWordsLogitsProcessor):
        return _add_sequence_biases(plan, processor.sequence_bias, vocab_size)
    elif kind in (lp.MinLengthLogitsProcessor, lp.MinNewTokensLengthLogitsProcessor):
        below = (processor.min_length if kind is lp.MinLengthLogitsProcessor
                 else processor.prompt_length_to_skip + processor.min_new_tokens)
        plan.eos_ban_below = max(plan.eos_ban_below, int(below))
        plan.eos_ban = sorted(set(plan.eos_ban) | set(processor.eos_token_id.reshape(-1).tolist()))
    elif kind is lp.SuppressTokensLogitsProcessor:
        plan.shared_bias.update(dict.fromkeys(processor.suppress_tokens.tolist(), -math.inf))
    elif kind is lp.SuppressTokensAtBeginLogitsProcessor:
        plan.begin_index, plan.begin_ban = int(processor.begin_index), processor.begin_suppress_tokens.tolist()
    else:
        return f"the logits processor {kind.__name__}"
    return None


def _add_sequence_biases(plan: _Plan, biases: dict[tuple[int, ...], float], vocab_size: int) -> str | None:
    """Single-token biases join the shared bias; longer ones are grouped by prefix length for per-row matching."""
    out_of_range = sorted({t for ids in biases for t in ids if t >= vocab_size})
    if out_of_range:  # transformers raises the same at its first step
        raise ValueError(f"The model vocabulary size is {vocab_size}, but the following tokens were being biased: "
                         f"{out_of_range}")
    if any(math.isnan(b) or b == math.inf for b in biases.values()):
        return "a sequence bias of +inf or nan"
    groups: dict[int, list[tuple[tuple[int, ...], float]]] = {}
    for ids, bias in biases.items():
        if len(ids) == 1:
            plan.shared_bias[ids[0]] = plan.shared_bias.get(ids[0], 0.0) + bias
        else:
            groups.setdefault(len(ids) - 1, []).append((ids, bias))
    for group in groups.values():
        plan.sequence_biases.append((torch.tensor([ids[:-1] for ids, _ in group]),
                                     torch.tensor([ids[-1] for ids, _ in group]),
                                     torch.tensor([bias for _, bias in group], dtype=torch.float64)))
    return None


def _phase_tables(head: VQLogitsHead, plan: _Plan, eos_banned: bool,
                  begin_banned: bool) -> tuple[ClusterTables, torch.Tensor]:
    """Decoding tables and the per-token bias (V,) float64 of a step with the shared bias and these bans."""
    bias = (torch.zeros(head.vocab_size, dtype=torch.float64, device=head.mapping.device) if head.bias is None
            else head.bias.detach().double())
    if not (plan.shared_bias or eos_banned or begin_banned):
        return head.tables(), bias
    bias = bias.clone()
    inside = range(head.vocab_size)  # ids outside the vocabulary are ignored, as transformers' masks do
    for token, value in plan.shared_bias.items():
        if token in inside:
            bias[token] += value
    for tokens, banned in ((plan.eos_ban, eos_banned), (plan.begin_ban, begin_banned)):
        if banned:
            bias[[t for t in tokens if t in inside]] = -math.inf
    return ClusterTables.build(head.mapping, head.num_codes, bias), bias


def _overrides(plan: _Plan, sequences: torch.Tensor, z: torch.Tensor, bias: torch.Tensor,
               mapping: torch.Tensor) -> TokenOverrides | None:
    """This step's per-row logits: penalised tokens, banned n-gram ends, biased ends of multi-token sequences."""
    n, length = sequences.shape
    parts: list[tuple[torch.Tensor, torch.Tensor | None, bool, bool]] = []  # tokens, added bias, penalised, banned
    for prefixes, last, biases in plan.sequence_biases:
        if prefixes.shape[1] <= length:
            match = (sequences[:, None, -prefixes.shape[1]:] == prefixes.to(sequences.device)).all(-1)  # (N, P)
            parts.append((torch.where(match, last.to(sequences.device), -1),
                          torch.where(match, biases.to(z.device), 0.0), False, False))
    if plan.penalty is not None:
        skip = plan.penalty_skip
        seen = sequences if skip is None else sequences.masked_fill(
            torch.arange(length, device=sequences.device) < skip.to(sequences.device)[:, None], -1)
        parts.append((seen, None, True, False))
    if plan.ngram and length >= plan.ngram:
        windows = sequences.unfold(1, plan.ngram, 1)  # an n-gram is completed by the next token only if it starts
        match = (windows[..., :-1] == sequences[:, length + 1 - plan.ngram:].unsqueeze(1)).all(-1)  # with the suffix
        parts.append((torch.where(match, windows[..., -1], -1), None, False, True))
    if not parts:
        return None
    return _merged(parts, n, z, bias, mapping, plan.penalty)


def _merged(parts: list[tuple[torch.Tensor, torch.Tensor | None, bool, bool]], n: int, z: torch.Tensor,
            bias: torch.Tensor, mapping: torch.Tensor, penalty: float | None) -> TokenOverrides | None:
    """One override per (row, token): biases summed, then the penalty, then bans (transformers' order)."""
    vocab, device = bias.numel(), z.device
    tokens = torch.cat([t for t, _, _, _ in parts], dim=1)
    added = torch.cat([torch.zeros(t.shape, dtype=torch.float64, device=device) if a is None else a.double()
                       for t, a, _, _ in parts], dim=1)
    flags = torch.cat([torch.tensor([[p, b]], device=device).expand(*t.shape, 2).long() for t, _, p, b in parts],
                      dim=1)
    key = torch.arange(n, device=device)[:, None] * (vocab + 1) + torch.where(tokens >= 0, tokens, vocab)
    unique, inverse = torch.unique(key.flatten(), return_inverse=True)
    added = torch.zeros(unique.numel(), dtype=torch.float64, device=device).index_add(0, inverse, added.flatten())
    flags = torch.zeros(unique.numel(), 2, dtype=torch.long, device=device).index_add(0, inverse, flags.flatten(0, 1))
    row, token = unique // (vocab + 1), unique % (vocab + 1)
    real = token < vocab
    row, token, added, flags = row[real], token[real], added[real], flags[real] > 0
    if row.numel() == 0:
        return None
    value = z[row, mapping[token]] + bias[token] + added
    if penalty is not None:
        value = torch.where(flags[:, 0], torch.where(value < 0, value * penalty, value / penalty), value)
    value = torch.where(flags[:, 1], -math.inf, value)
    counts = torch.bincount(row, minlength=n)
    col = torch.arange(row.numel(), device=device) - (counts.cumsum(0) - counts)[row]
    width = int(counts.max())
    out_tokens = torch.full((n, width), -1, dtype=torch.long, device=device)
    out_values = torch.full((n, width), -math.inf, dtype=torch.float64, device=device)
    out_tokens[row, col], out_values[row, col] = token, value
    return TokenOverrides(out_tokens, out_values)


def _next_tokens(head: VQLogitsHead, plan: _Plan, hidden: torch.Tensor, sequences: torch.Tensor,
                 tables: dict[tuple[bool, bool], tuple[ClusterTables, torch.Tensor]],
                 generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from the last hidden states (N, d)."""
    if head.residual_rank:  # no processors here (see _plan): the head's own O(V r) decoding
        if plan.do_sample:
            return head.sample(hidden, temperature=plan.temperature, top_k=plan.top_k, top_p=plan.top_p,
                               generator=generator)
        return head.argmax(hidden)
    length = sequences.shape[1]
    phase = (length < plan.eos_ban_below and bool(plan.eos_ban), length == plan.begin_index and bool(plan.begin_ban))
    if phase not in tables:
        tables[phase] = _phase_tables(head, plan, *phase)
    table, bias = tables[phase]
    z = code_logits(hidden, head.codebook).double()
    holes = None
    if plan.per_row:
        overrides = _overrides(plan, sequences, z, bias, head.mapping)
        holes = None if overrides is None else _holes(table, overrides.tokens, overrides.values)
    if plan.do_sample:
        return _sample(z, table, plan.temperature, plan.top_k, plan.top_p, plan.min_p, holes, generator)
    return _argmax(z, table, holes)


@torch.no_grad()
def _decode(model: Any, plan: _Plan, generator: torch.Generator | None) -> torch.Tensor:
    """Greedy/sampled decoding with the KV cache and the head's O(K) argmax/sampler."""
    from transformers import DynamicCache

    head: VQLogitsHead = model.get_output_embeddings()
    head.tables()  # build once, before the loop
    decoder = model.get_decoder()
    input_ids, mask = plan.input_ids, plan.attention_mask
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    cache = DynamicCache()
    out = decoder(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache,
                  use_cache=True)
    sequences, done = input_ids, torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    eos = torch.tensor(plan.eos, dtype=torch.long, device=input_ids.device)
    tables: dict[tuple[bool, bool], tuple[ClusterTables, torch.Tensor]] = {}
    for step in range(plan.max_new_tokens):
        nxt = _next_tokens(head, plan, out.last_hidden_state[:, -1, :], sequences, tables, generator)
        if plan.pad is not None:
            nxt = torch.where(done, torch.full_like(nxt, plan.pad), nxt)
        sequences = torch.cat([sequences, nxt[:, None]], dim=1)
        done |= torch.isin(nxt, eos)
        if step == plan.max_new_tokens - 1 or bool(done.all()):  # no forward pass for a token never used
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
        out = decoder(input_ids=nxt[:, None], attention_mask=mask, position_ids=positions, cache=cache,
                      use_cache=True)
    return sequences
