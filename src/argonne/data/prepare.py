"""`argonne data prepare`: parquet inputs -> filtered, tokenized uint32 shards and a manifest; `PreparedTokens` reads
them back as one memory-mapped token stream.

Input file i becomes shard i. Rows are tokenized by `tokenize_row_group` in worker processes, so the result is
byte-identical whatever the number of workers; a shard counts as finished once its NNNNN.json is written (last,
atomically), so an interrupted run resumes without redoing finished shards.

The output folder follows the output policy (outputs.py) with one addition, resuming: `prepare.json`, written
first, records what the dataset is made of (every input's size and sha256, the tokenizer, the document settings,
seq_len). The same command again resumes in place; a folder holding anything else — another dataset, a dataset
prepared from other inputs or settings — is refused without `--overwrite`, and with it the new dataset is prepared
in staging beside the old one, which stays usable until the new one replaces it whole.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..files import CHECKSUM, hash_files, read_json, write_atomic
from ..run_folder import RunLock, describe_owner
from .documents import (
    HELD_OUT,
    KEPT,
    TOKEN_DTYPE,
    RowGroupPool,
    RowGroupTokens,
    check_tokenizer_matches,
    describe_drops,
    empty_stats,
    log,
    merge_stats,
    tokenizer_fingerprint,
)
from .parquet import check_text_column, describe_source, open_parquet, resolve_parquet_files
from .settings import DataError, DocumentSettings

MANIFEST = "manifest.json"
PLAN = "prepare.json"
PLAN_FORMAT = "argonne-prepare-v1"
FORMAT = "argonne-tokens-v1"


@dataclass
class PrepareSettings:
    seq_len: int = 4096
    """Window length that `argonne data inspect` shows by default (training sets its own: data.seq_len)."""
    workers: int = 1
    documents: DocumentSettings = field(default_factory=DocumentSettings)


def _shard_paths(output: Path, index: int) -> dict[str, Path]:
    stem = output / "shards" / f"{index:05d}"
    return {"train": stem.with_suffix(".train.bin"), "val": stem.with_suffix(".val.bin"),
            "done": stem.with_suffix(".json")}


def prepare_dataset(
    inputs: Sequence[str], tokenizer, output: str | Path, settings: PrepareSettings, progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Tokenize parquet inputs into `output`: shards/NNNNN.{train,val}.bin (uint32) and manifest.json.

    Input file i becomes shard i; a shard counts as finished once its NNNNN.json is written (last, atomically), so a
    rerun after an interruption skips finished shards. `output` holding anything but this very dataset (its
    prepare.json) is refused unless `overwrite`. Returns the manifest.
    """
    from ..outputs import absolute
    from ..tokenizer import document_boundary_id

    output = absolute(output)
    files = resolve_parquet_files(inputs)
    inside = [path for path in files if "://" not in path and absolute(path).is_relative_to(output)]
    if inside:
        raise DataError(f"--output {output} holds the input {inside[0]}: a prepare never writes where its inputs are; "
                        f"choose another --output")
    tok = settings.documents
    boundary = document_boundary_id(tokenizer)
    fingerprint = tokenizer_fingerprint(tokenizer)
    config_record = {"tokenizer": fingerprint, "boundary_token_id": boundary,
                     "document_settings": tok.tokens_record()}
    plan = {"format": PLAN_FORMAT, "seq_len": settings.seq_len, **config_record}
    if not overwrite:
        check_resumable_into(output, plan)  # before the inputs are hashed (minutes for terabytes)
    plan["sources"] = [describe_source(path) for path in files]
    with dataset_folder(output, plan, overwrite) as folder:
        return _prepare_into(folder, files, plan, config_record, tokenizer, boundary, settings, progress)


@contextmanager
def dataset_folder(output: Path, plan: dict, overwrite: bool) -> Iterator[Path]:
    """The folder to prepare into: `output` itself when it is new, empty or an unfinished (or finished) prepare of
    the same plan (resumed); staging beside it, moved into place at the end, when `overwrite` replaces another
    dataset. Anything else is refused, naming what differs."""
    from ..outputs import FOLDER, Output, check_place

    if not overwrite or _resumable(output, plan):
        check_place(output, FOLDER)
        output.mkdir(parents=True, exist_ok=True)
        with PrepareLock(output):  # one prepare at a time writes in place; then the folder is checked again
            check_resumable_into(output, plan)
            (output / "shards").mkdir(exist_ok=True)
            write_atomic(output / PLAN, json.dumps(plan, indent=2))
            yield output
        return
    with Output(output, FOLDER, overwrite=True).staged() as staging:
        (staging / "shards").mkdir()
        write_atomic(staging / PLAN, json.dumps(plan, indent=2))
        yield staging


