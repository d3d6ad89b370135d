"""IAPTModel on tiny Llama, Qwen2, GPT-2 and BERT backbones built locally: slot layout, output stripping, left
padding, mixed-tenant batches (forward, gradients, generate), save/load, no leakage from response tokens, greedy
generate with the KV cache against full forwards, cached prompts, training, and the errors users can cause."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from leanfit.core.errors import ConfigError
from leanfit.iapt.config import PEFT_TYPE, IAPTConfig
from leanfit.iapt.generator import iapt_parameter_count
from leanfit.iapt.model import CONFIG_NAME, WEIGHTS_NAME, IAPTModel, get_iapt_model
from leanfit.studies.models.tiny_llama import tiny_llama
from tests.reference import greedy_reference
from tests.tolerances import assert_close

V, D, L = 48, 32, 2
BOS, PAD = 0, 1


def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


def llama(seed: int = 0, hidden: int = D, layers: int = L) -> nn.Module:
    model = tiny_llama(V, d_model=hidden, n_layers=layers, n_heads=4, seed=seed).eval()
    model.generation_config.eos_token_id = None  # decode the full length; tiny_llama's EOS is token 0
    return model


def qwen2(seed: int = 0) -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=L, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, bos_token_id=BOS, eos_token_id=None,
                      pad_token_id=PAD, tie_word_embeddings=False)
    return _seeded(seed, lambda: Qwen2ForCausalLM(cfg))


def gpt2(seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=V, n_embd=D, n_layer=L, n_head=4, n_positions=64, bos_token_id=BOS, eos_token_id=None,
                     pad_token_id=PAD, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return _seeded(seed, lambda: GPT2LMHeadModel(cfg))


def _bert_config(**kw: object) -> object:
    from transformers import BertConfig

    return BertConfig(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=4, intermediate_size=64,
                      max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                      pad_token_id=PAD, **kw)


def bert_cls(seed: int = 0) -> nn.Module:
    from transformers import AutoModelForSequenceClassification

    return _seeded(seed, lambda: AutoModelForSequenceClassification.from_config(_bert_config(num_labels=3)))


def bert(seed: int = 0) -> nn.Module:
    from transformers import BertModel

    return _seeded(seed, lambda: BertModel(_bert_config()))


BACKBONES = {"llama": llama, "qwen2": qwen2, "gpt2": gpt2, "bert-cls": bert_cls, "bert": bert}
LAYER_PATHS = {"llama": "model.layers", "qwen2": "model.layers", "gpt2": "transformer.h",
               "bert-cls": "bert.encoder.layer", "bert": "encoder.layer"}
DECODERS = ["llama", "qwen2", "gpt2"]


def cfg(**kw: object) -> IAPTConfig:
    return IAPTConfig(**{"bottleneck": 8, "init_scale": 0.5, **kw})


def wrapped(kind: str, seed: int = 0, adapters: tuple[str, ...] = ("a", "b"), **kw: object) -> IAPTModel:
    """Backbone ``kind`` with adapters initialised from seeds 10, 11, ... (non-zero up-projections)."""
    model = None
    for i, name in enumerate(adapters):
        torch.manual_seed(10 + i)
        if model is None:
            model = get_iapt_model(BACKBONES[kind](seed), cfg(**kw), adapter_name=name)
        else:
            model.add_adapter(name, cfg(**kw))
    return model


def tokens(b: int = 4, t: int = 9, seed: int = 3) -> torch.Tensor:
    ids = torch.randint(2, V, (b, t), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = BOS
    return ids


def prefix_mask(b: int, t: int, n: int) -> torch.Tensor:
    mask = torch.zeros(b, t, dtype=torch.bool)
    mask[:, :n] = True
    return mask


def main_output(out: object) -> torch.Tensor:
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ------------------------------------------------------------------------------------------------ wiring
@pytest.mark.parametrize("kind", list(BACKBONES))
def test_layers_found_backbone_frozen_and_generators_trainable(kind: str) -> None:
    model = wrapped(kind)
    assert model.layers_path == LAYER_PATHS[kind] and model.num_layers == L and len(model._hooks) == L
    assert not any(p.requires_grad for p in model.base_model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 2 * iapt_parameter_count(D, L, cfg())
    assert model.peft_config["a"].hidden_size == D and model.peft_config["a"].num_layers == L


@pytest.mark.parametrize("kind", list(BACKBONES))
def test_outputs_have_the_input_shape(kind: str) -> None:
    model = wrapped(kind)
    ids = tokens(3, 7)
    out = model(ids, output_hidden_states=True)
    expected = {"bert-cls": (3, 3), "bert": (3, 7, D)}.get(kind, (3, 7, V))
    assert tuple(main_output(out).shape) == expected
    assert all(tuple(h.shape) == (3, 7, D) for h in out.hidden_states) and len(out.hidden_states) == L + 1
    # the soft tokens are stripped: the kept embedding outputs are the bare backbone's (all of them with rotary
    # positions; with GPT-2's and BERT's absolute positions the tokens after the slot sit at other positions, so
    # only the token before it), and the last layer differs from the bare one by the prompts' effect
    bare = BACKBONES[kind](0)(ids, output_hidden_states=True).hidden_states
    kept = slice(None) if kind in ("llama", "qwen2") else slice(0, 1)
    assert_close(out.hidden_states[0][:, kept], bare[0][:, kept])
    assert max_diff(out.hidden_states[-1], bare[-1]) > 1e-4


def test_slot_layout_with_left_padding() -> None:
    model = wrapped("llama", num_soft_tokens=2)
    ids = torch.tensor([[PAD, PAD, 5, 6, 7], [3, 8, 9, 10, 11]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    batch = model.expand_inputs(ids, mask)
    assert batch.input_ids.tolist() == [[PAD, PAD, 5, 5, 5, 6, 7], [3, 3, 3, 8, 9, 10, 11]]
    assert batch.attention_mask.tolist() == [[0, 0, 1, 1, 1, 1, 1], [1] * 7]
    assert batch.position_ids.tolist() == [[0, 0, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6]]
    assert batch.instruction_mask.tolist() == [[False, False, True, False, False, True, True],
                                               [True, False, False, True, True, True, True]]
    assert batch.slot_index.tolist() == [[3, 4], [1, 2]]
    assert batch.keep_index.tolist() == [[0, 1, 2, 5, 6], [0, 3, 4, 5, 6]]
    start = wrapped("llama", num_soft_tokens=2, slot_position="start").expand_inputs(ids, mask)
    assert start.input_ids.tolist() == [[PAD, PAD, 5, 5, 5, 6, 7], [3, 3, 3, 8, 9, 10, 11]]
    assert start.slot_index.tolist() == [[2, 3], [0, 1]]
    assert start.keep_index.tolist() == [[0, 1, 4, 5, 6], [2, 3, 4, 5, 6]]


@pytest.mark.parametrize("kind", DECODERS)
def test_tokens_before_the_slot_see_the_plain_backbone(kind: str) -> None:
    """The first token precedes the soft tokens: its logits equal the bare backbone's; later ones do not."""
    model = wrapped(kind)
    ids = tokens(2, 6)
    with torch.no_grad():
        ours = model(ids).logits
        plain = BACKBONES[kind](0)(ids).logits
    assert max_diff(ours[:, 0], plain[:, 0]) <= 1e-6
    assert max_diff(ours[:, 1:], plain[:, 1:]) > 1e-3


