"""Validation cost at the source edge: the rules of ``refresher.sources.validate`` over the backtesting
profile's bars (~9.7 M rows in 2,400 segments), against the time the synthetic source takes to produce them.

The share of a cold refresh is taken against the cold refresh row of the last ``bench/results.md`` (the same
machine's latest full run), since measuring a cold refresh here again would double the benchmark's cost.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from refresher.calendar import get_calendar
from refresher.profile import load_profile
from refresher.segments import desired_segments
from refresher.settings import Settings
from refresher.sources.synthetic import SyntheticSource
from refresher.sources.validate import VALUE_COLUMNS, Bars, screen

AS_OF = dt.date(2025, 6, 13)
RESULTS = Path(__file__).with_name("results.md")


def _bars(table: pa.Table, key: str) -> Bars:
    col = table.column(key)
    if key == "date":
        when = col.cast(pa.int32()).to_numpy().astype(np.int64)
    else:
        when = col.cast(pa.int64()).to_numpy() * 1000
    values = {n: table.column(n).to_numpy().astype(np.float64) for n in VALUE_COLUMNS}
    return Bars(when, np.ones(len(when), np.bool_), values, table.select([key, *VALUE_COLUMNS]).to_pandas())


def _last_cold_refresh() -> float | None:
    if not RESULTS.exists():
        return None
    found = re.search(r"\| backtesting cold refresh \([^)]*\) \| ([\d.,]+) \|", RESULTS.read_text())
    return float(found.group(1).replace(",", "")) if found else None


def run(quick: bool = False) -> list[dict[str, Any]]:
    profile = load_profile("backtesting", Settings.from_env().profiles_dirs, as_of=AS_OF)
    if quick:  # 10 of the 100 symbols
        profile = replace(profile, listings=profile.listings[:10])
    cal = get_calendar(profile.exchange)
    produce = check = 0.0
    rows = 0
    with SyntheticSource(profile) as source:
        for segment in desired_segments(profile):
            started = time.perf_counter()
            table = source.fetch(segment)
            produce += time.perf_counter() - started
            key = "date" if segment.timeframe == "1d" else "ts"
            bars = _bars(table, key)
            started = time.perf_counter()
            verdict = screen(segment, bars, source="bench", policy="fail", cal=cal)
            check += time.perf_counter() - started
            assert verdict.keep.all()
            rows += table.num_rows
    cold = _last_cold_refresh()
    share = (
        f"; {100 * check / cold:.1f}% of the last cold refresh ({cold:.1f} s)" if cold and not quick else ""
    )
    return [
        {
            "benchmark": f"validate backtesting bars ({rows:,} rows{', quick: 10 symbols' if quick else ''})",
            "ours": round(check, 3),
            "baseline": round(produce, 3),
            "unit": "s",
            "note": f"baseline: the synthetic source producing the same rows; {rows / check / 1e6:.1f} M rows/s{share}",
        }
    ]
