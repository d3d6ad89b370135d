"""Tokenise instructions (and optional inputs) into the batch an :class:`~leanfit.iapt.model.IAPTModel` takes.

:func:`encode_instructions` returns ``input_ids``, ``attention_mask`` and ``instruction_mask`` (B, T), LEFT-padded
so that ``generate()`` continues every row from its last token, with 1 in ``instruction_mask`` at exactly the
instruction's tokens. A row's text is the instruction, then ``SEPARATOR`` and the input when there is one; with
``chat_template=True`` that text is the user turn of the tokenizer's chat template (``add_generation_prompt``).
The whole text is tokenised at once, as ``tokenizer(text)`` / ``apply_chat_template`` would, and the instruction's
tokens are found through the offsets mapping of a fast tokenizer: the tokens whose characters overlap the
instruction (a token that straddles its boundary counts as an instruction token).

The instruction comes first, so in a decoder the input cannot change the prompts (only instruction positions are
pooled, and they see no later token); see the IAPT section of the README for the measured conditions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from leanfit.core.errors import ConfigError, bad_value

if TYPE_CHECKING:
    from transformers import BatchEncoding

__all__ = ["SEPARATOR", "encode_instructions"]

SEPARATOR = "\n\n"  # between the instruction and the input, as in the decoder study's prompts
_MARK = "\ue000"  # a private-use character: brackets the user message to find it in the rendered chat template


def _check_texts(param: str, texts: Any) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(bad_value(param, texts, "a list of strings (one per row)", f"for one row pass [{param}]"))
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(bad_value(f"{param}[{i}]", text, f"a string, got {type(text).__name__}"))
    return list(texts)


def _check_tokenizer(tokenizer: Any, chat_template: bool) -> None:
    if not getattr(tokenizer, "is_fast", False) or not callable(tokenizer):
        raise TypeError(bad_value("tokenizer", type(tokenizer).__name__, "a fast Hugging Face tokenizer (its offsets "
                                  "mapping locates the instruction)", "load it with AutoTokenizer.from_pretrained("
                                  "name) (use_fast=True)"))
    if tokenizer.pad_token_id is None:
        raise ConfigError(bad_value("tokenizer.pad_token", tokenizer.pad_token, "a padding token",
                                    "set one, e.g. tokenizer.pad_token = tokenizer.eos_token"))
    if chat_template and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(bad_value("chat_template", True, "a tokenizer with a chat template (tokenizer.chat_template "
                                    "is empty)", "set tokenizer.chat_template, or pass chat_template=False"))


def _check_arguments(tokenizer: Any, instructions: Any, inputs: Any, chat_template: Any, max_length: Any,
                     return_tensors: Any) -> tuple[list[str], list[str]]:
    if not isinstance(chat_template, bool):
        raise TypeError(bad_value("chat_template", chat_template, "True or False"))
    _check_tokenizer(tokenizer, chat_template)
    instructions = _check_texts("instructions", instructions)
    if not instructions:
        raise ConfigError(bad_value("instructions", instructions, "at least one instruction"))
    for i, text in enumerate(instructions):
        if not text.strip():
            raise ConfigError(bad_value(f"instructions[{i}]", text, "a non-empty instruction",
                                        "every row needs instruction tokens to compute its prompts from"))
    inputs = [""] * len(instructions) if inputs is None else _check_texts("inputs", inputs)
    if len(inputs) != len(instructions):
        raise ConfigError(bad_value("inputs", f"{len(inputs)} inputs", f"{len(instructions)}, one per instruction "
                                    "(or None)", "pass '' for a row without input"))
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)):
        raise TypeError(bad_value("max_length", max_length, "None or an integer >= 1"))
    if max_length is not None and max_length < 1:
        raise ConfigError(bad_value("max_length", max_length, "None or an integer >= 1"))
    if return_tensors not in ("pt", None):
        raise ConfigError(bad_value("return_tensors", return_tensors, "'pt' (tensors) or None (lists)"))
    return instructions, inputs


def _row_text(tokenizer: Any, instruction: str, text_input: str, chat_template: bool) -> tuple[str, int]:
    """The row's full text and where the instruction starts in it."""
    content = instruction + (SEPARATOR + text_input if text_input else "")
    if not chat_template:
        return content, 0

    def render(message: str) -> str:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                                 add_generation_prompt=True)
        return rendered if isinstance(rendered, str) else str(rendered)

    marked = render(_MARK + content + _MARK)
    before, found, rest = marked.partition(_MARK)
    inside, found_end, after = rest.partition(_MARK)
    text = render(content)
    if not (found and found_end) or inside != content or text != before + content + after:
        raise ConfigError(bad_value("chat_template", True, "a chat template that copies the user message "
                                    "verbatim (this one changes it, so its instruction tokens cannot be located)",
                                    "pass chat_template=False and format the text yourself"))
    return text, len(before)


