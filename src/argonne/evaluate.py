"""`argonne eval perplexity`: perplexity over parquet or text files with a sliding window, any document length.

Each document is scored as training saw it: preceded by the document boundary token (which is context, not scored)
and followed by it (scored: the model should know where a document ends). Every other token is scored exactly
once, given the tokens before it. A document longer than the window is read in windows of `window` tokens that
start every `stride` tokens; each window predicts the token after each of its positions, and a token is scored by
the first window that predicts it. So with stride = window (the default) the windows tile the document and a
token has between 1 and `window` tokens of context; a smaller stride guarantees each token at least
`window - stride` tokens of context, for more compute. Windows of several documents are scored in one batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .data.parquet import iter_texts, resolve_parquet_files
from .inference.sampling import NonFiniteLogits
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
            try:
                yield Path(path).read_text(encoding="utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{path}: not UTF-8 text ({error})") from None
        else:
            yield from iter_texts(resolve_parquet_files([path]), text_column)


def scoring_windows(length: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """How a document of `length` tokens is scored: (begin, end, first) per window, whose inputs ids[begin:end]
    predict ids[begin + 1 : end + 1], of which those from ids[begin + 1 + first] on are scored there. Every token
    but the first is scored once."""
    last = length - 1  # the last token, the last target
    windows, scored_until, begin = [], 1, 0  # ids[0] is context only
    while scored_until <= last:
        end = min(begin + window, last)
        windows.append((begin, end, scored_until - (begin + 1)))
        scored_until = end + 1
        begin += stride
    return windows


@torch.no_grad()
def batch_nll(model, rows: list[tuple[list[int], int]]) -> float:
    """Summed NLL over rows of (tokens, first): the inputs tokens[:-1] predict tokens[1:], scored from index
    `first` on. One forward for the batch (right-padded; the causal mask keeps padding out of real positions), with
    the model's chunked loss, so no (batch, window, vocabulary) logits are ever held. NonFiniteLogits if the loss
    is NaN or Inf (the host reads it anyway: the check is free), rather than a perplexity of `nan`."""
    device = next(model.parameters()).device
    width = max(len(tokens) - 1 for tokens, _ in rows)
    inputs = torch.zeros((len(rows), width), dtype=torch.long)
    targets = torch.full((len(rows), width), -100, dtype=torch.long)
    for row, (tokens, first) in enumerate(rows):
        length = len(tokens) - 1
        inputs[row, :length] = torch.tensor(tokens[:-1])
        targets[row, first:length] = torch.tensor(tokens[1 + first:])
    scored = int((targets != -100).sum())
    loss = model(inputs.to(device), targets=targets.to(device), use_cache=False).loss.double().item()
    if not math.isfinite(loss):
        raise NonFiniteLogits()
    return loss * scored  # the mean over the scored targets, back to their sum


def document_nll(model, ids: list[int], window: int, stride: int) -> tuple[float, int]:
    """Summed NLL of ids[1:], each token given what precedes it in its window, and how many tokens were scored."""
    rows = [(ids[begin : end + 1], first) for begin, end, first in scoring_windows(len(ids), window, stride)]
    return sum(batch_nll(model, [row]) for row in rows), len(ids) - 1


def perplexity(
    model, tokenizer, documents: Iterable[str], window: int | None = None, stride: int | None = None,
    max_documents: int | None = None, batch_size: int = 8, progress: bool = False,
) -> Perplexity:
    window = model.config.max_position_embeddings if window is None else window
    stride = window if stride is None else stride
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if not 0 < stride <= window:
        raise ValueError(f"stride ({stride}) must be in 1..window ({window})")
    if window > model.config.max_position_embeddings:
        raise ValueError(f"window ({window}) exceeds the model's context ({model.config.max_position_embeddings})")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    from tqdm.auto import tqdm

    boundary = document_boundary_id(tokenizer)
    model.eval()
    count = tokens = 0
    nll = 0.0
    pending: list[tuple[list[int], int]] = []
    # Closed on an error too, so that the error is printed on a line of its own.
    with tqdm(total=max_documents, unit="doc", desc="perplexity", disable=not progress) as bar:
        for text in documents:
            if max_documents is not None and count >= max_documents:
                break
            if not text:
                continue  # an empty document has nothing to score (prepare drops them too)
            ids = [boundary] + tokenizer(text, add_special_tokens=False).input_ids + [boundary]
            for begin, end, first in scoring_windows(len(ids), window, stride):
                pending.append((ids[begin : end + 1], first))
                if len(pending) == batch_size:
                    nll += batch_nll(model, pending)
                    pending.clear()
            tokens, count = tokens + len(ids) - 1, count + 1
            bar.update(1)
            bar.set_postfix(tokens=f"{tokens:,}", refresh=False)
        if pending:
            nll += batch_nll(model, pending)
    if tokens == 0:
        raise ValueError("no documents to evaluate")
    return Perplexity(count, tokens, nll)
