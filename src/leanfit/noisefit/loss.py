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

from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import nn

from leanfit.core.errors import ConfigError, bad_value
from leanfit.noisefit.config import NoiseFiTConfig
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


def shifted_completion_mask(labels: torch.Tensor) -> torch.Tensor:
    """labels (B, T) with -100 on ignored tokens -> (B, T-1) bool: logits position t predicts a completion token."""
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

    p_logits, q_logits: (..., V); mask: (...) bool (None = every position). The sum over masked positions is
    divided by their number, or by ``num_items`` when given. No T^2 factor; gradients reach both arguments
    (detach ``p_logits`` for a fixed target). Computed in float32."""
    if mask is not None:
        p_logits, q_logits = p_logits[mask], q_logits[mask]
    kl = _kl_rows(p_logits.reshape(-1, p_logits.shape[-1]), q_logits.reshape(-1, q_logits.shape[-1]), temperature)
    denom = kl.numel() if num_items is None else num_items
    return kl.sum() / denom


def _check_labels(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    labels = batch.get("labels")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        raise ConfigError(bad_value("labels", type(labels).__name__, "a (B, T) tensor in batch['labels']"))
    mask = shifted_completion_mask(labels)
    if not bool(mask.any()):
        raise ConfigError(bad_value("labels", "all -100 after the next-token shift", "at least one completion "
                                    "token", "check the collator's prompt masking and truncation"))
    return labels, mask


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
    None, when ``alpha=1, lam=0``); num_items_in_batch: token count of the whole accumulated batch."""
    labels, mask = _check_labels(batch)
    if config.paper_v1:
        return _paper_v1_loss(model, batch, injector, config, labels)
    if config.alpha == 1.0 and config.lam == 0.0:
        logits = model(**_model_inputs(batch)).logits
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
    :func:`noisefit_loss`."""
    if not alpha >= 0:
        raise ConfigError(bad_value("alpha", alpha, "a KL weight >= 0", "R-Drop's papers use 0.3 to 5"))
    labels, mask = _check_labels(batch)
    n_rows = labels.shape[0]
    logits = model(**_model_inputs(batch, 2)).logits
    first = logits[:n_rows]
    z1, z2 = _branch_rows(logits, mask, 2)
    ce = 0.5 * (_ce_rows(z1, labels, mask, num_items_in_batch) + _ce_rows(z2, labels, mask, num_items_in_batch))
    denom = mask.sum() if num_items_in_batch is None else num_items_in_batch
    kl = 0.5 * (_kl_rows(z1, z2).sum() + _kl_rows(z2, z1).sum()) / denom
    return RDropLossOutput(ce + alpha * kl, ce, kl, first)
