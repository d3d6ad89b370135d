"""A saved VQ model through transformers' Auto classes (and without leanfit), and generate() honouring the
GenerationConfig: the O(K) path token for token against transformers' own generate on the materialised head,
sampling against transformers' processors' distribution, the fallback for settings without an O(K) form."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from scipy.stats import chisquare
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationConfig,
    GenerationMixin,
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    MinPLogitsWarper,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from leanfit.studies.models.tiny_llama import tiny_llama
from leanfit.vq_logits import generation
from leanfit.vq_logits.functional import ClusterTables, TokenOverrides, collapsed_argmax, kept_tokens
from leanfit.vq_logits.hf import MODEL_TYPE, REMOTE_CODE_FILE, from_pretrained, replace_lm_head

V, K, D = 300, 24, 32
FALLBACK = "no O(K) form"  # in the fallback's warning


def _vq_llama(tied: bool = False):
    model = tiny_llama(V, d_model=D, n_layers=2, n_heads=2, seed=0, tie_embeddings=tied).double().eval()
    model = replace_lm_head(model, K, mapping="equal_mass", counts=torch.ones(V))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # a peaked head that depends on the context (a fresh tiny model's is nearly uniform)
        model.get_output_embeddings().codebook.copy_(torch.randn(K, D, generator=g, dtype=torch.float64) * 0.6)
        model.get_output_embeddings().bias.copy_(torch.randn(V, generator=g, dtype=torch.float64) * 0.5)
    return model


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return _vq_llama()


def _prompts():
    """Three prompts of 7 tokens, the first left-padded (pad id 1) to 4 tokens."""
    ids = torch.randint(2, V, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 1, 0
    return ids, mask


def _reference(model, **kwargs):
    """transformers' own generate on the materialised logits of the VQ head."""
    return GenerationMixin.generate(model, **kwargs)


# --- Auto classes ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_auto_classes_load_the_vq_model(tied, tmp_path):
    model = _vq_llama(tied)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == MODEL_TYPE and saved["vq_logits"]["base_model_type"] == "llama"
    assert saved["auto_map"] == {"AutoConfig": "leanfit_vq_logits.VQLogitsConfig",
                                 "AutoModelForCausalLM": "leanfit_vq_logits.VQLogitsLlamaForCausalLM"}
    assert "vq_causal_lm_class('llama')" in (tmp_path / REMOTE_CODE_FILE).read_text()
    assert type(AutoConfig.from_pretrained(tmp_path)) is type(model.config)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert type(loaded) is type(model)
    ids, mask = _prompts()
    assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, model(input_ids=ids, attention_mask=mask).logits)
    assert torch.equal(loaded.get_output_embeddings().mapping, model.get_output_embeddings().mapping)
    assert torch.equal(loaded.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False),
                       model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False))


def test_folders_saved_before_the_auto_registration_still_load(tmp_path):
    """The earlier format (the base's model_type, no auto_map, no base_model_type, no module file) loads with
    leanfit's from_pretrained, and saving it again writes the current format."""
    model = _vq_llama()
    model.save_pretrained(tmp_path / "old")
    saved = json.loads((tmp_path / "old" / "config.json").read_text())
    saved["model_type"] = "llama"
    del saved["auto_map"], saved["vq_logits"]["base_model_type"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(saved))
    (tmp_path / "old" / REMOTE_CODE_FILE).unlink()
    ids, mask = _prompts()
    expected = model(input_ids=ids, attention_mask=mask).logits
    loaded = from_pretrained(tmp_path / "old", dtype=torch.float64).eval()
    assert type(loaded) is type(model)
    assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, expected)
    loaded.save_pretrained(tmp_path / "new")
    assert json.loads((tmp_path / "new" / "config.json").read_text())["model_type"] == MODEL_TYPE
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "new", dtype=torch.float64).eval()
    assert torch.equal(again(input_ids=ids, attention_mask=mask).logits, expected)


