"""The fact world: cleaned facts, split roles and their disjointness, determinism, rendering conventions."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections import Counter

import pytest

from leanfit.core.errors import ConfigError
from leanfit.studies.noisefit.facts_qa import (
    ABSTAIN,
    ATTRIBUTE_KIND,
    DEFAULT_ATTRIBUTES,
    EVAL_SPLITS,
    HELDOUT_TEMPLATES,
    PARTS,
    QUESTIONS,
    TEMPLATES,
    Fact,
    FactWorld,
    FactWorldConfig,
    build_fact_world,
    heldout_sentences,
    parse_answer,
    pretrain_sentences,
    pretrain_text,
    qa_example,
    qa_prompt,
    real_facts,
    tokenizer_texts,
)

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("mendeleev") is None or importlib.util.find_spec("countryinfo") is None,
    reason="needs mendeleev and countryinfo",
)
N_FICTITIOUS, N_ABSTAIN = 200, 30


@pytest.fixture(scope="module")
def world() -> FactWorld:
    return build_fact_world(0, n_fictitious=N_FICTITIOUS, abstain_examples=N_ABSTAIN)


@pytest.fixture(scope="module")
def all_sentences(world: FactWorld) -> set[str]:
    """Every pretraining sentence any data seed can produce (all templates of every pretrained fact)."""
    return set(pretrain_sentences(world, 0, paraphrases=max(map(len, TEMPLATES.values()))))


def _eval_facts(world: FactWorld, split: str) -> list[Fact]:
    return [f for part in PARTS for f in world.split(split, part)]


# --- cleaned facts --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("entity", "attribute", "answer"),
    [("Hydrogen", "symbol", "H"), ("Oganesson", "atomic_number", "118"), ("Hydrogen", "discovery_year", "1766"),
     ("Hydrogen", "discoverer", "Cavendish"), ("Beryllium", "discoverer", "Wohler"),
     ("Gallium", "discoverer", "de Boisbaudran"), ("Polonium", "discoverer", "Curie"),
     ("Tungsten", "discoverer", "de Elhuyar"), ("Moscovium", "discoverer", "JINR"), ("Hassium", "discoverer", "HIRL"),
     ("Copernicium", "discoverer", "GSI"), ("Nobelium", "discoverer", "Nobel Institute for Physics"),
     ("Brazil", "capital", "Brasilia"), ("United States", "capital", "Washington DC"),
     ("Switzerland", "currency", "CHF"), ("Chile", "currency", "CLP"), ("Jamaica", "calling_code", "1876"),
     ("British Virgin Islands", "capital", "Road Town"), ("State of Palestine", "region", "Asia"),
     ("Holy See", "capital", "Vatican City State"), ("Vatican City State", "capital", "Vatican City"),
     ("Peru", "capital", "Lima")],
    ids=lambda v: str(v).replace(" ", "_"),
)
def test_real_fact_cleaning(entity, attribute, answer):
    table = {(f.entity, f.attribute): f.answer for f in real_facts(tuple(ATTRIBUTE_KIND))}
    assert table[(entity, attribute)] == answer


@pytest.mark.parametrize(
    ("entity", "attribute"),
    [("Gold", "discovery_year"), ("Gold", "discoverer"), ("Curacao", "currency"), ("Curacao", "calling_code"),
     ("French Southern and Antarctic Lands", "calling_code")],
    ids=["ancient-year", "ancient-discoverer", "no-currency", "no-code", "empty-code"],
)
def test_missing_values_are_skipped(entity, attribute):
    facts = real_facts()
    assert any(f.entity == entity for f in facts)
    assert not any((f.entity, f.attribute) == (entity, attribute) for f in facts)


def test_real_facts_are_short_ascii_and_unique():
    facts = real_facts(tuple(ATTRIBUTE_KIND))
    counts = Counter(f.attribute for f in facts)
    assert counts == {"symbol": 118, "atomic_number": 118, "period": 118, "discovery_year": 105, "discoverer": 105,
                      "capital": 248, "region": 248, "currency": 237, "calling_code": 236}
    assert len({(f.entity, f.attribute) for f in facts}) == len(facts)
    assert all((f.entity + f.answer).isascii() and 1 <= len(f.answer.split()) <= 4 for f in facts)
    assert not any(f.answer.lower() in ("", "none", ABSTAIN) or f.answer.endswith(".") for f in facts)


# --- world splits ---------------------------------------------------------------------------------------------------
def test_summary_counts(world):
    n_real = len(real_facts())
    s = world.summary()
    unseen = s["unseen_attribute.valid"] + s["unseen_attribute.test"]
    sft = s["sft_known.valid"] + s["sft_known.test"]
    assert n_real == 1415
    assert s["pretrain_facts"] + unseen == n_real
    assert s["pretrain_entities"] == 118 + 248
    assert unseen == sum(round(0.15 * n) for n in Counter(f.attribute for f in real_facts()).values())
    assert sft == sum(round(0.5 * n) for n in Counter(f.attribute for f in world.pretrain).values())
    assert s["sft_train"] == sft + N_ABSTAIN and s["abstain_examples"] == N_ABSTAIN
    assert s["pretrain_only.valid"] + s["pretrain_only.test"] == s["pretrain_facts"] - sft
    assert s["fictitious.valid"] + s["fictitious.test"] == N_FICTITIOUS


def test_splits_are_disjoint_and_have_the_right_roles(world):
    pairs = {s: [(f.entity, f.attribute) for f in _eval_facts(world, s)] for s in EVAL_SPLITS}
    everything = [p for s in EVAL_SPLITS for p in pairs[s]]
    assert len(everything) == len(set(everything))  # across splits and valid/test
    pretrained = {(f.entity, f.attribute) for f in world.pretrain}
    sft = {(f.entity, f.attribute) for f in world.sft_train}
    assert set(pairs["sft_known"]) == sft - {(f.entity, f.attribute) for f in world.sft_train if f.fictitious}
    assert set(pairs["sft_known"]) <= pretrained
    assert set(pairs["pretrain_only"]) <= pretrained and not set(pairs["pretrain_only"]) & sft
    assert not (set(pairs["unseen_attribute"]) | set(pairs["fictitious"])) & (pretrained | sft)
    pretrained_entities = {f.entity for f in world.pretrain}
    assert {e for e, _ in pairs["unseen_attribute"]} <= pretrained_entities
    assert not {e for e, _ in pairs["fictitious"]} & (pretrained_entities | {f.entity for f in world.sft_train})


@pytest.mark.parametrize("split", EVAL_SPLITS)
def test_valid_test_fraction_is_stratified_by_attribute(world, split):
    valid = Counter(f.attribute for f in world.split(split, "valid"))
    total = Counter(f.attribute for f in _eval_facts(world, split))
    assert valid == {a: round(0.3 * n) for a, n in total.items() if round(0.3 * n)}


def test_same_seed_same_world_other_seed_other_world(world):
    again = build_fact_world(0, n_fictitious=N_FICTITIOUS, abstain_examples=N_ABSTAIN)
    other = build_fact_world(1, n_fictitious=N_FICTITIOUS, abstain_examples=N_ABSTAIN)
    assert (again.pretrain, again.sft_train, again.splits) == (world.pretrain, world.sft_train, world.splits)
    assert pretrain_text(again, 3) == pretrain_text(world, 3)
    assert heldout_sentences(again, 3) == heldout_sentences(world, 3)
    assert pretrain_text(world, 4) != pretrain_text(world, 3)
    assert other.split("pretrain_only") != world.split("pretrain_only")
    assert other.split("fictitious") != world.split("fictitious")


_DIGEST = """
import hashlib
from leanfit.studies.noisefit.facts_qa import build_fact_world, heldout_sentences, pretrain_text
w = build_fact_world(3, abstain_examples=10)
state = (w.pretrain, w.sft_train, sorted((k, sorted(v.items())) for k, v in w.splits.items()), pretrain_text(w, 1),
         heldout_sentences(w, 2))
