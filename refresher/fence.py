"""A fencing token in the target database, for a writer whose right to write is a lock kept elsewhere.

A queue run's features lock lives in Redis and expires: a worker held up past it (SIGSTOP, a suspended machine, a
long pause) while another worker took it still committed its feature rows and its prune's deletes when it went
on, after the other's. Each holder of such a lock gets a number larger than every earlier holder's
(``JobQueue.features_fence``) and, before its first write, claims the fence's row in the target with it
(``Fence.claim``); each of its write transactions starts by reading the row under a share lock (``Fence.check``)
and goes on only while it still holds its number. A later holder's claim waits for those transactions to end, so
from its commit on no write of an earlier holder commits (``FenceLost``, the transaction rolled back). The wait is
bounded (``wait``): an earlier holder stopped inside a write transaction makes the claim fail as a lock timeout,
a transient failure retried later, never a hang; a holder whose session dies leaves no lock behind. One stopped
in the middle of a statement, a COPY waiting for its rows, is ended by the claim (``Fence._end_stalled``): the
server ends no such session by itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg

from refresher.errors import LoadError
from refresher.ledger_counter import schema_locked

FENCES_DDL = """
CREATE TABLE IF NOT EXISTS refresher_fences (
    fence text PRIMARY KEY,
    token bigint NOT NULL,
    claimed_at timestamptz NOT NULL DEFAULT now()
)
"""


# Where ``lock_waited`` keeps the caller's lock_timeout for the length of its query (a placeholder setting, local
# to the transaction).
_CALLERS = "refresher.fence_callers_lock_timeout"

# Other sessions of our role in this database inside a COPY from their client, waiting for its data, whose
# transaction holds a lock ``{held}`` describes (``_FENCES_HELD`` or ``SEGMENTS_HELD``), and the COPY bytes the
# server has read of each.
_COPYING = """
SELECT DISTINCT a.pid, p.bytes_processed FROM pg_locks l
JOIN pg_stat_activity a ON a.pid = l.pid JOIN pg_stat_progress_copy p ON p.pid = l.pid
WHERE {held}
AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) AND l.pid <> pg_backend_pid()
AND a.usename = current_user AND a.state = 'active' AND a.wait_event = 'ClientRead' AND p.command = 'COPY FROM'
"""
# A lock on the fences' table (a write transaction's check).
_FENCES_HELD = "l.locktype = 'relation' AND l.relation = 'refresher_fences'::regclass"
# One of the advisory locks (bigint keys, as ``pg_advisory_xact_lock(bigint)`` takes them) in the parameter: the
# segment locks of a segment load (``refresher.load.segment_lock_id``), a feature load's
# (``refresher.features.tables.feature_lock_id``).
SEGMENTS_HELD = (
    "l.locktype = 'advisory' AND l.objsubid = 1 AND (l.classid::bigint << 32 | l.objid::bigint) = ANY(%s)"
)
# The lock ``pg_advisory_xact_lock(hashtext(name))`` takes (its key the int4 hash as a bigint), the name the
# parameter: the new partitions' creators' lock (``refresher.partitions``).
NAMED_HELD = (
    "l.locktype = 'advisory' AND l.objsubid = 1 "
    "AND (l.classid::bigint << 32 | l.objid::bigint) = hashtext(%s)"
)
# The locks ``pg_advisory_xact_lock(hashtext(name), key)`` takes, the name and an int array of keys the
# parameters: the new months' locks (``refresher.partitions``).
PAIRS_HELD = (
    "l.locktype = 'advisory' AND l.objsubid = 2 "
    "AND l.classid = hashtext(%s)::oid AND l.objid = ANY(%s::oid[])"
)
# A lock on the relation of the name in the parameter, in this database (``refresher.partitions.lock_default``:
# the default partition a new month's ATTACH takes exclusively and a DELETE through the parent may reach).
RELATION_HELD = (
    "l.locktype = 'relation' AND l.relation = to_regclass(%s) "
    "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
)
# The sessions that hold a lock ``{held}``, for the error that names them.
_HOLDERS = """
SELECT DISTINCT a.pid, a.application_name, a.state, a.wait_event FROM pg_locks l
JOIN pg_stat_activity a ON a.pid = l.pid WHERE {held} AND l.granted AND l.pid <> pg_backend_pid() ORDER BY 1
"""
# Whether every other session holding a lock ``{held}`` is running a statement, or was within the seconds in the
# first parameter (a live loader between two statements, its client busy): true when none holds one.
_BUSY = """
SELECT coalesce(bool_and(
    a.state = 'active' OR a.state_change > clock_timestamp() - make_interval(secs => %s)
), true)
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid WHERE {held} AND l.granted AND l.pid <> pg_backend_pid()
"""
# The first server with ``pg_stat_progress_copy``.
_PROGRESS_COPY_SINCE = 140000


class FenceLost(Exception):
    """A later holder of the lock claimed the fence: this holder writes nothing more."""


@dataclass(frozen=True)
class Fence:
    """Fence ``name`` in a target database, as the holder of ``token`` sees it; ``wait``: seconds a claim or a
    check waits for another's transaction on the fence's row."""

    name: str
    token: int
    wait: float = 10.0

    def claim(self, conn: psycopg.Connection[Any]) -> None:
        """Take the fence for ``token`` (a transaction of its own, on an autocommit connection); FenceLost when a
        larger token holds it. A session that kept it the whole wait inside a COPY with no data from its client
        is ended (``_end_stalled``), and the fence claimed again."""
        if not _has_fences(conn):
            with schema_locked(conn):
                conn.execute(FENCES_DDL)
        row = self._waiting(
            conn,
            "INSERT INTO refresher_fences (fence, token) VALUES (%s, %s) ON CONFLICT (fence) DO UPDATE "
            "SET token = EXCLUDED.token, claimed_at = now() WHERE refresher_fences.token <= EXCLUDED.token "
            "RETURNING token",
            (self.name, self.token),
            stalled=_FENCES_HELD,
        )
        if row is None:
            raise FenceLost(f"{self.name}: claimed by a later holder")

    def check(self, conn: psycopg.Connection[Any]) -> None:
        """The first statement of each write transaction: FenceLost unless the fence still holds ``token``. Its
        row stays share-locked until the transaction ends, so no later claim commits before it does."""
        row = self._waiting(
            conn, "SELECT token FROM refresher_fences WHERE fence = %s FOR SHARE", (self.name,)
        )
        if row != (self.token,):
            raise FenceLost(f"{self.name}: claimed by a later holder")

    def _waiting(
        self, conn: psycopg.Connection[Any], query: str, params: tuple[Any, ...], stalled: str | None = None
    ) -> Any:
        """``query``'s row, its lock waited for at most ``wait`` seconds (inside the caller's transaction; with
        ``stalled``, ``waited_ending_stalled``'s): a LoadError past it (its cause the LockNotAvailable: a
        transient failure, ``jobs.retry.is_transient``; the caller's transaction rolls back)."""
        try:
            if stalled is not None:
                return waited_ending_stalled(conn, self.wait, query, params, stalled)
            with lock_waited(conn, self.wait, query, params) as cursor:
                return cursor.fetchone()
        except psycopg.errors.LockNotAvailable as exc:
            raise LoadError(
                f"{self.name}: another holder's transaction kept the fence for over {self.wait:g} s "
                "(a worker held up inside it?); tried again later"
            ) from exc


