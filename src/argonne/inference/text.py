"""Text out of tokens and prompts in: incremental detokenization with stop strings, and prompts from a file.

Used by the engine for every request (one row each) and by the uncached greedy path (several rows)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .sampling import Completion


class StopStrings:
    """Follows each row's text as tokens arrive: ends a row at EOS or at the first stop string (cut before it), and
    streams text for row 0 when asked.

    Text is detokenized incrementally, as text-generation-inference and vLLM do: each new token is decoded together
    with the tokens of the previous step's piece as context, and the text it adds is appended. Re-decoding the
    whole row costs O(length) per token (at a few thousand tokens, longer than the GPU takes to make one); the context keeps tokenizers that drop a word's leading space at the start of a decode (SentencePiece)
    exact. A piece that ends in half a UTF-8 character waits for the token that completes it."""

    def __init__(self, tokenizer, rows: int, stop: Sequence[str], eos_ids: list[int], stream=None):
        self.tokenizer, self.stop, self.eos_ids, self.stream = tokenizer, list(stop), eos_ids, stream
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.texts = [""] * rows
        self.done = [False] * rows
        # Per row: every token made until the row ended, the ending one included (an EOS is not in `tokens`).
        self.token_counts = [0] * rows
        self.finish_reasons: list[str | None] = [None] * rows
        # Per row: the context tokens start at context_start, the tokens not yet turned into text at read_from.
        self.context_start = [0] * rows
        self.read_from = [0] * rows
        self.streamed = 0

    def add(self, new: torch.Tensor | Sequence[int]) -> bool:
        """Takes each row's next token (B,); True once every row has ended."""
        for row, token in enumerate(new.tolist() if isinstance(new, torch.Tensor) else new):
            if self.done[row]:
                continue
            self.token_counts[row] += 1
            if token in self.eos_ids:
                self.finish_reasons[row] = "stop"
                self._end(row)
                continue
            self.tokens[row].append(token)
            self._append(row, self._new_text(row, final=False))
        if self.stream is not None:
            self._emit(final=False)
        return all(self.done)

    def _new_text(self, row: int, final: bool) -> str:
        tokens, start, read = self.tokens[row], self.context_start[row], self.read_from[row]
        if read == len(tokens):
            return ""
        context = self.tokenizer.decode(tokens[start:read], skip_special_tokens=True)
        text = self.tokenizer.decode(tokens[start:], skip_special_tokens=True)
        if len(text) <= len(context) or (text.endswith("\ufffd") and not final):
            return ""
        self.context_start[row], self.read_from[row] = read, len(tokens)
        return text[len(context):]

    def _append(self, row: int, piece: str) -> None:
        if not piece:
            return
        text = self.texts[row] + piece
        # Only where the new piece can complete a stop string; the text ends before the earliest one found.
        found = [text.find(stop, max(0, len(self.texts[row]) - len(stop) + 1)) for stop in self.stop]
        found = [at for at in found if at >= 0]
        if found:
            text, self.done[row], self.finish_reasons[row] = text[:min(found)], True, "stop"
        self.texts[row] = text

    def _end(self, row: int) -> None:
        """The row is finished: text still held back (half a character at the end) is added as it decodes."""
        self._append(row, self._new_text(row, final=True))
        self.done[row] = True

    def _emit(self, final: bool) -> None:
        text = self.texts[0]
        # Hold back the end of the text while it may be the start of a stop string.
        safe = len(text)
        if not final and not self.done[0]:
            for stop in self.stop:
                for size in range(min(len(stop) - 1, safe), 0, -1):
                    if text[:safe].endswith(stop[:size]):
                        safe -= size
                        break
        if safe > self.streamed:
            self.stream(text[self.streamed:safe])
            self.streamed = safe

    def finish(self) -> list[str]:
        return [completion.text for completion in self.completions()]

    def completions(self, unfinished_reason: str = "length") -> list[Completion]:
        """Ends the rows still going (the generation stopped before their EOS: `unfinished_reason`) and returns
        each row's text, token count and finish reason."""
        for row, done in enumerate(self.done):
            if not done:
                self.finish_reasons[row] = unfinished_reason
                self._end(row)  # may still find a stop string in the text held back, and say "stop"
        if self.stream is not None:
            self._emit(final=True)
        return [Completion(text, count, reason, token_ids=list(tokens))
                for text, count, reason, tokens in zip(self.texts, self.token_counts, self.finish_reasons,
                                                       self.tokens)]


def read_prompts(prompt: str | None, prompt_file: str | None) -> list[str]:
    """--prompt, else one prompt per non-empty line of --prompt-file, else stdin."""
    if prompt is not None:
        return [prompt]
    text = Path(prompt_file).read_text() if prompt_file else sys.stdin.read()
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"no prompt given ({'file ' + prompt_file if prompt_file else 'stdin'} is empty)")
    return prompts