print(hashlib.sha256(repr(state).encode()).hexdigest())
"""


def test_world_is_identical_across_processes_with_other_hash_seeds():
    """Set iteration order changes with PYTHONHASHSEED; the world must not depend on it."""
    digests = {
        subprocess.run([sys.executable, "-c", _DIGEST], env={**os.environ, "PYTHONHASHSEED": str(h)},
                       capture_output=True, text=True, check=True).stdout
        for h in (1, 2)
    }
    assert len(digests) == 1 and len(next(iter(digests)).strip()) == 64


def test_unknown_facts_never_appear_in_training_text(world, all_sentences):
    text = "\n".join(sorted(all_sentences)).lower()
    sft_text = "\n".join("".join(qa_example(f)) for f in world.sft_train).lower()
    tok_text = "\n".join(tokenizer_texts(world, 0)).lower()
    for fact in _eval_facts(world, "fictitious"):
        assert fact.entity.lower() not in text and fact.entity.lower() not in sft_text
        assert fact.entity.lower() not in tok_text
    for fact in _eval_facts(world, "unseen_attribute"):
        rendered = {t.format(e=fact.entity, a=fact.answer) for t in TEMPLATES[fact.attribute]}
        assert not rendered & all_sentences
        assert qa_example(fact)[0] not in sft_text


def test_every_pretrained_fact_is_rendered_with_every_template(world, all_sentences):
    expected = {t.format(e=f.entity, a=f.answer) for f in world.pretrain for t in TEMPLATES[f.attribute]}
    assert all_sentences == expected


def test_fictitious_entities(world):
    facts = _eval_facts(world, "fictitious")
    real_names = {f.entity.lower() for f in real_facts(tuple(ATTRIBUTE_KIND))}
    assert all(f.fictitious and f.answer == ABSTAIN for f in facts)
    assert Counter(f.kind for f in facts) == {"element": N_FICTITIOUS // 2, "country": N_FICTITIOUS // 2}
    assert all(ATTRIBUTE_KIND[f.attribute] == f.kind for f in facts)
    assert len({f.entity for f in facts}) == N_FICTITIOUS and not {f.entity.lower() for f in facts} & real_names
    assert all(f.entity.isalpha() and 5 <= len(f.entity) <= 12 for f in facts)


def test_abstention_examples_use_other_fictitious_names(world):
    abstain = [f for f in world.sft_train if f.fictitious]
    evaluated = {f.entity.lower() for f in _eval_facts(world, "fictitious")}
    assert len(abstain) == N_ABSTAIN and all(f.answer == ABSTAIN for f in abstain)
    assert not any(a.entity.lower() in e or e in a.entity.lower() for a in abstain for e in evaluated)


@pytest.mark.parametrize("split", ["sft_known", "pretrain_only", "unseen_attribute"])
def test_real_answers_are_in_their_candidate_set(world, split):
    for fact in _eval_facts(world, split):
        candidates = world.candidate_answers(fact.attribute)
        assert fact.answer in candidates and ABSTAIN not in candidates
    assert len(set(candidates)) == len(candidates) and list(candidates) == sorted(candidates)


def test_candidate_sets(world):
    facts = real_facts()
    for attribute in DEFAULT_ATTRIBUTES:
        expected = tuple(sorted({f.answer for f in facts if f.attribute == attribute}))
        assert world.candidate_answers(attribute) == expected
    assert world.candidate_answers("region") == ("Africa", "Americas", "Asia", "Europe", "Oceania")
    assert world.candidate_answers("region", include_abstain=True)[-1] == ABSTAIN


def test_smaller_world_and_eval_cap():
    w = build_fact_world(2, pretrain_fraction=0.25, n_fictitious=20, max_eval_per_split=25)
    kinds = Counter(f.kind for f in {f.entity: f for f in w.pretrain}.values())
    assert kinds == {"element": round(0.25 * 118), "country": round(0.25 * 248)}
    assert all(len(w.split(s, p)) <= 25 for s in EVAL_SPLITS for p in PARTS)
    assert len(w.split("pretrain_only", "test")) == 25
    assert len(w.split("fictitious", "valid")) + len(w.split("fictitious", "test")) == 20


# --- rendering ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attribute", list(ATTRIBUTE_KIND))
def test_templates(attribute):
    templates, heldout = TEMPLATES[attribute], HELDOUT_TEMPLATES[attribute]
    assert len(set(templates)) == len(templates) >= 5 and len(set(heldout)) == len(heldout) >= 2
    assert not set(templates) & set(heldout)
    assert all(t.count("{e}") == 1 and t.count("{a}") == 1 for t in templates + heldout)
    assert QUESTIONS[attribute].count("{e}") == 1 and "{a}" not in QUESTIONS[attribute]


@pytest.mark.parametrize("paraphrases", [1, 4, 6], ids=["p1", "p4", "p6"])
def test_pretrain_sentences_count_and_documents(world, paraphrases):
    sentences = pretrain_sentences(world, 0, paraphrases=paraphrases)
    assert len(sentences) == sum(min(paraphrases, len(TEMPLATES[f.attribute])) for f in world.pretrain)
    assert len(set(sentences)) == len(sentences)  # distinct templates per fact
    docs = pretrain_text(world, 0, paraphrases=paraphrases, sentences_per_doc=8)
    assert len(docs) == -(-len(sentences) // 8) and " ".join(docs) == " ".join(sentences)


def test_heldout_sentences_use_unseen_wording(world, all_sentences):
    held = heldout_sentences(world, 0, max_sentences=300)
    assert len(held) == len(set(held)) == 300 and not set(held) & all_sentences
    pretrained = {(f.entity, f.answer) for f in world.pretrain}
    heldout_renderings = {t.format(e=e, a=a) for e, a in pretrained for ts in HELDOUT_TEMPLATES.values() for t in ts}
    assert set(held) <= heldout_renderings


def test_qa_format():
    fact = Fact("Peru", "capital", "Lima", "country")
    assert qa_prompt(fact) == "Q: What is the capital of Peru?\nA:"
    assert qa_example(fact) == ("Q: What is the capital of Peru?\nA:", " Lima\n")
    assert qa_example(Fact("Hydrogen", "discoverer", "Cavendish", "element"))[0] == "Q: Who discovered Hydrogen?\nA:"


@pytest.mark.parametrize(
    ("generated", "eos", "answer"),
    [(" Lima\nQ: What", None, "Lima"), (" Lima<|endoftext|>junk", "<|endoftext|>", "Lima"), ("  Costa Rica  ", None,
     "Costa Rica"), ("\nLima", None, "")],
    ids=["newline", "eos", "strip", "empty"],
)
def test_parse_answer(generated, eos, answer):
    assert parse_answer(generated, eos) == answer


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [({"sft_fraction": 1.5}, "sft_fraction"), ({"pretrain_fraction": 0.0}, "pretrain_fraction"),
     ({"unseen_attribute_fraction": 1.0}, "unseen_attribute_fraction"), ({"valid_fraction": 0.0}, "valid_fraction"),
     ({"n_fictitious": -1}, "n_fictitious"), ({"abstain_examples": -2}, "abstain_examples"),
     ({"attributes": ("capital", "colour")}, "attributes"), ({"attributes": ("capital", "capital")}, "attributes"),
     ({"max_eval_per_split": -1}, "max_eval_per_split")],
    ids=["sft", "pretrain", "unseen", "valid", "fictitious", "abstain", "unknown-attr", "dup-attr", "cap"],
)
def test_bad_options_name_the_parameter(kwargs, param):
    with pytest.raises(ConfigError, match=param):
        build_fact_world(0, **kwargs)


def test_config_builds_the_same_world(world):
    built = FactWorldConfig(n_fictitious=N_FICTITIOUS, abstain_examples=N_ABSTAIN).build()
    assert built.splits == world.splits and built.sft_train == world.sft_train
    with pytest.raises(ConfigError, match="split"):
        world.split("dev")
    with pytest.raises(ConfigError, match="attribute"):
        world.candidate_answers("period")
