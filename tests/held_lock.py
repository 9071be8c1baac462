"""A lock held by another for a moment, released while a waiter waits."""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from pathlib import Path


def held_a_moment(path: Path, take: contextlib.AbstractContextManager[None]) -> None:
    """Hold ``path``'s flock, released from a thread 0.3 s on, while ``take`` (a waiter not yet entered) waits."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    release = threading.Timer(0.3, fcntl.flock, (fd, fcntl.LOCK_UN))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        release.start()
        with take:
            pass
    finally:
        release.cancel()  # a waiter that failed: the fd is closed below, never released from the thread after
        release.join()
        os.close(fd)
