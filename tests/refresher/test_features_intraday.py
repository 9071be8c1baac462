"""Intraday features from minute bars: per session (Tokyo's lunch break inside it), never across sessions,
and recomputed per (symbol, month)."""

from __future__ import annotations

import datetime as dt
import functools
import warnings
from contextlib import closing
from dataclasses import replace
from pathlib import Path
from typing import Any

import exchange_calendars
import numpy as np
import pandas as pd
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from featurestore import FeatureStore
from refresher.errors import ProfileError
from refresher.features import get_feature, refresh_features
from refresher.features.cached import minute_frame
from refresher.plan import segment_key
from refresher.profile import Profile, profile_from_file
from refresher.refresh import compute_plan
from refresher.sources import make_source
from tests.refresher.test_features_load import conn, store

__all__ = ["conn", "store"]  # fixtures, imported to be found
AS_OF = dt.date(2024, 6, 28)
PROFILE = """\
universe:
  symbols: [AAA, "7203"]
  exchanges: {{"7203": XTKS}}
exchange: XNYS
months: 2
timeframes: [{timeframes}]
features: [{features}]
seed: 5
"""
TZ = {"AAA": "America/New_York", "7203": "Asia/Tokyo"}


@functools.cache
def xcals_calendar(name: str) -> Any:
    """exchange_calendars itself, the independent reference (its own deprecation noise silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return exchange_calendars.get_calendar(name, start="2024-01-01", end="2024-12-31")


def write(tmp_path: Path, features: str = "intraday_session", timeframes: str = "1d, 1m") -> Profile:
    path = tmp_path / "intraday.yaml"
    path.write_text(PROFILE.format(features=features, timeframes=timeframes))
    return profile_from_file(path, as_of=AS_OF)


@pytest.fixture(scope="module")
def bars(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pd.DataFrame]:
    """Each symbol's June 2024 minute bars, as the source makes them."""
    profile = write(tmp_path_factory.mktemp("intraday"))
    with closing(make_source(profile)) as source:
        plan = compute_plan(profile, source, FeatureStore(tmp_path_factory.mktemp("s")), None)
        june = [s for s in plan.desired if s.timeframe == "1m" and s.month == dt.date(2024, 6, 1)]
        return {s.symbol: minute_frame(source.fetch(s), TZ[s.symbol]) for s in june}


@pytest.mark.parametrize("symbol", ["AAA", "7203"])
def test_vwap_and_session_values_equal_an_independent_computation(
    bars: dict[str, pd.DataFrame], symbol: str
) -> None:
    df = bars[symbol]
    out = get_feature("intraday_session").compute(df)
    calendar = xcals_calendar("XTKS" if symbol == "7203" else "XNYS")
    sessions = calendar.sessions_in_range("2024-06-01", "2024-06-28")
    assert [ts.date() for ts in out.index] == [s.date() for s in sessions]
    for day, row in out.iterrows():
        # The session's bars by exchange_calendars' own open and close, not by our session column.
        opened, closed = calendar.session_open_close(day)
        mine = df[(df.index >= opened) & (df.index < closed)]
        pv = (mine["close"] * mine["volume"]).sum()
        assert row["vwap"] == pytest.approx(pv / mine["volume"].sum(), rel=1e-12)
        assert row["dollar_volume"] == pytest.approx(pv, rel=1e-12)
        assert row["intraday_return"] == pytest.approx(mine["close"].iloc[-1] / mine["open"].iloc[0] - 1)
        assert row["minutes"] == len(mine)
        window = mine[mine.index < mine.index[0] + pd.Timedelta(minutes=30)]
        assert row["opening_range_high"] == window["high"].max()
        assert row["opening_range_low"] == window["low"].min()


