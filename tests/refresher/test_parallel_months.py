"""Two loaders fill two new month partitions at once (``refresher.partitions``' lock order): one does not wait
for the other's fill, neither deadlocks, a kill -9 mid-way resumes exactly, and a failed month rolls back alone."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from typing import Any

import psycopg
import pytest

from refresher import partitions
from refresher.database import count_rows, ensure_schema, read_loaded_segments
from refresher.engines.base import ServerInfo
from refresher.errors import LoadError
from refresher.jobs.retry import is_transient
from refresher.load import SEGMENT_LOCK_WAIT, SegmentLoad, copy_arrow, delete_segment, load_segments
from refresher.segments import Segment
from tests.fixtures_postgres import minute_bars, world_traversable_tmp
from tests.refresher.test_load_batch import held_in_a_copy, short_wait
from tests.refresher.test_refresh_e2e import Workspace
from tests.refresher.test_refresh_e2e import workspace as workspace  # the fixture: each engine

__all__ = ["short_wait", "workspace"]  # the fixtures

pytestmark = pytest.mark.postgres
NY = "America/New_York"
JAN, FEB, MAR = dt.date(2024, 1, 1), dt.date(2024, 2, 1), dt.date(2024, 3, 1)
OPEN = {
    JAN: dt.datetime(2024, 1, 2, 14, 30, tzinfo=dt.UTC),
    FEB: dt.datetime(2024, 2, 1, 14, 30, tzinfo=dt.UTC),
    MAR: dt.datetime(2024, 3, 1, 14, 30, tzinfo=dt.UTC),
}
# The tables named like partitions that are not attached: a fill whose transaction was lost would leave one.
STRAY = (
    "SELECT count(*) FROM pg_class c WHERE c.relname ~ '^ohlcv_1min_[0-9]{4}_[0-9]{2}$' AND c.relkind = 'r' "
    "AND NOT EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhrelid = c.oid)"
)


@pytest.fixture
def dsn(pg_database: ServerInfo) -> str:
    with psycopg.connect(pg_database.dsn(), autocommit=True) as conn:
        ensure_schema(conn)
    return pg_database.dsn()


def _month(month: dt.date, symbols: list[str], n: int = 2_000, *, seed: int = 0) -> list[SegmentLoad]:
    return [
        SegmentLoad(Segment(s, "1m", month), minute_bars(s, OPEN[month], n, seed=seed + k), f"h{seed}", NY)
        for k, s in enumerate(symbols)
    ]


def test_a_second_month_is_made_while_the_first_is_still_filling(dsn: str) -> None:
    """The point: the fill (COPY FREEZE and the key build) runs without the creators' lock, so another loader
    makes, fills, attaches and commits its month meanwhile. With the lock taken before the fill (as before),
    February's load would wait for January's commit, and this test would time out."""
    jan = _month(JAN, ["AAPL", "MSFT"])
    data = jan[0].table.combine_chunks()
    with psycopg.connect(dsn, autocommit=True) as first, first.transaction():
        months = partitions.lock_new_months(first, "ohlcv_1min", data, wait=SEGMENT_LOCK_WAIT)
        assert months == [JAN]
        fill = partitions.fill_new_months(first, "ohlcv_1min", data.schema.names, data, copy_arrow, months)
        done = threading.Event()

        def second() -> None:
            with psycopg.connect(dsn, autocommit=True) as conn:
                load_segments(conn, _month(FEB, ["AAPL", "MSFT"]))
            done.set()

        thread = threading.Thread(target=second, daemon=True)
        thread.start()
        assert done.wait(timeout=60), "February waited for January's fill"
        thread.join()
        partitions.lock_creators(first, wait=SEGMENT_LOCK_WAIT)  # then January ends as a load does
        assert partitions.attach_and_copy(first, fill, copy_arrow) == [JAN]
    with psycopg.connect(dsn) as conn:
        assert partitions.existing_months(conn, "ohlcv_1min") == {JAN, FEB}
        assert conn.execute(STRAY).fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM ohlcv_1min").fetchone() == (6_000,)


def test_a_loader_stopped_filling_a_new_month_holds_no_other_loader_of_it_up(
    dsn: str, short_wait: float
) -> None:
    """A loader stopped in the COPY FREEZE that fills a new month (SIGSTOP, a suspended machine) held the month's
    lock for as long as it stayed stopped, and a loader of other symbols in that month waited on it for ever in
    ``lock_new_months``. Past the wait the session, stalled in a COPY that read nothing all along, is ended: the
    other loader makes the month; the stopped one commits nothing."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET lock_timeout = '30s'")  # before: the load waited here for ever
        with held_in_a_copy(dsn, _month(JAN, ["AAPL"])) as (_, failed):
            load_segments(conn, _month(JAN, ["MSFT"]))
        assert len(failed) == 1 and isinstance(failed[0].__cause__, psycopg.OperationalError), failed
        assert partitions.existing_months(conn, "ohlcv_1min") == {JAN}
        assert conn.execute("SELECT DISTINCT symbol FROM ohlcv_1min").fetchall() == [("MSFT",)]
        assert conn.execute(STRAY).fetchone() == (0,)


