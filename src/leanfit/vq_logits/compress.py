"""Compress the output layer of a trained causal LM into a VQ head by distillation on unlabelled text.

:func:`compress_lm_head` replaces ``model``'s head in place (tied or untied embeddings; the result is a
``VQLogits<Class>`` of :mod:`leanfit.vq_logits.hf`, so it saves with ``save_pretrained`` and loads with
``leanfit.vq_logits.from_pretrained`` or the Auto classes). The recipe:

1. **Data.** The user's texts (up to ``max_text_tokens``) plus ``sample_tokens`` tokens sampled from the model
   itself at temperature 1, continuing short prompts cut from the texts: KL fitted on one domain barely
   transfers to another, and the teacher's own samples cover what it predicts elsewhere. The trunk runs once,
   frozen; only the head trains, on the stored final hidden states.
2. **Frequency-aware codes.** Tokens are ranked by a smoothed frequency ``f``: their count in the texts plus
   ``prior_weight`` times the teacher's mean predicted probability (so unseen tokens the model expects still
   rank). The ``singleton_fraction * K`` most frequent get a code of their own (their logit stays exact).
   The default share 0.5 was chosen on validation text (SmolLM2-135M-Instruct, V=49,152, distilled on
   Shakespeare; perplexity ratio to the original head before distillation, Shakespeare / BBC news): K=768:
   share 0.25 -> 2.81 / 42.8, 0.5 -> 2.85 / 40.2, 0.75 -> 2.98 / 52.4; K=9216: 0.5 -> 1.38 / 4.20,
   0.75 -> 1.36 / 4.68. More singletons leave the clustered tail too few codes out of domain.
3. **Sigma-weighted clustering of the rest.** A code ``c`` standing in for token ``v`` makes the logit error
   ``(w_v - c) . h``, mean square ``(w_v - c)^T Sigma (w_v - c)`` with ``Sigma = E[h h^T]``: weighted k-means of
   the rows of ``W Sigma^{1/2}`` (weights ``f``: the expected KL of a logit error grows with the token's
   probability), see :func:`leanfit.vq_logits.sigma.sigma_kmeans`.
4. **Start.** ``b_v = (w_v - c_{M(v)}) . mean(h)`` (+ the layer's bias): each token's logit is exact at the mean
   state. With ``residual_rank`` r, ``U, P`` start from the Sigma-weighted rank-r SVD of ``W - C[M]`` on the
   centred states (``b`` then subtracts ``u_v . P mean(h)``, so the mean is not counted twice).
5. **Distillation.** Adam on ``KL(teacher || student)`` over minibatches of hidden states, ``chunk_tokens`` at a
   time (the teacher's logits exist for one chunk only; the student's side is the collapsed O(K) form without a
   residual term, its per-chunk log-probs with one). The map stays as clustered by default; with
   ``mapping="learned"`` the clustered tokens move every ``reassign_every`` steps to the code of least expected
   logit error under Sigma (:func:`leanfit.vq_logits.sigma.reassign_mapping`, :meth:`VQLogitsHead.reassign`).
   On SmolLM2-135M-Instruct (Shakespeare, ``leanfit run vq-logits-pretrained``) moving tokens raised the
   validation perplexity ratio at every setting measured: with these defaults' 150 steps and a move every 50
   (on fewer text and sampled tokens than the defaults), 2.048 -> 2.074 and 2.054 -> 2.114 at 98% reduction, 1.387 -> 1.457 and 1.381 -> 1.401 at 90% (seeds 0 and 1);
   with 30 steps and a move every 10, at all five levels from 50% to 98%. Hence ``fixed`` is the default.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

from leanfit.core.errors import bad_value
from leanfit.vq_logits import functional as VF
from leanfit.vq_logits.functional import _check_int, _shown
from leanfit.vq_logits.head import VQLogitsHead
from leanfit.vq_logits.hf import check_logit_transform, replace_lm_head
from leanfit.vq_logits.sigma import hidden_moments, reassign_mapping, sigma_kmeans, sigma_roots

__all__ = ["CompressConfig", "Statistics", "Teacher", "collect_hidden", "compress_lm_head", "compressed_head",
           "distil_head", "output_layer", "statistics", "teacher_kl", "text_hidden", "token_stream"]


@dataclass
class CompressConfig:
    """Settings of :func:`compress_lm_head` (every one has a default but ``num_codes``)."""

    num_codes: int = field(metadata={"help": "K: codes of the head, singletons included"})
    residual_rank: int = field(default=0, metadata={"help": "rank r of the within-cluster term (0: off)"})
    mapping: Literal["fixed", "learned"] = field(default="fixed", metadata={
        "help": "'fixed': the clustered map stays; 'learned': clustered tokens move between codes during "
                "distillation (lower validation ratio for 'fixed' on SmolLM2-135M, see the module docstring)"})
    singleton_fraction: float = field(default=0.5, metadata={
        "help": "share of the K codes given to the most frequent tokens alone, in [0, 1)"})
    prior_weight: float = field(default=0.1, metadata={
        "help": "weight of the teacher's mean probability added to the normalised text counts"})
    max_text_tokens: int = field(default=24576, metadata={"help": "tokens of the texts used at most"})
    sample_tokens: int = field(default=8192, metadata={"help": "tokens sampled from the teacher (0: none)"})
    prompt_tokens: int = field(default=8, metadata={"help": "length of the prompts cut from the texts"})
    sample_length: int = field(default=64, metadata={"help": "new tokens per sampled continuation"})
    sample_batch: int = field(default=128, metadata={"help": "continuations sampled at once (larger: fewer passes over the weights)"})
    seq_len: int = field(default=256, metadata={"help": "window of the texts fed to the trunk"})
    trunk_batch: int = field(default=8, metadata={"help": "windows per trunk forward pass"})
    steps: int = field(default=150, metadata={"help": "distillation steps (0: the initialisation only)"})
    batch_tokens: int = field(default=1024, metadata={"help": "hidden states per distillation step"})
    chunk_tokens: int = field(default=256, metadata={"help": "hidden states whose teacher logits exist at once"})
    lr: float = field(default=2e-3, metadata={"help": "Adam learning rate (cosine decay to 0)"})
    reassign_every: int = field(default=50, metadata={"help": "steps between reassignments ('learned')"})
    kmeans_iters: int = field(default=10, metadata={"help": "Lloyd iterations of the Sigma-weighted k-means"})
    ridge: float = field(default=1e-3, metadata={"help": "ridge of Sigma^{-1/2}, relative to tr(Sigma)/d"})
    seed: int = field(default=0, metadata={"help": "seed of sampling, k-means start and minibatches"})
    show_progress: bool = field(default=True, metadata={"help": "progress lines (leanfit.core.progress)"})

    def __post_init__(self) -> None:
        for name, low in (("num_codes", 1), ("residual_rank", 0), ("max_text_tokens", 2), ("sample_tokens", 0),
                          ("prompt_tokens", 1), ("sample_length", 1), ("sample_batch", 1), ("seq_len", 2),
                          ("trunk_batch", 1), ("steps", 0), ("batch_tokens", 1), ("chunk_tokens", 1),
                          ("reassign_every", 1), ("kmeans_iters", 0)):
            _check_int(name, getattr(self, name), low, f"an integer >= {low} ({_HELP[name]})")
        _check_int("seed", self.seed, -(2**63), "an integer")
        if self.mapping not in ("learned", "fixed"):
            raise ValueError(bad_value("mapping", _shown(self.mapping), "'learned' or 'fixed'"))
        _check_real("singleton_fraction", self.singleton_fraction, 0.0, 1.0, "a share in [0, 1)", upper_open=True)
        _check_real("prior_weight", self.prior_weight, 0.0, math.inf, "a finite number >= 0")
        _check_real("lr", self.lr, 0.0, math.inf, "a finite number > 0", lower_open=True)
        _check_real("ridge", self.ridge, 0.0, math.inf, "a finite number >= 0")
        if not isinstance(self.show_progress, bool):
            raise TypeError(bad_value("show_progress", _shown(self.show_progress), "True or False"))


_HELP = {f.name: f.metadata["help"] for f in fields(CompressConfig)}


def _check_real(name: str, value: Any, low: float, high: float, expected: str, *, lower_open: bool = False,
                upper_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(bad_value(name, _shown(value), expected, "pass a Python float"))
    v = float(value)
    ok = math.isfinite(v) and (v > low if lower_open else v >= low) and (v < high if upper_open else v <= high)
    if not ok:
        raise ValueError(bad_value(name, value, expected))


# --- the teacher ------------------------------------------------------------------------------------------------

class Teacher(NamedTuple):
    """The original output layer: weight (V, d), bias (V,) or None."""

    weight: torch.Tensor
    bias: torch.Tensor | None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(n, V) float32 or float64 logits of hidden (n, d)."""
        out = hidden.to(self.weight.dtype) @ self.weight.t()
        out = out if self.bias is None else out + self.bias
        return out if out.dtype in (torch.float32, torch.float64) else out.float()


