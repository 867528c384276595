"""Documents to tokens: the quality filters, the validation split, and `tokenize_row_group`, which turns one parquet
row group into its kept documents' tokens (each followed by the boundary token) and an account of every row. Both
prepare and streaming run it, in worker processes (`RowGroupPool`)."""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from .parquet import decode_texts, open_parquet, read_text_column
from .settings import DataError, DocumentSettings

log = logging.getLogger("argonne.data")

TOKEN_DTYPE = np.uint32  # Qwen2.5's 151,665 tokens do not fit uint16

KEPT = "kept"
HELD_OUT = "validation"
DROP_REASONS = ("too_many_digits", "too_few_letters", "too_few_tokens", "null_text", "invalid_utf8", "empty_text",
                "unreadable")  # unreadable: rows of a row group whose pages are damaged (on_error="skip")


_CHAR_CLASSES: np.ndarray | None = None  # code point -> 1 digit, 2 letter or whitespace, 0 other


def _char_classes() -> np.ndarray:
    """A lookup table over all Unicode code points, built once per process (~0.3 s): str.isdigit() -> 1,
    str.isalpha() or str.isspace() -> 2. Python's own character classes, as the original filters used."""
    global _CHAR_CLASSES
    if _CHAR_CLASSES is None:
        table = np.zeros(0x110000, dtype=np.uint8)
        for code in range(0x110000):
            char = chr(code)
            if char.isdigit():
                table[code] = 1
            elif char.isalpha() or char.isspace():
                table[code] = 2
        _CHAR_CLASSES = table
    return _CHAR_CLASSES


def char_filter_reasons(texts: list[str], filters: DocumentSettings) -> list[str | None]:
    """Per text: the first character rule it fails, or None. All texts are classified at once through a code point
    table (UTF-32 + numpy), which costs a few percent of tokenization instead of a Python loop per character."""
    if not texts:
        return []
    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    classes = _char_classes()[np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32)]
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    nonempty = lengths > 0
    digits = np.zeros(len(texts), dtype=np.int64)
    letters = np.zeros(len(texts), dtype=np.int64)
    digits[nonempty] = np.add.reduceat(classes == 1, starts[nonempty])
    letters[nonempty] = np.add.reduceat(classes == 2, starts[nonempty])
    long_enough = lengths > filters.ratio_rules_min_chars
    safe = np.maximum(lengths, 1)
    too_many_digits = long_enough & (digits / safe > filters.max_digit_fraction)
    too_few_letters = long_enough & (letters / safe < filters.min_letter_space_fraction)
    return [
        "too_many_digits" if d else "too_few_letters" if f else None
        for d, f in zip(too_many_digits.tolist(), too_few_letters.tolist())
    ]