@pytest.mark.parametrize("kind", DECODERS)
def test_left_padding_equals_unpadded_rows(kind: str) -> None:
    model = wrapped(kind)
    long, short = tokens(1, 8, seed=4), tokens(1, 5, seed=5)
    ids = torch.cat([long, torch.cat([torch.full((1, 3), PAD), short], 1)])
    mask = torch.tensor([[1] * 8, [0, 0, 0] + [1] * 5])
    names = ["a", "b"]
    with torch.no_grad():
        both = model(ids, attention_mask=mask, adapter_names=names).logits
        alone_long = model(long, adapter_names=["a"]).logits
        alone_short = model(short, adapter_names=["b"]).logits
    assert max_diff(both[0], alone_long[0]) <= 1e-5
    assert max_diff(both[1, 3:], alone_short[0]) <= 1e-5


# ------------------------------------------------------------------------------------------------ mixed tenants
@pytest.mark.parametrize("kind", list(BACKBONES))
def test_mixed_batch_equals_each_row_alone(kind: str) -> None:
    model = wrapped(kind)
    ids, names = tokens(4, 9), ["a", "b", "b", "a"]
    instruction = prefix_mask(4, 9, 6)
    with torch.no_grad():
        mixed = main_output(model(ids, instruction_mask=instruction, adapter_names=names))
        rows = [main_output(model(ids[i : i + 1], instruction_mask=instruction[i : i + 1], adapter_names=[n]))
                for i, n in enumerate(names)]
        all_a = main_output(model(ids, instruction_mask=instruction, adapter_names=["a"] * 4))
        all_b = main_output(model(ids, instruction_mask=instruction))  # active adapter "a"
    assert max_diff(mixed, torch.cat(rows)) <= 1e-5
    assert max_diff(all_a, all_b) == 0.0
    model.set_adapter("b")
    with torch.no_grad():
        assert max_diff(main_output(model(ids, instruction_mask=instruction)), all_a) > 1e-4  # adapters differ


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert-cls"])
def test_mixed_batch_gradients_equal_rows_alone(kind: str) -> None:
    """Train mode: one backward through a mixed batch gives each adapter the gradients of its own rows."""
    model = wrapped(kind).train()
    ids, names = tokens(4, 9), ["b", "a", "a", "b"]
    instruction = prefix_mask(4, 9, 6)
    weights = torch.randn(main_output(model(ids[:1], instruction_mask=instruction[:1])).shape[1:],
                          generator=torch.Generator().manual_seed(0))

    def grads(rows: list[int]) -> dict[str, torch.Tensor]:
        model.zero_grad()
        for i in rows:  # rows alone, gradients accumulated
            out = main_output(model(ids[i : i + 1], instruction_mask=instruction[i : i + 1], adapter_names=[names[i]]))
            (out * weights).sum().backward()
        return {n: p.grad.clone() for n, p in model.iapt.named_parameters()}

    alone = grads([0, 1, 2, 3])
    model.zero_grad()
    mixed_out = main_output(model(ids, instruction_mask=instruction, adapter_names=names))
    (mixed_out * weights).sum().backward()
    mixed = {n: p.grad for n, p in model.iapt.named_parameters()}
    assert set(mixed) == set(alone) and all(alone[n].abs().max() > 0 for n in ("a.1.up.weight", "b.1.up.weight"))
    worst = max(mixed, key=lambda n: max_diff(mixed[n], alone[n]))
    assert max_diff(mixed[worst], alone[worst]) <= 1e-5, worst


