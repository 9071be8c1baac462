"""A run of daily refreshes from a user's files, each leaving every daily feature equal to a computation from
scratch over the bars the database holds, and a reset equal to the database: one more session appended, a new
month (a profile with ``start:``, so no month drops out), a back-fill inside an earlier month, a halted symbol
and its late bars, a symbol added and one removed, and the as-of going backwards."""

from __future__ import annotations

import datetime as dt
import math
import subprocess
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import psycopg
import pytest

from featurestore import FeatureStore
from refresher import snapshot
from refresher.calendar import sessions_between
from refresher.engines.local import LocalEngine
from refresher.features import FEATURES, FeatureCounts, compute_universe
from refresher.pool import wait_for_pool
from refresher.profile import load_profile
from refresher.refresh import refresh
from tests.child_processes import outputs
from tests.refresher.test_refresh_batches import root
from tests.refresher.test_replay import _contents

__all__ = ["root"]  # a fixture, imported to be found
pytestmark = pytest.mark.postgres
DAILY = sorted(name for name, spec in FEATURES.items() if spec.timeframe == "1d")
PROFILE = """\
universe:
  symbols: [{symbols}]
exchange: XNYS
start: 2024-03-01
timeframes: [1d]
features: [{features}]
source: {{kind: files, path: data, daily: "daily/{{symbol}}.csv", allow_shrink: true}}
"""


def write_bars(
    root: Path,
    symbol: str,
    seed: int,
    *,
    halted: tuple[dt.date, ...] = (),
    closes: Mapping[dt.date, float] = {},
) -> None:
    """The symbol's daily bars, March to July 2024, less the ``halted`` sessions, with ``closes`` corrected."""
    days = sessions_between("XNYS", dt.date(2024, 3, 1), dt.date(2024, 7, 31))
    rng = np.random.default_rng(seed)
    close = 50 * np.exp(np.cumsum(rng.normal(0, 0.02, len(days))))
    open_ = close * np.exp(rng.normal(0, 0.01, len(days)))
    frame = pd.DataFrame(
        {
            "date": days,
            "open": open_.round(4),
            "high": (np.maximum(open_, close) * (1 + rng.uniform(0, 0.02, len(days)))).round(4),
            "low": (np.minimum(open_, close) * (1 - rng.uniform(0, 0.02, len(days)))).round(4),
            "close": close.round(4),
            "volume": rng.integers(1_000, 100_000, len(days)),
        }
    )
    for day, value in closes.items():
        row = frame["date"] == day
        frame.loc[row, "close"] = value
        frame.loc[row, "high"] = frame.loc[row, "high"].clip(lower=value)
        frame.loc[row, "low"] = frame.loc[row, "low"].clip(upper=value)
    path = root / "data" / "daily" / f"{symbol}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    frame[~frame["date"].isin(halted)].to_csv(path, index=False)


def assert_features_from_scratch(
    dsn: str, symbols: list[str], as_of: dt.date, since: dt.date = dt.date(2024, 3, 1)
) -> None:
    """Every daily feature's table equals the feature computed over the profile's bars in the database (those
    from ``since`` to ``as_of``: a month that left the window stays without ``--prune``)."""
    with psycopg.connect(dsn) as conn:
        bars = {}
        for symbol in symbols:
            rows = conn.execute(
                "SELECT date, open, high, low, close, volume FROM ohlcv_daily "
                "WHERE symbol = %s AND date BETWEEN %s AND %s ORDER BY date",
                (symbol, since, as_of),
            ).fetchall()
            frame = pd.DataFrame(rows, columns=["date", "open", "high", "low", "close", "volume"])
            frame.index = pd.DatetimeIndex(pd.to_datetime(frame.pop("date")), name="date")
            bars[symbol] = frame.astype(float)
        for name in DAILY:
            for symbol, want in compute_universe(name, bars).items():
                rows = conn.execute(
                    f"SELECT * FROM features_{name} WHERE symbol = %s ORDER BY date", (symbol,)
                ).fetchall()
                assert [r[1] for r in rows] == [t.date() for t in want.index], (name, symbol)
                for row, values in zip(rows, want.itertuples(index=False), strict=True):
                    for column, have, value in zip(want.columns, row[2:], values, strict=True):
                        where = (name, symbol, row[1], column)
                        if math.isnan(value):
                            assert have is None, where
                        else:
                            assert have == pytest.approx(value, rel=1e-9, abs=1e-12), where


