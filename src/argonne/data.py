"""Training text: parquet shards -> documents -> tokens with document boundaries -> windows of seq_len + 1 tokens.

Shards are read one row group at a time, so memory stays bounded however large a shard is. Bad input is an error
that names the file (and row), never a silent skip.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow.parquet as pq
import torch


class DataError(ValueError):
    """Bad training data: the message names the file and, where it applies, the row."""


def _natural_key(path: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


def resolve_parquet_files(inputs: Sequence[str | os.PathLike]) -> list[str]:
    """Expand files, directories (their *.parquet) and globs into one list in natural sort order."""
    files: list[str] = []
    for item in inputs:
        item = str(item)
        if os.path.isdir(item):
            found = glob.glob(os.path.join(item, "**", "*.parquet"), recursive=True)
        elif any(ch in item for ch in "*?["):
            found = glob.glob(item, recursive=True)
        else:
            found = [item]
        if not found:
            raise DataError(f"{item}: no parquet files found")
        for path in found:
            if not os.path.isfile(path):
                raise DataError(f"{path}: no such file")
        files.extend(sorted(found, key=_natural_key))
    return files


def iter_texts(files: Sequence[str], text_column: str = "text") -> Iterator[str]:
    """Every document's text, shard by shard, row group by row group."""
    for path in files:
        try:
            parquet = pq.ParquetFile(path)
        except Exception as error:  # pyarrow raises several types for unreadable files
            raise DataError(f"{path}: not a readable parquet file ({error})") from error
        if text_column not in parquet.schema_arrow.names:
            raise DataError(
                f"{path}: no column {text_column!r}; columns are {parquet.schema_arrow.names}"
            )
        row = 0
        for group in range(parquet.num_row_groups):
            column = parquet.read_row_group(group, columns=[text_column]).column(0)
            for text in column.to_pylist():
                if not isinstance(text, str):
                    raise DataError(f"{path}: row {row}: {text_column!r} is {type(text).__name__}, not a string")
                yield text
                row += 1


def tokenize_to_stream(
    texts: Iterator[str], tokenizer, boundary_id: int, batch_size: int = 256
) -> np.ndarray:
    """All documents' tokens concatenated, each document followed by `boundary_id`, as one uint32 array."""
    pieces: list[np.ndarray] = []
    batch: list[str] = []

    def flush():
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            pieces.append(np.asarray(ids + [boundary_id], dtype=np.uint32))
        batch.clear()

    for text in texts:
        batch.append(text)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if not pieces:
        raise DataError("no documents to tokenize")
    return np.concatenate(pieces)


class TokenWindows:
    """Non-overlapping windows of seq_len + 1 tokens cut from one token stream; window i starts at i * seq_len so
    the last token of one window is the first of the next (every token is a target exactly once)."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        if len(tokens) < seq_len + 1:
            raise DataError(f"{len(tokens)} tokens cannot fill one window of {seq_len + 1}")
        self.tokens = tokens
        self.seq_len = seq_len

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def __getitem__(self, index: int) -> torch.Tensor:
        start = index * self.seq_len
        return torch.from_numpy(self.tokens[start : start + self.seq_len + 1].astype(np.int64))

