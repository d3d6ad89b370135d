"""IAPT on a Hugging Face backbone: slot insertion, per-layer injection hooks, adapters, saving and generation.

:func:`get_iapt_model` wraps any HF decoder (Llama / Qwen2 style ``model.layers``, GPT-2 style ``transformer.h``)
or encoder (BERT ``encoder.layer``; bare or with a task head) in an :class:`IAPTModel`. The backbone is frozen;
only the prompt generators train. No model code is patched: a ``register_forward_pre_hook(with_kwargs=True)`` on
each layer does the injection.

How a call works (``forward``, ``generate`` and ``cache_prompts`` share it):

1. The user passes plain inputs ``input_ids`` / ``attention_mask`` (B, T) and ``instruction_mask`` (B, T, bool;
   the tokens the prompts are computed from). :meth:`IAPTModel.expand_inputs` inserts ``k = num_soft_tokens``
   placeholder positions per row, giving length T + k. With ``slot_position="after_first"`` they go right after
   the row's first real token (BOS for decoders, [CLS] for encoders), with ``"start"`` right before it; with
   left padding that is after (or at) the first non-padding position, so padding stays in front. Placeholders
   take the row's first real token id, attention mask 1, instruction mask False, label -100 (token-level
   labels of non-causal models) and the first token's ``token_type_ids``. Position ids are
   ``cumsum(attention_mask) - 1`` over the expanded sequence (0 at padding), the same rule ``generate`` uses, so
   the placeholders occupy positions like ordinary tokens and later tokens shift by k.
2. The pre-hook of adapted layer ``l`` computes the prompts from the hidden states of the instruction positions
   at the input of layer ``l`` and overwrites the placeholder positions' hidden states with them. Layers not in
   ``config.layers`` leave the placeholders' states to the backbone. In a mixed-tenant batch
   (``adapter_names``, one per row) the rows are grouped by adapter, each group's generator runs on its rows, and
   the results are scattered back: this works under autograd, so several adapters train in one batch.
3. Outputs come back for the ORIGINAL positions: ``logits``, ``last_hidden_state`` and every tensor of
   ``hidden_states`` of shape (B, T + k, ...) are gathered back to (B, T, ...), so shapes match the input.
   ``attentions`` and the returned cache keep the expanded length (the cache must hold the soft tokens).
   Pooled / classification outputs (B, C) are unchanged. For causal LMs with token labels the loss is the
   backbone's own ``loss_function`` on the returned logits and the user's labels (the usual shift), so it is
   consistent with the logits the caller sees; other models get the labels passed through (token labels with
   -100 at the placeholders).

Leakage: only instruction positions are pooled, so in a decoder the response tokens (the training targets), and
any token after the instruction, can change neither the prompts nor any output at instruction positions.
``instruction_mask`` is therefore required whenever token labels (B, T) are given; sequence-level labels
(classification) are not in the input and need none. Three caveats: tokens BEFORE the instruction (an input placed
ahead of it) reach its hidden states and so the prompts; the soft tokens summarise the WHOLE instruction, so a
loss on instruction tokens after the slot could peek at later instruction tokens (give them label -100, as
instruction tuning does anyway); and in an encoder every position sees every other, so there the instruction's
hidden states (and the prompts) do depend on the rest of the input.

Decoding: the prompts are computed once, at prefill, and reach later tokens through the KV cache. The hooks are
one-shot per call (each layer injects at most once) and act only on a call whose sequence length is the
expanded prefill length, so decode steps (length 1, cache present) run the plain backbone.

Why our own module: PEFT registers tuners only under names of its closed ``PeftType`` enum, and its prompt
methods are hard-coded branches that inject through ``inputs_embeds`` / ``past_key_values``; IAPT's prompts
depend on the input, so they cannot be materialised as PEFT stores prompt embeddings. We keep PEFT's file names
(``adapter_config.json``, ``adapter_model.safetensors``) with our own ``peft_type``.

Not supported: gradient checkpointing of the backbone (a recomputed layer would not see the one-shot hook),
``inputs_embeds`` and caller-supplied ``position_ids``, ``forward`` with a non-empty cache (use ``generate``),
chunked prefill.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from leanfit.core.errors import ConfigError, bad_value
from leanfit.core.io import atomic_dir, atomic_save_tensors, atomic_write_json, read_json
from leanfit.iapt.config import PEFT_TYPE, IAPTConfig, check_config
from leanfit.iapt.generator import PromptGenerator
from leanfit.iapt.slots import (
    CachedPrompts,
    HookState,
    IAPTBatch,
    accepts_argument,
    biased_linears,
    cache_length,
    check_mask,
    check_tensor,
    find_layers,
    input_norm,
    insert_at,
    is_causal_lm,
    shown,
    uses_checkpointing,
)

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "CachedPrompts", "IAPTBatch", "IAPTModel", "find_layers",
           "get_iapt_model"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_HOOKED = "_leanfit_iapt_hooked"


class IAPTModel(nn.Module):
    """A frozen HF backbone with one or more IAPT adapters (see the module docstring for the data flow).

    ``iapt[adapter][str(layer)]`` is the :class:`PromptGenerator` of that adapter and layer; ``peft_config``
    maps adapter names to their :class:`IAPTConfig`; ``active_adapter`` serves rows without an explicit
    ``adapter_names`` entry. All adapters' generators are trainable; the whole backbone, task heads included,
    is frozen (unfreeze and save a new task head yourself: ``save_pretrained`` writes only the generators)."""

    def __init__(self, base_model: nn.Module, config: IAPTConfig, adapter_name: str = "default") -> None:
        super().__init__()
        if not isinstance(base_model, nn.Module):
            raise TypeError(bad_value("base_model", type(base_model).__name__, "a Hugging Face model (an nn.Module)",
                                      "load one with transformers, e.g. AutoModelForCausalLM.from_pretrained(...)"))
        config = check_config(config)
        if getattr(base_model, _HOOKED, False):
            raise ConfigError(bad_value("model", type(base_model).__name__, "a backbone without IAPT hooks",
                                        "add adapters to the existing IAPTModel with add_adapter(), or call its "
                                        "unload() first"))
        # a transformers model: its config, loss_function and generate are not nn.Module attributes
        self.base_model: Any = base_model
        self.layers_path, layers = find_layers(base_model, config.layers_path)
        self.num_layers = len(layers)
        self.hidden_size = _backbone_width(base_model)
        self.iapt = nn.ModuleDict()
        self.peft_config: dict[str, IAPTConfig] = {}
        self.active_adapter = adapter_name
        self._state: HookState | None = None
        self._takes_position_ids = accepts_argument(base_model, "position_ids")  # read once, not per forward
        self._norm_hooks: list[Any] = []  # on each layer's input norm, once an adapter has prompt_gate
        self._bias_hooks: list[Any] = []  # on each layer's biased linear maps, once an adapter has prompt_gate
        self._hooks = [layer.register_forward_pre_hook(functools.partial(self._pre_hook, i), with_kwargs=True)
                       for i, layer in enumerate(layers)]
        setattr(base_model, _HOOKED, True)
        try:
            self.add_adapter(adapter_name, config)
        except BaseException:
            self.unload()  # leave the backbone as it came
            raise
        base_model.requires_grad_(False)

    # ----------------------------------------------------------------------------------------- adapters
    @property
    def config(self) -> Any:
        """The backbone's HF config."""
        return self.base_model.config

    @property
    def adapter_names(self) -> list[str]:
        return list(self.iapt.keys())

    def _check_adapter(self, name: str) -> None:
        if not isinstance(name, str):
            raise TypeError(bad_value("adapter_name", name, "an adapter name (str): one of "
                                      + ", ".join(map(repr, self.iapt))))
        if name not in self.iapt:
            raise ConfigError(bad_value("adapter_name", name, "one of " + ", ".join(map(repr, self.iapt)),
                                        "add it with add_adapter(name, config) or load it"))

    def _record_backbone(self, config: IAPTConfig) -> IAPTConfig:
        """Check the backbone fields a saved config carries and fill in the ones it lacks."""
        for name, actual in (("hidden_size", self.hidden_size), ("num_layers", self.num_layers)):
            saved = getattr(config, name)
            if saved is not None and saved != actual:
                raise ConfigError(bad_value(name, saved, f"{actual}, the backbone's {name}",
                                            "the adapter was made for another backbone: load it onto that one"))
        name_or_path = config.base_model_name_or_path or getattr(self.config, "_name_or_path", "") or None
        config.layer_indices(self.num_layers)  # raises for out-of-range layers
        return dataclasses.replace(config, hidden_size=self.hidden_size, num_layers=self.num_layers,
                                   base_model_name_or_path=name_or_path)

    def add_adapter(self, adapter_name: str, config: IAPTConfig) -> None:
        """Add a freshly initialised adapter (generators in the backbone's device, float32 or float64)."""
        config = check_config(config)
        if not isinstance(adapter_name, str):
            raise TypeError(bad_value("adapter_name", adapter_name, "a name (str) of letters, digits, '_' or '-'"))
        if not _ADAPTER_NAME.match(adapter_name):
            raise ConfigError(bad_value("adapter_name", adapter_name, "letters, digits, '_' or '-'"))
        if adapter_name in self.iapt:
            raise ConfigError(bad_value("adapter_name", adapter_name, "a new name", "delete_adapter() it first"))
        if config.layers_path not in (None, self.layers_path):
            raise ConfigError(bad_value("layers_path", config.layers_path, f"{self.layers_path!r} (this model's)"))
        config = self._record_backbone(config)
        ref = next(self.base_model.parameters())
        dtype = ref.dtype if ref.dtype in (torch.float32, torch.float64) else torch.float32
        if config.prompt_gate and not self._norm_hooks:
            norms = [input_norm(layer) for layer in self.base_model.get_submodule(self.layers_path)]
            present = [norm for norm in norms if norm is not None]
            if len(present) < len(norms):
                raise ConfigError(bad_value("prompt_gate", True, "a pre-norm backbone (a normalisation module among "
                                            "each layer's direct children, like Llama's input_layernorm)",
                                            "use prompt_gate=False for post-norm models such as BERT"))
            self._norm_hooks = [norm.register_forward_hook(functools.partial(self._norm_hook, i))
                                for i, norm in enumerate(present)]
            layers = self.base_model.get_submodule(self.layers_path)
            self._bias_hooks = [linear.register_forward_hook(functools.partial(self._bias_hook, i))
                                for i, layer in enumerate(layers) for linear in biased_linears(layer)]
        self.iapt[adapter_name] = nn.ModuleDict(
            {str(i): PromptGenerator(self.hidden_size, config, dtype=dtype, device=ref.device)
             for i in config.layer_indices(self.num_layers)})
        self.peft_config[adapter_name] = config

    def set_adapter(self, adapter_name: str) -> None:
        """Serve rows without an explicit adapter with ``adapter_name``."""
        self._check_adapter(adapter_name)
        self.active_adapter = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_adapter(adapter_name)
        if len(self.iapt) == 1:
            raise ConfigError(bad_value("adapter_name", adapter_name, "not the last adapter", "unload() instead"))
        del self.iapt[adapter_name]
        del self.peft_config[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = next(iter(self.iapt))

    def unload(self) -> nn.Module:
        """Remove the hooks and return the bare backbone (its parameters stay frozen)."""
        for hook in (*self._hooks, *self._norm_hooks, *self._bias_hooks):
            hook.remove()
        self._hooks, self._norm_hooks, self._bias_hooks = [], [], []
        with contextlib.suppress(AttributeError):
            delattr(self.base_model, _HOOKED)
        return self.base_model

    def merge_and_unload(self) -> nn.Module:
        raise NotImplementedError(
            "IAPT adapters cannot be merged into the backbone: the soft tokens are computed from each input's "
            "instruction and act as extra attention positions, so no fixed weight change reproduces them. Use "
            "cache_prompts() to precompute the prompts of a repeated instruction, or unload() to drop the adapters.")

    # ----------------------------------------------------------------------------------------- inputs
    def _groups(self, batch_size: int, adapter_names: Sequence[str] | None,
                cached: CachedPrompts | None) -> list[tuple[str, Tensor | None]]:
        if cached is not None:
            if adapter_names is not None:
                raise ConfigError(bad_value("adapter_names", adapter_names, "None with cached_prompts",
                                            "cached prompts carry their adapter"))
            self._check_adapter(cached.adapter_name)
            return [(cached.adapter_name, None)]
        if adapter_names is None:
            return [(self.active_adapter, None)]
        if isinstance(adapter_names, str) or len(adapter_names) != batch_size:
            raise ConfigError(bad_value("adapter_names", adapter_names, f"a list of {batch_size} adapter names "
                                        "(one per row)"))
        for name in adapter_names:
            self._check_adapter(name)
        unique = list(dict.fromkeys(adapter_names))
        if len(unique) == 1:
            return [(unique[0], None)]
        device = self._device()
        return [(n, torch.tensor([i for i, a in enumerate(adapter_names) if a == n], device=device)) for n in unique]

    def _device(self) -> torch.device:
        return next(self.base_model.parameters()).device

    def _layout(self, groups: list[tuple[str, Tensor | None]]) -> tuple[int, str]:
        """num_soft_tokens and slot_position shared by the adapters of one batch."""
        layouts = {(self.peft_config[n].num_soft_tokens, self.peft_config[n].slot_position) for n, _ in groups}
        if len(layouts) > 1:
            raise ConfigError(bad_value("adapter_names", [n for n, _ in groups], "adapters with the same "
                                        "num_soft_tokens and slot_position in one batch",
                                        "run such adapters in separate batches"))
        return layouts.pop()

    @staticmethod
    def _check_instruction(instruction_mask: Tensor | None, attention_mask: Tensor, has_labels: bool) -> Tensor:
        if instruction_mask is None:
            if has_labels:
                raise ConfigError(bad_value("instruction_mask", None, "a (batch, seq) bool tensor when token "
                                            "labels are given", "pass instruction_mask marking the instruction "
                                            "(prompt) tokens, so the response tokens (the targets) are never "
                                            "pooled into the soft tokens"))
            return attention_mask.bool()
        mask = check_mask("instruction_mask", instruction_mask, attention_mask.shape, "the shape of input_ids",
                          attention_mask.device)
        if (mask & ~attention_mask.bool()).any():
            raise ConfigError(bad_value("instruction_mask", "True at padding", "True only where attention_mask is 1",
                                        "mark only real (attended) instruction tokens"))
        return mask

    def _check_cached(self, cached: CachedPrompts, batch_size: int) -> None:
        if not isinstance(cached, CachedPrompts):
            raise TypeError(bad_value("cached_prompts", shown(cached), "the result of cache_prompts()",
                                      "make it with model.cache_prompts(instruction_ids)"))
        if cached.num_rows not in (1, batch_size):
            raise ConfigError(bad_value("cached_prompts", f"{cached.num_rows} rows", f"1 or {batch_size} rows"))

    def _check_cached_layout(self, cached: CachedPrompts, k: int) -> None:
        """The cached prompts fit this model and their adapter: (N, k, d) for layers the adapter adapts."""
        fix = "make them with this model's cache_prompts()"
        shape = tuple(next(iter(cached.prompts.values())).shape)
        if shape[1:] != (k, self.hidden_size):
            raise ConfigError(bad_value("cached_prompts", f"prompts of shape {shape}", f"(N, {k}, {self.hidden_size})"
                                        f": adapter {cached.adapter_name!r}'s num_soft_tokens and the hidden size",
                                        fix))
        adapted = sorted(int(layer) for layer in cast(nn.ModuleDict, self.iapt[cached.adapter_name]))
        extra = sorted(set(cached.prompts) - set(adapted))
        if extra:
            raise ConfigError(bad_value("cached_prompts", f"prompts for layers {extra}", f"prompts for layers of "
                                        f"adapter {cached.adapter_name!r} ({adapted})", fix))

    def _vocab_size(self) -> int | None:
        try:
            embeddings = self.base_model.get_input_embeddings()
        except (AttributeError, NotImplementedError):
            return None
        size = getattr(embeddings, "num_embeddings", None)
        return size if isinstance(size, int) else None

    def _check_input_ids(self, input_ids: Tensor) -> Tensor:
        check_tensor("input_ids", input_ids, "tokenize with return_tensors='pt', or wrap the ids in torch.tensor()")
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise ConfigError(bad_value("input_ids.dtype", input_ids.dtype, "an integer dtype (token ids)",
                                        "convert it with input_ids.long()"))
        if input_ids.ndim != 2:
            raise ConfigError(bad_value("input_ids.shape", tuple(input_ids.shape), "(batch, seq)",
                                        "add the batch dimension of one row with input_ids[None]"))
        if 0 in input_ids.shape:
            raise ConfigError(bad_value("input_ids.shape", tuple(input_ids.shape), "(batch >= 1, seq >= 1)",
                                        "skip empty batches; every row needs at least its first token"))
        vocab = self._vocab_size()
        if vocab is not None:
            low, high = torch.stack(torch.aminmax(input_ids)).tolist()
            if low < 0 or high >= vocab:
                raise ConfigError(bad_value("input_ids", f"ids in [{low}, {high}]", f"token ids in [0, {vocab}), the "
                                            "backbone's vocabulary", "tokenize with the backbone's tokenizer"))
        return input_ids

    @staticmethod
    def _check_attention(attention_mask: Tensor | None, input_ids: Tensor) -> Tensor:
        if attention_mask is None:
            return torch.ones_like(input_ids)
        shape = tuple(input_ids.shape)
        check_tensor("attention_mask", attention_mask, f"pass a 0/1 tensor of shape {shape}, or None")
        if tuple(attention_mask.shape) != shape:
            raise ConfigError(bad_value("attention_mask.shape", tuple(attention_mask.shape), f"{shape}, the shape of "
                                        "input_ids", "pass the tokenizer's attention_mask"))
        if attention_mask.device != input_ids.device:
            raise ConfigError(bad_value("attention_mask.device", str(attention_mask.device), f"{input_ids.device}, "
                                        "the device of input_ids", f"move it with .to({str(input_ids.device)!r})"))
        if attention_mask.is_complex() or ((attention_mask != 0) & (attention_mask != 1)).any():
            raise ConfigError(bad_value("attention_mask", "values other than 0 and 1", "1 at real tokens and 0 at "
                                        "padding", "pass the tokenizer's attention_mask"))
        if not attention_mask.bool().any(1).all():
            raise ConfigError(bad_value("attention_mask", "a row of zeros", "at least one real token per row",
                                        "drop rows that hold only padding"))
        return attention_mask

    def _check_labels(self, labels: Tensor | None, input_ids: Tensor) -> None:
        if labels is None:
            return
        b, t = input_ids.shape
        check_tensor("labels", labels, "pass a tensor: token labels (batch, seq) or one label per row")
        if labels.ndim == 0 or labels.shape[0] != b:
            raise ConfigError(bad_value("labels.shape", tuple(labels.shape), f"({b}, ...): one entry per row of "
                                        "input_ids"))
        if labels.shape != input_ids.shape and is_causal_lm(self.base_model):
            raise ConfigError(bad_value("labels.shape", tuple(labels.shape), f"{(b, t)}, the shape of input_ids "
                                        "(token labels of a causal LM)", "put -100 where a position has no target"))

    def expand_inputs(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                      instruction_mask: Tensor | None = None, *, labels: Tensor | None = None,
                      adapter_names: Sequence[str] | None = None, cached_prompts: CachedPrompts | None = None,
                      token_type_ids: Tensor | None = None) -> IAPTBatch:
        """Insert the placeholders (see the module docstring) and validate the masks and adapter names.

        ``input_ids``, ``attention_mask``, ``instruction_mask``: (B, T). ``instruction_mask`` defaults to the
        attention mask unless token ``labels`` (B, T) are given, when it is required. Empty batches (no row or no
        token) are a ValueError."""
        input_ids = self._check_input_ids(input_ids)
        b, t = input_ids.shape
        attention_mask = self._check_attention(attention_mask, input_ids)
        real = attention_mask.bool()
        self._check_labels(labels, input_ids)
        if token_type_ids is not None:
            check_tensor("token_type_ids", token_type_ids, "pass the tokenizer's token_type_ids, or None")
            if tuple(token_type_ids.shape) != (b, t):
                raise ConfigError(bad_value("token_type_ids.shape", tuple(token_type_ids.shape), f"{(b, t)}, the "
                                            "shape of input_ids", "pass the tokenizer's token_type_ids"))
        if cached_prompts is not None:
            self._check_cached(cached_prompts, b)
        groups = self._groups(b, adapter_names, cached_prompts)
        k, slot_position = self._layout(groups)
        if cached_prompts is not None:
            self._check_cached_layout(cached_prompts, k)
        instruction = None
        if cached_prompts is None:
            token_labels = labels is not None and labels.shape == input_ids.shape
            instruction = self._check_instruction(instruction_mask, attention_mask, token_labels)
        first = real.int().argmax(1)
        start = first + int(slot_position == "after_first")
        pos = torch.arange(t, device=input_ids.device)
        keep = pos + k * (pos[None, :] >= start[:, None])
        slots = start[:, None] + torch.arange(k, device=input_ids.device)
        ids = insert_at(input_ids, keep, slots, input_ids.gather(1, first[:, None]))
        mask = insert_at(attention_mask, keep, slots, 1)
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        types = None if token_type_ids is None else insert_at(token_type_ids, keep, slots,
                                                             token_type_ids.gather(1, first[:, None]))
        instruction = None if instruction is None else insert_at(instruction, keep, slots, False)
        return IAPTBatch(ids, mask, positions, instruction, slots, keep, groups, cached_prompts, types)

    def _model_inputs(self, batch: IAPTBatch) -> dict[str, Tensor]:
        inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        if self._takes_position_ids:
            inputs["position_ids"] = batch.position_ids
        if batch.token_type_ids is not None:
            inputs["token_type_ids"] = batch.token_type_ids
        return inputs

    # ----------------------------------------------------------------------------------------- hooks
    @contextlib.contextmanager
    def _activate(self, batch: IAPTBatch, record: dict[int, Tensor] | None = None,
                  gate_record: dict[int, Tensor] | None = None) -> Iterator[HookState]:
        """Arm every layer hook for one prefill of ``batch``; raise if some layer never ran."""
        if self._state is not None:
            raise RuntimeError("an IAPT call is already running on this model (nested or concurrent call)")
        state = HookState(batch, set(range(self.num_layers)), record, gate_record=gate_record)
        self._state = state
        try:
            yield state
        finally:
            self._state = None
        if state.pending:
            raise RuntimeError(f"IAPT hooks of layers {sorted(state.pending)} never saw the prefill (length "
                               f"{state.seq_len}); chunked prefill and layer skipping are not supported")

    def _pre_hook(self, layer: int, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        state = self._state
        if state is None or layer not in state.pending:
            return None  # not an IAPT call, or a decode step after the prefill
        hidden = args[0] if args else kwargs.get("hidden_states")
        if hidden is None or hidden.ndim != 3 or hidden.shape[1] != state.seq_len:
            return None  # a decode step: the prompts already sit in the cache
        state.pending.discard(layer)
        new = self._inject(layer, hidden, state)
        if new is None:
            return None
        return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

    def _inject(self, layer: int, hidden: Tensor, state: HookState) -> Tensor | None:
        """``hidden`` (N, T + k, d) with the placeholders overwritten by this layer's prompts (None: no change)."""
        view = state.view(hidden.shape[0])
        index = view.slot_index[..., None].expand(-1, -1, hidden.shape[-1])
        cached = state.batch.cached
        if cached is not None:
            prompts = cached.prompts.get(layer)
            if prompts is None:
                return None
            prompts = prompts.to(hidden)
            prompts = prompts.expand(hidden.shape[0], -1, -1) if prompts.shape[0] == 1 else \
                prompts.repeat_interleave(view.repeat, 0)
            if layer in cached.gates:
                state.gates[layer] = cached.gates[layer].to(hidden).expand(hidden.shape[0])
            return hidden.scatter(1, index, prompts)
        prompts, gates = None, None
        for name, rows in view.groups:
            generators = cast(nn.ModuleDict, self.iapt[name])
            if str(layer) not in generators:
                continue
            generator = cast(PromptGenerator, generators[str(layer)])
            instruction = view.instruction
            assert instruction is not None, "None only with cached prompts, returned above"
            gate = generator.gate_value()
            if gate is not None:
                gates = hidden.new_ones(hidden.shape[0]) if gates is None else gates
                gates = gate.to(hidden.dtype).expand(hidden.shape[0]) if rows is None else \
                    gates.index_copy(0, rows, gate.to(hidden.dtype).expand(rows.shape[0]))
            if rows is None:
                prompts = generator.prompts(hidden, instruction).to(hidden.dtype)
                continue
            if prompts is None:
                prompts = hidden.gather(1, index)
            group = generator.prompts(hidden[rows], instruction[rows]).to(hidden.dtype)
            prompts = prompts.index_copy(0, rows, group)
        if prompts is None:
            return None
        if gates is not None:
            state.gates[layer] = gates
        if state.record is not None:
            state.record[layer] = prompts.detach()
        if state.gate_record is not None and gates is not None:
            state.gate_record[layer] = gates[:1].detach()  # cache_prompts: one adapter, so one gate per layer
        return hidden.scatter(1, index, prompts)

    def _norm_hook(self, layer: int, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        """``prompt_gate``: the soft positions of the layer's normalised input scaled by the rows' gates (once,
        right after this layer's injection); :meth:`_bias_hook` finishes the job for biased projections."""
        state = self._state
        if state is None or layer not in state.gates or output.ndim != 3 or output.shape[1] != state.seq_len:
            return None
        gates = state.gates.pop(layer)
        slots = state.view(output.shape[0]).slot_index
        scale = output.new_ones(output.shape[:2]).scatter(1, slots, gates[:, None].expand_as(slots).to(output.dtype))
        gated = output * scale[..., None]
        state.gated = (layer, gated, gates)
        return gated

    def _bias_hook(self, layer: int, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        """``prompt_gate`` on a biased linear map fed by the gated norm output (the attention's query / key / value
        projections, fused or not): its soft positions hold ``W (g x) + b``; adding ``(g - 1) b`` makes them
        ``g (W x + b)``, exactly 0 at a closed gate. Bias-free backbones never get here."""
        state = self._state
        gated = None if state is None else state.gated
        if gated is None or gated[0] != layer or not args or args[0] is not gated[1]:
            return None
        bias = cast(Tensor, module.bias)
        if output.ndim != 3 or output.shape[-1] != bias.shape[0]:
            return None
        assert state is not None, "gated is only set during a call"
        slots = state.view(output.shape[0]).slot_index
        shift = (gated[2] - 1).to(output.dtype)[:, None, None] * bias.to(output.dtype)  # (N, 1, out)
        index = slots[..., None].expand(-1, -1, output.shape[-1])
        return output.scatter_add(1, index, shift.expand(-1, slots.shape[1], -1))

    # ----------------------------------------------------------------------------------------- calls
    def _strip_outputs(self, out: Any, batch: IAPTBatch) -> Any:
        """Gather sequence outputs back to the original positions (see the module docstring)."""
        n = batch.input_ids.shape[1]

        def strip(x: Any) -> Any:
            is_seq = isinstance(x, Tensor) and x.ndim == 3 and x.shape[1] == n
            return batch.strip(x) if is_seq else x

        fields = dict(out.items())
        for key in ("logits", "last_hidden_state"):
            if key in fields:
                fields[key] = strip(fields[key])
        if fields.get("hidden_states") is not None:
            fields["hidden_states"] = tuple(strip(h) for h in fields["hidden_states"])
        return type(out)(**fields)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                instruction_mask: Tensor | None = None, labels: Tensor | None = None,
                adapter_names: Sequence[str] | None = None, cached_prompts: CachedPrompts | None = None,
                **kwargs: Any) -> Any:
        """The backbone's forward with IAPT prompts; outputs at the original (B, T) positions.

        ``input_ids``/``attention_mask``/``instruction_mask``/``labels``: (B, T); ``adapter_names``: one per
        row (default: the active adapter); ``cached_prompts`` replaces the generators (from
        :meth:`cache_prompts`); other keyword arguments go to the backbone."""
        for key in ("inputs_embeds", "position_ids"):
            if kwargs.get(key) is not None:
                raise ConfigError(bad_value(key, "a tensor", "None", "IAPT builds positions from input_ids and "
                                            "attention_mask; pass input_ids"))
        if max(cache_length(kwargs.get("cache")), cache_length(kwargs.get("past_key_values"))) > 0:
            raise ConfigError(bad_value("cache", "a non-empty cache", "None", "decode with generate(), which "
                                        "reuses the prompts through the cache"))
        if self.training and uses_checkpointing(self.base_model):
            raise ConfigError(bad_value("gradient_checkpointing", True, "False with IAPT", "turn it off with "
                                        "base_model.activation_checkpointing_disable() (older transformers: "
                                        "gradient_checkpointing_disable())"))
        return_dict = kwargs.pop("return_dict", None)
        batch = self.expand_inputs(input_ids, attention_mask, instruction_mask, labels=labels,
                                   adapter_names=adapter_names, cached_prompts=cached_prompts,
                                   token_type_ids=kwargs.pop("token_type_ids", None))
        token_labels = labels is not None and labels.shape == input_ids.shape
        own_loss = token_labels and is_causal_lm(self.base_model)
        num_items = kwargs.pop("num_items_in_batch", None) if own_loss else None
        if labels is not None and not own_loss:
            kwargs["labels"] = batch.insert(labels, -100) if token_labels else labels
        with self._activate(batch):
            out = self.base_model(**self._model_inputs(batch), **kwargs)
        out = self._strip_outputs(out, batch)
        if own_loss:
            fields = dict(out.items())
            fields["loss"] = self.base_model.loss_function(logits=out.logits, labels=labels,
                                                           vocab_size=self.config.vocab_size,
                                                           num_items_in_batch=num_items)
            out = type(out)(**fields)
        return out.to_tuple() if return_dict is False else out

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                 instruction_mask: Tensor | None = None, adapter_names: Sequence[str] | None = None,
                 cached_prompts: CachedPrompts | None = None, **kwargs: Any) -> Any:
        """The backbone's ``generate`` with prompts computed once at prefill; the returned sequences are the
        ORIGINAL input (placeholders removed) followed by the new tokens, (B * num_return_sequences, T + new).
        Batches must be left-padded (right padding is a ValueError: the new tokens would follow the padding;
        :func:`~leanfit.iapt.encoding.encode_instructions` builds such batches). ``instruction_mask`` defaults to
        every attended input token (the whole prompt is the instruction); ``adapter_names`` / ``cached_prompts``
        as in :meth:`forward`. Other keyword arguments (``max_new_tokens``, ``do_sample``, ``num_beams``, ...) go
        to the backbone's ``generate``."""
        if kwargs.get("use_cache") is False:
            raise ConfigError(bad_value("use_cache", False, "True (the default) with IAPT", "the prompts are "
                                        "injected once, at prefill, and reach later tokens through the cache"))
        batch = self.expand_inputs(input_ids, attention_mask, instruction_mask, adapter_names=adapter_names,
                                   cached_prompts=cached_prompts)
        _check_left_padded(batch.attention_mask)
        with self._activate(batch):
            out = self.base_model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **kwargs)
        sequences = out if isinstance(out, Tensor) else out.sequences
        n = batch.input_ids.shape[1]
        stripped = torch.cat([batch.strip(sequences[:, :n]), sequences[:, n:]], 1)
        if isinstance(out, Tensor):
            return stripped
        out["sequences"] = stripped
        return out

    @torch.no_grad()
    def cache_prompts(self, input_ids: Tensor, instruction_mask: Tensor | None = None,
                      adapter_name: str | None = None, attention_mask: Tensor | None = None) -> CachedPrompts:
        """Prompts of ``adapter_name`` (default: active) for an instruction (B, T), every adapted layer.

        Pass the result as ``forward(..., cached_prompts=...)`` / ``generate(...)`` to skip the generators for a
        repeated instruction. For decoders whose instruction is a prefix of the later inputs (after the same
        first token) the cached prompts equal the ones computed inline; for encoders the instruction's hidden
        states depend on the whole input, so the cache holds the prompts of the instruction alone."""
        name = self.active_adapter if adapter_name is None else adapter_name
        self._check_adapter(name)
        input_ids = self._check_input_ids(input_ids)
        batch = self.expand_inputs(input_ids, attention_mask, instruction_mask,
                                   adapter_names=[name] * input_ids.shape[0])
        record: dict[int, Tensor] = {}
        gates: dict[int, Tensor] = {}
        with self._activate(batch, record, gates):
            self.base_model(**self._model_inputs(batch))
        return CachedPrompts(name, record, gates)

    # ----------------------------------------------------------------------------------------- save / load
    def save_pretrained(self, save_directory: str | os.PathLike, adapter_names: Sequence[str] | None = None, *,
                        state_dict: Mapping[str, Tensor] | None = None) -> None:
        """One subfolder per adapter with ``adapter_config.json`` (the config, ``peft_type``, backbone id, hidden
        size and layer count) and ``adapter_model.safetensors`` (keys ``iapt.<layer>.<parameter>``); each
        subfolder is replaced atomically.

        ``state_dict``: as in PEFT, a state dict of the whole model (keys as in ``self.state_dict()``, e.g. one
        gathered by ``transformers.Trainer`` under DeepSpeed or FSDP) to take the adapters' tensors from instead
        of the live parameters; the backbone's entries are ignored."""
        _check_path("save_directory", save_directory)
        if adapter_names is not None and (isinstance(adapter_names, str) or not isinstance(adapter_names, Iterable)):
            raise TypeError(bad_value("adapter_names", adapter_names, "None or a list of adapter names",
                                      f"for one adapter pass [{adapter_names!r}]"))
        if state_dict is not None and not isinstance(state_dict, Mapping):
            raise TypeError(bad_value("state_dict", shown(state_dict), f"None or a mapping of parameter names to "
                                      f"tensors, got {type(state_dict).__name__}", "pass model.state_dict()"))
        names = self.adapter_names if adapter_names is None else list(adapter_names)
        for name in names:
            self._check_adapter(name)
        for name in names:
            tensors = {f"iapt.{key}": value for key, value in self._adapter_state(name, state_dict).items()}
            with atomic_dir(Path(save_directory) / name) as tmp:
                atomic_write_json(tmp / CONFIG_NAME, {"peft_type": PEFT_TYPE, **self.peft_config[name].to_dict()})
                atomic_save_tensors(tmp / WEIGHTS_NAME, tensors)

    def _adapter_state(self, name: str, state_dict: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
        """Adapter ``name``'s tensors, keyed as in its generators' ``state_dict()``: the live ones, or those under
        ``iapt.<name>.`` in the whole model's ``state_dict``."""
        own = self.iapt[name].state_dict()
        if state_dict is None:
            return dict(own)
        prefix = f"iapt.{name}."
        found = {key.removeprefix(prefix): value for key, value in state_dict.items() if key.startswith(prefix)}
        if set(found) != set(own):
            missing = sorted(prefix + key for key in set(own) - set(found))
            raise ConfigError(bad_value("state_dict", f"{len(state_dict)} entries, missing {missing[:3]}",
                                        f"every tensor of adapter {name!r} (keys as in model.state_dict())",
                                        "pass the state dict of this IAPTModel, or None for its live parameters"))
        return found

    def _reload_weights(self, path: str | os.PathLike) -> None:
        """Load the weights saved under ``path`` (by :meth:`save_pretrained`) into this model's adapters of the
        same names and configs; every adapter must be there (a checkpoint of this model)."""
        folders = dict(_adapter_folders(_check_path("path", path), None))
        if set(folders) != set(self.iapt):
            raise ConfigError(bad_value("path", str(path), f"a checkpoint of adapters {self.adapter_names} (found: "
                                        f"{sorted(folders)})", "resume with the model the checkpoint was saved from"))
        for name, folder in folders.items():
            if _read_config(folder) != self.peft_config[name]:
                raise ConfigError(bad_value(str(folder / CONFIG_NAME), "another config", f"adapter {name!r}'s config "
                                            "of this model", "resume with the model the checkpoint was saved from"))
        for name, folder in folders.items():
            self._load_weights(name, folder)

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None, *,
                        check_base_model: bool = True) -> IAPTModel:
        """Wrap ``base_model`` with the adapters saved under ``path`` (every subfolder, or only
        ``adapter_name``; ``path`` may also be one adapter's folder). The first adapter loaded is active."""
        folders = _adapter_folders(_check_path("path", path), adapter_name)
        configs = [(name, _read_config(folder)) for name, folder in folders]
        for _, config in configs:
            _check_base_model(config, base_model, check_base_model)
        model = cls(base_model, configs[0][1], folders[0][0])
        try:
            model._load_weights(folders[0][0], folders[0][1])
            for (name, folder), (_, config) in zip(folders[1:], configs[1:], strict=True):
                model.add_adapter(name, config)
                model._load_weights(name, folder)
        except Exception:
            model.unload()  # leave the caller's backbone as it was: no hooks, loadable again
            raise
        return model

    def load_adapter(self, path: str | os.PathLike, adapter_name: str | None = None, *,
                     check_base_model: bool = True) -> None:
        """Add the adapter saved in ``path`` (an adapter folder, or a folder holding ``adapter_name``)."""
        for name, folder in _adapter_folders(_check_path("path", path), adapter_name):
            config = _read_config(folder)
            _check_base_model(config, self.base_model, check_base_model)
            self.add_adapter(name, config)
            try:
                self._load_weights(name, folder)
            except Exception:
                self.delete_adapter(name)  # no half-loaded, freshly initialised adapter left behind
                raise

    def _load_weights(self, name: str, folder: Path) -> None:
        from safetensors.torch import load_file

        tensors = load_file(folder / WEIGHTS_NAME, device=str(self._device()))
        state = {key.removeprefix("iapt."): value for key, value in tensors.items()}
        expected = set(self.iapt[name].state_dict())
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ConfigError(bad_value(str(folder / WEIGHTS_NAME), f"missing {missing[:3]}, unexpected {extra[:3]}",
                                        "the tensors its adapter_config.json describes",
                                        "save the adapter again with save_pretrained()"))
        self.iapt[name].load_state_dict(state)


def _check_left_padded(attention_mask: Tensor) -> None:
    """``generate`` appends new tokens after the last position: a row with padding after a real token (right
    padding) would continue from its padding, so it is refused."""
    after = (attention_mask[:, :-1] > attention_mask[:, 1:]).any(1).nonzero().flatten()
    if after.numel():
        raise ConfigError(bad_value("attention_mask", f"right padding (row {after[0].item()} has padding after a "
                                    "real token)", "left padding in generate()", "set tokenizer.padding_side = "
                                    "'left' before tokenizing, or build the batch with encode_instructions()"))


def _check_path(param: str, path: Any) -> Path:
    if not isinstance(path, str | os.PathLike):
        raise TypeError(bad_value(param, path, f"a folder path (str or os.PathLike), got {type(path).__name__}"))
    return Path(path)


def _backbone_width(model: nn.Module) -> int:
    """The hidden size of a Hugging Face backbone (``config.hidden_size``); a ValueError for other modules."""
    width = getattr(getattr(model, "config", None), "hidden_size", None)
    if isinstance(width, bool) or not isinstance(width, int) or width < 1 or next(model.parameters(), None) is None:
        raise ConfigError(bad_value("base_model", type(model).__name__, "a Hugging Face model: parameters and a "
                                    "config with hidden_size", "wrap a transformers PreTrainedModel"))
    return width


def _adapter_folders(path: Path, adapter_name: str | None) -> list[tuple[str, Path]]:
    if adapter_name is not None and not isinstance(adapter_name, str):
        raise TypeError(bad_value("adapter_name", adapter_name, "None or an adapter name (str)"))
    if (path / CONFIG_NAME).is_file():
        return [(adapter_name or path.name, path)]
    found = sorted(p.name for p in path.iterdir() if (p / CONFIG_NAME).is_file()) if path.is_dir() else []
    if adapter_name is None and found:
        return [(name, path / name) for name in found]
    if adapter_name in found:
        return [(adapter_name, path / adapter_name)]
    what = f"an adapter folder named {adapter_name!r}" if adapter_name else "adapter folders"
    raise ConfigError(bad_value("path", str(path), f"a folder holding {what} (found: {found or 'none'})",
                                "pass the folder given to save_pretrained()"))


def _read_config(folder: Path) -> IAPTConfig:
    data = dict(read_json(folder / CONFIG_NAME))
    peft_type = data.pop("peft_type", None)
    if peft_type != PEFT_TYPE:
        raise ConfigError(bad_value(f"{folder / CONFIG_NAME}: peft_type", peft_type, repr(PEFT_TYPE),
                                    "this folder holds another kind of adapter; load it with its own library"))
    return IAPTConfig.from_dict(data, where=str(folder / CONFIG_NAME))


def _check_base_model(config: IAPTConfig, base_model: nn.Module, check: bool) -> None:
    saved = config.base_model_name_or_path
    actual = getattr(getattr(base_model, "config", None), "_name_or_path", "") or None
    if check and saved and actual and saved != actual:
        raise ConfigError(bad_value("base_model_name_or_path", saved, f"the backbone's {actual!r}",
                                    "load the adapter onto the backbone it was trained on, or pass "
                                    "check_base_model=False if this is the same model under another name"))


def get_iapt_model(model: nn.Module, config: IAPTConfig, adapter_name: str = "default") -> IAPTModel:
    """Freeze ``model`` (any HF decoder or encoder) and wrap it with one fresh IAPT adapter."""
    return IAPTModel(model, config, adapter_name)
