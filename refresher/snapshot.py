"""Pristine copies of a loaded database, for instant resets: save, check, restore, drop.

Pure SQL over a ``ServerInfo``, so every engine shares it. For a database ``<db>``:

* ``<db>__pristine`` is a template copy taken after a refresh (``datistemplate``, connections disallowed). Its
  comment says what it holds: ``ledger=`` its own ``ledger_version`` (read from the copy, not the original, so
  it cannot lie) and ``generation=`` a random id of this copy;
* ``<db>__pool_<n>`` are ready clones of it (``refresher.pool``: the warm pool, its refill and its locks);
* a reset renames ``<db>`` to ``<db>__trash_<hex>`` and a clone into its place in one transaction (catalog
  updates: milliseconds whatever the size); a detached process then drops the trash and refills the pool.

Replacing the snapshot never leaves a moment without a complete one: the new copy is built as
``<db>__building_<hex>``, marked, then swapped in by two renames in ONE transaction (ALTER DATABASE RENAME is
transactional; CREATE/DROP DATABASE are not). Whatever a kill -9 leaves behind (a connectable half-copy, an
unmarked clone, trash) is recognised by its name or missing mark and dropped by the next save or refill.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import psycopg
from psycopg import conninfo, sql

from refresher._planner_stats import analyze_stale, stale_names
from refresher._snapshot_sql import (
    _COMMENT,
    BUILDING_INFIX,
    EVICT_TRIES,
    MAINTENANCE_DB,
    REFILL,
    SWEEP,
    TAKE,
    TRASH_INFIX,
    PoolSizing,
    _admin,
    _advisory,
    _close_door,
    _comment,
    _create_from,
    _derelicts,
    _drop_database,
    _ending,
    _evicting,
    _lock,
    _Mark,
    _mark_of,
    _open_door,
    _pool_databases,
    _pristine_mark,
    _publish,
    _ready_clones,
    _reopen_abandoned,
    _require_pristine,
    _terminate_others,
    _unlock,
    _wait_gone,
    _wait_started,
    pristine_name,
    unreachable,
)
from refresher.diskfull import COPY_SLACK, has_room, require_room
from refresher.dsn import libpq_params
from refresher.engines.base import ServerInfo
from refresher.errors import DiskFull, RefresherError, SnapshotError
from refresher.ledger_counter import LEDGER_TRIGGER, LEDGER_WRITES
from refresher.login import refused_by_door
from refresher.pool import HandedOut, _copy_in, _drop_leftovers, _make_clones, _take, size_pool, spawn_refill
from refresher.settings import DEFAULT_POOL_SIZE, PoolSize

_T = TypeVar("_T")

# The ledger tables and the columns that say what a database holds, in a stable order.
_LEDGERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("refresher_segments", ("symbol", "timeframe", "month", "content_hash", "rows")),
    ("refresher_features", ("feature", "symbol", "input_hash", "rows")),
)


@dataclass(frozen=True)
class SnapshotInfo:
    """What ``save_pristine`` made."""

    database: str
    pristine: str
    pool: tuple[str, ...]
    seconds: float
    ledger: str = ""
    # The pool the new copy's mark records.
    sizing: PoolSizing = field(default_factory=lambda: PoolSizing(DEFAULT_POOL_SIZE))

    def to_json(self) -> dict[str, Any]:
        return {
            "database": self.database,
            "pristine": self.pristine,
            "pool": list(self.pool),
            "seconds": round(self.seconds, 6),
            "ledger": self.ledger,
            "pool_size": self.sizing.size,
        }


@dataclass(frozen=True)
class RestoreReport:
    """How a reset went: ``pool`` (renamed a warm clone) or ``template`` (cloned the pristine copy)."""

    seconds: float
    method: Literal["pool", "template"]

    def to_json(self) -> dict[str, Any]:
        return {"seconds": round(self.seconds, 6), "method": self.method}


def ledger_digest(conn: psycopg.Connection[Any]) -> str | None:
    """The digest of the ledger tables of ``conn``'s database; None when it has no ``refresher_segments``.

    A missing ``refresher_features`` counts as empty (a profile without features never creates it).
    """
    tables = _present_ledgers(conn)
    if tables is None:
        return None
    digest = hashlib.sha256()
    for table, columns in tables:
        cols = sql.SQL(", ").join(sql.Identifier(c) for c in columns)
        key = sql.SQL(", ").join(sql.Identifier(c) for c in columns[:-2])
        row = conn.execute(
            sql.SQL(
                "SELECT md5(coalesce(string_agg(concat_ws('|', {}), E'\\n' ORDER BY {}), '')) FROM {}"
            ).format(cols, key, sql.Identifier(table))
        ).fetchone()
        digest.update(f"{table}={row[0] if row else ''};".encode())
    return digest.hexdigest()


# One query for ``ledger_version``: each ledger table's oid (a table dropped and made again gets another), the
# write counter's value, and whether the counter is armed on every ledger table there is.
_VERSION_QUERY = sql.SQL(
    "SELECT s::oid, f::oid, pg_sequence_last_value(q), q IS NOT NULL AND (SELECT count(*) FROM pg_trigger t "
    "WHERE t.tgname = {trigger} AND t.tgenabled = 'A' AND t.tgrelid IN (s, f)) = 1 + (f IS NOT NULL)::int "
    "FROM (SELECT to_regclass({segments}) AS s, to_regclass({features}) AS f, to_regclass({writes}) AS q) l"
).format(
    trigger=sql.Literal(LEDGER_TRIGGER),
    segments=sql.Literal(_LEDGERS[0][0]),
    features=sql.Literal(_LEDGERS[1][0]),
    writes=sql.Literal(LEDGER_WRITES),
)


def ledger_version(conn: psycopg.Connection[Any]) -> str | None:
    """What says the ledger of ``conn``'s database changed, in O(1); None when it has no ``refresher_segments``.

    The ledger tables' oids and the write counter every statement writing them bumps
    (``refresher.ledger_counter``): two equal versions mean no ledger write between them, a
    write that rolled back may change it (a snapshot taken for nothing, never one missed). A database whose
    counter is not armed on every ledger table (made by an older version, a trigger dropped or disabled by
    hand) gets the content digest instead, ``ledger_digest``: it differs from any counter version, so
    arming the counter later counts as a change. 1 ms against ``ledger_digest``'s second at 60,000 segments.
    """
    row = conn.execute(_VERSION_QUERY).fetchone()
    if row is None or row[0] is None:
        return None
    segments, features, writes, armed = row
    if not armed:
        return ledger_digest(conn)
    return counter_version(segments, features, writes)


def counter_version(segments: int, features: int | None, writes: int | None) -> str:
    """``ledger_version`` of an armed counter, from what ``_VERSION_QUERY`` reads: the ledger tables' oids and
    the write counter's last value."""
    return hashlib.sha256(f"counter:{segments}:{features}:{writes}".encode()).hexdigest()


