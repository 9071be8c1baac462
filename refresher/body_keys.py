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
Its writers (``add``, ``finished``: a read, then a write in the file's place) take turns on an exclusive
``flock`` of the list's directory: unlocked, a refill's ``finished`` (its inode check, then the rename) or a
second ``add`` (a concurrent refresh, a second pytest run with the same state dir) could rename its list over
one just written, and the entries only that one listed were lost until a load listed them again.

A list begins with ``# since <ns>``, when its first entry was noted (kept while the list is written again, gone
with it): `refresher status` says the bodies' line a refill recorded only for a list begun before that line
(``started``). Without it, a list emptied and removed (`refresher warm` made the bodies a refill could not) and
begun again by a later refresh brought an old line back. The line is not four fields: a reader from before it
leaves it out.

A list `refresher warm` left (it made some of the bodies, not all) says so on a line of its own, ``# not made
<ns> <count> <the first one's line>`` (``NotMade``): warm asks no server, whose record keeps a refill's line, and
status said that older line (its count, its reason) after a warm that made only some. Kept while a refresh adds to
the list, dropped when a refill leaves it (the refill's record is then the later word); not four fields either.

Light on purpose (``os`` and ``fcntl``): ``pool.wait_for_pool``, the refill's start and a refresh the stamp
answers (``unheld``: a list no refill holds gets one, ``commands.refresh_if_noop``) import it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

KEYS_DIR = "bodies"
SUFFIX = ".keys"
SINCE = "# since "
NOT_MADE = "# not made "
# The list was last written by a maker leaving what it could not make (``finished``), none noted since: a refresh
# the stamp answers spawns no refill for it (``tried``), which would fail on the same segments at every no-op.
LEFT = "# left by its maker"


@dataclass(frozen=True)
class Wanted:
    """A minute segment whose body is to be made: its store key, symbol, month (``YYYY-MM``) and time zone."""

    key: str
    symbol: str
    month: str
    tz: str

    def line(self) -> str:
        return "\t".join((self.key, self.symbol, self.month, self.tz))


@dataclass(frozen=True)
class NotMade:
    """What the last maker that left a list itself (`refresher warm`) could not make: when it ended (ns since the
    epoch), how many, and the first one's line."""

    ended: int
    count: int
    first: str

    @classmethod
    def now(cls, count: int, first: str) -> NotMade:
        return cls(time.time_ns(), count, " ".join(first.removeprefix("refresher: ").split()))

    def line(self) -> str:
        return f"{NOT_MADE}{self.ended} {self.count} {self.first}"

    @classmethod
    def parse(cls, line: str) -> NotMade | None:
        ended, count, *first = line.removeprefix(NOT_MADE).split(" ", 2)
        if not (ended.isdigit() and count.isdigit()):
            return None
        return cls(int(ended), int(count), first[0] if first else "")


def keys_path(state_dir: Path, profile: str) -> Path:
    """Where a refresh of ``profile`` notes the bodies to make."""
    return Path(state_dir) / KEYS_DIR / f"{profile}{SUFFIX}"


def read(path: Path) -> tuple[list[Wanted], int | None]:
    """The segments ``path`` lists and its inode (for ``finished``); ([], None) when there is no file. A line that
    is not four fields (a file from another version) is left out: a body not made is only a slower load."""
    listed = _read(path)
    return listed.wanted, listed.inode


def started(path: Path) -> int | None:
    """When the list ``path`` was begun (ns since the epoch, its ``# since`` line), None when there is no list, 0
    for one without that line (written before it)."""
    listed = _read(path)
    return None if listed.inode is None else listed.since


def not_made(path: Path) -> NotMade | None:
    """What the maker that left the list ``path`` (`refresher warm`) could not make, None when it is not noted
    there (no list, or one a refresh began or a refill left)."""
    return _read(path).not_made


@dataclass(frozen=True)
class _Listed:
    """A list as read: its segments, its inode (None: no list), ``started`` (0: no ``# since``) and ``not_made``."""

    wanted: list[Wanted]
    inode: int | None = None
    since: int = 0
    not_made: NotMade | None = None
    left: bool = False


def _read(path: Path) -> _Listed:
    try:
        with open(path, encoding="utf-8") as handle:
            inode = os.fstat(handle.fileno()).st_ino
            text = handle.read()
    except FileNotFoundError:
        return _Listed([])
    wanted, since, noted, left = [], 0, None, False
    for line in text.splitlines():
        if line.startswith(SINCE) and line.removeprefix(SINCE).isdigit():
            since = int(line.removeprefix(SINCE))
        elif line == LEFT:
            left = True
        elif line.startswith(NOT_MADE):
            noted = NotMade.parse(line)
        elif len(fields := line.split("\t")) == 4 and all(fields):
            wanted.append(Wanted(*fields))
    return _Listed(wanted, inode, since, noted, left)


def add(path: Path, wanted: Iterable[Wanted]) -> bool:
    """Note ``wanted`` in ``path``, beside what it lists already (a refill killed before it finished); written
    whole (a temporary fsynced and renamed over, the directory fsynced), so a reader sees the old list or the new
    one; a list begun here begins now (``started``). Whether there is a list now."""
    wanted = list(wanted)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _writing(path):
        old = _read(path)
        lines = dict.fromkeys(each.line() for each in [*old.wanted, *wanted])
        # The same segments noted again after a maker left them (loaded again: their files may be back) are worth
        # another try: the list is written again without ``LEFT``.
        if set(lines) == {each.line() for each in old.wanted} and not (old.left and wanted):
            return bool(old.wanted)
        _write(path, lines, None, time.time_ns() if old.inode is None else old.since, old.not_made)
    return True


@contextlib.contextmanager
def _writing(path: Path, *, sweep: bool = True) -> Iterator[None]:
    """The turn of one writer of the list ``path``: its directory ``flock``ed exclusive (no file left behind; the
    list's own lock is the refills', ``hold``). A temporary of the list there as the turn begins is one a writer
    killed before its rename left (each removes its own otherwise): it goes (``sweep``; a probe's turn,
    ``_held``, leaves that to the writers)."""
    directory = os.open(path.parent, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(directory, fcntl.LOCK_EX)
        for left in os.listdir(path.parent) if sweep else ():
            if left.startswith(f".{path.name}.") and left.endswith(".part"):
                (path.parent / left).unlink(missing_ok=True)
        yield
    finally:
        os.close(directory)


def _write(
    path: Path,
    lines: Iterable[str],
    inode: int | None,
    since: int,
    not_made: NotMade | None = None,
    *,
    left: bool = False,
) -> bool:
    """``lines`` written whole at ``path`` (a temporary fsynced and renamed over, the directory fsynced), after
    ``# since`` (none for 0) and ``not_made``'s line; with ``inode``, only if ``path`` is still that file when the
    temporary is whole. Whether it was written. In the writer's turn (``_writing``)."""
    part = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.part")
    try:
        with open(part, "w", encoding="utf-8") as handle:
            handle.write(f"{SINCE}{since}\n" if since else "")
            handle.write(f"{not_made.line()}\n" if not_made is not None else "")
            handle.write(f"{LEFT}\n" if left else "")
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


def finished(
    path: Path, inode: int | None, left: Sequence[Wanted] = (), *, not_made: NotMade | None = None
) -> bool:
    """What a maker of the list read as ``inode`` (``read``) leaves of it once done: ``left``, those it could not
    make (a Parquet file gone or damaged: `refresher warm` fetches it again), written in its place for the next
    refill or `refresher warm` to make, and kept so long (`refresher status` says why only while a list is there);
    with none left, the list removed. Only if ``path`` is still that file: a newer one (a refresh merged it with
    what it noted) stays, it lists these too. Whether it was replaced or removed. An error writing (a full disk)
    is raised: the list is then as it was. ``not_made``: what a maker that records it nowhere else (`refresher
    warm`) could not make, noted in the list it leaves (None: a note there before goes)."""
    if inode is None:
        return False
    try:
        with _writing(path):
            if left:
                since = _read(path).since
                lines = dict.fromkeys(each.line() for each in left)
                return _write(path, lines, inode, since, not_made, left=True)
            if _inode_of(path) != inode:
                return False
            path.unlink()
            return True
    except FileNotFoundError:  # the list, or its directory, gone meanwhile: nothing to finish
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
    return _held(path) is True


def unheld(path: Path) -> bool:
    """Whether the list ``path`` is there and no refill holds it: left by a refill killed (a reboot, SIGKILL) or
    failing, or by `refresher warm`; the next refill given it makes its bodies (a refresh the stamp answers
    spawns one for it)."""
    return _held(path) is False


def tried(path: Path) -> bool:
    """Whether the list ``path`` was left by a maker (a refill, `refresher warm`) with what it could not make, and
    nothing noted in it since (``add``): another refill would fail on the same segments (their files gone or
    damaged, fetched again only by a load or `refresher warm`, whose ``add`` clears this)."""
    return _read(path).left


def _held(path: Path) -> bool | None:
    """Whether a refill holds the list ``path`` locked; None when there is no list.

    The probe is an exclusive lock tried and let go, taken in turn with every other probe and writer of the list
    (``_writing``): two probes at once (a refresh's ``unheld`` beside a ``wait_for_pool``, two no-op refreshes)
    each found the other's probe holding the list and took it for a refill's, and a list no refill held was
    said held (a refresh the stamp answers spawned no refill for it)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        with _writing(path, sweep=False):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)  # in the turn: the next probe must not find this one
    except BlockingIOError:
        return True
    except FileNotFoundError:  # its directory gone meanwhile: no list
        return None
    finally:
        os.close(fd)
    return False


__all__ = [
    "KEYS_DIR",
    "NotMade",
    "Wanted",
    "add",
    "finished",
    "hold",
    "keys_path",
    "not_made",
    "pending",
    "read",
    "started",
    "tried",
    "unheld",
]