_WITHOUT_LEANFIT = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM
    folder, ids, expected = sys.argv[1], *torch.load(sys.argv[2])
    out = {"leanfit imported at start": "leanfit" in sys.modules}
    def attempt(name, **kwargs):
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64, **kwargs).eval()
            out[name] = {"class": type(model).__name__, "logits equal": torch.equal(model(input_ids=ids).logits, expected)}
        except Exception as error:
            out[name] = {"error": type(error).__name__, "message": str(error)}
    attempt("plain-auto")
    sys.modules["leanfit"] = None  # as if leanfit were not installed
    attempt("trust-remote-code-without-leanfit", trust_remote_code=True)
    del sys.modules["leanfit"]
    attempt("trust-remote-code", trust_remote_code=True)
    with open(sys.argv[3], "w") as f:  # not stdout: transformers' trust prompt writes there
        json.dump(out, f)
""")


@pytest.fixture(scope="module")
def without_leanfit(tmp_path_factory):
    """One fresh interpreter that never imported leanfit loads a saved folder three ways."""
    folder = tmp_path_factory.mktemp("vq-saved")
    model = _vq_llama()
    model.save_pretrained(folder)
    ids = _prompts()[0][1:]
    torch.save((ids, model(input_ids=ids).logits.detach()), folder / "expected.pt")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path_factory.mktemp("hf-modules")), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _WITHOUT_LEANFIT, str(folder), str(folder / "expected.pt"),
                           str(folder / "out.json")], capture_output=True, text=True, env=env,
                          stdin=subprocess.DEVNULL, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads((folder / "out.json").read_text())
    assert out.pop("leanfit imported at start") is False
    return out


@pytest.mark.parametrize(("case", "expected"), [
    pytest.param("plain-auto", {"error": "ValueError", "message": "trust_remote_code=True"}, id="plain-auto"),
    pytest.param("trust-remote-code-without-leanfit",
                 {"error": "ImportError", "message": "leanfit.vq_logits.from_pretrained"},
                 id="trust-remote-code-without-leanfit"),
    pytest.param("trust-remote-code", {"class": "VQLogitsLlamaForCausalLM", "logits equal": True},
                 id="trust-remote-code"),
])
def test_loading_without_leanfit_imported_never_gives_a_random_head(without_leanfit, case, expected):
    got = without_leanfit[case]
    if "message" in expected:
        assert got["error"] == expected["error"] and expected["message"] in got["message"], got
    else:
        assert got == expected


# --- generate(): the O(K) path against transformers' generate ----------------------------------------------------

def _greedy_cases(g: list[list[int]]) -> dict[str, dict]:
    """Settings in terms of the plain greedy continuation ``g`` (3 rows of 12 tokens), so each one bites."""
    return {
        "no-repeat-ngram-1": {"no_repeat_ngram_size": 1},
        "no-repeat-ngram-2": {"no_repeat_ngram_size": 2},
        "no-repeat-ngram-3": {"no_repeat_ngram_size": 3},
        "min-new-tokens": {"min_new_tokens": 12, "eos_token_id": g[1][0]},
        "min-length": {"min_length": 16, "eos_token_id": g[1][0]},
        "suppress-tokens": {"suppress_tokens": sorted({g[0][0], g[1][0], g[2][0], g[0][1]})},
        "begin-suppress-tokens": {"begin_suppress_tokens": [g[0][0], g[1][0], g[2][0]]},
        "bad-words": {"bad_words_ids": [[g[0][0]], [g[1][0], g[1][1]], [g[2][1], g[2][2], g[2][3]]]},
        "bad-word-equal-to-eos-kept": {"bad_words_ids": [[g[1][0]], [g[2][0]]], "eos_token_id": g[1][0]},
        "sequence-bias": {"sequence_bias": [[[g[0][0]], -5.0], [[g[1][0], g[1][1]], -3.0], [[g[2][0], 7], 9.0],
                                            [[5], 2.5]]},
        "repetition-penalty-1.3": {"repetition_penalty": 1.3},
        "repetition-penalty-0.7": {"repetition_penalty": 0.7},
        "everything": {"repetition_penalty": 1.2, "no_repeat_ngram_size": 2, "min_new_tokens": 5,
                       "eos_token_id": g[1][0], "suppress_tokens": [g[0][0]], "bad_words_ids": [[g[2][0]], [9, 10]],
                       "sequence_bias": [[[g[0][1], g[0][2]], -2.0]]},
    }


GREEDY_IDS = list(_greedy_cases([[0] * 12] * 3))


@pytest.fixture(scope="module")
def plain_greedy(model):
    ids, mask = _prompts()
    return _reference(model, input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)


@pytest.mark.parametrize("case", GREEDY_IDS)
def test_greedy_processors_give_transformers_tokens(model, plain_greedy, case, recwarn):
    ids, mask = _prompts()
    settings = _greedy_cases(plain_greedy[:, 7:].tolist())[case]
    fast = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, **settings)
    assert not [w for w in recwarn if FALLBACK in str(w.message)], "left the O(K) path"
    expected = _reference(model, input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, **settings)
    assert torch.equal(fast, expected), (fast[:, 7:].tolist(), expected[:, 7:].tolist())
    n = min(fast.shape[1], plain_greedy.shape[1])
    assert not torch.equal(fast[:, :n], plain_greedy[:, :n]), "the setting changed nothing"


def _vq_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=V, n_embd=D, n_layer=2, n_head=2, n_positions=64, bos_token_id=0,
                        eos_token_id=0, pad_token_id=1)
    model = replace_lm_head(GPT2LMHeadModel(config).double().eval(), K, mapping="equal_mass", counts=torch.ones(V))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        model.get_output_embeddings().codebook.copy_(torch.randn(K, D, generator=g, dtype=torch.float64))
        model.get_output_embeddings().bias.copy_(torch.randn(V, generator=g, dtype=torch.float64) * 0.5)
    return model


@pytest.mark.parametrize("settings", [
    pytest.param({}, id="plain"),
    pytest.param({"no_repeat_ngram_size": 2, "repetition_penalty": 1.4, "min_new_tokens": 10, "eos_token_id": 5,
                  "suppress_tokens": [7, 8], "bad_words_ids": [[9], [10, 11]]}, id="processors"),
])
def test_gpt2_left_padded_rows_decode_as_unpadded(settings, recwarn):
    """Absolute positions: the padded row equals its prompt decoded alone, on both paths (transformers' needs the
    VQ forward to name position_ids, as the base's does)."""
    model = _vq_gpt2()
    ids, mask = _prompts()
    fast = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, **settings)
    assert not [w for w in recwarn if FALLBACK in str(w.message)]
    expected = _reference(model, input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, **settings)
    assert torch.equal(fast, expected)
    alone = _reference(model, input_ids=ids[:1, 3:], max_new_tokens=10, do_sample=False, **settings)
    assert torch.equal(fast[0, 3:], alone[0])


