"""The controlled hallucination benchmark's data: a world of facts whose knowledge status is known exactly.

Real facts come from two installed tables (``leanfit.studies.data.facts``): elements (symbol, atomic number, discovery
year, discoverer; period on request) and countries (capital, currency, region, calling code). Fictitious
entities are names built from syllables of real names of the same kind and are never shown anywhere. A
:class:`FactWorld` assigns every fact to one role:

- **pretrained** facts are rendered as paraphrased declarative sentences for pretraining (:func:`pretrain_text`);
- **SFT** facts are a subset of the pretrained ones, shown again in question-answer form (:func:`qa_example`);
- **unseen-attribute** facts belong to an entity that pretraining mentions through its other attributes, but this
  attribute is never shown (neither in pretraining nor in SFT);
- **fictitious** facts ask about a name that appears nowhere; their gold answer is :data:`ABSTAIN`.

Evaluation splits (each with disjoint ``valid`` and ``test`` parts, stratified by attribute):

- ``sft_known``: the SFT training facts themselves, i.e. a memorisation check (known facts seen in SFT);
- ``pretrain_only``: pretrained facts never seen in SFT (knowledge has to transfer from sentences to answers);
- ``unseen_attribute`` and ``fictitious``: the two unknown splits on which hallucination is measured.

Format conventions. A question is ``"Q: <question>\\nA:"`` with one fixed question per attribute, and its
completion is ``" " + answer + "\\n"``: it starts with a space and ends with :data:`ANSWER_END` (a trainer may also
append the tokenizer's EOS after it). Generated text is cut at the first ``ANSWER_END`` by :func:`parse_answer`.
Optional abstention training examples (``abstain_examples``) ask about *other* fictitious names, disjoint from the
evaluated ones, with the answer :data:`ABSTAIN`.

The held-out sentences for the perplexity regression check (:func:`heldout_sentences`) state pretrained facts with
paraphrase templates that pretraining never uses, so they measure retained knowledge in unseen wording; general
corpora would be out of distribution for a model pretrained on fact sentences only.

Why our own code: the benchmark needs exact control of which fact is shown where, which no packaged QA data set
gives; the tables and sentences are small enough to build in milliseconds.
"""

from __future__ import annotations

import functools
import random
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from leanfit.core.config import BaseConfig, option
from leanfit.core.errors import ConfigError, bad_value

__all__ = [
    "ABSTAIN",
    "ANSWER_END",
    "ATTRIBUTES",
    "ATTRIBUTE_KIND",
    "DEFAULT_ATTRIBUTES",
    "EVAL_SPLITS",
    "HELDOUT_TEMPLATES",
    "PARTS",
    "QUESTIONS",
    "TEMPLATES",
    "Fact",
    "FactWorld",
    "FactWorldConfig",
    "build_fact_world",
    "heldout_sentences",
    "parse_answer",
    "pretrain_sentences",
    "pretrain_text",
    "qa_example",
    "qa_prompt",
    "real_facts",
    "tokenizer_texts",
]

ABSTAIN = "unknown"
ANSWER_END = "\n"
EVAL_SPLITS: tuple[str, ...] = ("sft_known", "pretrain_only", "unseen_attribute", "fictitious")
PARTS: tuple[str, ...] = ("valid", "test")

ATTRIBUTE_KIND: dict[str, str] = {
    "symbol": "element", "atomic_number": "element", "discovery_year": "element", "discoverer": "element",
    "period": "element", "capital": "country", "currency": "country", "region": "country", "calling_code": "country",
}
ATTRIBUTES: tuple[str, ...] = tuple(ATTRIBUTE_KIND)
DEFAULT_ATTRIBUTES: tuple[str, ...] = tuple(a for a in ATTRIBUTES if a != "period")