# ------------------------------------------------------------------------------------------------ save / load
@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert-cls"])
def test_save_load_round_trip(kind: str, tmp_path: Path) -> None:
    model = wrapped(kind, adapters=("a", "b", "c"))
    ids, names = tokens(3, 8), ["c", "a", "b"]
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "b" / CONFIG_NAME).read_text())
    assert saved["peft_type"] == PEFT_TYPE and saved["hidden_size"] == D and saved["num_layers"] == L
    from safetensors.torch import load_file

    keys = sorted(load_file(tmp_path / "b" / WEIGHTS_NAME))
    assert keys == sorted(f"iapt.{k}" for k in model.iapt["b"].state_dict()) and "iapt.1.act.numerator" in keys
    loaded = IAPTModel.from_pretrained(BACKBONES[kind](0), tmp_path)
    assert loaded.adapter_names == ["a", "b", "c"] and loaded.active_adapter == "a"
    assert loaded.peft_config == model.peft_config
    only_b = IAPTModel.from_pretrained(BACKBONES[kind](0), tmp_path, adapter_name="b")
    assert only_b.adapter_names == ["b"] and only_b.active_adapter == "b"
    with torch.no_grad():
        expected = main_output(model(ids, adapter_names=names))
        assert torch.equal(main_output(loaded(ids, adapter_names=names)), expected)
        assert torch.equal(main_output(only_b(ids)), main_output(model(ids, adapter_names=["b"] * 3)))


def test_load_adapter_from_its_own_folder_and_resave(tmp_path: Path) -> None:
    model = wrapped("llama", adapters=("a", "b"))
    model.save_pretrained(tmp_path / "first")
    model.save_pretrained(tmp_path / "first", adapter_names=["a"])  # atomic replace of one subfolder
    other = wrapped("llama", adapters=("z",))
    other.load_adapter(tmp_path / "first" / "b")
    ids = tokens(2, 6)
    with torch.no_grad():
        assert torch.equal(other(ids, adapter_names=["b", "b"]).logits, model(ids, adapter_names=["b", "b"]).logits)
    assert sorted(p.name for p in (tmp_path / "first").iterdir()) == ["a", "b"]


@pytest.mark.parametrize(
    "make_base, match",
    [
        pytest.param(lambda: llama(hidden=48), "hidden_size=32", id="hidden-size"),
        pytest.param(lambda: llama(layers=3), "num_layers=2", id="num-layers"),
    ],
)
def test_load_onto_another_backbone_fails(tmp_path: Path, make_base: Callable, match: str) -> None:
    wrapped("llama").save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=match) as info:
        IAPTModel.from_pretrained(make_base(), tmp_path)
    assert "load it onto that one" in str(info.value)


def test_base_model_id_is_checked(tmp_path: Path) -> None:
    base = llama()
    base.config._name_or_path = "org/tiny-a"
    model = get_iapt_model(base, cfg())
    assert model.peft_config["default"].base_model_name_or_path == "org/tiny-a"
    model.save_pretrained(tmp_path)
    other = llama()
    other.config._name_or_path = "org/tiny-b"
    with pytest.raises(ConfigError, match="base_model_name_or_path='org/tiny-a'.*check_base_model=False"):
        IAPTModel.from_pretrained(other, tmp_path)
    loaded = IAPTModel.from_pretrained(other, tmp_path, check_base_model=False)
    assert loaded.adapter_names == ["default"]


def test_load_errors(tmp_path: Path) -> None:
    wrapped("llama").save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"adapter folder named 'zz' \(found: \['a', 'b'\]\)"):
        IAPTModel.from_pretrained(llama(), tmp_path, adapter_name="zz")
    config = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    (tmp_path / "a" / CONFIG_NAME).write_text(json.dumps({**config, "peft_type": "LORA"}))
    with pytest.raises(ConfigError, match="peft_type='LORA'"):
        IAPTModel.from_pretrained(llama(), tmp_path, adapter_name="a")
    (tmp_path / "b" / CONFIG_NAME).write_text(json.dumps({**config, "layers": [0]}))
    with pytest.raises(ConfigError, match=r"missing \[\], unexpected \['1.act.denominator'"):
        IAPTModel.from_pretrained(llama(), tmp_path, adapter_name="b")