def _repeats(row: list[int]) -> int:
    return len(row) - len(set(row))


@pytest.mark.parametrize("route", ["model.generation_config", "generation_config-argument"])
def test_reported_settings_reach_the_fast_path(model, plain_greedy, route, recwarn):
    """The user's report: no_repeat_ngram_size=1 gave 11 repeats in 12 tokens, min_new_tokens=12 stopped after 1."""
    ids, mask = _prompts()
    eos = int(plain_greedy[1, 7])  # row 1 would end at its first token
    settings = {"no_repeat_ngram_size": 1, "min_new_tokens": 12, "eos_token_id": eos, "max_new_tokens": 12}
    if route == "model.generation_config":
        saved = model.generation_config
        model.generation_config = GenerationConfig(**{**saved.to_dict(), **settings})
        try:
            fast = model.generate(ids, attention_mask=mask)
        finally:
            model.generation_config = saved
    else:
        fast = model.generate(ids, attention_mask=mask, generation_config=GenerationConfig(**settings))
    assert not [w for w in recwarn if FALLBACK in str(w.message)]
    expected = _reference(model, input_ids=ids, attention_mask=mask, generation_config=GenerationConfig(**settings))
    assert torch.equal(fast, expected)
    assert fast.shape == (3, 19) and eos not in fast[:, 7:].tolist()
    assert [_repeats(r) for r in fast[:, 3:].tolist()] == [_repeats(r) for r in ids[:, 3:].tolist()]
    assert _repeats(plain_greedy[1, 7:].tolist()) >= 5  # what the setting prevents


def _warped(scores: torch.Tensor, processors: list) -> torch.Tensor:
    return torch.softmax(LogitsProcessorList(processors)(STEP_PROMPT.expand(scores.shape[0], -1), scores), dim=-1)


