"""A server someone else runs, where refresher's role is no superuser: CREATEDB, and the owner of its database
(a managed Postgres's admin role). The whole path as that role: refresh (cold, no-op, a day later), reset
(template and pool), checkout, the detached refill and its analysis. On a real server."""

from __future__ import annotations

import datetime as dt
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from featurestore import FeatureStore
from refresher import pool, snapshot
from refresher._planner_stats import recorded
from refresher._snapshot_sql import _pristine_mark
from refresher.database import ensure_schema
from refresher.diskfull import data_directory, has_room
from refresher.engines.base import ServerInfo
from refresher.engines.existing import ExistingServerEngine
from refresher.errors import SnapshotError
from refresher.load import load_segment
from refresher.pool import checkout_clone, drop_clone, pool_status, refill_pool, wait_for_pool
from refresher.profile import Profile, profile_from_file
from refresher.refresh import RefreshReport, refresh
from refresher.segments import Segment
from refresher.snapshot import drop_snapshot, restore_pristine
from tests.featurestore.test_refresh_heals import CHECKSUMS
from tests.fixtures_postgres import minute_bars
from tests.refresher.test_planner_stats import _stale

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

PROFILE = """\
description: refreshed by a role that is no superuser
universe:
  symbols: [AAPL, MSFT]
exchange: XNYS
months: 2
as_of: {as_of}
timeframes: [1d, 1m]
seed: 5
"""


@pytest.fixture
def plain(pg_server: ServerInfo) -> Iterator[ServerInfo]:
    """A role with CREATEDB and no superuser, owning a fresh database; its ServerInfo as an existing server."""
    role, password = f"plain_{secrets.token_hex(4)}", secrets.token_hex(8)
    name = f"t_{secrets.token_hex(6)}"
    with psycopg.connect(pg_server.dsn("postgres"), autocommit=True) as admin:
        admin.execute(
            sql.SQL("CREATE ROLE {} LOGIN CREATEDB PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(password)
            )
        )
        admin.execute(
            sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name), sql.Identifier(role))
        )
    server = replace(pg_server, engine="existing", user=role, password=password, dbname=name)
    try:
        yield server
    finally:
        drop_snapshot(replace(pg_server, dbname=name))
        with psycopg.connect(pg_server.dsn("postgres"), autocommit=True) as admin:
            owned = admin.execute(
                "SELECT datname FROM pg_database WHERE datdba = %s::regrole", (role,)
            ).fetchall()
            for db in {name, *(db for (db,) in owned)}:
                admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db)))
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def _profile(tmp_path: Path, as_of: str) -> Profile:
    path = tmp_path / "plain.yaml"
    path.write_text(PROFILE.format(as_of=as_of))
    return profile_from_file(path)


def _run(profile: Profile, server: ServerInfo, root: Path) -> RefreshReport:
    return refresh(profile, ExistingServerEngine(server), FeatureStore(root), pool_size=1)


def _checksums(dsn: str) -> dict[str, str]:
    with psycopg.connect(dsn) as conn:
        return {name: digest for name, digest in conn.execute(CHECKSUMS)}


def _damage(server: ServerInfo) -> None:
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        conn.execute("DELETE FROM ohlcv_daily WHERE symbol = 'AAPL'")