def output_layer(model: Any) -> Teacher:
    """The model's output layer as the distillation teacher (its weight (V, d) and bias, detached); refuses a model
    whose output layer is not an ``nn.Linear``."""
    linear = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(linear, nn.Linear):
        raise TypeError(bad_value("model", _shown(model), "a transformers *ForCausalLM whose output layer "
                                  "(get_output_embeddings()) is an nn.Linear",
                                  "a model whose head is already a VQ head cannot be compressed again"))
    bias = None if linear.bias is None else linear.bias.detach().clone()
    return Teacher(linear.weight.detach().clone(), bias)


def _student_cross_entropy(head: VQLogitsHead, hidden: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``-sum_v p_v log q_v`` per row (n,) for teacher probabilities p (n, V). Without a residual term it is
    ``logsumexp_k(z_k + B_k) - sum_k P_k z_k - p . b`` with ``P_k`` the teacher's mass on cluster k: O(n K) on the
    student's side; with one, the head's per-chunk log-probs (O(n V r))."""
    if head.residual_rank:
        return -(p * head.logits(hidden).to(p.dtype)).sum(-1)
    z = VF.code_logits(hidden, head.codebook).to(p.dtype)
    log_norm = VF._log_normalizers(head.mapping, head.num_codes, head.bias, dtype=p.dtype)
    mass = torch.zeros(p.shape[0], head.num_codes, dtype=p.dtype, device=p.device).index_add(1, head.mapping, p)
    out = VF._logsumexp(z, log_norm) - (mass * z).sum(-1)
    return out if head.bias is None else out - p @ head.bias.to(p.dtype)


def chunk_kl(head: VQLogitsHead, hidden: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(teacher_logits) || head)`` per row: hidden (n, d), teacher_logits (n, V) -> (n,),
    differentiable in the head's parameters."""
    log_p = torch.log_softmax(teacher_logits, dim=-1)
    p = log_p.exp()
    return (p * log_p).sum(-1) + _student_cross_entropy(head, hidden, p)


@torch.no_grad()
def teacher_kl(head: VQLogitsHead, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               *, chunk_tokens: int = 1024) -> float:
    """Mean ``KL(teacher || head)`` in nats over hidden (N, d), teacher = ``hidden @ weight.T + bias`` (V, d);
    ``chunk_tokens`` rows at a time."""
    flat = head._flat(hidden)
    chunk_tokens = _check_int("chunk_tokens", chunk_tokens, 1)
    teacher = Teacher(weight.detach(), None if bias is None else bias.detach())
    total = sum(float(chunk_kl(head, h, teacher.logits(h)).double().sum()) for h in flat.split(chunk_tokens))
    return total / max(flat.shape[0], 1)


# --- the data ----------------------------------------------------------------------------------------------------

def _check_texts(texts: Any) -> list[str]:
    expected = "a non-empty list of strings (unlabelled text of the domain the model will serve)"
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(bad_value("texts", _shown(texts), expected, "wrap one text in a list: [text]"))
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(bad_value("texts", _shown(texts), expected, f"item {bad[0]} is "
                                  f"{type(texts[bad[0]]).__name__}"))
    if not any(t.strip() for t in texts):
        raise ValueError(bad_value("texts", _shown(texts), expected, "pass at least one non-blank text"))
    return list(texts)


def token_stream(tokenizer: Any, texts: list[str], max_tokens: int) -> torch.Tensor:
    """Token ids of the texts one after the other (the tokenizer's EOS between them), at most ``max_tokens``."""
    if not callable(tokenizer):
        raise TypeError(bad_value("tokenizer", _shown(tokenizer), "a transformers tokenizer (callable on a string)",
                                  "pass AutoTokenizer.from_pretrained(<the model's folder>)"))
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for text in texts:
        # long texts are cut before tokenising (4 characters per token is generous for BPE tokenizers)
        ids.extend(tokenizer(text[: 8 * (max_tokens - len(ids)) + 64], add_special_tokens=False)["input_ids"])
        if isinstance(eos, int):
            ids.append(eos)
        if len(ids) >= max_tokens:
            break
    if len(ids) < 2:
        raise ValueError(bad_value("texts", _Count(len(ids)), "text of at least 2 tokens"))
    return torch.tensor(ids[:max_tokens], dtype=torch.long)


class _Count(int):
    def __repr__(self) -> str:
        return f"<{int(self)} tokens>"


def _trunk(model: Any) -> Any:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if not isinstance(decoder, nn.Module):
        raise TypeError(bad_value("model", _shown(model), "a transformers *ForCausalLM with get_decoder()"))
    return decoder


def text_hidden(model: Any, stream: torch.Tensor, cfg: CompressConfig, bar: Any) -> torch.Tensor:
    """Final hidden states (n, d) of every position of the stream, in windows of ``seq_len``."""
    device = next(model.parameters()).device
    cut = stream.numel() // cfg.seq_len * cfg.seq_len
    windows = list(stream[:cut].view(-1, cfg.seq_len).split(cfg.trunk_batch))
    if cut < stream.numel():
        windows.append(stream[cut:].unsqueeze(0))
    out = []
    for ids in windows:
        out.append(_trunk(model)(input_ids=ids.to(device)).last_hidden_state.reshape(-1, _width(model)))
        bar.advance(ids.numel())
    return torch.cat(out)


def _width(model: Any) -> int:
    return int(model.get_output_embeddings().weight.shape[1])


def _sampled_hidden(model: Any, teacher: Teacher, stream: torch.Tensor, cfg: CompressConfig,
                    g: torch.Generator, bar: Any) -> torch.Tensor:
    """Hidden states of continuations the model samples itself (temperature 1, no truncation) from prompts of
    ``prompt_tokens`` cut at random places of the stream: (m, d). The states come from the decoding pass
    (prompt prefill + each fed token), so the trunk runs once over the samples too."""
    from transformers import DynamicCache

    device, trunk, out, done = teacher.weight.device, _trunk(model), [], 0
    p = min(cfg.prompt_tokens, stream.numel())
    # transformers >= 5 names the cache argument `cache`; 4.x knows only `past_key_values`
    name = "cache" if "cache" in inspect.signature(trunk.forward).parameters else "past_key_values"
    while done < cfg.sample_tokens:
        b = min(cfg.sample_batch, math.ceil((cfg.sample_tokens - done) / cfg.sample_length))
        starts = torch.randint(0, stream.numel() - p + 1, (b,), generator=g)
        ids = torch.stack([stream[s:s + p] for s in starts.tolist()]).to(device)
        cache = DynamicCache()  # filled in place by each call
        states = trunk(input_ids=ids, use_cache=True, **{name: cache}).last_hidden_state
        rows = [states.reshape(-1, teacher.weight.shape[1])]
        for _ in range(cfg.sample_length - 1):
            probs = torch.softmax(teacher.logits(states[:, -1]), dim=-1)
            nxt = torch.multinomial(probs.cpu().float(), 1, generator=g).to(device)
            states = trunk(input_ids=nxt, use_cache=True, **{name: cache}).last_hidden_state
            rows.append(states[:, -1])
        out.append(torch.cat(rows))
        done += b * cfg.sample_length
        bar.advance(b * cfg.sample_length)
    return torch.cat(out) if out else torch.zeros(0, teacher.weight.shape[1], device=device)


# --- the start ---------------------------------------------------------------------------------------------------

class Statistics(NamedTuple):
    """What the start and the reassignments need of the hidden states and the texts."""

    mean: torch.Tensor  # (d,) float64
    second: torch.Tensor  # (d, d) float64, E[h h^T]
    frequency: torch.Tensor  # (V,) float64, smoothed token frequency, positive, sums to 1


@torch.no_grad()
def statistics(hidden: torch.Tensor, teacher: Teacher, counts: torch.Tensor, prior_weight: float, *,
               prior_rows: int = 4096, seed: int = 0) -> Statistics:
    """Moments of hidden (N, d) and ``f = counts / sum(counts) + prior_weight * mean teacher probability``
    (normalised), the mean over ``prior_rows`` states drawn with ``seed``; a floor of 1e-12 keeps every f > 0."""
    mean, second = hidden_moments(hidden)
    rows = torch.randperm(hidden.shape[0], generator=torch.Generator().manual_seed(seed))[:prior_rows]
    prior = torch.zeros(teacher.weight.shape[0], dtype=torch.float64, device=hidden.device)
    for block in hidden[rows.to(hidden.device)].split(1024):
        prior += torch.softmax(teacher.logits(block), dim=-1).double().sum(0)
    c = counts.double().to(hidden.device)
    f = c / c.sum().clamp_min(1) + prior_weight * prior / max(rows.numel(), 1)
    f = f.clamp_min(1e-12)
    return Statistics(mean, second, f / f.sum())


def singleton_count(num_codes: int, vocab_size: int, fraction: float) -> int:
    """How many tokens get a code of their own: ``round(fraction * K)``, leaving at least one code for the
    clustered tokens when there are any (K < V); every token when K = V."""
    return num_codes if num_codes >= vocab_size else min(int(round(fraction * num_codes)), num_codes - 1)


@torch.no_grad()
def compressed_head(teacher: Teacher, stats: Statistics, cfg: CompressConfig) -> tuple[VQLogitsHead, torch.Tensor]:
    """The head before distillation and the mask (V,) of its clustered tokens (the others have their own code)."""
    weight = teacher.weight
    vocab_size, d = weight.shape
    k = cfg.num_codes
    s = singleton_count(k, vocab_size, cfg.singleton_fraction)
    order = torch.argsort(stats.frequency.cpu(), descending=True, stable=True).to(weight.device)
    single, rest = order[:s], order[s:]
    mapping = torch.empty(vocab_size, dtype=torch.long, device=weight.device)
    mapping[single] = torch.arange(s, device=weight.device)
    codebook = torch.empty(k, d, dtype=weight.dtype, device=weight.device)
    codebook[:s] = weight[single]
    if k > s:
        labels, centers = sigma_kmeans(weight[rest], stats.second, k - s, weights=stats.frequency[rest],
                                       ridge=cfg.ridge, iters=cfg.kmeans_iters, seed=cfg.seed)
        mapping[rest], codebook[s:] = labels + s, centers
    head = VQLogitsHead(d, mapping, k, token_bias=True, residual_rank=cfg.residual_rank, device=weight.device,
                        dtype=weight.dtype)
    head.codebook.copy_(codebook)
    residual = weight.double() - codebook.double()[mapping]  # (V, d): what each token's code misses
    bias = residual @ stats.mean
    if cfg.residual_rank:
        bias -= _init_residual(head, residual, stats, cfg.ridge)
    if teacher.bias is not None:
        bias += teacher.bias.double()
    assert head.bias is not None
    head.bias.copy_(bias.to(head.bias.dtype))
    clustered = torch.zeros(vocab_size, dtype=torch.bool, device=weight.device)
    clustered[rest] = True
    return head, clustered


def _init_residual(head: VQLogitsHead, residual: torch.Tensor, stats: Statistics, ridge: float) -> torch.Tensor:
    """``U, P`` from the best rank-r fit of ``residual . (h - mean)`` in mean square: the top eigenvectors of
    ``A^T A`` with ``A = residual Cov^{1/2}`` (exact, deterministic); returns ``U P mean`` (V,) for the bias."""
    cov = stats.second - torch.outer(stats.mean, stats.mean)
    root, inv_root = sigma_roots(cov, ridge)
    a = residual @ root
    _, vecs = torch.linalg.eigh(a.t() @ a)
    top = vecs[:, -head.residual_rank:].flip(1)  # (d, r), largest first
    emb, proj = a @ top, top.t() @ inv_root
    p, u = head._residual()
    p.copy_(proj.to(p.dtype))
    u.copy_(emb.to(u.dtype))
    return emb @ (proj @ stats.mean)


# --- distillation ------------------------------------------------------------------------------------------------

def distil_head(head: VQLogitsHead, hidden: torch.Tensor, teacher: Teacher, stats: Statistics,
                cfg: CompressConfig, clustered: torch.Tensor | None = None) -> list[float]:
    """Fit ``head`` to the teacher's distribution on hidden (N, d) in place; returns the mean KL of each step.

    ``cfg.steps`` Adam steps (cosine decay) on minibatches of ``batch_tokens`` rows, drawn epoch by epoch with
    ``cfg.seed``; gradients are accumulated over chunks of ``chunk_tokens`` rows, so the teacher's logits exist
    for one chunk only. With ``cfg.mapping == "learned"`` the ``clustered`` tokens (V,) move every
    ``reassign_every`` steps among the clustered codes (those holding a clustered token at the start)."""
    from leanfit.core.progress import progress_bar

    g = torch.Generator().manual_seed(cfg.seed)
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / max(cfg.steps, 1))))
    learned = cfg.mapping == "learned" and clustered is not None and bool(clustered.any())
    targets = _codes_of(head, clustered) if learned and clustered is not None else None
    order, at, losses = torch.randperm(hidden.shape[0], generator=g), 0, []
    with progress_bar(cfg.steps, "vq_logits: distilling the head", enabled=cfg.show_progress) as bar:
        for step in range(cfg.steps):
            if at >= order.numel():
                order, at = torch.randperm(hidden.shape[0], generator=g), 0
            rows = order[at:at + cfg.batch_tokens].to(hidden.device)
            at += cfg.batch_tokens
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for chunk in rows.split(cfg.chunk_tokens):
                h = hidden[chunk]
                with torch.no_grad():
                    t = teacher.logits(h)
                loss = chunk_kl(head, h.to(head.codebook.dtype), t).sum() / rows.numel()
                loss.backward()
                total += float(loss.detach())
            opt.step()
            sched.step()
            losses.append(total)
            moved = 0
            if learned and (step + 1) % cfg.reassign_every == 0 and step + 1 < cfg.steps:
                moved = reassign(head, teacher.weight, stats, clustered, targets)
            bar.advance(1, kl=total, **({"moved": moved} if moved else {}))
    return losses