STEP_PROMPT = torch.tensor([[5, 9, 5, 9, 17, 5]])  # "5 9" seen: no_repeat_ngram_size=2 bans 9 after the final 5


def _sampling_cases(top: list[int]) -> dict[str, tuple[dict, list]]:
    """(generate settings, the same as transformers' processors) in terms of the prompt's most likely tokens."""
    return {
        "defaults-top-k-50": ({}, [TopKLogitsWarper(50)]),
        "temperature-top-p": ({"temperature": 0.7, "top_p": 0.8, "top_k": 0},
                              [TemperatureLogitsWarper(0.7), TopPLogitsWarper(0.8)]),
        "min-p": ({"min_p": 0.2, "top_k": 0}, [MinPLogitsWarper(0.2)]),
        "penalty-no-repeat-top-k": ({"repetition_penalty": 1.5, "no_repeat_ngram_size": 2, "top_k": 20},
                                    [RepetitionPenaltyLogitsProcessor(1.5), NoRepeatNGramLogitsProcessor(2),
                                     TopKLogitsWarper(20)]),
        "bans-min-length-top-p": (
            {"suppress_tokens": [top[0]], "bad_words_ids": [[5, top[1]], [top[2]]], "min_new_tokens": 2,
             "eos_token_id": top[3], "top_p": 0.9, "top_k": 0},
            [NoBadWordsLogitsProcessor([[5, top[1]], [top[2]]], top[3]), MinLengthLogitsProcessor(8, top[3]),
             SuppressTokensLogitsProcessor([top[0]]), TopPLogitsWarper(0.9)]),
    }


@pytest.mark.parametrize("case", list(_sampling_cases([0, 1, 2, 3])))
def test_sampled_step_has_transformers_distribution(model, case, recwarn):
    """4,000 rows of one prompt, one sampled token each: never a token transformers' processors drop, and the
    frequencies of their distribution (chi-square over bins with >= 5 expected draws)."""
    draws = 4_000
    logits = model(input_ids=STEP_PROMPT).logits[:, -1].detach()
    settings, processors = _sampling_cases(logits[0].topk(4).indices.tolist())[case]
    probs = _warped(logits, processors)[0]
    got = model.generate(STEP_PROMPT.expand(draws, -1), max_new_tokens=1, do_sample=True,
                         generator=torch.Generator().manual_seed(0), **settings)[:, -1]
    assert not [w for w in recwarn if FALLBACK in str(w.message)]
    counts = torch.bincount(got, minlength=V).double()
    assert counts[probs == 0].sum() == 0, "drew a token the processors drop"
    assert (probs > 0).sum() < V, "the case drops nothing"
    big = probs * draws >= 5
    observed = torch.cat([counts[big], counts[~big].sum(0, keepdim=True)])
    expected = torch.cat([probs[big], probs[~big].sum(0, keepdim=True)]) * draws
    keep = expected > 0
    assert chisquare(observed[keep].numpy(), expected[keep].numpy()).pvalue > 1e-3


def test_sampling_keeps_every_ban_at_every_step(model, recwarn):
    """64 sampled rows of 12 tokens: no suppressed token, no repeated token (the prompt's included), no EOS."""
    ids = torch.randint(2, V, (64, 5), generator=torch.Generator().manual_seed(3))
    suppressed = [7, 8, 9]
    settings = {"do_sample": True, "top_k": 0, "temperature": 1.5, "no_repeat_ngram_size": 1, "suppress_tokens":
                suppressed, "min_new_tokens": 12, "eos_token_id": 11, "max_new_tokens": 12}
    out = model.generate(ids, generator=torch.Generator().manual_seed(0), **settings)
    assert not [w for w in recwarn if FALLBACK in str(w.message)]
    new = out[:, 5:]
    assert new.shape == (64, 12)
    assert int(torch.isin(new, torch.tensor([*suppressed, 11])).sum()) == 0
    assert [_repeats(row) for row in out.tolist()] == [_repeats(row) for row in ids.tolist()]
    again = model.generate(ids, generator=torch.Generator().manual_seed(0), **settings)
    assert torch.equal(out, again)


# --- the fallback ------------------------------------------------------------------------------------------------

