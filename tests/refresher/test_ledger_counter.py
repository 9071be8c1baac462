"""The ledgers' write counter and ``snapshot.ledger_version``: every ledger write moves it, nothing else does,
and a database without it falls back to the content digest. On a real server."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import psycopg
import pyarrow as pa
import pytest
from psycopg import sql

from refresher.database import ensure_schema
from refresher.engines.base import ServerInfo
from refresher.features.tables import FeaturePart, replace_feature_rows
from refresher.ledger_counter import LEDGER_TRIGGER, ensure_ledger_counter
from refresher.load import delete_segment, load_segment
from refresher.segments import Segment
from refresher.snapshot import is_current, ledger_digest, ledger_version, save_pristine
from tests.fixtures_postgres import daily_bars

pytestmark = pytest.mark.postgres
JAN, FEB = dt.date(2024, 1, 1), dt.date(2024, 2, 1)
Write = Callable[[psycopg.Connection[Any]], object]


def _version(server: ServerInfo) -> str | None:
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        return ledger_version(conn)


def _feature(conn: psycopg.Connection[Any]) -> object:
    rows = pa.table({"symbol": ["AAPL"], "date": pa.array([JAN], pa.date32()), "x": [1.0]})
    return replace_feature_rows(conn, "f", [FeaturePart("AAPL", rows, "in")])


def _drop_and_make_again(conn: psycopg.Connection[Any]) -> None:
    conn.execute("DROP TABLE refresher_segments")
    ensure_schema(conn)


WRITES: dict[str, Write] = {
    "load": lambda c: load_segment(
        c, Segment("AAPL", "1d", FEB), daily_bars("AAPL", FEB, 20), "feb", tz="UTC"
    ),
    "prune": lambda c: delete_segment(c, Segment("AAPL", "1d", JAN), tz="UTC"),
    "update by hand": lambda c: c.execute("UPDATE refresher_segments SET content_hash = 'edited'"),
    "delete by hand": lambda c: c.execute("DELETE FROM refresher_segments"),
    "truncate by hand": lambda c: c.execute("TRUNCATE refresher_segments"),
    "insert by hand, replica role": lambda c: c.execute(
        "SET session_replication_role = replica; "
        "INSERT INTO refresher_segments (symbol, timeframe, month, content_hash, rows) "
        "VALUES ('KO', '1d', '2024-01-01', 'h', 1)"
    ),
    "feature load": _feature,
    "dropped and made again": _drop_and_make_again,
}


@pytest.mark.parametrize("write", list(WRITES))
def test_every_ledger_write_moves_the_version_and_unsnapshots(loaded: ServerInfo, write: str) -> None:
    save_pristine(loaded, fill_pool=False)
    before = _version(loaded)
    assert before is not None and is_current(loaded)
    with psycopg.connect(loaded.dsn(), autocommit=True) as conn:
        WRITES[write](conn)
    assert _version(loaded) != before
    assert not is_current(loaded)


def test_reads_and_data_writes_leave_it_and_a_copy_has_the_same(loaded: ServerInfo) -> None:
    before = _version(loaded)
    with psycopg.connect(loaded.dsn(), autocommit=True) as conn:
        conn.execute("SELECT * FROM refresher_segments").fetchall()
        conn.execute(
            "DELETE FROM ohlcv_daily WHERE date > '2024-01-10'"
        )  # a test dirtying data, not the ledger
        ensure_schema(conn)
    assert _version(loaded) == before
    save_pristine(loaded, fill_pool=False)
    assert is_current(loaded)  # the mark was read from the copy: same oids, same counter


def test_a_rolled_back_write_may_move_it_but_never_lies(loaded: ServerInfo) -> None:
    save_pristine(loaded, fill_pool=False)
    with (
        psycopg.connect(loaded.dsn(), autocommit=True) as conn,
        pytest.raises(RuntimeError),
        conn.transaction(),
    ):
        conn.execute("DELETE FROM refresher_segments")
        raise RuntimeError("rolled back")
    # The ledger is as the copy holds it; at worst the next refresh takes a snapshot it did not need.
    assert not is_current(loaded)
    save_pristine(loaded, fill_pool=False)
    assert is_current(loaded)


@pytest.mark.parametrize("how", ["never armed", "trigger dropped", "trigger disabled"])
def test_without_the_counter_the_version_is_the_content_digest(loaded: ServerInfo, how: str) -> None:
    trigger = sql.Identifier(LEDGER_TRIGGER)
    with psycopg.connect(loaded.dsn(), autocommit=True) as conn:
        if how == "never armed":  # a database an older version made
            conn.execute(sql.SQL("DROP TRIGGER {} ON refresher_segments").format(trigger))
            conn.execute("DROP SEQUENCE refresher_ledger_writes")
        elif how == "trigger dropped":
            conn.execute(sql.SQL("DROP TRIGGER {} ON refresher_segments").format(trigger))
        else:
            conn.execute(sql.SQL("ALTER TABLE refresher_segments DISABLE TRIGGER {}").format(trigger))
        assert ledger_version(conn) == ledger_digest(conn)
    save_pristine(loaded, fill_pool=False)
    assert is_current(loaded)
    with psycopg.connect(loaded.dsn(), autocommit=True) as conn:
        conn.execute("UPDATE refresher_segments SET content_hash = 'edited'")  # the digest still sees it
        assert not is_current(loaded)
        ensure_ledger_counter(conn, "refresher_segments")  # what the next refresh does (ensure_schema)
        armed = ledger_version(conn)
        assert armed != ledger_digest(conn)
        conn.execute("UPDATE refresher_segments SET content_hash = 'again'")
        assert ledger_version(conn) != armed


def test_a_database_without_a_ledger_has_no_version(pg_database: ServerInfo) -> None:
    assert _version(pg_database) is None