def _present_ledgers(conn: psycopg.Connection[Any]) -> list[tuple[str, tuple[str, ...]]] | None:
    """The ledger tables that exist in ``conn``'s database; None without ``refresher_segments``."""
    names = [table for table, _ in _LEDGERS]
    row = conn.execute(
        "SELECT array_agg(to_regclass(t) IS NOT NULL ORDER BY n) FROM unnest(%s::text[]) WITH ORDINALITY AS u(t, n)",
        (names,),
    ).fetchone()
    present = row[0] if row else []
    if not present or not present[0]:
        return None
    return [ledger for ledger, exists in zip(_LEDGERS, present, strict=True) if exists]


def ledger_stamp(
    conn: psycopg.Connection[Any], tables: list[tuple[str, tuple[str, ...]]] | None = None
) -> str | None:
    """A cheap fingerprint of the ledger: each table's row count and latest ``loaded_at``; None when there is no
    ledger or it is empty. ``tables``: what ``_present_ledgers`` said, when the caller asked it already. Every
    query is sent before an answer is read: one round trip in a pipeline.

    What a reset compares, in place of the full digest (300 ms at 120,000 segments against a 10 ms reset):
    every load stamps ``loaded_at = now()`` and every prune removes a row, so any refresh that stopped before
    its snapshot changes it.
    """
    if tables is None:
        tables = _present_ledgers(conn)
    if tables is None:
        return None
    counts = [
        conn.execute(
            sql.SQL("SELECT count(*), extract(epoch FROM max(loaded_at))::text FROM {}").format(
                sql.Identifier(table)
            )
        )
        for table, _ in tables
    ]
    parts = []
    for (table, _), cursor in zip(tables, counts, strict=True):
        row = cursor.fetchone()
        if row is None or (table == _LEDGERS[0][0] and row[0] == 0):
            return None
        parts.append(f"{table}={row[0]}@{row[1]}")
    return hashlib.sha256(";".join(parts).encode()).hexdigest()[:16]


def save_pristine(
    server: ServerInfo, *, pool_size: PoolSize | None = None, fill_pool: bool = True
) -> SnapshotInfo:
    """Snapshot ``server.dbname`` as its pristine template and fill the clone pool (replacing older ones).

    The new copy records ``pool_size`` as the user's choice (None: the size the old one recorded when the user
    chose it, which sticks whoever saves next; else, or with ``auto``, the default for this server,
    ``pool.default_pool_size``, from how long this copy took).

    Other sessions on the database are terminated: a template copy needs it idle. ``fill_pool=False`` only
    records the pool size; the caller then fills it in the background (``spawn_refill``): each clone of a
    1 GB database costs about 2 s that a refresh need not wait for. The replaced copy and its clones are then
    left to that refill too (its sweep drops trash and clones of another generation, which no checkout hands
    out): dropping three 1 GB databases took 1.4 to 2.8 s of a backtesting daily refresh's 7 s.
    """
    db, started = server.dbname, time.perf_counter()
    building = f"{db}{BUILDING_INFIX}{secrets.token_hex(4)}"
    with _admin(server.dsn(MAINTENANCE_DB)) as conn, _advisory(conn, db, REFILL):
        _drop_leftovers(conn, db)
        pending, reader = _live_with_pid(server, stale_names)
        _wait_gone(conn, reader)
        row = conn.execute("SELECT pg_database_size(%s)", (db,)).fetchone()
        size = int(row[0]) if row else 0
        require_room(conn, needed=size + COPY_SLACK, what=f"copying {db} for the snapshot")
        # Its sessions end first, and are waited for here, and the load's writes are flushed (the copy's own
        # checkpoint would do it), not inside the timed copy: a copy waits 100 ms at a time for the sessions on
        # its template to exit, which a reset's copy of the pristine one never does, nor flushes a load.
        _wait_gone(conn, *_ending(conn, [db]))
        with contextlib.suppress(psycopg.errors.InsufficientPrivilege):  # a role without pg_checkpoint
            conn.execute("CHECKPOINT")
        copying = time.perf_counter()
        _create_from(conn, db, building, terminate=True)
        # What a reset without a warm clone will pay, measured on this server now (the default pool's size).
        copy_bps = int(size / max(time.perf_counter() - copying, 1e-6))
        # The mark is computed from the copy itself: it says what the copy holds, whatever happened to <db>.
        # With ``fill_pool`` the clones are made here, now: the copy is analyzed before it becomes the template
        # (``refresher._planner_stats``), rather than copied once more to be analyzed after (the refill's way,
        # which cannot connect to a template). Best effort, as there: a failed analysis leaves it unmarked.
        # ``pending``, the working database's counters read just before the copy (the copy's own start at zero),
        # goes into the mark of a copy not analyzed: no kill of the refill can lose it.
        analyzed = False
        with psycopg.connect(server.dsn(building), autocommit=True, connect_timeout=10) as copy:
            ledger = ledger_version(copy) or hashlib.sha256(b"no ledger").hexdigest()
            stamp = ledger_stamp(copy) or "none"
            if fill_pool:
                with contextlib.suppress(psycopg.Error):
                    analyze_stale(copy, also=pending or ())
                    analyzed = True
            session = copy.info.backend_pid
        _wait_gone(conn, session)
        old = _pristine_mark(conn, db)
        sizing = size_pool(
            conn, db, pool_size, old.pool if old else None, copy_of=building, copy_bps=copy_bps
        )
        mark = _Mark(sizing, ledger, stamp, secrets.token_hex(8), analyzed, () if analyzed else pending or ())
        _publish(conn, db, building, mark)
        pool: tuple[str, ...] = ()
        if fill_pool:
            _drop_leftovers(conn, db)  # the old copy (now trash) and its clones
            pool = _make_clones(conn, db, sizing.size)
    return SnapshotInfo(db, pristine_name(db), pool, time.perf_counter() - started, ledger, sizing)