def test_websocket_testing_is_what_the_feed_showed_at_each_close(bars: dict[str, pd.DataFrame]) -> None:
    df = bars["AAA"]
    out = get_feature("websocket_testing").compute(df)
    calendar = xcals_calendar("XNYS")
    for day, row in out.iterrows():
        opened, closed = calendar.session_open_close(day)
        mine = df[(df.index >= opened) & (df.index < closed)]
        assert row["last_price"] == mine["close"].iloc[-1]
        assert row["spread_proxy"] == pytest.approx(((mine["high"] - mine["low"]) / mine["close"]).median())
        assert row["tick_count"] == sum(-(-int(v) // 100) for v in mine["volume"])


def test_tokyo_lunch_break_is_inside_the_session_but_not_a_return(bars: dict[str, pd.DataFrame]) -> None:
    df = bars["7203"]
    local = df.index.tz_convert("Asia/Tokyo")
    day = df[local.date == local.date[0]]
    times = day.index.tz_convert("Asia/Tokyo")
    assert times[0].time() == dt.time(9, 0) and dt.time(11, 30) not in [t.time() for t in times]
    assert dt.time(12, 30) in [t.time() for t in times]  # one session: morning and afternoon
    log_ret = np.log(day["close"] / day["close"].shift(1))
    across_lunch = pd.Series(day.index).diff().to_numpy() > np.timedelta64(1, "m")
    assert across_lunch.sum() == 1
    without = np.sqrt((log_ret[~across_lunch] ** 2).sum())
    with_lunch = np.sqrt((log_ret**2).sum())
    out = get_feature("intraday_session").compute(day)
    assert out["realized_vol"].iloc[0] == pytest.approx(without, rel=1e-12)
    assert out["realized_vol"].iloc[0] != pytest.approx(with_lunch, rel=1e-9)


def test_no_value_crosses_a_session_boundary(bars: dict[str, pd.DataFrame]) -> None:
    for df in bars.values():
        whole = get_feature("intraday_session").compute(df)
        for day in whole.index[:5]:
            alone = get_feature("intraday_session").compute(df[df["session"] == day])
            pd.testing.assert_frame_equal(alone, whole.loc[[day]])


@pytest.mark.postgres
def test_loaded_per_session_and_recomputed_per_month(
    tmp_path: Path, conn: psycopg.Connection[Any], store: FeatureStore
) -> None:
    profile = write(tmp_path)
    with closing(make_source(profile)) as source:
        plan = compute_plan(profile, source, store, None)
        tables = {s: source.fetch(s) for s in plan.desired}
    store.put_many((plan.keys[s], t, s.symbol) for s, t in tables.items())
    counts = refresh_features(conn, profile, store, plan)
    assert (counts.loaded, counts.computed) == (2, 4)  # two symbols, two months each
    for symbol, exchange in (("AAA", "XNYS"), ("7203", "XTKS")):
        sessions = xcals_calendar(exchange).sessions_in_range("2024-05-01", AS_OF.isoformat())
        got = conn.execute(
            "SELECT date FROM features_intraday_session WHERE symbol = %s ORDER BY date", (symbol,)
        ).fetchall()
        assert [d for (d,) in got] == [s.date() for s in sessions]

    # June's minute bars of 7203 change (a source's new version): that (symbol, month) alone is computed again,
    # the other month of 7203 is a store hit, and AAA is not even looked at.
    june = next(s for s in plan.desired if s.symbol == "7203" and s.timeframe == "1m" and s.month.month == 6)
    volume = tables[june]["volume"]
    changed = tables[june].set_column(
        tables[june].schema.get_field_index("volume"), "volume", pc.add(volume, pa.scalar(1, pa.int64()))
    )
    key = segment_key(june, "synthetic", "changed")
    store.put_many([(key, changed, june.symbol)])
    counts = refresh_features(conn, profile, store, replace(plan, keys={**plan.keys, june: key}))
    assert (counts.loaded, counts.computed) == (1, 1)
    vwap = conn.execute(
        "SELECT date, vwap FROM features_intraday_session WHERE symbol = '7203' AND date >= '2024-06-01'"
    ).fetchall()
    frame = minute_frame(changed, "Asia/Tokyo")
    for day, value in vwap:
        mine = frame[frame["session"] == pd.Timestamp(day)]
        assert value == pytest.approx(
            (mine["close"] * mine["volume"]).sum() / mine["volume"].sum(), rel=1e-12
        )


def test_needs_minute_bars_in_the_profile(tmp_path: Path) -> None:
    with pytest.raises(ProfileError) as info:
        write(tmp_path, timeframes="1d")
    assert info.value.field == "features.0" and "needs 1m" in str(info.value)


@pytest.mark.parametrize(
    "entry", ["trend_analysis", "{name: trend_analysis, as: trend_fast, params: {fast: 5}}"]
)
def test_a_daily_feature_needs_daily_bars_in_the_profile(tmp_path: Path, entry: str) -> None:
    # Without them it loaded nothing and said nothing: its table never appeared.
    with pytest.raises(ProfileError) as info:
        write(tmp_path, features=f"intraday_session, {entry}", timeframes="1m")
    assert info.value.field == "features.1" and "needs 1d in timeframes" in str(info.value)
