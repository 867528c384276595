"""Greedy decoding without a KV cache, for a model being trained: the one decoding loop besides the engine.

A model sharded over processes (FSDP, tensor parallel) runs a forward only when every process runs it, and must be
left as training has it (the engine merges projections and keeps a cache). This loop recomputes every row's whole
sequence at each step through the caller's `forward`, which works on any sharding; with `lockstep` it runs all
`max_new_tokens` steps even when every row has ended, so that all processes run the same forwards. Text, EOS and
stop strings are handled as the engine handles them (text.StopStrings).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .sampling import NON_FINITE, Completion, flag_non_finite
from .text import StopStrings


def greedy_uncached(forward: Callable[[list[list[int]]], torch.Tensor], prompts: Sequence[Sequence[int]],
                    max_new_tokens: int, tokenizer, eos_ids: Sequence[int], stop: Sequence[str] = (),
                    lockstep: bool = False) -> tuple[list[Completion], bool]:
    """Each prompt's greedy completion, and whether some row's logits held NaN or Inf (that row ends there, with
    finish reason "error"; the caller decides when to raise, e.g. once every process has decoded).
    `forward(rows)` returns float logits (B, V) at each row's last token."""
    rows = [list(prompt) for prompt in prompts]
    texts = StopStrings(tokenizer, len(rows), stop, list(eos_ids))
    broken = [False] * len(rows)
    for _ in range(max_new_tokens):
        logits = forward(rows)
        chosen = flag_non_finite(logits.argmax(dim=-1), logits).tolist()
        for row, token in enumerate(chosen):
            if token == NON_FINITE and not texts.done[row]:
                broken[row] = texts.done[row] = True  # the row ends here (`add` skips ended rows)
            rows[row].append(max(token, 0))
        finished = texts.add(chosen)
        if finished and not lockstep:
            break
    completions = texts.completions()
    for completion, failed in zip(completions, broken):
        if failed:
            completion.finish_reason = "error"
    return completions, any(broken)