def test_failed_loads_leave_the_backbone_and_the_adapters_as_they_were(tmp_path: Path) -> None:
    wrapped("llama").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "b" / CONFIG_NAME).read_text())
    (tmp_path / "b" / CONFIG_NAME).write_text(json.dumps({**config, "layers": [0]}))  # weights no longer match
    base = llama()
    ids = tokens(2, 6)
    with torch.no_grad():
        bare = base(ids).logits
    with pytest.raises(ConfigError, match="unexpected"):
        IAPTModel.from_pretrained(base, tmp_path)  # "a" loads, then "b" fails
    with torch.no_grad():
        assert torch.equal(base(ids).logits, bare)  # no hooks left behind
    model = get_iapt_model(base, cfg(), adapter_name="x")  # and the backbone can be wrapped again
    with pytest.raises(ConfigError, match="unexpected"):
        model.load_adapter(tmp_path / "b")
    assert model.adapter_names == ["x"]


# ------------------------------------------------------------------------------------------------ leakage
@pytest.mark.parametrize("kind", DECODERS)
def test_response_tokens_cannot_influence_prompts(kind: str) -> None:
    model = wrapped(kind)
    ids, n = tokens(3, 10), 6
    instruction = prefix_mask(3, 10, n)
    other = ids.clone()
    other[:, n:] = torch.randint(2, V, (3, 10 - n), generator=torch.Generator().manual_seed(9))
    assert (other[:, n:] != ids[:, n:]).any()
    first, second = model.cache_prompts(ids, instruction), model.cache_prompts(other, instruction)
    assert sorted(first.prompts) == [0, 1]
    assert all(torch.equal(first.prompts[i], second.prompts[i]) for i in first.prompts)
    with torch.no_grad():
        a = model(ids, instruction_mask=instruction).logits
        b = model(other, instruction_mask=instruction).logits
    assert max_diff(a[:, :n], b[:, :n]) == 0.0
    assert max_diff(a[:, n:], b[:, n:]) > 1e-3
    changed = ids.clone()
    changed[:, 3] = (changed[:, 3] + 1 - 2) % (V - 2) + 2  # an instruction token does change the prompts
    assert max_diff(model.cache_prompts(changed, instruction).prompts[1], first.prompts[1]) > 1e-4


def prompt_change(kind: str, instruction: torch.Tensor, seed: int = 0) -> float:
    """max |prompts(x) - prompts(x')| over layers, x' = x with every token outside ``instruction`` but the first
    redrawn (the measurement quoted in the README's IAPT section, seeds 0-2)."""
    torch.manual_seed(10)
    model = get_iapt_model(BACKBONES[kind](seed), cfg())
    ids = tokens(*instruction.shape, seed=3 + seed)
    outside = ~instruction
    outside[:, 0] = False
    other = ids.clone()
    other[outside] = torch.randint(2, V, (int(outside.sum()),), generator=torch.Generator().manual_seed(9 + seed))
    first, second = model.cache_prompts(ids, instruction), model.cache_prompts(other, instruction)
    return max(max_diff(first.prompts[i], second.prompts[i]) for i in first.prompts)


@pytest.mark.parametrize("kind, where, claimed", [
    pytest.param("gpt2", "prefix", True, id="decoder-prefix-instruction"),
    pytest.param("qwen2", "suffix", False, id="decoder-suffix-instruction"),
    pytest.param("bert", "prefix", False, id="encoder"),
])
def test_tokens_outside_the_instruction_change_the_prompts_only_where_not_claimed(kind: str, where: str,
                                                                                 claimed: bool) -> None:
    """README: only in a decoder, and only tokens AFTER the instruction, leave the prompts exactly unchanged; an
    input before the instruction (suffix instruction) or any token of an encoder's input reaches them."""
    instruction = prefix_mask(3, 10, 6) if where == "prefix" else ~prefix_mask(3, 10, 4)
    change = prompt_change(kind, instruction)
    if claimed:
        assert change == 0.0
    else:  # measured 3.7e-2 (Qwen2, suffix) and 1.4e-2 (BERT) at seed 0, on prompts of size ~2.5
        assert change > 1e-3, change


