"""NoiseFiT's loss: cross-entropy on the clean branch, KL from it to the noisy branches, noisy-noisy consistency.

``noisefit_loss`` (leanfit) runs the clean branch and ``n_noisy`` noisy branches as ONE batched forward (the batch
repeated ``n_noisy + 1`` times, noise only on the repeated rows), so a step costs one forward/backward of a
bigger batch instead of three. Every term uses the same mask, the completion tokens after the next-token shift
(``labels[:, 1:] != -100``), and is averaged over those tokens (or divided by ``num_items_in_batch`` as
``transformers.Trainer`` does under gradient accumulation):

    loss = alpha * CE(clean) + (1 - alpha) * T^2 * mean_i KL(sg(p_clean^T) || p_noisy_i^T) + lam * consistency

with ``sg`` = stop-gradient (the clean branch is a teacher, not pulled towards the noisy ones), temperature T on
both sides, and consistency = (KL(p1||p2) + KL(p2||p1)) / 2 between the two noisy branches (``kl="symmetric"``,
gradients through both) or KL(sg(p1) || p2) (``kl="forward"``), at T = 1. ``alpha=1, lam=0`` runs no noisy
branch and returns plain completion-only cross-entropy.

``paper_v1=True`` reproduces the reference v1 trainer (NoiseFiT_v1_manual_snr.py), defects included: three
separate forward passes; CE = the model's own ``outputs.loss`` on the labels as given; soft term
KL(softmax(z_clean / T) || softmax(z_noisy)) with T on the teacher only, no T^2, the teacher NOT detached,
averaged over the two noisy passes; consistency KL(p_noisy2 || p_noisy1) in one direction with gradients through
both; both terms masked with the UNSHIFTED ``labels != -100`` on next-token logits (off by one); and the
injector's v1 noise (``noise_std**2 * std(h)`` base, see ``injector.paper_v1_noise_std``).

``rdrop_loss`` is the R-Drop baseline (two dropout passes, symmetric KL). It is written here because no
maintained package provides R-Drop for Hugging Face causal LMs; it reuses the same packing and masks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import nn

from leanfit.core.errors import ConfigError, bad_value
from leanfit.noisefit.config import NoiseFiTConfig, brief, check_real
from leanfit.noisefit.injector import NoiseInjector

__all__ = [
    "NoiseFiTLossOutput",
    "RDropLossOutput",
    "masked_kl",
    "noisefit_loss",
    "rdrop_loss",
    "shifted_completion_mask",
    "statistics_mask",
]


class NoiseFiTLossOutput(NamedTuple):
    """Scalars ``loss`` (the total, to backpropagate), ``ce``, ``soft``, ``consistency`` (unweighted terms) and
    ``logits_clean`` (B, T, V), the clean branch's logits (with gradient)."""

    loss: torch.Tensor
    ce: torch.Tensor
    soft: torch.Tensor
    consistency: torch.Tensor
    logits_clean: torch.Tensor


class RDropLossOutput(NamedTuple):
    """R-Drop's ``loss`` = ``ce`` (mean of the two passes) + alpha * ``kl``; ``logits`` (B, T, V) of pass 1."""

    loss: torch.Tensor
    ce: torch.Tensor
    kl: torch.Tensor
    logits: torch.Tensor


def _check_labels_tensor(labels: Any) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(bad_value("labels", type(labels).__name__, "a (B, T) tensor of token ids (-100 = ignored)",
                                  "collate the batch into tensors"))
    if labels.dtype == torch.bool or labels.dtype.is_floating_point or labels.dtype.is_complex:
        raise TypeError(bad_value("labels", brief(labels), "an integer tensor (-100 = ignored)", "convert it with "
                                  ".long()"))
    if labels.dim() != 2:
        raise ConfigError(bad_value("labels", brief(labels), "a tensor of shape (B, T)", "add the batch dimension, "
                                    "e.g. labels[None] for one sequence"))


