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
from refresher.engines import validate_profile
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
    """Hold ``profile``'s lock for the block; wait for another holder (telling ``on_wait``) or, with
    ``wait=False``, raise ``ProfileBusy`` at once."""
    path = lock_path(state_dir, profile)
    path.parent.mkdir(parents=True, exist_ok=True)
    # thread_local=False: the lock belongs to the process, whichever thread releases it.
    lock = filelock.FileLock(path, thread_local=False)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        if not wait:
            raise ProfileBusy.held(profile, path) from None
        if on_wait is not None:
            on_wait(f"profile {profile}: another refresh or reset is running; waiting for it to finish")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def held(state_dir: Path, profile: str) -> bool:
    """Whether a refresh or reset of ``profile`` holds its lock now (a lock file never made: no one ever did).

    A probe: the lock is taken and let go at once when free (nothing is created in the state dir)."""
    path = lock_path(state_dir, profile)
    if not path.exists():
        return False
    lock = filelock.FileLock(path, thread_local=False)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        return True
    lock.release()
    return False


__all__ = ["held", "hold_profile", "lock_path"]
