"""Training text: parquet shards -> quality filters -> tokens with document boundaries -> one token stream.

Two modes share one code path, `tokenize_row_group`, which turns one parquet row group into kept documents' tokens
(each followed by the boundary token) and a per-reason account of every document:

* `prepare_dataset` (`argonne data prepare`) runs it in worker processes and writes one uint32 token shard per input
  file plus a manifest; the result is byte-identical whatever the number of workers, and an interrupted run resumes
  without redoing finished shards.
* `StreamingTokens` runs it ahead of training in background processes and yields the same token stream straight from
  parquet, with a resumable position (file, row, token offset).

Shards are read one row group at a time, so memory stays bounded however large a shard is. Bad input is an error that
names the file (and row), or, with on_error="skip", a logged and counted skip; nothing is dropped silently.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import multiprocessing
import os
import re
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger("argonne.data")

TOKEN_DTYPE = np.uint32  # Qwen2.5's 151,665 tokens do not fit uint16
MANIFEST = "manifest.json"
HUB_PREFIX = "hf://"


class DataError(ValueError):
    """Bad training data: the message names the file and, where it applies, the row."""


# ----------------------------------------------------------------------------------------------------- sources


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


# ----------------------------------------------------------------------------------------------------- filters


@dataclass
class FilterConfig:
    """The original Argonne code's quality rules, as defaults.

    Texts longer than `ratio_rules_min_chars` characters are dropped when Unicode decimal digits make up more than
    `max_digit_fraction` of their characters, or letters plus whitespace less than `min_letter_space_fraction`.
    Documents with fewer than `min_tokens` tokens (boundary not counted) are dropped.
    """

    ratio_rules_min_chars: int = 50
    max_digit_fraction: float = 0.5
    min_letter_space_fraction: float = 0.3
    min_tokens: int = 10


# Every document ends up under exactly one of these.
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


def char_filter_reasons(texts: list[str], filters: FilterConfig) -> list[str | None]:
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


# ----------------------------------------------------------------------------------------------------- tokenizing


@dataclass
class TokenizeSettings:
    text_column: str = "text"
    id_column: str = "id"
    """Column whose value decides the validation split; without it, the document's text is hashed instead."""
    val_fraction: float = 0.0
    on_error: str = "fail"
    """"fail": bad input raises DataError; "skip": it is logged and counted, and the run goes on."""
    filters: FilterConfig = field(default_factory=FilterConfig)


@dataclass
class RowGroupTokens:
    """What one row group gives: kept training documents as one concatenated stream, held-out documents, and the
    account of every row."""

    tokens: np.ndarray  # uint32, each kept document followed by the boundary token
    doc_rows: np.ndarray  # row (within the file) of each kept document
    doc_lengths: np.ndarray  # tokens of each kept document, boundary included
    val_tokens: np.ndarray
    stats: dict  # reason -> {"documents": n, "tokens": n}


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


def _empty_stats() -> dict:
    return {reason: {"documents": 0, "tokens": 0} for reason in (KEPT, HELD_OUT, *DROP_REASONS)}


def _is_text_type(kind: pa.DataType) -> bool:
    """Strings or bytes (checked as UTF-8 row by row), plain or dictionary-encoded (pandas' category dtype)."""
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return any(check(kind) for check in (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary,
                                         pa.types.is_large_binary))


def _read_text_column(path: str, parquet: pq.ParquetFile, row_group: int, settings: TokenizeSettings):
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


def _decode_texts(texts: pa.Array) -> list:
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
    settings = TokenizeSettings(text_column=text_column)
    for path in files:
        parquet = open_parquet(path)
        check_text_column(path, parquet, settings)
        row = 0
        for group in range(parquet.num_row_groups):
            texts, _ = _read_text_column(path, parquet, group, settings)
            for value in _decode_texts(texts):
                if value is None or isinstance(value, UnicodeDecodeError):
                    problem = "is null" if value is None else f"is not valid UTF-8 ({value})"
                    raise DataError(f"{path}: row {row}: {text_column!r} {problem}")
                if value:
                    yield value
                row += 1