def waited_ending_stalled(
    conn: psycopg.Connection[Any],
    wait: float,
    query: str,
    params: tuple[Any, ...],
    held: str,
    held_params: tuple[Any, ...] = (),
    *,
    patient: bool = False,
) -> Any:
    """``query``'s first row, None for a statement that returns none (``lock_waited``, in a transaction of its own
    or a savepoint of the caller's). Past the wait, the sessions that hold a lock ``held`` (a condition on
    ``pg_locks l``, its parameters ``held_params``) inside a COPY that read nothing from their client all along
    are ended (``_end_stalled``) and the query tried once more; LockNotAvailable when there were none, or it
    waited out its wait again.

    ``patient``: while every session that holds such a lock is running a statement (a live COPY among them),
    the query is tried again, each wait its own look at the COPYs: a live load is waited for as long as it
    runs, as before the wait was bounded, and one stalled meanwhile is still ended. LockNotAvailable once a
    holder is not (idle inside its transaction the whole wait: a loader stopped between two statements).

    The first try does not wait (``lock_waited``'s least, 1 ms), and the COPYs are looked at only when it fails:
    that look (a clear of the activity snapshot and a join of ``pg_locks`` and ``pg_stat_activity``) was paid
    before every lock, held or not: each month batch's default partition (``partitions.lock_default``), each
    fence claim."""
    copying: dict[int, int] | None = None  # before the first wait: the holders' COPYs, by pid, and bytes read
    again = False
    while True:
        try:
            with (
                conn.transaction(),
                lock_waited(conn, 0 if copying is None else wait, query, params) as cursor,
            ):
                return cursor.fetchone() if cursor.description is not None else None
        except psycopg.errors.LockNotAvailable:
            if copying is None:  # held: now the wait, from a look at the holders' COPYs
                copying = _copying(conn, held, held_params)
                continue
            if (patient or not again) and _end_stalled(conn, copying, wait, held, held_params):
                again = True
                continue
            if not (patient and _busy(conn, wait, held, held_params)):
                raise
            copying = _copying(conn, held, held_params)