def advance_pristine(
    server: ServerInfo,
    base: str,
    apply: Callable[[psycopg.Connection[Any]], None],
    *,
    pool_size: PoolSize | None = None,
) -> SnapshotInfo | None:
    """Bring the pristine copy up to what ``server.dbname`` holds without copying it: run ``apply`` (the writes
    of the refresh that just ran, see ``refresher.replay``) in a ready clone of the copy, then swap that clone
    in as the new copy. Its old clones are left to the refill, as ``save_pristine(fill_pool=False)`` leaves them.
    The new copy records ``pool_size`` (None: as ``save_pristine``'s, with the copy rate the old one recorded).

    ``base``: the working database's ``ledger_version`` before those writes, which the copy must still hold. None,
    leaving the copy as it was, when this cannot be done (no ready clone, the copy moved on, ``apply`` failed,
    or the clone's ledger then differs from the working database's): the caller then copies.
    """
    db, started = server.dbname, time.perf_counter()
    building = f"{db}{BUILDING_INFIX}{secrets.token_hex(4)}"
    with _admin(server.dsn(MAINTENANCE_DB)) as conn, _advisory(conn, db, REFILL):
        mark = _pristine_mark(conn, db)
        if mark is None or mark.ledger != base:
            return None
        with _advisory(conn, db, TAKE):
            ready = _ready_clones(conn, db)
            if not ready:
                return None
            # Named as a half-built copy from here on: if we die, the next save or refill drops it. A session left
            # on the clone (a database browser connects to every database) made the rename wait 5 s and fail the
            # refresh after its loads: it ends, as a checkout ends it (``pool._take``); one this role may not end
            # leaves the clone where it is, and the snapshot is a copy.
            try:
                _take(conn, ready[0], building, None)
            except SnapshotError:
                return None
        try:
            with (
                psycopg.connect(server.dsn(building), autocommit=True, connect_timeout=10) as copy,
                psycopg.connect(server.dsn(), autocommit=True, connect_timeout=10) as live,
            ):
                # Nothing may commit to the database between what is compared below and the version recorded:
                # its other sessions end, as they do for the copy this replaces.
                _terminate_others(live, None)
                apply(copy)
                written = _written_tables(copy)
                # A reset compares the live ledger's stamp (its latest load time) with the copy's mark, and a
                # reset database's stamp with the copy's own: the replayed loads take the live load times.
                _match_load_times(copy, live)
                version = ledger_version(live)
                stamp = ledger_stamp(copy)
                same = (ledger_digest(copy), stamp) == (ledger_digest(live), ledger_stamp(live))
                if same and ledger_version(live) == version:
                    # Same content: the copy takes the database's write count, so ``is_current`` says so.
                    _match_write_counter(copy, live)
                    same = ledger_version(copy) == version
                copier = copy.info.backend_pid
        except (psycopg.Error, RefresherError):
            same = False
        if not same or version is None:
            _drop_database(conn, building)
            return None
        _wait_gone(conn, copier)
        sizing = size_pool(conn, db, pool_size, mark.pool, copy_of=building)
        # The clone had the old copy's statistics: what the replay wrote, and what the old copy still had to
        # analyze, are the new one's to analyze.
        pending = (*written, *mark.pending)
        _publish(
            conn, db, building, _Mark(sizing, version, stamp or "none", secrets.token_hex(8), pending=pending)
        )
    return SnapshotInfo(db, pristine_name(db), (), time.perf_counter() - started, version, sizing)


def _written_tables(copy: psycopg.Connection[Any]) -> tuple[str, ...]:
    """The tables of ``copy``'s database out of date after the replay: its counters say what the replay wrote
    (flushed first: a session reports them when idle, at most once a second otherwise)."""
    if copy.info.server_version >= 150000:
        copy.execute("SELECT pg_stat_force_next_flush()")
    return stale_names(copy)


def _match_write_counter(copy: psycopg.Connection[Any], live: psycopg.Connection[Any]) -> None:
    row = live.execute("SELECT pg_sequence_last_value(to_regclass(%s))", (LEDGER_WRITES,)).fetchone()
    if row is not None and row[0] is not None:
        copy.execute("SELECT setval(%s::regclass, %s)", (LEDGER_WRITES, row[0]))


def _match_load_times(copy: psycopg.Connection[Any], live: psycopg.Connection[Any]) -> None:
    """Set every ledger row's ``loaded_at`` in ``copy`` to the live database's (one transaction)."""
    with copy.transaction():
        for table, columns in _present_ledgers(copy) or []:
            key = columns[:-2]
            names = sql.SQL(", ").join(sql.Identifier(c) for c in (*key, "loaded_at"))
            rows = live.execute(sql.SQL("SELECT {} FROM {}").format(names, sql.Identifier(table))).fetchall()
            copy.execute(
                sql.SQL("CREATE TEMP TABLE load_times AS SELECT {} FROM {} LIMIT 0").format(
                    names, sql.Identifier(table)
                )
            )
            with copy.cursor().copy(sql.SQL("COPY load_times ({}) FROM STDIN").format(names)) as out:
                for row in rows:
                    out.write_row(row)
            matched = sql.SQL(" AND ").join(sql.SQL("t.{c} = s.{c}").format(c=sql.Identifier(c)) for c in key)
            copy.execute(
                sql.SQL(
                    "UPDATE {} AS t SET loaded_at = s.loaded_at FROM load_times AS s "
                    "WHERE {} AND t.loaded_at IS DISTINCT FROM s.loaded_at"
                ).format(sql.Identifier(table), matched)
            )
            copy.execute("DROP TABLE load_times")


def is_current(server: ServerInfo) -> bool:
    """Whether a complete pristine copy exists and holds what ``server.dbname``'s ledger says: the copy's
    ``ledger_version`` is the database's (no ledger write since the copy was taken)."""
    pristine = pristine_ledger(server)
    return pristine is not None and pristine == _live(server, ledger_version)


def pristine_ledger(server: ServerInfo, conn: psycopg.Connection[Any] | None = None) -> str | None:
    """The ``ledger_version`` the complete pristine copy of ``server.dbname`` records; None when there is none.

    ``conn``, open on any database of the server, is asked instead of a new connection: the mark is a comment
    in the shared catalog, and a connection costs 10-30 ms on a busy machine (most of a stamped no-op's work).
    """
    if conn is not None:
        mark = _pristine_mark(conn, server.dbname)
    else:
        with _admin(server.dsn(MAINTENANCE_DB)) as admin:
            mark = _pristine_mark(admin, server.dbname)
    return mark.ledger if mark else None


