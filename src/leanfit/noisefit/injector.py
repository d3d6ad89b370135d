"""Gaussian noise added to the outputs of chosen decoder blocks, through forward hooks.

- :func:`find_decoder_layers` finds the decoder blocks of a causal LM (PEFT, DDP and ``torch.compile`` wrappers
  unwrapped): the ``nn.ModuleList`` whose length is the config's number of hidden layers.
- :func:`token_noise_std` is leanfit's noise scale, :func:`paper_v1_noise_std` the reference v1 one; both map a
  hidden state ``(B, T, d)`` to a per-element standard deviation.
- :class:`NoiseInjector` hooks the chosen blocks. Noise is added only inside ``with injector.noisy(...)`` and
  only while the block is in training mode, so evaluation and ``generate()`` are never noisy; ``rows`` restricts
  it to some batch rows so that clean and noisy branches share one batched forward.

leanfit's scale is relative to each token's RMS over the hidden dimension, so ``rel_noise`` is dimensionless: the
token's noise RMS is ``rel_noise * RMS_t(h)`` (times the token factor below), whatever the activation size. With
``token_adaptive`` the std of element ``e`` of token ``t`` is ``rel_noise * RMS_t * f_t * w_te / RMS_e(w_t)``
with ``f_t = min(var_t / mean_valid(var), max_token_factor)`` and ``w_te = exp(-beta |h_te - median_t| / MAD_t)``.
The weights are renormalised to unit RMS per token, so they only redistribute noise away from outlier channels
and the token's relative noise is exactly ``rel_noise * f_t``; averaged over valid tokens that is ``rel_noise``
times ``mean(f_t)``, which is 1 unless tokens hit the clip. ``RMS_t`` and ``var_t`` are those of the token's
channels winsorised at 5 robust standard deviations: the first token of many pretrained LMs carries a few channels
~100x larger than the rest (SmolLM2: RMS ~1000 against ~6), and a plain RMS would size the noise of every other
channel by them (measured: KL at the logits 2.8 instead of 0.02 nats for one layer at 5%). Statistics (the mean variance) use only the valid
tokens given by ``token_mask`` (no padding, no prompt); ``noise_mask`` says where noise lands. The std is
computed without gradient: the noise is a constant perturbation (E[h~|h] = h). The reference v1 scale keeps
its quadratic dependence on the activation size and its gradient path, see :func:`paper_v1_noise_std`.

Randomness comes from a ``torch.Generator`` per device seeded with ``config.seed`` and the process rank
(:func:`stream_seed`: ``seed + 1_000_003 * rank``, so a single process and rank 0 use ``config.seed`` itself):
runs are reproducible, the processes of a distributed run draw different noise (identical draws would repeat
one process's noise across the data-parallel batch), and the model's own random stream (dropout) is untouched.

Gradient checkpointing: from transformers 5 the decoder blocks checkpoint ``forward`` and keep module hooks
outside the checkpoint, so the noise is added once, by ordinary autograd ops, and never recomputed (tested).
Where a hook runs inside a checkpointed region (blocks wrapped by hand in ``torch.utils.checkpoint``, several
blocks per segment, or transformers 4.x, which checkpointed ``__call__``), the recomputation calls the hook
again; it must then draw the same noise, or the gradients of everything downstream in the segment (and of the v1
noise scale) are wrong. Pass ``generator="global"``: the draw uses the global RNG, which ``preserve_rng_state``
restores for the recomputation, and run ``backward()`` inside the ``noisy()`` block so that the recomputation is
noisy too (tested with a reentrant checkpoint over two blocks). The global RNG is the caller's: it differs per
process only if the caller seeds it so (``transformers.set_seed`` gives every process the same stream).
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from leanfit.core.errors import ConfigError, bad_value
from leanfit.noisefit.config import CalibrationResult, NoiseFiTConfig, brief, check_int, check_real

__all__ = ["NoiseInjector", "find_decoder_layers", "paper_v1_noise_std", "process_rank", "stream_seed",
           "token_noise_std", "unwrap_model"]

_BLOCK_LIST_NAMES = ("layers", "h", "blocks", "block", "layer")
_EPS = 1e-6  # relative floor of MAD (times the token RMS) and the reference's stabiliser
_V1_EPS = 1e-6
_WINSOR_K = 5.0  # robust standard deviations kept when measuring a token's RMS and variance
_MAD_TO_STD = 1.4826  # MAD -> standard deviation for Gaussian values
_RANK_STRIDE = 1_000_003  # a prime: seed streams of ranks r and r + 1 are this far apart


def process_rank() -> int:
    """This process's rank in the default ``torch.distributed`` process group; 0 when none is initialised."""
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def stream_seed(seed: int, rank: int) -> int:
    """The seed of process ``rank``'s noise generator: ``seed + 1_000_003 * rank`` modulo 2**64 (rank 0: ``seed``).

    seed: an integer >= 0 (``config.seed``); rank: >= 0. Streams collide only when two seeds of a sweep differ by a
    multiple of 1_000_003."""
    seed = check_int("seed", seed, ge=0, lt=2**63, fix="pass config.seed")
    rank = check_int("rank", rank, ge=0, fix="pass the process rank, e.g. torch.distributed.get_rank()")
    return (seed + _RANK_STRIDE * rank) % 2**64


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model under PEFT (``get_base_model()``), DDP/DataParallel (``.module``) and ``torch.compile``."""
    if not isinstance(model, nn.Module):
        raise TypeError(bad_value("model", type(model).__name__, "a torch.nn.Module (a causal LM)",
                                  "pass the model object, e.g. AutoModelForCausalLM.from_pretrained(...)"))
    for _ in range(8):
        if hasattr(model, "get_base_model") and callable(model.get_base_model):
            inner = model.get_base_model()
        elif isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            inner = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            inner = model._orig_mod
        else:
            return model
        if inner is model:
            return model
        model = inner
    return model


def _num_hidden_layers(config: Any) -> int | None:
    for cfg in (config, getattr(config, "get_text_config", lambda: None)()):
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            value = getattr(cfg, key, None)
            if isinstance(value, int) and value > 0:
                return value
    return None


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of ``model``: the ``nn.ModuleList`` whose length is ``config.num_hidden_layers``.

    Lists named ``layers``/``h``/``blocks``/``block``/``layer`` are preferred (``.model.layers`` of Llama/Qwen,
    ``.transformer.h`` of GPT-2); without a config, such a named list is taken as is."""
    base = unwrap_model(model)
    n_layers = _num_hidden_layers(getattr(base, "config", None))
    lists = [(name, mod) for name, mod in base.named_modules() if isinstance(mod, nn.ModuleList) and len(mod) > 0]
    named = [(n, m) for n, m in lists if n.rsplit(".", 1)[-1] in _BLOCK_LIST_NAMES]
    if n_layers is not None:
        named = [(n, m) for n, m in named if len(m) == n_layers]
        others = [(n, m) for n, m in lists if len(m) == n_layers and len({type(b) for b in m}) == 1]
        found = named or others
    else:
        found = named
    if not found:
        expected = f"of length config.num_hidden_layers={n_layers}" if n_layers else "(the model has no config)"
        raise ConfigError(bad_value("model", type(base).__name__, f"a causal LM with an nn.ModuleList of decoder "
                                    f"blocks {expected}; searched ModuleLists named {', '.join(_BLOCK_LIST_NAMES)} "
                                    "and any list of one block type", "pass a decoder-only transformer"))
    return found[0][1]


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` (B, T) over ``mask`` (B, T) bool; over everything when the mask is None or empty.
    Written without boolean indexing so that it does not synchronise with the GPU."""
    if mask is None:
        return values.mean()
    weight = mask.to(values.dtype)
    count = weight.sum()
    return torch.where(count > 0, (values * weight).sum() / count.clamp_min(1), values.mean())


@torch.no_grad()
def _winsorized(h: torch.Tensor, k: float = _WINSOR_K) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per token: (median, MAD, h clamped to median +- k * 1.4826 * MAD). ``h`` (B, T, d) float32.

    Some tokens (the first one of many pretrained LMs) carry a few "massive" channels hundreds of times larger than
    the rest; their plain RMS would size the noise for every channel by those few. Clamping at 5 robust standard
    deviations leaves Gaussian-like tokens untouched (one value in ~1.7 million lies beyond) and measures such
    tokens by their ordinary channels."""
    median = h.median(-1, keepdim=True).values
    mad = (h - median).abs().median(-1, keepdim=True).values
    spread = k * _MAD_TO_STD * mad
    return median, mad, torch.maximum(torch.minimum(h, median + spread), median - spread)


def _check_hidden(hidden: Any, min_d: int) -> None:
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(bad_value("hidden", type(hidden).__name__, "a torch tensor (B, T, d)",
                                  "pass a decoder block's output hidden states"))
    if not hidden.dtype.is_floating_point:
        raise TypeError(bad_value("hidden", brief(hidden), "a floating-point tensor", "convert it with .float()"))
    if hidden.dim() != 3 or hidden.shape[-1] < min_d:
        raise ConfigError(bad_value("hidden", brief(hidden), f"a tensor (B, T, d) with d >= {min_d} channels",
                                    "add the missing dimensions, e.g. hidden[None] for one sequence (T, d)"))
    if not bool(torch.isfinite(hidden.detach()).all()):
        raise ConfigError(bad_value("hidden", brief(hidden), "finite values (no NaN or infinity)",
                                    "check the model's activations for a diverged run"))


def _check_shape_args(beta: Any, max_factor: Any) -> None:
    check_real("beta", beta, ge=0, fix="the default is 0.1")
    check_real("max_factor", max_factor, gt=0, fix="the default is 5.0")


def token_noise_std(hidden: torch.Tensor, token_mask: torch.Tensor | None = None, *, scale: float,
                    token_adaptive: bool = True, beta: float = 0.1,
                    max_factor: float = 5.0) -> torch.Tensor:
    """leanfit's noise std: ``hidden`` (B, T, d) -> float32 (B, T, d), or (B, T, 1) when not ``token_adaptive``.

    ``token_mask`` (B, T) bool marks the valid tokens whose variances form the mean variance of the token
    factor (None = all; no valid token = all). RMS and variance are those of the token's winsorised channels
    (see :func:`_winsorized`). See the module docstring for the formula. scale >= 0, beta >= 0, max_factor > 0
    (finite); ``hidden`` must be finite."""
    _check_hidden(hidden, min_d=1)
    if token_mask is not None:
        if not isinstance(token_mask, torch.Tensor) or token_mask.dtype != torch.bool:
            raise TypeError(bad_value("token_mask", brief(token_mask), "a bool tensor (B, T) or None",
                                      "build it with labels != -100 or statistics_mask(labels)"))
        if tuple(token_mask.shape) != tuple(hidden.shape[:2]):
            raise ConfigError(bad_value("token_mask", brief(token_mask), f"shape (B, T)={tuple(hidden.shape[:2])}, "
                                        "that of hidden"))
    check_real("scale", scale, ge=0, fix="pass the relative noise, e.g. scale=0.05")
    if not isinstance(token_adaptive, bool):
        raise TypeError(bad_value("token_adaptive", token_adaptive, "True or False"))
    _check_shape_args(beta, max_factor)
    return _token_noise_std(hidden, token_mask, scale, token_adaptive, beta, max_factor)


def _token_noise_std(hidden: torch.Tensor, token_mask: torch.Tensor | None, scale: float, token_adaptive: bool,
                     beta: float, max_factor: float) -> torch.Tensor:
    """:func:`token_noise_std` without the checks of its arguments (the injector checked them once)."""
    if hidden.shape[0] * hidden.shape[1] == 0:  # no token: nothing to measure (and no empty-reduction warnings)
        return hidden.new_zeros((*hidden.shape[:2], hidden.shape[2] if token_adaptive else 1), dtype=torch.float32)
    h = hidden.detach().float()
    median, mad, clipped = _winsorized(h)
    rms = clipped.pow(2).mean(-1, keepdim=True).sqrt()
    if not token_adaptive:
        return scale * rms
    var = clipped.var(-1, keepdim=True, correction=0)
    mean_var = _masked_mean(var.squeeze(-1), token_mask)
    factor = (var / mean_var.clamp_min(torch.finfo(torch.float32).tiny)).clamp(max=max_factor)
    dev = (h - median).abs()
    mad = mad.clamp_min(_EPS * rms).clamp_min(torch.finfo(torch.float32).tiny)
    weight = torch.exp(-beta * dev / mad)
    weight = weight / weight.pow(2).mean(-1, keepdim=True).sqrt()
    return scale * rms * factor * weight


def paper_v1_noise_std(hidden: torch.Tensor, base: float, *, beta: float = 0.1,
                       max_factor: float = 5.0) -> torch.Tensor:
    """The reference v1 per-element std ``base * MAD_t * exp(-beta|h - med_t|/MAD_t) * min(exp(var_t/mean var), 5)``.

    hidden: (B, T, d) with d >= 2 (the variance is unbiased) -> (B, T, d) float32, differentiable in ``hidden`` as
    in the reference (no detach); statistics over every token, padding included. The reference's ``base`` is
    ``noise_std * std(h)`` in its SNR probe but ``noise_std**2 * std(h)`` in training (``noise_std`` applied
    twice), with std over the whole tensor; MAD_t makes the noise grow with the square of the activation size.
    base >= 0, beta >= 0, max_factor > 0 (finite); ``hidden`` must be finite."""
    _check_hidden(hidden, min_d=2)
    check_real("base", base, ge=0, fix="pass noise_std * std(h), e.g. 0.1 * float(hidden.std())")
    _check_shape_args(beta, max_factor)
    return _paper_v1_noise_std(hidden, base, beta, max_factor)


def _paper_v1_noise_std(hidden: torch.Tensor, base: float, beta: float, max_factor: float) -> torch.Tensor:
    """:func:`paper_v1_noise_std` without the checks of its arguments."""
    h = hidden.float()
    if h.shape[0] * h.shape[1] == 0:  # no token (and no empty-reduction warnings); keeps the graph
        return h * 0.0
    var = h.var(-1, keepdim=True)
    factor = torch.exp(var / (var.mean() + _V1_EPS)).clamp(max=max_factor)
    median = h.median(-1, keepdim=True).values
    mad = (h - median).abs().median(-1, keepdim=True).values
    mad = torch.maximum(mad, _V1_EPS * h.norm(dim=-1, keepdim=True))
    weight = torch.exp(-beta * (h - median).abs() / (mad + _V1_EPS))
    return base * mad * weight * factor


@dataclass
class _NoiseState:
    rows: torch.Tensor | None
    rows_len: int | None  # length of a bool ``rows`` mask, checked against the batch
    token_mask: torch.Tensor | None
    noise_mask: torch.Tensor | None
    force: bool


def _as_rows(rows: Any) -> torch.Tensor | None:
    if rows is None:
        return None
    if rows.dtype == torch.bool:
        return rows.reshape(-1).nonzero().reshape(-1)
    if rows.dtype.is_floating_point or rows.dim() > 1:
        raise ConfigError(bad_value("rows", rows, "a bool mask (B,) or a 1-D tensor of row indices"))
    return rows.long()


def _rows_tensor(rows: Any) -> torch.Tensor:
    try:
        return torch.as_tensor(rows)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(bad_value("rows", rows, "a bool mask (B,) or a 1-D tensor of row indices", "pass e.g. "
                                  "torch.arange(B, 2 * B)")) from None


def _rows_for(rows: torch.Tensor | None, raw_len: int | None, batch: int, device: torch.device) -> torch.Tensor | None:
    if rows is None:
        return None
    if raw_len is not None and raw_len != batch:
        raise ConfigError(bad_value("rows", f"bool mask of length {raw_len}", f"a mask of length batch={batch}"))
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= batch):
        raise ConfigError(bad_value("rows", rows.tolist(), f"row indices in [0, {batch})"))
    return rows.to(device)


def _check_mask_arg(name: str, mask: Any) -> None:
    """A token mask argument: None or a 2-D tensor (its (batch, seq) shape is checked at the forward)."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(bad_value(name, type(mask).__name__, "a bool tensor (B, T) or None",
                                  "build it with torch.tensor(...) or from the labels/attention mask"))
    if mask.dim() != 2:
        raise ConfigError(bad_value(name, brief(mask), "a tensor of shape (B, T)", "one flag per token of the batch"))


def _mask_for(mask: torch.Tensor | None, name: str, shape: tuple[int, int],
              device: torch.device) -> torch.Tensor | None:
    if mask is None:
        return None
    if tuple(mask.shape) != shape:
        raise ConfigError(bad_value(name, f"tensor of shape {tuple(mask.shape)}", f"shape (batch, seq)={shape}, "
                                    "the whole batch of the forward (noisy and clean rows)"))
    return mask.to(device=device, dtype=torch.bool)


class NoiseInjector:
    """Forward hooks adding Gaussian noise to the outputs of chosen decoder blocks, only inside :meth:`noisy`.

    layers: block indices (default: the explicit ``config.layers``; "auto"/"snr_*" need :func:`calibrate` first,
    see :meth:`from_calibration`); scales: relative noise per layer (default ``config.rel_noise``);
    generator: "private" (a seeded generator per device) or "global" (the global RNG, for hooks that run inside
    a checkpointed region); rank: the process rank mixed into the private generators' seed (see
    :func:`stream_seed`; None = the ``torch.distributed`` rank, 0 without a process group; calibration passes 0
    so that its draws depend on the batch only). Usable as a context manager that removes the hooks on exit."""

    def __init__(self, model: nn.Module, config: NoiseFiTConfig, layers: Sequence[int] | None = None,
                 scales: Mapping[int, float] | None = None, *,
                 generator: Literal["private", "global"] = "private", rank: int | None = None) -> None:
        if not isinstance(config, NoiseFiTConfig):
            raise TypeError(bad_value("config", type(config).__name__, "a NoiseFiTConfig",
                                      "build one with NoiseFiTConfig(layers=..., rel_noise=...)"))
        self.config = config
        blocks = find_decoder_layers(model)
        self.layers = self._check_layers(config, layers, len(blocks))
        self.scales: dict[int, float] = {i: float(config.rel_noise) for i in self.layers}
        self.scales.update(self._check_scales(scales, self.layers))
        if generator not in ("private", "global"):
            raise ConfigError(bad_value("generator", generator, "'private' or 'global'"))
        self.generator_kind = generator
        self.rank = process_rank() if rank is None else check_int(
            "rank", rank, ge=0, fix="pass the process rank, or None for torch.distributed's")
        self._seed = int(config.seed)
        self._generators: dict[torch.device, torch.Generator] = {}
        self._state: _NoiseState | None = None
        self._token_mask: torch.Tensor | None = None
        self._noise_mask: torch.Tensor | None = None
        self._stats: dict[int, torch.Tensor] = {}
        self._handles = [blocks[i].register_forward_hook(self._make_hook(i)) for i in self.layers]

    @classmethod
    def from_calibration(cls, model: nn.Module, config: NoiseFiTConfig, result: CalibrationResult,
                         **kwargs: Any) -> NoiseInjector:
        """An injector on the layers and scales chosen by :func:`leanfit.noisefit.calibration.calibrate`."""
        return cls(model, config, layers=result.layers, scales=result.scales, **kwargs)

    @staticmethod
    def _check_layers(config: NoiseFiTConfig, layers: Sequence[int] | None, n_blocks: int) -> tuple[int, ...]:
        if layers is None:
            spec = config.layer_spec()
            if spec.kind != "explicit":
                raise ConfigError(bad_value("layers", config.layers, "explicit layer indices here",
                                            "run calibrate(model, batches, config) and pass layers=result.layers, "
                                            "scales=result.scales (or NoiseInjector.from_calibration)"))
            layers = spec.indices
        if isinstance(layers, str | bytes | Mapping) or not isinstance(layers, Iterable):
            raise TypeError(bad_value("layers", brief(layers), "a sequence of decoder block indices (ints)",
                                      'pass e.g. layers=[0, 2]; a string such as "0,2" goes in '
                                      "NoiseFiTConfig(layers=...)"))
        given = list(layers)
        try:
            layers = tuple(check_int("layers", i) for i in given)
        except TypeError:
            raise TypeError(bad_value("layers", given, "a sequence of decoder block indices (ints)",
                                      "pass e.g. layers=[0, 2]")) from None
        if not layers or len(set(layers)) != len(layers) or any(not 0 <= i < n_blocks for i in layers):
            raise ConfigError(bad_value("layers", list(layers), f"distinct indices in [0, {n_blocks}) (the model "
                                        f"has {n_blocks} decoder blocks)"))
        return tuple(sorted(layers))

    @staticmethod
    def _check_scales(scales: Mapping[int, float] | None, layers: tuple[int, ...]) -> dict[int, float]:
        if scales is None:
            return {}
        if not isinstance(scales, Mapping):
            raise TypeError(bad_value("scales", brief(scales), "a dict {layer: relative noise scale} or None",
                                      "pass e.g. scales={0: 0.05}"))
        shown: dict[Any, Any] = dict(scales)
        out: dict[int, float] = {}
        for i, s in scales.items():
            if isinstance(i, bool) or not isinstance(i, numbers.Integral) or i not in layers:
                raise ConfigError(bad_value("scales", shown, f"positive scales for layers {layers}"))
            out[int(i)] = check_real("scales", s, gt=0, shown=shown, fix=f"positive finite scales for layers {layers}")
        return out

    # ----------------------------------------------------------------------------------------------- activation
    def set_token_mask(self, mask: torch.Tensor | None, noise_mask: torch.Tensor | None = None) -> None:
        """Default masks for later :meth:`noisy` blocks: ``mask`` (B, T) bool = valid tokens for the statistics,
        ``noise_mask`` (B, T) bool = positions that receive noise (None = all)."""
        _check_mask_arg("mask", mask)
        _check_mask_arg("noise_mask", noise_mask)
        self._token_mask, self._noise_mask = mask, noise_mask

    @contextlib.contextmanager
    def noisy(self, rows: Any = None, token_mask: torch.Tensor | None = None, noise_mask: torch.Tensor | None = None,
              force: bool = False) -> Iterator[NoiseInjector]:
        """Add noise in forwards run inside this block (blocks in training mode only, unless ``force``).

        rows: bool mask (B,) or indices of the batch rows to perturb (None = all); token_mask / noise_mask: as in
        :meth:`set_token_mask`, for this block only. Masks have the shape of the whole batch, not of ``rows``."""
        if not self._handles:
            raise RuntimeError("this NoiseInjector was removed; build a new one")
        _check_mask_arg("token_mask", token_mask)
        _check_mask_arg("noise_mask", noise_mask)
        if not isinstance(force, bool):
            raise TypeError(bad_value("force", force, "True or False"))
        raw = None if rows is None else _rows_tensor(rows)
        rows_len = raw.numel() if raw is not None and raw.dtype == torch.bool else None
        token_mask = self._token_mask if token_mask is None else token_mask
        noise_mask = self._noise_mask if noise_mask is None else noise_mask
        prev, self._state = self._state, _NoiseState(_as_rows(raw), rows_len, token_mask, noise_mask, force)
        try:
            yield self
        finally:
            self._state = prev

    @property
    def active(self) -> bool:
        """Whether a :meth:`noisy` block is open (noise still needs training mode or ``force``)."""
        return self._state is not None

    def reseed(self, seed: int | None = None) -> None:
        """Restart the private generators from ``seed`` (default ``config.seed``; an integer >= 0), offset by the
        rank as in :func:`stream_seed`."""
        self._seed = int(self.config.seed) if seed is None else check_int("seed", seed, ge=0, lt=2**63)
        self._generators.clear()

    @property
    def last_stats(self) -> dict[int, float]:
        """Measured relative noise of the last noisy forward per layer: RMS(noise) / RMS(h) over valid tokens."""
        return {i: float(v) for i, v in sorted(self._stats.items())}

    def remove(self) -> None:
        """Remove every hook; the model then computes exactly what it computed before."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._state = None

    def __enter__(self) -> NoiseInjector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # ------------------------------------------------------------------------------------------------- the hook
    def _make_hook(self, layer: int):  # noqa: ANN202 - a closure over the layer index
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            state = self._state
            if state is None or not (module.training or state.force):
                return None
            if isinstance(output, torch.Tensor):
                return self._perturb(layer, output, state)
            if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
                return type(output)([self._perturb(layer, output[0], state), *output[1:]])
            raise TypeError(f"decoder block {layer} returned {type(output).__name__}; NoiseInjector handles a "
                            "hidden-state tensor or a tuple whose first item is one")

        return hook

    def _draw(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        if self.generator_kind == "global":
            return torch.randn(shape, device=device, dtype=torch.float32)
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
            gen.manual_seed(stream_seed(self._seed, self.rank))
        return torch.randn(shape, generator=gen, device=device, dtype=torch.float32)

    def _perturb(self, layer: int, hidden: torch.Tensor, state: _NoiseState) -> torch.Tensor:
        """hidden (B, T, d) -> hidden with noise on ``state.rows``."""
        if hidden.dim() != 3:
            raise TypeError(f"decoder block {layer} output has shape {tuple(hidden.shape)}; expected (B, T, d)")
        batch, seq = hidden.shape[:2]
        rows = _rows_for(state.rows, state.rows_len, batch, hidden.device)
        tmask = _mask_for(state.token_mask, "token_mask", (batch, seq), hidden.device)
        nmask = _mask_for(state.noise_mask, "noise_mask", (batch, seq), hidden.device)
        sub = hidden if rows is None else hidden.index_select(0, rows)
        if rows is not None:
            tmask = None if tmask is None else tmask.index_select(0, rows)
            nmask = None if nmask is None else nmask.index_select(0, rows)
        std = self._std(layer, sub, tmask)
        noise = self._draw(sub.shape, sub.device) * std
        if nmask is not None and not self.config.paper_v1:
            noise = noise * nmask.unsqueeze(-1)
        noise = noise.to(hidden.dtype)
        self._record(layer, sub, noise, tmask)
        return sub + noise if rows is None else hidden.index_add(0, rows, noise)

    def _std(self, layer: int, sub: torch.Tensor, tmask: torch.Tensor | None) -> torch.Tensor:
        cfg, scale = self.config, self.scales[layer]
        if cfg.paper_v1:  # training noise: noise_std applied twice, as the reference's hook does
            base = scale * scale * sub.detach().float().std().item()
            return _paper_v1_noise_std(sub, base, cfg.robust_beta, cfg.max_token_factor)
        return _token_noise_std(sub, tmask, scale, cfg.token_adaptive, cfg.robust_beta, cfg.max_token_factor)

    @torch.no_grad()
    def _record(self, layer: int, sub: torch.Tensor, noise: torch.Tensor, tmask: torch.Tensor | None) -> None:
        n2, h2 = noise.detach().float().pow(2).sum(-1), sub.detach().float().pow(2).sum(-1)
        ratio = _masked_mean(n2, tmask) / _masked_mean(h2, tmask).clamp_min(torch.finfo(torch.float32).tiny)
        self._stats[layer] = ratio.sqrt()
