"""Planner statistics in the seconds after a refresh, while the refill analyzes: a reset or checkout then never
waits for the analysis and its database is analyzed after; what the copy must analyze is in its mark from its
birth, so a kill -9 anywhere in the refill loses nothing; two refills at once analyze once. On a real server."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from refresher import pool
from refresher._snapshot_sql import PoolSizing, _Mark, _pristine_mark
from refresher.engines.base import ServerInfo
from refresher.pool import checkout_clone, drop_clone, pool_name, pool_status, refill_pool, wait_for_pool
from refresher.snapshot import pristine_name, restore_pristine, save_pristine
from tests.refresher.test_planner_stats import _stale, _stats
from tests.refresher.test_snapshot_crash import _databases, _killed_after

pytestmark = pytest.mark.postgres


def test_a_mark_says_analyzed_or_what_is_pending_and_reads_back() -> None:
    from refresher._snapshot_sql import _PRISTINE_MARK

    base = _Mark(PoolSizing(2), "a" * 64, "none", "0123456789abcdef")
    pending = _Mark(
        PoolSizing(2), "a" * 64, "none", "0123456789abcdef", pending=("ohlcv_daily", "Odd-Name", "symbols")
    )
    assert pending.text().endswith(
        " pending=ohlcv_daily,symbols"
    )  # sorted, a name no loaded table has left out
    assert (
        _Mark(PoolSizing(2), "a" * 64, "none", "0123456789abcdef", analyzed=True, pending=("x",))
        .text()
        .endswith(" analyzed")
    )
    for mark in (base, pending):
        match = _PRISTINE_MARK.match(mark.text())
        assert match is not None
    assert _PRISTINE_MARK.match(base.text() + " pending=") is None


def _max_close(dsn: str) -> float:
    """The greatest ``close`` of ``ohlcv_daily`` in its statistics (every row is in the sample here)."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT (SELECT max(v) FROM unnest(coalesce(histogram_bounds::text::float8[], '{}') "
            "|| coalesce(most_common_vals::text::float8[], '{}')) AS u(v)) FROM pg_stats "
            "WHERE schemaname = 'public' AND tablename = 'ohlcv_daily' AND attname = 'close'"
        ).fetchone()
    assert row is not None
    return float(row[0])


def _change_within_the_last_page(server: ServerInfo, close: float) -> None:
    """Give one of the 21 daily bars a new greatest ``close``: an update in the table's only page, which its
    catalog (``relpages``) cannot tell; only the working database's counters can."""
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        conn.execute(
            "UPDATE ohlcv_daily SET close = %s WHERE date = (SELECT min(date) FROM ohlcv_daily)", (close,)
        )
        conn.execute("SELECT pg_stat_force_next_flush()")
        pages = conn.execute(
            "SELECT pg_relation_size('ohlcv_daily') / 8192, relpages FROM pg_class "
            "WHERE relname = 'ohlcv_daily'"
        ).fetchone()
    assert pages is not None and pages[0] == pages[1]


def _analyzed_everywhere(server: ServerInfo) -> None:
    """The working database analyzed, then a pool of one made from an analyzed pristine copy."""
    save_pristine(server, pool_size=1)
    refill_pool(server)
    assert _stale(server.dsn()) == []


# Kills after the N-th catalog change (``_execute``) or ANALYZE, whichever thread sends it.
_COUNT_ANALYZE = """
import psycopg
_execute = psycopg.Connection.execute
def execute(self, query, *args, **kwargs):
    cursor = _execute(self, query, *args, **kwargs)
    text = query if isinstance(query, str) else query.as_string(self)
    if text.startswith("ANALYZE"):
        after_statement()
    return cursor
psycopg.Connection.execute = execute
pool.refill_pool(server)
"""


def test_kill_9_anywhere_in_the_refill_then_a_rerun_analyzes_a_change_the_catalog_cannot_see(
    bars: ServerInfo,
) -> None:
    db = bars.dbname
    _analyzed_everywhere(bars)
    step, finished = 0, False
    while not finished:
        step += 1
        assert step < 60, "the refill never finished"
        close = 1000.0 + step
        _change_within_the_last_page(bars, close)
        save_pristine(bars, pool_size=1, fill_pool=False)  # the mark records it: ohlcv_daily is pending
        with psycopg.connect(bars.dsn("postgres")) as conn:
            mark = _pristine_mark(conn, db)
        assert mark is not None and "ohlcv_daily" in mark.pending
        finished = _killed_after(bars, step, _COUNT_ANALYZE)
        refill_pool(bars)  # the rerun
        assert _databases(bars) == {db, pristine_name(db), pool_name(db, 0)}, f"step {step}"
        for dsn in (bars.dsn(), bars.dsn(pool_name(db, 0))):
            assert _stale(dsn) == [], f"step {step}"
            assert _max_close(dsn) == close, f"step {step}: {dsn}"
    assert step > 5  # the kill really landed between the working database's analysis and the copy's