def restore_pristine(
    server: ServerInfo, *, refill: bool = True, refill_log: Path | None = None
) -> RestoreReport:
    """Put the pristine copy back as ``server.dbname``; its open connections are terminated.

    Refuses when the database's ledger names other data than the copy holds (a refresh was interrupted before
    its snapshot): restoring would silently bring back older data. It compares ``ledger_stamp`` (cheap), not
    the full digest. A database whose ledger is gone or empty (the user dropped or truncated it) is restored:
    only the copy can tell what it held. Returns as soon as the database is back; the pool is refilled by a
    detached process (``refill=False`` to skip).

    From the last read of the ledger to the swap the database refuses new sessions (``_Door``): one connecting
    between them committed a segment the swap threw away. A database a killed reset left so is opened by the
    next reset, refresh or status (``_reopen_abandoned``).
    """
    db, started = server.dbname, time.perf_counter()
    door = _Door(db)

    def measure(conn: psycopg.Connection[Any]) -> str | None:
        try:
            return _stamp_ending_lockers(conn, door.shut)
        except psycopg.OperationalError as exc:
            if _session_ended(exc):  # by another reset's swap (it ends every session): read the new database
                conn.close()
                raise _Moved(db) from exc
            raise

    def check() -> tuple[str | None, int | None]:
        return _live_with_pid(server, measure, _LEDGER_LOCK_WAIT)

    # The two connections are made at once: each costs 10-30 ms on a busy machine, most of a reset.
    with ThreadPoolExecutor(1) as pool:
        checking = pool.submit(check)
        try:
            with _admin(server.dsn(MAINTENANCE_DB)) as conn:
                door.admin.set_result(conn)
                try:
                    live, reader = _checked(conn, door, checking.result, check)

                    def unmoved() -> None:
                        """A copy (no ready clone) takes seconds, in which the database takes sessions (a writer
                        could commit after the check): the stamp is read again, as at first (the door shut
                        again), just before the swap, and before a full disk's reset drops the database for room
                        (``_copy_replacing``); refused when it moved. A database gone is this reset's drop only
                        when the door stayed shut since such a read: gone while open, a writer's commit was lost."""
                        again, pid = _checked(conn, door, check, check)
                        _wait_gone(conn, pid)
                        if pid is None and reader is not None and not door.held:
                            raise _gone(db)
                        if again is not None and again != live:
                            raise _predates(db)

                    method, mark = _restore_checked(
                        conn,
                        db,
                        live,
                        reader,
                        unmoved=unmoved,
                        opened=door.open,
                    )
                    door.release()  # what the swap put in its place is a clone: it takes sessions
                finally:
                    door.open()  # a reset that did not swap leaves the database as it was
        finally:
            if not door.admin.done():  # the check's shut must not wait for a connection never made
                door.admin.set_exception(SnapshotError("cannot reach the server for snapshots"))
    seconds = time.perf_counter() - started
    # A copy of a pristine copy not analyzed yet (a reset in the seconds after a refresh) is analyzed after.
    handed = HandedOut.of(mark, db)
    if refill or handed is not None:
        spawn_refill(server, log=refill_log, analyze=handed, fill=refill)
    return RestoreReport(seconds, method)


def _session_ended(exc: psycopg.OperationalError) -> bool:
    """Whether ``exc`` says the session ended (terminated, or the connection lost: no SQLSTATE), not a statement of
    it failed (a lock wait, a deadlock: the server answered)."""
    if isinstance(exc, psycopg.errors.AdminShutdown):
        return True
    return exc.sqlstate is None and not isinstance(exc, psycopg.errors.PipelineAborted)


class _Moved(Exception):
    """The working database was swapped (by another reset) between a check's read and its shutting of the door, or
    during the read: that swap ended the check's session."""


class _Door:
    """One reset's hold on the working database's door (``_close_door``): shut by the last read of the ledger
    before the swap, under TAKE, on ``admin`` (the reset's maintenance connection, made beside the check)."""

    def __init__(self, db: str) -> None:
        self.db = db
        self.admin: Future[psycopg.Connection[Any]] = Future()
        self.held = 0  # the levels of TAKE ``shut`` took

    def shut(self, oid: int) -> bool:
        """Close the door of the database of ``oid``; False when ``db`` is another database now."""
        conn = self.admin.result()
        _lock(conn, self.db, TAKE)
        self.held += 1  # whatever fails from here lets it go (``open``)
        if _close_door(conn, self.db, oid):
            return True
        self.release()
        return False

    def open(self) -> None:
        """The database takes sessions again (a copy follows, or the reset stopped) and TAKE goes."""
        if self.held and not self.admin.result().closed:
            _open_door(self.admin.result(), self.db)
            self.release()

    def release(self) -> None:
        conn = self.admin.result()
        while self.held and not conn.closed:
            _unlock(conn, self.db, TAKE)
            self.held -= 1


def _checked(
    conn: psycopg.Connection[Any],
    door: _Door,
    first: Callable[[], tuple[str | None, int | None]],
    again: Callable[[], tuple[str | None, int | None]],
) -> tuple[str | None, int | None]:
    """The reset's check of the ledger, ``first`` and then ``again`` while the database was swapped under it by
    another reset (``_Moved``), or refused the session: another reset's door (waited for) or a killed one's
    (opened, ``_reopen_abandoned``)."""
    attempt = first
    for _ in range(EVICT_TRIES):
        try:
            return attempt()
        except _Moved:
            door.open()  # held only when this reset's own door shut before its session was ended
        except SnapshotError as exc:
            door.open()
            if not isinstance(exc.__cause__, psycopg.OperationalError) or not _past_door(
                conn, door.db, exc.__cause__
            ):
                raise
        attempt = again
    return attempt()


def _past_door(conn: psycopg.Connection[Any], db: str, refusal: psycopg.OperationalError) -> bool:
    """Whether a session to ``db`` that failed with ``refusal`` may connect again: a door a killed reset left shut
    is opened (``_reopen_abandoned``: a live reset's TAKE is waited for), and one found open was refused by a live
    reset that has swapped or opened since (two resets at once: the second's check was refused, then the first
    swapped before the look, and the reset failed with 'not currently accepting connections')."""
    return _reopen_abandoned(conn, db) or refused_by_door(refusal)