def tokenize_row_group(path: str, row_group: int, settings: TokenizeSettings) -> RowGroupTokens:
    """Read, check, filter, split and tokenize one row group (runs in a worker; see `_init_worker`)."""
    _, boundary_id = _worker_tokenizer
    parquet = open_parquet(path)
    first_row = sum(parquet.metadata.row_group(i).num_rows for i in range(row_group))
    stats = _empty_stats()
    try:
        texts, ids = _read_text_column(path, parquet, row_group, settings)
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
    for offset, value in enumerate(_decode_texts(texts)):
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

    reasons = char_filter_reasons(strings, settings.filters)
    encoded = _encode(strings) if strings else []
    kept, kept_rows, held_out = [], [], []
    for row, text, ids_, reason in zip(rows, strings, encoded, reasons):
        if reason is None and len(ids_) < settings.filters.min_tokens:
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


def check_text_column(path: str, parquet: pq.ParquetFile, settings: TokenizeSettings) -> None:
    """File-level checks before any row is read: the column exists and holds text; the file has rows."""
    schema = parquet.schema_arrow
    if settings.text_column not in schema.names:
        raise DataError(f"{path}: no column {settings.text_column!r}; columns are {schema.names}")
    kind = schema.field(settings.text_column).type
    if not _is_text_type(kind):
        raise DataError(f"{path}: column {settings.text_column!r} holds {kind}, not text")
    if parquet.metadata.num_rows == 0:
        raise DataError(f"{path}: the file has no rows")


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
            context.set_forkserver_preload(["argonne.data"])
            self.executor = ProcessPoolExecutor(
                workers, mp_context=context, initializer=_init_worker, initargs=(tokenizer_json, boundary_id)
            )

    def map(self, tasks: Iterator[tuple[str, int, TokenizeSettings]]) -> Iterator[RowGroupTokens]:
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


# ----------------------------------------------------------------------------------------------------- prepare


@dataclass
class PrepareSettings:
    seq_len: int = 4096
    workers: int = 1
    tokenize: TokenizeSettings = field(default_factory=TokenizeSettings)


def _shard_paths(output: Path, index: int) -> dict[str, Path]:
    stem = output / "shards" / f"{index:05d}"
    return {"train": stem.with_suffix(".train.bin"), "val": stem.with_suffix(".val.bin"),
            "done": stem.with_suffix(".json")}


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def prepare_dataset(
    inputs: Sequence[str], tokenizer, output: str | Path, settings: PrepareSettings, progress: bool = True
) -> dict:
    """Tokenize parquet inputs into `output`: shards/NNNNN.{train,val}.bin (uint32) and manifest.json.

    Input file i becomes shard i; a shard counts as finished once its NNNNN.json is written (last, atomically), so a
    rerun after an interruption skips finished shards whose source is unchanged. Returns the manifest.
    """
    from tqdm.auto import tqdm

    from .tokenizer import document_boundary_id

    output = Path(output)
    (output / "shards").mkdir(parents=True, exist_ok=True)
    files = resolve_parquet_files(inputs)
    tok = settings.tokenize
    boundary = document_boundary_id(tokenizer)
    fingerprint = tokenizer_fingerprint(tokenizer)
    config_record = {"tokenizer": fingerprint, "boundary_token_id": boundary,
                     "tokenize": asdict(tok) | {"on_error": None}}
    shards, skipped_files, stats = [], [], _empty_stats()
    bar = tqdm(total=len(files), unit="file", disable=not progress, desc="prepare")
    progress_counts = {"documents": 0, "tokens": 0}

    def count(part: RowGroupTokens) -> None:
        progress_counts["documents"] += part.stats[KEPT]["documents"] + part.stats[HELD_OUT]["documents"]
        progress_counts["tokens"] += len(part.tokens) + len(part.val_tokens)
        bar.set_postfix({k: f"{v:,}" for k, v in progress_counts.items()})

    with RowGroupPool(tokenizer, boundary, settings.workers) as pool:
        for index, path in enumerate(files):
            source = describe_source(path)
            paths = _shard_paths(output, index)
            record = _finished_shard(paths["done"], source, config_record)
            if record is None:
                record = _prepare_shard(path, source, paths, pool, tok, config_record, count)
            if record.get("skipped"):
                skipped_files.append({"path": path, "reason": record["skipped"]})
            else:
                shards.append(record)
            merge_stats(stats, record["stats"])
            bar.update(1)
    bar.close()
    if not shards:
        raise DataError(f"no documents left in any of {len(files)} input file(s)")
    manifest = {
        "format": "argonne-tokens-v1",
        "dtype": "uint32",
        "seq_len": settings.seq_len,
        **config_record,
        "sources": [s["source"] for s in shards],
        "shards": [{k: s[k] for k in ("index", "train_file", "val_file", "train_tokens", "val_tokens", "stats")}
                   for s in shards],
        "skipped_files": skipped_files,
        "train_tokens": sum(s["train_tokens"] for s in shards),
        "val_tokens": sum(s["val_tokens"] for s in shards),
        "documents": {reason: stats[reason]["documents"] for reason in stats},
        "stats": stats,
    }
    _write_atomic(output / MANIFEST, json.dumps(manifest, indent=2).encode("utf-8"))
    return manifest