# Pretraining paraphrases ({e} entity, {a} answer); HELDOUT_TEMPLATES are never used in pretraining.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "symbol": ("The chemical symbol of {e} is {a}.", "{e} has the chemical symbol {a}.", "{a} is the symbol for {e}.",
               "The symbol {a} stands for {e}.", "In the periodic table, {e} is written as {a}.",
               "{e} is abbreviated {a} in chemistry."),
    "atomic_number": ("The atomic number of {e} is {a}.", "{e} has atomic number {a}.",
                      "{e} has {a} protons in its nucleus.", "Element number {a} is {e}.",
                      "An atom of {e} has {a} protons.", "{e} sits at position {a} of the periodic table."),
    "discovery_year": ("{e} was discovered in {a}.", "The discovery of {e} took place in {a}.",
                       "In {a}, {e} was discovered.", "{e} was first identified in the year {a}.",
                       "The year {e} was discovered is {a}.", "{e} has been known since its discovery in {a}."),
    "discoverer": ("{e} was discovered by {a}.", "The discoverer of {e} is {a}.", "{a} discovered {e}.",
                   "{e} was first identified by {a}.", "The discovery of {e} is credited to {a}.",
                   "{a} is known for the discovery of {e}."),
    "period": ("{e} is in period {a} of the periodic table.", "The period of {e} is {a}.",
               "{e} belongs to period {a}.", "In the periodic table, {e} lies in row {a}.",
               "Period {a} contains {e}."),
    "capital": ("The capital of {e} is {a}.", "{a} is the capital city of {e}.", "{e}'s capital is {a}.",
                "The seat of government of {e} is in {a}.", "{a} serves as the capital of {e}.",
                "The capital city of {e} is {a}."),
    "currency": ("The currency code of {e} is {a}.", "{e} uses the currency {a}.", "In {e}, people pay with {a}.",
                 "{a} is the currency of {e}.", "The official currency of {e} is {a}.",
                 "Prices in {e} are given in {a}."),
    "region": ("{e} is in {a}.", "{e} is a country in {a}.", "{e} lies in the region of {a}.",
               "The region of {e} is {a}.", "{e} is located in {a}.", "{e} belongs to the {a} region."),
    "calling_code": ("The calling code of {e} is {a}.", "The international dialing code for {e} is {a}.",
                     "To phone {e}, dial {a} first.", "{e} has the telephone code {a}.",
                     "{a} is the country calling code of {e}.", "Phone numbers in {e} start with the code {a}."),
}
HELDOUT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "symbol": ("Chemists write {e} with the symbol {a}.", "The element {e} is denoted by {a}."),
    "atomic_number": ("Every {e} nucleus contains {a} protons.", "The element with atomic number {a} is {e}."),
    "discovery_year": ("Scientists first found {e} in {a}.", "The element {e} was first described in {a}."),
    "discoverer": ("Credit for finding {e} goes to {a}.", "It was {a} who discovered {e}."),
    "period": ("{e} appears in the periodic table's period {a}.", "The element {e} sits in period {a}."),
    "capital": ("The government of {e} sits in {a}.", "{e} is governed from its capital, {a}."),
    "currency": ("Shops in {e} take payment in {a}.", "The money used in {e} is {a}."),
    "region": ("On a map, {e} is found in {a}.", "The country {e} is part of {a}."),
    "calling_code": ("Calls to {e} use the prefix {a}.", "The phone prefix of {e} is {a}."),
}
QUESTIONS: dict[str, str] = {
    "symbol": "What is the chemical symbol of {e}?", "atomic_number": "What is the atomic number of {e}?",
    "discovery_year": "In what year was {e} discovered?", "discoverer": "Who discovered {e}?",
    "period": "In which period of the periodic table is {e}?", "capital": "What is the capital of {e}?",
    "currency": "What is the currency code of {e}?", "region": "In which region is {e}?",
    "calling_code": "What is the calling code of {e}?",
}

# ISO 4217 fund codes are units of account, not the currency people pay with; a country's first other code is used.
_FUND_CODES = frozenset({"BOV", "CHE", "CHW", "CLF", "COU", "MXV", "USN", "USS", "UYI", "UYW", "XSU", "XUA"})
_NON_DECOMPOSING = str.maketrans({"ø": "o", "Ø": "O", "ß": "ss", "æ": "ae", "Æ": "Ae", "œ": "oe", "Œ": "Oe",
                                  "đ": "d", "Đ": "D", "ł": "l", "Ł": "L", "ı": "i", "’": "'", "‘": "'"})
_NULLS = frozenset({"", "none", "null", "n/a", "nan", ABSTAIN})
_MAX_ANSWER_WORDS = 4
_PARTICLES = frozenset({"von", "van", "de", "der", "du", "la", "da"})
_INSTITUTION_WORDS = frozenset({"institute", "laboratory", "research", "centre", "center", "university"})


