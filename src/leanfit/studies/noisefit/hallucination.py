"""The controlled hallucination benchmark's pipeline: pretrain a tiny Llama on fact sentences, fine-tune it in
question-answer form with one arm per method, and score every arm deterministically (no LLM judge).

Arms differ only in the fine-tuning stage, and every arm trains through a ``transformers.Trainer``:

- ``sft``: the plain Trainer (completion-only labels);
- ``label_smoothing``: ``TrainingArguments(label_smoothing_factor=...)``;
- ``neftune``: ``TrainingArguments(neftune_noise_alpha=...)`` (noise on the input embeddings);
- ``rdrop``: :class:`~leanfit.noisefit.trainer.RDropTrainer` with attention dropout switched on for that arm;
- ``noisefit_paper``: :class:`~leanfit.noisefit.trainer.NoiseFiTTrainer` with ``paper_v1=True`` (the reference's
  behaviour, defects included) on its high-SNR layers;
- ``noisefit``: the same trainer with leanfit's defaults (propagated-effect calibration, one packed noisy branch).

Scoring (:func:`score_items`): greedy answers (exact match after normalisation; confidence = the probability of
the whole greedy answer including its end marker) on every evaluation split, and closed-set likelihood ranking
among ``closed_set_size`` candidate answers (the gold plus distractors of the same attribute, fixed by the world
seed) on the known splits.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from leanfit.core.config import BaseConfig, option
from leanfit.core.errors import ConfigError, bad_value
from leanfit.studies.noisefit.facts_qa import ABSTAIN, Fact, FactWorld, qa_example, qa_prompt

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = [
    "ARMS",
    "QATrainConfig",
    "batch_to_tensors",
    "build_tokenizer",
    "closed_set_scores",
    "greedy_answers",
    "heldout_loss",
    "qa_features",
    "score_items",
]

ARMS = ("sft", "label_smoothing", "neftune", "rdrop", "noisefit_paper", "noisefit")


@dataclass
class QATrainConfig(BaseConfig):
    steps: int = option(300, help="fine-tuning optimizer steps per arm")
    batch_size: int = option(32, help="QA examples per step")
    lr: float = option(1e-3, help="peak learning rate (AdamW, linear warm-up then cosine)")
    warmup_ratio: float = option(0.1, help="fraction of steps in linear warm-up")
    weight_decay: float = option(0.0, help="AdamW weight decay")
    rdrop_dropout: float = option(0.1, help="attention dropout of the R-Drop arm (the model has none otherwise)")

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(bad_value(f"sft.{name}", getattr(self, name), "a positive integer"))
        if self.lr <= 0:
            raise ConfigError(bad_value("sft.lr", self.lr, "a positive number such as 1e-3"))
        if not 0 <= self.warmup_ratio < 1 or not 0 <= self.rdrop_dropout < 1:
            raise ConfigError(bad_value("sft.warmup_ratio/rdrop_dropout", (self.warmup_ratio, self.rdrop_dropout),
                                        "fractions in [0, 1)"))


def build_tokenizer(texts: Sequence[str], vocab_size: int) -> Any:
    """A byte-level BPE trained on ``texts``, wrapped for transformers (pads on the left for generation)."""
    from leanfit.studies.data.tokenizer import to_hf_tokenizer, train_bpe

    tok = to_hf_tokenizer(train_bpe(list(texts), vocab_size))
    tok.padding_side = "left"
    return tok


def qa_features(tokenizer: Any, facts: Sequence[Fact]) -> list[dict[str, list[int]]]:
    """Tokenised QA examples: ``input_ids`` = prompt + completion + EOS, ``labels`` = -100 on the prompt."""
    out = []
    for fact in facts:
        prompt, completion = qa_example(fact)
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        out.append({"input_ids": p + c, "labels": [-100] * len(p) + c})
    return out


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Logits in at least float32 before softmax (float64 stays float64)."""
    import torch

    return x.to(torch.promote_types(x.dtype, torch.float32))


def _stop_ids(tokenizer: Any) -> list[int]:
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert len(newline) == 1, "byte-level BPE keeps a lone newline as one token"
    return [tokenizer.eos_token_id, newline[0]]


def greedy_answers(model: Any, tokenizer: Any, prompts: Sequence[str], *, batch_size: int = 256,
                   max_new_tokens: int = 12) -> tuple[list[str], np.ndarray]:
    """Greedy answers (text before the end marker) and their probabilities (product over generated tokens up to
    and including the end marker; an answer cut at ``max_new_tokens`` keeps the product of what was generated)."""
    import numpy as np
    import torch

    stops = _stop_ids(tokenizer)
    answers, confs = [], []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(list(prompts[i : i + batch_size]), return_tensors="pt", padding=True,
                            add_special_tokens=False)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                                 pad_token_id=tokenizer.pad_token_id, output_scores=True,
                                 return_dict_in_generate=True)
            new = out.sequences[:, enc["input_ids"].shape[1] :]
            logp = _upcast(torch.stack(out.scores, 1)).log_softmax(-1).gather(-1, new[..., None])[..., 0]
            done = torch.zeros(new.shape[0], dtype=torch.bool)
            total = torch.zeros(new.shape[0], dtype=torch.float64)
            for t in range(new.shape[1]):  # sum log-probs up to and including the first stop token
                total += torch.where(done, torch.zeros_like(total), logp[:, t].double())
                done |= torch.isin(new[:, t], torch.tensor(stops))
            confs.append(total.exp().numpy())
            for row in new.tolist():
                cut = next((j for j, tok in enumerate(row) if tok in stops), len(row))
                answers.append(tokenizer.decode(row[:cut]).strip())
    return answers, np.concatenate(confs) if confs else np.zeros(0)


