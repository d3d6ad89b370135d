"""The slot machinery under :class:`~leanfit.iapt.model.IAPTModel`: where the soft tokens go in a batch
(:class:`IAPTBatch`, one layout per adapter group), what the layer hooks of one forward share (the row views of
the injected prompts), prompts kept for decoding (:class:`CachedPrompts`), and what the wrapper reads from a
backbone (its layer list, input norms, cache length, accepted arguments), and the checks of the tensors a caller
passes (:func:`check_tensor`, :func:`check_mask`). It knows no adapter: the model class owns the generators, the
hooks and saving, as PEFT splits a tuner's model from its layers."""

from __future__ import annotations

import functools
import reprlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from leanfit.core.errors import ConfigError, bad_value

__all__ = ["CachedPrompts", "HookState", "IAPTBatch", "RowView", "accepts_argument", "biased_linears",
           "cache_length", "check_dtype", "check_mask", "check_tensor", "find_layers", "input_norm", "insert_at",
           "is_causal_lm", "shown", "uses_checkpointing"]


class _Shown:
    """A value shown by a shortened repr in an error message (a long list of token ids stays one line)."""

    def __init__(self, value: Any) -> None:
        self.text = reprlib.repr(value)

    def __repr__(self) -> str:
        return self.text


def shown(value: Any) -> Any:
    """``value`` itself, or a stand-in whose repr is shortened when the value is a long container."""
    return _Shown(value) if isinstance(value, list | tuple | dict) else value


def check_tensor(name: str, value: Any, fix: str) -> Tensor:
    """``value`` when it is a tensor; a TypeError naming ``name`` with ``fix`` otherwise."""
    if not isinstance(value, Tensor):
        raise TypeError(bad_value(name, shown(value), f"a tensor, got {type(value).__name__}", fix))
    return value


def check_dtype(dtype: Any) -> None:
    """``dtype`` is None or a floating torch dtype (the generators' parameters train)."""
    if dtype is None:
        return
    if not isinstance(dtype, torch.dtype):
        raise TypeError(bad_value("dtype", dtype, "None or a torch.dtype such as torch.float32"))
    if not dtype.is_floating_point:
        raise ConfigError(bad_value("dtype", dtype, "a floating dtype", "use torch.float32 or torch.float64"))


def check_mask(name: str, mask: Any, shape: Sequence[int], like: str, device: torch.device | None = None, *,
               each_row: bool = True) -> Tensor:
    """``mask`` (bool, or integers 0/1) of ``shape`` as a bool tensor; with ``each_row`` every row must hold a
    True. ``like`` says where ``shape`` comes from (for the message); a device sync for the value checks."""
    check_tensor(name, mask, f"pass a bool tensor of shape {tuple(shape)}")
    if mask.is_floating_point() or mask.is_complex():
        raise ConfigError(bad_value(f"{name}.dtype", mask.dtype, "bool (or integers 0/1)",
                                    f"pass {name}=mask.bool()"))
    if tuple(mask.shape) != tuple(shape):
        raise ConfigError(bad_value(f"{name}.shape", tuple(mask.shape), f"{tuple(shape)}, {like}"))
    if device is not None and mask.device != device:
        raise ConfigError(bad_value(f"{name}.device", str(mask.device), f"{device}, the device of the inputs",
                                    f"move it with {name}.to({str(device)!r})"))
    if mask.dtype != torch.bool and ((mask != 0) & (mask != 1)).any():
        raise ConfigError(bad_value(name, "values other than 0 and 1", "a bool tensor (or integers 0/1)",
                                    f"pass {name}=mask.bool() if every non-zero marks a True"))
    mask = mask.bool()
    if each_row:
        empty = (~mask.any(dim=1)).nonzero().flatten()
        if empty.numel():
            raise ConfigError(bad_value(f"{name}[{empty[0].item()}]", "all False", "at least one True per row "
                                        "(an instruction token)", "mark the row's instruction (prompt) tokens True"))
    return mask


