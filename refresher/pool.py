"""The warm pool of clones of a pristine copy: refill, slots, checkout, and dropping what killed makers left.

For a database ``<db>`` (see ``refresher.snapshot`` for the pristine copy), ``<db>__pool_<n>`` are ready clones
of ``<db>__pristine``, each commented ``clone_of=<generation>``. A clone whose mark is missing (its maker died
between CREATE and COMMENT) or names another generation is never handed out, and the next refill drops it.

Advisory locks per database, always taken in this order, make this safe for many processes (xdist workers):
``REFILL``, held exclusively by ``save_pristine``, ``advance_pristine``, ``resize_pool`` and ``drop_snapshot``
(they rebuild, rewrite the mark or remove everything, and may drop any leftover) and shared by refillers and
template checkouts; then ``STATS`` (one refiller at a time analyzes the pristine copy, under REFILL shared: a
reset or checkout never waits for it); then one lock per pool slot (only its holder creates or drops that slot's
database, so refillers in many processes fill different slots at once); then ``TAKE`` (choosing and renaming a
clone, and the swap itself, so a taker never picks a clone of the copy being replaced). A refiller also holds
one of a few ``COPIER`` tokens while it copies: how many copies run at once on the server is bounded by its
machine (``refill_concurrency``), however many processes refill.

How many clones the pool keeps is what the pristine copy's mark records (``pool_size=``, set by the refresh from
$REFRESHER_POOL_SIZE or ``--pool-size``; ``resize_pool`` changes it), bounded at each refill by the free space of
the server's disk (``pool_size_for_disk``; a reflink clone costs almost none of it), which the refill says in one
line when it makes fewer clones. A pool of 0 keeps no clone: a reset or checkout then copies the pristine one.
Without a size from the user (or with ``auto``, which forgets one), each snapshot decides it
(``default_pool_size``): none where the server's copies are full copies (no reflink) and a copy of the database
is measured to take at most ``FAST_COPY`` seconds (a reset that copies still answers well under a second, and the
disk holds two copies instead of four), else ``DEFAULT_POOL_SIZE``.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterator
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import psycopg
from psycopg import conninfo, sql

from refresher import _refill_spawn, _refill_watch, body_keys
from refresher._planner_stats import (
    analyze_stale,
    finish_recorded,
    finishing,
    may_record,
    record_pending,
    recorded,
    stale_names,
    wait_past_autovacuum,
)
from refresher._snapshot_sql import (
    COPIER,
    MAINTENANCE_DB,
    PRIVATE_SLOTS,
    REFILL,
    SLOT,
    STATS,
    SWEEP,
    TAKE,
    TRASH_INFIX,
    PoolSizing,
    _admin,
    _advisory,
    _comment,
    _create_from,
    _derelicts,
    _drop_database,
    _drop_unless_held,
    _execute,
    _lock,
    _Mark,
    _move_to_trash,
    _pool_databases,
    _pristine_mark,
    _publish,
    _ready_clones,
    _rename,
    _reopen_abandoned,
    _require_pristine,
    _slot_of,
    _terminate_others,
    _try_lock,
    _unlock,
    _wait_gone,
    pool_name,
    pristine_name,
)
from refresher.diskfull import COPY_SLACK, data_directory
from refresher.engines import (
    locked,
    noted_cluster,
    noted_servers,
    owner_gone,
    owner_labels,
    write_private_json,
)
from refresher.engines.base import ServerInfo
from refresher.errors import RefresherError, SnapshotError
from refresher.settings import DEFAULT_POOL_SIZE, FAST_COPY, PoolSize, cache_directory, pool_as_asked

MAX_REFILL_CONCURRENCY = 4
GB = 2**30
# linux/fs.h: _IOW(0x94, 9, int), a reflink of a whole file.
FICLONE = 0x40049409
# The reflink probe's scratch directories, in the server's data directory (``_scratch``).
SCRATCH_PREFIX = ".refresher-reflink-"
SCRATCH_TRIES = 10
# What the disk held as the last refill of a pool ended (``_record_settled``), in the server's data directory.
SETTLED_PREFIX = ".refresher-pool-settled-"
# How the last detached refill of a pool ended (``_record_outcome``), beside the settled record; for a server
# whose data directory this host cannot see (a container's), in OUTCOMES under the user's cache directory.
OUTCOME_PREFIX = ".refresher-pool-refill-"
OUTCOMES = "pool-refills"
# A detached refill's note of itself while it runs (``_running``), beside the outcome record: <record>.running-<pid>.
RUNNING_SUFFIX = ".running-"
# The outcome record's line of the COPY bodies the last refill to make them could not make (``_record_bodies``).
BODIES_WORD = "bodies"
# The failure of a record "<ended> failed" whose line is empty (a writer other than ``_record_outcome``).
NO_REASON = "no reason recorded"
# The signals that stop a detached refill politely (``_Stops``): SIGTERM (a service manager, `kill PID`, a
# shutdown), SIGINT sent to it (a Ctrl-C at a terminal reaches it not: it runs in a session of its own) and
# SIGHUP.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# The signal the refill's watch gives it up with (``_Stops.give_up``), to its own main thread: not one of
# ``STOP_SIGNALS``, which the kernel would merge with an outside stop pending at the same moment.
GIVE_UP_SIGNAL = signal.SIGUSR1
# How the detached refill's connections find a server that died under them (its host powered off, a partition, a
# failover to another host): no packet comes back, so without these a query in flight waited for good (the
# system's keepalive starts after 2 h). TCP keepalives probe an idle connection (a CREATE DATABASE or ANALYZE
# waiting for its answer) after KEEPALIVES_IDLE s, every KEEPALIVES_INTERVAL s, KEEPALIVES_COUNT times; a
# request left unacknowledged (a query sent, a cancel) fails after TCP_USER_TIMEOUT ms. A live server's kernel
# answers both however long its query runs: no bound on the copies or analyses (a big database's take minutes).
KEEPALIVES_IDLE = 30
KEEPALIVES_INTERVAL = 10
KEEPALIVES_COUNT = 3
TCP_USER_TIMEOUT = 60_000
# The connect of a refill's thread (a helper's copies, the analyses beside them) is tried in slices of this many
# seconds (libpq's least), CONNECT_TIMEOUT in all, looking at the refill's stop between them (``_connect``).
CONNECT_SLICE = 2
CONNECT_TIMEOUT = 10
# How long a stopped refill waits for the server to take the cancel of a thread's query (``_Halt.halt``) before it
# cuts that connection.
CANCEL_TIMEOUT = 5.0
# How long a refill waits for the sessions of a dead refill it ended to exit (``_end_dead``).
DEAD_WAIT = 5.0


@dataclass(frozen=True)
class PoolStatus:
    """The pristine copy, the clones ready right now, and how many the pool keeps (``target``, as recorded)."""

    pristine: bool
    ready: tuple[str, ...]
    target: int
    # Why the pool keeps ``target`` clones (``pool_reason``).
    why: str = ""
    # "the last refill (<when>) failed: <its error>" while the last detached refill to end failed, or "the refill
    # started <when> (pid <n>) died ..." while one that started after it was killed outright ("" if neither).
    failed: str = ""
    # "a refill is running (pid <n>, since <when>)" while detached refills run ("" if none does).
    refilling: str = ""
    # "the refill (<when>) could not make <n> COPY bodies: <the first one's line> ..." while the last refill to make
    # bodies could not make some ("" if it made them all, or none has made any).
    bodies: str = ""

    @property
    def reset(self) -> str:
        """What a reset does now: "rename" a ready clone into place, or "copy" the pristine database."""
        return "rename" if self.ready else "copy"

    def to_json(self) -> dict[str, Any]:
        return {
            "size": self.target,
            "ready": len(self.ready),
            "reset": self.reset,
            "why": self.why,
            "refill_failed": self.failed or None,
            "refill_running": self.refilling or None,
            "bodies_not_made": self.bodies or None,
        }


@dataclass(frozen=True)
class HandedOut:
    """A database a reset or checkout handed out from a pristine copy not analyzed yet: it is analyzed in the
    background (``pending``: what the copy's mark said to analyze besides what its catalog says). The handout
    records it on the database itself (``refresher._planner_stats.record_pending``), so an analysis killed
    midway is finished by whoever comes next: any refill finishes every recorded one."""

    name: str
    pending: tuple[str, ...]

    @classmethod
    def of(cls, mark: _Mark, name: str) -> HandedOut | None:
        """What to analyze in ``name``, a copy of the pristine copy marked ``mark``; None when it has statistics."""
        return None if mark.analyzed else cls(name, mark.pending)


def checkout_clone(
    server: ServerInfo,
    name: str,
    *,
    refill: bool = True,
    refill_log: Path | None = None,
    note: str | None = None,
    analyze: Callable[[HandedOut], None] | None = None,
) -> str:
    """A fresh copy of the pristine database under ``name`` (a pool clone when ready); returns its DSN.

    ``note`` becomes the copy's database comment in the same transaction as its rename, so a copy is never
    seen under ``name`` without it (the pytest plugin names its owner there, to drop what a killed run left).

    A copy of a pristine copy the refill has not analyzed yet (in the seconds after a refresh) is handed out at
    once and analyzed after, never waited for: by ``analyze`` when given (the pytest plugin's refill thread, see
    ``analyze_handed_out``), else by a detached process (the refill when ``refill``). Its rename records the
    pending analysis on it in the same transaction (``HandedOut``): a killed analyzer loses nothing.
    """
    db = server.dbname
    with _admin(server.dsn(MAINTENANCE_DB)) as conn:
        with _advisory(conn, db, TAKE):
            ready = _ready_clones(conn, db)
            if ready:  # the mark as of the clone taken: a swap needs TAKE
                mark = _require_pristine(conn, db)
                _take(conn, ready[0], name, note, mark)
        if not ready:  # cloning is slow; other takers need not wait for it
            mark = _copy_and_take(conn, db, name, note)
    handed = HandedOut.of(mark, name)
    if handed is not None and analyze is not None:
        analyze(handed)
        handed = None
    if refill or handed is not None:
        spawn_refill(server, log=refill_log, analyze=handed, fill=refill)
    return server.dsn(name)


def analyze_handed_out(server: ServerInfo, handed: HandedOut) -> None:
    """ANALYZE what is out of date in ``handed``, a database a checkout handed out (best effort, see
    ``checkout_clone``), from this process."""
    _analyze_handed_out(server.dsn(MAINTENANCE_DB), handed, background=server.engine == "local")


def clone_notes(server: ServerInfo, prefix: str) -> dict[str, str]:
    """The comment of every database whose name starts with ``prefix`` ("" for none)."""
    with _admin(server.dsn(MAINTENANCE_DB)) as conn:
        rows = conn.execute(
            "SELECT datname, coalesce(shobj_description(oid, 'pg_database'), '') FROM pg_database"
            " WHERE starts_with(datname, %s)",
            (prefix,),
        ).fetchall()
    return {str(name): str(note) for name, note in rows}


def drop_clone(server: ServerInfo, name: str) -> None:
    """Drop a database made by ``checkout_clone`` (terminating its sessions); no error if it is gone."""
    if name in (server.dbname, pristine_name(server.dbname), MAINTENANCE_DB):
        raise SnapshotError(f"drop_clone: refusing to drop {name!r}, which is not a clone", name=name)
    with _admin(server.dsn(MAINTENANCE_DB)) as conn:
        _drop_database(conn, name)


def pool_status(server: ServerInfo, *, bodies: Path | None = None) -> PoolStatus:
    """The pool of ``server.dbname`` (``refresher status``; its ``why`` says when the disk holds fewer clones
    than the pool keeps); a database a killed reset left refusing sessions is opened (``_reopen_abandoned``).
    ``bodies``: the server's list of COPY bodies to make (``body_keys.keys_path``; the CLI's status passes it):
    the line of those its refill could not make (``PoolStatus.bodies``) is said only while that list is there."""
    with _admin(server.dsn(MAINTENANCE_DB)) as conn:
        _reopen_abandoned(conn, server.dbname, wait=False)  # a live reset's door: status waits for no one
        mark = _pristine_mark(conn, server.dbname)
        ready = _ready_clones(conn, server.dbname)
        return _status(conn, server.dbname, mark, ready, server.cluster, bodies)


def _status(
    conn: psycopg.Connection[Any],
    db: str,
    mark: _Mark | None,
    ready: Collection[str],
    cluster: int | None,
    bodies: Path | None = None,
) -> PoolStatus:
    """``pool_status`` of the pool ``mark`` records (None: no complete copy), ``ready`` as read with it, on the
    server of ``cluster`` (``ServerInfo.cluster``, None: not known). It writes nothing: whether the server's
    copies are reflinks is the mark's answer (``_Machine.of``). The bodies' line is said only while ``bodies``,
    the list of those to make, is there (None: whatever it is): the segments a refill could not make stay listed
    (``_make_bodies``), so no list is none left to make, their files fetched again and the bodies made since
    (`refresher warm`, another refill); the line stayed for good before, whoever had fetched the file again. Nor
    is a line recorded before that list was begun (``body_keys.started``): the list it was about was emptied and
    removed since (`refresher warm` made its bodies), and the list now there is a later refresh's. Nor one older
    than what `refresher warm`, making only some of the list's bodies, noted in the list it left
    (``body_keys.NotMade``): that is said instead."""
    if mark is None:
        return PoolStatus(False, (), DEFAULT_POOL_SIZE)
    why = pool_reason(mark.pool, _database_bytes(conn, pristine_name(db)))
    _, cut = _disk_cut(conn, db, mark.pool_size, _Machine.of(conn, mark, probe=False), len(ready))
    outcome = _outcome_path(conn, db, cluster)
    notes = _refill_notes(outcome)
    failed = _died(outcome, notes) or _last_failure(outcome)
    why = why if cut is None else f"{why}; {cut}"
    since = 0 if bodies is None else body_keys.started(bodies)
    noted = None if bodies is None else body_keys.not_made(bodies)
    not_made = "" if since is None else _bodies_line(outcome, since, noted)
    return PoolStatus(True, tuple(ready), mark.pool_size, why, failed, _refilling(notes), not_made)


def disk_cut(server: ServerInfo) -> str | None:
    """What the refill about to start will say of the disk (``_disk_cut``) when it holds fewer clones than the
    pool keeps, None when not: a refresh reports it, as the detached refill's stderr reaches nobody. What that
    refill's sweep drops first (trash, and pool slots not ready: stale clones of a replaced copy) counts as
    free. A note, after the refresh's work is committed: an error asking is None, not the refresh's failure."""
    db = server.dbname
    try:
        with _admin(server.dsn(MAINTENANCE_DB)) as conn:
            mark = _pristine_mark(conn, db)
            if mark is None:
                return None
            ready = _ready_clones(conn, db)
            doomed = [
                *_derelicts(conn, db),
                *(name for name in _pool_databases(conn, db) if name not in ready),
            ]
            freed = sum(_database_bytes(conn, name) for name in doomed)
            return _disk_cut(conn, db, mark.pool_size, _Machine.of(conn, mark), len(ready), freed=freed)[1]
    except (psycopg.Error, RefresherError):
        return None


def recorded_pool(server: ServerInfo, conn: psycopg.Connection[Any]) -> PoolSizing | None:
    """The pool size the pristine copy's mark records, and whether the user chose it; None when there is no
    complete copy. ``conn``: open on any database of the server (the mark is in the shared catalog)."""
    mark = _pristine_mark(conn, server.dbname)
    return mark.pool if mark else None


def default_pool_size(*, reflink: bool, copy_bps: int | None, database_bytes: int) -> int:
    """The pool a user who chose none gets: ``DEFAULT_POOL_SIZE`` where the server's copies are reflinks (a clone
    costs almost no disk, and a rename beats even a reflink copy) or no copy was measured yet; else none when a
    copy of ``database_bytes`` at the measured ``copy_bps`` takes at most ``FAST_COPY`` s (a reset that copies
    still answers at once, and the disk holds the database and its pristine copy, not two more), else
    ``DEFAULT_POOL_SIZE`` (bounded by the free disk, ``pool_size_for_disk``)."""
    if reflink or not copy_bps:
        return DEFAULT_POOL_SIZE
    return 0 if database_bytes / copy_bps <= FAST_COPY else DEFAULT_POOL_SIZE


def size_pool(
    conn: psycopg.Connection[Any],
    db: str,
    chosen: PoolSize | None,
    old: PoolSizing | None,
    *,
    copy_of: str,
    copy_bps: int | None = None,
) -> PoolSizing:
    """What the mark of a new pristine copy ``copy_of`` of ``db`` records about its pool: ``chosen`` (the
    user's size), else (None) the old mark's when the user chose it (it sticks), else (None, or ``auto``, which
    forgets the user's) ``default_pool_size`` for this server. ``copy_bps``: the rate of the copy just made
    (None: none was). The fastest rate measured on this server is what the mark keeps: other work only ever slows
    a copy, and a small database's copy is mostly fixed cost near ``FAST_COPY``, so one copy timed under load
    would otherwise flip the default from 0 to 2 clones, and a daily refresh (which measures no copy) would keep
    that slow rate for good."""
    bps = size_pool_rate(copy_bps, old)
    reflink = server_reflinks(conn)  # recorded whoever chose the size: the pool's readers need not probe
    if isinstance(chosen, int):
        return PoolSizing(chosen, True, reflink, bps)
    if chosen is None and old is not None and old.chosen:
        return replace(old, reflink=reflink, copy_bps=bps)
    size = default_pool_size(reflink=reflink, copy_bps=bps, database_bytes=_database_bytes(conn, copy_of))
    return PoolSizing(size, False, reflink, bps)


def size_pool_rate(copy_bps: int | None, old: PoolSizing | None) -> int | None:
    """The copy rate a new mark records: the fastest of the copy just made (``copy_bps``) and the old mark's."""
    rates = [rate for rate in (copy_bps, old.copy_bps if old is not None else None) if rate]
    return max(rates) if rates else None


def pool_reason(pool: PoolSizing, database_bytes: int) -> str:
    """Why the pool keeps ``pool.size`` clones (``refresher status``); ``database_bytes``: the pristine copy's."""
    clones = f"pool {pool.size}"
    if pool.chosen:
        return f"{clones}: chosen (--pool-size, $REFRESHER_POOL_SIZE), kept until another is given"
    if pool.reflink:
        return f"{clones}: the server's copies are reflinks here, a clone costs almost no disk"
    if not pool.copy_bps:
        return f"{clones}: no copy measured on this server yet"
    seconds = database_bytes / pool.copy_bps
    if pool.size == 0:
        return f"{clones}: no reflink here and a copy resets in {seconds:.2f} s"
    return f"{clones}: no reflink here and a copy would take {seconds:.2f} s (over {FAST_COPY} s)"


def server_reflinks(conn: psycopg.Connection[Any]) -> bool:
    """Whether the copies of databases ``conn``'s server makes are reflinks: PG 18's ``file_copy_method =
    clone`` (the local engine sets it) on a filesystem that clones (XFS with reflink=1, btrfs), tried in its data
    directory when this host sees it. False where nobody can tell (a container's disk)."""
    row = conn.execute("SELECT current_setting('file_copy_method', true)").fetchone()
    directory = data_directory(conn) if row is not None and row[0] == "clone" else None
    return directory is not None and _reflinks(directory)


def _reflinks(directory: Path) -> bool:
    """Whether a file in ``directory`` can be cloned (the FICLONE ioctl: what copy_file_range does there); first
    removes the scratch directories of probes whose process is gone (``_sweep_scratch``)."""
    try:
        import fcntl

        _sweep_scratch(directory)
        with _scratch(directory) as scratch:
            source, clone = Path(scratch, "a"), Path(scratch, "b")
            source.write_bytes(bytes(4096))
            with source.open("rb") as src, clone.open("wb") as dst:
                fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
    except (OSError, ImportError):
        return False
    return True


@contextlib.contextmanager
def _scratch(directory: Path) -> Iterator[Path]:
    """A new directory in ``directory`` (``SCRATCH_PREFIX``), removed after the block, and flock'ed (the
    directory itself) while it exists: the kernel drops the lock when its process dies, however it dies, so a
    sweep (``_sweep_scratch``) tells the directory a SIGKILL left from a live probe's. A sweep that took one in
    the instant between its mkdir and its lock removes it: another is made. Where the filesystem has no flock
    (NFS: no exclusive lock on a directory) it goes unlocked, and no sweep there removes it while it lives."""
    import fcntl

    for _ in range(SCRATCH_TRIES):
        path = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=directory))
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            continue  # a sweep removed it before we opened it
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a sweep holds it, and removes it
            except OSError:
                pass  # no flock here: unlocked, never swept (see _sweep_scratch)
            try:
                if not os.path.samestat(os.stat(path), os.fstat(fd)):
                    continue
            except FileNotFoundError:
                continue  # a sweep removed it before our lock
            try:
                yield path
            finally:
                shutil.rmtree(path, ignore_errors=True)
            return
        finally:
            os.close(fd)
    raise OSError(f"{directory}: no scratch directory of our own after {SCRATCH_TRIES} tries")