class PrepareLock(RunLock):
    """The run folder's lock (an flock, or a directory where there are none), on a prepare's output folder."""

    LOCK_NAME = ".prepare.lock"

    def _in_use(self, owner: dict | None) -> str:
        return (f"--output {self.run_dir} is being prepared by {describe_owner(owner)}; wait for it to finish (its "
                f"result is this same dataset only if its inputs and settings are), or choose another --output")


def _holds_anything(output: Path) -> bool:
    """Whether the folder holds anything but a prepare's lock (left by every prepare, running or not)."""
    return output.exists() and any(not p.name.startswith(PrepareLock.LOCK_NAME) for p in output.iterdir())


def _resumable(output: Path, plan: dict) -> bool:
    return not _holds_anything(output) or _read_plan(output / PLAN) == plan


def check_resumable_into(output: Path, plan: dict) -> None:
    """Refuse an output folder that holds anything but a prepare of `plan` (new, empty, or the same plan: resumed).
    Without its "sources" (not hashed yet), only what the plan has is compared."""
    from ..outputs import FOLDER, check_place, describe_contents, recover

    check_place(output, FOLDER)
    recover(output)
    if not _holds_anything(output):
        return
    earlier = _read_plan(output / PLAN)
    if earlier is not None and all(earlier.get(key) == value for key, value in plan.items()):
        return
    what = (f"a dataset prepared with other {', '.join(_plan_differences(earlier, plan))}" if earlier
            else describe_contents(output))
    raise DataError(f"--output {output} already holds {what}; rerun with the same inputs and settings to "
                    f"resume it, pass --overwrite to replace it, or choose another --output")


def _read_plan(path: Path) -> dict | None:
    """The plan a folder was prepared with; None without one, or with a damaged one (then it is no plan of ours:
    the folder is refused like any other that holds something)."""
    try:
        return read_json(path, DataError, "prepare record")
    except DataError:
        return None


def _plan_differences(earlier: dict, plan: dict) -> list[str]:
    names = {"tokenizer": "tokenizer", "boundary_token_id": "document boundary token",
             "document_settings": "document settings", "seq_len": "--seq-len", "format": "Argonne version",
             "sources": "inputs (paths, sizes or contents)"}
    if "sources" in plan and _without_paths(earlier.get("sources")) == _without_paths(plan["sources"]):
        given = ", ".join(str(source.get("path")) for source in earlier["sources"])
        names["sources"] = f"input paths (the same files by size and sha256: give them as before, {given})"
    return [names.get(key, key) for key in plan if earlier.get(key) != plan[key]] or ["settings"]


def _without_paths(sources) -> list | None:
    if not isinstance(sources, list) or not all(isinstance(source, dict) for source in sources):
        return None
    return [{key: value for key, value in source.items() if key != "path"} for source in sources]


def _prepare_into(output: Path, files: list[str], plan: dict, config_record: dict, tokenizer, boundary: int,
                  settings: PrepareSettings, progress: bool) -> dict:
    from tqdm.auto import tqdm

    tok = settings.documents
    shards, skipped_files, stats = [], [], empty_stats()
    bar = tqdm(total=len(files), unit="file", disable=not progress, desc="prepare")
    progress_counts = {"documents": 0, "tokens": 0}

    def count(part: RowGroupTokens) -> None:
        progress_counts["documents"] += part.stats[KEPT]["documents"] + part.stats[HELD_OUT]["documents"]
        progress_counts["tokens"] += len(part.tokens) + len(part.val_tokens)
        bar.set_postfix({k: f"{v:,}" for k, v in progress_counts.items()})

    with RowGroupPool(tokenizer, boundary, settings.workers) as pool:
        for index, (path, source) in enumerate(zip(files, plan["sources"])):
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
        "format": FORMAT,
        "dtype": "uint32",
        "checksum": CHECKSUM,
        "seq_len": settings.seq_len,
        **config_record,
        "sources": [s["source"] for s in shards],
        "shards": [_manifest_entry(s) for s in shards],
        "skipped_files": skipped_files,
        "train_tokens": sum(s["train_tokens"] for s in shards),
        "val_tokens": sum(s["val_tokens"] for s in shards),
        "documents": {reason: stats[reason]["documents"] for reason in stats},
        "stats": stats,
    }
    write_atomic(output / MANIFEST, json.dumps(manifest, indent=2))
    return manifest