def closed_set_scores(model: Any, tokenizer: Any, prompts: Sequence[str], candidates: Sequence[Sequence[str]], *,
                      batch_size: int = 512) -> list[np.ndarray]:
    """Log-likelihood of every candidate completion ``" " + answer + "\\n"`` after its prompt.

    prompts: N strings; candidates: N lists (any lengths). Returns N arrays of log-likelihoods."""
    import numpy as np

    rows, owners = [], []
    for i, (prompt, cands) in enumerate(zip(prompts, candidates, strict=True)):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        for cand in cands:
            c = tokenizer(f" {cand}\n", add_special_tokens=False)["input_ids"]
            rows.append({"input_ids": p + c, "labels": [-100] * len(p) + c})
            owners.append(i)
    scores = np.concatenate([_sequence_logp(model, batch_to_tensors(rows[s : s + batch_size], tokenizer.pad_token_id))
                             for s in range(0, len(rows), batch_size)]) if rows else np.zeros(0)
    out: list[list[float]] = [[] for _ in prompts]
    for owner, value in zip(owners, scores, strict=True):
        out[owner].append(float(value))
    return [np.asarray(v) for v in out]


def _closed_candidates(world: FactWorld, fact: Fact, size: int) -> list[str]:
    """The gold answer first, then ``size - 1`` distractors of its attribute, fixed by the world seed."""
    pool = [a for a in world.candidate_answers(fact.attribute) if a != fact.answer]
    rng = random.Random(f"closed:{world.seed}:{fact.entity}:{fact.attribute}")
    return [fact.answer, *rng.sample(pool, min(size - 1, len(pool)))]


def score_items(model: Any, tokenizer: Any, world: FactWorld, items: Sequence[tuple[str, Fact]], *,
                closed_set_size: int = 20, closed_splits: Sequence[str] = ("sft_known", "pretrain_only"),
                ) -> dict[str, np.ndarray]:
    """Per-item arrays: split, correct, abstained, confidence (greedy answer), closed_correct, closed_conf
    (closed-set ranking, NaN outside ``closed_splits``), and the answers."""
    import numpy as np

    from leanfit.studies.noisefit.metrics import closed_set_choice, exact_match, is_abstention

    answers, conf = greedy_answers(model, tokenizer, [qa_prompt(f) for _, f in items])
    correct = np.array([exact_match(a, f.answer) for a, (_, f) in zip(answers, items, strict=True)])
    closed_correct = np.full(len(items), np.nan)
    closed_conf = np.full(len(items), np.nan)
    idx = [i for i, (s, f) in enumerate(items) if s in closed_splits and f.answer != ABSTAIN]
    if idx:
        cands = [_closed_candidates(world, items[i][1], closed_set_size) for i in idx]
        lls = closed_set_scores(model, tokenizer, [qa_prompt(items[i][1]) for i in idx], cands)
        for i, ll in zip(idx, lls, strict=True):
            choice, prob = closed_set_choice(ll)
            closed_correct[i], closed_conf[i] = float(choice == 0), float(prob)
    return {"split": np.array([s for s, _ in items], dtype=object), "correct": correct,
            "abstained": np.array([is_abstention(a) for a in answers]), "confidence": np.clip(conf, 0.0, 1.0),
            "closed_correct": closed_correct, "closed_conf": closed_conf,
            "answer": np.array(answers, dtype=object)}


def heldout_loss(model: Any, tokenizer: Any, sentences: Sequence[str], *, batch_size: int = 256) -> float:
    """Mean next-token cross-entropy (nats/token) of ``sentences`` (each + EOS), the perplexity regression check."""

    seqs = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in sentences]
    feats = [{"input_ids": ids, "labels": ids} for ids in seqs]
    total = sum(-_sequence_logp(model, batch_to_tensors(feats[s : s + batch_size], tokenizer.pad_token_id)).sum()
                for s in range(0, len(feats), batch_size))
    return float(total) / max(sum(len(ids) - 1 for ids in seqs), 1)


def _sequence_logp(model: Any, batch: dict[str, torch.Tensor]) -> np.ndarray:
    """Per row, the sum of log p(token | prefix) over the labelled (non -100) positions after the first; (B,)."""
    import torch

    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        logp = _upcast(logits).log_softmax(-1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
        return (logp * (labels != -100)).sum(1).double().numpy()


def batch_to_tensors(features: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding) for a list of features."""
    import torch

    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_id)
    labels = torch.full((len(features), width), -100)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for j, f in enumerate(features):
        n = len(f["input_ids"])
        ids[j, :n], labels[j, :n], mask[j, :n] = torch.tensor(f["input_ids"]), torch.tensor(f["labels"]), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