def _codes_of(head: VQLogitsHead, tokens: torch.Tensor | None) -> torch.Tensor:
    """(K,) bool: the codes holding at least one of ``tokens`` (V,) bool."""
    out = torch.zeros(head.num_codes, dtype=torch.bool, device=head.mapping.device)
    if tokens is not None:
        out[head.mapping[tokens]] = True
    return out


@torch.no_grad()
def reassign(head: VQLogitsHead, weight: torch.Tensor, stats: Statistics, movable: torch.Tensor | None,
             targets: torch.Tensor | None) -> int:
    """One reassignment of the learned map: the movable tokens to their code of least expected logit error
    under Sigma (original rows ``weight``), the moved tokens' logits kept at the mean state; returns the count."""
    new = reassign_mapping(weight, head.codebook.detach(), stats.second, head.mapping, movable=movable,
                           targets=targets)
    return head.reassign(new, anchor=stats.mean.to(head.codebook.dtype))


# --- the entry point ---------------------------------------------------------------------------------------------

def _config(num_codes: Any, options: dict[str, Any]) -> CompressConfig:
    names = {f.name for f in fields(CompressConfig)} - {"num_codes"}
    unknown = sorted(set(options) - names)
    if unknown:
        raise TypeError(bad_value(unknown[0], _shown(options[unknown[0]]), "no such option of compress_lm_head",
                                  f"the options are {', '.join(sorted(names))}"))
    return CompressConfig(num_codes=num_codes, **options)