def test_a_loader_stopped_after_attaching_its_month_holds_no_other_creator_up(
    dsn: str, short_wait: float
) -> None:
    """A loader stopped in its COPY after it attached a new month (the rows of an existing month going through
    the parent) held the creators' lock for as long as it stayed stopped, and a loader that filled another new
    month waited on it for ever in ``lock_creators``. Past the wait that session is ended; a live one (the other
    loader of the same refresh) is waited for, as before, and both commit."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        load_segments(conn, _month(FEB, ["ZZZ"]))
        conn.execute("SET lock_timeout = '30s'")  # before: the load waited here for ever
        # Its second COPY: January filled and attached, then February's rows through the parent.
        holder = [*_month(JAN, ["AAPL"]), *_month(FEB, ["AAPL"])]
        with held_in_a_copy(dsn, holder, live=2.0, at=2) as (_, failed):
            load_segments(conn, _month(MAR, ["MSFT"]))
        assert not failed, failed
        assert partitions.existing_months(conn, "ohlcv_1min") == {JAN, FEB, MAR}
        for month in ("01", "03"):  # both loads again, as the first time
            conn.execute(f"DROP TABLE ohlcv_1min_2024_{month}")
        conn.execute("DELETE FROM ohlcv_1min WHERE symbol <> 'ZZZ'")
        conn.execute("DELETE FROM refresher_segments WHERE symbol <> 'ZZZ'")
        with held_in_a_copy(dsn, holder, at=2) as (_, failed):
            load_segments(conn, _month(MAR, ["MSFT"]))
        assert len(failed) == 1 and isinstance(failed[0].__cause__, psycopg.OperationalError), failed
        assert partitions.existing_months(conn, "ohlcv_1min") == {FEB, MAR}
        assert conn.execute(STRAY).fetchone() == (0,)
        assert conn.execute("SELECT DISTINCT symbol FROM ohlcv_1min ORDER BY 1").fetchall() == [
            ("MSFT",),
            ("ZZZ",),
        ]


def test_a_loader_stopped_in_a_copy_that_reached_the_default_partition_holds_no_creator_up(
    dsn: str, short_wait: float
) -> None:
    """A loader of an existing month (January) whose DELETE reached the default partition (its segment's range runs
    into February, which had no partition), stopped in its COPY, held a lock on the default for as long as it
    stayed stopped, and a loader making February waited on it for ever in its ATTACH (ACCESS EXCLUSIVE on the
    default). Past the wait that session, its COPY having read nothing all along, is ended; a live one is waited
    for, and both commit."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        load_segments(conn, _month(JAN, ["ZZZ"]))
        conn.execute("SET lock_timeout = '30s'")  # before: the ATTACH waited here for ever
        with held_in_a_copy(dsn, _month(JAN, ["AAPL"]), live=2.0) as (_, failed):
            load_segments(conn, _month(FEB, ["MSFT"]))
        assert not failed, failed
        assert partitions.existing_months(conn, "ohlcv_1min") == {JAN, FEB}
        conn.execute("DROP TABLE ohlcv_1min_2024_02")  # both load again, as the first time
        conn.execute("DELETE FROM ohlcv_1min WHERE symbol <> 'ZZZ'")
        conn.execute("DELETE FROM refresher_segments WHERE symbol <> 'ZZZ'")
        with held_in_a_copy(dsn, _month(JAN, ["AAPL"])) as (_, failed):
            load_segments(conn, _month(FEB, ["MSFT"]))
        assert len(failed) == 1 and isinstance(failed[0].__cause__, psycopg.OperationalError), failed
        assert partitions.existing_months(conn, "ohlcv_1min") == {JAN, FEB}
        assert conn.execute(STRAY).fetchone() == (0,)
        assert conn.execute("SELECT DISTINCT symbol FROM ohlcv_1min ORDER BY 1").fetchall() == [
            ("MSFT",),
            ("ZZZ",),
        ]