# ------------------------------------------------------------------------------------------------ generation
def padded_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    long, short = tokens(1, 7, seed=6), tokens(1, 4, seed=7)
    ids = torch.cat([long, torch.cat([torch.full((1, 3), PAD), short], 1)])
    return ids, torch.tensor([[1] * 7, [0, 0, 0, 1, 1, 1, 1]])


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_greedy_generate_with_cache_equals_full_forwards(kind: str) -> None:
    model = wrapped(kind)
    ids, mask = padded_prompts()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=PAD)
    assert out.shape == (2, 7 + 8) and torch.equal(out[:, :7], ids)
    assert torch.equal(out, greedy_reference(model, ids, mask, 8))
    plain = BACKBONES[kind](0).generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                        pad_token_id=PAD)
    assert not torch.equal(out, plain)  # the prompts steer the decoding


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_mixed_tenant_generate_equals_rows_alone(kind: str) -> None:
    model = wrapped(kind)
    ids, mask = padded_prompts()
    names = ["b", "a"]
    out = model.generate(ids, attention_mask=mask, adapter_names=names, max_new_tokens=6, do_sample=False,
                         pad_token_id=PAD, return_dict_in_generate=True)
    first = model.generate(ids[:1], adapter_names=["b"], max_new_tokens=6, do_sample=False, pad_token_id=PAD)
    second = model.generate(ids[1:, 3:], adapter_names=["a"], max_new_tokens=6, do_sample=False, pad_token_id=PAD)
    assert torch.equal(out.sequences[0], first[0]) and torch.equal(out.sequences[1, 3:], second[0])
    assert torch.equal(out.sequences, greedy_reference(model, ids, mask, 6, names))
    swapped = model.generate(ids, attention_mask=mask, adapter_names=["a", "b"], max_new_tokens=6, do_sample=False,
                             pad_token_id=PAD)
    assert not torch.equal(swapped, out.sequences)


def test_beam_search_expands_rows() -> None:
    """num_beams repeats rows inside generate; each row keeps its own adapter's prompts (beam 1 = greedy)."""
    model = wrapped("llama")
    ids, mask = padded_prompts()
    greedy = model.generate(ids, attention_mask=mask, adapter_names=["b", "a"], max_new_tokens=5, do_sample=False,
                            pad_token_id=PAD)
    beams = model.generate(ids, attention_mask=mask, adapter_names=["b", "a"], max_new_tokens=5, num_beams=3,
                           num_return_sequences=3, do_sample=False, pad_token_id=PAD)
    assert beams.shape == (6, 12) and torch.equal(beams[::3, :7], ids)
    alone = model.generate(ids[:1], adapter_names=["b"], max_new_tokens=5, num_beams=3, num_return_sequences=3,
                           do_sample=False, pad_token_id=PAD)
    assert torch.equal(beams[:3], alone) and greedy.shape == (2, 12)


# ------------------------------------------------------------------------------------------------ cached prompts
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_cached_prompts_equal_uncached(kind: str) -> None:
    model = wrapped(kind)
    ids, n = tokens(3, 10), 6
    ids[:, :n] = ids[0, :n]  # one instruction, three different responses
    instruction = prefix_mask(3, 10, n)
    cache = model.cache_prompts(ids[:1, :n], adapter_name="b")
    assert cache.num_rows == 1 and cache.adapter_name == "b"
    with torch.no_grad():
        inline = model(ids, instruction_mask=instruction, adapter_names=["b"] * 3).logits
        cached = model(ids, cached_prompts=cache).logits
        other = model(ids, instruction_mask=instruction, adapter_names=["a"] * 3).logits
    assert max_diff(cached, inline) <= 1e-5 and max_diff(other, inline) > 1e-4
    gen_inline = model.generate(ids[:, :n], adapter_names=["b"] * 3, max_new_tokens=4, do_sample=False)
    gen_cached = model.generate(ids[:, :n], cached_prompts=cache, max_new_tokens=4, do_sample=False)
    assert torch.equal(gen_inline, gen_cached)