def compress_lm_head(model: Any, tokenizer: Any, texts: Sequence[str], num_codes: int, **options: Any) -> Any:
    """Replace ``model``'s output layer by a ``num_codes``-code VQ head distilled from it on ``texts``; in place,
    returns the model (a ``VQLogits<Class>``, see :mod:`leanfit.vq_logits.hf`).

    model: a transformers ``*ForCausalLM`` (tied or untied embeddings, any dtype or device; its trunk is frozen
    and left unchanged); tokenizer: its tokenizer; texts: unlabelled text of the domain to serve. ``options``
    are the fields of :class:`CompressConfig` (``residual_rank``, ``mapping``, ``steps``, ``seed``, ...). The
    recipe is in this module's docstring. Does not change torch's global random state."""
    cfg = _config(num_codes, options)
    if cfg.mapping == "learned" and 0 < cfg.steps <= cfg.reassign_every:
        warnings.warn(f"mapping='learned' with steps={cfg.steps} <= reassign_every={cfg.reassign_every}: the map never "
                      "moves, so the result equals mapping='fixed'; pass reassign_every below steps, or "
                      "mapping='fixed'", UserWarning, stacklevel=2)
    teacher = output_layer(model)
    check_logit_transform(model)
    vocab_size = teacher.weight.shape[0]
    if cfg.num_codes > vocab_size:
        raise ValueError(bad_value("num_codes", cfg.num_codes, f"1 <= num_codes <= V={vocab_size} (the model's "
                                   "vocabulary)", "fewer codes than tokens is the point of the head"))
    texts = _check_texts(texts)
    stream = token_stream(tokenizer, texts, cfg.max_text_tokens)
    if int(stream.max()) >= vocab_size:
        raise ValueError(bad_value("tokenizer", _shown(tokenizer), f"token ids below V={vocab_size}",
                                   "pass the tokenizer of this model"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        hidden = collect_hidden(model, teacher, stream, cfg)
        counts = torch.bincount(stream, minlength=vocab_size)
        with _stage(f"vq_logits: codes for {cfg.num_codes} of {vocab_size} tokens", cfg.show_progress):
            stats = statistics(hidden, teacher, counts, cfg.prior_weight, seed=cfg.seed)
            head, clustered = compressed_head(teacher, stats, cfg)
        with torch.enable_grad():
            distil_head(head, hidden, teacher, stats, cfg, clustered)
        _install(model, head)
    return model


def _stage(description: str, enabled: bool) -> contextlib.AbstractContextManager[None]:
    from leanfit.core.progress import stage

    return stage(description) if enabled else contextlib.nullcontext()


def collect_hidden(model: Any, teacher: Teacher, stream: torch.Tensor, cfg: CompressConfig) -> torch.Tensor:
    """The states :func:`compress_lm_head` distils on, (n + sample_tokens, d): those of ``stream`` (from
    :func:`token_stream`), then those of ``cfg.sample_tokens`` tokens sampled from the model. Seed the global RNG
    as :func:`compress_lm_head` does (``cfg.seed``) to get its states exactly."""
    from leanfit.core.progress import progress_bar

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), progress_bar(stream.numel() + cfg.sample_tokens, "vq_logits: hidden states",
                                           enabled=cfg.show_progress) as bar:
            text = text_hidden(model, stream, cfg, bar)
            sampled = _sampled_hidden(model, teacher, stream, cfg, torch.Generator().manual_seed(cfg.seed), bar)
    finally:
        model.train(was_training)
    return torch.cat([text, sampled.to(text.dtype)]).detach()


def _install(model: Any, head: VQLogitsHead) -> None:
    """Put ``head`` on the model through :func:`replace_lm_head` (config, class, untied weights), then swap in
    the distilled head itself."""
    replace_lm_head(model, head.num_codes, mapping=head.mapping.clone(), token_bias=True,
                    residual_rank=head.residual_rank)
    model.set_output_embeddings(head.requires_grad_(True))
