"""Atomic writes: a write that fails half-way leaves the old file (or folder) exactly as it was."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from hermes.fileio import atomic_copy, atomic_directory, atomic_write, atomic_write_bytes


class Crash(Exception):
    pass


def half_then_crash(handle) -> None:
    handle.write(b"NEW" * 1000)  # partial new content reaches the file object ...
    handle.flush()
    raise Crash  # ... then the writer dies


def test_crash_half_way_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    path.write_bytes(b"old content")
    with pytest.raises(Crash):
        atomic_write(path, half_then_crash)
    assert path.read_bytes() == b"old content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.bin"]  # no partial or temp file left
    # A first write that crashes leaves nothing under the final name.
    with pytest.raises(Crash):
        atomic_write(tmp_path / "new.bin", half_then_crash)
    assert not (tmp_path / "new.bin").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.bin"]


def test_crash_inside_a_library_writer_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The underlying write fails after some bytes went out (a full disk), below our code."""

    class DiskFull:
        def __init__(self, handle) -> None:
            self.handle, self.calls = handle, 0

        def write(self, data) -> int:
            self.calls += 1
            if self.calls > 1:
                raise OSError(28, "No space left on device")
            return self.handle.write(data)

    path = tmp_path / "a.npy"
    atomic_write(path, lambda handle: np.save(handle, np.arange(10)))
    with pytest.raises(OSError, match="No space"):  # header written, data not
        atomic_write(path, lambda handle: np.save(DiskFull(handle), np.arange(10**5)))
    np.testing.assert_array_equal(np.load(path), np.arange(10))

    source = tmp_path / "src.bin"
    source.write_bytes(b"s" * 100_000)
    copy = tmp_path / "copy.bin"
    atomic_copy(source, copy)

    def copy_half(src, dst, *args) -> None:
        dst.write(src.read(50_000))
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(shutil, "copyfileobj", copy_half)
    source.write_bytes(b"t" * 100_000)
    with pytest.raises(OSError, match="Input/output"):
        atomic_copy(source, copy)
    assert copy.read_bytes() == b"s" * 100_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "copy.bin", "src.bin"]


def test_successful_write_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"old")
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_crash_while_building_a_directory_keeps_the_old_one(tmp_path: Path) -> None:
    target = tmp_path / "case"
    with atomic_directory(target) as tmp:
        (tmp / "image.npy").write_bytes(b"old image")
    with pytest.raises(Crash), atomic_directory(target, overwrite=True) as tmp:
        (tmp / "image.npy").write_bytes(b"new ima")  # half of the new case
        raise Crash
    assert sorted(p.name for p in target.iterdir()) == ["image.npy"]
    assert (target / "image.npy").read_bytes() == b"old image"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case"]
    with pytest.raises(FileExistsError), atomic_directory(target):
        pass