def _manifest_entry(shard: dict) -> dict:
    """A shard as the manifest lists it, with the checksums of its files: its done record's (taken when it was
    written, and checked when a resumed prepare found it finished)."""
    keys = ("index", "train_file", "val_file", "train_tokens", "val_tokens", "stats", "train_sha256", "val_sha256")
    return {k: shard[k] for k in keys}


def _finished_shard(done: Path, source: dict, config_record: dict) -> dict | None:
    if not done.is_file():
        return None
    record = read_json(done, DataError, "shard done record (delete it to prepare the shard again)")
    if record.get("source") != source or record.get("config") != config_record:
        log.info("redoing %s: its source or settings changed", done.name)
        return None
    if record.get("skipped"):
        return record
    problem = _shard_files_problem(done.parent.parent, record)
    if problem:
        log.warning("redoing %s: %s", done.name, problem)
        return None
    return record


def _shard_files_problem(output: Path, record: dict) -> str | None:
    """Why a finished shard's token files are not what its done record says (missing, another size, another
    checksum), or None. A record written before records held checksums is checked by sizes and hashed now."""
    names = [record.get("train_file"), record.get("val_file")]
    if not all(isinstance(name, str) and (output / name).is_file() for name in names):
        return "its token files are missing"
    for split, name in zip(("train", "val"), names):
        if (output / name).stat().st_size != record.get(f"{split}_tokens", -1) * TOKEN_DTYPE().itemsize:
            return f"{name} is not the size its record says"
    sums = hash_files(output, names)
    for split, name in zip(("train", "val"), names):
        if record.setdefault(f"{split}_sha256", sums[name]["sha256"]) != sums[name]["sha256"]:
            return f"{name} does not match its checksum"
    return None


def _prepare_shard(path, source, paths, pool: RowGroupPool, tok: DocumentSettings, config_record, on_part) -> dict:
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


def _write_shard(path, paths, tmps, pool: RowGroupPool, tok: DocumentSettings, record: dict, on_part) -> dict:
    """Tokenize one input file into the temporary files `tmps`, then rename them and mark the shard done."""
    stats = empty_stats()
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
            raise DataError(f"{path}: no document left after filtering ({describe_drops(stats)})")
    except DataError as error:
        if tok.on_error != "skip":
            raise
        log.warning("skipping file %s", error)
        record.update(skipped=str(error), stats=stats)  # rows read before the error stay accounted for
        return record
    os.replace(train_tmp, paths["train"])
    os.replace(val_tmp, paths["val"])
    sums = hash_files(paths["train"].parent, [paths["train"].name, paths["val"].name])
    record.update(
        train_file=f"shards/{paths['train'].name}",
        val_file=f"shards/{paths['val'].name}",
        train_tokens=train_tokens,
        val_tokens=val_tokens,
        train_sha256=sums[paths["train"].name]["sha256"],
        val_sha256=sums[paths["val"].name]["sha256"],
        stats=stats,
    )
    write_atomic(paths["done"], json.dumps(record, indent=2))
    return record


