"""The training token stream straight from parquet: what `argonne data prepare` would write, made on the fly with a
resumable position, its tokenization split across the processes of a run.

`tokenize_row_group` runs ahead of training in background worker processes. With N processes (data and tensor
parallel, on any number of nodes) each tokenizes every N-th row group and the parts are exchanged (an all-gather of
their tokens over a gloo group), so every process sees the whole stream, in order, for 1/N of the tokenization work.
The packer cuts that one stream into windows exactly as in one process, so the global sample order, resume and
reshard-on-resume are the same whatever N is. Tokens are 4 bytes: at 1M tokens/s for a node, each process receives
4 MB/s.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .documents import (
    HELD_OUT,
    KEPT,
    TOKEN_DTYPE,
    RowGroupPool,
    RowGroupTokens,
    describe_drops,
    empty_stats,
    log,
    merge_stats,
)
from .parquet import check_text_column, open_parquet, resolve_parquet_files
from .settings import DataError, DocumentSettings


@dataclass
class StreamPosition:
    """Where the token stream continues: token `offset` of the kept document at `row` of input file `file`."""

    file: int = 0
    row: int = 0
    offset: int = 0


@dataclass
class TokenizeShare:
    """This process's share of the tokenization: row groups `rank`, `rank + world`, ... of the stream; `group` is
    a gloo process group of all `world` sharing processes (every one of them reads the same stream in lockstep)."""

    rank: int
    world: int
    group: object


class StreamingTokens:
    """The token stream of `prepare_dataset`'s training split, made on the fly from parquet.

    `read_from(position)` yields (tokens, positions) chunks, one per row group with kept documents; the packer turns
    them into windows and records, for the next window, the position to resume from. `share` splits the
    tokenization across processes (see the module's docstring).
    """

    def __init__(self, inputs: Sequence[str], tokenizer, settings: DocumentSettings, workers: int = 1,
                 share: TokenizeShare | None = None):
        from ..tokenizer import document_boundary_id

        self.files = resolve_parquet_files(inputs)
        self.tokenizer = tokenizer
        self.boundary = document_boundary_id(tokenizer)
        self.settings = settings.document_settings()
        self.workers = workers
        self.share = share if share is not None and share.world > 1 else None
        self._skipped = _no_skips()
        self.tokenized = {"row_groups": 0, "cpu_seconds": 0.0}  # by this process (its share)

    def skipped(self) -> dict[str, int]:
        """What on_error="skip" has skipped so far, as prepare's manifest counts it: rows whose text is null or not
        UTF-8, and whole files (unreadable, no text column, no document left). Every pass counts: a row skipped in
        two epochs counts twice. Every sharing process counts the whole stream."""
        return dict(self._skipped)

    def read_from(self, start: StreamPosition) -> Iterator[tuple[np.ndarray, StreamPosition]]:
        with RowGroupPool(self.tokenizer, self.boundary, self.workers) as pool:
            for part, file_index in self._row_groups(pool, start.file, self._skipped):
                if len(part.tokens) == 0:
                    continue
                starts = np.concatenate(([0], np.cumsum(part.doc_lengths)[:-1]))
                tokens, doc_rows = part.tokens, part.doc_rows
                if file_index == start.file:
                    # Skip documents before the resume point, and the first `offset` tokens of that document.
                    keep = doc_rows >= start.row
                    if not keep.any():
                        continue
                    first = int(np.argmax(keep))
                    skip = int(starts[first]) + (start.offset if doc_rows[first] == start.row else 0)
                    tokens, starts, doc_rows = tokens[skip:], starts[first:] - skip, doc_rows[first:]
                    starts[0] = 0
                    first_offset = start.offset if doc_rows[0] == start.row else 0
                else:
                    first_offset = 0
                yield tokens, _Positions(file_index, doc_rows, starts, first_offset)


    def _row_groups(self, pool: RowGroupPool, first_file: int, skipped: dict[str, int] | None = None):
        """(RowGroupTokens, file index) for every row group of files[first_file:], in order, this process
        tokenizing its share; bad files as in prepare."""
        tasks = _row_group_tasks(self.files, first_file, self.settings, skipped)
        if self.share is None:
            parts = self._tokenized(pool, tasks)
        else:
            parts = self._shared(pool, tasks)
        return _check_files(parts, self.files, self.settings, skipped)

    def _tokenized(self, pool: RowGroupPool, tasks):
        """Tokenize (file index, task) pairs in order: (part, file index)."""
        indices: deque[int] = deque()

        def only_tasks():
            for index, task in tasks:
                indices.append(index)
                yield task

        for part in pool.map(only_tasks()):
            self.tokenized["row_groups"] += 1
            self.tokenized["cpu_seconds"] += part.cpu_seconds
            yield part, indices.popleft()

    def _shared(self, pool: RowGroupPool, tasks):
        """Every N-th task tokenized here, the rest by the other processes; each round of N parts is all-gathered
        (in task order), until a round in which no process has one left."""
        import torch.distributed as dist

        share = self.share
        mine = self._tokenized(pool, (task for i, task in enumerate(tasks) if i % share.world == share.rank))
        while True:
            failure = None
            try:
                part = next(mine, None)
            except Exception as error:  # bad input seen here: every process must stop with it, not wait for it
                failure, part = error, _Failed(f"{error}")
            gathered: list = [None] * share.world
            dist.all_gather_object(gathered, part, group=share.group)
            if failure is not None:
                raise failure
            failed = [p for p in gathered if isinstance(p, _Failed)]
            if failed:
                raise DataError(failed[0].message)
            if all(p is None for p in gathered):
                return
            yield from (p for p in gathered if p is not None)


@dataclass
class _Failed:
    """What a process that hit bad input sends the others in place of its part."""

    message: str


@dataclass
class _Positions:
    """Maps a token index within a chunk to a StreamPosition."""

    file: int
    doc_rows: np.ndarray
    doc_starts: np.ndarray  # chunk index where each document's (remaining) tokens start
    first_offset: int  # the first document starts this many tokens in

    def at(self, index: int) -> StreamPosition:
        doc = int(np.searchsorted(self.doc_starts, index, side="right")) - 1
        offset = index - int(self.doc_starts[doc]) + (self.first_offset if doc == 0 else 0)
        return StreamPosition(self.file, int(self.doc_rows[doc]), offset)


# What streaming skips under on_error="skip": the row-level reasons of RowGroupTokens.stats, and whole files.
SKIPPED_ROWS = ("null_text", "invalid_utf8", "unreadable")


def _no_skips() -> dict[str, int]:
    return {**dict.fromkeys(SKIPPED_ROWS, 0), "files": 0}


def _row_group_tasks(files: list[str], first_file: int, settings: DocumentSettings, skipped: dict[str, int] | None):
    """(file index, tokenize_row_group arguments) for every row group of files[first_file:]; a file that cannot be
    read or has no text column is an error, or skipped and counted."""
    for index in range(first_file, len(files)):
        path = files[index]
        try:
            parquet = open_parquet(path)
            check_text_column(path, parquet, settings)
        except DataError as error:
            if settings.on_error != "skip":
                raise
            log.warning("skipping file %s", error)
            if skipped is not None:
                skipped["files"] += 1
            continue
        for group in range(parquet.num_row_groups):
            yield index, (path, group, settings)


def _check_files(parts, files: list[str], settings: DocumentSettings, skipped: dict[str, int] | None):
    """Pass (part, file index) on, counting skipped rows; a file with no document left after filtering is bad
    input here too, as in prepare."""
    current, current_stats = None, empty_stats()

    def check_finished_file():
        if current is not None and current_stats[KEPT]["documents"] + current_stats[HELD_OUT]["documents"] == 0:
            error = DataError(f"{files[current]}: no document left after filtering ({describe_drops(current_stats)})")
            if settings.on_error != "skip":
                raise error
            log.warning("skipping file %s", error)
            if skipped is not None:
                skipped["files"] += 1

    for part, index in parts:
        if index != current:
            check_finished_file()
            current, current_stats = index, empty_stats()
        merge_stats(current_stats, part.stats)
        if skipped is not None:
            for reason in SKIPPED_ROWS:
                skipped[reason] += part.stats[reason]["documents"]
        yield part, index
    check_finished_file()


def held_out_tokens(stream: StreamingTokens, max_tokens: int) -> np.ndarray:
    """The held-out (validation) documents' tokens, in stream order, up to `max_tokens`."""
    parts, total = [], 0
    with RowGroupPool(stream.tokenizer, stream.boundary, stream.workers) as pool:
        for part, _ in stream._row_groups(pool, 0):
            parts.append(part.val_tokens)
            total += len(part.val_tokens)
            if total >= max_tokens:
                break
    tokens = np.concatenate(parts) if parts else np.zeros(0, TOKEN_DTYPE)
    return tokens[:max_tokens]


def iter_stream_windows(
    stream: StreamingTokens, start: StreamPosition, seq_len: int
) -> Iterator[tuple[np.ndarray, StreamPosition]]:
    """Windows of seq_len + 1 tokens from `start` on, each with the stream position of its first token."""
    buffer = np.zeros(0, dtype=TOKEN_DTYPE)
    buffer_start = 0  # stream index (relative to `start`) of buffer[0]
    chunks: deque = deque()  # (stream index of chunk start, chunk length, positions)
    next_start = 0
    for tokens, positions in stream.read_from(start):
        chunks.append((buffer_start + len(buffer), len(tokens), positions))
        buffer = np.concatenate((buffer, tokens))
        while buffer_start + len(buffer) >= next_start + seq_len + 1:
            at = next_start - buffer_start
            while chunks[0][0] + chunks[0][1] <= next_start:
                chunks.popleft()
            chunk_start, _, chunk_positions = chunks[0]
            yield buffer[at : at + seq_len + 1], chunk_positions.at(next_start - chunk_start)
            next_start += seq_len
        buffer, buffer_start = buffer[next_start - buffer_start :], next_start