@dataclass
class CachedPrompts:
    """Per-layer prompts of one adapter for a fixed instruction: ``prompts[layer]`` is (N, k, d); N = 1 serves
    any batch, N = B one prompt set per row. Made by :meth:`IAPTModel.cache_prompts`."""

    adapter_name: str
    prompts: dict[int, Tensor]
    gates: dict[int, Tensor] = field(default_factory=dict)  # per layer, adapters with ``prompt_gate``

    def __post_init__(self) -> None:
        fix = "use the result of IAPTModel.cache_prompts()"
        if not isinstance(self.adapter_name, str):
            raise TypeError(bad_value("adapter_name", self.adapter_name, "an adapter name (str)", fix))
        for name, values in (("prompts", self.prompts), ("gates", self.gates)):
            layers_ok = isinstance(values, Mapping) and all(isinstance(k, int) and not isinstance(k, bool)
                                                            for k in values)
            if not layers_ok or not all(isinstance(v, Tensor) for v in values.values()):
                raise TypeError(bad_value(name, shown(values), "a dict of layer index (int) -> tensor", fix))
        if not self.prompts:
            raise ConfigError(bad_value("prompts", self.prompts, "the prompts of at least one layer", fix))
        first = next(iter(self.prompts.values())).shape
        for layer, prompts in self.prompts.items():
            if prompts.ndim != 3 or prompts.shape != first:
                raise ConfigError(bad_value(f"prompts[{layer}].shape", tuple(prompts.shape), "(N, k, d), the same "
                                            f"for every layer (the first is {tuple(first)})", fix))

    @property
    def num_rows(self) -> int:
        return next(iter(self.prompts.values())).shape[0]


@dataclass
class IAPTBatch:
    """Inputs after placeholder insertion (length T + k) and what the layer hooks need.

    ``keep_index`` (B, T): the expanded position of each original position; ``slot_index`` (B, k): the
    placeholder positions; ``groups``: (adapter, rows) pairs, rows None meaning every row."""

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    instruction_mask: Tensor | None
    slot_index: Tensor
    keep_index: Tensor
    groups: list[tuple[str, Tensor | None]]
    cached: CachedPrompts | None = None
    token_type_ids: Tensor | None = None

    def __post_init__(self) -> None:
        """Cheap shape checks (no device sync): the batch is made by :meth:`IAPTModel.expand_inputs`."""
        ids = check_tensor("input_ids", self.input_ids, "use IAPTModel.expand_inputs()")
        if ids.ndim != 2:
            raise ConfigError(bad_value("input_ids.shape", tuple(ids.shape), "(batch, seq + k)"))
        slots = check_tensor("slot_index", self.slot_index, "use IAPTModel.expand_inputs()")
        b, n = ids.shape
        if slots.ndim != 2 or slots.shape[0] != b:
            raise ConfigError(bad_value("slot_index.shape", tuple(slots.shape), f"({b}, k)"))
        expected = {"attention_mask": (b, n), "position_ids": (b, n), "instruction_mask": (b, n),
                    "token_type_ids": (b, n), "keep_index": (b, n - slots.shape[1])}
        for name, shape in expected.items():
            value = getattr(self, name)
            if value is not None and tuple(check_tensor(name, value, "use IAPTModel.expand_inputs()").shape) != shape:
                raise ConfigError(bad_value(f"{name}.shape", tuple(value.shape), f"{shape}, like input_ids"))

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    def insert(self, values: Tensor, fill: Tensor | float | int) -> Tensor:
        """(B, T) values -> (B, T + k) with ``fill`` (scalar or (B,)) at the placeholders."""
        return insert_at(values, self.keep_index, self.slot_index, fill)

    def strip(self, values: Tensor) -> Tensor:
        """(B*r, T + k, ...) -> (B*r, T, ...): the original positions (rows repeated r times, as beams are)."""
        keep = self.keep_index.repeat_interleave(values.shape[0] // self.batch_size, 0)
        return values.gather(1, keep.view(*keep.shape, *([1] * (values.ndim - 2))).expand(-1, -1, *values.shape[2:]))


@dataclass
class RowView:
    """The batch seen by a hook whose hidden states have ``repeat`` rows per input row (beams, return sequences)."""

    slot_index: Tensor
    instruction: Tensor | None
    groups: list[tuple[str, Tensor | None]]
    repeat: int


@dataclass
class HookState:
    batch: IAPTBatch
    pending: set[int]
    record: dict[int, Tensor] | None = None
    views: dict[int, RowView] = field(default_factory=dict)
    gates: dict[int, Tensor] = field(default_factory=dict)  # (N,) row gates a layer's norm hook applies next
    gate_record: dict[int, Tensor] | None = None  # cache_prompts: each gated layer's gate
    # (layer, the gated norm output, its (N,) row gates): the linear maps fed by exactly this tensor get their
    # bias scaled by the gate at the soft positions too
    gated: tuple[int, Tensor, Tensor] | None = None

    @property
    def seq_len(self) -> int:
        return self.batch.input_ids.shape[1]

    def view(self, rows: int) -> RowView:
        if rows not in self.views:
            b = self.batch
            if rows % b.batch_size:
                raise RuntimeError(f"IAPT hook saw {rows} rows for a batch of {b.batch_size}")
            r = rows // b.batch_size
            rep = functools.partial(torch.repeat_interleave, repeats=r, dim=0)
            groups = [(n, None if g is None else (g[:, None] * r + torch.arange(r, device=g.device)).flatten())
                      for n, g in b.groups]
            instruction = None if b.instruction_mask is None else rep(b.instruction_mask)
            self.views[rows] = RowView(rep(b.slot_index), instruction, groups, r)
        return self.views[rows]


def insert_at(values: Tensor, keep: Tensor, slots: Tensor, fill: Tensor | float | int) -> Tensor:
    b, t = values.shape
    k = slots.shape[1]
    out = values.new_zeros((b, t + k)).scatter(1, keep, values)
    fill = torch.as_tensor(fill, dtype=values.dtype, device=values.device)
    return out.scatter(1, slots, fill.reshape(-1, 1).expand(b, k))


def find_layers(model: nn.Module, path: str | None = None) -> tuple[str, nn.ModuleList]:
    """The backbone's layer list: the module at dotted ``path``, or else the one ``nn.ModuleList`` holding
    ``config.num_hidden_layers`` modules. Returns (path, list)."""
    if not isinstance(model, nn.Module):
        raise TypeError(bad_value("model", type(model).__name__, "an nn.Module (a Hugging Face model)"))
    if path is not None and not isinstance(path, str):
        raise TypeError(bad_value("layers_path", path, "None or the dotted path of the layer list (str)",
                                  "for example 'model.layers'"))
    if path is not None:
        try:
            layers = model.get_submodule(path)
        except AttributeError:
            layers = None
        if not isinstance(layers, nn.ModuleList):
            raise ConfigError(bad_value("layers_path", path, "the dotted path of an nn.ModuleList in the model",
                                        "for example 'model.layers', 'transformer.h' or 'bert.encoder.layer'"))
        return path, layers
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if len(found) != 1:
        names = ", ".join(repr(name) for name, _ in found) or "none"
        raise ConfigError(bad_value("layers_path", None, f"one ModuleList of num_hidden_layers={n} modules "
                                    f"(found: {names})", "set IAPTConfig.layers_path to the layer list"))
    return found[0]


def is_causal_lm(model: nn.Module) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    return any(cls.__name__ in names for cls in type(model).__mro__)


def cache_length(cache: Any) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2]) if len(cache) else 0


