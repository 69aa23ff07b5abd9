"""Integrity of cached arrays: size and CRC-32 recorded at write time, checked on open.

``prepare`` writes each ``.npy`` with :func:`write_array`, which records its size and CRC-32
in the case's ``meta.json`` under ``files``. CRC-32 (zlib) runs at about 1.9 GB/s on one core
here (``np.save`` + fsync: about 1.6 GB/s) and catches truncation, zeroed blocks and bit flips;
a cryptographic hash (sha256 ~0.8 GB/s, blake2b ~0.4 GB/s) guards against no threat that
matters for a local cache, and xxhash is not a dependency.

Two levels of checking:

* :func:`check_cached_file` with ``full=False`` (every time training opens a case): the file
  exists, its npy header parses, and its size equals what the header implies and what was
  recorded. A ``stat`` and a read of ~128 bytes; it turns a truncated file into an error that
  names it instead of numpy's ``mmap length is greater than file size``.
* ``full=True`` (``hermes prepare --verify``): also the CRC-32 of the whole file.

Caches written before checksums existed have no ``files`` record: their sizes are checked
against the npy header only, and ``--verify`` additionally reads every array once.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import numpy as np

from hermes.errors import DataError
from hermes.fileio import atomic_write

ARRAY_FILES = ("image.npy", "label.npy", "fg.npy")
_BLOCK = 1 << 22


def write_array(path: Path, array: np.ndarray) -> dict[str, Any]:
    """``np.save`` atomically to ``path``; returns the file's ``{"size", "crc32"}`` record.

    The CRC is computed by reading the fresh file back from the page cache: in a 20-case
    prepare of the synthetic cohort (39 MB of arrays) that took 20 ms of a 1.8-2.6 s run.
    Hashing while writing (through a wrapper file object) was slower: numpy then leaves its
    ``tofile`` fast path and copies every chunk.
    """
    atomic_write(path, lambda handle: np.save(handle, array, allow_pickle=False))
    return {"size": path.stat().st_size, "crc32": crc32_of(path)}


def _header_size(path: Path) -> tuple[int, tuple[int, ...], np.dtype]:
    """(expected file size, shape, dtype) from the npy header; DataError if it does not parse."""
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, _fortran, dtype = np.lib.format.read_array_header_1_0(handle)
            elif version == (2, 0):
                shape, _fortran, dtype = np.lib.format.read_array_header_2_0(handle)
            else:
                raise ValueError(f"npy format version {version}")
            offset = handle.tell()
    except (OSError, ValueError, SyntaxError) as error:
        raise DataError(f"{path}: not a readable cached array ({error})") from None
    if dtype.hasobject:
        raise DataError(f"{path}: cached array holds Python objects; Hermes never writes those")
    return offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize, tuple(shape), dtype


def crc32_of(path: Path) -> str:
    crc = 0
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def check_cached_file(path: Path, record: dict[str, Any] | None, full: bool = False) -> None:
    """Raise :class:`DataError` naming ``path`` if the cached array is missing or corrupt."""
    if not path.is_file():
        raise DataError(f"{path}: cached array missing")
    actual = path.stat().st_size
    if record is not None and actual != int(record["size"]):
        raise DataError(f"{path}: cached array has {actual} bytes, {record['size']} were written (truncated or overwritten)")
    expected, shape, dtype = _header_size(path)
    if actual != expected:
        raise DataError(
            f"{path}: cached array has {actual} bytes, its header ({dtype} {shape}) needs {expected} (truncated)"
        )
    if not full:
        return
    if record is not None and record.get("crc32"):
        found = crc32_of(path)
        if found != record["crc32"]:
            raise DataError(f"{path}: cached array checksum mismatch (CRC-32 {found}, written {record['crc32']})")
    else:  # an old cache without checksums: at least every byte must be readable as the array
        try:
            np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise DataError(f"{path}: cached array unreadable ({error})") from None


def check_case_files(case_dir: Path, meta: dict[str, Any], full: bool = False) -> None:
    """Check every array of one cached case (those its meta records, else those present)."""
    records: dict[str, Any] | None = meta.get("files")
    if records is not None:
        for name, record in records.items():
            check_cached_file(case_dir / name, record, full)
        return
    for name in ARRAY_FILES:  # an old cache: image.npy always, label/fg when present
        path = case_dir / name
        if name == "image.npy" or path.exists():
            check_cached_file(path, None, full)