@pytest.mark.parametrize("waiter", ["load", "prune"])
def test_a_creator_stopped_after_its_attach_holds_no_delete_reaching_the_default_partition_up(
    dsn: str, short_wait: float, waiter: str
) -> None:
    """A loader stopped in its COPY after it attached a new month held ACCESS EXCLUSIVE on the default partition
    for as long as it stayed stopped, and a DELETE of an existing month (February) that reached the default (its
    range runs into March, which had no partition) waited on it for ever: another load's, which makes no month
    and so takes no creators' lock, or a prune's. Past the wait that session is ended, and the other goes on; a
    live one is waited for."""
    msft = _month(FEB, ["MSFT"])
    left = [("MSFT",), ("ZZZ",)] if waiter == "load" else [("ZZZ",)]
    with psycopg.connect(dsn, autocommit=True) as conn:

        def behind() -> None:
            if waiter == "load":
                load_segments(conn, msft)
            else:
                delete_segment(conn, msft[0].segment, tz=NY)

        load_segments(conn, [*_month(FEB, ["ZZZ"]), *msft])
        conn.execute("SET lock_timeout = '30s'")  # before: the DELETE waited here for ever
        # Its second COPY: January filled and attached, then February's rows through the parent.
        holder = [*_month(JAN, ["AAPL"]), *_month(FEB, ["AAPL"])]
        with held_in_a_copy(dsn, holder, live=2.0, at=2) as (_, failed):
            behind()
        assert not failed, failed
        assert partitions.existing_months(conn, "ohlcv_1min") == {JAN, FEB}
        conn.execute("DROP TABLE ohlcv_1min_2024_01")  # as before the holder's load
        conn.execute("DELETE FROM ohlcv_1min WHERE symbol = 'AAPL'")
        conn.execute("DELETE FROM refresher_segments WHERE symbol = 'AAPL'")
        load_segments(conn, msft)
        with held_in_a_copy(dsn, holder, at=2) as (_, failed):
            behind()
        assert len(failed) == 1 and isinstance(failed[0].__cause__, psycopg.OperationalError), failed
        assert partitions.existing_months(conn, "ohlcv_1min") == {FEB}
        assert conn.execute(STRAY).fetchone() == (0,)
        assert conn.execute("SELECT DISTINCT symbol FROM ohlcv_1min ORDER BY 1").fetchall() == left


def test_a_session_idle_holding_the_default_partition_fails_a_creator_in_one_line_naming_it(
    dsn: str, short_wait: float
) -> None:
    """A session idle inside its transaction with a lock on the default partition (a loader stopped between two
    statements, a reader left open by hand) is no COPY to end: a load that makes a month waits its wait, then
    fails in one line naming that session, a lock timeout (a worker tries it again), where it waited for ever."""
    with psycopg.connect(dsn, autocommit=True) as conn, psycopg.connect(dsn) as holder:
        conn.execute("SET lock_timeout = '30s'")  # before: the ATTACH waited here for ever
        holder.execute("SELECT count(*) FROM ohlcv_1min_default")
        with pytest.raises(
            LoadError, match=r"held its default partition ohlcv_1min_default for over 0.5 s"
        ) as caught:
            load_segments(conn, _month(JAN, ["MSFT"]))
        said = str(caught.value)
        assert f"(pid {holder.info.backend_pid} (" in said and "idle in transaction" in said, said
        assert "\n" not in said and is_transient(caught.value)
        assert partitions.existing_months(conn, "ohlcv_1min") == set()
        assert conn.execute(STRAY).fetchone() == (0,)


