"""Daily refreshes whose snapshot writes their rows again into a warm clone (``snapshot.advance_pristine``),
against a cold load of the same day into another state dir, row for row, and against their own reset: killed -9
after each step, then re-run (a reset right after the kill restores exactly the day's data or refuses, never
older data); fed files that are no prefix extension of the loaded ones (a corrected last session, a back-filled
earlier one, a removed one), daily and minute bars; two refreshes and a reset at once through the CLI."""

from __future__ import annotations

import datetime as dt
import secrets
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from featurestore import FeatureStore
from refresher import replay, snapshot
from refresher.engines.local import LocalEngine
from refresher.errors import SnapshotError
from refresher.pool import pool_status, refill_pool, wait_for_pool
from refresher.profile import Profile, load_profile
from refresher.refresh import refresh
from tests.child_processes import outputs
from tests.fixtures_postgres import world_traversable_tmp
from tests.refresher.test_features_sequence import DAILY, PROFILE, write_bars
from tests.refresher.test_refresh_batches import root
from tests.refresher.test_refresh_e2e import Workspace
from tests.refresher.test_replay import FRIDAY, _contents, _loaded, _no_copy, _profile

__all__ = ["root"]  # a fixture, imported to be found
pytestmark = [pytest.mark.postgres, pytest.mark.slow]
# The first refresh's as-of: the sessions after it, one a step, stay in March (no month leaves the window).
START = dt.date(2025, 3, 6)

# The steps of a daily refresh that writes its rows again into a warm clone for its snapshot: the segments
# loaded, then the features; the clone renamed to a half-built copy (statement 1), the rows written into it, the
# copy made a template (2) and marked (3), the old copy to the trash and the new one in its place (4 and 5, one
# transaction), then the refill spawned.
STEPS = [
    "segments",
    "features",
    "statement:1",
    "applied",
    "statement:2",
    "statement:3",
    "statement:4",
    "statement:5",
    "published",
]

CHILD = textwrap.dedent(
    """
    import datetime as dt, os, signal, sys
    from pathlib import Path
    from featurestore import FeatureStore
    from refresher import _snapshot_sql, pool, refresh as refreshing, replay, snapshot
    from refresher.engines.local import LocalEngine
    from refresher.refresh import refresh
    from tests.refresher.test_replay import _profile

    root, step, as_of = Path(sys.argv[1]), sys.argv[2], dt.date.fromisoformat(sys.argv[3])
    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)
    if step == "segments":
        refreshing.refresh_features = die
    elif step == "features":
        snapshot.is_current = die
    elif step == "applied":
        apply = replay.RefreshWrites.apply
        def applied(self, conn):
            apply(self, conn)
            die()
        replay.RefreshWrites.apply = applied
    elif step == "published":
        pool.spawn_refill = die
    else:
        advance, count = snapshot.advance_pristine, [int(step.split(":")[1])]
        def after_statement():
            count[0] -= 1
            if count[0] == 0:
                die()
        def counted(*args, **kwargs):
            _snapshot_sql._after_statement = after_statement
            return advance(*args, **kwargs)
        snapshot.advance_pristine = counted
    def no_copy(*args, **kwargs):
        raise SystemExit("the daily refresh copied the database instead of replaying its rows")
    snapshot.save_pristine = no_copy
    refresh(_profile(root, as_of), LocalEngine(root / "state"), FeatureStore(root / "store"))
    """
)


def _rows(dsn: str) -> dict[str, list[tuple[object, ...]]]:
    """Every table's rows, sorted, without the load times (a cold load has its own)."""
    with psycopg.connect(dsn) as conn:
        columns: dict[str, list[str]] = {}
        for table, column in conn.execute(
            "SELECT c.table_name, c.column_name FROM information_schema.columns c JOIN pg_tables t "
            "ON t.schemaname = c.table_schema AND t.tablename = c.table_name WHERE c.table_schema = 'public' "
            "AND c.column_name <> 'loaded_at' ORDER BY c.table_name, c.ordinal_position"
        ).fetchall():
            columns.setdefault(table, []).append(column)
        return {
            table: sorted(
                conn.execute(
                    sql.SQL("SELECT {} FROM {}").format(
                        sql.SQL(", ").join(map(sql.Identifier, names)), sql.Identifier(table)
                    )
                ).fetchall(),
                key=repr,
            )
            for table, names in columns.items()
        }