def _busy(conn: psycopg.Connection[Any], wait: float, held: str, held_params: tuple[Any, ...]) -> bool:
    """Whether every other session holding a lock ``held`` ran a statement within the last ``wait`` seconds (or
    none holds one now)."""
    conn.execute("SELECT pg_stat_clear_snapshot()")  # as ``_copying``: a look of its own
    row = conn.execute(_BUSY.format(held=held), (wait, *held_params)).fetchone()
    return row == (True,)


def advisory_locked(
    conn: psycopg.Connection[Any],
    wait: float,
    args: str,
    rows: str,
    params: tuple[Any, ...],
    held: str,
    held_params: tuple[Any, ...],
    *,
    patient: bool = True,
) -> None:
    """``pg_advisory_xact_lock({args})`` for each row of ``FROM {rows}`` (its parameters ``params``, the rows in
    lock order), until the transaction ends. Tried first without waiting, in order up to the first lock another
    session holds (one round trip: the uncontended case, as when each was one statement); when there is one,
    the rest are taken in order through ``waited_ending_stalled`` (``held``, ``held_params``: the same locks as
    ``pg_locks`` shows them; ``patient``), LockNotAvailable past its wait. Only a prefix of the order is taken
    before the wait, so loaders that take the same locks in the same order still cannot deadlock.

    A loader stopped in the middle of a COPY (SIGSTOP, a suspended machine) held its advisory locks for as long
    as it stayed stopped, and another that wanted one waited as long: for ever, since the server ends no
    session active in a COPY."""
    tried = f"SELECT EXISTS (SELECT FROM {rows} WHERE NOT pg_try_advisory_xact_lock({args}))"
    if conn.execute(tried, params).fetchone() == (False,):
        return
    waited_ending_stalled(
        conn,
        wait,
        f"SELECT pg_advisory_xact_lock({args}) FROM {rows}",
        params,
        held,
        held_params,
        patient=patient,
    )


def held_by(conn: psycopg.Connection[Any], held: str, held_params: tuple[Any, ...]) -> str:
    """The sessions that hold a lock ``held``, for an error: ``pid 12 (app, active on ClientRead)``."""
    return (
        ", ".join(
            f"pid {pid} ({name or 'no application_name'}, {state}{f' on {event}' if event else ''})"
            for pid, name, state, event in conn.execute(_HOLDERS.format(held=held), held_params).fetchall()
        )
        or "since ended"
    )


def _end_stalled(
    conn: psycopg.Connection[Any],
    copying: dict[int, int],
    wait: float,
    held: str,
    held_params: tuple[Any, ...],
) -> bool:
    """End the sessions of ``copying`` (``_COPYING`` before the wait) whose COPY read nothing from their client
    all along; whether there were any.

    A writer stopped in the middle of a statement (SIGSTOP, a suspended machine, in a COPY of its rows) kept
    the fence's row share-locked for as long as it stayed stopped: its session is active, not idle in a
    transaction (``idle_in_transaction_session_timeout`` does not see it), and the server holds cancels off
    while a COPY waits for its client's data, so ``statement_timeout`` fired only once the writer went on
    (measured on PostgreSQL 15). Every claim failed as a lock timeout until the run ran out of attempts. A
    live writer's COPY sends its rows as fast as it encodes them; one that sent none for the whole wait (the
    lock's life, which its holder did not renew) has lost the lock, and ending its session rolls its
    transaction back: it finds its connection gone when it goes on, and commits nothing."""
    stalled = [pid for pid, done in _copying(conn, held, held_params).items() if copying.get(pid) == done]
    if stalled:
        conn.execute(
            "SELECT pg_terminate_backend(pid, %s) FROM unnest(%s::int[]) AS pid",
            (int(max(wait, 1.0) * 1000), stalled),
        )
    return bool(stalled)


