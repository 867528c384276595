"""Files that a crash never leaves half-written: the new content goes to a temporary file beside the target, is
flushed to disk, then renamed over it (a rename within a folder is atomic), so a reader finds the old content or
the new."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, data: str | bytes) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