def _forbid_token_2(input_ids, scores):
    return scores.index_fill(1, torch.tensor([2]), -math.inf)


FALLBACK_CASES = {
    "typical-p": ({"do_sample": True, "typical_p": 0.8}, "typical_p"),
    "epsilon-cutoff": ({"do_sample": True, "epsilon_cutoff": 0.01}, "epsilon_cutoff"),
    "num-beams": ({"num_beams": 2}, "num_beams"),
    "forced-eos": ({"forced_eos_token_id": 4}, "forced_eos_token_id"),
    "logits-processor-argument": ({"logits_processor": LogitsProcessorList([_forbid_token_2])}, "logits_processor"),
}


@pytest.mark.parametrize("case", list(FALLBACK_CASES))
def test_settings_without_an_O_K_form_fall_back_to_transformers_once_noted(model, case, monkeypatch):
    monkeypatch.setattr(generation, "_NOTED", set())
    settings, name = FALLBACK_CASES[case]
    ids, mask = _prompts()
    with pytest.warns(UserWarning, match=re.escape(FALLBACK)) as noted:
        torch.manual_seed(0)
        got = model.generate(ids, attention_mask=mask, max_new_tokens=6, **settings)
    assert [name in str(w.message) for w in noted if FALLBACK in str(w.message)] == [True]
    torch.manual_seed(0)
    expected = _reference(model, input_ids=ids, attention_mask=mask, max_new_tokens=6, **settings)
    assert torch.equal(got, expected)
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        model.generate(ids, attention_mask=mask, max_new_tokens=2, **settings)
    assert not [w for w in again if FALLBACK in str(w.message)], "noted twice"


# --- the collapsed sampler with per-row overrides, exactly ----------------------------------------------------

OVERRIDE_CASES = {
    "plain": {},
    "temperature-top-k": {"temperature": 0.7, "top_k": 5},
    "top-k-1": {"top_k": 1},
    "top-p": {"top_p": 0.8},
    "top-k-top-p": {"temperature": 1.3, "top_k": 20, "top_p": 0.6},
    "min-p": {"min_p": 0.1},
    "everything": {"temperature": 0.5, "top_k": 7, "top_p": 0.9, "min_p": 0.05},
}


def _override_problem(seed: int):
    """Code logits, tables with banned tokens (one whole cluster), and overrides that replace each row's three
    most likely tokens and seven more (a quarter of them banned)."""
    n, k, v, e = 20, 9, 120, 12
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=g, dtype=torch.float64) * 2
    mapping = torch.randint(0, k, (v,), generator=g)
    bias = torch.randn(v, generator=g, dtype=torch.float64)
    bias = torch.where((torch.rand(v, generator=g) < 0.1) | (mapping == 0), -math.inf, bias)
    dense = z[:, mapping] + bias
    tokens = torch.full((n, e), -1)
    for i in range(n):
        top = dense[i].topk(3).indices.tolist()
        rest = [t for t in torch.randperm(v, generator=g).tolist() if t not in top][: e - 5]
        tokens[i, : e - 2] = torch.tensor(top + rest)
    values = torch.randn(n, e, generator=g, dtype=torch.float64) * 2
    values[:, ::4] = -math.inf
    overridden = dense.clone()
    rows = torch.arange(n)[:, None].expand(n, e)
    used = tokens >= 0
    overridden[rows[used], tokens[used]] = values[used]
    return z, ClusterTables.build(mapping, k, bias), TokenOverrides(tokens, values), overridden


def _processors(settings: dict) -> list:
    out = []
    if settings.get("temperature", 1.0) != 1.0:
        out.append(TemperatureLogitsWarper(settings["temperature"]))
    if settings.get("top_k"):
        out.append(TopKLogitsWarper(settings["top_k"]))
    if settings.get("top_p") is not None:
        out.append(TopPLogitsWarper(settings["top_p"]))
    if settings.get("min_p") is not None:
        out.append(MinPLogitsWarper(settings["min_p"]))
    return out