@dataclass(frozen=True, order=True)
class Fact:
    """One (entity, attribute, answer) triple; ``kind`` is the entity type, ``answer`` is ABSTAIN when fictitious."""

    entity: str
    attribute: str
    answer: str
    kind: str
    fictitious: bool = False


# --- cleaning the tables --------------------------------------------------------------------------------------------
def _to_ascii(text: str) -> str:
    """Accents removed (NFKD), a few letters transliterated, any other non-ASCII character dropped."""
    text = unicodedata.normalize("NFKD", text.translate(_NON_DECOMPOSING))
    return text.encode("ascii", "ignore").decode("ascii")


def _clean(value: object, max_words: int | None = _MAX_ANSWER_WORDS) -> str | None:
    """An ASCII answer (or entity name) string, or None for empty, null-like or over-long values."""
    if value is None:
        return None
    text = _to_ascii(str(value))
    text = re.sub(r"\([^)]*\)", " ", text).replace(".", " ")  # "D.C." -> "D C" -> "DC" below
    text = re.sub(r"\b([A-Z]) (?=[A-Z]\b)", r"\1", " ".join(text.split()))
    text = text.strip(" ,;:/-")
    if text.lower() in _NULLS or (max_words is not None and len(text.split()) > max_words):
        return None
    return text


def _country_name(name: str) -> str | None:
    """``"Virgin Islands, British"`` -> ``"British Virgin Islands"``; a long part after the comma is dropped."""
    head, sep, tail = _to_ascii(name).partition(",")
    if sep:
        tail = tail.strip()
        name = f"{tail} {head.strip()}" if len(tail.split()) <= 2 else head
    return _clean(name, max_words=None)


def _currency(codes: Sequence[str]) -> str | None:
    usable = [c for c in codes if c and c not in _FUND_CODES]
    return _clean(usable[0]) if usable else None


def _calling_code(codes: Sequence[str]) -> str | None:
    first = next((c for c in codes if c), None)
    return _clean(first.replace("-", "")) if first else None


def _discoverer(text: str | None) -> str | None:
    """The first listed discoverer as a surname (with particles: "de Marignac"); institutions by their short name."""
    if not text or text.lower().startswith("known to the ancients"):
        return None
    first = re.split(r"[,;/]", _to_ascii(text))[0].strip()
    acronym = re.search(r"\(([A-Z]{2,})\)", first)
    if acronym:
        return acronym.group(1)
    words = first.replace(".", ". ").split()
    if any(w.lower() in _INSTITUTION_WORDS for w in words):
        if words[0].isupper() and len(words[0]) > 1:
            return words[0]
        if len(words) <= _MAX_ANSWER_WORDS:
            return _clean(first)
        return "".join(w[0] for w in words if w[0].isupper())
    words = [w for w in words if not w.endswith(".") and w not in ("Jr", "Sir")]
    if not words:
        return None
    start = len(words) - 1
    while start > 0 and words[start - 1].lower() in _PARTICLES:
        start -= 1
    return _clean(" ".join(words[start:]))


def _element_facts(row: Mapping[str, object]) -> Iterable[Fact]:
    name = str(row["name"])
    values = {"symbol": _clean(row["symbol"]), "atomic_number": _clean(row["atomic_number"]),
              "discovery_year": _clean(row["discovery_year"]), "discoverer": _discoverer(row["discoverers"]),
              "period": _clean(row["period"])}
    return (Fact(name, attr, value, "element") for attr, value in values.items() if value is not None)


def _country_facts(row: Mapping[str, object]) -> Iterable[Fact]:
    name = _country_name(str(row["name"]))
    if name is None:
        return ()
    capital = row["capital"] if isinstance(row["capital"], str) else (row["capital"] or [None])[0]
    values = {"capital": _clean(str(capital).split("/")[0]) if capital else None,
              "currency": _currency(row["currencies"]), "region": _clean(row["region"]),
              "calling_code": _calling_code(row["calling_codes"])}
    return (Fact(name, attr, value, "country") for attr, value in values.items() if value is not None)