def test_a_verify_beside_a_creator_stopped_after_its_attach_ends_it_and_counts(
    dsn: str, short_wait: float
) -> None:
    """``--verify``'s count reads through the parent, whose plan locks the default partition: beside a loader
    stopped in its COPY after it attached a new month (ACCESS EXCLUSIVE on the default until it commits) it
    waited for as long as that loader stayed stopped: for ever. Past the wait that session is ended and the
    count goes on; a live one is waited for, and its rows are counted."""
    zzz, aapl = Segment("ZZZ", "1m", FEB), Segment("AAPL", "1m", JAN)
    with psycopg.connect(dsn, autocommit=True) as conn:
        load_segments(conn, _month(FEB, ["ZZZ"]))
        conn.execute("SET lock_timeout = '30s'")  # before: the count waited here for ever
        # Its second COPY: January filled and attached, then February's rows through the parent.
        holder = [*_month(JAN, ["AAPL"]), *_month(FEB, ["AAPL"])]
        with held_in_a_copy(dsn, holder, live=2.0, at=2) as (_, failed):
            counts = count_rows(conn, [zzz, aapl], timezones=NY, wait=short_wait)
        assert not failed, failed
        assert counts[aapl] == read_loaded_segments(conn)[aapl].rows > 0
        conn.execute("DROP TABLE ohlcv_1min_2024_01")  # as before the holder's load
        conn.execute("DELETE FROM ohlcv_1min WHERE symbol = 'AAPL'")
        conn.execute("DELETE FROM refresher_segments WHERE symbol = 'AAPL'")
        with held_in_a_copy(dsn, holder, at=2) as (_, failed):
            counts = count_rows(conn, [zzz, aapl], timezones=NY, wait=short_wait)
        assert len(failed) == 1 and isinstance(failed[0].__cause__, psycopg.OperationalError), failed
        assert counts == {zzz: read_loaded_segments(conn)[zzz].rows, aapl: 0}
        assert partitions.existing_months(conn, "ohlcv_1min") == {FEB}


def test_a_verify_beside_a_session_idle_after_its_attach_fails_in_one_line_naming_it(
    dsn: str, short_wait: float
) -> None:
    """A session idle inside its transaction after an ATTACH PARTITION (a loader stopped between two statements,
    an ATTACH typed by hand) is no COPY to end: ``--verify``'s count waits its wait, then fails in one line naming
    that session, where it waited for ever."""
    with psycopg.connect(dsn, autocommit=True) as conn, psycopg.connect(dsn) as holder:
        load_segments(conn, _month(FEB, ["ZZZ"]))
        conn.execute("SET lock_timeout = '30s'")  # before: the count waited here for ever
        holder.execute(_ATTACH_JANUARY)
        with pytest.raises(
            LoadError, match=r"held its default partition ohlcv_1min_default for over 0.5 s"
        ) as caught:
            count_rows(conn, [Segment("ZZZ", "1m", FEB)], timezones=NY, wait=short_wait)
        said = str(caught.value)
        assert f"(pid {holder.info.backend_pid} (" in said and "idle in transaction" in said, said
        assert "\n" not in said and is_transient(caught.value)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE  # nothing left open
        holder.rollback()
        assert count_rows(conn, [Segment("ZZZ", "1m", FEB)], timezones=NY, wait=short_wait)


# A new month made and attached by hand, its transaction left open.
_ATTACH_JANUARY = """
CREATE TABLE ohlcv_1min_2024_01 (LIKE ohlcv_1min);
ALTER TABLE ohlcv_1min ATTACH PARTITION ohlcv_1min_2024_01 FOR VALUES FROM ('2024-01-01Z') TO ('2024-02-01Z')
"""
# A loader that attached a month and stopped (SIGSTOP) before its commit: its transaction open, its pid printed.
_STOPPED_AFTER_ATTACH = f"""
import os, signal, sys
import psycopg
conn = psycopg.connect(sys.argv[1])
conn.execute({_ATTACH_JANUARY!r})
print(conn.info.backend_pid, flush=True)
os.kill(os.getpid(), signal.SIGSTOP)
"""


