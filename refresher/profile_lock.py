"""One refresh or reset per profile at a time: a lock file in the state dir, held for the whole command.

Two refreshes of one profile would both load every segment, and the first one's snapshot step terminates the
other's sessions. With the lock the second waits, then plans against what the first loaded and finds nothing
to do. A file lock (not a Postgres advisory lock) because the server may not be running yet: starting it is part
of what the lock protects. The kernel releases it when its holder dies, kill -9 included.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from refresher._lazy import LazyModule
from refresher.engines import validate_profile, waited_for
from refresher.errors import ProfileBusy

if TYPE_CHECKING:
    import filelock
else:
    # imported by the first lock a refresh or reset takes (a stamped no-op takes none), not with the module
    filelock = LazyModule("filelock")


def lock_path(state_dir: Path, profile: str) -> Path:
    """Where the lock of ``profile`` lives; only a valid profile name ever reaches the file system."""
    validate_profile(profile, file="(command line)")
    return state_dir / "locks" / f"{profile}.lock"


@contextmanager
def hold_profile(
    state_dir: Path, profile: str, *, wait: bool = True, on_wait: Callable[[str], None] | None = None
) -> Iterator[None]:
    """Hold ``profile``'s lock for the block; wait for another holder (telling ``on_wait`` at once) or, with
    ``wait=False``, raise ``ProfileBusy`` at once. No grace, unlike the engine's lock: its holder is a whole
    refresh or reset, and a second's grace only delayed the answer of a ``refresh --no-wait`` beside one."""
    path = lock_path(state_dir, profile)
    with waited_for(
        path,
        lambda: ProfileBusy.held(profile, path),
        f"profile {profile}: another refresh or reset is running; waiting for it",
        grace=0,
        wait=wait,
        on_wait=on_wait,
    ):
        yield


def held(state_dir: Path, profile: str) -> bool:
    """Whether a refresh or reset of ``profile`` holds its lock now (a lock file never made: no one ever did).

    Read from the kernel's table of file locks (``/proc/locks``), never by taking the lock: a probe that took it,
    however briefly, made a ``refresh --no-wait`` or a worker's snapshot starting that instant give up. Where there
    is no such table (not Linux), the lock is tried and let go at once."""
    return file_held(lock_path(state_dir, profile))


def file_held(path: Path) -> bool:
    """Whether some process holds an flock on ``path`` now, read as ``held`` reads it, never by taking it."""
    try:
        inode = path.stat().st_ino
    except FileNotFoundError:
        return False
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as table:
            text = table.read()
    except OSError:
        return _taken_and_let_go(path)
    # "1: FLOCK  ADVISORY  WRITE 4242 08:01:131077 0 EOF" (a waiter's line has "->" after the number); the device
    # is the kernel's numbering, which need not be stat's on an overlay: the inode alone is matched, so another
    # file's lock with the same number reads as held, and url only waits for a lock it then finds free.
    for line in text.splitlines():
        fields = [field for field in line.split() if field != "->"]
        if len(fields) > 5 and fields[1] == "FLOCK" and fields[5].rpartition(":")[2] == str(inode):
            return True
    return False


def _taken_and_let_go(path: Path) -> bool:
    lock = filelock.FileLock(path, thread_local=False)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        return True
    lock.release()
    return False


__all__ = ["held", "hold_profile", "lock_path"]
