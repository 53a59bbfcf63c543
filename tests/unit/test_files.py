"""files.atomic_file: a destination is written whole or not at all."""
from __future__ import annotations

import os
import stat

import pytest

from tuneop.files import atomic_file


def test_the_file_appears_whole_when_the_block_ends(tmp_path) -> None:
    dest = tmp_path / "new" / "dir" / "out.bin"  # directories made
    with atomic_file(str(dest)) as f:
        f.write(b"abc")
        assert not dest.exists()  # nothing at dest while it is written
    assert dest.read_bytes() == b"abc"
    assert os.listdir(dest.parent) == ["out.bin"]  # no temporary file left


def test_an_error_leaves_the_old_file_and_no_temporary_one(tmp_path) -> None:
    dest = tmp_path / "out.txt"
    dest.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(str(dest), "w") as f:
            f.write("partial")
            raise RuntimeError("cut")
    assert dest.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_permissions_and_prefix(tmp_path) -> None:
    dest = tmp_path / "p.json"
    with atomic_file(str(dest), "w", prefix=".tmp-", permissions=0o644) as f:
        (tmp,) = os.listdir(tmp_path)  # the temporary file beside it
        assert tmp.startswith(".tmp-")
        f.write("{}")
    assert stat.S_IMODE(dest.stat().st_mode) == 0o644