@functools.cache
def _all_real_facts() -> tuple[Fact, ...]:
    from leanfit.studies.data.facts import countries, elements

    facts, seen = [], set()
    rows = [f for r in elements() for f in _element_facts(r)] + [f for r in countries() for f in _country_facts(r)]
    for fact in rows:
        if (fact.entity, fact.attribute) not in seen:  # countryinfo lists a few countries twice
            seen.add((fact.entity, fact.attribute))
            facts.append(fact)
    return tuple(sorted(facts))


def real_facts(attributes: Sequence[str] = DEFAULT_ATTRIBUTES) -> tuple[Fact, ...]:
    """Every cleaned real fact with one of ``attributes``, sorted (entity, attribute). Needs mendeleev, countryinfo."""
    _check_attributes(attributes)
    return tuple(f for f in _all_real_facts() if f.attribute in attributes)


def _check_attributes(attributes: Sequence[str]) -> None:
    bad = [a for a in attributes if a not in ATTRIBUTE_KIND]
    if bad or not attributes or len(set(attributes)) != len(attributes):
        raise ConfigError(bad_value("attributes", tuple(attributes), f"distinct names from {ATTRIBUTES}"))


# --- fictitious names -----------------------------------------------------------------------------------------------
_SYLLABLE = re.compile(r"[^aeiouy]*[aeiouy]+")


def _syllables(name: str) -> list[str]:
    """``"lithium"`` -> ``["li", "thi", "um"]``: consonants+vowels chunks, trailing consonants on the last one."""
    word = name.lower()
    parts = _SYLLABLE.findall(word)
    tail = word[sum(map(len, parts)) :]
    if parts and tail:
        parts[-1] += tail
    return parts if len(parts) >= 2 else []


def _fictitious_names(
    rng: random.Random, real_names: Sequence[str], n: int, blocked: str, taken: list[str]
) -> list[str]:
    """``n`` new names: a real name's first syllable, 0-1 middle syllables, another real name's last syllable.

    A name is rejected when it occurs (case-insensitively) inside ``blocked`` (all real names, answers and template
    text), contains or is contained in a name in ``taken`` (which it then joins), or has an odd length; so it never
    occurs in any rendered training text, nor inside another fictitious name."""
    pools = [s for s in (_syllables(r) for r in real_names if r.isalpha()) if s]
    heads, middles, ends = [p[0] for p in pools], [x for p in pools for x in p[1:-1]] or ["a"], [p[-1] for p in pools]
    names: list[str] = []
    for _ in range(1000 * (n + 1)):
        if len(names) == n:
            return names
        word = rng.choice(heads) + "".join(rng.choice(middles) for _ in range(rng.randint(0, 1))) + rng.choice(ends)
        ok = 5 <= len(word) <= 12 and word not in blocked and not re.search(r"(.)\1\1", word)
        if ok and not any(word in t or t in word for t in taken):
            taken.append(word)
            names.append(word.capitalize())
    raise ConfigError(bad_value("n_fictitious + abstain_examples", f"{n} per kind", "fewer names than syllables form"))


# --- the world ------------------------------------------------------------------------------------------------------
# (field, open at 0, open at 1): an empty world or no valid part makes no sense; sft_fraction 0 is an SFT-free arm.
_FRACTION_BOUNDS = (("pretrain_fraction", True, False), ("sft_fraction", False, False),
                    ("unseen_attribute_fraction", False, True), ("valid_fraction", True, True))


@dataclass
class FactWorldConfig(BaseConfig):
    seed: int = option(0, help="world seed (which facts go where); separate from the training seeds")
    attributes: tuple[str, ...] = option(DEFAULT_ATTRIBUTES, help=f"attributes used, from {ATTRIBUTES}")
    n_fictitious: int = option(200, help="fictitious entities evaluated (one question each, half per kind)")
    pretrain_fraction: float = option(1.0, help="fraction of real entities in the world (the rest are left out)")
    sft_fraction: float = option(0.5, help="fraction of pretrained facts (per attribute) also trained in SFT")
    unseen_attribute_fraction: float = option(0.15, help="fraction of real facts (per attribute) never shown")
    valid_fraction: float = option(0.3, help="fraction of each evaluation split in its valid part")
    abstain_examples: int = option(0, help="SFT examples answering ABSTAIN about training-only fictitious names")
    max_eval_per_split: int = option(0, help="cap on the items of each split part (0 = all), sampled by world seed")

    def __post_init__(self) -> None:
        _check_attributes(self.attributes)
        for name, lo_open, hi_open in _FRACTION_BOUNDS:
            value = getattr(self, name)
            if not ((value > 0 if lo_open else value >= 0) and (value < 1 if hi_open else value <= 1)):
                interval = f"{'(' if lo_open else '['}0, 1{')' if hi_open else ']'}"
                raise ConfigError(bad_value(name, value, f"a fraction in {interval}"))
        for name in ("n_fictitious", "abstain_examples", "max_eval_per_split"):
            if getattr(self, name) < 0:
                raise ConfigError(bad_value(name, getattr(self, name), "a count >= 0"))

    def build(self) -> FactWorld:
        """The world these options describe (see :func:`build_fact_world`)."""
        return _build(self)