@contextmanager
def lock_waited(
    conn: psycopg.Connection[Any], wait: float, query: str, params: tuple[Any, ...]
) -> Iterator[psycopg.Cursor[Any]]:
    """A cursor on ``query``'s result, its locks waited for at most ``wait`` seconds (LockNotAvailable past it,
    inside the caller's transaction, or the one the statements make on an autocommit connection), and the
    caller's ``lock_timeout`` back for the rest of it: its own statements wait as long as it chose.

    One round trip: the four statements go as one query string (bound on the client), the caller's value kept
    by the server in a setting of ours rather than read back and sent again. Four round trips were a check's cost
    (read it, set it, the query, put it back), paid at the start of each write transaction of a features step. A
    query that fails ends the string there, in the caller's transaction, which rolls back as before. psycopg's
    pipeline mode sends them in one round trip too, but took longer over loopback (104 against 69 us a check, the
    old four 101 us: its entering and leaving the mode)."""
    statements = ";".join(
        [
            f"SELECT set_config('{_CALLERS}', current_setting('lock_timeout'), true)",
            "SELECT set_config('lock_timeout', %s, true)",
            query,
            f"SELECT set_config('lock_timeout', current_setting('{_CALLERS}'), true)",
        ]
    )
    with psycopg.ClientCursor(conn) as cursor:
        cursor.execute(statements, (f"{max(wait, 0.001) * 1000:.0f}ms", *params))
        cursor.nextset()
        cursor.nextset()  # the query's
        yield cursor


def _copying(conn: psycopg.Connection[Any], held: str, held_params: tuple[Any, ...]) -> dict[int, int]:
    """``_COPYING``'s sessions holding a lock ``held`` and their bytes read; none on a server before PostgreSQL 14, which has no
    ``pg_stat_progress_copy`` (the query failed there, and so did every claim: a run's features never loaded)."""
    if conn.info.server_version < _PROGRESS_COPY_SINCE:
        return {}
    # The server reads the sessions' activity once a transaction and shows that until it ends: a look inside the
    # caller's (a segment load's) saw after the wait the bytes it saw before it, and ended a live COPY as stalled.
    conn.execute("SELECT pg_stat_clear_snapshot()")
    return dict(conn.execute(_COPYING.format(held=held), held_params).fetchall())


def _has_fences(conn: psycopg.Connection[Any]) -> bool:
    """Whether the target has the fences' table (a features step of a queue run made it there)."""
    return conn.execute("SELECT to_regclass('refresher_fences')").fetchone() != (None,)


def drop_fences(conn: psycopg.Connection[Any], names: list[str], wait: float) -> int:
    """Remove the fences ``names`` (their lock's keys removed for good: ``jobs prune``/``delete`` of their runs);
    how many rows went. A holder held up until then finds no row at its next check and writes nothing more.

    A row's lock is waited for at most ``wait`` seconds (LockNotAvailable past it, none removed): a worker stopped
    inside a features write transaction holds its row FOR SHARE (``Fence.check``) until the server ends its
    session (idle_in_transaction_session_timeout), or for ever when stopped mid-statement, and the prune waited
    as long."""
    if not _has_fences(conn):
        return 0
    with lock_waited(conn, wait, "DELETE FROM refresher_fences WHERE fence = ANY(%s)", (names,)) as cursor:
        return cursor.rowcount


__all__ = [
    "FENCES_DDL",
    "NAMED_HELD",
    "PAIRS_HELD",
    "RELATION_HELD",
    "SEGMENTS_HELD",
    "Fence",
    "FenceLost",
    "advisory_locked",
    "drop_fences",
    "held_by",
    "lock_waited",
    "waited_ending_stalled",
]