def test_advance_records_what_its_replay_wrote(bars: ServerInfo) -> None:
    from refresher.snapshot import advance_pristine, ledger_version

    _analyzed_everywhere(bars)
    with psycopg.connect(bars.dsn(), autocommit=True) as conn:
        base = ledger_version(conn)
    assert base is not None

    def apply(conn: psycopg.Connection[Any]) -> None:
        conn.execute("UPDATE ohlcv_daily SET close = 2000 WHERE date = (SELECT min(date) FROM ohlcv_daily)")

    _change_within_the_last_page(bars, 2000.0)
    assert advance_pristine(bars, base, apply) is not None
    with psycopg.connect(bars.dsn("postgres")) as conn:
        mark = _pristine_mark(conn, bars.dbname)
    assert mark is not None and not mark.analyzed and "ohlcv_daily" in mark.pending
    refill_pool(bars)
    wait_for_pool(bars)
    assert _max_close(bars.dsn(pool_status(bars).ready[0])) == 2000.0


def _holding_the_analysis(
    server: ServerInfo, monkeypatch: pytest.MonkeyPatch
) -> tuple[threading.Thread, threading.Event, Callable[[], None]]:
    """A refill on a thread of this process whose analysis of the pristine copy's copy waits for ``release``:
    (the thread, set once it waits, release)."""
    waiting, go = threading.Event(), threading.Event()
    real = pool.analyze_stale

    def held(conn: psycopg.Connection[Any], also: Any = ()) -> list[str]:
        if conn.info.dbname.startswith(pool_name(server.dbname, 0)[:-1]):
            waiting.set()
            assert go.wait(120)
        return real(conn, also)

    monkeypatch.setattr(pool, "analyze_stale", held)
    refill = threading.Thread(target=refill_pool, args=(server,))
    refill.start()
    return refill, waiting, go.set


def _eventually(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 60
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def _in_time(call: Callable[[], Any]) -> Any:
    """``call()`` on a thread; fails (rather than hangs) when it waits for the held analysis."""
    out: list[Any] = []
    worker = threading.Thread(target=lambda: out.append(call()), daemon=True)
    worker.start()
    worker.join(60)
    assert out, "it waited for the refill's analysis"
    return out[0]


def test_a_reset_and_a_checkout_during_the_analysis_copy_at_once_and_are_analyzed_after(
    bars: ServerInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_pristine(bars, pool_size=1, fill_pool=False)  # as a refresh leaves it: not analyzed, no clone
    refill, waiting, release = _holding_the_analysis(bars, monkeypatch)
    name = f"{bars.dbname}_t"
    try:
        assert waiting.wait(60)
        assert _in_time(lambda: restore_pristine(bars, refill=False)).method == "template"
        dsn = _in_time(lambda: checkout_clone(bars, name, refill=False))
        # Copies of the copy as it was, analyzed by a detached process while the refill's analysis still waits.
        for target in (bars.dsn(), dsn):
            _eventually(lambda t=target: _stale(t) == [], f"{target} was never analyzed")
            assert {"symbol", "ts"} <= _stats(target, "ohlcv_1min_2024_01")
        assert not _pristine_mark_analyzed(bars)
    finally:
        release()
        refill.join(120)
        drop_clone(bars, name)
    wait_for_pool(bars)
    assert _pristine_mark_analyzed(bars)
    assert _stale(bars.dsn(pool_status(bars).ready[0])) == []


def _pristine_mark_analyzed(server: ServerInfo) -> bool:
    with psycopg.connect(server.dsn("postgres")) as conn:
        mark = _pristine_mark(conn, server.dbname)
    return mark is not None and mark.analyzed


def test_two_refills_at_once_leave_one_analyzed_copy_and_a_full_pool(bars: ServerInfo) -> None:
    _analyzed_everywhere(bars)
    _change_within_the_last_page(bars, 3000.0)
    save_pristine(bars, pool_size=2, fill_pool=False)
    with psycopg.connect(bars.dsn("postgres")) as conn:
        before = _pristine_mark(conn, bars.dbname)
    both = [threading.Thread(target=refill_pool, args=(bars,)) for _ in range(2)]
    for thread in both:
        thread.start()
    for thread in both:
        thread.join(120)
    db = bars.dbname
    assert _databases(bars) == {db, pristine_name(db), pool_name(db, 0), pool_name(db, 1)}
    with psycopg.connect(bars.dsn("postgres")) as conn:
        after = _pristine_mark(conn, db)
    assert before is not None and after is not None and after.analyzed
    for name in pool_status(bars).ready:
        assert _stale(bars.dsn(name)) == [] and _max_close(bars.dsn(name)) == 3000.0


def test_the_plugins_refill_thread_analyzes_a_clone_checked_out_before_the_copy_was(bars: ServerInfo) -> None:
    from refresher._pytest_share import PoolRefiller

    save_pristine(bars, pool_size=1, fill_pool=False)
    refiller = PoolRefiller(bars)
    name = f"{bars.dbname}_t"
    try:
        dsn = checkout_clone(bars, name, refill=False, analyze=refiller.analyze)
        _eventually(lambda: _stale(dsn) == [], "the checked-out clone was never analyzed")
        assert {"symbol", "ts"} <= _stats(dsn, "ohlcv_1min_2024_01")
        refiller.discard(name)
    finally:
        refiller.close()