def load_manifest(directory: str | Path) -> dict:
    """A prepared dataset's manifest, every field its readers use checked (`read_manifest`)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise DataError(f"{directory}: no {MANIFEST}; is it the output of `argonne data prepare` (and did it finish)?")
    return read_manifest(path)


# The manifest's fields that its readers use, with their JSON types; the tokenizer record's and each shard's.
MANIFEST_FIELDS = {"format": str, "dtype": str, "seq_len": int, "tokenizer": dict, "boundary_token_id": int,
                   "sources": list, "shards": list, "skipped_files": list, "train_tokens": int, "val_tokens": int,
                   "stats": dict}
TOKENIZER_FIELDS = {"name": str, "vocab_size": int, "vocab_sha256": str}
SHARD_FIELDS = {"index": int, "train_file": str, "val_file": str, "train_tokens": int, "val_tokens": int}
SHARD_CHECKSUM_FIELDS = {"train_sha256": str, "val_sha256": str}  # manifests before 2027-01 have none


def read_manifest(path: Path) -> dict:
    """manifest.json of a prepared dataset, checked: its format, and every field a reader uses present with its
    type; the shard files must lie in the dataset's shards/ folder. Anything else is a DataError naming the file
    and the field."""
    manifest = read_json(path, DataError, "prepared-data manifest")
    problems = _field_problems(manifest, MANIFEST_FIELDS, "")
    if not problems:
        if manifest["format"] != FORMAT or manifest["dtype"] != "uint32":
            problems.append(f"format {manifest['format']!r} / dtype {manifest['dtype']!r}, this Argonne reads "
                            f"{FORMAT!r} / 'uint32'")
        problems += _field_problems(manifest["tokenizer"], TOKENIZER_FIELDS, "tokenizer.")
        for number, shard in enumerate(manifest["shards"]):
            problems += _shard_problems(shard, f"shards[{number}].")
        if not manifest["shards"]:
            problems.append("shards is empty")
    if problems:
        raise DataError(f"{path}: not a valid prepared-data manifest: {'; '.join(problems[:5])}. Prepare the data "
                        f"again (argonne data prepare)")
    return manifest


def _field_problems(record, fields: dict[str, type], prefix: str) -> list[str]:
    if not isinstance(record, dict):
        return [f"{prefix.rstrip('.')} is not a JSON object"]
    problems = []
    for name, kind in fields.items():
        if name not in record:
            problems.append(f"{prefix}{name} is missing")
        elif not isinstance(record[name], kind) or isinstance(record[name], bool) and kind is int:
            problems.append(f"{prefix}{name} is {type(record[name]).__name__}, not {kind.__name__}")
    return problems


def _shard_problems(shard, prefix: str) -> list[str]:
    problems = _field_problems(shard, SHARD_FIELDS, prefix)
    if problems:
        return problems
    problems += [p for p in _field_problems(shard, SHARD_CHECKSUM_FIELDS, prefix) if not p.endswith("missing")]
    for key in ("train_file", "val_file"):
        parts = Path(shard[key]).parts
        if len(parts) != 2 or parts[0] != "shards" or parts[1] in (".", ".."):
            problems.append(f"{prefix}{key} {shard[key]!r} is not a file of the dataset's shards/ folder")
    for key in ("train_tokens", "val_tokens"):
        if shard[key] < 0:
            problems.append(f"{prefix}{key} is negative")
    return problems


def verify_shards(directory: str | Path, manifest: dict, rank: int = 0, world: int = 1, group=None,
                  checksums: bool = True) -> bool:
    """Check the token shards of a prepared dataset against the manifest: every size, and the checksums of this
    process's share (shards rank, rank + world, ...: the processes of a run split the hashing). A shard that
    differs is a DataError naming it. Returns False for a dataset prepared before checksums were recorded (its
    sizes checked only), True once verified.

    Cost: hashing reads every byte once, at 1.6 GB/s with 2 cores from the page cache (benchmarks/RESULTS.md,
    2026-12-07; more threads where there are more cores, the disk's rate when cold): a 1 TB dataset (250 G tokens)
    costs each of 64 processes about 10 s at start-up, a 10 GB one well under a second."""
    directory = Path(directory)
    problems, recorded = [], {}
    for shard in manifest["shards"]:
        for split in ("train", "val"):
            name, tokens = shard[f"{split}_file"], shard[f"{split}_tokens"]
            file = directory / name
            if not file.is_file():
                problems.append(f"{file} is missing")
            elif file.stat().st_size != tokens * TOKEN_DTYPE().itemsize:
                problems.append(f"{file} has {file.stat().st_size:,} bytes, the manifest says {tokens:,} tokens "
                                f"({tokens * TOKEN_DTYPE().itemsize:,} bytes)")
            elif f"{split}_sha256" in shard:
                recorded[name] = shard[f"{split}_sha256"]
    if problems:
        raise DataError(f"{directory}: the prepared data does not match its {MANIFEST}: {'; '.join(problems[:5])}")
    if not checksums or not recorded or manifest.get("checksum") != CHECKSUM:
        return False
    mine = sorted(recorded)[rank::world]
    for name, found in hash_files(directory, mine).items():
        if found["sha256"] != recorded[name]:
            problems.append(f"{directory / name} does not match its checksum (changed or damaged since it was "
                            f"prepared)")
    problems = _from_every_process(problems, group)  # every process raises, not only the one that hashed it
    if problems:
        raise DataError(f"{'; '.join(problems)}; prepare the data again (argonne data prepare)")
    return True


def _from_every_process(problems: list[str], group) -> list[str]:
    """Every process's problems, in every process of `group` (a host-side gloo group; None: this process's)."""
    from ..checkpoint import gather_objects

    return problems if group is None else [problem for part in gather_objects(problems, group) for problem in part]


def open_prepared(directory: str | Path, rank: int = 0, world: int = 1, group=None, checksums: bool = True) -> dict:
    """The manifest of a prepared dataset whose shards were verified (`verify_shards`, the hashing split across the
    data-parallel processes and their findings shared over `group`; sizes only without `checksums`); a dataset
    prepared before checksums were recorded opens with a one-line warning that it was not verified."""
    manifest = load_manifest(directory)
    if not verify_shards(directory, manifest, rank, world, group, checksums) and checksums:
        warnings.warn(f"{directory}: prepared before shard checksums were recorded; its shards were checked for "
                      f"size only (prepare it again to have them verified)", stacklevel=2)
    return manifest


def recorded_settings(manifest: dict) -> dict:
    """The document settings a prepared dataset was made with (manifests before 2026-12 nested the filters)."""
    if "document_settings" in manifest:
        return manifest["document_settings"]
    old = dict(manifest.get("tokenize", {}))
    old.pop("on_error", None)
    return old | old.pop("filters", {})


def check_prepared_settings(manifest: dict, settings: DocumentSettings, directory: str) -> None:
    """Training on prepared data uses the settings it was prepared with: a run config that sets a document setting
    to something else (it would apply only when streaming) is an error naming both values."""
    recorded, defaults = recorded_settings(manifest), DocumentSettings()
    differing = [
        f"data.{name} = {getattr(settings, name)!r} (prepared with {recorded[name]!r})"
        for name in settings.tokens_record()
        if name in recorded and getattr(settings, name) != getattr(defaults, name)
        and getattr(settings, name) != recorded[name]
    ]
    if differing:
        raise DataError(
            f"{directory} was prepared with other document settings than the run config sets: {'; '.join(differing)}. "
            f"Prepare it again with these settings, or remove them from the config (prepared data keeps its own)"
        )


class PreparedTokens:
    """One split of a prepared dataset as a single token stream, read through memory maps."""

    def __init__(self, directory: str | Path, split: str = "train", tokenizer=None, manifest: dict | None = None):
        self.directory = Path(directory)
        self.manifest = manifest if manifest is not None else load_manifest(directory)
        if tokenizer is not None:
            check_tokenizer_matches(self.manifest["tokenizer"], tokenizer, str(directory))
        key = f"{split}_file"
        self.arrays, self.paths = [], []
        for shard in self.manifest["shards"]:
            if shard[f"{split}_tokens"]:
                path = self.directory / shard[key]
                array = _token_map(path)
                if len(array) != shard[f"{split}_tokens"]:
                    raise DataError(f"{path}: {len(array)} tokens, but the manifest says {shard[f'{split}_tokens']}")
                self.arrays.append(array)
                self.paths.append(path)
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])

    def where(self, position: int) -> str:
        """The shard file and token index within it of stream position `position` (for error messages)."""
        shard = int(np.searchsorted(self.offsets, position, side="right")) - 1
        return f"{self.paths[shard]}, token {position - self.offsets[shard]:,}"

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length), across shard boundaries where needed."""
        pieces, end = [], start + length
        shard = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while start < end:
            local = start - self.offsets[shard]
            take = min(end - start, len(self.arrays[shard]) - local)
            pieces.append(self.arrays[shard][local : local + take])
            start += take
            shard += 1
        return np.concatenate(pieces) if len(pieces) > 1 else np.array(pieces[0])


def _token_map(path: Path) -> np.ndarray:
    try:
        return np.memmap(path, dtype=TOKEN_DTYPE, mode="r")
    except (OSError, ValueError) as error:  # missing, unreadable, or a size that is not a whole number of tokens
        raise DataError(f"{path}: not a readable token shard ({error}); prepare the data again") from None
