"""Where every command writes: one output policy, so that no command loses an earlier output.

Every command that writes a file or a folder (export, import, `data prepare`, `tokenizer train`, `eval ... --output`,
`plot --output`, the trained `model/` of a run) goes through `Output`:

* `Output(path, kind, overwrite)` checks the target before any work is done: an existing file or non-empty folder is
  refused without `--overwrite`, naming what is there; a symbolic link is refused (a write never follows one); a
  file where a folder is asked for (or the reverse), or a parent that is a file, is a clear error.
* `with output.staged() as path:` the command writes into a staging path beside the target (same filesystem), and
  the finished result is renamed into place. With `--overwrite` the earlier output is renamed aside first and
  deleted only once the new one is in place. A failure removes the staging; nothing half-written is ever at the
  target.
* Staging named after a process that is gone (killed with -9, a machine that lost power mid-write) is deleted the
  next time anything writes to the same target; an earlier output left aside by a process that died between its two
  renames is put back, so the target is never found missing.

The run folder of `argonne train` has its own rules on top of these (resume, branches): run_folder.py.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path

FOLDER, FILE = "folder", "file"
# .NAME.staging-HOST-PID (the new output) and .NAME.replaced-HOST-PID (the earlier one, while the new one moves in)
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>staging|replaced)-(?P<host>.+)-(?P<pid>\d+)$")


class OutputError(ValueError):
    """An output that cannot be written as asked; the message names the path and what to do."""


def pid_alive(pid) -> bool:
    """Whether a process of this host runs under `pid` (a pid read from a file: anything else is no process)."""
    if not isinstance(pid, int) or pid <= 0:  # (os.kill(0, ...) would signal our own process group)
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: beyond any pid this system hands out
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def describe_contents(path: Path, limit: int = 4) -> str:
    """What a folder holds, for an error message: its first names and how many there are."""
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    shown = ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
    return f"{len(names)} entr{'y' if len(names) == 1 else 'ies'} ({shown})"


def absolute(path: str | Path) -> Path:
    """`path` made absolute with `.` and `..` resolved by name (os.path.abspath: links are not followed)."""
    return Path(os.path.abspath(path))


def check_place(path: Path, kind: str, option: str = "--output") -> None:
    """Refuse a target that is a link, of the wrong kind, or below a file; raises OutputError naming it."""
    if path.is_symlink():
        raise OutputError(f"{option} {path} is a symbolic link; Argonne never writes through links "
                          f"(give the path it points to, {os.path.realpath(path)}, if that is what you mean)")
    if kind == FOLDER and path.exists() and not path.is_dir():
        raise OutputError(f"{option} {path} is a file; a folder is written there: give a folder path")
    if kind == FILE and path.is_dir():
        raise OutputError(f"{option} {path} is a folder; a file is written there: give a file path")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"{option} {path}: {parent} is a file, not a folder")
            _probe(parent, path, option)
            break


def _probe(folder: Path, path: Path, option: str) -> None:
    """Fail now, not after hours of work, where nothing can be written: make and remove a hidden folder there
    (permission bits say little to root; a read-only filesystem or /sys only tell when tried)."""
    import tempfile

    try:
        os.rmdir(tempfile.mkdtemp(prefix=".argonne-probe-", dir=folder))
    except OSError as error:
        raise OutputError(f"{option} {path}: cannot write in {folder} ({error.strerror or error})") from None


def leftovers(path: Path) -> list[tuple[Path, str, bool]]:
    """Staging and set-aside entries beside `path`: (entry, "staging" | "replaced", whether its writer is gone).
    A writer on another host is never taken for gone."""
    found = []
    if not path.parent.is_dir():
        return found
    for entry in path.parent.iterdir():
        match = _LEFTOVER.match(entry.name)
        if match and match["name"] == path.name:
            gone = match["host"] == socket.gethostname() and not pid_alive(int(match["pid"]))
            found.append((entry, match["kind"], gone))
    return found


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def recover(path: Path) -> None:
    """Tidy what dead writers left beside `path`: an earlier output set aside is put back when the target is
    missing (the writer died between its two renames), and their staging is deleted."""
    for entry, kind, gone in leftovers(path):
        if not gone:
            continue
        if kind == "replaced" and _missing_or_empty_folder(path):
            if path.is_dir():
                path.rmdir()  # (made again by hand since, empty: the earlier output is what was there)
            os.replace(entry, path)
        else:
            _remove(entry)


def _missing_or_empty_folder(path: Path) -> bool:
    if path.is_symlink():
        return False
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


class Output:
    """A file or folder a command writes. The constructor checks the target (call it before the command's work);
    `staged()` gives the path to write and moves the result into place."""

    def __init__(self, path: str | Path, kind: str = FOLDER, overwrite: bool = False, option: str = "--output"):
        # Absolute and without . or .. (a link is not followed): "." and "out/.." name a folder like any other.
        self.path, self.kind, self.overwrite, self.option = absolute(path), kind, overwrite, option
        self.check()

    def existing(self) -> str | None:
        """What is at the target and would be replaced, or None (nothing, or an empty folder)."""
        path = self.path
        if path.is_dir() and not path.is_symlink():
            return describe_contents(path) if any(path.iterdir()) else None
        if path.exists():
            return f"a file of {path.stat().st_size:,} bytes"
        return None

    def check(self) -> None:
        check_place(self.path, self.kind, self.option)
        if self.path.is_dir() and absolute(os.getcwd()).is_relative_to(self.path):
            raise OutputError(f"{self.option} {self.path} is the current folder or holds it: an output is written "
                              f"beside its target and renamed into place, which would leave this shell in a deleted "
                              f"folder; give a new folder, e.g. {self.option} {self.path / 'model'}")
        recover(self.path)
        found = self.existing()
        if found and not self.overwrite:
            raise OutputError(f"{self.option} {self.path} already exists and holds {found}; pass --overwrite to "
                              f"replace it, or choose another {self.option}")

    def _staging_path(self, kind: str) -> Path:
        return self.path.with_name(f".{self.path.name}.{kind}-{socket.gethostname()}-{os.getpid()}")

    @contextmanager
    def staged(self):
        """Yield the staging path (a new empty folder, or a file path not yet created); when the block ends without
        an error, the result replaces the target. On an error the staging is removed and the target is untouched."""
        self.check()  # again: the target may have changed during the command's work
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            staging = self._staging_path("staging")
            _remove(staging)
            if self.kind == FOLDER:
                staging.mkdir()
            else:
                staging.touch()  # the command writes it; made here so that a refusal is this clear error
        except OSError as error:
            raise OutputError(f"{self.option} {self.path}: cannot write there ({error.strerror or error})") from None
        try:
            yield staging
            if not staging.exists():
                raise OutputError(f"{self.option} {self.path}: nothing was written")
            self.publish(staging)
        except BaseException:
            _remove(staging)
            raise

    def publish(self, staging: Path) -> None:
        """Rename `staging` to the target; with `overwrite` an earlier output is set aside first and deleted after.
        Without it, an output that appeared during the command (another command writing the same target) is refused
        here too, atomically: a folder is renamed only onto nothing or an empty folder, a file is linked into place
        (a link fails where a file exists)."""
        if not self.overwrite:
            self._publish_new(staging)
            return
        replaced = None
        if self.path.exists():
            replaced = self._staging_path("replaced")
            _remove(replaced)
            os.replace(self.path, replaced)
        os.replace(staging, self.path)
        if replaced is not None:
            _remove(replaced)

    def _publish_new(self, staging: Path) -> None:
        appeared = OutputError(f"{self.option} {self.path} was written by someone else while this command ran; "
                               f"nothing was replaced (this command's output is discarded). Pass --overwrite to "
                               f"replace it, or choose another {self.option}")
        if self.existing():
            raise appeared
        try:
            if self.kind == FOLDER:
                os.rename(staging, self.path)  # fails (ENOTEMPTY, EEXIST) on a folder that is not empty
            else:
                os.link(staging, self.path)  # fails (EEXIST) on any file
                staging.unlink()
        except FileExistsError:
            raise appeared from None
        except OSError as error:
            if error.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):  # (ENOTDIR: a file appeared there)
                raise appeared from None
            if self.kind == FILE and error.errno in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV):
                os.replace(staging, self.path)  # a filesystem without hard links: checked just above
            else:
                raise

    def write(self, data: str | bytes) -> Path:
        """Write a small file whole (results JSON, and the like) through `staged()`; returns the target."""
        with self.staged() as staging:
            with open(staging, "wb") as f:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
                f.flush()
                os.fsync(f.fileno())
        return self.path