def _cold_load(root: Path, profile: Profile) -> dict[str, list[tuple[object, ...]]]:
    """The rows of a load of ``profile`` into a new server of a state dir of its own."""
    engine = LocalEngine(root / f"cold-{secrets.token_hex(4)}")
    try:
        refresh(profile, engine, FeatureStore(root / "store"), pool_size=0)
        return _rows(engine.start(profile.name).dsn())
    finally:
        engine.stop(profile.name)


def _sessions_after(day: dt.date, count: int) -> list[dt.date]:
    days = []
    while len(days) < count:
        day += dt.timedelta(days=1)
        if day.weekday() < 5:
            days.append(day)
    return days


@pytest.mark.timeout(1500)
def test_kill_9_after_each_step_of_a_replayed_snapshot_then_rerun_equals_a_cold_load(root: Path) -> None:
    engine, store = LocalEngine(root / "state"), FeatureStore(root / "store")
    refresh(_profile(root, START), engine, store, pool_size=2)  # a replay needs a clone: remembered from here
    server = engine.start("daily")
    wait_for_pool(server, timeout=120)
    for step, day in zip(STEPS, _sessions_after(START, len(STEPS)), strict=True):
        done = subprocess.run(
            [sys.executable, "-c", CHILD, str(root), step, day.isoformat()], capture_output=True, timeout=300
        )
        assert done.returncode == -9, (step, done.stderr.decode()[-2000:])
        live = _contents(server.dsn())
        try:
            method = snapshot.restore_pristine(server, refill=False).method
        except SnapshotError as exc:
            assert "predates" in str(exc), (step, str(exc))
            assert step != "published", "the copy was published, yet the reset refused"
        else:
            assert step == "published", f"killed at {step}, the reset brought back the day before"
            # Restored: exactly the day's data, never the day before's.
            assert method in ("pool", "template")
            assert _contents(server.dsn()) == live, step
        report = refresh(_profile(root, day), engine, store)  # the re-run
        assert report.rows_loaded == 0, step
        after = _rows(server.dsn())
        assert after == _cold_load(root, _profile(root, day)), step
        live = _contents(server.dsn())
        assert snapshot.restore_pristine(server, refill=False).method in ("pool", "template")
        assert _contents(server.dsn()) == live, step
        refill_pool(server)  # the next day's replay needs a ready clone of this copy