@pytest.mark.slow
def test_plan_and_refresh_verify_beside_a_stopped_creator_fail_in_one_line_naming_it() -> None:
    """Through the real CLI and a real server: a process stopped (SIGSTOP) after its ATTACH, before its commit,
    held ``refresher plan --verify`` and ``refresher refresh --verify`` for as long as it stayed stopped. Each now
    fails after the wait (10 s) in one line naming that session, exit 2, no traceback; without --verify neither
    reads through the parent, and after the stopped process goes both pass."""
    ws = Workspace(world_traversable_tmp("refresher-months-"), "local", f"pm_{uuid.uuid4().hex[:8]}")
    stopped: subprocess.Popen[str] | None = None
    try:
        ws.write_profile(symbols=["AAPL"], months=1)
        ws.refresh()
        stopped = subprocess.Popen(
            [sys.executable, "-c", _STOPPED_AFTER_ATTACH, ws.dsn()], stdout=subprocess.PIPE, text=True
        )
        assert stopped.stdout is not None
        pid = int(stopped.stdout.readline())
        for command in ("plan", "refresh"):
            done = subprocess.run(
                ws.command(command, "--profile", ws.profile, "--verify"),
                env=ws.env,
                capture_output=True,
                text=True,
                timeout=120,  # before: killed here
            )
            assert done.returncode == 2, done.stderr
            line = done.stderr.strip().splitlines()[-1]
            assert line.startswith("refresher: ohlcv_1min: another load held its default partition"), line
            assert f"(pid {pid} (" in line and "idle in transaction" in line, line
            assert "Traceback" not in done.stderr, done.stderr
        ws.run("plan", "--profile", ws.profile)
        stopped.kill()
        stopped.wait()
        assert (
            json.loads(ws.run("plan", "--profile", ws.profile, "--verify", "--json").stdout)["to_load"] == []
        )
        assert ws.refresh("--verify")["segments"]["loaded"] == 0
    finally:
        if stopped is not None:
            stopped.kill()
            stopped.wait()
            assert stopped.stdout is not None
            stopped.stdout.close()
        ws.down()


def test_two_loaders_over_the_same_months_in_opposite_orders_never_deadlock(dsn: str) -> None:
    """New months, reloads of existing ones and the default partition, two connections at once, each in its
    own order: every load commits (a deadlock would fail one), and the end is what one loader would leave."""
    with psycopg.connect(dsn, autocommit=True) as conn:  # a row by hand: March's rows stay in the default
        conn.execute("INSERT INTO ohlcv_1min VALUES ('ZZZ', '2024-03-20 15:00+00', 1, 1, 1, 1, 1)")
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def loader(months: list[dt.date], symbols: list[str]) -> None:
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                start.wait()
                for round_ in range(3):
                    for month in months:
                        load_segments(conn, _month(month, symbols, 3_000, seed=round_))
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=loader, args=([JAN, FEB, MAR], ["AAPL", "MSFT"])),
        threading.Thread(target=loader, args=([MAR, FEB, JAN], ["KO", "NVDA"])),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    with psycopg.connect(dsn) as conn:
        assert partitions.existing_months(conn, "ohlcv_1min") == {JAN, FEB}
        assert conn.execute(STRAY).fetchone() == (0,)
        ledger = read_loaded_segments(conn)
        assert len(ledger) == 12
        counts = count_rows(conn, list(ledger), timezones=NY, wait=SEGMENT_LOCK_WAIT)
        assert set(counts.values()) == {3_000}