def test_daily_refreshes_leave_features_equal_to_a_computation_from_scratch(root: Path) -> None:
    engine, store = LocalEngine(root / "state"), FeatureStore(root / "store")
    for seed, symbol in enumerate(["AAA", "BBB", "CCC", "DDD"]):
        write_bars(root, symbol, seed)

    def day(as_of: dt.date, symbols: list[str], *, prune: bool = False) -> FeatureCounts:
        (root / "p.yaml").write_text(PROFILE.format(symbols=", ".join(symbols), features=", ".join(DAILY)))
        report = refresh(load_profile(str(root / "p.yaml"), [], as_of=as_of), engine, store, prune=prune)
        server = engine.start("p")
        assert_features_from_scratch(server.dsn(), symbols, as_of)
        live = _contents(server.dsn())
        wait_for_pool(server, timeout=120)
        assert snapshot.restore_pristine(server, refill=False).method in ("pool", "template")
        assert _contents(server.dsn()) == live
        return report.features

    three = ["AAA", "BBB", "CCC"]
    appending = len(DAILY) - 1  # per symbol: every daily feature but the universe's correlation
    day(dt.date(2024, 6, 27), three)
    assert day(dt.date(2024, 6, 28), three).appended == 3 * appending
    assert day(dt.date(2024, 7, 1), three).appended == 3 * appending  # July's first session: a new segment
    # AAA's close of April 15 corrected, BBB halted on July 2 and 3.
    write_bars(root, "AAA", 0, closes={dt.date(2024, 4, 15): 77.0})
    write_bars(root, "BBB", 1, halted=(dt.date(2024, 7, 2), dt.date(2024, 7, 3)))
    assert day(dt.date(2024, 7, 5), three).appended == 2 * appending  # AAA reloads whole
    write_bars(root, "BBB", 1)  # the halted sessions' bars arrive late: a back-fill inside July
    assert day(dt.date(2024, 7, 8), [*three, "DDD"]).appended == 2 * appending  # BBB whole, DDD new
    day(dt.date(2024, 7, 9), ["AAA", "BBB", "DDD"], prune=True)
    day(dt.date(2024, 6, 28), ["AAA", "BBB", "DDD"])  # the as-of back: July's rows go


TWO = """\
universe:
  symbols: [{symbols}]
exchange: XNYS
months: 3
timeframes: [1d]
features: [{features}]
seed: 4
"""
REFRESH = textwrap.dedent(
    """
    import datetime as dt, sys
    from pathlib import Path
    from featurestore import FeatureStore
    from refresher.engines.local import LocalEngine
    from refresher.profile import load_profile
    from refresher.refresh import refresh
    root, name, as_of = Path(sys.argv[1]), sys.argv[2], dt.date.fromisoformat(sys.argv[3])
    profile = load_profile(str(root / f"{name}.yaml"), [], as_of=as_of)
    print(refresh(profile, LocalEngine(root / "state"), FeatureStore(root / "store")).features.computed)
    """
)


def test_two_profiles_sharing_symbols_and_features_refreshed_at_once_into_one_store(root: Path) -> None:
    symbols = {"left": ["AAA", "BBB", "CCC"], "right": ["BBB", "CCC", "DDD"]}
    for name, listed in symbols.items():
        (root / f"{name}.yaml").write_text(TWO.format(symbols=", ".join(listed), features=", ".join(DAILY)))
    for as_of in (dt.date(2024, 6, 27), dt.date(2024, 6, 28)):  # a cold load, then a day's appends
        runs = [
            subprocess.Popen(
                [sys.executable, "-c", REFRESH, str(root), name, as_of.isoformat()],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for name in symbols
        ]
        for run, (_out, err) in zip(runs, outputs(runs, timeout=600), strict=True):
            assert run.returncode == 0, err
        for name, listed in symbols.items():
            server = LocalEngine(root / "state").start(name)
            assert_features_from_scratch(server.dsn(), listed, as_of, since=dt.date(2024, 4, 1))