def uses_checkpointing(model: nn.Module) -> bool:
    """Whether HF gradient checkpointing is on (older transformers: a ``gradient_checkpointing`` flag on modules)."""
    flag = getattr(model, "is_activation_checkpointing", None)
    if isinstance(flag, bool):
        return flag
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def input_norm(layer: nn.Module) -> nn.Module | None:
    """The first normalisation module among ``layer``'s direct children (a pre-norm layer's input norm: Llama's
    ``input_layernorm``, GPT-2's ``ln_1``), None for post-norm layers such as BERT's, whose norms sit deeper."""
    return next((m for m in layer.children() if "norm" in type(m).__name__.lower()), None)


def biased_linears(layer: nn.Module) -> list[nn.Module]:
    """The affine maps inside ``layer`` that add a bias: modules with a 2-D ``weight`` and a 1-D ``bias`` tensor
    (``nn.Linear``, GPT-2's ``Conv1D``); norms (1-D weights) and embeddings (no bias) are left out."""
    return [m for m in layer.modules() if isinstance(getattr(m, "weight", None), Tensor) and m.weight.ndim == 2
            and isinstance(getattr(m, "bias", None), Tensor) and m.bias.ndim == 1]


def accepts_argument(model: nn.Module, name: str) -> bool:
    import inspect

    return name in inspect.signature(model.forward).parameters
