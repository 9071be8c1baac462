"""The ledgers' write counter: a sequence every statement writing ``refresher_segments`` or ``refresher_features``
draws from, so "did the ledger change since?" is one O(1) read (``refresher.snapshot.ledger_version``).

psycopg alone: the CLI's no-op ``refresh`` (``refresher.stamp``) reads it without importing pyarrow.
"""

from __future__ import annotations

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
# Held by ``refresher.database.ensure_schema`` too: CREATE ... IF NOT EXISTS is not race-free across sessions.
SCHEMA_LOCK = "SELECT pg_advisory_xact_lock(hashtext('refresher.ensure_schema'))"


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
    with conn.transaction():
        conn.execute(SCHEMA_LOCK)
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


__all__ = ["LEDGER_TRIGGER", "LEDGER_WRITES", "SCHEMA_LOCK", "ensure_ledger_counter"]
