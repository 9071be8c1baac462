"""The analysis of a database handed out from a pristine copy not analyzed yet is durable: the handout records it
on the database in the same transaction as its rename, and whoever comes next finishes it after a kill -9 of the
analyzer anywhere (before or after any ANALYZE, before the record is cleared) or of the reset; two finishers at
once neither fail nor analyze a table twice. On a real server."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import psycopg
import pytest

from refresher import pool, snapshot
from refresher._planner_stats import PENDING_SETTING, recorded
from refresher._snapshot_sql import REFILL, _advisory, _pristine_mark
from refresher.engines.base import ServerInfo
from refresher.pool import checkout_clone, drop_clone, refill_pool
from refresher.snapshot import restore_pristine, save_pristine
from tests.refresher.test_planner_stats import _stale, _stats
from tests.refresher.test_planner_stats_window import (
    _analyzed_everywhere,
    _change_within_the_last_page,
    _eventually,
    _max_close,
)
from tests.refresher.test_snapshot_crash import _databases, _killed_after

pytestmark = pytest.mark.postgres

# The detached analyzer of one handed-out database (``spawn_refill(..., fill=False)``), in a child that SIGKILLs
# itself right before or right after (inside its transaction) its N-th ANALYZE or record update: odd N before
# statement (N + 1) / 2, even N after it.
_ANALYZER = """
import json, os, signal, sys
import psycopg
from refresher import pool
from refresher.engines.base import ServerInfo
server = ServerInfo(**json.loads(sys.stdin.read()))
step, name, count = int(sys.argv[1]), sys.argv[2], 0
def tick():
    global count
    count += 1
    if count == step:
        os.kill(os.getpid(), signal.SIGKILL)
_execute = psycopg.Connection.execute
def execute(self, query, *args, **kwargs):
    text = query if isinstance(query, str) else query.as_string(self)
    hooked = text.startswith(("ANALYZE", "ALTER DATABASE"))
    if hooked:
        tick()
    cursor = _execute(self, query, *args, **kwargs)
    if hooked:
        tick()
    return cursor
psycopg.Connection.execute = execute
pool.main(["refill", "--dsn", server.dsn("postgres"), "--database", server.dbname, "--analyze", name, "--no-fill"])
"""


def _analyzer_killed_at(server: ServerInfo, step: int, name: str) -> bool:
    """True when the analyzer of ``name`` finished before its ``step``-th kill point; False when it was killed."""
    done = subprocess.run(
        [sys.executable, "-c", _ANALYZER, str(step), name],
        input=json.dumps(asdict(server)),
        text=True,
        capture_output=True,
        timeout=120,
    )
    assert done.returncode in (0, -signal.SIGKILL), done
    return done.returncode == 0


def _out_of_date(server: ServerInfo, close: float) -> None:
    """Make the working database's statistics out of date two ways: every minute bar rewritten (its partition
    grows: the catalog of a copy tells), and a new greatest daily ``close`` within the table's last page (only
    the working database's counters tell, and the pristine copy's mark records them)."""
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        conn.execute("UPDATE ohlcv_1min_2024_01 SET volume = volume + 1")
    _change_within_the_last_page(server, close)


def _records(server: ServerInfo) -> dict[str, tuple[str, ...]]:
    with psycopg.connect(server.dsn("postgres"), autocommit=True) as conn:
        return recorded(conn)


def _analyzed(server: ServerInfo, name: str, close: float) -> None:
    dsn = server.dsn(name)
    assert _stale(dsn) == [], name
    assert _max_close(dsn) == close, name
    assert {"symbol", "ts"} <= _stats(dsn, "ohlcv_1min_2024_01")
    assert {"symbol", "date"} <= _stats(dsn, "ohlcv_daily")
    assert name not in _records(server)


def _analyze_counts(server: ServerInfo, name: str) -> dict[str, int]:
    """How many times each loaded table of ``name`` was analyzed (its counters start at zero with the copy)."""
    with psycopg.connect(server.dsn(name)) as conn:
        rows = conn.execute(
            "SELECT relname, analyze_count FROM pg_stat_user_tables WHERE relname IN "
            "('symbols', 'ohlcv_daily', 'ohlcv_1min_2024_01')"
        ).fetchall()
    return {str(table): int(count) for table, count in rows}


def _no_analysis(handed: pool.HandedOut) -> None:
    """A checkout's ``analyze`` that drops it: as if the process to analyze it died before it began."""