# How long the reset's read of the ledger waits for its lock before ending the holders (a connection option: no
# round trip of its own). ANALYZE (the refill's, autovacuum's) holds one that conflicts; an ended session exits in
# milliseconds. Named, so one reset's check never ends another's (two resets at once both restore).
_CHECKER = "refresher_reset_check"
_LEDGER_LOCK_WAIT = f"-c lock_timeout=100ms -c application_name={_CHECKER}"
_NOT_A_CHECK = f"a.application_name <> '{_CHECKER}'"  # the sessions a check ends (``_ending``)

# The oid of the session's database, which no rename can change while it is on it.
_HERE = "SELECT oid FROM pg_database WHERE datname = current_database()"


def _stamp_ending_lockers(
    conn: psycopg.Connection[Any], shut: Callable[[int], bool] | None = None
) -> str | None:
    """``ledger_stamp`` of ``conn``'s database for a reset, read under a SHARE lock of the ledger tables with the
    pristine copy's mark: a writer beside the reset (a jobs worker loads without the profile lock) that committed
    a segment between the read and the reset's swap lost it to the older copy. When the stamp says the reset goes
    on (it matches the mark), ``shut`` closes the database to new sessions (given its oid; False raises
    ``_Moved``), the sessions starting meanwhile are waited for, and every other session on the database (but
    another reset's check) ends before the lock is released, as the swap ends them anyway: a writer waiting for
    the lock or mid-transaction never commits, an idle one must connect again, a new one is refused until the
    swap. A reset that refuses ends nobody. One pipeline: the lock, the mark and the counts in one round trip.

    One whose open transaction holds a lock on a ledger table (it truncated or locked it and idles, or a writer is
    mid-transaction, or an ANALYZE) made the reset wait: after ``_LEDGER_LOCK_WAIT`` the other sessions on the
    database (but another reset's check: it used to end, failing that reset) end, unless the stamp read without the lock already refuses, and the lock is asked again. A holder
    this role may not end (autovacuum's VACUUM, another role's session), or a role that may not take the lock:
    the stamp is read without it, the door shut, the other sessions (but another reset's check) ended and the stamp
    read again; SnapshotError, one line, when even that waits for such a session.
    """
    db = conn.info.dbname
    tables = _present_ledgers(conn)
    if tables is None:
        return None
    names = sql.SQL(", ").join(sql.Identifier(table) for table, _ in tables)
    lock = sql.SQL("LOCK TABLE {} IN SHARE MODE").format(names)
    # A deadlock: a writer holding refresher_features and waiting for refresher_segments beside our lock of both.
    busy = (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected)

    def read(locking: bool, last: bool) -> tuple[str | None, bool]:
        """The stamp, and whether the reset goes on with it; ``last``: the door shuts if it does.

        The transaction is begun in the pipeline, not by ``conn.transaction()``, and the pipeline ends before
        ``shut``: that waits for TAKE while another reset swaps, whose swap ends this session, and raising
        ``_Moved`` through psycopg's pipeline and transaction blocks on it logged six 'error ignored' lines
        (on a CLI's stderr). Such a session is closed here instead, with nothing to roll back. A session that swap
        ended in the pipeline (its round trip under way) is raised past the pipeline, for the same reason."""
        ended: psycopg.OperationalError | None = None
        try:
            try:
                with conn.pipeline():
                    try:
                        conn.execute("BEGIN")
                        if locking:
                            conn.execute(lock)
                        marked = conn.execute(_COMMENT, (pristine_name(db),))
                        # Asked, in the same round trip, only of the read that may shut the door.
                        here = conn.execute(_HERE) if last and shut is not None else None
                        stamp = ledger_stamp(conn, tables)
                        mark = _mark_of(marked.fetchone())
                        row = here.fetchone() if here is not None else None
                    except psycopg.OperationalError as exc:
                        if not _session_ended(exc):
                            raise
                        # Closed and raised past the pipeline: through it, and the connection's block, psycopg
                        # logs its failing end and rollback.
                        ended = exc
                        conn.close()
            except psycopg.OperationalError:
                if ended is None:
                    raise
            if ended is not None:
                raise _Moved(db) from ended
            goes_on = mark is not None and stamp in (None, mark.stamp)
            if here is not None and goes_on and shut is not None:
                oid = int(row[0]) if row else 0
                if not shut(oid):
                    conn.close()
                    raise _Moved(db)
                _wait_started(conn, oid)
            if locking and goes_on:
                _wait_gone(conn, *_ending(conn, None, _NOT_A_CHECK))
            conn.execute("COMMIT")
        except BaseException:
            if not conn.closed and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                with contextlib.suppress(psycopg.Error):  # a session gone: closed by psycopg, quietly
                    conn.execute("ROLLBACK")
            raise
        return stamp, goes_on

    def locked() -> str | None:
        try:
            return read(True, True)[0]
        except busy:
            # An exclusive lock's holder (TRUNCATE, LOCK TABLE) makes this wait too: it ends then (``_evicting``).
            stamp, goes_on = read(False, False)
            if not goes_on:
                return stamp  # refused anyway: nobody is ended for it
            raise

    try:
        return _evicting(conn, (db,), locked, busy=busy, where=_NOT_A_CHECK)
    except (*busy, psycopg.errors.InsufficientPrivilege):
        pass
    try:
        stamp, goes_on = read(False, True)
        if goes_on:
            # No lock kept a writer out: the sessions connected before the door shut end (one this role may not end
            # fails the rename, ``_in_use``), then the stamp is read again: one that moved refuses (``_predates``).
            _wait_gone(conn, *_ending(conn, None, _NOT_A_CHECK))
            stamp = read(False, False)[0]
        return stamp
    except busy as exc:
        raise SnapshotError(
            f"{db}: cannot read its ledger to reset it: a session's open transaction holds a lock on it, which "
            f"role {conn.info.user!r} may not end (it needs to be a member of pg_signal_backend, or a superuser); "
            "close that session and run again",
            database=db,
        ) from exc


def _predates(db: str) -> SnapshotError:
    return SnapshotError(
        f"{db}: the pristine snapshot predates the database's ledger (a refresh stopped before its "
        "snapshot); run `refresher refresh` to rebuild it",
        database=db,
    )


def _gone(db: str) -> SnapshotError:
    return SnapshotError(
        f"{db}: the database was dropped by another session while the reset copied its snapshot; run again",
        database=db,
    )


