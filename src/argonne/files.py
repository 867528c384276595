"""The project's low-level file habits, one home each:

* `write_atomic`: files that a crash never leaves half-written: the new content goes to a temporary file beside the
  target, is flushed to disk, then renamed over it (a rename within a folder is atomic), so a reader finds the old
  content or the new.
* `read_json`: every JSON file the project reads, so that a missing, empty, truncated or mistyped one is the
  caller's user error (a ValueError subclass) naming the file, never a bare `JSONDecodeError` or `KeyError`.
* `hash_files`: the checksums recorded for checkpoints and prepared token shards (and verified before use).
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def write_atomic(path: Path, data: str | bytes) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")  # one name: a write killed midway leaves nothing the next one keeps
    with open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ reading


def read_text(path: Path, error_class: type[ValueError], what: str) -> str:
    """A UTF-8 text file's content; missing, unreadable or not UTF-8 is `error_class` naming the file."""
    path = Path(path)
    try:
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise error_class(f"{path}: not a valid {what} (the file is missing)") from None
    except OSError as error:
        raise error_class(f"{path}: not a valid {what} (cannot be read: {error.strerror or error})") from None
    except UnicodeDecodeError as error:
        raise error_class(f"{path}: not a valid {what} (not UTF-8 text: byte {error.start} is "
                          f"{error.object[error.start]:#04x})") from None


def read_json(path: Path, error_class: type[ValueError], what: str, expect: type = dict):
    """The JSON value in `path`, of type `expect` (dict, list; None: any). Whatever keeps it from being one — the
    file missing or unreadable, empty, cut off, not JSON, not UTF-8, another type at the top — is
    `error_class(f"{path}: not a valid {what} (reason)")`, so each caller raises its own user error naming the file.
    Checking the fields inside is the caller's (its reader of that file kind)."""
    text = read_text(path, error_class, what)
    if not text.strip():
        raise error_class(f"{path}: not a valid {what} (the file is empty)")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise error_class(f"{path}: not a valid {what} (not JSON, or cut off: {error.msg}: line {error.lineno} "
                          f"column {error.colno})") from None
    if expect is not None and not isinstance(value, expect):
        raise error_class(f"{path}: not a valid {what} (a JSON {_json_type(value)}, not a JSON "
                          f"{_json_type(expect())})")
    return value


def _json_type(value) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


# ------------------------------------------------------------------------------------------------ checksums

# A file's digest is the sha256 of the sha256 digests of its consecutive 64 MiB pieces, so that the pieces of one
# large file (a rank's checkpoint shard, a prepared token shard) are hashed by several threads at once.
PIECE_BYTES = 64 << 20
CHECKSUM = "sha256 of the sha256 of each 64 MiB piece"  # recorded beside the sums, so the scheme can change


def _piece_digest(file: Path, start: int) -> bytes:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        f.seek(start)
        remaining = PIECE_BYTES
        while remaining and (block := f.read(min(1 << 23, remaining))):
            digest.update(block)  # hashlib releases the GIL on large blocks: threads hash in parallel
            remaining -= len(block)
    return digest.digest()


def _hashing_threads() -> int:
    """This process's share of the machine's cores (torchrun starts LOCAL_WORLD_SIZE processes per node)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(16, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


def hash_files(folder: Path, names: list[str]) -> dict[str, dict]:
    """{name: {"bytes", "sha256"}} for files of `folder` ("sha256": of the digests of their 64 MiB pieces)."""
    sizes = {name: (folder / name).stat().st_size for name in names}
    pieces = [(name, start) for name in names for start in range(0, max(sizes[name], 1), PIECE_BYTES)]
    with ThreadPoolExecutor(max_workers=min(_hashing_threads(), max(1, len(pieces)))) as pool:
        digests = list(pool.map(lambda piece: _piece_digest(folder / piece[0], piece[1]), pieces))
    combined = {name: hashlib.sha256() for name in names}
    for (name, _), digest in zip(pieces, digests):
        combined[name].update(digest)
    return {name: {"bytes": sizes[name], "sha256": combined[name].hexdigest()} for name in names}