def _encode_row(tokenizer: Any, instruction: str, text_input: str, chat_template: bool, max_length: int | None,
                row: int) -> tuple[list[int], list[int]]:
    """(token ids, instruction flags) of one row, the input cut from its end to fit ``max_length``."""
    text, start = _row_text(tokenizer, instruction, text_input, chat_template)
    end = start + len(instruction)
    # the chat template carries its own special tokens, as apply_chat_template(tokenize=True) assumes
    enc = tokenizer(text, add_special_tokens=not chat_template, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(span) for span in enc["offset_mapping"]]
    flags = [int(b > a and a < end and b > start) for a, b in offsets]
    if not any(flags):
        raise ConfigError(bad_value(f"instructions[{row}]", instruction, "text that tokenises to at least one token"))
    if max_length is not None and len(ids) > max_length:
        input_end = end + len(SEPARATOR) + len(text_input)  # the separator goes with the input
        cut = [i for i, (a, b) in enumerate(offsets) if text_input and b > a and a < input_end and b > end
               and not flags[i]]
        excess = len(ids) - max_length
        if excess > len(cut):
            raise ConfigError(bad_value("max_length", max_length, f">= {len(ids) - len(cut)}: row {row}'s "
                                        "instruction (with its template and special tokens) needs that many tokens "
                                        "and is never cut", "raise max_length or shorten the instruction"))
        drop = set(cut[len(cut) - excess :])
        ids = [t for i, t in enumerate(ids) if i not in drop]
        flags = [f for i, f in enumerate(flags) if i not in drop]
    return ids, flags


def encode_instructions(tokenizer: Any, instructions: Sequence[str], inputs: Sequence[str] | None = None, *,
                        chat_template: bool = False, max_length: int | None = None,
                        return_tensors: Literal["pt"] | None = "pt") -> BatchEncoding:
    """Left-padded ``input_ids``, ``attention_mask`` and ``instruction_mask`` (B, T) for IAPT, as a
    ``transformers.BatchEncoding`` (tensors with ``return_tensors="pt"``, lists with None).

    ``instructions``: one per row, non-empty. ``inputs``: None or one per row ('' for none), placed after the
    instruction and ``SEPARATOR``. ``chat_template``: the row is the user turn of the tokenizer's chat template,
    with the generation prompt appended. ``max_length``: rows longer than this lose input tokens from the end of
    the input (the template's closing tokens stay); a row whose instruction alone does not fit is a ValueError.
    The tokenizer must be fast (offsets mapping) and have a pad token."""
    instructions, inputs = _check_arguments(tokenizer, instructions, inputs, chat_template, max_length,
                                            return_tensors)
    rows = [_encode_row(tokenizer, instruction, text_input, chat_template, max_length, i)
            for i, (instruction, text_input) in enumerate(zip(instructions, inputs, strict=True))]
    width = max(len(ids) for ids, _ in rows)
    pad = int(tokenizer.pad_token_id)
    data: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "instruction_mask": []}
    for ids, flags in rows:
        n = width - len(ids)
        data["input_ids"].append([pad] * n + ids)
        data["attention_mask"].append([0] * n + [1] * len(ids))
        data["instruction_mask"].append([0] * n + flags)
    from transformers import BatchEncoding

    return BatchEncoding(data, tensor_type=return_tensors)