def _restore_checked(
    conn: psycopg.Connection[Any],
    db: str,
    live: str | None,
    reader: int | None,
    *,
    unmoved: Callable[[], None] | None = None,
    opened: Callable[[], None] | None = None,
) -> tuple[Literal["pool", "template"], _Mark]:
    """The body of ``restore_pristine`` once the live ledger stamp is known; returns the mark of the copy it
    restored from. ``unmoved``: called on a copy made before its swap, raises when the ledger moved meanwhile;
    ``opened``: called before such a copy (the database takes sessions while it is made)."""
    method: Literal["pool", "template"]
    _wait_gone(conn, reader)
    mark = _require_pristine(conn, db)
    if live is not None and live != mark.stamp:
        raise _predates(db)
    with _advisory(conn, db, TAKE):
        mark = _require_pristine(conn, db)  # as of the copy or clone taken: a swap needs TAKE
        ready = _ready_clones(conn, db)
        # The old database goes to the trash in the transaction of the rename that puts the copy in its place,
        # and a copy of a copy not analyzed yet carries the record of its pending analysis (``HandedOut``) in
        # the same one: a new copy is made under a private slot's name first (CREATE DATABASE is no
        # transaction), so a kill anywhere leaves the old database, or the new one with its record.
        if ready:
            _take(conn, ready[0], db, None, mark, replacing=True)
            method = "pool"
        else:
            if opened is not None:
                opened()
            _copy_replacing(conn, db, mark, unmoved=unmoved)
            method = "template"
    return method, mark


def _copy_replacing(
    conn: psycopg.Connection[Any],
    db: str,
    mark: _Mark,
    *,
    unmoved: Callable[[], None] | None = None,
) -> None:
    """Copy the pristine copy into place as ``db``, its old database to the trash, under TAKE; ``unmoved``: as
    ``_restore_checked``'s.

    On a full disk the copy is tried once more after dropping ``db``'s trash, then after dropping the old
    database itself: they hold their disk until the refill drops them, so on a disk with room for one copy and
    not two, a reset failed every time. The reset discards the old database anyway, but only when its disk makes
    room for the copy (``_replaced``): dropping it for a copy that still did not fit left no database until the
    next reset or refresh. Else the old database stays as it was, and the error says so. Before it is dropped its
    ledger is read again and it is shut (``unmoved``): it took sessions during the failed copies, and a writer's
    segment committed then was dropped with it while the reset reported success.
    """
    what = f"resetting {db} (a copy of {pristine_name(db)})"
    error: DiskFull | None = None
    for making_room in (None, _trash, _replaced):
        if error is not None and making_room is not None:
            doomed = making_room(conn, db, error)
            if making_room is _replaced and doomed and unmoved is not None:
                unmoved()  # its ledger read again, the database shut from here: nothing commits and is dropped
            if not _drop_existing(conn, db, doomed):
                continue  # nothing dropped: the copy would fail again
        try:
            _copy_in(conn, db, db, None, mark, what=what, replacing=True, before_take=unmoved)
            return
        except DiskFull as full:
            if making_room is _replaced:  # the estimate was short: what the message must not hide
                note = f" ({db} was dropped to make room: the next reset makes it)"
                raise DiskFull(f"{full}{note}", **full.fields) from full
            error = full
    assert error is not None  # only a failed copy leaves the loop without returning
    raise error


def _trash(conn: psycopg.Connection[Any], db: str, _full: DiskFull) -> list[str]:
    """``db``'s trash: what an earlier reset or swap renamed away and the refill has not dropped yet."""
    return [name for name in _derelicts(conn, db) if TRASH_INFIX in name]


def _drop_existing(conn: psycopg.Connection[Any], db: str, names: list[str]) -> bool:
    """Drop those of ``names`` that exist, under SWEEP (a sweeper holds it while dropping trash, never TAKE
    meanwhile); whether there were any."""
    with _advisory(conn, db, SWEEP):
        names = [name for name in names if _comment(conn, name) is not None]
        for name in names:
            _drop_database(conn, name)
    return bool(names)


def _replaced(conn: psycopg.Connection[Any], db: str, full: DiskFull) -> list[str]:
    """``[db]`` when dropping it makes room for a copy of the pristine copy (its size: a FILE_COPY logs a record,
    not the files); else, or when nobody can tell, DiskFull ``full`` saying ``db`` stays as it was. A missing
    ``db``: nothing.

    The free space is the one ``full`` measured when the copy failed (the server had removed its partial copy);
    when this host could not see it (a container's disk: ``full`` carries none), the server is asked
    (``has_room``): a guess from here dropped a database for a copy that then did not fit either. ``full``
    carries a free space only when this host sees the server's own data directory (``diskfull.data_directory``):
    a host with a directory at a container's data directory's path (another server's) measured that one's."""
    free = full.fields.get("free")
    sizes = dict(
        conn.execute(
            "SELECT datname, pg_database_size(oid) FROM pg_database WHERE datname = ANY(%s)",
            ([db, pristine_name(db)],),
        ).fetchall()
    )
    if db not in sizes:
        return []
    needed = sizes.get(pristine_name(db), 0) - sizes[db]
    if (int(free) >= needed) if free is not None else has_room(conn, needed):
        return [db]
    raise DiskFull(f"{full} ({db} is left as it was, not reset)", **full.fields) from full


def drop_snapshot(server: ServerInfo) -> None:
    """Remove the pristine copy, the pool and any leftovers of ``server.dbname``."""
    db = server.dbname
    with _admin(server.dsn(MAINTENANCE_DB)) as conn, _advisory(conn, db, REFILL), _advisory(conn, db, TAKE):
        for name in [*_pool_databases(conn, db), pristine_name(db)]:
            _drop_database(conn, name)
        _drop_leftovers(conn, db)