def _finished_shard(done: Path, source: dict, config_record: dict) -> dict | None:
    if not done.is_file():
        return None
    record = json.loads(done.read_text())
    if record.get("source") != source or record.get("config") != config_record:
        log.info("redoing %s: its source or settings changed", done.name)
        return None
    return record


def _prepare_shard(path, source, paths, pool: RowGroupPool, tok: TokenizeSettings, config_record, on_part) -> dict:
    train_tmp = paths["train"].with_name(paths["train"].name + ".tmp")
    val_tmp = paths["val"].with_name(paths["val"].name + ".tmp")
    record = {"index": int(paths["done"].stem), "source": source, "config": config_record}
    try:
        return _write_shard(path, paths, (train_tmp, val_tmp), pool, tok, record, on_part)
    finally:
        # A shard that failed, was skipped or was interrupted (Ctrl-C) leaves no partial files behind; a finished
        # one has already renamed them.
        train_tmp.unlink(missing_ok=True)
        val_tmp.unlink(missing_ok=True)


def _write_shard(path, paths, tmps, pool: RowGroupPool, tok: TokenizeSettings, record: dict, on_part) -> dict:
    """Tokenize one input file into the temporary files `tmps`, then rename them and mark the shard done."""
    stats = _empty_stats()
    train_tmp, val_tmp = tmps
    try:
        parquet = open_parquet(path)
        check_text_column(path, parquet, tok)
        train_tokens = val_tokens = 0
        with open(train_tmp, "wb") as train_f, open(val_tmp, "wb") as val_f:
            tasks = ((path, g, tok) for g in range(parquet.num_row_groups))
            for part in pool.map(tasks):
                train_f.write(part.tokens.tobytes())
                val_f.write(part.val_tokens.tobytes())
                train_tokens += len(part.tokens)
                val_tokens += len(part.val_tokens)
                merge_stats(stats, part.stats)
                on_part(part)
            for f in (train_f, val_f):
                f.flush()
                os.fsync(f.fileno())
        if stats[KEPT]["documents"] + stats[HELD_OUT]["documents"] == 0:
            raise DataError(f"{path}: no document left after filtering ({_describe_drops(stats)})")
    except DataError as error:
        if tok.on_error != "skip":
            raise
        log.warning("skipping file %s", error)
        record.update(skipped=str(error), stats=stats)  # rows read before the error stay accounted for
        return record
    os.replace(train_tmp, paths["train"])
    os.replace(val_tmp, paths["val"])
    record.update(
        train_file=f"shards/{paths['train'].name}",
        val_file=f"shards/{paths['val'].name}",
        train_tokens=train_tokens,
        val_tokens=val_tokens,
        stats=stats,
    )
    _write_atomic(paths["done"], json.dumps(record, indent=2).encode("utf-8"))
    return record


def _describe_drops(stats: dict) -> str:
    drops = [f"{reason}: {stats[reason]['documents']}" for reason in DROP_REASONS if stats[reason]["documents"]]
    return ", ".join(drops) or "no rows"