def shifted_completion_mask(labels: torch.Tensor) -> torch.Tensor:
    """labels (B, T) with -100 on ignored tokens -> (B, T-1) bool: logits position t predicts a completion token."""
    _check_labels_tensor(labels)
    return labels[:, 1:] != -100


def statistics_mask(labels: torch.Tensor) -> torch.Tensor:
    """labels (B, T) -> (B, T) bool: the positions whose hidden states predict a completion token (the last
    position never does). The injector's statistics use these, so padding and prompt are excluded."""
    return F.pad(shifted_completion_mask(labels), (0, 1), value=False)


def _kl_rows(p_logits: torch.Tensor, q_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-row KL(softmax(p/T) || softmax(q/T)) in float32: (N, V) x (N, V) -> (N,)."""
    log_p = torch.log_softmax(p_logits.float() / temperature, dim=-1)
    log_q = torch.log_softmax(q_logits.float() / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def masked_kl(p_logits: torch.Tensor, q_logits: torch.Tensor, mask: torch.Tensor | None = None,
              temperature: float = 1.0, num_items: float | torch.Tensor | None = None) -> torch.Tensor:
    """Token-averaged KL(softmax(p/T) || softmax(q/T)) over the positions where ``mask`` is True.

    p_logits, q_logits: (..., V) floating, V >= 1, finite at the selected positions; mask: (...) bool (None =
    every position). The sum over masked positions is divided by their number, or by ``num_items`` (> 0) when
    given; selecting no position is an error unless ``num_items`` is given (the KL is then 0). No T^2 factor
    (T > 0); gradients reach both arguments (detach ``p_logits`` for a fixed target). Computed in float32."""
    _check_logit_pair(p_logits, q_logits)
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(bad_value("mask", brief(mask), "a bool tensor or None", "build it with labels != -100 "
                                      "(an integer mask would index rows instead of selecting them)"))
        if tuple(mask.shape) != tuple(p_logits.shape[:-1]):
            raise ConfigError(bad_value("mask", brief(mask), f"the shape of the logits without V, "
                                        f"{tuple(p_logits.shape[:-1])}"))
    check_real("temperature", temperature, gt=0, fix="the default is 1.0")
    if num_items is not None:
        _check_count("num_items", num_items)
    if mask is not None:
        p_logits, q_logits = p_logits[mask], q_logits[mask]
    p_rows, q_rows = p_logits.reshape(-1, p_logits.shape[-1]), q_logits.reshape(-1, q_logits.shape[-1])
    if p_rows.shape[0] == 0 and num_items is None:
        raise ConfigError(bad_value("mask", "no position selected", "at least one position to average over",
                                    "pass num_items=... to get 0 for an empty selection"))
    for name, rows in (("p_logits", p_rows), ("q_logits", q_rows)):
        if not bool(torch.isfinite(rows.detach()).all()):
            raise ConfigError(bad_value(name, brief(rows), "finite logits at the selected positions",
                                        "mask out the positions whose logits are not finite"))
    kl = _kl_rows(p_rows, q_rows, temperature)
    denom = kl.numel() if num_items is None else num_items
    return kl.sum() / denom


def _check_logit_pair(p_logits: Any, q_logits: Any) -> None:
    for name, logits in (("p_logits", p_logits), ("q_logits", q_logits)):
        if not isinstance(logits, torch.Tensor):
            raise TypeError(bad_value(name, type(logits).__name__, "a tensor of logits (..., V)"))
        if not logits.dtype.is_floating_point:
            raise TypeError(bad_value(name, brief(logits), "a floating-point tensor", "convert it with .float()"))
    if p_logits.dim() == 0 or p_logits.shape[-1] == 0:
        raise ConfigError(bad_value("p_logits", brief(p_logits), "logits (..., V) with V >= 1"))
    if q_logits.shape != p_logits.shape:
        raise ConfigError(bad_value("q_logits", brief(q_logits), f"the shape of p_logits {tuple(p_logits.shape)}"))


def _check_count(name: str, value: Any) -> None:
    """A token count to divide by: a number or a one-element tensor, finite and > 0."""
    fix = "pass the number of completion tokens, or None to average over the selected ones"
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype == torch.bool:
            raise ConfigError(bad_value(name, brief(value), "a number or a one-element tensor", fix))
        check_real(name, float(value), gt=0, shown=value, fix=fix)
    else:
        check_real(name, value, gt=0, fix=fix)


def _check_labels(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The labels (B, T) of a batch and their shifted completion mask; checks the batch's shapes."""
    if not isinstance(batch, Mapping):
        raise TypeError(bad_value("batch", type(batch).__name__, "a dict with input_ids, attention_mask and labels",
                                  "pass the collated batch"))
    labels = batch.get("labels")
    if labels is None:
        raise ConfigError(bad_value("labels", "NoneType", "a (B, T) tensor in batch['labels']", "the collator must "
                                    "add labels (-100 = ignored)"))
    _check_labels_tensor(labels)
    if labels.dtype != torch.long:
        raise TypeError(bad_value("labels", brief(labels), "an integer tensor of dtype int64 (-100 = ignored)",
                                  "convert it with .long()"))
    if labels.numel() == 0:
        raise ConfigError(bad_value("labels", f"an empty batch of shape {tuple(labels.shape)}", "B >= 1 rows of "
                                    "T >= 2 tokens", "skip empty batches"))
    shape = tuple(labels.shape)
    ids, embeds, attention = batch.get("input_ids"), batch.get("inputs_embeds"), batch.get("attention_mask")
    for key, value in (("input_ids", ids), ("inputs_embeds", embeds)):
        if isinstance(value, torch.Tensor) and tuple(value.shape[:2]) != shape:
            raise ConfigError(bad_value("labels", brief(labels), f"the (B, T) shape of {key} "
                                        f"{tuple(value.shape[:2])}", "collate labels with the inputs (unshifted)"))
    if isinstance(attention, torch.Tensor) and tuple(attention.shape) != shape:
        raise ConfigError(bad_value("attention_mask", brief(attention), f"the shape of labels {shape}",
                                    "collate the attention mask with the inputs"))
    mask = shifted_completion_mask(labels)
    if not bool(mask.any()):
        raise ConfigError(bad_value("labels", "all -100 after the next-token shift", "at least one completion "
                                    "token", "check the collator's prompt masking and truncation"))
    return labels, mask


def _check_logits(logits: Any, labels: torch.Tensor, copies: int) -> None:
    """The model's logits: (copies * B, T, V) for labels (B, T)."""
    expected = (copies * labels.shape[0], labels.shape[1])
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or tuple(logits.shape[:2]) != expected:
        raise ConfigError(bad_value("logits", brief(logits), f"(B, T, V) logits with (B, T)={expected} from the "
                                    f"model, to match labels of shape {tuple(labels.shape)}", "the model must "
                                    "return one logit vector per input position (unshifted, untruncated)"))


def _model_inputs(batch: dict[str, Any], repeat: int = 1) -> dict[str, Any]:
    """The forward kwargs (every key but ``labels``), batch-dim tensors repeated ``repeat`` times along dim 0."""
    n = batch["labels"].shape[0]
    out = {}
    for key, value in batch.items():
        if key == "labels":
            continue
        if repeat > 1 and isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n:
            value = torch.cat([value] * repeat, dim=0)
        out[key] = value
    return out


def _ce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, num_items: Any) -> torch.Tensor:
    """Completion-only next-token cross-entropy: logits (B, T, V), labels (B, T), mask (B, T-1)."""
    total = F.cross_entropy(logits[:, :-1][mask].float(), labels[:, 1:][mask], reduction="sum")
    return total / (mask.sum() if num_items is None else num_items)


