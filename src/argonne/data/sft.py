"""Instruction data for `argonne sft`: conversations -> chat-template tokens with labels on assistant tokens only.

Rows are JSONL lines or parquet rows holding either `messages` (a list of {role, content}, as UltraChat and OpenAI
use) or a `prompt` / `response` pair (one user turn and one assistant turn). Each conversation is rendered with the
tokenizer's chat template (ChatML when it has none). The assistant spans come from the template's structure: for
assistant message k, the rendering of messages[:k] with the generation prompt must be a prefix of the rendering of
messages[:k+1], and the characters between the two — the reply and its end-of-turn token — are the assistant's.
Tokens are labelled through the fast tokenizer's character offsets, so every assistant turn of a multi-turn
conversation is trained, and nothing else is; a template that does not render incrementally is an error.

Truncation policy: a conversation longer than seq_len + 1 tokens is cut at seq_len + 1 (its start is kept), and
counted. Packing (default) fills each window with whole conversations in order and pads the rest (labels -100);
without packing each conversation gets its own padded window. Packed conversations can attend to earlier ones in
the same window, as in pretraining.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from ..tokenizer import CHATML_TEMPLATE
from .batches import LabelledWindows, WindowBatches, validation_batches
from .documents import is_held_out
from .parquet import open_parquet, resolve_parquet_files
from .settings import DataError

log = logging.getLogger("argonne.sft")
ROLES = ("system", "user", "assistant")
IGNORE = -100


@dataclass
class Conversation:
    source: str  # "file:line" or "file:row", for error messages
    messages: list[dict]


@dataclass
class SFTStats:
    conversations: int = 0
    skipped: int = 0
    truncated: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    problems: list[str] = field(default_factory=list)


def _check_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"{where}: message {index} is {type(message).__name__}, not an object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: message {index} has role {role!r}; expected one of {ROLES}")
        if not isinstance(content, str):
            raise DataError(f"{where}: message {index} ({role}) content is {type(content).__name__}, not a string")
        if not content.strip():
            raise DataError(f"{where}: message {index} ({role}) has empty content")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message to learn from")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def conversation_from_row(row, where: str) -> Conversation:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if row.get("messages") is not None:
        return Conversation(where, _check_messages(row["messages"], where))
    if "prompt" in row or "response" in row:
        prompt, response = row.get("prompt"), row.get("response")
        for name, value in (("prompt", prompt), ("response", response)):
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{where}: {name!r} must be a non-empty string, got {value!r}")
        return Conversation(where, [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}])
    raise DataError(f"{where}: needs 'messages' or 'prompt' and 'response'; has {sorted(row)}")


def _json_row(line: str, where: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"{where}: not valid JSON ({error})") from None


def read_conversations(paths: list[str], on_error: str = "fail", stats: SFTStats | None = None) -> list[Conversation]:
    """Conversations from JSONL files (errors name the line) and parquet files (errors name the row)."""
    stats = stats if stats is not None else SFTStats()
    conversations = []

    def add(where: str, row=None, line: str | None = None) -> None:
        """Check one row (a JSONL line is parsed here, so a bad line is reported like any bad row)."""
        try:
            if line is not None:
                row = _json_row(line, where)
            conversations.append(conversation_from_row(row, where))
        except DataError as error:
            if on_error != "skip":
                raise
            log.warning("skipping %s", error)
            stats.skipped += 1
            stats.problems.append(str(error))

    for path in paths:
        if str(path).endswith((".jsonl", ".json")):
            with open(path, encoding="utf-8") as f:
                for number, line in enumerate(f, start=1):
                    if line.strip():
                        add(f"{path}:{number}", line=line)
        else:
            for file in resolve_parquet_files([path]):
                parquet = open_parquet(file)
                row_number = 0
                for group in range(parquet.num_row_groups):
                    for row in parquet.read_row_group(group).to_pylist():
                        add(f"{file}: row {row_number}", row)
                        row_number += 1
    if not conversations:
        raise DataError(f"no usable conversation in {', '.join(map(str, paths))}")
    return conversations


def render_with_labels(tokenizer, messages: list[dict], where: str = "") -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and labels: the id on assistant tokens, -100 elsewhere."""
    template = tokenizer.chat_template or CHATML_TEMPLATE

    def render(part, generation_prompt):
        return tokenizer.apply_chat_template(part, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt)

    text = render(messages, False)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(messages[:k], True), render(messages[: k + 1], False)
        if not (text.startswith(through) and through.startswith(before)):
            raise DataError(f"{where}: the chat template does not render this conversation incrementally, so the "
                            "assistant tokens cannot be located exactly")
        end = len(through.rstrip())  # the reply and its end-of-turn token, not the newline after it
        spans.append((len(before), end))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, labels = encoded["input_ids"], []
    for token, (start, _) in zip(ids, encoded["offset_mapping"]):
        inside = any(a <= start < b for a, b in spans)
        labels.append(token if inside else IGNORE)
    return ids, labels


def build_windows(
    tokenizer, conversations: list[Conversation], seq_len: int, packing: bool = True, stats: SFTStats | None = None
) -> torch.Tensor:
    """(N, 2, seq_len + 1) int64: [:, 0] token ids, [:, 1] labels (-100 where no loss), padded with the pad id."""
    stats = stats if stats is not None else SFTStats()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = seq_len + 1
    windows: list[tuple[list[int], list[int]]] = []
    current_ids: list[int] = []
    current_labels: list[int] = []

    def flush():
        if current_ids:
            fill = width - len(current_ids)
            windows.append((current_ids + [pad] * fill, current_labels + [IGNORE] * fill))

    for conversation in conversations:
        ids, labels = render_with_labels(tokenizer, conversation.messages, conversation.source)
        if len(ids) > width:
            stats.truncated += 1
            ids, labels = ids[:width], labels[:width]
        stats.conversations += 1
        stats.tokens += len(ids)
        stats.trained_tokens += sum(1 for label in labels[1:] if label != IGNORE)
        if not packing or len(current_ids) + len(ids) > width:
            flush()
            current_ids, current_labels = [], []
        current_ids, current_labels = current_ids + ids, current_labels + labels
    flush()
    return torch.from_numpy(np.asarray(windows, dtype=np.int64))


def sft_data(data, micro_batch_size: int, seed: int, tokenizer, rank: int = 0, world: int = 1,
             pin_memory: bool = False, log_main=print):
    """(this rank's batches of instruction windows, validation batches or None) from the run config's [data]
    section; conversations whose source hashes below data.val_fraction are held out."""
    stats = SFTStats()
    conversations = read_conversations(data.sft, data.on_error, stats)
    held = [c for c in conversations if is_held_out(c.source, data.val_fraction)]
    kept = [c for c in conversations if not is_held_out(c.source, data.val_fraction)]
    windows = build_windows(tokenizer, kept, data.seq_len, data.packing, stats)
    log_main(f"sft: {stats.conversations:,} conversations in {len(windows):,} windows, {stats.tokens:,} tokens "
             f"({stats.trained_tokens:,} trained), {stats.truncated} truncated, {stats.skipped} skipped, "
             f"{len(held)} held out")
    batches = WindowBatches(LabelledWindows(windows), micro_batch_size, rank, world, seed, data.shuffle,
                            data.workers, pin_memory)
    if not held or not data.val_windows:
        return batches, None
    validation = LabelledWindows(build_windows(tokenizer, held, data.seq_len, data.packing))
    return batches, validation_batches(validation, data.val_windows, micro_batch_size)