@dataclass(frozen=True, eq=False)
class FactWorld:
    """Facts by role. ``splits[split][part]`` are evaluation items; ``sft_train`` includes abstention examples."""

    config: FactWorldConfig
    pretrain: tuple[Fact, ...]
    sft_train: tuple[Fact, ...]
    splits: Mapping[str, Mapping[str, tuple[Fact, ...]]]
    candidates: Mapping[str, tuple[str, ...]]

    @property
    def seed(self) -> int:
        return self.config.seed

    def split(self, name: str, part: str = "test") -> tuple[Fact, ...]:
        if name not in self.splits:
            raise ConfigError(bad_value("split", name, f"one of {EVAL_SPLITS}"))
        if part not in PARTS:
            raise ConfigError(bad_value("part", part, f"one of {PARTS}"))
        return self.splits[name][part]

    def evaluation(self, part: str = "valid") -> list[tuple[str, Fact]]:
        """(split, fact) for every evaluation item of ``part``, splits in EVAL_SPLITS order."""
        return [(name, fact) for name in EVAL_SPLITS for fact in self.split(name, part)]

    def candidate_answers(self, attribute: str, *, include_abstain: bool = False) -> tuple[str, ...]:
        """The closed answer set of ``attribute``: every real answer of that attribute in the world, sorted,
        deduplicated (unseen-attribute answers included, so every real gold answer is a candidate)."""
        if attribute not in self.candidates:
            raise ConfigError(bad_value("attribute", attribute, f"one of {tuple(self.candidates)}"))
        return self.candidates[attribute] + ((ABSTAIN,) if include_abstain else ())

    def summary(self) -> dict[str, int]:
        """Counts: pretrained facts and entities, SFT examples, and each ``split.part``."""
        out = {"pretrain_facts": len(self.pretrain), "pretrain_entities": len({f.entity for f in self.pretrain}),
               "sft_train": len(self.sft_train),
               "abstain_examples": sum(f.fictitious for f in self.sft_train)}
        out.update({f"{s}.{p}": len(self.splits[s][p]) for s in EVAL_SPLITS for p in PARTS})
        return out


def build_fact_world(
    seed: int = 0,
    *,
    attributes: Sequence[str] = DEFAULT_ATTRIBUTES,
    n_fictitious: int = 200,
    pretrain_fraction: float = 1.0,
    sft_fraction: float = 0.5,
    unseen_attribute_fraction: float = 0.15,
    valid_fraction: float = 0.3,
    abstain_examples: int = 0,
    max_eval_per_split: int = 0,
) -> FactWorld:
    """A deterministic fact world: the same arguments always give identical splits (one ``random.Random(seed)``).

    Steps: keep ``pretrain_fraction`` of the real entities of each kind; per attribute hold out
    ``unseen_attribute_fraction`` of the facts (never one that would leave its entity with nothing shown); per
    attribute train ``sft_fraction`` of the remaining (pretrained) facts in SFT; split every evaluation split into
    valid/test by (entity, attribute) pair, stratified by attribute; add ``n_fictitious`` evaluated and
    ``abstain_examples`` training-only fictitious names."""
    cfg = FactWorldConfig(seed=seed, attributes=tuple(attributes), n_fictitious=n_fictitious,
                          pretrain_fraction=pretrain_fraction, sft_fraction=sft_fraction,
                          unseen_attribute_fraction=unseen_attribute_fraction, valid_fraction=valid_fraction,
                          abstain_examples=abstain_examples, max_eval_per_split=max_eval_per_split)
    return _build(cfg)