def test_daily_refreshes_that_are_no_prefix_extension_equal_a_cold_load_and_their_reset(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A source that corrects the last session, back-fills an earlier one of the month, drops one, or drops the
    last one: each daily refresh reloads what changed, and what the database and its reset hold is a cold load's.
    """
    engine, store = LocalEngine(root / "state"), FeatureStore(root / "store")
    symbols = ["AAA", "BBB", "CCC"]
    for seed, symbol in enumerate(symbols):
        write_bars(root, symbol, seed)
    advance, advanced = snapshot.advance_pristine, []

    def advancing(*args: Any, **kwargs: Any) -> snapshot.SnapshotInfo | None:
        advanced.append(advance(*args, **kwargs))
        return advanced[-1]

    monkeypatch.setattr(snapshot, "advance_pristine", advancing)

    def day(as_of: dt.date, *, replayed: bool = True) -> None:
        (root / "p.yaml").write_text(PROFILE.format(symbols=", ".join(symbols), features=", ".join(DAILY)))
        profile = load_profile(str(root / "p.yaml"), [], as_of=as_of)
        advanced.clear()
        refresh(profile, engine, store, pool_size=2)  # a replay needs a clone (the default keeps none here)
        # Written again into a clone (none for the first load), and that clone equalled the database.
        assert len(advanced) == replayed and all(advanced), as_of
        server = engine.start("p")
        live = _contents(server.dsn())
        assert _rows(server.dsn()) == _cold_load(root, profile), as_of
        wait_for_pool(server, timeout=120)
        assert snapshot.restore_pristine(server, refill=False).method in ("pool", "template")
        assert _contents(server.dsn()) == live, as_of

    day(dt.date(2024, 6, 18), replayed=False)
    # One session more, and the source corrected the one before it (the last one loaded).
    write_bars(root, "AAA", 0, closes={dt.date(2024, 6, 18): 61.5})
    day(dt.date(2024, 6, 20))
    # A back-fill: an earlier session of the month corrected, beside one session more.
    write_bars(root, "BBB", 1, closes={dt.date(2024, 6, 3): 44.25})
    day(dt.date(2024, 6, 21))
    # A session removed from the middle of the month, and CCC's last one removed, as of the same day.
    write_bars(root, "AAA", 0, closes={dt.date(2024, 6, 18): 61.5}, halted=(dt.date(2024, 6, 12),))
    write_bars(root, "CCC", 2, halted=(dt.date(2024, 6, 21),))
    day(dt.date(2024, 6, 21))
    # The removed sessions come back, the month's last one corrected again.
    write_bars(root, "AAA", 0, closes={dt.date(2024, 6, 24): 70.0})
    write_bars(root, "CCC", 2)
    day(dt.date(2024, 6, 24))


def test_two_daily_refreshes_and_a_reset_at_once_through_the_cli_end_as_a_cold_load() -> None:
    """One state dir, one profile: two `refresh --as-of` of the next session and a `reset` started together
    take turns (the profile lock); the database is a cold load of the session, and a reset gives it back."""
    ws = Workspace(world_traversable_tmp("refresher-replay-"), "local", f"race_{uuid.uuid4().hex[:8]}")
    ws.write_profile(symbols=["AAPL", "KO"], months=1)
    try:
        # A replay needs a clone (the default keeps none here): remembered from here.
        ws.refresh("--as-of", "2025-03-26", "--pool-size", "2")
        server = LocalEngine(ws.root / "state").start(ws.profile)
        wait_for_pool(server, timeout=120)
        runs = [
            subprocess.Popen(ws.command(*args, "--profile", ws.profile), env=ws.env, stderr=subprocess.PIPE)
            for args in (
                ["refresh", "--as-of", "2025-03-27"],
                ["reset"],
                ["refresh", "--as-of", "2025-03-27"],
            )
        ]
        for run, (_out, err) in zip(runs, outputs(runs, timeout=600), strict=True):
            assert run.returncode == 0, err
        profile = load_profile(
            str(ws.root / "profiles" / f"{ws.profile}.yaml"), [], as_of=dt.date(2025, 3, 27)
        )
        assert _rows(server.dsn()) == _cold_load(ws.root, profile)
        live = _contents(server.dsn())
        ws.run("reset", "--profile", ws.profile)
        assert _contents(server.dsn()) == live
    finally:
        ws.down()


MINUTE_FILES = """\
universe:
  symbols: [AAPL, KO]
exchange: XNYS
start: 2024-06-01
timeframes: [1d, 1m]
features: [websocket_testing, dashboard_data]
source: {kind: files, path: data, daily: "{symbol}_1d.parquet", minute: "{symbol}_1m.parquet", allow_shrink: true}
"""


def test_minute_bars_that_are_no_prefix_extension_equal_a_cold_load_and_their_reset(root: Path) -> None:
    """The same with minute bars from files: the last minutes corrected, a minute of an earlier session
    back-filled, a whole session removed, then back."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from refresher.segments import Segment
    from refresher.sources import make_source

    reference = root / "reference.yaml"
    reference.write_text(MINUTE_FILES.split("features:")[0] + "end: 2024-06-28\n")
    source = make_source(load_profile(str(reference), []))
    june = dt.date(2024, 6, 1)
    bars = {
        (symbol, timeframe): source.fetch(Segment(symbol, timeframe, june))
        for symbol in ("AAPL", "KO")
        for timeframe in ("1d", "1m")
    }
    (root / "data").mkdir()
    engine, store = LocalEngine(root / "state"), FeatureStore(root / "store")

    def write(symbol: str, *, removed: dt.date | None = None, corrected: str | None = None) -> None:
        """The symbol's files: less the ``removed`` session, with the volume of the minute ``corrected``."""
        for timeframe in ("1d", "1m"):
            table = bars[(symbol, timeframe)]
            time = table["date" if timeframe == "1d" else "ts"]
            if removed is not None:
                table = table.filter(
                    pc.not_equal(pc.cast(time, pa.date32()), pa.scalar(removed, pa.date32()))
                )
            if corrected is not None and timeframe == "1m":
                hit = pc.equal(table["ts"], pa.scalar(dt.datetime.fromisoformat(corrected), table["ts"].type))
                assert pc.sum(hit).as_py() == 1
                volume = pc.if_else(hit, pc.add(table["volume"], 1), table["volume"])
                table = table.set_column(table.schema.get_field_index("volume"), "volume", volume)
            pq.write_table(table, root / "data" / f"{symbol}_{timeframe}.parquet")

    def day(as_of: dt.date) -> None:
        (root / "p.yaml").write_text(MINUTE_FILES)
        profile = load_profile(str(root / "p.yaml"), [], as_of=as_of)
        refresh(profile, engine, store, pool_size=2)  # a replay needs a clone (the default keeps none here)
        server = engine.start("p")
        with psycopg.connect(server.dsn()) as conn:  # the as-of's sessions, no later one
            assert conn.execute("SELECT max(ts)::date FROM ohlcv_1min").fetchone() == (as_of,)
        live = _contents(server.dsn())
        assert _rows(server.dsn()) == _cold_load(root, profile), as_of
        wait_for_pool(server, timeout=120)
        assert snapshot.restore_pristine(server, refill=False).method in ("pool", "template")
        assert _contents(server.dsn()) == live, as_of

    write("AAPL")
    write("KO")
    day(dt.date(2024, 6, 18))
    # One session more, and the last minute loaded (June 18's close, 19:59 UTC) corrected.
    write("AAPL", corrected="2024-06-18T19:59:00+00:00")
    day(dt.date(2024, 6, 20))
    # A minute of an earlier session back-filled.
    write("KO", corrected="2024-06-03T14:30:00+00:00")
    day(dt.date(2024, 6, 21))
    # A whole session removed from the middle of the month, as of the same day.
    write("AAPL", removed=dt.date(2024, 6, 12), corrected="2024-06-18T19:59:00+00:00")
    day(dt.date(2024, 6, 21))
    # And back, a session later.
    write("AAPL")
    day(dt.date(2024, 6, 24))


def test_a_session_left_on_the_pool_clones_does_not_fail_the_daily_refresh(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database browser connects to every database, the warm clones among them: the clone the replay takes is
    renamed all the same (its sessions end, as a reset ends them), and the advanced copy equals the database.
    Never a copy in its place (``_no_copy``): a replay that gave up fell back to one, still 'saved'."""
    engine, store, server = _loaded(root)
    clones = pool_status(server).ready
    assert clones
    monkeypatch.setattr(snapshot, "save_pristine", _no_copy)
    browsers = [psycopg.connect(server.dsn(name), autocommit=True) for name in clones]
    try:
        report = refresh(_profile(root, FRIDAY), engine, store)
    finally:
        for browser in browsers:
            browser.close()
    assert report.snapshot == "saved"
    live = _contents(server.dsn())
    assert snapshot.restore_pristine(server, refill=False).method in ("pool", "template")
    assert _contents(server.dsn()) == live


def test_a_session_connecting_to_the_copy_being_written_does_not_fail_the_daily_refresh(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database browser that lists the databases while the rows are written again into the clone connects to
    it too: the copy is still published (its sessions end when it becomes the template), not a failed refresh."""
    engine, store, server = _loaded(root)
    apply, browsers = replay.RefreshWrites.apply, []

    def browsed(self: replay.RefreshWrites, conn: psycopg.Connection[Any]) -> None:
        apply(self, conn)
        browsers.append(psycopg.connect(server.dsn(conn.info.dbname), autocommit=True))

    monkeypatch.setattr(replay.RefreshWrites, "apply", browsed)
    monkeypatch.setattr(snapshot, "save_pristine", _no_copy)
    try:
        assert refresh(_profile(root, FRIDAY), engine, store).snapshot == "saved"
    finally:
        for browser in browsers:
            browser.close()
    assert browsers and snapshot.is_current(server)
    live = _contents(server.dsn())
    assert snapshot.restore_pristine(server, refill=False).method in ("pool", "template")
    assert _contents(server.dsn()) == live