def require_privileges(conn: psycopg.Connection[Any]) -> None:
    """Raise SnapshotError, before a refresh loads anything, when ``conn``'s role cannot snapshot its database:
    the pristine copy and the pool are databases it creates (``CREATEDB``), and a reset renames the database
    (its owner). A superuser can (known without a query: the server reports ``is_superuser``)."""
    if conn.info.parameter_status("is_superuser") == "on":
        return
    row = conn.execute(
        "SELECT r.rolcreatedb, pg_has_role(d.datdba, 'USAGE') FROM pg_roles r, pg_database d "
        "WHERE r.rolname = current_user AND d.datname = current_database()"
    ).fetchone()
    createdb, owner = row if row is not None else (False, False)
    missing = [
        *([] if createdb else ["CREATEDB"]),
        *([] if owner else [f"to own database {conn.info.dbname} (or be a member of its owner)"]),
    ]
    if missing:
        raise SnapshotError(
            f"role {conn.info.user!r} cannot snapshot {conn.info.dbname}: it needs {' and '.join(missing)} "
            "(the pristine copy and the pool are databases it creates, a reset renames the database; "
            "see docs/engines.md, 'A server someone else runs')",
            database=conn.info.dbname,
        )


def has_pristine(server: ServerInfo, *, connect_timeout: int = 10) -> bool:
    """Whether a complete pristine copy of ``server.dbname`` exists (a half-made one does not count)."""
    with _admin(server.dsn(MAINTENANCE_DB), connect_timeout=connect_timeout) as conn:
        return _pristine_mark(conn, server.dbname) is not None


# How long a connection waits for a live reset's door (its TAKE): a reset stopped there (SIGSTOP, Ctrl-Z, a
# suspended laptop) otherwise hung plan, jobs submit and a worker, which SIGTERM could not stop.
DOOR_WAIT_SECONDS = 30.0
# The wait goes in slices this long (the lock_timeout of each try for TAKE), its stop event looked at between two:
# a worker told to stop (SIGTERM) while it waited left only after the whole DOOR_WAIT_SECONDS.
DOOR_WAIT_SLICE = 0.5
# How long a shut door is waited for before the wait is told (``on_wait``): a live reset shuts it for a moment (its
# check to its swap), a stopped one for good; `plan` and `jobs submit` said nothing for DOOR_WAIT_SECONDS.
DOOR_SAY_AFTER_SECONDS = 1.0


def _door_waited(on_wait: Callable[[str], None] | None, db: str, holder: str) -> Callable[[], None]:
    """What a door's wait calls after each try: from ``DOOR_SAY_AFTER_SECONDS`` on, its first call tells
    ``on_wait`` that ``db``'s door is held shut by ``holder`` (a reset)."""
    say_at = time.monotonic() + DOOR_SAY_AFTER_SECONDS
    line = (
        f"database {db} refuses sessions: {holder} holds its door shut (perhaps stopped: Ctrl-Z); "
        f"waiting for it, {DOOR_WAIT_SECONDS:g} s at most"
    )
    told = False

    def waited() -> None:
        nonlocal told
        if on_wait is not None and not told and time.monotonic() >= say_at:
            told = True
            on_wait(line)

    return waited


class StoppedWaiting(Exception):
    """The wait for a reset's door ended early: the caller's stop event was set (a worker's SIGTERM)."""


def connect_working(
    server: ServerInfo,
    dsn: str | None = None,
    *,
    stop: threading.Event | None = None,
    on_wait: Callable[[str], None] | None = None,
    **kwargs: Any,
) -> psycopg.Connection[Any]:
    """``psycopg.connect`` to ``server.dbname``, as ``dsn`` when given (another role on it, or ``server.dsn()`` with
    other options: ``connect_target``), else as ``server.dsn()`` (``kwargs``: its options). A database a reset
    killed between its last read of the ledger and its swap refuses sessions (``_close_door``): it is opened, and
    connected again; so is one refused by a live reset's door that opened before the look (``_past_door``).
    A live reset's door is waited for ``DOOR_WAIT_SECONDS`` at most, then one line says a reset holds it; ``stop``
    set meanwhile ends the wait within ``DOOR_WAIT_SLICE`` with ``StoppedWaiting``. ``on_wait`` is told in one
    line once the door has been waited for ``DOOR_SAY_AFTER_SECONDS``."""
    session = dsn or server.dsn()
    try:
        return psycopg.connect(session, **kwargs)
    except psycopg.OperationalError as refusal:
        try:
            with _admin(server.dsn(MAINTENANCE_DB)) as conn:
                reopened = _past_door_waiting(conn, server.dbname, refusal, stop, on_wait)
        except psycopg.errors.LockNotAvailable as exc:
            raise psycopg.OperationalError(
                f"database {server.dbname} refuses sessions: a reset of this profile holds it (waited "
                f"{DOOR_WAIT_SECONDS:g} s); run `refresher reset` again, or wait for it to finish"
            ) from exc
        except (psycopg.Error, SnapshotError):
            reopened = False
        if not reopened:
            raise
    return psycopg.connect(session, **kwargs)


def _past_door_waiting(
    conn: psycopg.Connection[Any],
    db: str,
    refusal: psycopg.OperationalError,
    stop: threading.Event | None,
    on_wait: Callable[[str], None] | None,
) -> bool:
    """``_past_door``, a live reset's TAKE waited for in slices (``DOOR_WAIT_SLICE``) up to ``DOOR_WAIT_SECONDS``
    (then ``LockNotAvailable``), ``stop`` looked at between two, ``on_wait`` told after ``DOOR_SAY_AFTER_SECONDS``."""
    conn.execute("SELECT set_config('lock_timeout', %s, false)", (f"{DOOR_WAIT_SLICE * 1000:.0f}ms",))
    deadline = time.monotonic() + DOOR_WAIT_SECONDS
    waited = _door_waited(on_wait, db, "a reset of this profile")
    while True:
        try:
            return _past_door(conn, db, refusal)
        except psycopg.errors.LockNotAvailable as exc:
            if stop is not None and stop.is_set():
                raise StoppedWaiting(
                    f"stopped while database {db} refused sessions (a reset holds it)"
                ) from exc
            if time.monotonic() >= deadline:
                raise
            waited()


# What ``connect_target`` takes from the server, not the target, when the target names the server's own role: where
# it is and how to log in there (a service or password file could name another host or another password).
_SERVERS_OWN = frozenset({"host", "hostaddr", "port", "dbname", "user", "password", "passfile", "service"})


