"""Cross-process file locks (fcntl.flock) paired with in-process thread locks.

flock locks belong to an open file description, so every acquisition opens the lock file afresh: two threads of
one process then exclude each other exactly as two processes do, and a process killed with SIGKILL releases its
locks when the kernel closes its descriptors, so a crash can never leave the store locked.
"""

from __future__ import annotations

import errno
import fcntl
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from featurestore.errors import StoreLockTimeout, StoreNotWritable

_POLL_SECONDS = 0.005
# How long a lock is waited for before the wait is told (``on_wait``): past a writer's moment.
SAY_AFTER_SECONDS = 1.0
_THREAD_LOCKS: dict[str, threading.RLock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


def thread_lock(path: Path) -> threading.RLock:
    """The one in-process lock guarding ``path`` (shared by every FeatureStore on the same root)."""
    with _THREAD_LOCKS_GUARD:
        return _THREAD_LOCKS.setdefault(str(path), threading.RLock())


def open_lock_file(path: Path) -> int:
    """A descriptor of the lock file ``path``, open for writing (created if missing), or StoreNotWritable."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise_not_writable(path, exc)
        raise


# What opening a store's file for writing answers when the store cannot be written (mounted read-only, not this
# user's): the store is then read-only, not broken.
READ_ONLY_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)


def raise_not_writable(path: Path, exc: OSError) -> None:
    """StoreNotWritable if ``exc``, met opening ``path`` in the store for writing, says the store cannot be
    written or something else is where the file goes; nothing for any other failure."""
    if exc.errno in READ_ONLY_ERRNOS:  # a traceback from every command, before
        raise StoreNotWritable(str(path), exc.strerror or str(exc)) from None
    if exc.errno in (errno.EISDIR, errno.ENOTDIR):  # a directory at the path, a file at a parent's
        reason = (exc.strerror or str(exc)).lower()
        raise StoreNotWritable(str(path), reason, "move it out of the way and run again") from None


@contextmanager
def file_lock(
    path: Path,
    *,
    shared: bool = False,
    timeout: float | None = None,
    on_wait: Callable[[], None] | None = None,
) -> Iterator[None]:
    """Hold an flock on ``path`` (created if missing) for the ``with`` block; released on every exit path. With a
    ``timeout`` (None: no limit), StoreLockTimeout once another has held it that long. ``on_wait`` is called once
    the lock has been held by another for ``SAY_AFTER_SECONDS``: a store's writers (a refresh's pool refill among
    them) hold it for moments, and a line at each of those was noise (cron mail, scripts reading stderr) saying a
    process might be stopped."""
    fd = open_lock_file(path)
    try:
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        if timeout is None and on_wait is None:
            fcntl.flock(fd, mode)
        else:
            deadline = time.monotonic() + (math.inf if timeout is None else timeout)
            say_at = time.monotonic() + SAY_AFTER_SECONDS
            while True:
                try:
                    fcntl.flock(fd, mode | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if timeout is not None and time.monotonic() >= deadline:
                        raise StoreLockTimeout(str(path), timeout) from None
                    if on_wait is not None and time.monotonic() >= say_at:
                        on_wait()
                        on_wait = None
                    if on_wait is None and timeout is None:  # told, and no limit: the kernel wakes us
                        fcntl.flock(fd, mode)
                        break
                    time.sleep(_POLL_SECONDS)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


__all__ = [
    "READ_ONLY_ERRNOS",
    "SAY_AFTER_SECONDS",
    "file_lock",
    "open_lock_file",
    "raise_not_writable",
    "thread_lock",
]
