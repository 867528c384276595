"""Finding and reading parquet: files, folders, globs and hf:// paths; the text column, row group by row group."""

from __future__ import annotations

import glob
import hashlib
import os
import re
from collections.abc import Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from .settings import DataError, DocumentSettings

HUB_PREFIX = "hf://"


def _natural_key(path: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


def _hub_filesystem():
    from huggingface_hub import HfFileSystem

    return HfFileSystem()


def resolve_parquet_files(inputs: Sequence[str | os.PathLike]) -> list[str]:
    """Expand files, directories (their *.parquet, recursively) and globs into one list, each group in natural sort
    order (shard-2 before shard-10). `hf://datasets/...` paths and globs are resolved through huggingface_hub."""
    files: list[str] = []
    for item in inputs:
        item = str(item)
        if item.startswith(HUB_PREFIX):
            found = _resolve_hub(item)
        elif os.path.isdir(item):
            found = glob.glob(os.path.join(item, "**", "*.parquet"), recursive=True)
        elif any(ch in item for ch in "*?["):
            found = glob.glob(item, recursive=True)
        elif os.path.isfile(item):
            found = [item]
        else:
            raise DataError(f"{item}: no such file or directory")
        if not found:
            raise DataError(f"{item}: no parquet files found")
        files.extend(sorted(found, key=_natural_key))
    return files


def _resolve_hub(item: str) -> list[str]:
    fs = _hub_filesystem()
    path = item[len(HUB_PREFIX) :]
    if any(ch in path for ch in "*?["):
        found = fs.glob(path)
    elif fs.isdir(path):
        found = fs.glob(path.rstrip("/") + "/**/*.parquet")
    else:
        found = [path]
    return [HUB_PREFIX + p for p in found]


def open_parquet(path: str) -> pq.ParquetFile:
    try:
        if path.startswith(HUB_PREFIX):
            return pq.ParquetFile(_hub_filesystem().open(path[len(HUB_PREFIX) :], "rb"))
        return pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises several types for unreadable files
        raise DataError(f"{path}: not a readable parquet file ({type(error).__name__}: {error})") from error


def describe_source(path: str) -> dict:
    """Size and sha256 of a source file, for the manifest (hub files: size and the hub's LFS sha256)."""
    if path.startswith(HUB_PREFIX):
        info = _hub_filesystem().info(path[len(HUB_PREFIX) :])
        lfs = info.get("lfs") or {}
        return {"path": path, "bytes": info.get("size"), "sha256": lfs.get("sha256")}
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return {"path": path, "bytes": os.path.getsize(path), "sha256": digest.hexdigest()}


def _is_text_type(kind: pa.DataType) -> bool:
    """Strings or bytes (checked as UTF-8 row by row), plain or dictionary-encoded (pandas' category dtype)."""
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return any(check(kind) for check in (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary,
                                         pa.types.is_large_binary))


def read_text_column(path: str, parquet: pq.ParquetFile, row_group: int, settings: DocumentSettings):
    names = parquet.schema_arrow.names
    columns = [settings.text_column] + ([settings.id_column] if settings.id_column in names else [])
    try:
        table = parquet.read_row_group(row_group, columns=columns)
    except (OSError, pa.ArrowException) as error:  # damaged pages: a failed decompression, a bad page header
        rows = parquet.metadata.row_group(row_group).num_rows
        raise DataError(f"{path}: row group {row_group} ({rows} rows) cannot be read: {error}") from None
    texts = table.column(settings.text_column)
    if pa.types.is_dictionary(texts.type):
        texts = texts.cast(texts.type.value_type)  # one value per row, as a plain column holds them
    texts = texts.combine_chunks()
    ids = table.column(settings.id_column).combine_chunks() if settings.id_column in names else None
    return texts, ids


def decode_texts(texts: pa.Array) -> list:
    """Each row as str, None (null) or the UnicodeDecodeError that its bytes raise."""
    is_binary = pa.types.is_binary(texts.type) or pa.types.is_large_binary(texts.type)
    if not is_binary:
        try:
            texts.validate(full=True)  # checks UTF-8 of the whole array in C++
            return texts.to_pylist()
        except pa.ArrowInvalid:
            texts = texts.view(pa.binary() if pa.types.is_string(texts.type) else pa.large_binary())
    decoded = []
    for raw in texts.to_pylist():
        try:
            decoded.append(None if raw is None else raw.decode("utf-8"))
        except UnicodeDecodeError as error:
            decoded.append(error)
    return decoded


def iter_texts(files: Sequence[str], text_column: str = "text") -> Iterator[str]:
    """Every non-empty document text of `files`, row group by row group (for tokenizer training); a null or
    invalid-UTF-8 row is an error naming its file and row."""
    settings = DocumentSettings(text_column=text_column)
    for path in files:
        parquet = open_parquet(path)
        check_text_column(path, parquet, settings)
        row = 0
        for group in range(parquet.num_row_groups):
            texts, _ = read_text_column(path, parquet, group, settings)
            for value in decode_texts(texts):
                if value is None or isinstance(value, UnicodeDecodeError):
                    problem = "is null" if value is None else f"is not valid UTF-8 ({value})"
                    raise DataError(f"{path}: row {row}: {text_column!r} {problem}")
                if value:
                    yield value
                row += 1


def check_text_column(path: str, parquet: pq.ParquetFile, settings: DocumentSettings) -> None:
    """File-level checks before any row is read: the column exists and holds text; the file has rows."""
    schema = parquet.schema_arrow
    if settings.text_column not in schema.names:
        raise DataError(f"{path}: no column {settings.text_column!r}; columns are {schema.names}")
    kind = schema.field(settings.text_column).type
    if not _is_text_type(kind):
        raise DataError(f"{path}: column {settings.text_column!r} holds {kind}, not text")
    if parquet.metadata.num_rows == 0:
        raise DataError(f"{path}: the file has no rows")