# ------------------------------------------------------------------------------------------------ training
def test_training_lowers_loss_and_changes_only_generators() -> None:
    """Toy task: [BOS, x1, x2, x3, SEP] -> y = f(x1), loss on y only; 30 full-batch Adam steps on the generators.

    The backbone is a random Llama with init std 0.2: at HF's default 0.02 its logits are nearly uniform and no
    input-side method can move them far."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=L, num_attention_heads=4,
                         num_key_value_heads=4, max_position_embeddings=64, initializer_range=0.2, bos_token_id=BOS,
                         eos_token_id=None, pad_token_id=PAD)
    base = _seeded(0, lambda: LlamaForCausalLM(config))
    torch.manual_seed(0)
    model = get_iapt_model(base, cfg(init_scale=0.0), adapter_name="task").train()
    x = torch.randint(2, 10, (64, 3), generator=torch.Generator().manual_seed(0))
    y = 20 + (x[:, 0] * 3) % 8
    ids = torch.cat([torch.full((64, 1), BOS), x, torch.full((64, 1), 30), y[:, None]], 1)
    labels = torch.full_like(ids, -100)
    labels[:, -1] = y
    instruction = prefix_mask(64, 6, 5)
    backbone = {k: v.clone() for k, v in model.base_model.state_dict().items()}
    start = {k: v.clone() for k, v in model.iapt.state_dict().items()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(30):
        loss = model(ids, instruction_mask=instruction, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.6 * losses[0], losses  # measured: 4.87 -> 2.1
    assert all(torch.equal(v, backbone[k]) for k, v in model.base_model.state_dict().items())
    unchanged = [k for k, v in model.iapt.state_dict().items() if torch.equal(v, start[k])]
    assert unchanged == [], unchanged


def test_causal_lm_loss_matches_shifted_cross_entropy() -> None:
    model = wrapped("llama")
    ids = tokens(2, 8)
    labels = ids.clone()
    labels[:, :5] = -100
    out = model(ids, instruction_mask=prefix_mask(2, 8, 5), labels=labels)
    ref = nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))
    assert abs(out.loss.item() - ref.item()) <= 1e-6


def test_sequence_classification_labels_pass_through() -> None:
    model = wrapped("bert-cls")
    ids, labels = tokens(3, 7), torch.tensor([0, 2, 1])
    out = model(ids, labels=labels)  # sequence labels are not in the input: no instruction_mask needed
    assert abs(out.loss.item() - nn.functional.cross_entropy(out.logits, labels).item()) <= 1e-6


# ------------------------------------------------------------------------------------------------ lifecycle
def test_merge_and_unload_raises_and_unload_restores_backbone() -> None:
    model = wrapped("llama")
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge_and_unload()
    with pytest.raises(ConfigError, match="add_adapter"):
        get_iapt_model(model.base_model, cfg())
    ids = tokens(2, 6)
    base = model.unload()
    with torch.no_grad():
        assert torch.equal(base(ids).logits, llama(0)(ids).logits)
    again = get_iapt_model(base, cfg())
    assert again.adapter_names == ["default"]


def test_delete_and_set_adapter() -> None:
    model = wrapped("llama", adapters=("a", "b"))
    model.set_adapter("b")
    model.delete_adapter("b")
    assert model.adapter_names == ["a"] and model.active_adapter == "a"
    with pytest.raises(ConfigError, match="not the last adapter"):
        model.delete_adapter("a")


# ------------------------------------------------------------------------------------------------ errors
ERRORS = [
    pytest.param(lambda m, ids: m.set_adapter("zz"), r"adapter_name='zz'.*one of 'a', 'b'", id="unknown-adapter"),
    pytest.param(lambda m, ids: m(ids, adapter_names=["a", "zz"]), r"adapter_name='zz'", id="unknown-row-adapter"),
    pytest.param(lambda m, ids: m(ids, adapter_names=["a"]), r"adapter_names=\['a'\].*2 adapter names",
                 id="adapter-names-length"),
    pytest.param(lambda m, ids: m(ids, labels=ids), r"instruction_mask=None.*pass instruction_mask", id="labels"),
    pytest.param(lambda m, ids: m(ids, instruction_mask=torch.zeros_like(ids, dtype=torch.bool)),
                 r"instruction_mask\[0\]='all False'", id="empty-instruction"),
    pytest.param(lambda m, ids: m(ids, attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1]] * 2),
                                  instruction_mask=torch.ones_like(ids, dtype=torch.bool)),
                 "True at padding", id="instruction-on-padding"),
    pytest.param(lambda m, ids: m(ids, instruction_mask=torch.ones(2, 6)), "instruction_mask=", id="float-mask"),
    pytest.param(lambda m, ids: m(ids, inputs_embeds=torch.zeros(2, 6, D)), "inputs_embeds", id="inputs-embeds"),
    pytest.param(lambda m, ids: m(ids, cache=m(ids).cache), "generate", id="non-empty-cache"),
    pytest.param(lambda m, ids: m.add_adapter("c", cfg(layers=[2])), "layers=", id="layer-out-of-range"),
    pytest.param(lambda m, ids: m.add_adapter("c.d", cfg()), "adapter_name='c.d'", id="bad-name"),
    pytest.param(lambda m, ids: m.add_adapter("a", cfg()), "a new name", id="duplicate-name"),
    pytest.param(lambda m, ids: (m.add_adapter("c", cfg(num_soft_tokens=2)), m(ids, adapter_names=["a", "c"])),
                 "same num_soft_tokens", id="mixed-token-counts"),
    pytest.param(lambda m, ids: m.add_adapter("c", cfg(layers_path="model")), "layers_path='model'",
                 id="layers-path"),
    pytest.param(lambda m, ids: m(ids, attention_mask=torch.zeros_like(ids)), "a row of zeros", id="empty-row"),
    pytest.param(lambda m, ids: m.generate(ids, max_new_tokens=2, use_cache=False), "use_cache=False",
                 id="generate-without-cache"),
    pytest.param(lambda m, ids: m(ids, cached_prompts=m.cache_prompts(ids[:, :3]), adapter_names=["a", "b"]),
                 "adapter_names=.*cached prompts carry their adapter", id="cache-and-names"),
    pytest.param(lambda m, ids: m(ids[:1].repeat(3, 1), cached_prompts=m.cache_prompts(ids[:, :3])),
                 "cached_prompts='2 rows'", id="cache-rows"),
]


@pytest.mark.parametrize("call, match", ERRORS)
def test_bad_inputs_raise_config_errors(call: Callable, match: str) -> None:
    model = wrapped("llama")
    with pytest.raises(ConfigError, match=match):
        call(model, tokens(2, 6))


def test_bad_config_and_layer_discovery_errors() -> None:
    with pytest.raises(ValueError, match="num_soft_tokens=0"):
        get_iapt_model(llama(), IAPTConfig(num_soft_tokens=0))
    with pytest.raises(ConfigError, match="layers_path='nope'"):
        get_iapt_model(llama(), cfg(layers_path="nope"))
    model = get_iapt_model(llama(), cfg(layers_path="model.layers"))
    assert model.layers_path == "model.layers"
    with pytest.raises(ConfigError, match="found: none.*layers_path"):
        get_iapt_model(nn.Sequential(nn.Linear(2, 2)), cfg())


def test_half_precision_backbone_keeps_float32_generators() -> None:
    model = get_iapt_model(llama().to(torch.bfloat16), cfg())
    assert all(p.dtype == torch.float32 for p in model.iapt.parameters())
    ids = tokens(2, 6)
    with torch.no_grad():
        out = model(ids).logits
        full = get_iapt_model(llama(), cfg()).requires_grad_(False)
        full.iapt.load_state_dict(model.iapt.state_dict())
        ref = full(ids).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert max_diff(out.float(), ref) < 0.05  # bfloat16 rounding only


def test_gradient_checkpointing_is_refused_in_training() -> None:
    model = wrapped("llama")
    base = model.base_model
    (getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable)()
    ids = tokens(2, 6)
    with torch.no_grad():
        assert model.eval()(ids).logits.shape == (2, 6, V)  # eval: nothing is recomputed
    with pytest.raises(ConfigError, match="gradient_checkpointing=True.*checkpointing_disable"):
        model.train()(ids)


def test_zero_init_adapter_gives_zero_prompts_but_still_shifts_attention() -> None:
    """Documented in IAPTConfig: zero soft tokens add no content, yet take a share of the attention softmax."""
    torch.manual_seed(0)
    model = get_iapt_model(llama(), IAPTConfig(bottleneck=8))
    ids = tokens(2, 6)
    cache = model.cache_prompts(ids)
    assert all(torch.equal(p, torch.zeros_like(p)) for p in cache.prompts.values())
    with torch.no_grad():
        diff = max_diff(model(ids).logits[:, 1:], llama(0)(ids).logits[:, 1:])
    assert 1e-7 < diff < 0.5


# ------------------------------------------------------------------------------------------------ prompt gate
def gated(kind: str, seed: int = 0) -> IAPTModel:
    """Adapter "a" gated (gate values drawn per layer), adapter "b" ungated, as in :func:`wrapped`."""
    torch.manual_seed(10)
    model = get_iapt_model(BACKBONES[kind](seed), cfg(prompt_gate=True, gate_scale=2.0), adapter_name="a")
    torch.manual_seed(11)
    model.add_adapter("b", cfg())
    with torch.no_grad():
        for i, generator in enumerate(model.iapt["a"].values()):
            generator.gate.fill_(0.1 + 0.15 * i)
    return model


@pytest.mark.parametrize("kind", DECODERS)
def test_gate_of_one_equals_the_ungated_adapter_and_zero_blocks_the_prompts(kind: str) -> None:
    model = gated(kind)
    plain = get_iapt_model(BACKBONES[kind](0), cfg(), adapter_name="a")
    plain.iapt["a"].load_state_dict({k: v for k, v in model.iapt["a"].state_dict().items() if not k.endswith("gate")})
    ids, instruction = tokens(2, 9), prefix_mask(2, 9, 6)
    with torch.no_grad():
        for generator in model.iapt["a"].values():
            generator.gate.fill_(1 / generator.gate_scale)
        assert max_diff(model(ids, instruction_mask=instruction).logits,
                        plain(ids, instruction_mask=instruction).logits) <= 1e-5
        for generator in model.iapt["a"].values():
            generator.gate.zero_()
    model.train()
    model(ids, instruction_mask=instruction).logits.pow(2).sum().backward()
    generator = model.iapt["a"]["1"]
    assert generator.up.weight.grad.abs().max() == 0  # a closed gate passes no prompt content
    assert generator.gate.grad.abs() > 0  # but learns to open
    with torch.no_grad():  # a closed gate equals zero keys and values at the soft positions: not the bare model
        assert max_diff(model(ids, instruction_mask=instruction).logits, BACKBONES[kind](0)(ids).logits) > 1e-4


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_gated_mixed_batches_cache_generate_and_save_load(kind: str, tmp_path: Path) -> None:
    model = gated(kind)
    ids, names, instruction = tokens(4, 9), ["a", "b", "b", "a"], prefix_mask(4, 9, 6)
    with torch.no_grad():
        mixed = model(ids, instruction_mask=instruction, adapter_names=names).logits
        rows = [model(ids[i : i + 1], instruction_mask=instruction[i : i + 1], adapter_names=[n]).logits
                for i, n in enumerate(names)]
    assert max_diff(mixed, torch.cat(rows)) <= 1e-5
    cache = model.cache_prompts(ids[:1, :6], adapter_name="a")
    assert sorted(cache.gates) == list(range(L))
    same = ids.clone()
    same[:, :6] = ids[0, :6]
    with torch.no_grad():
        inline = model(same, instruction_mask=instruction, adapter_names=["a"] * 4).logits
        assert max_diff(model(same, cached_prompts=cache).logits, inline) <= 1e-5
    prompts, mask = padded_prompts()
    out = model.generate(prompts, attention_mask=mask, adapter_names=["a", "b"], max_new_tokens=6, do_sample=False,
                         pad_token_id=PAD)
    assert torch.equal(out, greedy_reference(model, prompts, mask, 6, ["a", "b"]))
    model.save_pretrained(tmp_path)
    loaded = IAPTModel.from_pretrained(BACKBONES[kind](0), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(ids, instruction_mask=instruction, adapter_names=names).logits, mixed)


def with_random_biases(kind: str) -> nn.Module:
    """Backbone ``kind`` with every bias drawn from N(0, 0.5^2) (HF initialises them to zero)."""
    model = BACKBONES[kind](0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=generator))
    return model


def soft_keys_and_values(model: IAPTModel, kind: str, ids: torch.Tensor) -> torch.Tensor:
    """(layers, B, k, 2 * kv_width): the keys and values every layer computes at the soft positions."""
    slots = model.expand_inputs(ids).slot_index
    seen: list[torch.Tensor] = []

    def keep(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        seen.append(out.gather(1, slots[..., None].expand(-1, -1, out.shape[-1])))

    layers = model.base_model.get_submodule(model.layers_path)
    projections = [layer.attn.c_attn for layer in layers] if kind == "gpt2" else \
        [proj for layer in layers for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj)]
    hooks = [proj.register_forward_hook(keep) for proj in projections]
    with torch.no_grad():
        model(ids, instruction_mask=prefix_mask(*ids.shape, 6))
    for hook in hooks:
        hook.remove()
    if kind == "gpt2":  # the fused projection: queries, keys, values
        return torch.stack([out[..., out.shape[-1] // 3 :] for out in seen])
    return torch.stack([torch.cat(seen[i : i + 2], -1) for i in range(0, len(seen), 2)])


@pytest.mark.parametrize("kind", ["gpt2", "qwen2"])
def test_a_closed_gate_gives_zero_keys_and_values_with_biased_projections(kind: str) -> None:
    """IAPTConfig: at the soft positions the gated layer's keys and values are gate x their ungated values, biases
    included (before the bias correction: max |K|, |V| = 1.63 (GPT-2) and 1.67 (Qwen2) at a closed gate here)."""
    torch.manual_seed(10)
    model = get_iapt_model(with_random_biases(kind), cfg(prompt_gate=True, gate_scale=2.0))
    ids = tokens(2, 9)

    def at_gate(value: float) -> torch.Tensor:
        with torch.no_grad():
            for generator in model.iapt["default"].values():
                generator.gate.fill_(value / generator.gate_scale)
        return soft_keys_and_values(model, kind, ids)

    open_, half, closed = at_gate(1.0), at_gate(0.3), at_gate(0.0)
    assert closed.abs().max() <= 1e-6
    assert open_.abs().max() > 0.5
    # layer 0 (later layers' prompts depend on the earlier gates): local tolerance, as g (W x + b) is computed as
    # W (g x) + b + (g - 1) b, float32 rounding of terms of size ~1
    worst = (half[0] - 0.3 * open_[0]).abs().max().item()
    assert worst <= 1e-6, worst  # measured 9e-8
    with torch.no_grad():  # an open gate is the ungated adapter, biases and all
        plain = get_iapt_model(with_random_biases(kind), cfg())
        plain.iapt["default"].load_state_dict({k: v for k, v in model.iapt["default"].state_dict().items()
                                               if not k.endswith("gate")})
        at_gate(1.0)
        assert max_diff(model(ids, instruction_mask=prefix_mask(2, 9, 6)).logits,
                        plain(ids, instruction_mask=prefix_mask(2, 9, 6)).logits) <= 1e-5


def test_prompt_gate_needs_a_pre_norm_backbone_and_a_non_zero_start() -> None:
    with pytest.raises(ConfigError, match="prompt_gate=True is invalid.*pre-norm"):
        get_iapt_model(bert(0), cfg(prompt_gate=True))
    with pytest.raises(ConfigError, match="init_scale=0.0 is invalid"):
        IAPTConfig(prompt_gate=True, init_scale=0.0)
    with pytest.raises(ConfigError, match="gate_scale"):
        IAPTConfig(gate_scale=0.0)
    model = get_iapt_model(llama(0), cfg(), adapter_name="a")
    assert model._norm_hooks == []  # no gated adapter, no norm hooks
    model.add_adapter("g", cfg(prompt_gate=True))
    assert len(model._norm_hooks) == L
    model.unload()
    assert model._norm_hooks == [] and not model.base_model.model.layers[0].input_layernorm._forward_hooks
