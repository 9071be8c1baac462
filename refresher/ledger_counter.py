"""The ledgers' write counter: a sequence every statement writing ``refresher_segments`` or ``refresher_features``
draws from, so "did the ledger change since?" is one O(1) read (``refresher.snapshot.ledger_version``).

psycopg alone: the CLI's no-op ``refresh`` (``refresher.stamp``) reads it without importing pyarrow.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import sql

LEDGER_WRITES = "refresher_ledger_writes"
LEDGER_TRIGGER = "refresher_ledger_written"
# Constant DDL of the counter; ``ensure_ledger_counter`` runs it under the schema lock. The function pins its
# search_path: it must find the sequence whatever the session writing the ledger has set.
_COUNTER_DDL: tuple[str, ...] = (
    f"CREATE SEQUENCE IF NOT EXISTS {LEDGER_WRITES}",
    f"""DO $$ BEGIN
        IF to_regprocedure('{LEDGER_TRIGGER}()') IS NULL THEN
            CREATE FUNCTION {LEDGER_TRIGGER}() RETURNS trigger LANGUAGE plpgsql SET search_path FROM CURRENT
            AS $f$ BEGIN PERFORM nextval('{LEDGER_WRITES}'); RETURN NULL; END $f$;
        END IF;
    END $$""",
)
# Held by every transaction that makes a table (``schema_locked``): CREATE ... IF NOT EXISTS is not race-free
# across sessions.
_SCHEMA_LOCK = "pg_advisory_xact_lock(hashtext('refresher.ensure_schema'))"
# Seconds a transaction under the schema lock may idle between two of its statements before the server ends it
# (``schema_locked``): its statements follow one another at once, so only a stopped client idles that long.
SCHEMA_IDLE_TIMEOUT = 30.0


@contextmanager
def schema_locked(conn: psycopg.Connection[Any]) -> Iterator[None]:
    """A transaction (a savepoint inside the caller's) holding the schema lock until it ends.

    A client stopped inside it (SIGSTOP, Ctrl-Z, a suspended machine) kept the lock for as long as it stayed
    stopped, and every other session making the schema (a refresh's ``ensure_schema``, a first features load, a
    fence's table) waited as long: for ever. Its statements are short DDL whose results the server sends
    whether or not the client reads them, so a stopped client leaves its session idle in the transaction: in a
    transaction of its own, ``idle_in_transaction_session_timeout`` is set for it alone (``SCHEMA_IDLE_TIMEOUT``,
    in the same statement as the lock) and the server ends such a session. Not in a savepoint: the setting would
    outlive it in the caller's transaction, whose pauses are its own."""
    own = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    with conn.transaction():
        if own:
            conn.execute(
                f"SELECT set_config('idle_in_transaction_session_timeout', %s, true), {_SCHEMA_LOCK}",
                (f"{SCHEMA_IDLE_TIMEOUT * 1000:.0f}ms",),
            )
        else:
            conn.execute(f"SELECT {_SCHEMA_LOCK}")
        yield


def ensure_ledger_counter(conn: psycopg.Connection[Any], table: str) -> None:
    """Make every statement that writes ledger ``table`` draw a number from ``refresher_ledger_writes``.

    A statement-level trigger (INSERT, UPDATE, DELETE and TRUNCATE; a load's, a prune's or one typed by hand)
    calls ``nextval``, which no rollback undoes, so the sequence's value moves with every change of the
    ledgers and with some that came to nothing. ``refresher.snapshot.ledger_version`` reads it in O(1) where
    a digest of the ledger costs a second at 60,000 segments. ``ENABLE ALWAYS``: it fires under
    ``session_replication_role = replica`` too. Cheap when in place (one catalog read); otherwise created
    under the schema lock, held to the end of the caller's transaction.
    """
    if _counter_armed(conn, table):
        return
    with schema_locked(conn):
        if _counter_armed(conn, table):  # another session armed it while we waited
            return
        for statement in _COUNTER_DDL:
            conn.execute(statement)
        ident, trigger = sql.Identifier(table), sql.Identifier(LEDGER_TRIGGER)
        conn.execute(sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(trigger, ident))
        conn.execute(
            sql.SQL(
                "CREATE TRIGGER {} AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON {} "
                "FOR EACH STATEMENT EXECUTE FUNCTION {}()"
            ).format(trigger, ident, trigger)
        )
        conn.execute(sql.SQL("ALTER TABLE {} ENABLE ALWAYS TRIGGER {}").format(ident, trigger))


def _counter_armed(conn: psycopg.Connection[Any], table: str) -> bool:
    row = conn.execute(
        "SELECT tgenabled = 'A' FROM pg_trigger WHERE tgrelid = to_regclass(%s) AND tgname = %s",
        (table, LEDGER_TRIGGER),
    ).fetchone()
    return bool(row and row[0])


__all__ = [
    "LEDGER_TRIGGER",
    "LEDGER_WRITES",
    "SCHEMA_IDLE_TIMEOUT",
    "ensure_ledger_counter",
    "schema_locked",
]