def test_a_handout_records_its_analysis_with_the_rename_and_one_from_an_analyzed_copy_none(
    bars: ServerInfo,
) -> None:
    # The month out of date whatever autovacuum did since the load (its 60 s naptime passes on a loaded CI
    # machine: the partition was analyzed and left out of the pending list, its parent not)
    with psycopg.connect(bars.dsn(), autocommit=True) as conn:
        conn.execute("UPDATE ohlcv_1min_2024_01 SET volume = volume + 1")
    save_pristine(bars, pool_size=1, fill_pool=False)
    with psycopg.connect(bars.dsn("postgres"), autocommit=True) as conn:
        mark = _pristine_mark(conn, bars.dbname)
        pool._make_clone(conn, bars.dbname, 0)  # a ready clone of the copy not analyzed
    assert mark is not None and not mark.analyzed and "ohlcv_1min_2024_01" in mark.pending
    names = [f"{bars.dbname}_t{n}" for n in range(2)]
    try:
        checkout_clone(bars, names[0], refill=False, analyze=_no_analysis)  # the clone, renamed
        checkout_clone(bars, names[1], refill=False, analyze=_no_analysis)  # a new copy
        records = _records(bars)
        assert {name: set(records[name]) for name in names} == {name: set(mark.pending) for name in names}
        with psycopg.connect(bars.dsn(names[0])) as conn:  # what a session on it sees, and nothing else
            assert conn.execute(f"SHOW {PENDING_SETTING}").fetchone() == (",".join(sorted(mark.pending)),)
    finally:
        for name in names:
            drop_clone(bars, name)
    refill_pool(bars)  # analyzes the pristine copy
    assert not any(name.startswith(bars.dbname) for name in _records(bars))
    try:
        checkout_clone(bars, names[0], refill=False, analyze=_no_analysis)
        assert names[0] not in _records(bars)
    finally:
        drop_clone(bars, names[0])


def _steps_until_finished(server: ServerInfo, base: float, attempt: Callable[[int, float], bool]) -> int:
    """Call ``attempt(step, close)`` for steps 1, 2, ... until it says its run finished (was not killed); before
    each, the working database made out of date (``close`` its new greatest daily close) and copied as the
    pristine copy, not analyzed, as a refresh leaves them. Returns the number of steps."""
    _analyzed_everywhere(server)
    step, finished = 0, False
    while not finished:
        step += 1
        assert step < 40, "it never finished"
        close = base + step
        _out_of_date(server, close)
        save_pristine(server, pool_size=0, fill_pool=False)
        finished = attempt(step, close)
    return step


def test_kill_9_anywhere_in_the_analysis_of_a_checkout_then_the_next_refill_finishes_it(
    bars: ServerInfo,
) -> None:
    name = f"{bars.dbname}_t"

    def attempt(step: int, close: float) -> bool:
        try:
            checkout_clone(bars, name, refill=False, analyze=_no_analysis)
            assert name in _records(bars)
            finished = _analyzer_killed_at(bars, step, name)
            refill_pool(bars)  # the next command's refill
            _analyzed(bars, name, close)
        finally:
            drop_clone(bars, name)
        return finished

    # The kills landed before and after each of several ANALYZEs and record updates.
    assert _steps_until_finished(bars, 1000.0, attempt) > 8


@pytest.mark.parametrize("analyzed_meanwhile", [False, True])
def test_kill_9_anywhere_in_a_reset_from_a_copy_not_analyzed_then_the_next_refill_analyzes_it(
    bars: ServerInfo, analyzed_meanwhile: bool
) -> None:
    """``analyzed_meanwhile``: the pristine copy's analysis finished after the kill by a refill that started
    before the reset (its mark then says analyzed: the next refill adds nothing for the working database), as when
    a reset's copy and a refresh's refill overlap."""
    db = bars.dbname

    def attempt(step: int, close: float) -> bool:
        finished = _killed_after(bars, step, "snapshot.restore_pristine(server, refill=False)")
        if analyzed_meanwhile:
            with (
                psycopg.connect(bars.dsn("postgres"), autocommit=True) as conn,
                _advisory(conn, db, REFILL, shared=True),
            ):
                pool._analyze_pristine(conn, bars.dsn("postgres"), db, False)
        if db not in _databases(bars):  # killed between the reset's renames: the next reset puts it back
            restore_pristine(bars, refill=False)
        refill_pool(bars)
        # The reset's own detached analyzer may be finishing it meanwhile (the refill then leaves it to it).
        _eventually(lambda: db not in _records(bars) and _stale(bars.dsn()) == [], f"step {step}")
        _analyzed(bars, db, close)
        return finished

    assert _steps_until_finished(bars, 2000.0, attempt) > 3


