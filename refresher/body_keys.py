"""The minute segments whose COPY bodies the detached refill is to make: ``<state_dir>/bodies/<profile>.keys``.

Making a body (``refresher.bodies``) is reading a segment's Parquet file and encoding its rows once more: on the
cold load itself it cost the backtesting refresh 1.7 s of wall time and 2.5 s of client CPU (8bb6c0c). So a
refresh only notes here which of the minute segments it loaded have no body yet (a line each: key, symbol,
month, the exchange's time zone), merged with what a killed refill left, and hands the file to the pool's
detached refill (``pool.spawn_refill``), which makes its clones first, then the bodies at idle priority
(``bodies.make_bodies``), then removes the file if it is still the one it read (a refresh may have written a
newer one meanwhile: it stays for the next refill), or leaves in it only the segments it could not make (their
Parquet file gone or damaged), which the next refill, or `refresher warm` once it fetched them again, makes. A
refill killed on the way leaves it for the next.

The list's own ``flock`` tells whether a refill is still at it: every refill given the list holds it shared from
its spawn to its end, on a descriptor the spawner opens and locks before the refill starts and hands to it (so
there is no moment where the list waits and no one holds it), and the kernel releases it however the refill ends;
no lock file of its own is left behind. ``pending`` is what ``pool.wait_for_pool`` waits on: the list there and
a refill holding it. A list written again (``add``: a new file renamed over) is held by the refill given it.

Light on purpose (``os`` and ``fcntl``): ``pool.wait_for_pool`` and the refill's start import it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

KEYS_DIR = "bodies"
SUFFIX = ".keys"


@dataclass(frozen=True)
class Wanted:
    """A minute segment whose body is to be made: its store key, symbol, month (``YYYY-MM``) and time zone."""

    key: str
    symbol: str
    month: str
    tz: str

    def line(self) -> str:
        return "\t".join((self.key, self.symbol, self.month, self.tz))


def keys_path(state_dir: Path, profile: str) -> Path:
    """Where a refresh of ``profile`` notes the bodies to make."""
    return Path(state_dir) / KEYS_DIR / f"{profile}{SUFFIX}"


def read(path: Path) -> tuple[list[Wanted], int | None]:
    """The segments ``path`` lists and its inode (for ``finished``); ([], None) when there is no file. A line that
    is not four fields (a file from another version) is left out: a body not made is only a slower load."""
    try:
        with open(path, encoding="utf-8") as handle:
            inode = os.fstat(handle.fileno()).st_ino
            text = handle.read()
    except FileNotFoundError:
        return [], None
    wanted = []
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) == 4 and all(fields):
            wanted.append(Wanted(*fields))
    return wanted, inode


def add(path: Path, wanted: Iterable[Wanted]) -> bool:
    """Note ``wanted`` in ``path``, beside what it lists already (a refill killed before it finished); written
    whole (a temporary fsynced and renamed over, the directory fsynced), so a reader sees the old list or the new
    one. Whether there is a list now."""
    old, _inode = read(path)
    lines = dict.fromkeys(each.line() for each in [*old, *wanted])
    if set(lines) == {each.line() for each in old}:
        return bool(old)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(path, lines, None)
    return True


def _write(path: Path, lines: Iterable[str], inode: int | None) -> bool:
    """``lines`` written whole at ``path`` (a temporary fsynced and renamed over, the directory fsynced); with
    ``inode``, only if ``path`` is still that file when the temporary is whole. Whether it was written."""
    part = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.part")
    try:
        with open(part, "w", encoding="utf-8") as handle:
            handle.write("".join(f"{line}\n" for line in lines))
            handle.flush()
            os.fsync(handle.fileno())
        if inode is not None and _inode_of(path) != inode:
            return False
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return True


def _inode_of(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def finished(path: Path, inode: int | None, left: Sequence[Wanted] = ()) -> bool:
    """What a maker of the list read as ``inode`` (``read``) leaves of it once done: ``left``, those it could not
    make (a Parquet file gone or damaged: `refresher warm` fetches it again), written in its place for the next
    refill or `refresher warm` to make, and kept so long (`refresher status` says why only while a list is there);
    with none left, the list removed. Only if ``path`` is still that file: a newer one (a refresh merged it with
    what it noted) stays, it lists these too. Whether it was replaced or removed."""
    if inode is None:
        return False
    if left:
        return _write(path, dict.fromkeys(each.line() for each in left), inode)
    with contextlib.suppress(FileNotFoundError):
        if path.stat().st_ino == inode:
            path.unlink()
            return True
    return False


def hold(path: Path) -> int | None:
    """A descriptor holding the list ``path`` locked shared, for the spawner to hand to the refill it starts
    (inherited: the refill holds it until it ends) and then close; None when there is no list."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    except BaseException:
        os.close(fd)
        raise
    return fd


def pending(path: Path) -> bool:
    """Whether bodies of ``path`` are still to come: the list is there and a refill given it still runs (holds it
    locked). A list no refill holds is left for the next refill."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases the probe's lock, if it took it
    return False


__all__ = ["KEYS_DIR", "Wanted", "add", "finished", "hold", "keys_path", "pending", "read"]
