"""desired_segments: every (symbol, timeframe, month) of a profile, sorted, and only those."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from refresher.profile import load_profile
from refresher.segments import Segment, desired_segments
from refresher.settings import BUILTIN_PROFILES


def test_desired_segments_cover_symbols_timeframes_months() -> None:
    p = load_profile("ui_testing", [BUILTIN_PROFILES], as_of=dt.date(2025, 3, 14))
    segs = desired_segments(p)
    assert len(segs) == 20 * 2 * 3
    assert segs == sorted(segs) and len(set(segs)) == len(segs)
    assert {s.month for s in segs} == {dt.date(2025, 1, 1), dt.date(2025, 2, 1), dt.date(2025, 3, 1)}
    assert {s.timeframe for s in segs} == {"1d", "1m"}
    assert segs[0] == Segment("AAPL", "1d", dt.date(2025, 1, 1))


def test_months_without_sessions_are_still_desired(tmp_path: Path) -> None:
    path = tmp_path / "tiny.yaml"
    path.write_text("universe: {symbols: [AAPL]}\nstart: 2024-12-28\nend: 2025-01-01\ntimeframes: [1d]\n")
    p = load_profile(str(path), [])
    # 2025-01-01 is a holiday: January has no session in range, yet the month is desired (recorded empty)
    assert desired_segments(p) == [
        Segment("AAPL", "1d", dt.date(2024, 12, 1)),
        Segment("AAPL", "1d", dt.date(2025, 1, 1)),
    ]
