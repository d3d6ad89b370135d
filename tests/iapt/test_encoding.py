"""encode_instructions with a tiny byte-level BPE tokenizer trained here (ChatML template, BOS added to plain
text): the rows equal the tokenizer's own encoding of the full text, left-padded; the marked tokens are exactly the
instruction's; max_length cuts the input from its end; bad arguments name the parameter. Generation on such a
batch equals each row alone (tiny Llama and GPT-2 over the tokenizer's vocabulary)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from leanfit.core.errors import ConfigError
from leanfit.iapt.config import IAPTConfig
from leanfit.iapt.encoding import SEPARATOR, encode_instructions
from leanfit.iapt.model import get_iapt_model

CORPUS = ["Write a headline for this article.", "Summarize the text in one sentence.",
          "Translate the input into French.", "The cat sat on the mat and looked at the dog.",
          "Stocks rose on Monday after the report.", "Rain is expected tomorrow in the north."]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
HEAD, TAIL = "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"  # CHATML around one user message
INSTRUCTIONS = ["Write a headline for this article.", "Summarize:", "Translate the input into French, please."]
INPUTS = ["Stocks rose on Monday after the report. Rain is expected tomorrow.", "", "The cat sat on the mat."]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<bos>", "<eos>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    bpe.train_from_iterator(CORPUS * 3, trainers.BpeTrainer(vocab_size=320, special_tokens=special,
                                                            initial_alphabet=alphabet, show_progress=False))
    bpe.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", special.index("<bos>"))])])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    tok.chat_template = CHATML
    return tok


def pieces(tok: Any, instruction: str, text_input: str, chat: bool) -> list[list[int]]:
    """Reference: the row tokenised piece by piece (head, instruction, separator + input, tail)."""
    ids = [tok(text, add_special_tokens=False)["input_ids"] if text else []
           for text in ((HEAD if chat else ""), instruction, (SEPARATOR + text_input if text_input else ""),
                        (TAIL if chat else ""))]
    if not chat:
        ids[0] = [tok.bos_token_id]
    return ids


def unpadded(enc: Any, key: str, row: int) -> list[int]:
    return enc[key][row][enc["attention_mask"][row].bool()].tolist()


# ------------------------------------------------------------------------------------------------ layout
@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat-template"])
def test_rows_are_left_padded_and_mark_exactly_the_instruction(tokenizer: Any, chat: bool) -> None:
    enc = encode_instructions(tokenizer, INSTRUCTIONS, INPUTS, chat_template=chat)
    assert set(enc) == {"input_ids", "attention_mask", "instruction_mask"}
    width = enc["input_ids"].shape[1]
    for row, (instruction, text_input) in enumerate(zip(INSTRUCTIONS, INPUTS, strict=True)):
        content = instruction + (SEPARATOR + text_input if text_input else "")
        if chat:  # the tokenizer's own encoding of the whole row is the reference
            expected = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=True,
                                                     add_generation_prompt=True)["input_ids"]
        else:
            expected = tokenizer(content)["input_ids"]
        n = width - len(expected)
        assert enc["input_ids"][row].tolist() == [tokenizer.pad_token_id] * n + expected
        assert enc["attention_mask"][row].tolist() == [0] * n + [1] * len(expected)
        head, marked, rest, tail = pieces(tokenizer, instruction, text_input, chat)
        assert expected == head + marked + rest + tail  # the pieces' boundaries are token boundaries
        flags = enc["instruction_mask"][row].tolist()
        assert flags == [0] * (n + len(head)) + [1] * len(marked) + [0] * (len(rest) + len(tail))
        assert tokenizer.decode(enc["input_ids"][row][enc["instruction_mask"][row].bool()]) == instruction
    assert enc["attention_mask"][:, -1].all()  # left padding: every row ends with a real token


def test_lists_without_tensors_and_rows_without_inputs(tokenizer: Any) -> None:
    as_lists = encode_instructions(tokenizer, INSTRUCTIONS, return_tensors=None)
    tensors = encode_instructions(tokenizer, INSTRUCTIONS, [""] * 3)
    assert isinstance(as_lists["input_ids"], list)
    assert all(torch.equal(torch.tensor(as_lists[k]), tensors[k]) for k in tensors)
    lengths = [len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in INSTRUCTIONS]
    assert tensors["instruction_mask"].sum(1).tolist() == lengths  # every token but BOS is the instruction
    assert tensors["attention_mask"].sum(1).tolist() == [n + 1 for n in lengths]


# ------------------------------------------------------------------------------------------------ truncation
@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat-template"])
@pytest.mark.parametrize("cut", [0, 1, 5], ids=["fits", "cut-1", "cut-5"])
def test_max_length_cuts_the_input_from_its_end(tokenizer: Any, chat: bool, cut: int) -> None:
    full = [sum(pieces(tokenizer, i, x, chat), []) for i, x in zip(INSTRUCTIONS, INPUTS, strict=True)]
    longest = max(range(3), key=lambda r: len(full[r]))
    max_length = len(full[longest]) - cut
    enc = encode_instructions(tokenizer, INSTRUCTIONS, INPUTS, chat_template=chat, max_length=max_length)
    assert enc["input_ids"].shape[1] == max(min(len(f), max_length) for f in full)
    for row, (instruction, text_input) in enumerate(zip(INSTRUCTIONS, INPUTS, strict=True)):
        head, marked, rest, tail = pieces(tokenizer, instruction, text_input, chat)
        drop = max(0, len(full[row]) - max_length)
        assert unpadded(enc, "input_ids", row) == head + marked + rest[: len(rest) - drop] + tail
        assert sum(unpadded(enc, "instruction_mask", row)) == len(marked)


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat-template"])
def test_an_instruction_that_does_not_fit_is_a_value_error(tokenizer: Any, chat: bool) -> None:
    head, marked, _, tail = pieces(tokenizer, INSTRUCTIONS[0], INPUTS[0], chat)
    need = len(head) + len(marked) + len(tail)
    fits = encode_instructions(tokenizer, INSTRUCTIONS[:1], INPUTS[:1], chat_template=chat, max_length=need)
    assert unpadded(fits, "input_ids", 0) == head + marked + tail  # the whole input cut, the instruction kept
    with pytest.raises(ConfigError, match=f"max_length={need - 1} is invalid: expected >= {need}: row 0"):
        encode_instructions(tokenizer, INSTRUCTIONS[:1], INPUTS[:1], chat_template=chat, max_length=need - 1)


# ------------------------------------------------------------------------------------------------ errors
def _no_pad(tok: Any) -> Any:
    tok = copy.deepcopy(tok)
    tok.pad_token = None
    return tok


def _template(template: str | None) -> Callable[[Any], Any]:
    def make(tok: Any) -> Any:
        tok = copy.deepcopy(tok)
        tok.chat_template = template
        return tok
    return make


def _same(tok: Any) -> Any:
    return tok


ERRORS = [
    pytest.param(_same, {"inputs": ["a", "b"]}, ConfigError, r"inputs='2 inputs' is invalid: expected 3",
                 id="lengths"),
    pytest.param(_same, {"instructions": ["Do it.", "", "x"]}, ConfigError, r"instructions\[1\]=''", id="empty"),
    pytest.param(_same, {"instructions": ["Do it.", "  \n", "x"]}, ConfigError, r"instructions\[1\]", id="blank"),
    pytest.param(_same, {"instructions": "Do it."}, TypeError, r"instructions='Do it.'.*\[instructions\]", id="str"),
    pytest.param(_same, {"instructions": []}, ConfigError, r"instructions=\[\].*at least one", id="none"),
    pytest.param(_same, {"instructions": ["a", 3, "c"]}, TypeError, r"instructions\[1\]=3.*got int", id="not-str"),
    pytest.param(_same, {"inputs": "x"}, TypeError, r"inputs='x'", id="inputs-str"),
    pytest.param(_no_pad, {}, ConfigError, r"tokenizer.pad_token=None.*tokenizer.pad_token = tokenizer.eos_token",
                 id="no-pad-token"),
    pytest.param(_template(None), {"chat_template": True}, ConfigError, r"chat_template=True.*tokenizer.chat_template",
                 id="no-template"),
    pytest.param(_template("{{ messages[0]['content'] | upper }}"), {"chat_template": True}, ConfigError,
                 r"chat_template=True.*verbatim", id="template-changes-message"),
    pytest.param(lambda tok: tok.backend_tokenizer, {}, TypeError, r"tokenizer='Tokenizer'.*fast", id="not-hf"),
    pytest.param(_same, {"max_length": 0}, ConfigError, r"max_length=0", id="max-length-0"),
    pytest.param(_same, {"max_length": "8"}, TypeError, r"max_length='8'", id="max-length-str"),
    pytest.param(_same, {"return_tensors": "np"}, ConfigError, r"return_tensors='np'", id="return-tensors"),
    pytest.param(_same, {"chat_template": "yes"}, TypeError, r"chat_template='yes'", id="chat-template-str"),
]


@pytest.mark.parametrize("make, kwargs, exc, match", ERRORS)
def test_bad_arguments_name_the_parameter(tokenizer: Any, make: Callable[[Any], Any], kwargs: dict, exc: type,
                                          match: str) -> None:
    args = {"instructions": INSTRUCTIONS, "inputs": None, **kwargs}
    with pytest.raises(exc, match=match):
        encode_instructions(make(tokenizer), args.pop("instructions"), **args)


# ------------------------------------------------------------------------------------------------ generation
def _llama(vocab: int) -> nn.Module:
    from leanfit.studies.models.tiny_llama import tiny_llama

    model = tiny_llama(vocab, d_model=32, n_layers=2, n_heads=4, seed=0).eval()
    model.generation_config.eos_token_id = None  # decode the full length
    return model


def _gpt2(vocab: int) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=128, eos_token_id=None,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("build", [_llama, _gpt2], ids=["llama", "gpt2"])
def test_generation_on_an_encoded_batch_equals_each_row_alone(tokenizer: Any, build: Callable) -> None:
    torch.manual_seed(10)
    model = get_iapt_model(build(len(tokenizer)), IAPTConfig(bottleneck=8, init_scale=0.5))
    enc = encode_instructions(tokenizer, INSTRUCTIONS, INPUTS, chat_template=True)
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    batch = model.generate(**enc, **kw)
    width = enc["input_ids"].shape[1]
    for row in range(3):
        alone = encode_instructions(tokenizer, INSTRUCTIONS[row : row + 1], INPUTS[row : row + 1], chat_template=True)
        out = model.generate(**alone, **kw)
        assert torch.equal(batch[row, width:], out[0, alone["input_ids"].shape[1] :]), row
    right = {k: torch.stack([v[r].roll(-int((1 - enc["attention_mask"][r]).sum())) for r in range(3)])
             for k, v in enc.items()}  # the same rows, right-padded
    with pytest.raises(ConfigError, match=r"attention_mask='right padding \(row 1.*padding_side = 'left'"):
        model.generate(**right, **kw)
