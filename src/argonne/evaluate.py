"""`argonne eval perplexity`: perplexity over parquet or text files with a sliding window, any document length.

Each document is scored as training saw it: preceded by the document boundary token (which is context, not scored)
and followed by it (scored: the model should know where a document ends). A document longer than the window is
scored in windows of `window` tokens that start every `stride` tokens; each token is scored once, in the first
window that reaches it, with as much context as that window gives (stride < window buys context with compute).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import iter_texts, resolve_parquet_files
from .tokenizer import document_boundary_id


@dataclass
class Perplexity:
    documents: int
    tokens: int
    nll: float  # total negative log-likelihood, nats

    @property
    def value(self) -> float:
        return math.exp(self.nll / self.tokens)


def iter_documents(paths: Iterable[str], text_column: str = "text") -> Iterator[str]:
    """Parquet files (one document per row) and text files (one document per file)."""
    paths = list(paths)
    text_files = [p for p in paths if Path(p).is_file() and not str(p).endswith(".parquet")]
    for path in paths:
        if path in text_files:
            yield Path(path).read_text(encoding="utf-8")
        else:
            yield from iter_texts(resolve_parquet_files([path]), text_column)


@torch.no_grad()
def document_nll(model, ids: list[int], window: int, stride: int) -> tuple[float, int]:
    """Summed NLL of ids[1:] given what precedes each, and how many tokens were scored."""
    device = next(model.parameters()).device
    tokens = torch.tensor(ids, device=device)
    total, scored_until = 0.0, 1  # ids[0] (the boundary) is context only
    for begin in range(0, len(ids) - 1, stride):
        end = min(begin + window, len(ids))
        logits = model(tokens[None, begin:end], use_cache=False).logits[0, :-1].float()  # predicts begin+1..end-1
        first = scored_until - (begin + 1)  # skip targets an earlier window already scored
        targets = tokens[begin + 1 : end]
        total += F.cross_entropy(logits[first:], targets[first:], reduction="sum").item()
        scored_until = end
        if end == len(ids):
            break
    return total, len(ids) - 1


def perplexity(
    model, tokenizer, documents: Iterable[str], window: int | None = None, stride: int | None = None,
    max_documents: int | None = None,
) -> Perplexity:
    window = window or model.config.max_position_embeddings
    stride = stride or window
    if not 0 < stride <= window:
        raise ValueError(f"stride ({stride}) must be in 1..window ({window})")
    if window > model.config.max_position_embeddings:
        raise ValueError(f"window ({window}) exceeds the model's context ({model.config.max_position_embeddings})")
    boundary = document_boundary_id(tokenizer)
    model.eval()
    count = tokens = 0
    nll = 0.0
    for text in documents:
        if max_documents is not None and count >= max_documents:
            break
        ids = [boundary] + tokenizer(text, add_special_tokens=False).input_ids + [boundary]
        doc_nll, doc_tokens = document_nll(model, ids, window, stride)
        nll, tokens, count = nll + doc_nll, tokens + doc_tokens, count + 1
    if tokens == 0:
        raise ValueError("no documents to evaluate")
    return Perplexity(count, tokens, nll)