def _sweep_scratch(directory: Path) -> None:
    """Remove the scratch directories (``_scratch``) in ``directory`` that no live process holds: a probe killed
    inside it (SIGKILL, a power loss) left one for good, and so did one of a refresher before they were locked.
    A live probe's is locked and stays, whichever process or checkout made it. Best effort: what this user may
    not remove stays (and all of it where there is no flock)."""
    with contextlib.suppress(OSError, ImportError):
        import fcntl

        for leftover in directory.glob(f"{SCRATCH_PREFIX}*"):
            with contextlib.suppress(OSError):
                fd = os.open(leftover, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises while its maker lives
                    shutil.rmtree(leftover, ignore_errors=True)
                finally:
                    os.close(fd)


def _database_bytes(conn: psycopg.Connection[Any], name: str) -> int:
    row = conn.execute("SELECT pg_database_size(%s)", (name,)).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def unfinished_analyses(conn: psycopg.Connection[Any]) -> list[str]:
    """The databases of ``conn``'s server whose handout recorded an analysis not finished yet (``HandedOut``: its
    analyzer is at it, or was killed). A command that starts no refill (a stamped no-op refresh) starts a
    detached analyzer for them (``spawn_refill(server, fill=False)``); one a finisher is at is left out (no
    second analyzer is started for it), and so is left alone by a refill.
    ``conn``: open on any database of the server (the records are in the shared catalog); trash aside (the sweep
    drops it)."""
    return [name for name in recorded(conn, unattended=True) if TRASH_INFIX not in name]


def resize_pool(server: ServerInfo, size: PoolSize) -> PoolSizing | None:
    """Make ``size`` the pool's size, as the user's choice (``auto``: the default's, ``size_pool``, the user's
    forgotten): drop the ready clones of slots ``size`` and up (their disk is given back), then record it in the
    pristine copy's mark; returns what the mark records. None when the mark says so already, or there is no copy.

    The refill (``spawn_refill``) then fills the pool to the new size. Under REFILL exclusive, as every mark
    write but the analyzed copy's (REFILL shared and STATS): no refiller, analysis or template checkout runs
    meanwhile, so none can make a clone the new mark does not
    count, and two resizes at once leave the last one's size with no more clones than it says. The mark is the
    last statement: a kill before it leaves the old mark over a pool short of clones (the next refill makes
    them again), a kill after it the new one; a COMMENT is all or nothing.
    """
    db = server.dbname
    with _admin(server.dsn(MAINTENANCE_DB)) as conn, _advisory(conn, db, REFILL):
        mark = _pristine_mark(conn, db)
        if mark is None or pool_as_asked(size, mark.pool_size, mark.pool.chosen):
            return None
        sizing = size_pool(conn, db, size, mark.pool, copy_of=pristine_name(db))
        # Out of takers' reach in one transaction of renames (a DROP under TAKE would hold up resets), each as a
        # checkout takes a clone: a session left on it (a database browser) ends rather than failing the rename.
        with _advisory(conn, db, TAKE), conn.transaction():
            doomed = [name for name in _ready_clones(conn, db) if _slot_of(db, name) >= sizing.size]
            trash = [f"{db}{TRASH_INFIX}{secrets.token_hex(4)}" for _ in doomed]
            for name, out in zip(doomed, trash, strict=True):
                _take(conn, name, out, None)
        for out in trash:
            _drop_database(conn, out)
        _execute(
            conn,
            sql.SQL("COMMENT ON DATABASE {} IS {}").format(
                sql.Identifier(pristine_name(db)),
                sql.Literal(replace(mark, pool=sizing).text()),
            ),
        )
    return sizing


def wait_for_pool(server: ServerInfo, *, timeout: float = 60.0, bodies: Path | None = None) -> PoolStatus:
    """Wait until the pool is full again (after a reset or checkout), or holds what the disk held as its last
    refill ended when that was fewer clones (``_settled``); raise SnapshotError on timeout: no refill came, or
    one died short. ``bodies``: a refresh's list of COPY bodies to make (``body_keys.keys_path``): then also
    until its refill has made them (the list gone, or left with those it could not make) or no refill given it
    runs any more (``body_keys.pending``), so what runs next finds the bodies in the store.

    Not the disk's bound as measured now: a refill drops the trash a reset left before it counts, and a clone
    being copied takes disk before it is ready, so a bound measured from here undercounts while one runs. A tick
    is a few queries on one session, the whole wait's: the status returned (its disk bound) is made once, at the
    end (each tick was a ``pool_status`` and a second session, a reflink probe in the data directory included)."""
    db = server.dbname
    deadline = time.monotonic() + timeout
    with _admin(server.dsn(MAINTENANCE_DB)) as conn:
        directory = data_directory(conn)
        while True:
            _reopen_abandoned(conn, db)
            mark = _pristine_mark(conn, db)
            ready = _ready_clones(conn, db)
            if mark is not None and len(ready) >= mark.pool_size:
                break
            settled = _settled(conn, db, directory) if mark is not None else None
            if settled is not None and len(ready) >= settled:
                break
            if time.monotonic() > deadline:
                target = DEFAULT_POOL_SIZE if mark is None else mark.pool_size
                raise SnapshotError(f"{db}: pool has {len(ready)}/{target} clones after {timeout:.0f}s")
            time.sleep(0.1)
        while bodies is not None and body_keys.pending(bodies):
            if time.monotonic() > deadline:
                raise SnapshotError(
                    f"{db}: the refill has not made the COPY bodies of {bodies} after {timeout:.0f}s"
                )
            time.sleep(0.1)
        return _status(conn, db, mark, ready, server.cluster, bodies)


def _settled(conn: psycopg.Connection[Any], db: str, directory: Path | None) -> int | None:
    """The clones the disk held as the last refill of ``db``'s pool ended (``_record_settled``), when that still
    holds: no refill is at the pool (none holds or waits for REFILL: one starting or running may make more, and a
    mark being written may change the pool), and the record is of the current pristine copy and says what the
    disk holds of its pool: it asked the mark's size, or the disk cut what it asked (a refill given another size,
    ``refill_pool(size=)``: the disk holds as few of any larger pool). None otherwise, and where this host cannot
    see the server's data directory (``directory`` None, a container's: no disk bound)."""
    if directory is None or conn.execute(_REFILLING, (db, REFILL)).fetchone() != (False,):
        return None
    mark = _pristine_mark(conn, db)
    try:
        # A field a newer refresher adds after these three is read as absent, not as no record.
        generation, wanted, made, *_newer = _settled_path(directory, db).read_text().split()
        asked, held = int(wanted), int(made)
    except (OSError, ValueError):
        return None
    if mark is None or generation != mark.generation:
        return None
    return held if asked == mark.pool_size or held < asked else None


# Whether a session holds or waits for advisory lock (hashtext(%s), %s) (two int4 keys: classid, objid,
# objsubid 2), whichever its mode: the maintenance database's, where every pool session takes them.
_REFILLING = (
    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 2 AND database = "
    "(SELECT oid FROM pg_database WHERE datname = current_database()) "
    "AND classid::bigint = (hashtext(%s)::bigint & 4294967295) AND objid::bigint = %s)"
)


def _settled_path(directory: Path, db: str, prefix: str = SETTLED_PREFIX) -> Path:
    """The file in ``directory`` (the server's data directory) that records what the last refill of ``db``'s pool
    made (``prefix`` ``OUTCOME_PREFIX``: how it ended, ``_outcome_path``; a name may hold any character: hashed)."""
    return directory / f"{prefix}{hashlib.sha256(db.encode()).hexdigest()[:16]}"


def _record_settled(
    conn: psycopg.Connection[Any], db: str, size: int | None, machine: _Machine, made: int
) -> None:
    """Record, as a refill of ``db``'s pool ends (under REFILL shared), that the disk holds ``made`` clones of
    the pool of ``size`` (None: the mark's) asked, for ``wait_for_pool``: fewer than asked when it cut the pool.
    What it holds, not what is ready: a clone taken as the refill ended is made again by the taker's refill.
    Replaced whole (a reader never sees half); best effort, as the reflink probe's scratch beside it: a
    directory we may not write leaves ``wait_for_pool`` waiting for the full pool, as it did before."""
    mark = _pristine_mark(conn, db)
    if machine.data_directory is None or mark is None:
        return
    path = _settled_path(machine.data_directory, db)
    part = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    with contextlib.suppress(OSError):
        part.write_text(f"{mark.generation} {mark.pool_size if size is None else size} {made}\n")
        os.replace(part, path)
    with contextlib.suppress(OSError):
        part.unlink(missing_ok=True)


def _record_outcome(
    admin_dsn: str, db: str, ended: int, failure: str | None, *, at: Path | None = None
) -> None:
    """Record that a detached refill of ``db``'s pool ended at ``ended`` (ns since the epoch) with ``failure`` (its
    one line; None: it filled the pool), for ``refresher status``: the refill's own output reaches nobody (the
    CLI's go to /dev/null), and a failed one left the pool short without a word while resets copied.

    At ``_outcome_path``, its first line, ``<ended> ok`` or ``<ended> failed <line>`` (the bodies' line after it is
    kept: ``_record_bodies``). The latest end wins: under an exclusive flock of a lock file beside it, a refill
    that ended before the recorded one leaves it (two refills at once: one failing before a later one filled the
    pool does not claim the pool failed; one failing later does). Written to one ``.part`` file under that lock
    and renamed over: a reader never sees half, and a writer killed midway leaves the record as it was and a part
    the next one overwrites. Best effort, as the settled record (a directory we may not write, a full disk: no
    record); one connection of its own, as the refill's may be what failed. ``at``: the record's path when the
    caller knows it (the refill learns it as it starts, ``_running``): no connection then."""
    with contextlib.suppress(OSError, psycopg.Error, RefresherError), _record_held(admin_dsn, db, at) as held:
        path, outcome, bodies = held
        recorded = _parse_outcome(outcome)
        if recorded is not None and recorded[0] > ended:
            return
        _write_record(path, f"{ended} ok" if failure is None else f"{ended} failed {failure}", bodies)
        for note in _refill_notes(path):  # deaths this end covers (``_died``): their notes say no more
            if note.gone and note.started < ended:
                note.path.unlink(missing_ok=True)


def _record_bodies(
    admin_dsn: str, db: str, ended: int, not_made: int, first: str, *, at: Path | None = None
) -> None:
    """Record, as ``_record_outcome`` does and in the same record, that a refill ended making COPY bodies at
    ``ended`` unable to make ``not_made`` of them, ``first`` the first one's line; 0 clears it. The refill's
    lines of them went to /dev/null after a CLI refresh (a store's Parquet file gone or damaged: no body, and
    nobody told). The record's second line, ``bodies <ended> <not made> <line>``, after the outcome's, which it
    keeps (a refill that made no body, a reset's, keeps this line likewise); alone when no refill has recorded an
    outcome (a ``--no-fill`` one). A reader before this line reads the outcome of the first line as before, a
    failure's line then followed by this one (its failure is the rest of the record); an outcome line it cannot
    read (this line alone) is no record to it. The latest end wins, as for the outcome; ``at`` as its."""
    with contextlib.suppress(OSError, psycopg.Error, RefresherError), _record_held(admin_dsn, db, at) as held:
        path, outcome, bodies = held
        recorded = _parse_bodies(bodies)
        if recorded is not None and recorded[0] > ended:
            return
        _write_record(path, outcome, f"{BODIES_WORD} {ended} {not_made} {first}" if not_made else "")


@contextlib.contextmanager
def _record_held(admin_dsn: str, db: str, at: Path | None = None) -> Iterator[tuple[Path, str, str]]:
    """The outcome record of ``db``'s pool (at ``at``, else ``_outcome_path`` asked on a connection of its own),
    its directory made, under its lock (``_outcome_locked``): its path, outcome line and bodies' line
    (``_record_lines``)."""
    path = at
    if path is None:
        with _admin(admin_dsn) as conn:
            path = _outcome_path(conn, db)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _STOPS.held(), _outcome_locked(path):  # a stop of the refill writing it: raised once it is whole
        yield (path, *_record_lines(path))


def _record_lines(path: Path) -> tuple[str, str]:
    """The outcome line and the bodies' line of the record at ``path`` ("" for one it has not)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return "", ""
    bodies = next((line for line in lines if line.startswith(f"{BODIES_WORD} ")), "")
    return (lines[0] if lines and lines[0] != bodies else ""), bodies


def _write_record(path: Path, outcome: str, bodies: str) -> None:
    """Replace the record at ``path`` by these lines (the outcome first), under its lock: a part renamed over;
    none left (both "") removes it."""
    text = "".join(f"{line}\n" for line in (outcome, bodies) if line)
    if not text:
        path.unlink(missing_ok=True)
        return
    part = path.with_name(f"{path.name}.part")
    part.write_text(text)
    os.replace(part, path)


def forget_outcome(server: ServerInfo) -> None:
    """Remove the record of how the last refill of ``server.dbname``'s pool ended (``_record_outcome``): its
    lock and a leftover part too, for an engine that removes the server or the database (the Docker and compose
    engines' ``stop``; a local server's goes with its data directory). A container's record is in this user's
    cache directory, which nothing else cleans: each `refresher down` left its files behind.

    This server's alone (``_outcome_path``: its address, database and cluster), under the record's lock, which
    is unlinked while held: a writer waiting on it takes the new one (``_outcome_locked``). A refill that ends
    after this records anew, under a key no later server has. Best effort: a server that does not answer keeps
    its files (no later server reads them), and its removal goes on."""
    with contextlib.suppress(OSError, psycopg.Error, RefresherError):
        with _admin(server.dsn(MAINTENANCE_DB)) as conn:
            path = _outcome_path(conn, server.dbname)
        _forget_outcome_at(path)


def _forget_outcome_at(path: Path) -> None:
    """Remove the record at ``path``, its part, its running notes and its lock, under that lock (``forget_outcome``)."""
    if not path.parent.is_dir():
        return
    with _outcome_locked(path) as lock:
        path.unlink(missing_ok=True)
        path.with_name(f"{path.name}.part").unlink(missing_ok=True)
        for note in _note_files(path):
            note.unlink(missing_ok=True)
        lock.unlink()


def note_server(noted: Path, server: ServerInfo, *, fresh: bool, container: str | None = None) -> int | None:
    """Add ``server``'s address and cluster (its system identifier) to the list at ``noted``, in the engine's state
    dir, for ``forget_noted``: `refresher down` of a container that is stopped or gone (`docker stop`, `docker
    rm`, a daemon restart) cannot ask its cluster, which keys its records in the user's cache (``_outcome_path``),
    and left them behind for good. ``fresh``: the server was started or made by this call (a volume made again
    is another cluster at the same address); otherwise an address already noted is not asked again (its volume
    is mounted: the same cluster). ``container``, a Docker container's id, is noted with it and names the cluster
    for good (``noted_cluster``): one noted is not asked again even when started again, and ``ServerInfo.cluster``
    takes it from the note. Best effort, as the records: a failure leaves the list as it was. Answers the
    cluster noted or found, None when not known (not asked, or the question failed)."""
    servers = noted_servers(noted)
    if container is not None:
        known = noted_cluster(servers, server.host, server.port, container)
        if known is not None:
            return known
    elif not fresh and any(entry[:2] == [server.host, server.port] for entry in servers):
        return None
    cluster = None
    with contextlib.suppress(OSError, psycopg.Error, RefresherError):
        with _admin(server.dsn(MAINTENANCE_DB)) as conn:
            cluster = _cluster(conn)
        entry = [server.host, server.port, cluster, *([] if container is None else [container])]
        if cluster is not None and entry not in servers:
            write_private_json(noted, {"servers": [*servers, entry]})
    return cluster


def forget_noted(noted: Path, db: str) -> None:
    """Remove the records of how refills of ``db``'s pool ended on each server noted at ``noted``
    (``note_server``), whether or not it answers now, then the list: only those servers' (their clusters), never
    another checkout's or server's sharing the cache directory."""
    for host, port, cluster, *_ in noted_servers(noted):
        with contextlib.suppress(OSError):
            _forget_outcome_at(_cached_outcome_path(host, port, db, cluster))
    noted.unlink(missing_ok=True)


@contextlib.contextmanager
def _outcome_locked(path: Path) -> Iterator[Path]:
    """Hold the exclusive lock of the lock file beside the record at ``path`` (the engines' ``locked``); yields
    the lock file's path.

    The lock taken is the one at that path when it is held: ``forget_outcome`` unlinks it while it holds it, and
    a writer that opened it before, then waited, would hold an inode nobody else will lock. ``locked``'s
    filelock opens the path anew at each try and refuses an inode unlinked by the time it holds it."""
    lock_path = path.with_name(f"{path.name}.lock")
    with locked(lock_path):
        yield lock_path


def _outcome_path(conn: psycopg.Connection[Any], db: str, cluster: int | None = None) -> Path:
    """Where ``_record_outcome`` records how the last detached refill of ``db``'s pool on ``conn``'s server ended:
    beside the settled record in the server's data directory when this host sees it (it goes with the cluster),
    else (a container's) under this user's cache directory, by the server's address, the database and the
    cluster (``forget_outcome`` removes it with the server): the refiller is a process of this host, as `refresher status` is (``spawn_refill`` passes it $XDG_CACHE_HOME).
    ``cluster``: the cluster's system identifier when the caller knows it (``ServerInfo.cluster``), which spares
    asking the server (a query on every `refresher status` of a container); None: it is asked."""
    directory = data_directory(conn)
    if directory is not None:
        return _settled_path(directory, db, OUTCOME_PREFIX)
    # The cluster's system identifier (random at its initdb) too: a server made later at the same address (a new
    # volume after `refresher down`, whose files may have stayed) has another, and no failure of the old one.
    if cluster is None:
        cluster = _cluster(conn)
    return _cached_outcome_path(conn.info.host, conn.info.port, db, cluster)


def _cluster(conn: psycopg.Connection[Any]) -> int | None:
    """The system identifier of ``conn``'s server's cluster (random at its initdb); None if it has none."""
    [cluster] = conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone() or (None,)
    return None if cluster is None else int(cluster)


def _cached_outcome_path(host: str, port: int | str, db: str, cluster: object) -> Path:
    """``_outcome_path`` of a server whose data directory this host cannot see: by its address, database and
    cluster (``forget_noted`` finds it from these without asking the server)."""
    server = f"{host}:{port}/{db}/{cluster}"
    return _settled_path(cache_directory(os.environ) / OUTCOMES, server, OUTCOME_PREFIX)


def _read_outcome(path: Path) -> tuple[int, str | None] | None:
    """The record ``_record_outcome`` wrote at ``path``: when the last refill ended and its failure (None: it
    filled the pool); None when there is none or it is not one."""
    return _parse_outcome(_record_lines(path)[0])


def _parse_outcome(line: str) -> tuple[int, str | None] | None:
    """``_read_outcome`` of the record's outcome ``line``. A failure without its line (``<ended> failed``) is a
    failure, ``NO_REASON``: it read as none, and status said nothing of a refill recorded as failed."""
    try:
        ended, outcome, *rest = line.split(" ", 2)
        return (int(ended), (rest[0] if rest and rest[0] else NO_REASON) if outcome == "failed" else None)
    except ValueError:
        return None


def _parse_bodies(line: str) -> tuple[int, int, str] | None:
    """The bodies' ``line`` of a record (``_record_bodies``): when, how many not made, the first's line; None
    when it is not one."""
    try:
        word, ended, not_made, *rest = line.split(" ", 3)
        return (int(ended), int(not_made), rest[0] if rest else "") if word == BODIES_WORD else None
    except ValueError:
        return None


def _last_failure(path: Path) -> str:
    """``PoolStatus.failed``: the line saying the last detached refill recorded at ``path`` failed, "" when it did
    not (or there is no record: none ended yet)."""
    recorded = _read_outcome(path)
    if recorded is None or recorded[1] is None:
        return ""
    return f"the last refill ({_local_time(recorded[0])}) failed: {recorded[1]}"


def _bodies_line(path: Path, since: int = 0, noted: body_keys.NotMade | None = None) -> str:
    """``PoolStatus.bodies``: the line saying what the last refill to make COPY bodies recorded at ``path`` could
    not make, "" when it made them all (or none made any), or recorded it before ``since`` (ns: the list the line
    was about is gone); or what `refresher warm` ``noted`` in the list, when it ended after that refill. A load
    reads such a segment's Parquet rows instead; one whose stored file was gone or damaged is dropped from the
    store, and `refresher warm` fetches it again."""
    recorded = _parse_bodies(_record_lines(path)[1])
    said = None
    if recorded is not None and recorded[1] > 0 and recorded[0] >= since:
        said = ("the refill", *recorded)
    if noted is not None and noted.count > 0 and (said is None or noted.ended > said[1]):
        said = ("`refresher warm`", noted.ended, noted.count, noted.first)
    if said is None:
        return ""
    who, ended, not_made, first = said
    return (
        f"{who} ({_local_time(ended)}) could not make {not_made} COPY bod{'y' if not_made == 1 else 'ies'}:"
        f" {first or NO_REASON}; loads read the Parquet rows instead (`refresher warm` fetches again a file the"
        " store dropped and makes its body)"
    )


def _local_time(ns: int) -> str:
    """A moment (ns since the epoch) as `refresher status` shows it: local time, to the second."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns / 1e9))


class _Stopped(KeyboardInterrupt):
    """A detached refill stopped by one of ``STOP_SIGNALS`` (``_Stops``). A KeyboardInterrupt: psycopg cancels
    the query in flight (the CREATE DATABASE of a clone) as on a Ctrl-C, no ``except Exception`` of a step
    takes it for that step's failure, and the ``finally`` blocks run (a body's temporaries removed)."""

    def __init__(self, signum: int, reason: str | None = None) -> None:
        self.signum = signum
        self.name = signal.Signals(signum).name
        self.reason = reason  # the refill's own (``_Stops.give_up``): it failed, and exits 1
        super().__init__(reason or f"stopped by {self.name}")


class _Stops:
    """How the detached refill takes a polite stop. Python's default for SIGTERM (and SIGHUP) ended it on the spot,
    as a SIGKILL would: a clone's CREATE DATABASE went on in the server, the bodies' temporaries stayed, and
    status said it "died ... (killed outright: SIGKILL, the OOM killer?)"; a SIGINT it ignored (``spawn_refill``'s
    ``sh -c '... &'`` starts it so). Here the first stop raises ``_Stopped`` in the main thread (the refill then
    records that it was stopped, ``main``); one arriving while a record or note is written (``held``) is raised
    as that ends, so none is left half-written or as a ``.part``; later ones are let go (the first is being
    honoured; a SIGKILL still ends it at once)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.reason: str | None = None
        self._holding = 0
        self._raised = False
        self._halts: list[_Halt] = []
        self._watched = False  # in the block a watch may give the refill up in (``watched``)
        self._giving_up: str | None = None  # the reason of a give-up whose signal is on its way
        self._outside: int | None = None  # a stop from outside while a give-up is honoured (``withdraw``)

    def _on_signal(self, signum: int, _frame: object) -> None:
        if self.signum is None:
            self.signum = signum
        elif self.reason is not None:
            self._outside = signum
        self._raise()

    def _on_give_up(self, _signum: int, _frame: object) -> None:
        reason, self._giving_up = self._giving_up, None
        if self.signum is None and self._watched and reason is not None:
            self.signum, self.reason = signal.SIGTERM, reason
            self._raise()
        # else a stop from outside came first, or the give-up lands once its block ended: its work is done

    def _raise(self) -> None:
        if self.signum is not None and not self._raised and not self._holding:
            for halt in self._halts:  # told first: a helper's copy that ends meanwhile is not marked
                halt.tell()
            self._raised = True
            raise _Stopped(self.signum, self.reason)

    def give_up(self, reason: str) -> None:
        """Stop the refill as a SIGTERM does, from one of its threads (``_refill_watch``: its server stopped
        answering), ``reason`` recorded as its failure: the stop's path is the one that ends a refill whose server
        takes no cancel (``_Halt``), and a signal is what interrupts the main thread's wait on that server.

        Its own signal (``GIVE_UP_SIGNAL``): a SIGTERM, it merged with a SIGTERM from outside pending at the same
        moment (the kernel keeps one of each), and the one delivery was taken for the give-up, the outside stop
        lost with it where a give-up is dropped (``watched``)."""
        if self.signum is None and self._watched:
            self._giving_up = reason
            signal.pthread_kill(threading.main_thread().ident or 0, GIVE_UP_SIGNAL)

    @contextlib.contextmanager
    def watched(self) -> Iterator[None]:
        """The block a watch may give the refill up in (``give_up``), in the main thread. A give-up decided as the
        block's work returned lands after it, where it is no failure: once the block ended, the signal handler
        drops it; between the work's return and that end, the caller drops the ``_Stopped`` it raised
        (``withdraw``). Either way a refill whose work was done is never recorded as given up."""
        self._watched = True
        try:
            yield
        finally:
            self._watched = False

    def withdraw(self) -> None:
        """Forget a give-up raised as its watched block's work returned (``watched``): a stop after it is taken,
        and one from outside that came while the give-up was honoured is raised at the next ``held``'s end (it
        was let go as a second stop, then forgotten with the give-up: the refill went on, and exited 0)."""
        self.signum, self.reason, self._raised = self._outside, None, False
        self._outside = None

    @contextlib.contextmanager
    def telling(self, halt: _Halt) -> Iterator[None]:
        """``halt`` told of a stop (``_Halt.tell``) the moment it is raised, in the block."""
        self._halts.append(halt)
        try:
            yield
        finally:
            self._halts.remove(halt)

    def told(self) -> list[_Halt]:
        """The halts told of a stop now (``telling``): one halted halts them all (``_Halt.halt``)."""
        return list(self._halts)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """A stop arriving in the block is raised after it, also in place of what the block raised: a write that
        failed (a full disk) is suppressed by its best-effort caller, and the stop was then raised only at the
        next ``held``'s end, the refill going on meanwhile (its bodies made)."""
        self._holding += 1
        try:
            yield
        finally:
            self._holding -= 1
            self._raise()

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """``STOP_SIGNALS`` and ``GIVE_UP_SIGNAL`` taken by this object in the block (the refill's ``main``)."""
        old = {each: signal.signal(each, self._on_signal) for each in STOP_SIGNALS}
        old[GIVE_UP_SIGNAL] = signal.signal(GIVE_UP_SIGNAL, self._on_give_up)
        try:
            yield
        finally:
            for each, handler in old.items():
                signal.signal(each, handler)


# The refill's (``main`` installs it); outside it nothing is ever raised, and ``held`` only counts.
_STOPS = _Stops()


@contextlib.contextmanager
def _running(admin_dsn: str, db: str, session: str = "") -> Iterator[tuple[Path | None, _Stopped | None]]:
    """Note, while the body runs, that this process refills ``db``'s pool: ``<record>.running-<pid>`` beside the
    outcome record (``_outcome_path``), holding when it started, which process it is (``owner_labels``: host,
    pid namespace, pid and the process's start time, so a pid reused later is not taken for it) and the
    ``application_name`` of its sessions (``session``: the next refill ends them if this one dies, ``_end_dead``).

    A refill ended outright (SIGKILL, the OOM killer) records no outcome: status showed neither a failure nor that
    a refill ran, the pool short without a word. Its note stays, and status tells it from a running one by its
    process being gone (``_refill_notes``, ``_died``). The note goes as the body ends, however it ends, after the
    outcome it recorded: no moment shows neither. Written to a part renamed over (never read half); best effort,
    as the outcome record (a server that does not answer: no note, and the refill fails on its own). Yields the
    record's path (None when the server did not answer: the refill's records pass it, ``_record_outcome(at=)``,
    and need no connection, which one to a server that stopped answering kept for its 10 s timeout, a stop too,
    and recorded nothing), and the stop that came while the note was written, for the body to raise where the
    refill records it (raised here, it was recorded nowhere: status kept the previous outcome, as if no refill
    had run)."""
    note: Path | None = None
    path: Path | None = None
    stopped: _Stopped | None = None
    try:
        with contextlib.suppress(OSError, psycopg.Error, RefresherError):
            # A stop of the refill (``_Stops``) here is raised at once: a server that does not answer (its
            # postmaster stopped, a listener that never replies) kept it for the connect's 10 s timeout.
            with _admin(admin_dsn) as conn:
                path = _outcome_path(conn, db)
            path.parent.mkdir(parents=True, exist_ok=True)
            # One while the note is written is raised once it is whole (never a part left, and the note removed
            # below), by the body: the server answered, so the refill can record it.
            try:
                with _STOPS.held():
                    note = path.with_name(f"{path.name}{RUNNING_SUFFIX}{os.getpid()}")
                    part = note.with_name(f"{note.name}.part")
                    labels = {"started": time.time_ns(), "session": session, **owner_labels(os.getpid())}
                    part.write_text(json.dumps(labels) + "\n")
                    os.replace(part, note)
            except _Stopped as exc:
                stopped = exc
        yield path, stopped
    finally:
        if note is not None:
            with _STOPS.held(), contextlib.suppress(OSError):
                note.unlink(missing_ok=True)


def _note_files(path: Path) -> Iterator[Path]:
    """The files beside the outcome record ``path`` named as refills' notes (``_running``), notes or not."""
    return path.parent.glob(f"{glob.escape(path.name)}{RUNNING_SUFFIX}*")


@dataclass(frozen=True)
class _RefillNote:
    """A detached refill's note (``_running``): its file, when it started (ns), its pid, whether its process is
    gone (``owner_gone``: of this host and pid namespace, no process with its pid and start time runs), and the
    ``application_name`` of its sessions ("" in a note from before it was noted)."""

    path: Path
    started: int
    pid: int
    gone: bool
    session: str = ""


def _refill_notes(path: Path) -> list[_RefillNote]:
    """The notes of the refills at the outcome record ``path`` (``_running``), oldest first; one that is no note
    (a part, another file) is none."""
    notes = []
    for note in _note_files(path):
        try:
            labels = json.loads(note.read_text())
            started, pid = int(labels.pop("started")), int(note.name.rsplit(RUNNING_SUFFIX, 1)[1])
            session = str(labels.pop("session", ""))
            gone = owner_gone({key: str(value) for key, value in labels.items()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        notes.append(_RefillNote(note, started, pid, gone, session))
    return sorted(notes, key=lambda note: note.started)


def _died(path: Path, notes: list[_RefillNote]) -> str:
    """``PoolStatus.failed`` for a refill killed outright: the line naming the latest one whose process is gone
    with its note left, when it started after the recorded outcome at ``path`` ended (a refill that ended since
    says how the pool was left: its failure, or nothing); "" when there is none."""
    recorded = _read_outcome(path)
    dead = [note for note in notes if note.gone and (recorded is None or note.started > recorded[0])]
    if not dead:
        return ""
    return (
        f"the refill started {_local_time(dead[-1].started)} (pid {dead[-1].pid}) died without recording how it "
        "ended (killed outright: SIGKILL, the OOM killer?)"
    )


def _refilling(notes: list[_RefillNote]) -> str:
    """``PoolStatus.refilling``: the line saying which detached refills run now, "" when none does."""
    alive = [note for note in notes if not note.gone]
    if not alive:
        return ""
    pids = ", ".join(str(note.pid) for note in alive)
    since = _local_time(alive[0].started)
    if len(alive) == 1:
        return f"a refill is running (pid {pids}, since {since})"
    return f"{len(alive)} refills are running (pids {pids}; the first since {since})"


def _failure_line(exc: BaseException) -> str:
    """One line for ``_record_outcome``: a refresher error's own message, else its type and first line."""
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    if not isinstance(exc, RefresherError):
        line = f"{type(exc).__name__}: {line}" if line else type(exc).__name__
    return line if len(line) <= 300 else line[:297] + "..."


def refill_pool(server: ServerInfo, *, size: int | None = None, concurrency: int | None = None) -> int:
    """Create the missing pool clones now, from this process; returns how many it made.

    ``size`` asks for a pool of that many clones instead of the size the snapshot recorded. Either way the
    pool never holds more than the free space of the server's disk allows (``pool_size_for_disk``). Up to
    ``concurrency`` slots are copied at once (default: ``refill_concurrency`` of this machine), counting the
    copies of every other process refilling the same pool.

    The server processes doing the copies run at low CPU and I/O priority where they are processes of this
    host (the local engine): a refill is background work, and the tests or queries running beside it are not.
    """
    local = server.engine == "local"
    return _refill(
        server.dsn(MAINTENANCE_DB), server.dbname, background=local, size=size, concurrency=concurrency
    )


def refill_concurrency(cpus: int, *, rotational: bool) -> int:
    """How many pool copies to run at once on a machine with ``cpus`` cores.

    A copy keeps one server process busy (a core with fsync off, the page cache taking the writes), so one
    per core, at most ``MAX_REFILL_CONCURRENCY``; a spinning disk seeks between parallel copies, so half that.
    """
    per_core = max(1, min(cpus, MAX_REFILL_CONCURRENCY))
    return max(1, per_core // 2) if rotational else per_core


def pool_size_for_disk(wanted: int, *, ready: int, clone_bytes: int, free: int, total: int) -> int:
    """How many warm clones to keep: ``wanted``, but only as many more than the ``ready`` ones as fit in
    ``free`` bytes less a reserve: none at all when even one would eat into it (the ready ones are kept).

    The reserve is a tenth of the filesystem (``total``), at least 1 GB: the server's WAL and the tests'
    own writes need room too, and a copy onto a full disk can make Postgres PANIC. One clone costs its
    database's size plus a WAL segment (``clone_bytes`` as measured on the pristine copy, before the slack).
    No floor of one: it kept a checkout a rename on a disk already past its reserve by filling the disk
    further, while a pool of 0 costs a reset a copy of the pristine database instead (slower, as safe).
    """
    reserve = disk_reserve(total)
    each = max(clone_bytes, 0) + COPY_SLACK
    more = max(0, (free - reserve) // each)
    return min(wanted, ready + more)


def disk_reserve(total: int) -> int:
    """The free space a refill leaves on a filesystem of ``total`` bytes: a tenth of it, at least 1 GB."""
    return max(total // 10, GB)


def spawn_refill(
    server: ServerInfo,
    *,
    log: Path | None = None,
    analyze: HandedOut | None = None,
    fill: bool = True,
    bodies: tuple[Path, Path] | None = None,
) -> None:
    """Refill the pool in a detached process, so the caller (the CLI) can exit at once; first analyze
    ``analyze``, a database just handed out, and every other whose analysis a handout recorded. ``fill=False``:
    only those. ``bodies`` (a refresh's list of COPY bodies to make, ``body_keys``, and the store's root): then,
    after its clones, the refill makes them at idle priority (``_make_bodies``), holding the list's lock from
    before it starts (handed over on an inherited descriptor) to its end.

    ``sh ... &`` double-forks: the refiller is reparented to init, so no zombie or still-running Popen is left
    with the caller. The password travels in the environment, never on a command line.

    Best effort: it runs after the caller's work is done (a reset handed out, a refresh committed), so a refill
    that cannot start (its log not writable, no process to be had: EAGAIN, ENOMEM) is one line on stderr, not
    that work's failure; the next refresh fills the pool, and a reset meanwhile copies.
    """
    handed = None if analyze is None else (analyze.name, analyze.pending)
    _refill_spawn.spawn_refill(server, log=log, analyze=handed, fill=fill, bodies=bodies)


# -- the work, on an autocommit connection to the maintenance database --------------------------------------------
def _refill(
    admin_dsn: str,
    db: str,
    *,
    background: bool,
    size: int | None,
    concurrency: int | None,
    handed: HandedOut | None = None,
    fill: bool = True,
    dead: Collection[str] = (),
) -> int:
    """Bring planner statistics up to date (a database just ``handed`` out first, then every other one whose
    analysis a handout recorded and no finisher holds, the working database's beside the rest, the pristine
    copy's before any clone is made of it), sweep leftovers, then fill the pool's missing slots from up to
    ``concurrency`` sessions at once. ``fill=False``: only the handed-out and recorded ones. ``dead``: the
    sessions of refills that died, ended first (``_end_dead``)."""
    halt = _Halt()
    with _admin(admin_dsn) as conn, halt.threads(1) as beside:
        _end_dead(conn, dead)
        if background:
            _lower_priority(conn.info.backend_pid)
        _reopen_abandoned(conn, db)  # a reset killed with its door shut: the refill after a refresh opens it
        first = [handed] if handed is not None and (handed.name != db or not fill) else []
        skip = {each.name for each in first} | ({db} if fill else set())  # the working one: analyzed below
        others = [HandedOut(name, ()) for name in unfinished_analyses(conn) if name not in skip]
        for each in [*first, *others]:
            beside.submit(_analyze_handed_out, admin_dsn, each, background, halt)
        if not fill:
            return 0
        also = handed.pending if handed is not None and handed.name == db and not may_record(conn) else ()
        working = _open_working(admin_dsn, db, background)
        changed = _stale_names(working)
        if working is not None:
            beside.submit(_analyze_working, working, [*changed, *also], halt)
        with _advisory(conn, db, REFILL, shared=True):
            _analyze_pristine(conn, admin_dsn, db, background, also=changed)
            return _sweep_and_fill(conn, admin_dsn, db, background, size, concurrency)


def _end_dead(conn: psycopg.Connection[Any], sessions: Collection[str]) -> None:
    """End the server sessions named ``sessions`` (``application_name``), those of refills that died (SIGKILL, the
    OOM killer) with their notes left (``_running``): the server never heard them go while their query ran (a
    clone's CREATE DATABASE, an ANALYZE), so each ran on to its end, holding its slot's lock, and left its copy
    unmarked until a later refill swept it. Waited for (``DEAD_WAIT`` s at most), so the sweep that follows finds
    their slots free and drops what they left; one that does not end (its process stopped) keeps its slot, and this
    refill fills others. Best effort: a role that may not end them leaves them to run on, as before."""
    if not sessions:
        return
    with contextlib.suppress(psycopg.Error):
        rows = conn.execute(
            "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = ANY(%s) AND pid <> pg_backend_pid()",
            (list(sessions),),
        ).fetchall()
        _wait_gone(conn, *(int(pid) for pid, _ in rows), timeout=DEAD_WAIT)


def _sweep_and_fill(
    conn: psycopg.Connection[Any],
    admin_dsn: str,
    db: str,
    background: bool,
    size: int | None,
    concurrency: int | None,
) -> int:
    """The refill proper, under REFILL shared (the caller holds it)."""
    _sweep(conn, db)
    machine = _Machine.of(conn, _pristine_mark(conn, db))
    if machine.data_directory is not None:
        # A snapshot killed while it probed for reflinks: the next snapshot's probe sweeps too, but many resets
        # (each a refill) may come before it.
        _sweep_scratch(machine.data_directory)
    width = concurrency or refill_concurrency(os.cpu_count() or 1, rotational=machine.rotational)
    missing = _missing(conn, db, size, machine)
    created = 0
    helpers = min(width, missing) - 1
    if missing > 0 and helpers <= 0:
        created = _fill(conn, db, size, machine, width)
    elif missing > 0:
        halt = _Halt()
        with halt.threads(helpers) as pool:
            extra = [
                pool.submit(_fill_from_new_session, admin_dsn, db, size, machine, width, background, halt)
                for _ in range(helpers)
            ]
            created = _fill(conn, db, size, machine, width)
            created += sum(f.result() for f in extra)
    # Once, as it ended: the bound is looked at again before each copy (a clone costs its database, its WAL
    # slack only while it is made), so the first look may count fewer than the refill then made.
    ready = len(_ready_clones(conn, db))
    _record_settled(conn, db, size, machine, _target(conn, db, size, machine, ready, say=True))
    return created


def _open_working(admin_dsn: str, db: str, background: bool) -> psycopg.Connection[Any] | None:
    """A session on the working database, at low priority when ``background``; None when it is gone or going
    (a reset renames it away and ends its sessions): its statistics are then the clone's that replaced it."""
    try:
        live = psycopg.connect(
            conninfo.make_conninfo(admin_dsn, dbname=db), autocommit=True, connect_timeout=10
        )
    except psycopg.Error:
        return None
    if background:
        _lower_priority(live.info.backend_pid)
    return live


def _stale_names(live: psycopg.Connection[Any] | None) -> tuple[str, ...]:
    """What the working database's counters say changed since its last ANALYZE, for a pristine copy whose mark
    records none (taken by an older version): a copy of the database, or a replay of the same writes, changed the
    same (its own zeroed counters cannot say)."""
    if live is None:
        return ()
    try:
        return stale_names(live)
    except psycopg.Error:
        live.close()
        return ()


def _analyze_working(
    live: psycopg.Connection[Any], names: Collection[str], halt: _Halt | None = None
) -> None:
    """ANALYZE ``names`` and whatever else is out of date in ``live``'s database (the working one, or one handed
    out), then close ``live``; the analysis recorded on it, if any, is finished and cleared as it goes. ``halt``:
    the refill's (``_refill``), which cancels it as the refill stops.

    Best effort, beside the refill: a reset or a refresh may end the session; autovacuum would get there later,
    and the next refill to a recorded one.
    """
    cancels = contextlib.nullcontext() if halt is None else halt.cancels(live)
    with contextlib.suppress(psycopg.Error), live, cancels, finishing(live) as ours:
        if not ours:  # another analyzer is at this database: it does the work, and if it dies the next refill
            return
        wait_past_autovacuum(live)  # a user's DDL on a table goes first (skipped), autovacuum does not
        if finish_recorded(live, also=names) is None:
            analyze_stale(live, also=names)


def _analyze_handed_out(
    admin_dsn: str, handed: HandedOut, background: bool, halt: _Halt | None = None
) -> None:
    """ANALYZE what is out of date in a database a reset or checkout just handed out (its user may be running
    tests in it: each table's lock is waited for ``deadlock_timeout`` and a second more at most,
    ``wait_past_autovacuum``). Best effort: a test's teardown may drop it."""
    with contextlib.suppress(psycopg.Error):
        live = _connect(conninfo.make_conninfo(admin_dsn, dbname=handed.name), halt)
        if background:
            _lower_priority(live.info.backend_pid)
        # Its handout recorded what it lacks where the role may record: the record is the whole truth, and a
        # finisher that came first cleared it (``handed.pending`` again would analyze those tables twice).
        _analyze_working(live, () if may_record(live) else handed.pending, halt)


def _analyze_pristine(
    conn: psycopg.Connection[Any], admin_dsn: str, db: str, background: bool, *, also: Collection[str] = ()
) -> None:
    """Replace a pristine copy whose mark does not say ``analyzed`` by an analyzed copy of it, before the refill
    clones it: every clone, reset and test database then plans with statistics. The caller holds REFILL shared,
    as takers do: a reset or checkout meanwhile copies the copy as it was, at once (and has its copy analyzed
    after, ``HandedOut``); no mark changes under us, since every other writer of one holds REFILL exclusively.

    Not in place: a template takes no connections, and a reset copying it (under TAKE alone) fails while one is
    open. So a copy of it (a ready clone when there is one, else a new copy) is made in a private slot (its lock
    ours: a sweep leaves it, and the next refill drops it if we die), analyzed, then swapped in under a new
    generation, as ``advance_pristine`` does; the copy and its clones it replaces are left to the sweep. One
    analyzer at a time (STATS); a second one waits, then finds the mark analyzed. Best effort: on an error the
    pristine copy stays as it was, and the refill clones it without statistics. Analyzed: what the copy's
    catalog says is out of date, what its mark records (``pending``) and ``also``.
    """
    mark = _pristine_mark(conn, db)
    if mark is None or mark.analyzed:
        return
    with _advisory(conn, db, STATS):
        mark = _pristine_mark(conn, db)
        if mark is None or mark.analyzed:  # another refiller analyzed it meanwhile
            return
        slot = _claim_private_slot(conn, db)
        building = pool_name(db, slot)
        try:
            with _advisory(conn, db, TAKE):
                ready = _ready_clones(conn, db)
                if ready:  # unmarked from here on (a clone's mark would hand it out)
                    _take(conn, ready[0], building, "")
            if not ready:
                _create_from(conn, pristine_name(db), building)
            dsn = conninfo.make_conninfo(admin_dsn, dbname=building)
            with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as copy:
                if background:
                    _lower_priority(copy.info.backend_pid)
                analyze_stale(copy, also={*also, *mark.pending})
                analyzer = copy.info.backend_pid
            _wait_gone(conn, analyzer)
            _publish(
                conn, db, building, replace(mark, generation=secrets.token_hex(8), analyzed=True, pending=())
            )
        except (psycopg.Error, RefresherError):
            if conn.closed:
                raise
            _drop_database(conn, building)
        except _Stopped:
            _drop_unmarked(conn, building)  # no longer left to the next refill's sweep
            raise
        finally:
            if not conn.closed:
                _unlock(conn, db, SLOT + slot)


def _fill_from_new_session(
    admin_dsn: str, db: str, size: int | None, machine: _Machine, width: int, background: bool, halt: _Halt
) -> int:
    try:
        session = _connect(admin_dsn, halt)
    except psycopg.OperationalError as exc:  # as ``_admin`` says it
        raise SnapshotError(f"cannot reach the server for snapshots: {exc}") from exc
    with session as conn, halt.cancels(conn), _advisory(conn, db, REFILL, shared=True):
        if background:
            _lower_priority(conn.info.backend_pid)
        return _fill(conn, db, size, machine, width, halt)


def _connect(dsn: str, halt: _Halt | None) -> psycopg.Connection[Any]:
    """An autocommit connection to ``dsn`` for a refill's thread, tried for ``CONNECT_TIMEOUT`` s in all, in slices
    of ``CONNECT_SLICE`` s between which ``halt`` is looked at: a stop raises in the main thread alone, whose
    connect it ends at once, and a thread's connect to a server that does not answer kept the stopped refill
    waiting out its whole timeout (10 s). Raises ``QueryCanceled`` once halted."""
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while True:
        if halt is not None and halt.is_set():
            raise psycopg.errors.QueryCanceled("the refill stopped")
        try:
            return psycopg.connect(dsn, autocommit=True, connect_timeout=CONNECT_SLICE)
        except psycopg.errors.ConnectionTimeout:
            if time.monotonic() >= deadline:
                raise


class _Halt:
    """The stop of a refill's threads: the helpers copying clones (``_sweep_and_fill``) and the one analyzing the
    working and handed-out databases beside it (``_refill``). A stop (``_Stops``) raises ``_Stopped`` in the main
    thread alone, and psycopg cancels that thread's query alone: a helper's CREATE DATABASE under way ran on to
    its end, the refill waiting for it, and the helper marked the clone; the analysis thread's ANALYZE ran on,
    then every handed-out analysis still queued, before the refill exited (a service manager's SIGKILL came
    first). The threads of ``threads`` are told of the stop as it is raised (``tell``: a helper's copy ending
    while the main thread cleans up is not marked), then, before the block's end waits for them, their sessions'
    queries are cancelled (``cancels``), as psycopg does for the main thread, and their queued work dropped; a
    copy made meanwhile is dropped (``_make_clone``)."""

    def __init__(self) -> None:
        self._halted = False  # a plain flag: set in the signal handler (``tell``), which must take no lock
        self._lock = threading.Lock()
        self._sessions: set[psycopg.Connection[Any]] = set()
        self._cancelled: set[psycopg.Connection[Any]] = set()

    def is_set(self) -> bool:
        return self._halted

    def tell(self) -> None:
        self._halted = True

    @contextlib.contextmanager
    def cancels(self, conn: psycopg.Connection[Any]) -> Iterator[None]:
        """``conn``'s query cancelled by a ``halt`` in the block; none begun once halted."""
        with self._lock:
            if self._halted:
                raise psycopg.errors.QueryCanceled("the refill stopped")
            self._sessions.add(conn)
        try:
            yield
        finally:
            with self._lock:
                self._sessions.discard(conn)
                self._cancelled.discard(conn)

    def halt(self) -> None:
        """Cancel the queries of this halt's sessions and of every other halt the stop told (``_Stops.telling``),
        all at once: each cancel a server does not take waits ``CANCEL_TIMEOUT`` before its session is cut, and one
        after another (each helper's, then the analysis thread's) a stop took that long per session, ~20 s."""
        sessions = [(halt, conn) for halt in {self, *_STOPS.told()} for conn in halt._to_cancel()]
        cancels = [
            threading.Thread(target=halt._cancel, args=(conn,), daemon=True) for halt, conn in sessions
        ]
        for each in cancels:
            each.start()
        # Each cancel keeps its own timeout, and a cut is at once: this bounds them all.
        deadline = time.monotonic() + CANCEL_TIMEOUT + 1
        for each in cancels:
            each.join(max(0.0, deadline - time.monotonic()))

    def _to_cancel(self) -> list[psycopg.Connection[Any]]:
        """The sessions whose query a halt has not cancelled yet, halted from here on: a second halt (the outer
        block's, the same stop's) sends no second cancel to wait out."""
        with self._lock:
            self._halted = True
            sessions = list(self._sessions - self._cancelled)
            self._cancelled |= self._sessions
        return sessions

    def _cancel(self, conn: psycopg.Connection[Any]) -> None:
        try:
            conn.cancel_safe(timeout=CANCEL_TIMEOUT)  # as psycopg's own on a KeyboardInterrupt
        except psycopg.Error:
            self._cut(conn)

    def _cut(self, conn: psycopg.Connection[Any]) -> None:
        """Shut ``conn``'s socket down, its cancel not taken (a server whose postmaster does not answer, a dead
        host): its thread's query then fails at once, where it waited for the query's end (a copy's minutes, a
        lock's for good) or its keepalives' verdict, and the stopped refill with it. The connection stays its
        thread's to close (closing it here would free what that thread is using); one its thread let go meanwhile
        is left alone (its descriptor may be another's by now)."""
        with self._lock, contextlib.suppress(OSError, psycopg.Error):
            if conn in self._sessions:
                with socket.socket(fileno=os.dup(conn.fileno())) as sock:
                    sock.shutdown(socket.SHUT_RDWR)

    @contextlib.contextmanager
    def threads(self, workers: int) -> Iterator[_Workers]:
        """``workers`` threads for the block, halted when the refill stops in it, or while its end waits for
        them: a block that failed otherwise (the main thread's copy, a helper's error) waited there with its
        helpers unhalted, and a stop then left them copying clones after "stopped" was recorded."""
        executor = _Workers(workers)
        with _STOPS.telling(self):
            try:
                yield executor
            finally:
                try:
                    if self._halted:
                        self.halt()
                    executor.shutdown(cancel_futures=self._halted)
                except _Stopped:
                    self.halt()
                    executor.shutdown(cancel_futures=True)
                    raise


_P = ParamSpec("_P")
_T = TypeVar("_T")


class _Workers(ThreadPoolExecutor):
    """The threads of ``_Halt.threads``, whose ``shutdown`` waits for their work on its futures before it joins
    them. A stop raised in a join left the thread it waited for marked as ended (CPython's join, interrupted,
    releases that thread's lock: bpo-45274), so the shutdown that followed the halt returned at once, and the
    refill exited with that thread still at its work (an analysis, a helper's copy being dropped), cut off by the
    interpreter's exit; the wait for the futures is interrupted without harm."""

    def __init__(self, workers: int) -> None:
        super().__init__(workers)
        self._futures: list[Future[Any]] = []

    def submit(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> Future[_T]:
        future = super().submit(fn, *args, **kwargs)
        self._futures.append(future)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        super().shutdown(wait=False, cancel_futures=cancel_futures)
        if wait:
            # Not those it cancelled: a future cancelled that no worker took is never done to ``wait``.
            futures.wait([each for each in self._futures if not each.cancelled()])
            super().shutdown(wait=True)  # their threads, idle by now


@dataclass(frozen=True)
class _Machine:
    """What this host can see of the server's disk: its data directory (None for a container's), its kind, and
    whether the server's copies are reflinks there (``server_reflinks``)."""

    data_directory: Path | None
    rotational: bool
    reflink: bool = False

    @classmethod
    def of(cls, conn: psycopg.Connection[Any], mark: _Mark | None, *, probe: bool = True) -> _Machine:
        """This host's view of ``conn``'s server, whose pool ``mark`` records (None: no complete copy). Reflinks:
        as the mark records them (its snapshot probed); probed again (``server_reflinks``: scratch files in the
        data directory) only for a mark that does not say (an older refresher's) when ``probe``, else taken
        as none (full copies: the disk bound the lower)."""
        path = data_directory(conn)
        if path is None:
            return cls(None, False)
        reflink = mark.pool.reflink if mark is not None else False
        if reflink is None:
            reflink = probe and server_reflinks(conn)
        return cls(path, _is_rotational(path), reflink)

    def usage(self) -> tuple[int, int] | None:
        """(free, total) bytes of the data directory's filesystem; None when this host cannot see it."""
        if self.data_directory is None:
            return None
        try:
            usage = shutil.disk_usage(self.data_directory)
        except OSError:
            return None
        return usage.free, usage.total


def _is_rotational(path: Path) -> bool:
    """Whether the block device under ``path`` says it spins (a partition's answer is its disk's)."""
    st_dev = path.stat().st_dev
    device = Path(f"/sys/dev/block/{os.major(st_dev)}:{os.minor(st_dev)}")
    for flag in (device / "queue" / "rotational", device / ".." / "queue" / "rotational"):
        with contextlib.suppress(OSError):
            return flag.read_text().strip() == "1"
    return False


def _target(
    conn: psycopg.Connection[Any],
    db: str,
    size: int | None,
    machine: _Machine,
    ready: int,
    *,
    say: bool = False,
) -> int:
    """The pool size now: the requested or recorded size, bounded by the disk when this host can see it. A clone
    costs the pristine copy's size, none of it where the server's copies are reflinks (they share its extents
    until written; ``pg_database_size`` counts them whole). ``say``: one line on stderr when the disk cuts the
    pool (the refill's log; not an error: a reset without a clone copies)."""
    mark = _pristine_mark(conn, db)
    if mark is None:
        return 0
    target, cut = _disk_cut(conn, db, mark.pool_size if size is None else size, machine, ready)
    if say and cut is not None:
        print(f"refresher: pool of {db}: {cut}", file=sys.stderr, flush=True)
    return target


def _disk_cut(
    conn: psycopg.Connection[Any], db: str, wanted: int, machine: _Machine, ready: int, *, freed: int = 0
) -> tuple[int, str | None]:
    """The pool of ``wanted`` clones (``ready`` of them made) the disk holds (``pool_size_for_disk``; ``freed``
    bytes more free), and the line saying so when that is fewer (None when not, or when this host cannot see
    the disk)."""
    usage = machine.usage()
    if usage is None or wanted <= 0:
        return wanted, None
    free, total = usage[0] + freed, usage[1]
    clone_bytes = 0 if machine.reflink else _database_bytes(conn, pristine_name(db))
    target = pool_size_for_disk(wanted, ready=ready, clone_bytes=clone_bytes, free=free, total=total)
    if target >= wanted:
        return target, None
    return target, (
        f"the disk holds {target} of {wanted} warm clones, keeping {disk_reserve(total) / GB:.1f} GB free on "
        f"{machine.data_directory} ({free / GB:.2f} GB free, a clone {clone_bytes / GB:.2f} GB); a reset "
        "without a clone copies"
    )


def _missing(conn: psycopg.Connection[Any], db: str, size: int | None, machine: _Machine) -> int:
    ready = len(_ready_clones(conn, db))
    return _target(conn, db, size, machine, ready) - ready


def _fill(
    conn: psycopg.Connection[Any],
    db: str,
    size: int | None,
    machine: _Machine,
    width: int,
    halt: _Halt | None = None,
) -> int:
    """Make clones in free slots until the pool is full or every missing slot has a maker (or a helper thread's
    ``halt`` is set: its refill stopped)."""
    created = 0
    held: set[int] = set()  # slots whose old database a session this role may not end is on: one further each
    while True:
        ready = _ready_clones(conn, db)
        target = _target(conn, db, size, machine, len(ready))
        if len(ready) >= target or (halt is not None and halt.is_set()):
            return created
        # Slots 0..target-1 that hold no ready clone number at least the missing ones: if another maker holds
        # each of them, the pool fills without us.
        free = _free_slots(db, target + len(held), held=held, taken=ready)
        slot = _claim_slot(conn, db, free)
        if slot is None:
            return created
        try:
            with _copier(conn, db, width):
                # What a killed maker or an older copy left there.
                if not _drop_leftover(conn, pool_name(db, slot)):
                    held.add(slot)
                    continue
                _make_clone(conn, db, slot, halt)
                created += 1
        finally:
            # A connection a stop left closed (its cancel not taken: psycopg closes it, ``_Halt`` cuts a
            # helper's) holds no lock any more; unlocking on it raised over the stop, recorded as a failure.
            if not conn.closed:
                _unlock(conn, db, SLOT + slot)


def _claim_slot(conn: psycopg.Connection[Any], db: str, slots: list[int]) -> int | None:
    """The first of ``slots`` nobody is making and that holds no ready clone, locked for us; None if none."""
    for n in slots:
        if _try_lock(conn, db, SLOT + n):
            if pool_name(db, n) not in _ready_clones(conn, db):  # another maker finished it meanwhile
                return n
            _unlock(conn, db, SLOT + n)
    return None


@contextlib.contextmanager
def _copier(conn: psycopg.Connection[Any], db: str, width: int) -> Iterator[None]:
    """Hold one of ``width`` copy tokens of ``db`` (waiting for one when every token is in use)."""
    token = next((k for k in range(width) if _try_lock(conn, db, COPIER + k)), None)
    if token is None:
        token = conn.info.backend_pid % width
        _lock(conn, db, COPIER + token)
    try:
        yield
    finally:
        if not conn.closed:  # as ``_fill``'s slot
            _unlock(conn, db, COPIER + token)


def _copy_and_take(conn: psycopg.Connection[Any], db: str, name: str, note: str | None) -> _Mark:
    """Copy the pristine database into a private slot, then rename it to ``name`` with ``note``; returns the
    mark of the copy it copied.

    Copied under a slot's name, unmarked, so a copy whose maker is killed is a leftover the next refill drops
    (an unmarked pool database), never a database nobody knows to remove.
    """
    with _advisory(conn, db, REFILL, shared=True):
        # Under REFILL shared no swap to a copy not analyzed comes before the copy (see ``_take``).
        mark = _require_pristine(conn, db)
        _copy_in(conn, db, name, note, mark)
    return mark


def _copy_in(
    conn: psycopg.Connection[Any],
    db: str,
    name: str,
    note: str | None,
    mark: _Mark,
    *,
    what: str = "",
    replacing: bool = False,
    before_take: Callable[[], None] | None = None,
) -> None:
    """Copy the pristine database (marked ``mark``) into a private slot, then rename it to ``name`` with ``note``
    and, when ``mark`` is not analyzed, the record of its pending analysis, in one transaction (``_take``): a
    kill anywhere leaves either no ``name`` or one that says what it lacks, never a copy nobody analyzes. The
    caller holds what keeps the mark as read (TAKE, or REFILL shared). ``what``: as ``_create_from``'s;
    ``replacing``: as ``_take``'s. ``before_take``: called between the copy and the rename; what it raises drops
    the copy."""
    slot = _claim_private_slot(conn, db)
    private = pool_name(db, slot)
    try:
        _create_from(
            conn, pristine_name(db), private, what=what or f"copying {pristine_name(db)} into {name}"
        )
        if before_take is not None:
            before_take()
        _take(conn, private, name, note, mark, replacing=replacing)
    except BaseException:
        with contextlib.suppress(psycopg.Error):
            if not conn.closed:
                _drop_database(conn, private)
        raise
    finally:
        if not conn.closed:
            _unlock(conn, db, SLOT + slot)


def _claim_private_slot(conn: psycopg.Connection[Any], db: str) -> int:
    for _ in range(100):
        n = PRIVATE_SLOTS.start + secrets.randbelow(len(PRIVATE_SLOTS))
        if _try_lock(conn, db, SLOT + n):
            if _comment(conn, pool_name(db, n)) is None:
                return n
            _unlock(conn, db, SLOT + n)
    raise SnapshotError(f"{db}: no free slot to copy the pristine database into", database=db)


def _take(
    conn: psycopg.Connection[Any],
    old: str,
    new: str,
    note: str | None,
    mark: _Mark | None = None,
    *,
    replacing: bool = False,
) -> None:
    """Rename ``old`` to ``new`` and set its comment to ``note``, in one transaction; with ``mark`` (that of the
    pristine copy ``old`` is a copy of) not analyzed, the analysis ``new`` needs is recorded on it in the same
    transaction (``HandedOut``), when the role ``may_record``. A copy analyzed meanwhile (``_analyze_pristine`` swaps under REFILL shared)
    only costs an analysis for nothing; a swap to a copy not analyzed needs REFILL exclusive, which the caller
    excludes (TAKE or REFILL shared held since ``mark`` was read). ``replacing``: ``new`` exists, and goes to
    the trash in the same transaction (a reset; ``_move_to_trash``)."""
    record = mark is not None and not mark.analyzed and may_record(conn)
    with conn.transaction():
        # A session left on a clone (a psql, a database browser that connects to every database) made its
        # rename wait the server's 5 s and fail: it ends (with those on ``new`` when replacing: one query), and
        # ``_rename`` ends one that connects meanwhile.
        if replacing:
            _move_to_trash(conn, new, taking=old)
        else:
            _terminate_others(conn, old)
        _rename(conn, old, new, ending=(old,))
        if note is not None:
            _execute(
                conn,
                sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(new), sql.Literal(note)),
            )
        if record and mark is not None:
            _execute(conn, record_pending(new, mark.pending))


def _sweep(conn: psycopg.Connection[Any], db: str) -> None:
    """Drop what killed makers left, without disturbing live ones (the caller holds REFILL shared).

    Trash and half-built copies: only ``save_pristine`` builds, under REFILL exclusive, so under shared any
    is a leftover; one sweeper drops them, the others skip. An unmarked or stale pool database: only after
    taking its slot's lock (its maker, if alive, holds it).
    """
    if _try_lock(conn, db, SWEEP):
        try:
            for name in _derelicts(conn, db):
                _drop_leftover(conn, name)
        finally:
            _unlock(conn, db, SWEEP)
    ready = set(_ready_clones(conn, db))
    for name in _pool_databases(conn, db):
        if name in ready:
            continue
        slot = _slot_of(db, name)
        if _try_lock(conn, db, SLOT + slot):
            try:
                if name not in _ready_clones(conn, db):
                    _drop_leftover(conn, name)
            finally:
                _unlock(conn, db, SLOT + slot)


def _make_clone(conn: psycopg.Connection[Any], db: str, n: int, halt: _Halt | None = None) -> str:
    """Clone the pristine copy as pool slot ``n``; it becomes visible to takers only once marked. ``halt``: a
    refill's helper thread's (``_Halt``)."""
    mark = _pristine_mark(conn, db)
    if mark is None:
        raise SnapshotError(f"{db}: the pristine snapshot vanished while filling the pool", database=db)
    name = pool_name(db, n)
    note = sql.Literal(f"refresher clone_of={mark.generation}")
    try:
        _create_from(conn, pristine_name(db), name)
        if halt is not None and halt.is_set():  # halted as the copy began, its cancel too early: not marked
            raise psycopg.errors.QueryCanceled(f"{name}: the refill stopped as it copied")
        _execute(conn, sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(name), note))
    except BaseException:
        # Stopped (``_Stopped``; a helper's query cancelled, ``_Halt``) or failed with the copy made and not
        # marked: never handed out, and dropped now rather than left to the next refill's sweep.
        _drop_unmarked(conn, name)
        raise
    return name


def _drop_unmarked(conn: psycopg.Connection[Any], name: str) -> None:
    """Drop ``name``, an unmarked copy a refill was making or analyzing (a clone, the pristine copy's analyzed
    copy) as it stopped (``_Stops``) or failed: nothing hands it out, and the refill's next sweep would, so best
    effort (what stays, it drops). A copy whose CREATE was cancelled or failed is none."""
    with contextlib.suppress(psycopg.Error, RefresherError):
        if not conn.closed:
            _drop_database(conn, name)


def _lower_priority(pid: int) -> None:
    """Lower the CPU (nice +10) and I/O (best-effort, lowest level) priority of server process ``pid``.

    A clone is copied by the server process of the session that asks for it, so lowering the refiller itself
    would not help: the copy of a 1 GB database kept a core and the disk busy for seconds after a refresh
    returned. Best-effort rather than idle I/O: on a busy disk an idle-class refill would never finish, and a
    test would then wait for a template clone. Where we may not (another user's server), it runs as it is.
    """
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, pid, min(os.getpriority(os.PRIO_PROCESS, pid) + 10, 19))
    ionice = shutil.which("ionice")
    # Best effort as the nice above: an exec that fails (EFAULT from a fork under load, seen failing a whole
    # refill in a fresh-clone CI: '[Errno 14] Bad address: /usr/bin/ionice') leaves the copy at its priority.
    with contextlib.suppress(OSError):
        if ionice is not None:
            subprocess.run([ionice, "-c", "2", "-n", "7", "-p", str(pid)], capture_output=True, check=False)


def _make_bodies(keys: Path, store_root: Path, record: Callable[[int, str], None]) -> None:
    """The refill's last step (``spawn_refill(bodies=)``): make the COPY bodies ``keys`` lists (``body_keys``) in
    the store at ``store_root``, at the lowest CPU and I/O priority (after the clones, which a reset waits for:
    the bodies only speed up the next load into a new database), then remove the list if it is still the one read
    (a newer one, written by a refresh meanwhile, stays for its refill). A body that cannot be made is a line in
    the refill's log and stays listed (``body_keys.finished``): the next refill tries it again, `refresher warm`
    makes it once it fetched its file again, and status says why only while it is listed (removing the list
    instead left the line for good, whoever fetched the file again); the step failing as a whole: the list stays
    whole, left by its maker too when this code cannot write the store (a newer format, a manifest closed to this
    user; ``body_keys.tried``: a refresh the stamp answers spawns no refill to fail the same way; a load noting
    it, or `refresher warm`, tries again), unmarked for the next refill when it may pass (the manifest busy, a
    full disk). ``record``
    (``_record_bodies``) is told how many it could not make (the step failing: those still without a body,
    ``_not_made``) and the first one's line before the list goes: ``wait_for_pool(bodies=)`` returns once it is
    gone, and status then says it."""
    wanted, inode = body_keys.read(keys)
    if not wanted:
        record(0, "")
        _finish_list(keys, inode, [])
        return
    if not _is_store(store_root):  # the store removed meanwhile: not made again here
        print(f"refresher: COPY bodies not made: no store at {store_root}", flush=True)
        with _STOPS.held():
            record(len(wanted), f"COPY bodies not made: no store at {store_root}")
            _finish_list(keys, inode, wanted)
        return
    _lower_own_priority()
    from featurestore import FeatureStore  # the work's own imports (pyarrow, pgpq) only where it is done
    from refresher.bodies import make_listed

    started = time.perf_counter()
    try:
        made = make_listed(FeatureStore(store_root), wanted, say=lambda line: print(line, flush=True))
    except Exception as exc:
        # A store this code cannot write (a newer format, a manifest or directory closed to this user): left by its
        # maker (``body_keys.tried``), every listed segment kept (those made are skipped next time); left unmarked,
        # every refresh the stamp answers spawned a refill failing the same way, until a load noted the list
        # again. Anything else may pass (the manifest held by a gc or a put, a lock timeout, a full disk freed):
        # the list stays unmarked, for the next no-op's refill.
        from featurestore.errors import StoreFormatNewer, StoreNotWritable

        print(f"refresher: COPY bodies not made: {_failure_line(exc)}", flush=True)
        with _STOPS.held():
            record(_not_made(store_root, wanted), f"COPY bodies not made: {_failure_line(exc)}")
            if isinstance(exc, StoreFormatNewer | StoreNotWritable):
                _finish_list(keys, inode, wanted)
        return
    with _STOPS.held():  # a stop now: the record and the list agree
        record(len(made.said), made.said[0].removeprefix("refresher: ") if made.said else "")
        _finish_list(keys, inode, made.left)
    took = time.perf_counter() - started
    print(f"bodies: {made.made} made of {len(wanted)} listed in {took:.2f}s", flush=True)


def _finish_list(keys: Path, inode: int | None, left: list[body_keys.Wanted]) -> None:
    """``body_keys.finished``, its error (a full disk, the list's directory not writable) one line of the refill's
    log, after the line its bodies recorded: the list then stays as read, and the next refill skips the bodies
    made. Raised, it ended the refill in a traceback (exit 1) after its work was done and recorded."""
    try:
        body_keys.finished(keys, inode, left)
    except OSError as exc:
        print(f"refresher: the list of COPY bodies to make left as it was: {_failure_line(exc)}", flush=True)


def _not_made(store_root: Path, wanted: list[body_keys.Wanted]) -> int:
    """How many of ``wanted`` the store at ``store_root`` has no body of now (``bodies.lacking``), for the line
    of a bodies' step that failed or was stopped midway: the batches it published before are made. All of them
    when that cannot be told (no store: not made here; the store's manifest failing, maybe what failed)."""
    if not _is_store(store_root):
        return len(wanted)
    from featurestore import FeatureStore
    from refresher.bodies import lacking

    try:
        return len(lacking(FeatureStore(store_root), wanted))
    except Exception:
        return len(wanted)


def _is_store(root: Path) -> bool:
    """Whether a store is at ``root`` (its manifest), asked before opening it: ``FeatureStore`` would make one."""
    return (root / "manifest.duckdb").exists()


def _lower_own_priority() -> None:
    """This process to the lowest CPU priority (SCHED_IDLE where the platform has it: it runs only when a core
    would idle; else nice 19) and the idle I/O class (``ionice -c 3``), each best effort as ``_lower_priority``:
    its work (the COPY bodies) helps only the next load, never what the user runs meanwhile. Threads made after
    this inherit both."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        with contextlib.suppress(OSError):
            os.nice(19 - os.nice(0))
    ionice = shutil.which("ionice")
    with contextlib.suppress(OSError):
        if ionice is not None:
            subprocess.run([ionice, "-c", "3", "-p", str(os.getpid())], capture_output=True, check=False)


def _drop_leftovers(conn: psycopg.Connection[Any], db: str) -> None:
    """Drop what a crash or a replaced copy left: trash, half-built copies, a half-made pristine copy, and pool
    databases that are not marked clones of the current copy. Only the holder of REFILL may call this."""
    for name in _derelicts(conn, db):
        _drop_leftover(conn, name)
    ready = set(_ready_clones(conn, db))
    for name in _pool_databases(conn, db):
        # A private slot's copy a reset is making (it holds TAKE, not REFILL) is left to it: its slot is locked.
        if name not in ready and _try_lock(conn, db, SLOT + _slot_of(db, name)):
            try:
                _drop_leftover(conn, name)
            finally:
                _unlock(conn, db, SLOT + _slot_of(db, name))


def _drop_leftover(conn: psycopg.Connection[Any], name: str) -> bool:
    """Drop ``name``, a leftover; False, and one line on stderr, when a session this role may not end is on it:
    it stays for a later sweep, and what needs its name (a pool slot) takes another."""
    held = _drop_unless_held(conn, name)
    if held is not None:
        print(f"refresher: left for a later refill: {held}", file=sys.stderr, flush=True)
    return held is None


def _make_clones(conn: psycopg.Connection[Any], db: str, size: int) -> tuple[str, ...]:
    """Clone the pristine copy into the first ``size`` pool slots no database holds (after ``_drop_leftovers``:
    one a session this role may not end is on), under REFILL exclusive."""
    taken = set(_pool_databases(conn, db))
    free = _free_slots(db, size + len(taken), held=(), taken=taken)
    return tuple(_make_clone(conn, db, n) for n in free[:size])


def _free_slots(db: str, span: int, *, held: Collection[int], taken: Collection[str]) -> list[int]:
    """Pool slots 0..span-1 of ``db`` to make clones in: not ``held`` (a session this role may not end is on the
    slot's old database) and whose database is not one of ``taken``. The callers widen ``span`` by the slots
    they skip, so enough remain."""
    return [n for n in range(span) if n not in held and pool_name(db, n) not in taken]


def main(argv: list[str] | None = None) -> int:
    """``python -m refresher.pool refill --dsn DSN --database DB``: the detached pool refiller."""
    parser = argparse.ArgumentParser(prog="python -m refresher.pool")
    sub = parser.add_subparsers(dest="command", required=True)
    refill = sub.add_parser("refill", help="create the missing pool clones of a database")
    refill.add_argument(
        "--dsn", required=True, help="the maintenance database's DSN (password via PGPASSWORD)"
    )
    refill.add_argument("--database", required=True)
    refill.add_argument(
        "--background", action="store_true", help="lower the priority of the server process that copies"
    )
    refill.add_argument("--analyze", help="a database just handed out from a pristine copy not analyzed yet")
    refill.add_argument(
        "--also", default="", help="its tables to analyze whatever its catalog says (a,b,...)"
    )
    refill.add_argument("--no-fill", action="store_true", help="only analyze --analyze")
    refill.add_argument("--bodies", type=Path, help="then make the COPY bodies this list names (body_keys)")
    refill.add_argument("--store", type=Path, help="the store of --bodies")
    args = parser.parse_args(argv)
    with _STOPS.installed():
        try:
            return _refill_main(args)
        except _Stopped as exc:  # what it was at is recorded (``_refill_main``); its log says it too
            print(f"refill {args.database}: {exc}", flush=True)
            return 1 if exc.reason else 128 + exc.signum


def _refill_main(args: argparse.Namespace) -> int:
    """``main``'s work, ``args`` parsed. Stopped (``_Stops``): the clones' step records ``stopped by <signal>``
    as its outcome (status says so; the clone being copied is cancelled or dropped), the bodies' step, or a
    stop before it, records its line (the list stays for the next refill), and ``_Stopped`` is raised again.
    Each record goes to the path learned as it started (``_running``) without asking the server again: a stop
    while the server does not answer is recorded at once; none is when the server never answered (no path)."""
    os.nice(10)  # this process mostly waits on the server; it need not compete with what the caller runs next
    started = time.perf_counter()
    # Its sessions' name: the next refill ends them if this one dies (``_end_dead``), the watch finds them.
    session = f"refresher refill {os.getpid()} {secrets.token_hex(4)}"
    dsn, db = _dead_peer_bounded(conninfo.make_conninfo(args.dsn, application_name=session)), args.database
    handed = None
    if args.analyze:
        handed = HandedOut(args.analyze, tuple(name for name in args.also.split(",") if name))
    failed: Exception | None = None
    bodies = (args.bodies, args.store) if args.bodies is not None and args.store is not None else None

    said = False  # the bodies' step recorded its line: a stop after that keeps it

    ended = False  # the clones' step, its outcome to record
    with _running(dsn, db, session) as (at, stopped):

        def record_bodies(not_made: int, first: str) -> None:
            nonlocal said
            said = True  # a stop as it connects (raised at once) leaves no line, as for the outcome's
            _record_bodies(dsn, db, time.time_ns(), not_made, first, at=at)

        try:
            if stopped is not None:  # while its note was written
                raise stopped
            dead = [note.session for note in _refill_notes(at) if note.gone and note.session] if at else []
            created: int | None = None
            try:
                with (
                    _STOPS.watched(),
                    _refill_watch.watching(dsn, session, local=args.background, silenced=_STOPS.give_up),
                ):
                    created = _refill(
                        dsn,
                        db,
                        background=args.background,
                        size=None,
                        concurrency=None,
                        handed=handed,
                        fill=not args.no_fill,
                        dead=dead,
                    )
            except _Stopped as exc:
                if created is None or exc.reason is None:
                    raise
                _STOPS.withdraw()  # the watch gave up as the clones' step returned: it did its work
            except Exception as exc:
                ended, failed = True, exc
                # Recorded for `refresher status`, then the traceback as before (to its log, if any).
                _record_outcome(dsn, db, time.time_ns(), _failure_line(exc), at=at)
            if not ended:
                ended = True  # a stop while its outcome is written is raised once it is (``_Stops.held``)
                if not args.no_fill:  # an analysis alone fills no pool: it clears no failure of a refill
                    _record_outcome(dsn, db, time.time_ns(), None, at=at)
            # After the clones, whether or not they were made: the bodies need the store, not the server.
            if bodies is not None:
                _make_bodies(*bodies, record_bodies)
        except _Stopped as exc:
            if at is None:  # the server never answered: it is not asked where to record while it is stopping
                raise
            if not ended and not args.no_fill:
                line = f"{exc} before it filled the pool; the next refresh or reset fills it"
                _record_outcome(dsn, db, time.time_ns(), line, at=at)
            # Not once the step recorded its own line: the list it leaves then names the segments it could not
            # make (``_make_bodies``), and "stopped" would replace why (a stored file gone or damaged).
            listed = body_keys.read(bodies[0])[0] if bodies is not None and not said else []
            if bodies is not None and listed:
                line = f"{exc} before it made them all (listed still: the next refill makes them)"
                record_bodies(_not_made(bodies[1], listed), line)
            raise
    if failed is not None:
        raise failed
    print(f"refill {db}: {created} clone(s) in {time.perf_counter() - started:.2f}s", flush=True)
    return 0


def _dead_peer_bounded(dsn: str) -> str:
    """``dsn`` with the TCP keepalives and user timeout the refill's connections use (``KEEPALIVES_IDLE``...) where
    it sets none of its own: every connection of the refill is made from it (its databases' too,
    ``make_conninfo(dsn, dbname=)``), the cancels of their queries with them."""
    bounds = {
        "keepalives": 1,
        "keepalives_idle": KEEPALIVES_IDLE,
        "keepalives_interval": KEEPALIVES_INTERVAL,
        "keepalives_count": KEEPALIVES_COUNT,
        "tcp_user_timeout": TCP_USER_TIMEOUT,
    }
    given = conninfo.conninfo_to_dict(dsn)
    return conninfo.make_conninfo(dsn, **{key: value for key, value in bounds.items() if key not in given})


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "DEFAULT_POOL_SIZE",
    "HandedOut",
    "PoolSizing",
    "PoolStatus",
    "analyze_handed_out",
    "checkout_clone",
    "clone_notes",
    "default_pool_size",
    "disk_cut",
    "disk_reserve",
    "drop_clone",
    "forget_noted",
    "forget_outcome",
    "note_server",
    "pool_name",
    "pool_reason",
    "pool_size_for_disk",
    "pool_status",
    "recorded_pool",
    "refill_concurrency",
    "refill_pool",
    "resize_pool",
    "server_reflinks",
    "size_pool",
    "spawn_refill",
    "unfinished_analyses",
    "wait_for_pool",
]