def connect_target(
    server: ServerInfo | None,
    target: str,
    *,
    stop: threading.Event | None = None,
    foreign_wait: bool = True,
    on_wait: Callable[[str], None] | None = None,
    **kwargs: Any,
) -> psycopg.Connection[Any]:
    """``connect_working`` to ``server``, the profile's own that ``target`` names (a reset killed with its door
    shut is opened; the session as ``target``'s role, else the environment's (PGUSER, a service's), when that is
    another than the server's, its password then libpq's; else as the server's role, ``target``'s other options
    kept), else ``psycopg.connect`` to ``target`` as given (a server this machine does not serve: its door is not
    ours to open, ``_wait_foreign_door``).
    ``foreign_wait=False``: such a door shut fails at once (a jobs worker: its queue tries again after a backoff,
    where a wait held the worker ``DOOR_WAIT_SECONDS`` an attempt). ``on_wait`` is told of a door waited for, as
    ``connect_working`` tells it."""
    if server is not None:
        named: dict[str, Any] | None = None
        with contextlib.suppress(psycopg.ProgrammingError):  # no DSN: the server's own role
            named = conninfo.conninfo_to_dict(target)
        # The role somebody named, the target's else the environment's (PGUSER, a PGSERVICE file's): another than
        # the server's was left out when the target named none (the session the owner's, not the role asked for).
        # libpq's fall-back, the login name, names nobody: the server's own role and credentials then.
        role = libpq_params(named, login_name=False).get("user") if named is not None else None
        if role not in (None, server.user):
            return connect_working(server, target, stop=stop, on_wait=on_wait, **kwargs)
        # The target's other options (sslmode, options=-c ..., application_name, connect_timeout...) on the
        # server's own DSN: they were dropped, the session had none of them.
        options = {key: value for key, value in (named or {}).items() if key not in _SERVERS_OWN}
        dsn = conninfo.make_conninfo(server.dsn(), **options) if options else None
        return connect_working(server, dsn, stop=stop, on_wait=on_wait, **kwargs)
    try:
        return psycopg.connect(target, **kwargs)
    except psycopg.OperationalError as refusal:
        if not refused_by_door(refusal):
            raise
        if not foreign_wait:
            raise _foreign_door_shut(target, "its door is shut") from refusal
        return _wait_foreign_door(target, refusal, stop, on_wait, **kwargs)


def _wait_foreign_door(
    target: str,
    refusal: psycopg.OperationalError,
    stop: threading.Event | None,
    on_wait: Callable[[str], None] | None,
    **kwargs: Any,
) -> psycopg.Connection[Any]:
    """A session to ``target``, whose database refused one at its door (ALLOW_CONNECTIONS false) on a server this
    machine does not serve: a live reset there opens it in moments, a killed one never. Tried again every
    ``DOOR_WAIT_SLICE`` for ``DOOR_WAIT_SECONDS`` (``stop`` ends it: ``StoppedWaiting``; ``on_wait`` told after
    ``DOOR_SAY_AFTER_SECONDS``), then one line says what to do (``_foreign_door_shut``)."""
    db = conninfo.conninfo_to_dict(target).get("dbname") or "(the target's)"
    deadline = time.monotonic() + DOOR_WAIT_SECONDS
    waited = _door_waited(on_wait, str(db), "a reset on the machine that serves it")
    while True:
        if stop is not None and stop.wait(DOOR_WAIT_SLICE):
            raise StoppedWaiting(
                f"stopped while database {db} refused sessions (a reset holds it)"
            ) from refusal
        if stop is None:
            time.sleep(DOOR_WAIT_SLICE)
        try:
            return psycopg.connect(target, **kwargs)
        except psycopg.OperationalError as exc:
            if not refused_by_door(exc):
                raise
            if time.monotonic() >= deadline:
                raise _foreign_door_shut(target, f"waited {DOOR_WAIT_SECONDS:g} s") from exc
            waited()


class ForeignDoorShut(psycopg.OperationalError):
    """A database refusing sessions at its door on a server this machine does not serve (``_foreign_door_shut``):
    a person opens it, not time; a jobs worker spends its attempts on it rather than wait for a server coming
    back up."""


def _foreign_door_shut(target: str, how: str) -> psycopg.OperationalError:
    """The one line for ``target``'s database refusing sessions at its door on a server this machine does not
    serve (``how``: how long it was waited for): only the machine serving it (or the database's owner) can open
    it. No SQLSTATE: a jobs worker counts it transient (``refresher.jobs.retry.is_transient``)."""
    db = conninfo.conninfo_to_dict(target).get("dbname") or "(the target's)"
    return ForeignDoorShut(
        f"database {db} refuses sessions ({how}): a `refresher reset` on the machine that serves it holds its "
        "door shut, or was killed or stopped there with it shut; run `refresher reset` of its profile there (it "
        f"opens the door), or have the database's owner run ALTER DATABASE {db} WITH ALLOW_CONNECTIONS true"
    )


def _live(server: ServerInfo, measure: Callable[[psycopg.Connection[Any]], str | None]) -> str | None:
    """``measure`` (``ledger_version`` or ``ledger_stamp``) of the working database; None when it does not exist."""
    return _live_with_pid(server, measure)[0]


def _live_with_pid(
    server: ServerInfo, measure: Callable[[psycopg.Connection[Any]], _T], options: str | None = None
) -> tuple[_T | None, int | None]:
    """``_live``, and the server process that served it (gone soon after; see ``_wait_gone``); ``options``: the
    connection's (``-c name=value``)."""
    dsn = server.dsn() if options is None else conninfo.make_conninfo(server.dsn(), options=options)
    for attempt in range(1, EVICT_TRIES + 1):
        try:
            with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
                return measure(conn), conn.info.backend_pid
        except psycopg.errors.InvalidCatalogName:  # dropped by hand, or a reset that failed on a full disk
            return None, None
        except psycopg.OperationalError as exc:
            # A session starting while a reset swaps waits for the rename, then finds the name on another database
            # (the server says so): that one is the database now, not none (a second reset then refused, the
            # ledger it read again 'moved' from none).
            if _RENAMED in str(exc) and attempt < EVICT_TRIES:
                continue
            if "does not exist" in str(exc):
                return None, None
            raise unreachable(exc) from exc
    raise AssertionError("unreachable: the last try returns or raises")


_RENAMED = "It seems to have just been dropped or renamed"


__all__ = [
    "MAINTENANCE_DB",
    "ForeignDoorShut",
    "RestoreReport",
    "SnapshotInfo",
    "StoppedWaiting",
    "advance_pristine",
    "connect_target",
    "connect_working",
    "drop_snapshot",
    "has_pristine",
    "is_current",
    "ledger_digest",
    "ledger_stamp",
    "ledger_version",
    "pristine_ledger",
    "pristine_name",
    "require_privileges",
    "restore_pristine",
    "save_pristine",
]
