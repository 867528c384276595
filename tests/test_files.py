import os

import pytest

from argonne.files import write_atomic


def test_a_write_cut_off_before_the_rename_leaves_the_old_content(tmp_path, monkeypatch):
    target = tmp_path / "manifest.json"
    write_atomic(target, "old")
    write_atomic(target, b"new bytes")
    assert target.read_bytes() == b"new bytes"

    def crash(*args):
        raise KeyboardInterrupt  # the process cut off between writing the new content and the rename

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, "half-written")
    assert target.read_text() == "new bytes"
