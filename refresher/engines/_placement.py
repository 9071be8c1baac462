"""Where a new cluster's files land on disk: on ext2/3/4, in a block group nobody just emptied.

ext4 without a journal (the root filesystem of our dev VMs: ``/sys/fs/ext4/<dev>/journal_task`` says ``<none>``)
will not hand out an inode freed in the last 60 s (360 s while its inode table block is unwritten), and finds that
out inode by inode: each new file scans every recently freed slot of its block group from the group's start
(``find_inode_bit``/``recently_deleted`` in ``fs/ext4/ialloc.c``). A file goes to its directory's group, and a
directory to its parent's, so a new cluster made where the last one was just removed (``refresher down``, then
``refresh``; a test's server, then the next), or where other programs churn files (``/tmp``), pays that scan
for each of its ~1,000 files: 80% of ``cp``'s CPU was that scan (perf), and copying the template cluster after
removing a 2.2 GB cluster beside it took 0.45-0.66 s, against 0.07-0.14 s into a directory of a fresh group
(alternating, 4 pairs, 2-core VM).

The directory flag ``chattr +T`` (``FS_TOPDIR_FL``, meant for home directories) makes the allocator spread the
subdirectories of a directory over block groups, picking an empty one from a start hashed from the name; a
cluster built under a randomly named ``pgdata.init-*`` directory therefore lands in a group of its own, with all
its subdirectories (the flag is not inherited). Elsewhere (a journalled ext4, which does not scan, or XFS,
btrfs, tmpfs, which have no such flag) nothing changes: the flag is a hint nothing depends on.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

# <linux/fs.h>: _IOR/_IOW('f', 1/2, long) on 64-bit Linux; the kernel reads and writes an int through them.
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_TOPDIR_FL = 0x00020000


def spread_subdirectories(directory: Path) -> bool:
    """Ask the filesystem to place each new subdirectory of ``directory`` in a block group of its own.

    True if the flag is set (now or before); False where the filesystem (or platform) has no such flag, or the
    directory cannot be opened: a placement hint, never an error.
    """
    if sys.platform != "linux":
        return False
    try:
        with _opened(directory) as fd:
            current = _flags(fd)
            if not current & FS_TOPDIR_FL:
                fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("iI", current | FS_TOPDIR_FL, 0))
            return True
    except OSError:
        return False


def spreads_subdirectories(directory: Path) -> bool:
    """Whether ``directory`` carries the flag ``spread_subdirectories`` sets."""
    try:
        with _opened(directory) as fd:
            return bool(_flags(fd) & FS_TOPDIR_FL)
    except OSError:
        return False


@contextlib.contextmanager
def _opened(directory: Path) -> Iterator[int]:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield fd
    finally:
        os.close(fd)


def _flags(fd: int) -> int:
    buffer = bytearray(8)
    fcntl.ioctl(fd, FS_IOC_GETFLAGS, buffer)
    return int(struct.unpack_from("i", buffer)[0])
