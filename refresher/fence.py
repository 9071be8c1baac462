"""A fencing token in the target database, for a writer whose right to write is a lock kept elsewhere.

A queue run's features lock lives in Redis and expires: a worker held up past it (SIGSTOP, a suspended machine, a
long pause) while another worker took it still committed its feature rows and its prune's deletes when it went
on, after the other's. Each holder of such a lock gets a number larger than every earlier holder's
(``JobQueue.features_fence``) and, before its first write, claims the fence's row in the target with it
(``Fence.claim``); each of its write transactions starts by reading the row under a share lock (``Fence.check``)
and goes on only while it still holds its number. A later holder's claim waits for those transactions to end, so
from its commit on no write of an earlier holder commits (``FenceLost``, the transaction rolled back). The wait is
bounded (``wait``): an earlier holder stopped inside a write transaction makes the claim fail as a lock timeout,
a transient failure retried later, never a hang; a holder whose session dies leaves no lock behind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg

from refresher.errors import LoadError
from refresher.ledger_counter import SCHEMA_LOCK

FENCES_DDL = """
CREATE TABLE IF NOT EXISTS refresher_fences (
    fence text PRIMARY KEY,
    token bigint NOT NULL,
    claimed_at timestamptz NOT NULL DEFAULT now()
)
"""


# Where ``Fence._waiting`` keeps the caller's lock_timeout for the length of its query (a placeholder setting, local
# to the transaction).
_CALLERS = "refresher.fence_callers_lock_timeout"


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
        larger token holds it."""
        if not _has_fences(conn):
            with conn.transaction():
                conn.execute(SCHEMA_LOCK)
                conn.execute(FENCES_DDL)
        with conn.transaction():
            row = self._waiting(
                conn,
                "INSERT INTO refresher_fences (fence, token) VALUES (%s, %s) ON CONFLICT (fence) DO UPDATE "
                "SET token = EXCLUDED.token, claimed_at = now() WHERE refresher_fences.token <= EXCLUDED.token "
                "RETURNING token",
                (self.name, self.token),
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

    def _waiting(self, conn: psycopg.Connection[Any], query: str, params: tuple[Any, ...]) -> Any:
        """``query``'s row, its lock waited for at most ``wait`` seconds (inside the caller's transaction), and
        the caller's ``lock_timeout`` back for the rest of it: its own statements wait as long as it chose.

        One round trip: the four statements go as one query string (bound on the client), the caller's value
        kept by the server in a setting of ours rather than read back and sent again. Four round trips were a
        check's cost (read it, set it, the query, put it back), paid at the start of each write transaction of a
        features step. A query that fails ends the string there, in the caller's transaction, which rolls back
        as before. psycopg's pipeline mode sends them in one round trip too, but took longer over loopback (104
        against 69 us a check, the old four 101 us: its entering and leaving the mode)."""
        statements = ";".join(
            [
                f"SELECT set_config('{_CALLERS}', current_setting('lock_timeout'), true)",
                "SELECT set_config('lock_timeout', %s, true)",
                query,
                f"SELECT set_config('lock_timeout', current_setting('{_CALLERS}'), true)",
            ]
        )
        with psycopg.ClientCursor(conn) as cursor:
            try:
                cursor.execute(statements, (f"{max(self.wait, 0.001) * 1000:.0f}ms", *params))
            except psycopg.errors.LockNotAvailable as exc:
                raise LoadError(
                    f"{self.name}: another holder's transaction kept the fence for over {self.wait:g} s "
                    "(a worker held up inside it?); tried again later"
                ) from exc
            cursor.nextset()
            cursor.nextset()  # the query's
            return cursor.fetchone()


def _has_fences(conn: psycopg.Connection[Any]) -> bool:
    """Whether the target has the fences' table (a features step of a queue run made it there)."""
    return conn.execute("SELECT to_regclass('refresher_fences')").fetchone() != (None,)


def drop_fences(conn: psycopg.Connection[Any], names: list[str]) -> int:
    """Remove the fences ``names`` (their lock's keys removed for good: ``jobs prune``/``delete`` of their runs);
    how many rows went. A holder held up until then finds no row at its next check and writes nothing more."""
    if not _has_fences(conn):
        return 0
    return conn.execute("DELETE FROM refresher_fences WHERE fence = ANY(%s)", (names,)).rowcount


__all__ = ["FENCES_DDL", "Fence", "FenceLost", "drop_fences"]
