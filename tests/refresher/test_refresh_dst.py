"""Minute bars across the spring DST changes, loaded through the real command into a real server and read back:
each is the UTC instant exchange_calendars names, none twice and none missing, and every session opens at its
local time (New York changes on 10 March 2024, London on the 31st, Tokyo never; the window ends 5 April)."""

from __future__ import annotations

import uuid
import warnings

import exchange_calendars as xcals
import psycopg
import pytest

from tests.fixtures_postgres import world_traversable_tmp
from tests.refresher.test_refresh_e2e import Workspace

PROFILE = """\
universe:
  symbols: [AAPL, VOD, "7203"]
  exchanges: {VOD: XLON, "7203": XTKS}
exchange: XNYS
start: 2024-03-01
end: 2024-04-05
timeframes: [1m]
"""
UTC_OPENS = {"AAPL": {"14:30", "13:30"}, "VOD": {"08:00", "07:00"}, "7203": {"00:00"}}
LISTED = {"AAPL": ("XNYS", "09:30"), "VOD": ("XLON", "08:00"), "7203": ("XTKS", "09:00")}


@pytest.mark.slow
def test_minute_bars_across_dst_changes_are_stored_as_the_calendars_utc_instants() -> None:
    ws = Workspace(world_traversable_tmp("refresher-dst-"), "local", f"dst_{uuid.uuid4().hex[:8]}")
    (ws.root / "profiles").mkdir()
    (ws.root / "profiles" / f"{ws.profile}.yaml").write_text(PROFILE)
    try:
        ws.refresh()
        with psycopg.connect(ws.dsn()) as conn:
            for symbol, (exchange, opening) in LISTED.items():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the library's own pandas deprecations
                    cal = xcals.get_calendar(exchange, start="2024-01-02", end="2024-12-31")
                    expected = [
                        m.to_pydatetime()
                        for s in cal.sessions_in_range("2024-03-01", "2024-04-05")
                        for m in cal.session_minutes(s)
                    ]
                stored = [
                    ts
                    for (ts,) in conn.execute(
                        "SELECT ts FROM ohlcv_1min WHERE symbol = %s ORDER BY ts", (symbol,)
                    )
                ]
                assert stored == expected, symbol  # the same instants: none doubled, none missing, none moved
                opens = conn.execute(
                    "SELECT to_char(min(ts AT TIME ZONE %s), 'HH24:MI'), to_char(min(ts AT TIME ZONE 'UTC'), 'HH24:MI')"
                    " FROM ohlcv_1min WHERE symbol = %s GROUP BY (ts AT TIME ZONE %s)::date",
                    (cal.tz.key, symbol, cal.tz.key),
                ).fetchall()
                assert {local for local, _ in opens} == {opening}, symbol
                assert {utc for _, utc in opens} == UTC_OPENS[symbol], symbol  # moved by each change
    finally:
        ws.down()