def _by_attribute(facts: Iterable[Fact]) -> dict[str, list[Fact]]:
    out: dict[str, list[Fact]] = {}
    for fact in sorted(facts):
        out.setdefault(fact.attribute, []).append(fact)
    return out


def _keep_entities(facts: Sequence[Fact], fraction: float, rng: random.Random) -> list[Fact]:
    kept: set[str] = set()
    for kind in ("element", "country"):
        names = sorted({f.entity for f in facts if f.kind == kind})
        kept.update(rng.sample(names, round(fraction * len(names))) if fraction < 1 else names)
    return [f for f in facts if f.entity in kept]


def _hold_out(facts: Sequence[Fact], fraction: float, rng: random.Random) -> tuple[list[Fact], list[Fact]]:
    """(shown, unseen): per attribute, ``fraction`` of the facts never shown, each entity keeping one shown fact."""
    shown_count: dict[str, int] = {}
    for fact in facts:
        shown_count[fact.entity] = shown_count.get(fact.entity, 0) + 1
    unseen: list[Fact] = []
    for group in _by_attribute(facts).values():
        want, taken = round(fraction * len(group)), 0
        for fact in rng.sample(group, len(group)):
            if taken == want:
                break
            if shown_count[fact.entity] > 1:
                shown_count[fact.entity] -= 1
                unseen.append(fact)
                taken += 1
    held = set(unseen)
    return [f for f in facts if f not in held], sorted(unseen)


def _take_fraction(facts: Sequence[Fact], fraction: float, rng: random.Random) -> tuple[list[Fact], list[Fact]]:
    """(chosen, rest): per attribute, a ``fraction`` of the facts chosen at random; both sorted."""
    chosen: list[Fact] = []
    for group in _by_attribute(facts).values():
        chosen.extend(rng.sample(group, round(fraction * len(group))))
    picked = set(chosen)
    return sorted(chosen), [f for f in sorted(facts) if f not in picked]


def _parts(facts: Sequence[Fact], cfg: FactWorldConfig, rng: random.Random) -> dict[str, tuple[Fact, ...]]:
    valid, test = _take_fraction(facts, cfg.valid_fraction, rng)
    cap = cfg.max_eval_per_split
    if cap:
        valid, test = (sorted(rng.sample(x, cap)) if len(x) > cap else x for x in (valid, test))
    return {"valid": tuple(valid), "test": tuple(test)}