@pytest.mark.parametrize("seed", [0, 1], ids=["seed-0", "seed-1"])
@pytest.mark.parametrize("case", list(OVERRIDE_CASES))
def test_kept_tokens_with_overrides_equal_transformers_warpers(case, seed):
    """The kept set token for token and its probabilities, from the collapsed counts and masses."""
    z, tables, overrides, overridden = _override_problem(seed)
    settings = OVERRIDE_CASES[case]
    scores = LogitsProcessorList(_processors(settings))(torch.zeros(z.shape[0], 1, dtype=torch.long), overridden)
    expected = torch.softmax(scores, dim=-1)
    counts, log_w, override_log_w = kept_tokens(z, tables, overrides=overrides, **settings)
    assert override_log_w is not None
    mapping = tables.segment[tables.position]  # each token's cluster
    regular = tables.position < (tables.offsets[mapping] + counts[:, mapping])  # inside its cluster's kept prefix
    rows = torch.arange(z.shape[0])[:, None].expand_as(overrides.tokens)
    used = overrides.tokens >= 0
    regular[rows[used], overrides.tokens[used]] = False
    log_p = torch.where(regular, (z[:, mapping] + tables.sorted_bias[tables.position]) / settings.get("temperature", 1),
                        -math.inf)
    log_p[rows[used], overrides.tokens[used]] = override_log_w[used]
    got = torch.softmax(log_p, dim=-1)
    assert torch.equal(got > 0, expected > 0)
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-14)
    cluster_mass = torch.zeros_like(log_w).index_add(1, mapping, torch.where(regular, got, 0.0))
    assert torch.allclose(torch.softmax(torch.cat([log_w, override_log_w], 1), -1)[:, : log_w.shape[1]], cluster_mass,
                          rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("seed", [0, 1, 2], ids=["seed-0", "seed-1", "seed-2"])
def test_argmax_with_overrides_equals_argmax_of_the_overridden_logits(seed):
    z, tables, overrides, overridden = _override_problem(seed)
    identity = torch.eye(z.shape[1], dtype=torch.float64)  # hidden @ I^T = z exactly
    assert torch.equal(collapsed_argmax(z, identity, tables, overrides=overrides), overridden.argmax(-1))


def test_processors_on_a_residual_head_fall_back(monkeypatch):
    """A within-cluster residual makes decoding O(V r) anyway: its processors run in transformers."""
    monkeypatch.setattr(generation, "_NOTED", set())
    model = tiny_llama(V, d_model=D, n_layers=2, n_heads=2, seed=0).double().eval()
    model = replace_lm_head(model, K, mapping="equal_mass", counts=torch.ones(V), residual_rank=2)
    ids, mask = _prompts()
    settings = {"max_new_tokens": 6, "do_sample": False, "no_repeat_ngram_size": 1}
    with pytest.warns(UserWarning, match=re.escape(FALLBACK)):
        got = model.generate(ids, attention_mask=mask, **settings)
    expected = _reference(model, input_ids=ids, attention_mask=mask, **settings)
    assert torch.equal(got, expected)
    assert [_repeats(row) for row in got[:, 3:].tolist()] == [_repeats(row) for row in ids[:, 3:].tolist()]


@pytest.mark.parametrize(("tokens", "values", "error", "fragment"), [
    pytest.param(torch.tensor([[3, 120]]), torch.zeros(1, 2, dtype=torch.float64), ValueError,
                 "overrides.tokens holds ids outside [0, 120)", id="token-out-of-range"),
    pytest.param(torch.tensor([[3, 3]]), torch.zeros(1, 2, dtype=torch.float64), ValueError,
                 "names a token twice in one row", id="token-twice"),
    pytest.param(torch.tensor([[3, 4]]), torch.zeros(1, 3, dtype=torch.float64), ValueError,
                 "overrides.values=tensor(shape=(1, 3)", id="values-shape"),
    pytest.param(torch.tensor([[3.0, 4.0]]), torch.zeros(1, 2, dtype=torch.float64), TypeError,
                 "overrides.tokens=tensor(shape=(1, 2), dtype=torch.float32)", id="tokens-float"),
])
def test_overrides_reject_bad_input(tokens, values, error, fragment):
    z, tables, _, _ = _override_problem(0)
    with pytest.raises(error) as raised:
        kept_tokens(z[:1], tables, overrides=TokenOverrides(tokens, values))
    assert fragment in str(raised.value), str(raised.value)
