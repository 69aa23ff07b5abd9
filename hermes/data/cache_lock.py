"""The cache lock: one writer (``hermes prepare``) or many readers (``hermes train``) at a time.

An advisory ``fcntl.flock`` on ``CACHE/.lock``. ``prepare`` holds it exclusively for its whole
run, so a second ``prepare`` on the same cache waits (or, with ``--no-wait``, stops with a
clear message) instead of deleting the first run's temp folders or racing it for
``cache.json``; training holds it shared, so it never reads a cache that is being written and
a ``prepare`` waits until training ends. The kernel releases the lock when its holder exits,
even on SIGKILL, so a crashed run never leaves a stale lock behind.

While it writes, the holder records ``pid`` and start time in the lock file (for the messages
of whoever waits) and empties the file again when it is done, so a finished cache has the same
bytes whatever happened to it. flock works on local file systems; on NFS it is emulated with
POSIX locks by Linux (same semantics across clients), on some other network file systems it
may be a no-op.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from hermes.errors import DataError

try:  # POSIX only; elsewhere caches are not locked (and say so once)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"


def lock_path(cache: str | Path) -> Path:
    return Path(cache) / LOCK_NAME


def holder(cache: str | Path) -> str:
    """Who holds the lock, as words for a message: ``pid N since T`` when a writer said so."""
    try:
        info = json.loads(lock_path(cache).read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        info = {}
    pid = info.get("pid")
    if isinstance(pid, int) and _alive(pid):
        return f"pid {pid} since {info.get('since', '?')}"
    return "a reader (e.g. a running `hermes train`)"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _try_flock(fd: int, operation: int) -> bool:
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return False
        raise
    return True


@contextlib.contextmanager
def write_lock(cache: str | Path, wait: bool = True) -> Iterator[None]:
    """Hold ``CACHE/.lock`` exclusively (``hermes prepare``).

    Waits for the current holder (saying so once, with its pid) unless ``wait`` is False, in
    which case a :class:`DataError` names the holder. ``cache`` must exist.
    """
    if fcntl is None:  # pragma: no cover - Windows
        log.warning("%s: file locking is not available here; do not run two `hermes prepare` at once", cache)
        yield
        return
    path = lock_path(cache)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise DataError(f"{cache}: cannot write the cache ({error.strerror})") from None
    try:
        if not _try_flock(fd, fcntl.LOCK_EX):
            who = holder(cache)
            if not wait:
                raise DataError(
                    f"{cache}: the cache is in use (lock {path} held by {who}); wait for it to finish, "
                    "or run without --no-wait to wait"
                )
            log.warning("%s: waiting for the lock held by %s ...", path, who)
            fcntl.flock(fd, fcntl.LOCK_EX)
        since = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "since": since}).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # a finished cache has the same bytes however it was made
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def read_lock(cache: str | Path) -> Iterator[None]:
    """Hold ``CACHE/.lock`` shared for as long as a cache is read (training).

    Refuses with a :class:`DataError` while a ``prepare`` writes the cache: a half-written
    cache mixes old and new cases. A cache on a read-only file system without a lock file is
    read unlocked (nobody can be writing it).
    """
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    path = lock_path(cache)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            yield
            return
    try:
        if not _try_flock(fd, fcntl.LOCK_SH):
            raise DataError(
                f"{cache}: `hermes prepare` is writing this cache (lock {path} held by {holder(cache)}); "
                "start once it has finished"
            )
        yield
    finally:
        os.close(fd)


def check_not_being_written(cache: str | Path) -> None:
    """Refuse (DataError) if a writer holds the lock right now; takes and drops a shared lock."""
    with read_lock(cache):
        pass