def _eventually(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 90
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def _refreshed_with_its_pool(server: ServerInfo, tmp_path: Path) -> dict[str, str]:
    """Refresh ``server``'s database, wait for its pool; returns what the database holds."""
    _run(_profile(tmp_path, "2025-03-28"), server, tmp_path / "store")
    wait_for_pool(server, timeout=90)
    return _checksums(server.dsn())


def _not_superuser(server: ServerInfo) -> None:
    with psycopg.connect(server.dsn()) as conn:
        row = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
    assert row == (False,)


def _pristine_analyzed(server: ServerInfo) -> bool:
    with psycopg.connect(server.dsn("postgres")) as conn:
        mark = _pristine_mark(conn, server.dbname)
    assert mark is not None
    return mark.analyzed


def test_the_whole_path_as_a_createdb_role_owning_its_database(
    plain: ServerInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _not_superuser(plain)
    root, log = tmp_path / "store", tmp_path / "refill.log"
    with monkeypatch.context() as held:  # the refresh's refill held back: the reset below is surely before it
        held.setattr(pool, "spawn_refill", lambda *args, **kwargs: None)
        _run(_profile(tmp_path, "2025-03-28"), plain, root)
    pristine = _checksums(plain.dsn())
    assert pristine

    # A reset right after the refresh (a copy of the pristine copy: no pool yet), not analyzed yet.
    assert not _pristine_analyzed(plain)
    _damage(plain)
    assert restore_pristine(plain, refill_log=log).method == "template"
    assert _checksums(plain.dsn()) == pristine
    name = f"{plain.dbname}_c"
    dsn = checkout_clone(plain, name, refill_log=log)
    assert _checksums(dsn) == pristine
    # The detached refill analyzes what was handed out and fills the pool.
    _eventually(lambda: _stale(plain.dsn()) == [] and _stale(dsn) == [], "the handouts were never analyzed")
    wait_for_pool(plain, timeout=90)
    assert _pristine_analyzed(plain)
    assert _stale(plain.dsn(pool_status(plain).ready[0])) == []
    drop_clone(plain, name)

    # A reset after the analysis, from the pool.
    _damage(plain)
    assert restore_pristine(plain, refill_log=log).method == "pool"
    assert _checksums(plain.dsn()) == pristine
    wait_for_pool(plain, timeout=90)

    # A no-op refresh, then a day later.
    assert _run(_profile(tmp_path, "2025-03-28"), plain, root).rows_loaded == 0
    assert _checksums(plain.dsn()) == pristine
    advanced: list[object] = []
    real_advance = snapshot.advance_pristine

    def watched_advance(*args: Any, **kwargs: Any) -> Any:
        advanced.append(real_advance(*args, **kwargs))
        return advanced[-1]

    with monkeypatch.context() as watched:  # the new day's rows replayed into a clone, not a copy of it all
        watched.setattr(snapshot, "advance_pristine", watched_advance)
        _run(_profile(tmp_path, "2025-03-31"), plain, root)
    assert len(advanced) == 1 and advanced[0] is not None
    later = _checksums(plain.dsn())
    assert later != pristine
    _damage(plain)
    restore_pristine(plain, refill_log=log)
    assert _checksums(plain.dsn()) == later
    dsn = checkout_clone(plain, name, refill_log=log)
    assert _checksums(dsn) == later
    _eventually(lambda: _stale(dsn) == [], "the checked-out clone was never analyzed")
    drop_clone(plain, name)
    wait_for_pool(plain, timeout=90)
    assert "Error" not in log.read_text()


def test_a_session_the_role_may_not_end_fails_a_reset_in_one_line_and_leaves_the_database(
    plain: ServerInfo, pg_server: ServerInfo, tmp_path: Path
) -> None:
    pristine = _refreshed_with_its_pool(plain, tmp_path)
    # The role's own sessions it ends, as a superuser would.
    with psycopg.connect(plain.dsn(), autocommit=True) as own:
        _damage(plain)
        assert restore_pristine(plain, refill=False).method == "pool"
        with pytest.raises(psycopg.OperationalError, match="terminating connection"):
            own.execute("SELECT 1")
    assert _checksums(plain.dsn()) == pristine
    # A superuser's session it may not end: one line saying what the role lacks, the database as it was.
    with psycopg.connect(pg_server.dsn(plain.dbname), autocommit=True) as other:
        _damage(plain)
        with pytest.raises(SnapshotError, match="pg_signal_backend"):
            restore_pristine(plain, refill=False)
        assert other.execute("SELECT count(*) FROM ohlcv_daily WHERE symbol = 'AAPL'").fetchone() == (0,)
    # Its open transaction holding a lock on the ledger: one line, not a reset waiting for it without end.
    with psycopg.connect(pg_server.dsn(plain.dbname)) as other:
        other.execute("LOCK TABLE refresher_segments")
        with pytest.raises(
            SnapshotError, match=r"open transaction holds a lock on it.*pg_signal_backend"
        ) as held:
            restore_pristine(plain, refill=False)
        assert "\n" not in str(held.value)
    restore_pristine(plain, refill=False)
    assert _checksums(plain.dsn()) == pristine


def test_a_role_granted_set_on_the_placeholder_records_its_handouts(
    plain: ServerInfo, pg_server: ServerInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with psycopg.connect(pg_server.dsn("postgres"), autocommit=True) as admin:
        admin.execute(
            sql.SQL("GRANT SET ON PARAMETER refresher.analyze_pending TO {}").format(
                sql.Identifier(plain.user)
            )
        )
    try:
        monkeypatch.setattr(pool, "spawn_refill", lambda *args, **kwargs: None)
        monkeypatch.setattr(snapshot, "spawn_refill", lambda *args, **kwargs: None)  # the analyzer "killed"
        _run(_profile(tmp_path, "2025-03-28"), plain, tmp_path / "store")
        _damage(plain)
        assert restore_pristine(plain).method == "template"
        with psycopg.connect(plain.dsn("postgres")) as conn:
            assert plain.dbname in recorded(conn)
        refill_pool(plain)  # whoever comes next finishes it
        with psycopg.connect(plain.dsn("postgres")) as conn:
            assert plain.dbname not in recorded(conn)
        assert _stale(plain.dsn()) == []
    finally:
        with psycopg.connect(pg_server.dsn("postgres"), autocommit=True) as admin:
            admin.execute(
                sql.SQL("REVOKE SET ON PARAMETER refresher.analyze_pending FROM {}").format(
                    sql.Identifier(plain.user)
                )
            )


@pytest.mark.parametrize(
    ("createdb", "owner", "missing"),
    [(False, True, "it needs CREATEDB \\("), (True, False, "it needs to own database")],
)
def test_a_role_that_cannot_snapshot_fails_the_refresh_in_one_line_before_it_loads(
    plain: ServerInfo, pg_server: ServerInfo, tmp_path: Path, createdb: bool, owner: bool, missing: str
) -> None:
    with psycopg.connect(pg_server.dsn("postgres"), autocommit=True) as admin:
        role = sql.Identifier(plain.user)
        if not createdb:
            admin.execute(sql.SQL("ALTER ROLE {} NOCREATEDB").format(role))
        if not owner:
            admin.execute(
                sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
                    sql.Identifier(plain.dbname), sql.Identifier(pg_server.user)
                )
            )
    with pytest.raises(SnapshotError, match=missing):
        _run(_profile(tmp_path, "2025-03-28"), plain, tmp_path / "store")
    with psycopg.connect(plain.dsn()) as conn:
        assert conn.execute("SELECT to_regclass('ohlcv_daily')").fetchone() == (None,)


def test_a_clone_another_roles_session_holds_is_named_in_one_line_or_left_for_later(
    plain: ServerInfo, pg_server: ServerInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pool, "spawn_refill", lambda *args, **kwargs: None)
    _run(_profile(tmp_path, "2025-03-28"), plain, tmp_path / "store")
    refill_pool(plain, size=2)
    name = f"{plain.dbname}_c"
    checkout_clone(plain, name, refill=False)
    held = pool_status(plain).ready[0]
    with (
        psycopg.connect(pg_server.dsn(name), autocommit=True),
        psycopg.connect(pg_server.dsn(held), autocommit=True),
    ):
        # Dropping what a superuser's session holds: one line naming the session and what to do.
        with pytest.raises(SnapshotError, match=f"cannot drop {name}: a session of role '{pg_server.user}'"):
            drop_clone(plain, name)
        # A reset that would take the held clone fails in one line and leaves the database as it was.
        _damage(plain)
        damaged = _checksums(plain.dsn())
        with pytest.raises(SnapshotError, match=f"cannot rename or copy {held}"):
            restore_pristine(plain, refill=False)
        assert _checksums(plain.dsn()) == damaged
        # A new snapshot, then its refill, leave the held old clone for later and make the pool they need.
        snapshot.save_pristine(plain, pool_size=2, fill_pool=False)
        assert refill_pool(plain) == 2
        assert held in _databases_of(plain) and held not in pool_status(plain).ready
        snapshot.save_pristine(plain, pool_size=2, fill_pool=True)
        assert len(pool_status(plain).ready) == 2 and held not in pool_status(plain).ready
    drop_clone(plain, name)
    refill_pool(plain)
    assert len(pool_status(plain).ready) == 2


def _databases_of(server: ServerInfo) -> set[str]:
    with psycopg.connect(server.dsn("postgres")) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE starts_with(datname, %s)", (server.dbname,)
        )
        return {str(name) for (name,) in rows.fetchall()}


def test_a_role_that_lost_createdb_fails_a_reset_and_a_checkout_in_one_line(
    plain: ServerInfo, pg_server: ServerInfo, tmp_path: Path
) -> None:
    pristine = _refreshed_with_its_pool(plain, tmp_path)
    with psycopg.connect(pg_server.dsn("postgres"), autocommit=True) as admin:
        admin.execute(sql.SQL("ALTER ROLE {} NOCREATEDB").format(sql.Identifier(plain.user)))
    _damage(plain)
    with pytest.raises(SnapshotError, match=f"role '{plain.user}' needs CREATEDB"):
        restore_pristine(plain, refill=False)
    with pytest.raises(SnapshotError, match=f"role '{plain.user}' needs CREATEDB"):
        checkout_clone(plain, f"{plain.dbname}_c", refill=False)
    assert _checksums(plain.dsn()) != pristine  # left as it was
    with psycopg.connect(pg_server.dsn("postgres"), autocommit=True) as admin:
        admin.execute(sql.SQL("ALTER ROLE {} CREATEDB").format(sql.Identifier(plain.user)))
    restore_pristine(plain, refill=False)
    assert _checksums(plain.dsn()) == pristine


class _Counting(psycopg.Connection[Any]):
    """A connection that keeps the statements sent through its ``execute``."""

    sent: list[str]

    def execute(
        self, query: Any, params: Any = None, *, prepare: bool | None = None, binary: bool = False
    ) -> Any:
        self.sent.append(query.as_string(self) if isinstance(query, sql.Composable) else str(query))
        return super().execute(query, params, prepare=prepare, binary=binary)


@pytest.mark.parametrize("may_run", [False, True], ids=["plain", "pg_execute_server_program"])
def test_a_load_asks_the_servers_df_only_when_the_role_may_run_it(
    plain: ServerInfo, pg_server: ServerInfo, may_run: bool
) -> None:
    # Every batch's disk check sent a COPY ... TO PROGRAM the server refused (42501): an ERROR and its statement
    # in the server's log, and a savepoint, per batch. A role that may run it (not reading data_directory) is
    # measured by the server's df: each batch asks, the disk's free space changes.
    if may_run:
        with psycopg.connect(pg_server.dsn("postgres"), autocommit=True) as admin:
            admin.execute(sql.SQL("GRANT pg_execute_server_program TO {}").format(sql.Identifier(plain.user)))
    start = dt.datetime(2024, 1, 1, 5, tzinfo=dt.UTC)
    with _Counting.connect(plain.dsn(), autocommit=True) as conn:
        conn.sent = []
        ensure_schema(conn)
        for i in range(2):
            segment = Segment(f"S{i}", "1m", dt.date(2024, 1, 1))
            load_segment(conn, segment, minute_bars(f"S{i}", start, 100), "h", tz="UTC")
        asked = [statement for statement in conn.sent if "TO PROGRAM" in statement]
        assert len(asked) == (2 if may_run else 0), asked
        assert data_directory(conn) is None  # not this role's to read: not measured from this host
        if may_run:
            assert has_room(conn, 1) is True and has_room(conn, 2**60) is False
        else:
            assert has_room(conn, 1) is None
            assert not [statement for statement in conn.sent if "TO PROGRAM" in statement]


@pytest.fixture
def df_conn(plain: ServerInfo, pg_server: ServerInfo) -> Iterator[psycopg.Connection[Any]]:
    """A connection of a role that may run the server's df (pg_execute_server_program), not a superuser."""
    with psycopg.connect(pg_server.dsn("postgres"), autocommit=True) as admin:
        admin.execute(sql.SQL("GRANT pg_execute_server_program TO {}").format(sql.Identifier(plain.user)))
    with psycopg.connect(plain.dsn(), autocommit=True) as conn:
        yield conn


def test_a_df_cut_short_by_a_statement_timeout_is_asked_again_not_taken_for_a_refusal(
    df_conn: psycopg.Connection[Any],
) -> None:
    # A probe that timed out once (the session's statement_timeout, a slow df) marked the connection as one whose
    # role may not run programs, for good: a long-lived connection (a worker, the pytest plugin) stopped
    # checking the server's free disk after one slow df.
    assert data_directory(df_conn) is None  # asked once per connection: the server's df measures it
    df_conn.execute("SET statement_timeout = 1")  # 1 ms: a shell, df and awk take longer to run
    assert has_room(df_conn, 1) is None  # nobody can tell this time
    df_conn.execute("SET statement_timeout = 0")
    assert has_room(df_conn, 1) is True and has_room(df_conn, 2**60) is False


def test_a_df_always_slower_than_the_statement_timeout_is_given_up_after_three_in_a_row(
    df_conn: psycopg.Connection[Any],
) -> None:
    # Every interrupted probe was asked again: a df always slower than the timeout made every load batch wait it
    # out (and logged an ERROR each time). Three in a row and the connection asks no more; an answer between
    # resets the count.
    assert data_directory(df_conn) is None
    for _ in range(2):
        df_conn.execute("SET statement_timeout = 1")
        assert has_room(df_conn, 1) is None and has_room(df_conn, 1) is None  # two in a row
        df_conn.execute("SET statement_timeout = 0")
        assert has_room(df_conn, 1) is True  # an answer: the count starts again
    df_conn.execute("SET statement_timeout = 1")
    assert [has_room(df_conn, 1) for _ in range(3)] == [None, None, None]
    df_conn.execute("SET statement_timeout = 0")
    assert has_room(df_conn, 1) is None  # given up on this connection


def test_a_df_probe_ended_by_another_signal_is_not_asked_again(
    df_conn: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Any "signal" in the detail was taken for the timeout's SIGINT: a program that crashes (signal 11) was run
    # again before every batch, an ERROR in the server's log each time.
    from refresher import diskfull

    monkeypatch.setattr(diskfull, "_DF_PROBE", "kill -SEGV $$ # {kib}")
    assert data_directory(df_conn) is None
    assert has_room(df_conn, 1) is None
    monkeypatch.undo()  # a df that would answer now is not asked: the connection gave up on the first crash
    assert has_room(df_conn, 1) is None