def is_held_out(document_id: str, val_fraction: float) -> bool:
    """Deterministic validation split: the document's id hashed to [0, 1) falls below val_fraction."""
    if val_fraction <= 0:
        return False
    digest = hashlib.blake2b(document_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < val_fraction



@dataclass
class RowGroupTokens:
    """What one row group gives: kept training documents as one concatenated stream, held-out documents, and the
    account of every row."""

    tokens: np.ndarray  # uint32, each kept document followed by the boundary token
    doc_rows: np.ndarray  # row (within the file) of each kept document
    doc_lengths: np.ndarray  # tokens of each kept document, boundary included
    val_tokens: np.ndarray
    stats: dict  # reason -> {"documents": n, "tokens": n}
    cpu_seconds: float = 0.0  # the worker's CPU time for this row group (streaming reports what each rank spent)


_worker_tokenizer = None  # set per worker process by _init_worker


def _init_worker(tokenizer_json: str, boundary_id: int) -> None:
    global _worker_tokenizer
    from tokenizers import Tokenizer

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker process
    tokenizer = Tokenizer.from_str(tokenizer_json)
    tokenizer.no_padding()
    tokenizer.no_truncation()
    _worker_tokenizer = (tokenizer, boundary_id)


def _encode(texts: list[str]) -> list[list[int]]:
    tokenizer, _ = _worker_tokenizer
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # fast: skips offsets
    return [encoding.ids for encoding in encode(texts, add_special_tokens=False)]


def empty_stats() -> dict:
    return {reason: {"documents": 0, "tokens": 0} for reason in (KEPT, HELD_OUT, *DROP_REASONS)}


def tokenize_row_group(path: str, row_group: int, settings: DocumentSettings) -> RowGroupTokens:
    """Read, check, filter, split and tokenize one row group (runs in a worker; see `_init_worker`)."""
    started = time.process_time()
    part = _tokenize_row_group(path, row_group, settings)
    part.cpu_seconds = time.process_time() - started
    return part


def _tokenize_row_group(path: str, row_group: int, settings: DocumentSettings) -> RowGroupTokens:
    _, boundary_id = _worker_tokenizer
    parquet = open_parquet(path)
    first_row = sum(parquet.metadata.row_group(i).num_rows for i in range(row_group))
    stats = empty_stats()
    try:
        texts, ids = read_text_column(path, parquet, row_group, settings)
    except DataError as error:
        if settings.on_error != "skip":
            raise
        log.warning("skipping %s", error)
        stats["unreadable"]["documents"] += parquet.metadata.row_group(row_group).num_rows
        empty = np.zeros(0, TOKEN_DTYPE)
        return RowGroupTokens(empty, np.zeros(0, np.int64), np.zeros(0, np.int64), empty, stats)

    def bad_row(row: int, reason: str, message: str) -> None:
        if settings.on_error != "skip":
            raise DataError(f"{path}: row {row}: {message}")
        log.warning("skipping %s row %d: %s", path, row, message)
        stats[reason]["documents"] += 1

    # Python strings, or None where a row is null or not valid UTF-8 (each reported with its row).
    rows, strings = [], []
    for offset, value in enumerate(decode_texts(texts)):
        row = first_row + offset
        if value is None:
            bad_row(row, "null_text", f"{settings.text_column!r} is null")
        elif isinstance(value, UnicodeDecodeError):
            bad_row(row, "invalid_utf8", f"{settings.text_column!r} is not valid UTF-8 ({value})")
        elif not value:
            stats["empty_text"]["documents"] += 1
        else:
            rows.append(row)
            strings.append(value)

    reasons = char_filter_reasons(strings, settings)
    encoded = _encode(strings) if strings else []
    kept, kept_rows, held_out = [], [], []
    for row, text, ids_, reason in zip(rows, strings, encoded, reasons):
        if reason is None and len(ids_) < settings.min_tokens:
            reason = "too_few_tokens"
        if reason is not None:
            stats[reason]["documents"] += 1
            stats[reason]["tokens"] += len(ids_)
            continue
        ids_.append(boundary_id)
        key = ids[row - first_row].as_py() if ids is not None else text
        if is_held_out(str(key), settings.val_fraction):
            held_out.append(ids_)
            stats[HELD_OUT]["documents"] += 1
            stats[HELD_OUT]["tokens"] += len(ids_)
        else:
            kept.append(ids_)
            kept_rows.append(row)
            stats[KEPT]["documents"] += 1
            stats[KEPT]["tokens"] += len(ids_)

    def concat(docs):
        return np.concatenate([np.asarray(d, dtype=TOKEN_DTYPE) for d in docs]) if docs else np.zeros(0, TOKEN_DTYPE)

    return RowGroupTokens(
        tokens=concat(kept),
        doc_rows=np.asarray(kept_rows, dtype=np.int64),
        doc_lengths=np.asarray([len(d) for d in kept], dtype=np.int64),
        val_tokens=concat(held_out),
        stats=stats,
    )


def merge_stats(total: dict, part: dict) -> dict:
    for reason, counts in part.items():
        entry = total.setdefault(reason, {"documents": 0, "tokens": 0})
        entry["documents"] += counts["documents"]
        entry["tokens"] += counts["tokens"]
    return total


class RowGroupPool:
    """Runs `tokenize_row_group` over (file, row group) tasks in worker processes, at most `ahead` tasks in flight,
    and hands results back in task order. workers=0 runs everything in this process."""

    def __init__(self, tokenizer, boundary_id: int, workers: int, ahead: int | None = None):
        self.workers = workers
        self.ahead = ahead or max(2, 2 * workers)
        tokenizer_json = tokenizer.backend_tokenizer.to_str()
        if workers == 0:
            _init_worker(tokenizer_json, boundary_id)
            self.executor = None
        else:
            # forkserver: workers start from a clean server process (no inherited threads), with this module
            # imported once there rather than in every worker.
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["argonne.data.documents"])
            self.executor = ProcessPoolExecutor(
                workers, mp_context=context, initializer=_init_worker, initargs=(tokenizer_json, boundary_id)
            )

    def map(self, tasks: Iterator[tuple[str, int, DocumentSettings]]) -> Iterator[RowGroupTokens]:
        if self.executor is None:
            for task in tasks:
                yield tokenize_row_group(*task)
            return
        pending: deque[Future] = deque()
        for task in tasks:
            pending.append(self.executor.submit(tokenize_row_group, *task))
            if len(pending) >= self.ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------------------------------- tokenizer id


def tokenizer_fingerprint(tokenizer) -> dict:
    """Name, size and a hash of the full vocabulary (token -> id, added tokens included)."""
    vocab = tokenizer.get_vocab()
    digest = hashlib.sha256(json.dumps(sorted(vocab.items(), key=lambda kv: kv[1])).encode("utf-8")).hexdigest()
    return {"name": str(tokenizer.name_or_path), "vocab_size": len(vocab), "vocab_sha256": digest}


def check_tokenizer_matches(recorded: dict, tokenizer, where: str) -> None:
    current = tokenizer_fingerprint(tokenizer)
    if (recorded["vocab_size"], recorded["vocab_sha256"]) != (current["vocab_size"], current["vocab_sha256"]):
        raise DataError(
            f"{where} was tokenized with {recorded['name']!r} ({recorded['vocab_size']} tokens, vocab sha256 "
            f"{recorded['vocab_sha256'][:12]}…) but training uses {current['name']!r} ({current['vocab_size']} "
            f"tokens, {current['vocab_sha256'][:12]}…); prepare the data again with the training tokenizer"
        )


def describe_drops(stats: dict) -> str:
    drops = [f"{reason}: {stats[reason]['documents']}" for reason in DROP_REASONS if stats[reason]["documents"]]
    return ", ".join(drops) or "no rows"