def _branch_rows(logits: torch.Tensor, mask: torch.Tensor, n_branches: int) -> list[torch.Tensor]:
    """The completion positions of each of ``n_branches`` stacked copies of the batch: logits (n B, T, V), mask
    (B, T-1) -> n tensors (N, V). One boolean selection for all branches (per-branch selections would each
    build a full-size gradient buffer in backward)."""
    flat = logits[:, :-1][mask.repeat(n_branches, 1)]
    return list(flat.split(flat.shape[0] // n_branches))


def _ce_rows(rows: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, num_items: Any) -> torch.Tensor:
    """:func:`_ce` from already selected completion rows (N, V)."""
    total = F.cross_entropy(rows.float(), labels[:, 1:][mask], reduction="sum")
    return total / (mask.sum() if num_items is None else num_items)


def noisefit_loss(model: nn.Module, batch: dict[str, Any], injector: NoiseInjector | None, config: NoiseFiTConfig,
                  num_items_in_batch: int | torch.Tensor | None = None) -> NoiseFiTLossOutput:
    """NoiseFiT's loss for one batch (see the module docstring).

    model: the model as given by ``Trainer.compute_loss`` (PEFT- or accelerate-wrapped is fine); batch: dict
    with ``input_ids`` (B, T), ``attention_mask`` (B, T) and ``labels`` (B, T) in Hugging Face's convention
    (unshifted, -100 = ignored), other keys passed to the model; injector: hooks on the model (unused, may be
    None, when ``alpha=1, lam=0``); num_items_in_batch: token count of the whole accumulated batch (> 0)."""
    if not isinstance(config, NoiseFiTConfig):
        raise TypeError(bad_value("config", type(config).__name__, "a NoiseFiTConfig",
                                  "build one with NoiseFiTConfig(...)"))
    labels, mask = _check_labels(batch)
    if num_items_in_batch is not None:
        _check_count("num_items_in_batch", num_items_in_batch)
    if config.paper_v1:
        return _paper_v1_loss(model, batch, injector, config, labels)
    if config.alpha == 1.0 and config.lam == 0.0:
        logits = model(**_model_inputs(batch)).logits
        _check_logits(logits, labels, 1)
        ce = _ce(logits, labels, mask, num_items_in_batch)
        zero = ce.new_zeros(())
        return NoiseFiTLossOutput(ce, ce, zero, zero, logits)
    injector = _check_injector(injector, config)
    n_rows, k = labels.shape[0], config.n_noisy
    rows = torch.arange(n_rows, (k + 1) * n_rows)
    token_mask = statistics_mask(labels).repeat(k + 1, 1)
    attention = batch.get("attention_mask")
    noise_mask = None if attention is None else attention.bool().repeat(k + 1, 1)
    with injector.noisy(rows=rows, token_mask=token_mask, noise_mask=noise_mask):
        logits = model(**_model_inputs(batch, k + 1)).logits
    _check_logits(logits, labels, k + 1)
    clean, *noisy = _branch_rows(logits, mask, k + 1)  # (N, V) each
    ce = _ce_rows(clean, labels, mask, num_items_in_batch)
    denom = mask.sum() if num_items_in_batch is None else num_items_in_batch
    t = float(config.temperature)
    teacher = clean.detach()
    # a tensor: config checks n_noisy in (1, 2), so the sum has at least one term
    soft = cast(torch.Tensor, sum(_kl_rows(teacher, z, t).sum() for z in noisy) * (t * t) / (len(noisy) * denom))
    consistency = ce.new_zeros(())
    if k == 2:
        if config.kl == "symmetric":
            consistency = 0.5 * (_kl_rows(noisy[0], noisy[1]).sum() + _kl_rows(noisy[1], noisy[0]).sum()) / denom
        else:
            consistency = _kl_rows(noisy[0].detach(), noisy[1]).sum() / denom
    loss = config.alpha * ce + (1.0 - config.alpha) * soft + config.lam * consistency
    return NoiseFiTLossOutput(loss, ce, soft, consistency, logits[:n_rows])


def _check_injector(injector: NoiseInjector | None, config: NoiseFiTConfig) -> NoiseInjector:
    if not isinstance(injector, NoiseInjector):
        raise ConfigError(bad_value("injector", type(injector).__name__, "a NoiseInjector on the model when "
                                    f"alpha={config.alpha} < 1 or lam={config.lam} > 0",
                                    "build one with NoiseInjector(model, config, layers=...)"))
    return injector


def _paper_v1_loss(model: nn.Module, batch: dict[str, Any], injector: NoiseInjector | None, config: NoiseFiTConfig,
                   labels: torch.Tensor) -> NoiseFiTLossOutput:
    """The reference v1 loss, defects included: three forwards, undetached teacher, T on the teacher only and no
    T^2, one-direction consistency, unshifted label mask on next-token logits."""
    injector = _check_injector(injector, config)
    outputs = model(**batch)  # the model's own loss on the labels as given
    logits, inputs = outputs.logits, _model_inputs(batch)
    _check_logits(logits, labels, 1)
    with injector.noisy():
        noisy1 = model(**inputs).logits
        noisy2 = model(**inputs).logits
    target_mask = (labels != -100).float()  # unshifted: position t's logits predict token t + 1
    teacher = torch.softmax(logits.float() / config.temperature, dim=-1)

    def kl_to(target: torch.Tensor, student: torch.Tensor) -> torch.Tensor:  # per token, (B, T)
        return F.kl_div(torch.log_softmax(student.float(), dim=-1), target, reduction="none").sum(-1)

    def masked_mean(per_token: torch.Tensor) -> torch.Tensor:
        return (per_token * target_mask).sum() / target_mask.sum()

    soft = masked_mean(0.5 * (kl_to(teacher, noisy1) + kl_to(teacher, noisy2)))
    consistency = masked_mean(kl_to(torch.softmax(noisy2.float(), dim=-1), noisy1))
    loss = config.alpha * outputs.loss + (1.0 - config.alpha) * soft + config.lam * consistency
    return NoiseFiTLossOutput(loss, outputs.loss, soft, consistency, logits)


def rdrop_loss(model: nn.Module, batch: dict[str, Any], alpha: float,
               num_items_in_batch: int | torch.Tensor | None = None) -> RDropLossOutput:
    """R-Drop (Liang et al., 2021) for a causal LM: the batch twice in one forward (dropout differs per row),
    ``loss = (CE_1 + CE_2) / 2 + alpha * (KL(p1||p2) + KL(p2||p1)) / 2`` on the shifted completion tokens.

    No maintained package provides R-Drop for Hugging Face causal LMs, hence this function. Needs the model in
    training mode with dropout > 0 to regularise anything (otherwise the KL is 0). batch: as in
    :func:`noisefit_loss`; alpha: the KL weight (finite, >= 0)."""
    check_real("alpha", alpha, ge=0, fix="R-Drop's papers use 0.3 to 5")
    labels, mask = _check_labels(batch)
    if num_items_in_batch is not None:
        _check_count("num_items_in_batch", num_items_in_batch)
    n_rows = labels.shape[0]
    logits = model(**_model_inputs(batch, 2)).logits
    _check_logits(logits, labels, 2)
    first = logits[:n_rows]
    z1, z2 = _branch_rows(logits, mask, 2)
    ce = 0.5 * (_ce_rows(z1, labels, mask, num_items_in_batch) + _ce_rows(z2, labels, mask, num_items_in_batch))
    denom = mask.sum() if num_items_in_batch is None else num_items_in_batch
    kl = 0.5 * (_kl_rows(z1, z2).sum() + _kl_rows(z2, z1).sum()) / denom
    return RDropLossOutput(ce + alpha * kl, ce, kl, first)