def test_two_finishers_at_once_neither_fail_nor_analyze_a_table_twice(bars: ServerInfo) -> None:
    save_pristine(bars, pool_size=0, fill_pool=False)
    name = f"{bars.dbname}_t"
    checkout_clone(bars, name, refill=False, analyze=_no_analysis)
    handed = pool.HandedOut(name, ())
    try:
        # A finisher holding the database: another one leaves it to it, at once, and the record stays.
        with psycopg.connect(bars.dsn(name), autocommit=True) as holder:
            holder.execute("SELECT pg_advisory_lock(hashtext(%s))", (PENDING_SETTING,))
            pool.analyze_handed_out(bars, handed)
            assert name in _records(bars)
        both = [threading.Thread(target=pool.analyze_handed_out, args=(bars, handed)) for _ in range(2)]
        for thread in both:
            thread.start()
        for thread in both:
            thread.join(120)
        assert name not in _records(bars)
        assert _stale(bars.dsn(name)) == []
        # The finishers' sessions report their counts as they exit.
        _eventually(lambda: _analyze_counts(bars, name)["ohlcv_daily"] > 0, "no analysis was counted")
        counts = _analyze_counts(bars, name)
        assert counts["ohlcv_1min_2024_01"] == 1 and max(counts.values()) == 1, counts
    finally:
        drop_clone(bars, name)


@pytest.mark.parametrize("fill_pool", [True, False])
def test_a_snapshot_of_a_database_whose_recorded_analysis_is_unfinished_analyzes_what_the_record_names(
    bars: ServerInfo, fill_pool: bool
) -> None:
    """The record is never copied: a snapshot of the database must take over what it names, or the copy is
    marked analyzed with the old statistics, and so is every reset and clone after it."""
    _analyzed_everywhere(bars)
    _out_of_date(bars, 3000.0)
    save_pristine(bars, pool_size=0, fill_pool=False)
    # A reset from the copy not analyzed, its analyzer killed before it began: the record alone says what to do.
    with psycopg.connect(bars.dsn("postgres"), autocommit=True) as conn:
        snapshot._restore_checked(conn, bars.dbname, None, None)
    assert "ohlcv_daily" in _records(bars)[bars.dbname]
    # A refresh copying the database, before the finisher.
    save_pristine(bars, pool_size=1, fill_pool=fill_pool)
    refill_pool(bars)
    restore_pristine(bars, refill=False)
    _eventually(lambda: bars.dbname not in _records(bars), "the reset's analysis never finished")
    assert _max_close(bars.dsn()) == 3000.0


def _analyzer(server: ServerInfo, *args: str) -> None:
    """The detached analyzer, run to its end: ``spawn_refill(server, fill=False)`` with ``args`` added."""
    command = [sys.executable, "-m", "refresher.pool", "refill", "--dsn", server.dsn("postgres")]
    subprocess.run([*command, "--database", server.dbname, "--no-fill", *args], check=True, timeout=120)


def test_one_analysis_per_handout_however_many_analyzers_are_started(bars: ServerInfo) -> None:
    """A no-op refresh starts an analyzer when it finds a record; the handout's own was started too, and may be
    at it or done: either way each table is analyzed once."""
    save_pristine(bars, pool_size=0, fill_pool=False)
    mark = _pristine_mark_of(bars)
    name = f"{bars.dbname}_t"
    checkout_clone(bars, name, refill=False, analyze=_no_analysis)
    try:
        # Its analyzer at it: a no-op refresh finds no record to start another for.
        with psycopg.connect(bars.dsn(name), autocommit=True) as analyzer:
            analyzer.execute("SELECT pg_advisory_lock(hashtext(%s))", (PENDING_SETTING,))
            with psycopg.connect(bars.dsn("postgres")) as conn:
                assert name not in pool.unfinished_analyses(conn)
                assert name in _records(bars)
        with psycopg.connect(bars.dsn("postgres")) as conn:
            assert name in pool.unfinished_analyses(conn)
        _analyzer(bars)  # the no-op refresh's, first
        assert name not in _records(bars)
        _analyzer(bars, "--analyze", name, "--also", ",".join(mark.pending))  # the handout's own, late
        counts = _analyze_counts(bars, name)
        assert counts["ohlcv_daily"] == 1 and max(counts.values()) == 1, counts
    finally:
        drop_clone(bars, name)


def _pristine_mark_of(server: ServerInfo) -> Any:
    with psycopg.connect(server.dsn("postgres")) as conn:
        mark = _pristine_mark(conn, server.dbname)
    assert mark is not None and "ohlcv_daily" in mark.pending
    return mark