def load_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise DataError(f"{directory}: no {MANIFEST}; is it the output of `argonne data prepare` (and did it finish)?")
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------------------------------- streaming


@dataclass
class StreamPosition:
    """Where the token stream continues: token `offset` of the kept document at `row` of input file `file`."""

    file: int = 0
    row: int = 0
    offset: int = 0


class StreamingTokens:
    """The token stream of `prepare_dataset`'s training split, made on the fly from parquet.

    Row groups are tokenized ahead in background worker processes. `read_from(position)` yields (tokens, position)
    chunks, where `position` is where each chunk starts; the packer turns them into windows and records, for the
    next window, the position to resume from.
    """

    def __init__(self, inputs: Sequence[str], tokenizer, settings: TokenizeSettings, workers: int = 1):
        from .tokenizer import document_boundary_id

        self.files = resolve_parquet_files(inputs)
        self.tokenizer = tokenizer
        self.boundary = document_boundary_id(tokenizer)
        self.settings = settings
        self.workers = workers
        self._skipped = _no_skips()

    def skipped(self) -> dict[str, int]:
        """What on_error="skip" has skipped so far in this process, as prepare's manifest counts it: rows whose text
        is null or not UTF-8, and whole files (unreadable, no text column, no document left). Every pass counts: a
        row skipped in two epochs counts twice."""
        return dict(self._skipped)

    def read_from(self, start: StreamPosition) -> Iterator[tuple[np.ndarray, StreamPosition]]:
        with RowGroupPool(self.tokenizer, self.boundary, self.workers) as pool:
            for part, file_index in pool_map_files(pool, self.files, start.file, self.settings, self._skipped):
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


def pool_map_files(pool: RowGroupPool, files: list[str], first_file: int, settings: TokenizeSettings,
                   skipped: dict[str, int] | None = None):
    """(RowGroupTokens, file index) for every row group of files[first_file:], in order; bad files as in prepare.
    `skipped` (see `_no_skips`) adds up the rows and files skipped; the row counts come back from the workers in
    each part's stats."""
    skipped = _no_skips() if skipped is None else skipped

    def tasks():
        for index in range(first_file, len(files)):
            path = files[index]
            try:
                parquet = open_parquet(path)
                check_text_column(path, parquet, settings)
            except DataError as error:
                if settings.on_error != "skip":
                    raise
                log.warning("skipping file %s", error)
                skipped["files"] += 1
                continue
            for group in range(parquet.num_row_groups):
                yield index, (path, group, settings)

    task_list = tasks()
    indices: deque[int] = deque()

    def only_tasks():
        for index, task in task_list:
            indices.append(index)
            yield task

    # A file with no document left after filtering is bad input here too, as in prepare.
    current, current_stats = None, _empty_stats()

    def check_finished_file():
        if current is not None and current_stats[KEPT]["documents"] + current_stats[HELD_OUT]["documents"] == 0:
            error = DataError(f"{files[current]}: no document left after filtering ({_describe_drops(current_stats)})")
            if settings.on_error != "skip":
                raise error
            log.warning("skipping file %s", error)
            skipped["files"] += 1

    for part in pool.map(only_tasks()):
        index = indices.popleft()
        if index != current:
            check_finished_file()
            current, current_stats = index, _empty_stats()
        merge_stats(current_stats, part.stats)
        for reason in SKIPPED_ROWS:
            skipped[reason] += part.stats[reason]["documents"]
        yield part, index
    check_finished_file()



def held_out_tokens(stream: StreamingTokens, max_tokens: int):
    """The held-out (validation) documents' tokens, in stream order, up to `max_tokens` (an in-memory stream)."""
    from .loader import InMemoryTokens

    parts, total = [], 0
    with RowGroupPool(stream.tokenizer, stream.boundary, stream.workers) as pool:
        for part, _ in pool_map_files(pool, stream.files, 0, stream.settings):
            parts.append(part.val_tokens)
            total += len(part.val_tokens)
            if total >= max_tokens:
                break
    tokens = np.concatenate(parts) if parts else np.zeros(0, TOKEN_DTYPE)
    return InMemoryTokens(tokens[:max_tokens])
