"""Dataset formats -> token ids and labels (IGNORE_INDEX where there is no loss).

instruction  alpaca-style columns; bos + prompt (masked) + response + eos (labelled)
chat         a list of {role, content} messages rendered with the tokenizer's chat template;
             only the assistant turns are labelled
text         raw text (completion style); bos (masked) + text + eos (labelled)

Every row comes out with ``input_ids`` and ``labels`` (cut to the context length) and
``full_length`` (the length before the cut), so the pipeline can count, report and, with
``--truncation drop``, drop the examples that did not fit.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

from fsdp_qlora.config import TrainConfig
from fsdp_qlora.data.sft import IGNORE_INDEX, format_prompt
from fsdp_qlora.errors import ConfigError

FORMATS = ("instruction", "chat", "text")
COLUMN_FLAGS = ("--instruction-column/--output-column (instruction), --messages-column (chat) "
                "or --text-column (text)")


@dataclass(frozen=True)
class FormatSpec:
    """The resolved format and the column names it reads."""

    name: str
    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    messages: str = "messages"
    text: str = "text"

    def required_columns(self) -> tuple[str, ...]:
        return {"instruction": (self.instruction, self.output), "chat": (self.messages,),
                "text": (self.text,)}[self.name]


def resolve_format(cfg: TrainConfig, columns: list[str], dataset_name: str) -> FormatSpec:
    """--dataset-format, or auto-detected from the columns; a clear error when columns are missing."""
    fields = dict(instruction=cfg.instruction_column, input=cfg.input_column, output=cfg.output_column,
                  messages=cfg.messages_column, text=cfg.text_column)
    if cfg.dataset_format != "auto":
        spec = FormatSpec(cfg.dataset_format, **fields)
        missing = [c for c in spec.required_columns() if c not in columns]
        if missing:
            flags = {"instruction": "--instruction-column/--output-column", "chat": "--messages-column",
                     "text": "--text-column"}[spec.name]
            raise ConfigError(f"dataset {dataset_name!r} lacks column(s) {', '.join(missing)} for --dataset-format "
                              f"{spec.name}; it has {', '.join(columns)}: name yours with {flags}")
        return spec
    for name in ("chat", "instruction", "text"):
        spec = FormatSpec(name, **fields)
        if all(c in columns for c in spec.required_columns()):
            return spec
    raise ConfigError(f"dataset {dataset_name!r} lacks column(s) {cfg.instruction_column}, {cfg.output_column} "
                      f"(instruction), {cfg.messages_column} (chat) or {cfg.text_column} (text); it has "
                      f"{', '.join(columns)}: map yours with {COLUMN_FLAGS}")


def _special(tokenizer) -> tuple[list[int], list[int]]:
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return bos, eos


def _finish(ids: list[int], labels: list[int], context_length: int) -> dict[str, Any]:
    return {"input_ids": ids[:context_length], "labels": labels[:context_length], "full_length": len(ids)}


def tokenize_instruction(batch: dict[str, list], tokenizer, spec: FormatSpec, context_length: int) -> dict[str, list]:
    """bos + prompt + response + eos; the same tokens as sft.tokenize_example, batched."""
    bos, eos = _special(tokenizer)
    n = len(batch[spec.instruction])
    inputs = batch[spec.input] if spec.input in batch else [""] * n
    prompts = [format_prompt(_text(i), _text(x)) for i, x in zip(batch[spec.instruction], inputs)]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer([_text(o) for o in batch[spec.output]], add_special_tokens=False)["input_ids"]
    rows = [_finish(bos + p + r + eos, [IGNORE_INDEX] * (len(bos) + len(p)) + r + eos, context_length)
            for p, r in zip(prompt_ids, response_ids)]
    return _columns(rows)


def tokenize_text(batch: dict[str, list], tokenizer, spec: FormatSpec, context_length: int) -> dict[str, list]:
    bos, eos = _special(tokenizer)
    ids = tokenizer([_text(t) for t in batch[spec.text]], add_special_tokens=False)["input_ids"]
    rows = [_finish(bos + t + eos, [IGNORE_INDEX] * len(bos) + t + eos, context_length) for t in ids]
    return _columns(rows)


def tokenize_chat(batch: dict[str, list], tokenizer, spec: FormatSpec, context_length: int) -> dict[str, list]:
    return _columns([chat_example(messages, tokenizer, context_length) for messages in batch[spec.messages]])


def chat_example(messages: list[dict[str, str]], tokenizer, context_length: int) -> dict[str, Any]:
    """Render the conversation once and label the tokens that fall in assistant turns.

    An assistant turn spans, in the rendered text, from the end of the conversation before it
    (rendered with the generation prompt, e.g. ``<|assistant|>\\n``) to the end of the
    conversation including it (its content and end-of-turn tokens). The text is tokenized once
    and a token is labelled when its characters start inside such a span, so BPE merges at the
    boundaries cannot shift the mask.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("the chat format needs a tokenizer with a chat template: use a chat model's tokenizer, "
                          "or --dataset-format instruction/text")
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("the chat format needs a fast tokenizer (character offsets): use a model with tokenizer.json")
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    full = _render(tokenizer, messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True) if i else ""
        through = _render(tokenizer, messages[:i + 1], False)
        if not (full.startswith(through) and through.startswith(before)):
            raise ConfigError("the tokenizer's chat template renders a conversation's turns differently from the "
                              "whole conversation, so assistant turns cannot be located: use a template that "
                              "renders prefixes consistently")
        spans.append((len(before), len(through)))
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    starts = [s for s, _ in spans]
    labels = []
    for token, (char_start, char_end) in zip(encoded["input_ids"], encoded["offset_mapping"]):
        k = bisect.bisect_right(starts, char_start) - 1
        inside = k >= 0 and char_start < spans[k][1] and char_end > char_start
        labels.append(token if inside else IGNORE_INDEX)
    return _finish(list(encoded["input_ids"]), labels, context_length)


def _render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _text(value) -> str:
    return "" if value is None else str(value)


def _columns(rows: list[dict[str, Any]]) -> dict[str, list]:
    return {key: [row[key] for row in rows] for key in ("input_ids", "labels", "full_length")}


TOKENIZERS = {"instruction": tokenize_instruction, "chat": tokenize_chat, "text": tokenize_text}


def tokenize_batch(batch: dict[str, list], tokenizer, spec: FormatSpec, context_length: int) -> dict[str, list]:
    """A batched datasets.map function for any format."""
    return TOKENIZERS[spec.name](batch, tokenizer, spec, context_length)