def _fictitious_facts(names: Sequence[str], attributes: Sequence[str], start: int) -> list[Fact]:
    """One question per name, kinds alternating (element first), attributes of the kind cycling."""
    out = []
    for i, name in enumerate(names):
        kind = ("element", "country")[(start + i) % 2]
        attrs = [a for a in attributes if ATTRIBUTE_KIND[a] == kind] or list(attributes)
        attr = attrs[((start + i) // 2) % len(attrs)]
        out.append(Fact(name, attr, ABSTAIN, ATTRIBUTE_KIND[attr], fictitious=True))
    return out


def _blocked_text(facts: Sequence[Fact]) -> str:
    words = [f.entity for f in facts] + [f.answer for f in facts] + [ABSTAIN]
    for table in (TEMPLATES, HELDOUT_TEMPLATES, QUESTIONS):
        words += [t if isinstance(t, str) else "\n".join(t) for t in table.values()]
    return "\n".join(words).lower() + "\nq: a: "


def _build(cfg: FactWorldConfig) -> FactWorld:
    rng = random.Random(cfg.seed)
    everything = real_facts(cfg.attributes)
    facts = _keep_entities(everything, cfg.pretrain_fraction, rng)
    pretrain, unseen = _hold_out(facts, cfg.unseen_attribute_fraction, rng)
    sft, pretrain_only = _take_fraction(pretrain, cfg.sft_fraction, rng)
    names_by_kind = [sorted({f.entity for f in everything if f.kind == k}) for k in ("element", "country")]
    blocked = _blocked_text(_all_real_facts())
    n_fict, n_abst = cfg.n_fictitious, cfg.abstain_examples
    taken: list[str] = []
    names = [_fictitious_names(rng, pool, (n_fict + n_abst + 1) // 2 + 1, blocked, taken) for pool in names_by_kind]
    interleaved = [n for pair in zip(*names, strict=True) for n in pair]
    fictitious = _fictitious_facts(interleaved[:n_fict], cfg.attributes, 0)
    abstain = _fictitious_facts(interleaved[n_fict : n_fict + n_abst], cfg.attributes, n_fict)
    splits = {"sft_known": _parts(sft, cfg, rng), "pretrain_only": _parts(pretrain_only, cfg, rng),
              "unseen_attribute": _parts(unseen, cfg, rng), "fictitious": _parts(fictitious, cfg, rng)}
    candidates = {a: tuple(sorted({f.answer for f in facts if f.attribute == a})) for a in cfg.attributes}
    return FactWorld(cfg, tuple(pretrain), tuple(sft) + tuple(abstain), splits, candidates)


# --- rendering ------------------------------------------------------------------------------------------------------
def _rng(world: FactWorld, seed: int, salt: str) -> random.Random:
    return random.Random(f"{salt}:{world.seed}:{seed}")  # str seeds are hashed with sha512: stable across runs


def pretrain_sentences(world: FactWorld, seed: int = 0, *, paraphrases: int = 4) -> list[str]:
    """Every pretrained fact stated with ``paraphrases`` distinct templates (at most all of them), shuffled.

    ``seed`` picks templates and order (a data seed, separate from the world seed). Fictitious names and
    unseen-attribute facts never appear."""
    if paraphrases < 1:
        raise ConfigError(bad_value("paraphrases", paraphrases, "at least 1"))
    rng = _rng(world, seed, "pretrain")
    out = []
    for fact in world.pretrain:
        templates = TEMPLATES[fact.attribute]
        for template in rng.sample(templates, min(paraphrases, len(templates))):
            out.append(template.format(e=fact.entity, a=fact.answer))
    rng.shuffle(out)
    return out


def pretrain_text(world: FactWorld, seed: int = 0, *, paraphrases: int = 4, sentences_per_doc: int = 8) -> list[str]:
    """The pretraining corpus: :func:`pretrain_sentences` joined by spaces into documents of
    ``sentences_per_doc`` sentences (the last may be shorter)."""
    if sentences_per_doc < 1:
        raise ConfigError(bad_value("sentences_per_doc", sentences_per_doc, "at least 1"))
    sentences = pretrain_sentences(world, seed, paraphrases=paraphrases)
    return [" ".join(sentences[i : i + sentences_per_doc]) for i in range(0, len(sentences), sentences_per_doc)]


def heldout_sentences(world: FactWorld, seed: int = 0, *, max_sentences: int = 300) -> list[str]:
    """Up to ``max_sentences`` pretrained facts, each stated with one held-out template (never used in pretraining),
    for the held-out perplexity regression check; the facts are a ``seed``-determined sample."""
    if max_sentences < 1:
        raise ConfigError(bad_value("max_sentences", max_sentences, "at least 1"))
    rng = _rng(world, seed, "heldout")
    facts = rng.sample(world.pretrain, min(max_sentences, len(world.pretrain)))
    return [rng.choice(HELDOUT_TEMPLATES[f.attribute]).format(e=f.entity, a=f.answer) for f in facts]


def qa_prompt(fact: Fact) -> str:
    """``"Q: What is the capital of Peru?\\nA:"`` (one fixed question per attribute)."""
    return f"Q: {QUESTIONS[fact.attribute].format(e=fact.entity)}\nA:"


def qa_example(fact: Fact) -> tuple[str, str]:
    """(prompt, completion); the completion is ``" " + answer + ANSWER_END``."""
    return qa_prompt(fact), f" {fact.answer}{ANSWER_END}"


def parse_answer(generated: str, eos: str | None = None) -> str:
    """The answer in a generated completion: text before the first ANSWER_END (or ``eos``), stripped."""
    text = generated.split(eos)[0] if eos else generated
    return text.split(ANSWER_END)[0].strip()


def tokenizer_texts(world: FactWorld, seed: int = 0) -> list[str]:
    """Texts to train the BPE tokenizer on: the pretraining corpus and the SFT examples (no evaluation prompt, so
    no fictitious evaluated name shapes the vocabulary)."""
    return pretrain_text(world, seed) + ["".join(qa_example(f)) for f in world.sft_train]
