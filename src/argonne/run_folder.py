"""The run folder (`train.run_dir`): one trainer at a time, no earlier run overwritten, a metrics log that stays valid.

* `RunLock`: the main process holds a lock on `RUN_DIR/run.lock` for the whole run, so a second trainer (say
  torchrun workers left running after their launcher was killed) is refused instead of interleaving its metrics
  and checkpoints. It is an advisory `flock`: the kernel drops it when the process dies, however it dies, and NFS
  and Lustre (mounted with `flock`) carry it to every node. Where the filesystem has no locks, the lock is a
  directory made atomically, `RUN_DIR/run.lock.d`, holding its owner; a dead owner on this host is detected and
  its lock taken over, one on another host is named so that the user can remove it.
* `earlier_run`: what a fresh start would overwrite. `argonne train` without `--resume` refuses a folder that holds
  another run's checkpoints, metrics or model, unless `--overwrite` asks to delete them (`clear_earlier_run`).
* `run.json` names the run (`run_id`): a fresh start makes a new id, a resume continues the checkpoint's. Its
  checkpoints carry the id, and pruning deletes only checkpoints of the same id. A branch (a resume from a
  checkpoint older than the run's newest) records what it set aside (`branched_from`); a branch stopped before its
  first checkpoint is undone by the next `--resume auto` (`undo_unsaved_branch`), which then finds the checkpoint it
  would have found before the branch began.
* `metrics.jsonl` holds one JSON object per line; NaN and infinities are written as the strings "NaN",
  "Infinity" and "-Infinity" (JSON has no such numbers) and read back as floats. A torn last line — a crash in
  mid-write — is dropped on reading and repaired on resume.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import socket
import time
import uuid
from pathlib import Path

from filelock import FileLock, Timeout

from .files import read_json, write_atomic
from .outputs import pid_alive

LOCK_FILE = "run.lock"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
# What a run writes into its folder; `clear_earlier_run` deletes only these.
RUN_OUTPUTS = ("checkpoints", METRICS_FILE, "tensorboard", "model", "loss.png", RUN_FILE, "config.json")


class RunFolderError(ValueError):
    """The run folder cannot be used as asked; the message says why and what to do."""


# ------------------------------------------------------------------------------------------------ lock


def _owner() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())}


def describe_owner(owner: dict | None) -> str:
    if not owner:
        return "another process"
    return f"process {owner.get('pid')} on host {owner.get('host')} (since {owner.get('since')})"


def _write_owner(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(_owner()).encode())


def _read_owner(path: Path) -> dict | None:
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


# flock() fails with these where a filesystem has no locks (NFS without a lock daemon, Lustre without -o flock).
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


# The locks taken and not released: a FileLock lets go when it is garbage-collected, and a RunLock is held until
# `release()` or the end of the process, even by a caller that keeps no reference to it.
_HELD: set[RunLock] = set()


class RunLock:
    """An exclusive lock on a run folder, held until `release()` or the end of the process: filelock's flock, taken
    without waiting, with its owner (pid, host, since when) written into the lock file for the refusal to name."""

    LOCK_NAME = LOCK_FILE

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / self.LOCK_NAME
        self.fallback = self.run_dir / (self.LOCK_NAME + ".d")
        # Its own soft lock off: where flock fails, our fallback below keeps an owner record that names the host.
        self._lock = FileLock(self.path, mode=0o644, fallback_to_soft=False, on_acquired=_write_owner)
        self._holds_fallback = False

    def acquire(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            raise RunFolderError(self._in_use(_read_owner(self.path))) from None
        except OSError as error:
            if error.errno not in _NO_LOCKS:
                raise
            self._acquire_fallback()
        _HELD.add(self)

    def _acquire_fallback(self) -> None:
        """mkdir is atomic on every filesystem, NFS included: whoever makes the directory holds the lock."""
        for _ in range(2):
            try:
                self.fallback.mkdir()
            except FileExistsError:
                owner = _read_owner(self.fallback / "owner.json")
                stale = owner is not None and owner.get("host") == socket.gethostname() \
                    and not pid_alive(owner.get("pid"))
                if not stale:
                    hint = "" if owner is None or owner.get("host") == socket.gethostname() else (
                        f"; if that process is gone, delete {self.fallback}")
                    raise RunFolderError(self._in_use(owner) + hint) from None
                shutil.rmtree(self.fallback, ignore_errors=True)  # its owner died without releasing it
                continue
            (self.fallback / "owner.json").write_text(json.dumps(_owner()))
            self._holds_fallback = True
            return
        raise RunFolderError(self._in_use(None))

    def _in_use(self, owner: dict | None) -> str:
        return (f"run folder {self.run_dir} is in use by {describe_owner(owner)}: another trainer is writing it. "
                f"Stop that one first (look for leftover torchrun workers), or choose another train.run_dir")

    def release(self) -> None:
        _HELD.discard(self)
        if self._lock.is_locked:
            self._lock.release(force=True)  # the file stays (deleting it would race a new locker)
        if self._holds_fallback:
            shutil.rmtree(self.fallback, ignore_errors=True)
            self._holds_fallback = False

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


# ------------------------------------------------------------------------------------------------ earlier runs


def earlier_run(run_dir: str | Path) -> list[str]:
    """What a fresh start in `run_dir` would overwrite: a run's checkpoints, metrics, model, plot or TensorBoard
    events, or a config.json that no Argonne run wrote (no run.json beside it: a model folder, say). A run.json
    and config.json alone are an earlier start that trained nothing, and are written again."""
    run_dir = Path(run_dir)
    found = []
    checkpoints = run_dir / "checkpoints"
    if checkpoints.is_dir():
        steps = [p for p in checkpoints.iterdir() if p.name.startswith("step-")]
        if steps:
            found.append(f"{len(steps)} checkpoint folder(s)")
    metrics = run_dir / METRICS_FILE
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append(f"{METRICS_FILE} ({len(metrics.read_bytes().splitlines())} records)")
    if (run_dir / "model").exists():
        found.append("a trained model/")
    if (run_dir / "tensorboard").is_dir() and any((run_dir / "tensorboard").iterdir()):
        found.append("TensorBoard events")
    if (run_dir / "loss.png").exists():
        found.append("loss.png")
    if (run_dir / "config.json").exists() and not (run_dir / RUN_FILE).exists():
        found.append("a config.json that is not a run's (no run.json beside it)")
    return found


def refuse_fresh_start(run_dir: str | Path, found: list[str]) -> RunFolderError:
    return RunFolderError(
        f"run folder {run_dir} holds an earlier run ({', '.join(found)}). Continue it with --resume auto, "
        f"delete it and start over with --overwrite, or choose another train.run_dir"
    )


def clear_earlier_run(run_dir: str | Path) -> list[str]:
    """Delete what runs write into `run_dir` (RUN_OUTPUTS, nothing else); returns what was deleted."""
    run_dir = Path(run_dir)
    deleted = []
    for name in RUN_OUTPUTS:
        path = run_dir / name
        if path.is_symlink() or path.is_file():
            path.unlink()  # a link is removed, never followed
        elif path.is_dir():
            shutil.rmtree(path)
        else:
            continue
        deleted.append(name)
    return deleted


def set_aside_name(path: Path, suffix: str) -> Path:
    """`path.suffix` for a folder set aside (`metrics.suffix.jsonl` for a .jsonl file), or the same with `-2`, `-3`...
    where an earlier branch or rollback of the run already set one aside under that name: never replaced."""
    stem, extension = (path.stem, path.suffix) if path.suffix == ".jsonl" else (path.name, "")
    candidate, number = path.with_name(f"{stem}.{suffix}{extension}"), 1
    while candidate.exists() or candidate.is_symlink():
        number += 1
        candidate = path.with_name(f"{stem}.{suffix}-{number}{extension}")
    return candidate


def plan_set_aside(run_dir: str | Path, run_id: str, checkpoints: list[tuple[Path, str]]) -> list[dict]:
    """Where a branch keeps the later checkpoints (each with its run's id) and the folder's model and metrics log
    (run `run_id`'s, the run the folder held) out of its way: names with `.run-ID` (invisible to --resume auto and to
    pruning, never over an earlier set-aside), as [{"from": name, "to": new name, "copied": bool}] relative to the
    run folder. Recorded in run.json before `apply_set_aside` moves anything, so that a branch killed at any point
    can be undone."""
    run_dir, suffix = Path(run_dir), f"run-{run_id}"
    planned = []
    for path, owner in [*checkpoints, (run_dir / "model", run_id)]:
        if path.is_dir():
            planned.append({"from": str(path.relative_to(run_dir)),
                            "to": str(set_aside_name(path, f"run-{owner}").relative_to(run_dir)), "copied": False})
    if (run_dir / METRICS_FILE).is_file():  # copied: the branch keeps the records up to its step
        planned.append({"from": METRICS_FILE, "to": set_aside_name(run_dir / METRICS_FILE, suffix).name,
                        "copied": True})
    return planned


def apply_set_aside(run_dir: str | Path, planned: list[dict]) -> None:
    run_dir = Path(run_dir)
    for entry in planned:
        source, aside = run_dir / entry["from"], run_dir / entry["to"]
        if entry["copied"]:
            shutil.copyfile(source, aside)
        else:
            source.rename(aside)


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


def read_run_record(run_dir: str | Path) -> dict:
    """RUN_DIR/run.json's record, {} without one; a damaged run.json (it is written atomically, so never
    half-written by a crash) is an error naming it."""
    path = Path(run_dir) / RUN_FILE
    if not path.exists():
        return {}
    record = read_json(path, RunFolderError, "run record")
    if not isinstance(record.get("run_id"), str):
        raise RunFolderError(f"{path}: not a valid run record (no run_id string); restore it, or delete it to "
                             f"resume from the newest checkpoint of any run")
    return record


def read_run_id(run_dir: str | Path) -> str | None:
    """The run id in RUN_DIR/run.json, None without one."""
    return read_run_record(run_dir).get("run_id")


def undo_unsaved_branch(run_dir: str | Path, has_checkpoint) -> str | None:
    """A branch that stopped before its first checkpoint is undone: what it set aside goes back under its old
    names (the branch's own metrics are kept aside as metrics.run-BRANCH.jsonl), and run.json names the run it
    branched from again. `has_checkpoint(run_id)` says whether a run id has a complete checkpoint. Returns a line
    saying what was restored, or None when there is no such branch."""
    run_dir = Path(run_dir)
    record = read_run_record(run_dir)
    branch, run_id = record.get("branched_from"), record.get("run_id")
    if not isinstance(branch, dict) or not isinstance(run_id, str) or has_checkpoint(run_id):
        return None
    restored = []
    for entry in branch.get("set_aside", []):
        if not (isinstance(entry, dict) and isinstance(entry.get("from"), str) and isinstance(entry.get("to"), str)):
            continue
        original, aside = run_dir / entry["from"], run_dir / entry["to"]
        if entry.get("copied") and original.is_file() and aside.is_file():  # (not yet copied, or already restored)
            original.rename(set_aside_name(original, f"run-{run_id}"))
        if aside.exists() and not original.exists():
            aside.rename(original)
            restored.append(entry["from"])
    write_run_record(run_dir, branch.get("run_id"), restored_after_unsaved_branch=run_id)
    return (f"the branch {run_id} stopped before its first checkpoint; restored the run it branched from: "
            f"{', '.join(restored) or 'nothing was set aside'}")


def write_run_record(run_dir: str | Path, run_id: str, **details) -> None:
    write_atomic(Path(run_dir) / RUN_FILE, json.dumps({"run_id": run_id, **details}, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------ metrics.jsonl

_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _json_number(value):
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def encode_record(record: dict) -> str:
    """One metrics line: valid JSON, non-finite floats as strings."""
    return json.dumps({key: _json_number(value) for key, value in record.items()}, allow_nan=False)


def decode_record(record: dict) -> dict:
    return {key: _NON_FINITE.get(value, value) if isinstance(value, str) else value for key, value in record.items()}


def _torn(line: str) -> bool:
    """Whether a last line is a record cut off mid-write: the start of a JSON object, not JSON itself (garbage, or
    bytes that are not UTF-8, is damage to report, not a torn line to drop)."""
    try:
        json.loads(line)
    except ValueError:
        return line.startswith("{") and "\ufffd" not in line
    return False


def read_metrics(path: str | Path) -> tuple[list[dict], bool]:
    """The records of a metrics.jsonl, and whether its last line was torn (cut off mid-write: it is left out).
    Any other line that is not a JSON record is an error naming it."""
    path = Path(path)
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    torn = False
    if lines and lines[-1] == "":
        lines.pop()
    elif lines and _torn(lines[-1]):  # no newline at the end: the last line may have been cut off
        lines.pop()
        torn = True
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as error:
            raise RunFolderError(f"{path}:{number}: not a JSON record ({error}); fix or delete that line") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise RunFolderError(f"{path}:{number}: not a metrics record (no integer step); fix or delete that line")
        records.append(decode_record(record))
    return records, torn


def keep_metrics_until(path: str | Path, step: int) -> tuple[int, bool]:
    """Rewrite metrics.jsonl (atomically) with the records up to `step` — a resumed run replays the steps after its
    checkpoint — and without a torn last line. Returns (records dropped, whether a torn line was repaired)."""
    path = Path(path)
    if not path.is_file():
        return 0, False
    records, torn = read_metrics(path)
    kept = [record for record in records if record["step"] <= step]
    if len(kept) < len(records) or torn:
        write_atomic(path, "".join(encode_record(record) + "\n" for record in kept))
    return len(records) - len(kept), torn