def _two_copies_at_once(dsn: str, proc: subprocess.Popen[Any], deadline: float) -> bool:
    """Wait until two backends fill a new partition at the same moment."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        while time.monotonic() < deadline and proc.poll() is None:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND query LIKE 'COPY%%FREEZE%%' AND state = 'active'"
            ).fetchone()
            if row and row[0] >= 2:
                return True
            time.sleep(0.005)
    return False


@pytest.mark.slow
def test_kill_9_while_two_months_fill_at_once_then_rerun_equals_a_clean_load(workspace: Workspace) -> None:
    many = [f"S{i:03d}" for i in range(40)]
    # The clean load first: it fills the store, so the victim's loads are fed as fast as they run and both
    # loaders are soon filling a month each.
    clean = workspace.write_profile(f"{workspace.profile}_clean", symbols=many, months=4)
    workspace.refresh(profile=clean)
    victim = workspace.write_profile(symbols=many, months=1)  # the server and its DSN exist before the kill
    first = workspace.refresh(profile=victim)["segments"]["loaded"]
    dsn = workspace.dsn(victim)
    workspace.write_profile(victim, symbols=many, months=4)

    proc = subprocess.Popen(
        workspace.command("refresh", "--profile", victim),
        env=workspace.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        both = _two_copies_at_once(dsn, proc, time.monotonic() + 300)
        if both:
            os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=120)
    assert both and proc.returncode == -signal.SIGKILL, "the refresh never filled two months at once"
    with psycopg.connect(dsn, autocommit=True) as conn:
        deadline = time.monotonic() + 30
        while conn.execute(  # the server ends the killed client's backends (and rolls their months back)
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> "
            "pg_backend_pid() AND backend_type = 'client backend'"
        ).fetchone() != (0,):
            assert time.monotonic() < deadline, "the server kept the killed refresh's transactions"
            time.sleep(0.05)
        assert conn.execute(STRAY).fetchone() == (0,)
        loaded = conn.execute("SELECT count(*) FROM refresher_segments").fetchone()[0]
    total = len(many) * 4 * 2
    assert first <= loaded < total

    resumed = workspace.refresh(profile=victim)
    assert resumed["segments"]["present"] >= loaded  # nothing committed before the kill was redone
    assert resumed["segments"]["loaded"] + resumed["segments"]["present"] == total
    assert workspace.checksums(victim) == workspace.checksums(clean)
    assert workspace.scalar("SELECT count(*) FROM refresher_segments", victim) == total


# A refresh whose source gives one symbol's December minutes a duplicated bar: the key build of December's new
# partition fails in whichever loader took it.
_DUPLICATE_ONE_MONTH = """
import sys
import pyarrow as pa
from refresher.sources import synthetic

fetch_many = synthetic.SyntheticSource.fetch_many

def duplicating(self, segments):
    tables = fetch_many(self, segments)
    return [
        pa.concat_tables([t, t.slice(0, 1)]) if (s.symbol, s.timeframe, s.month.month) == ("S003", "1m", 12)
        else t
        for s, t in zip(segments, tables)
    ]

synthetic.SyntheticSource.fetch_many = duplicating
from refresher.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_month_that_fails_to_load_rolls_back_alone_and_the_refresh_fails_in_one_line() -> None:
    ws = Workspace(world_traversable_tmp("refresher-months-"), "local", f"pm_{uuid.uuid4().hex[:8]}")
    try:
        many = [f"S{i:03d}" for i in range(20)]
        ws.write_profile(symbols=many, months=4)
        args = [*ws.command("refresh", "--profile", ws.profile)[3:]]
        done = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(_DUPLICATE_ONE_MONTH), *args],
            env=ws.env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 2, done.stderr
        *progress, line = done.stderr.strip().splitlines()
        assert all(p.startswith("refresher: load ") for p in progress)  # progress lines, then the error
        assert line.startswith("refresher: S000/1m/2024-12 ") and "loading failed" in line and "S003" in line
        with psycopg.connect(ws.dsn(), autocommit=True) as conn:
            assert conn.execute("SELECT to_regclass('ohlcv_1min_2024_12')").fetchone() == (None,)
            assert conn.execute(STRAY).fetchone() == (0,)
            months = {
                month
                for (month,) in conn.execute(
                    "SELECT DISTINCT month FROM refresher_segments WHERE timeframe = '1m'"
                )
            }
            assert dt.date(2024, 12, 1) not in months
            ledger = read_loaded_segments(conn)
            minutes = [s for s in ledger if s.timeframe == "1m"]
            # every month that committed did so whole: all its segments, each with its rows
            for month in months:
                assert len([s for s in minutes if s.month == month]) == len(many)
            counts = count_rows(conn, minutes, timezones=NY, wait=SEGMENT_LOCK_WAIT)
            assert all(counts[s] == ledger[s].rows for s in minutes)
        # the source fixed (and a store without the bad table): the re-run loads what is missing and ends as a
        # clean load does
        fixed = {**ws.env, "FEATURE_STORE_PATH": str(ws.root / "store-fixed")}
        clean = ws.write_profile(f"{ws.profile}_clean", symbols=many, months=4)
        for name in (ws.profile, clean):
            again = subprocess.run(
                ws.command("refresh", "--profile", name),
                env=fixed,
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert again.returncode == 0, again.stderr
        assert ws.checksums() == ws.checksums(clean)
    finally:
        ws.down()
